"""The MoE kernel paths as the model composes them (layers/moe.py: `_fused` for decode steps,
`_grouped_kernels` for prefills, the fused gate/up stack), against the per-expert loop.

On a CUDA machine these run on the GPU; on a CPU machine through Triton's interpreter (tests/
conftest.py sets TRITON_INTERPRET=1), which the kernel modules accept for CPU tensors. A tiny
Qwen3-MoE at kernel-sized dimensions (hidden and expert width 256) in a Q8_0 GGUF; and one of
expert width 768 whose down stack is Q6_K_R3 (Qwen3-30B-A3B's Q6_K experts, K = 768, as the CUDA
loader regroups them).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("needs CUDA (or TRITON_INTERPRET=1)", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402

from ouzel.loader import load  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module", params=["Q8_0", "Q6_K_R3"])
def experts(request, tmp_path_factory):
    inter = 256 if request.param == "Q8_0" else 768
    hf = tm.build_hf_model("qwen3_moe", seed=4, hidden_size=256, moe_intermediate_size=inter, num_hidden_layers=1,
                           head_dim=64)
    path = tm.write_gguf(hf, "qwen3_moe", tmp_path_factory.mktemp("moe-k") / "m.gguf", "Q8_0")
    layer = load(path, device=DEV, progress=False).model.model.layers[0].mlp
    if request.param == "Q6_K_R3":  # random Q6_K down blocks (the writer makes no Q6_K) in the GPU layout
        from ouzel.kernels.triton.testing import random_blocks
        from ouzel.layers.moe import ExpertStack
        from ouzel.quant.blocks import block_type
        from ouzel.quant.tensor import QTensor
        E = layer.experts.n_experts
        raw = random_blocks("Q6_K_R3", E * 256, inter, torch.Generator().manual_seed(5), DEV)
        layer.experts.down_proj = ExpertStack.from_stacked([QTensor(raw, block_type("Q6_K_R3"), (E * 256, inter))],
                                                           (E, 256, inter))
    return layer


@pytest.fixture(autouse=True)
def exact(monkeypatch):
    # float32 operands (bf16 is the CUDA prefill default) and no config timing (it needs a GPU)
    monkeypatch.setenv("OUZEL_CUDA_PREFILL_DTYPE", "f32")
    monkeypatch.setenv("OUZEL_TRITON_TUNE", "0")
    monkeypatch.setenv("OUZEL_EXACT_GEMV", "1")


def _inputs(moe, tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 256, generator=g).to(DEV)
    w, idx = moe.gate(x)
    return x, w, idx


def _loop(experts, x, w, idx):
    """The per-expert loop (the reference path), whatever device x is on."""
    out = torch.zeros_like(x)
    gu, down = experts._stack(experts.gate_up_proj), experts._stack(experts.down_proj)
    for e in torch.unique(idx).tolist():
        tok, slot = torch.where(idx == e)
        h = gu.linear(x[tok], e)
        I = experts.intermediate
        y = down.linear(torch.nn.functional.silu(h[:, :I]) * h[:, I:], e)
        out.index_add_(0, tok, y * w[tok, slot, None])
    return out


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_fused_decode_path(experts):
    ex = experts.experts
    x, w, idx = _inputs(experts, 2, 1)
    gu, down = ex._stack(ex.gate_up_proj), ex._stack(ex.down_proj)
    out = ex._fused(x, w, idx, gu, down)
    assert out is not None and rel(out, _loop(ex, x, w, idx)) < 1e-5


def test_grouped_prefill_kernels(experts):
    ex = experts.experts
    x, w, idx = _inputs(experts, 17, 2)
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=ex.n_experts).tolist()
    gu, down = ex._stack(ex.gate_up_proj), ex._stack(ex.down_proj)
    out = ex._grouped_kernels(x, w, order, counts, idx.shape[1], gu, down)
    assert out is not None and rel(out, _loop(ex, x, w, idx)) < 1e-5
    fused = gu.fused()  # gate and up as one stack: same result
    assert len(fused.stacked) == 1
    assert rel(ex._grouped_kernels(x, w, order, counts, idx.shape[1], fused, down), out) < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the layer's int8 decode path runs on CUDA only")
def test_fused_decode_one_token_combines_in_the_down_gemv(experts, monkeypatch):
    """One token with int8 activations (the decode default): the down GEMV forms the routing
    weights' sum of the K rows itself; the same as the weighted-sum launch it replaces, and both
    near the exact per-expert loop (int8 rounding of the activations only)."""
    monkeypatch.delenv("OUZEL_EXACT_GEMV")
    ex = experts.experts
    x, w, idx = _inputs(experts, 1, 3)
    gu, down = ex._stack(ex.gate_up_proj), ex._stack(ex.down_proj)
    combined = ex._fused(x, w, idx, gu, down)
    monkeypatch.setenv("OUZEL_NO_MOE_COMBINE", "1")
    separate = ex._fused(x, w, idx, gu, down)
    assert combined.shape == separate.shape == x.shape
    assert rel(combined, separate) < 1e-6
    assert rel(combined, _loop(ex, x, w, idx)) < 3e-2
