"""ouzel against Hugging Face transformers on tiny random models (tests/tiny_models.py TINY).

For each architecture: the HF directory and GGUF files of the same weights load into ouzel and
give transformers' logits in float32, for a full forward and token-by-token decode (across
Gemma 3's sliding window), and the same greedy continuation. Quantized GGUF (Q8_0, F16) gives the
logits of transformers run on the dequantized weights. Broken files raise OuzelError naming the
problem.

Tolerance: relative L2 < 1e-5 and max abs < 1e-4 over the whole [T, V] logits. Both sides compute
in float32 from identical weights, so what remains is float32 accumulation-order noise (different
matmul/attention kernels), typically ~1e-7 relative; any modelling mistake (a wrong norm offset,
rope base, window, scale or head layout) is orders of magnitude above it.
"""
from __future__ import annotations

import copy
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402

import ouzel  # noqa: E402
from ouzel.engine.generate import Sequence  # noqa: E402
from ouzel.errors import OuzelError  # noqa: E402

REL_TOL, ABS_TOL = 1e-5, 1e-4
DEVICE = os.environ.get("OUZEL_TEST_DEVICE", "cpu")  # the GPU check runs this file with cuda
PROMPT_LEN = 40
ARCHS = list(tm.TINY)


def close(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(relative L2 error, max abs error) of a against reference b."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm()), float((a - b).abs().max())


def assert_close(a, b, what: str, rel_tol: float = REL_TOL, abs_tol: float | None = ABS_TOL):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    rel, mx = close(a, b)
    assert rel < rel_tol, f"{what}: relative L2 error {rel:.3g} >= {rel_tol}"
    if abs_tol is not None:
        assert mx < abs_tol, f"{what}: max abs error {mx:.3g} >= {abs_tol}"


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


_BUILT: dict[str, SimpleNamespace] = {}


def _build(arch: str, workdir: Path) -> SimpleNamespace:
    if arch not in _BUILT:
        torch.manual_seed(0)
        model = tm.build_hf_model(arch, seed=1)
        hf_dir = tm.save_hf_dir(model, workdir / f"{arch}-hf")
        g = torch.Generator().manual_seed(2)
        ids = torch.randint(2, model.config.vocab_size, (PROMPT_LEN,), generator=g).tolist()
        _BUILT[arch] = SimpleNamespace(arch=arch, model=model, dir=hf_dir, ids=ids,
                                       ref=hf_logits(model, ids), gguf={}, workdir=workdir)
    return _BUILT[arch]


def gguf_path(t: SimpleNamespace, qtype: str) -> Path:
    if qtype not in t.gguf:
        t.gguf[qtype] = tm.write_gguf(t.model, t.arch, t.workdir / f"{t.arch}-{qtype}.gguf", qtype)
    return t.gguf[qtype]


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, workdir):
    return _build(request.param, workdir)


@pytest.fixture(scope="module")
def tiny_llama(workdir):
    return _build("llama", workdir)


@pytest.fixture(scope="module")
def llm_hf(tiny):
    return ouzel.load(tiny.dir, device=DEVICE)


# ------------------------------------------------------------------------------------ logits

def test_config_exercises_features(tiny):
    """The tiny configs contain what the tests claim to cover."""
    cfg = tiny.model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped KV
    if tiny.arch == "gemma3":
        assert {"sliding_attention", "full_attention"} <= set(cfg.layer_types)
        assert PROMPT_LEN > 2 * cfg.sliding_window
        assert cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads
    norms = [p for n, p in tiny.model.named_parameters() if n.endswith("norm.weight")]
    assert norms and all(p.std() > 0.1 for p in norms)


def test_hf_dir_logits(tiny, llm_hf):
    got = llm_hf.logits(tiny.ids)
    assert got.dtype == torch.float32
    assert_close(got, tiny.ref, f"{tiny.arch} HF dir full forward")


def test_decode_matches_full_forward(tiny, llm_hf):
    """Prefill one token, then step one at a time: every position's logits equal the full forward."""
    full = llm_hf.logits(tiny.ids)
    seq = Sequence(llm_hf.model, len(tiny.ids) + 1, torch.device(DEVICE))
    steps = [seq.prefill(tiny.ids[:1])]
    for tok in tiny.ids[1:]:
        steps.append(seq.step(tok))
    steps = torch.stack(steps).cpu()
    for i in range(len(tiny.ids)):
        assert_close(steps[i], full[i], f"{tiny.arch} decode position {i} vs full forward", abs_tol=None)
        assert_close(steps[i], tiny.ref[i], f"{tiny.arch} decode position {i} vs transformers", abs_tol=None)


def test_sliding_window_matters(workdir):
    """Sensitivity check: ouzel with the window switched off is far outside the tolerance, so
    the tests above do test the window."""
    tiny = _build("gemma3", workdir)
    llm = ouzel.load(tiny.dir, device=DEVICE)
    for layer in llm.model.model.layers:
        layer.self_attn.window = None
    w = tiny.model.config.sliding_window
    rel, _ = close(llm.logits(tiny.ids)[w:], tiny.ref[w:])
    assert rel > 100 * REL_TOL, rel


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
def test_gguf_logits(tiny, qtype):
    """GGUF of the same weights: F32 equals transformers; F16 / Q8_0 equal transformers run on the
    dequantized weights (gguf.quants), so the quantized matmuls compute exactly that function."""
    llm = ouzel.load(gguf_path(tiny, qtype), device=DEVICE)
    assert llm.loaded.architecture == tiny.arch
    if qtype == "F32":
        ref = tiny.ref
    else:
        ref = hf_logits(tm.stored_weights_model(tiny.model, tiny.arch, qtype), tiny.ids)
        # the comparison is meaningful: quantization moved the logits well beyond the tolerance
        assert close(ref, tiny.ref)[0] > 10 * REL_TOL
    assert_close(llm.logits(tiny.ids), ref, f"{tiny.arch} GGUF {qtype}")


def test_gguf_decode_q8_0(tiny):
    """Token-by-token decode on Q8_0 weights equals the full forward."""
    llm = ouzel.load(gguf_path(tiny, "Q8_0"), device=DEVICE)
    full = llm.logits(tiny.ids)
    seq = Sequence(llm.model, len(tiny.ids), torch.device(DEVICE))
    steps = [seq.prefill(tiny.ids[:1])] + [seq.step(t) for t in tiny.ids[1:]]
    assert_close(torch.stack(steps).cpu(), full, f"{tiny.arch} Q8_0 decode vs full forward")


def test_gguf_tokenizer_matches_hf_dir(tiny, llm_hf):
    llm = ouzel.load(gguf_path(tiny, "F32"), device=DEVICE)
    text = "The quick brown fox, 12345 otters and ouzels!"
    assert llm.tokenize(text, add_special=False) == llm_hf.tokenize(text, add_special=False)
    assert llm.tokenizer.bos_id == llm_hf.tokenizer.bos_id == 0
    assert llm.tokenizer.eos_id == llm_hf.tokenizer.eos_id == 1


# ------------------------------------------------------------------------------------ generation

@torch.no_grad()
def test_greedy_generate_matches_transformers(tiny, llm_hf):
    gen_cfg = copy.deepcopy(tiny.model.generation_config)
    gen_cfg.eos_token_id = None
    gen_cfg.pad_token_id = 0
    out = tiny.model.generate(torch.tensor([tiny.ids]), generation_config=gen_cfg, max_new_tokens=8,
                              min_new_tokens=8, do_sample=False)
    want = out[0, len(tiny.ids):].tolist()
    assert len(want) == 8
    got = llm_hf.generate_ids(tiny.ids, max_tokens=8, temperature=0.0, ignore_eos=True)
    assert got == want
    got_gguf = ouzel.load(gguf_path(tiny, "F32"), device=DEVICE).generate_ids(tiny.ids, max_tokens=8, temperature=0.0,
                                                               ignore_eos=True)
    assert got_gguf == want


# ------------------------------------------------------------------------------------ bad inputs

def _load_error(path) -> str:
    with pytest.raises(OuzelError) as e:
        ouzel.load(path)
    return str(e.value)


def test_gguf_missing_tensor(tiny_llama, tmp_path):
    p = tm.write_gguf(tiny_llama.model, "llama", tmp_path / "m.gguf", drop_tensors={"blk.0.attn_k.weight"})
    msg = _load_error(p)
    assert "blk.0.attn_k.weight" in msg and "missing" in msg


def test_gguf_shape_disagrees_with_metadata(tiny_llama, tmp_path):
    p = tm.write_gguf(tiny_llama.model, "llama", tmp_path / "m.gguf", set_keys={"llama.embedding_length": 96})
    msg = _load_error(p)
    assert "shape" in msg and "token_embd.weight" in msg


def test_gguf_unknown_architecture(tiny_llama, tmp_path):
    p = tm.write_gguf(tiny_llama.model, "llama", tmp_path / "m.gguf", architecture="mamba9")
    msg = _load_error(p)
    assert "mamba9" in msg and "llama" in msg and "gemma3" in msg  # names it and lists the supported


def test_gguf_truncated(tiny_llama, tmp_path):
    p = tmp_path / "cut.gguf"
    shutil.copy(gguf_path(tiny_llama, "F32"), p)
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 100)
    assert "truncated" in _load_error(p)


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip file, not a model" * 10)
    assert "not a GGUF file" in _load_error(p)


def test_gguf_unsupported_block_type(tiny_llama, tmp_path):
    import gguf
    GT = gguf.GGMLQuantizationType
    rows, cols = tiny_llama.model.model.layers[0].mlp.down_proj.weight.shape
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[GT.IQ3_S]
    assert cols % block_elems == 0
    raw = np.random.default_rng(0).integers(0, 256, (rows, cols // block_elems * block_bytes), dtype=np.uint8)
    p = tm.write_gguf(tiny_llama.model, "llama", tmp_path / "m.gguf",
                      raw_tensors={"blk.0.ffn_down.weight": (raw, GT.IQ3_S)})
    msg = _load_error(p)
    assert "IQ3_S" in msg


def test_gguf_missing_metadata_key(tiny_llama, tmp_path):
    p = tm.write_gguf(tiny_llama.model, "llama", tmp_path / "m.gguf", drop_keys={"llama.block_count"})
    assert "llama.block_count" in _load_error(p)
