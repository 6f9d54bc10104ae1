"""bench/make_models.py's pieces, cheaply: random blocks are valid and scaled as promised, the
Q4_K_M recipe is llama.cpp's, and the tensor lists match what ouzel's loader asks for. (Writing
and loading a reduced-depth file is `python bench/make_models.py NAME --layers 2 --check`:
hundreds of MB, so not run here.)"""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import make_models as mm  # noqa: E402
import model_specs as specs  # noqa: E402


@pytest.mark.parametrize("qtype", sorted(mm.FILLERS))
def test_random_blocks_dequantize_to_small_centred_weights(qtype):
    import gguf
    rng = np.random.default_rng(1)
    raw = mm.random_blocks((64, 512), qtype, rng)
    w = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
    assert w.shape == (64, 512) and np.isfinite(w).all()
    assert abs(w.std() - mm.STD) < 0.1 * mm.STD, w.std()
    assert abs(w.mean()) < 0.05 * mm.STD, w.mean()
    # and ouzel's own dequantizer reads the same numbers
    import torch
    from ouzel.quant.blocks import block_type, dequantize
    bt = block_type(gguf.GGMLQuantizationType[qtype].value)
    assert np.allclose(dequantize(torch.from_numpy(raw.copy()), bt).numpy(), w, atol=1e-6)


def test_q4_k_m_recipe_matches_llama_cpp():
    """use_more_bits over 32 layers: the first and last 4, and every third between (llama.cpp)."""
    more = [i for i in range(32) if specs.use_more_bits(i, 32)]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert specs.q4_k_m("blk.5.attn_v.weight", (1024, 4096), 5, 32) == "Q4_K"
    assert specs.q4_k_m("blk.6.ffn_down.weight", (4096, 14336), 6, 32) == "Q6_K"
    assert specs.q4_k_m("output.weight", (49152, 4096), None, 32) == "Q6_K"
    assert specs.q4_k_m("blk.0.ffn_gate_inp.weight", (128, 2048), 0, 48) == "F32"


@pytest.mark.parametrize("name", list(specs.SPECS))
def test_tensor_lists(name):
    spec = specs.SPECS[name]
    meta, tensors = mm.tensor_list(spec, 2, specs.VOCAB)
    names = {t.name for t in tensors}
    assert len(names) == len(tensors)
    assert {"token_embd.weight", "output.weight", "output_norm.weight"} <= names
    for t in tensors:
        assert t.qtype in mm.FILLERS or t.qtype in ("F32", "F16", "I32"), t
        if t.name.endswith("norm.weight"):
            assert t.fill == "ones" and t.qtype == "F32"
    if name.startswith("qwen3moe"):
        assert {t.name: t.shape for t in tensors}["blk.0.ffn_gate_exps.weight"] == (128, 768, 2048)
    if name.startswith("ds4"):
        kinds = {t.name.split(".", 2)[-1]: t.qtype for t in tensors if t.name.startswith("blk.")}
        assert kinds["ffn_gate_exps.weight"] == "IQ2_XXS" and kinds["ffn_down_exps.weight"] == "Q2_K"
        assert kinds["attn_q_b.weight"] == "Q8_0" and kinds["attn_compressor_kv.weight"] == "F16"
        assert kinds["ffn_gate_tid2eid.weight"] == "I32"


def test_hash_table_has_distinct_experts():
    t = mm.Tensor("blk.0.ffn_gate_tid2eid.weight", (1000, 6), "I32", n_experts=256)
    a = mm.tensor_data(t, np.random.default_rng(0))
    assert a.dtype == np.int32 and a.shape == (1000, 6) and a.min() >= 0 and a.max() < 256
    assert all(len(set(row)) == 6 for row in a.tolist())
