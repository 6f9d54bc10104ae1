"""DeepSeek V4 in llama.cpp's `deepseek4` GGUF layout (written by tests/deepseek4_gguf.py):
same logits as the HF directory, quantized routed experts (Q2_K, IQ2_XXS, Q4_K, MXFP4) give the
dequantized model's logits, `ouzel.load` + generation work; broken files and configs raise
OuzelError naming the problem.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import deepseek4_gguf as d4  # noqa: E402
from tiny_deepseek_v4 import LAYERS, REL_TOL, build_v4, ouzel_full, rel_l2, tiny_fixture  # noqa: E402

import ouzel  # noqa: E402
from ouzel.errors import OuzelError  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_fixture(tmp_path_factory)


# experts need rows of whole 256-element blocks for the K-quants: hidden and expert width 256
QUANT_OVERRIDES = dict(hidden_size=256, moe_intermediate_size=256)
QUANT_LEN = 45


def test_gguf_f32_gives_the_safetensors_logits(tiny, tmp_path):
    path = d4.write(tiny.model, tmp_path / "tiny-f32.gguf")
    loaded = ouzel.load(path, progress=False)
    assert loaded.loaded.architecture == "deepseek_v4"
    assert loaded.config.layer_types == LAYERS
    out = ouzel_full(loaded.model, tiny.ids)
    assert rel_l2(out, ouzel_full(tiny.loaded.model, tiny.ids)) < 1e-6
    assert rel_l2(out, tiny.ref) < REL_TOL


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    model = build_v4(seed=3, **QUANT_OVERRIDES)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(2, model.config.vocab_size, (QUANT_LEN,), generator=g)
    return type("Wide", (), dict(model=model, ids=ids, dir=tmp_path_factory.mktemp("v4q")))


@pytest.mark.parametrize("qtype", ["Q2_K", "IQ2_XXS", "Q4_K", "MXFP4"])
def test_gguf_quantized_experts_give_the_dequantized_logits(wide, qtype):
    """Routed experts stay in their blocks (one QTensor per expert, a view of the file); the
    logits are transformers' on the dequantized experts."""
    from ouzel.layers.moe import ExpertStack
    from ouzel.quant.tensor import QTensor

    path = d4.write(wide.model, wide.dir / f"tiny-{qtype}.gguf", qtype)
    loaded = ouzel.load(path, progress=False)
    experts = loaded.model.model.layers[1].mlp.experts.gate_up_proj
    assert isinstance(experts, ExpertStack) and isinstance(experts.parts[0][0], QTensor)
    assert experts.parts[0][0].bt.name == qtype
    ref_model = d4.reference_model(wide.model, qtype)
    with torch.no_grad():
        ref = ref_model(wide.ids[None]).logits[0]
    assert rel_l2(ouzel_full(loaded.model, wide.ids), ref) < REL_TOL


def test_gguf_runs_through_the_api(tiny, tmp_path):
    """ouzel.load on a deepseek4 GGUF (GGUF tokenizer) and greedy generation, as `ouzel run` does."""
    llm = ouzel.load(d4.write(tiny.model, tmp_path / "api.gguf"), progress=False)
    prompt = llm.tokenize("The quick brown fox")
    got = llm.generate_ids(prompt, max_tokens=6, temperature=0.0, ignore_eos=True)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(tiny.model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert got == ids[len(prompt):]
    assert isinstance(llm.generate("The quick", max_tokens=4, temperature=0.0), str)



def test_ouzel_run_cli_on_the_gguf(tiny, tmp_path):
    import subprocess

    path = d4.write(tiny.model, tmp_path / "cli.gguf")
    r = subprocess.run([sys.executable, "-m", "ouzel", "run", "-m", str(path), "-p", "The quick brown", "-n", "5",
                        "--temperature", "0", "--ignore-eos"], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stderr
    assert "decode 5 tokens" in r.stderr + r.stdout

# ------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("drop", ["deepseek4.hyper_connection.count", "deepseek4.attention.compress_ratios",
                                  "deepseek4.attention.indexer.top_k", "deepseek4.expert_gating_func"])
def test_gguf_missing_metadata_names_the_key(tiny, tmp_path, drop):
    path = d4.write(tiny.model, tmp_path / "missing.gguf", drop_keys=(drop,))
    with pytest.raises(OuzelError, match=drop.replace(".", r"\.")):
        ouzel.load(path, progress=False)


@pytest.mark.parametrize("key,value,match", [
    ("deepseek4.attention.head_count_kv", (2, "u32"), "head_count_kv"),
    ("deepseek4.swiglu_clamp_exp", ([10.0, 10.0, 7.0, 10.0], "f32arr"), "swiglu_clamp_exp"),
    ("deepseek4.attention.compress_ratios", ([0, 4, 16], "i32arr"), "has 3 entries for 4 layers"),
    ("deepseek4.attention.compress_ratios", ([0, 4, 16, 64], "i32arr"), "different nonzero ratios"),
    ("deepseek4.expert_gating_func", (3, "u32"), "expert_gating_func"),
])
def test_gguf_inconsistent_metadata(tiny, tmp_path, key, value, match):
    path = d4.write(tiny.model, tmp_path / "bad.gguf", set_keys={key: value})
    with pytest.raises(OuzelError, match=match):
        ouzel.load(path, progress=False)


def test_gguf_expert_block_type_without_kernel(wide, tmp_path):
    path = d4.write(wide.model, tmp_path / "iq3.gguf", "IQ3_XXS")
    with pytest.raises(OuzelError, match=r"ffn_gate_exps.*IQ3_XXS"):
        ouzel.load(path, progress=False)


def _hf_dir_with(tiny, tmp_path, **changes):
    import json
    import shutil

    path = tmp_path / "hf"
    shutil.copytree(tiny.dir, path)
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_hf_compress_ratio_schedule_must_fit_the_layers(tiny, tmp_path):
    path = _hf_dir_with(tiny, tmp_path, layer_types=None, compress_ratios=[0, 4, 16])
    with pytest.raises(OuzelError, match="compress_ratios has 3 entries for 4 layers"):
        ouzel.load(path, progress=False)


def test_hf_upstream_compress_ratios_with_mtp_entry(tiny, tmp_path):
    """Upstream configs list the MTP layer's ratio too: n + num_nextn_predict_layers entries."""
    path = _hf_dir_with(tiny, tmp_path, layer_types=None, compress_ratios=[0, 4, 16, 4, 0])
    assert ouzel.load(path, progress=False).config.layer_types == LAYERS


def test_hf_unknown_layer_type(tiny, tmp_path):
    path = _hf_dir_with(tiny, tmp_path, layer_types=LAYERS[:3] + ["full_attention"])
    with pytest.raises(OuzelError, match="unknown layer_types entry 'full_attention'"):
        ouzel.load(path, progress=False)
