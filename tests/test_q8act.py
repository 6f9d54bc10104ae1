"""The int8-activation one-row GEMVs of DeepSeek V4's expert types (kernels/triton/q8act.py:
Q2_K_R8, IQ2_XXS_R8; and Qwen3-30B-A3B's Q6_K_R3 expert down projections through the CUDA
dispatch) against the exact product with the int8-rounded x (`dequantized_x`), dense and in the
MoE form (expert ids read by the kernel); fresh random blocks each run.

Needs CUDA, or TRITON_INTERPRET=1 (set by tests/conftest.py on a machine without a GPU).
"""
import os

import pytest
import torch

triton = pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or INTERPRET):
    pytest.skip("needs CUDA (or TRITON_INTERPRET=1)", allow_module_level=True)

from ouzel.kernels.triton import q8act as Q8  # noqa: E402
from ouzel.kernels.triton.gguf import split_counters  # noqa: E402
from ouzel.kernels.triton.testing import random_blocks, reference_linear, rel_err  # noqa: E402
from ouzel.quant import blocks  # noqa: E402

DEV = "cpu" if INTERPRET else "cuda"
R8 = {"Q2_K_R8": blocks.repack_q2_k_r8, "IQ2_XXS_R8": blocks.repack_iq2_xxs_r8}
REGROUP = {**R8, "Q6_K_R3": blocks.repack_q6_k_r3}


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def _regrouped_blocks(name: str, n: int, k: int, gen) -> torch.Tensor:
    """Random GGUF blocks of the base type, regrouped (what the loader does on the GPU) where the
    type is a regrouping."""
    if name not in REGROUP:  # a type read in GGUF's own layout
        return random_blocks(name, n, k, gen).to(DEV)
    return REGROUP[name](random_blocks(name[:-3], n, k, gen)).to(DEV)


@pytest.mark.parametrize("name", R8)
@pytest.mark.parametrize("k,cfg", [(2048, dict(bn=8, u=1)), (2048, dict(bn=4, u=2, split=2)),
                                   (4096, dict(bn=16, u=4)), (4096, dict(bn=32, u=2, num_warps=8))])
def test_q8_gemv_r8(name, k, cfg, gen):
    n = 21  # a partial tile
    raw = _regrouped_blocks(name, n, k, gen)
    x = torch.randn(1, k, generator=gen).to(DEV)
    xq, dx, sx = Q8.quantize_x(x)
    out = torch.full((1, n), float("nan"), device=DEV)
    Q8.qgemv_q8(x, raw, name, (n, k), out=out, xq=(xq, dx, sx), **cfg)
    assert rel_err(out, reference_linear(Q8.dequantized_x(xq, dx), raw, name)) < 1e-5  # exact integer dots
    assert rel_err(out, reference_linear(x, raw, name)) < 3e-2  # x's rounding to 8 bits
    with pytest.raises(ValueError):  # one x row only
        Q8.qgemv_q8(torch.randn(2, k).to(DEV), raw, name, (n, k))


@pytest.mark.parametrize("name", R8)
@pytest.mark.parametrize("x_div", [3, 1])  # gate/up: a token's x shared by its experts; down: one x per pair
def test_q8_gemv_r8_experts(name, x_div, gen):
    E, n, k, G = 5, 24, 2048, 6
    raw = _regrouped_blocks(name, E * n, k, gen)
    idx = torch.randint(0, E, (G,), generator=gen).to(DEV)
    x = torch.randn(G // x_div, k, generator=gen).to(DEV)
    xq, dx, sx = Q8.quantize_x(x)
    xd = Q8.dequantized_x(xq, dx)
    ref = torch.stack([reference_linear(xd[p // x_div][None], raw[idx[p] * n:(idx[p] + 1) * n], name)[0]
                       for p in range(G)])
    out = Q8.qgemv_q8(x, raw, name, (n, k), idx=idx, x_div=x_div, bn=8, u=2, xq=(xq, dx, sx))
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("name,k", [*((n, 2048) for n in R8), ("Q6_K_R3", 768), ("Q4_K", 512)])
def test_cuda_expert_dispatch(name, k, gen, monkeypatch):
    """`cuda.qgemv_experts` (gate/up: a token's x shared by its experts) and `cuda.swiglu_experts`
    (down: swiglu of each pair's gate/up row, rounded to int8 in the same launch) on regrouped stacks."""
    from ouzel.kernels import cuda
    from ouzel.kernels.triton import gguf
    from ouzel.layers.moe import swiglu
    from ouzel.quant.tensor import QTensor
    if not gguf.supports(name):
        pytest.skip(f"kernels/triton/gguf.py does not read {name} (the loader keeps GGUF's layout)")
    monkeypatch.setenv("OUZEL_TRITON_TUNE", "0")
    E, n, T, K = 4, 16, 2, 3
    w = QTensor(_regrouped_blocks(name, E * n, k, gen), blocks.block_type(name), (E * n, k))
    idx = torch.randint(0, E, (T * K,), generator=gen).to(DEV)
    x = torch.randn(T, k, generator=gen).to(DEV)
    xd = Q8.dequantized_x(*Q8.quantize_x(x)[:2])
    ref = torch.stack([reference_linear(xd[p // K][None], w.raw[idx[p] * n:(idx[p] + 1) * n], name)[0]
                       for p in range(T * K)])
    assert rel_err(cuda.qgemv_experts(x, w, E, idx, K), ref) < 1e-5
    h = torch.randn(T * K, 2 * k, generator=gen).to(DEV)
    xd = Q8.dequantized_x(*Q8.quantize_swiglu(h, 7.0)[:2])  # the oracle's x: silu's exp may differ by an ulp
    assert rel_err(xd, swiglu(h[:, :k], h[:, k:], 7.0)) < 1e-2
    ref = torch.stack([reference_linear(xd[p][None], w.raw[idx[p] * n:(idx[p] + 1) * n], name)[0]
                       for p in range(T * K)])
    assert rel_err(cuda.swiglu_experts(h, w, E, idx, 7.0), ref) < 1e-5
    wts = torch.rand(K, generator=gen).to(DEV)  # one token's routing weights: the GEMV sums its rows
    mixed = cuda.swiglu_experts(h[:K], w, E, idx[:K], 7.0, combine=wts)
    assert mixed.shape == (1, n) and rel_err(mixed[0], (wts[:, None] * ref[:K]).sum(0)) < 1e-5


ONE_ROW_BASE = {"Q4_K": None, "Q6_K_R8": blocks.repack_q6_k_r8, "Q6_K_R3": blocks.repack_q6_k_r3,
                "Q8_0_R8": blocks.repack_q8_0_r8, **R8}


@pytest.mark.parametrize("name", ONE_ROW_BASE)
@pytest.mark.parametrize("moe", [False, True])
def test_one_row_split_k_finishes_in_kernel(name, moe, gen):
    """A K split of the one-row kernels is summed by the last split of each row tile (no second
    launch): the same values as without a split, the same bits on every call whatever order the
    splits finish in, and every counter back at zero. MoE: the combine of one token's pairs too."""
    k = 3072 if name == "Q6_K_R3" else 2048  # 4 R3 groups, 8 blocks elsewhere: a split of 4
    E, n = (2, 9) if moe else (1, 9)  # a partial second tile of 8 rows
    base = random_blocks(name.removesuffix("_R8").removesuffix("_R3"), E * n, k, gen)
    raw = (ONE_ROW_BASE[name] or (lambda r: r))(base).to(DEV)
    idx = torch.tensor([1, 0, 1], device=DEV) if moe else None
    x = torch.randn(len(idx) if moe else 1, k, generator=gen).to(DEV)
    kw = dict(idx=idx, x_div=1) if moe else {}
    one = dict(m1=True) if name == "Q4_K" else {}
    whole = Q8.qgemv_q8(x, raw, name, (n, k), bn=8, u=1, split=1, **one, **kw)
    outs = [Q8.qgemv_q8(x, raw, name, (n, k), bn=8, u=1, split=4, **one, **kw) for _ in range(2)]
    assert rel_err(outs[0], whole) < 1e-6, rel_err(outs[0], whole)
    assert torch.equal(outs[1], outs[0])
    if moe:  # one token's pairs: the kernel forms sum_g w[g] * row g, with and without a K split
        wts = torch.tensor([0.5, 0.25, 0.125], device=DEV)
        for split in (1, 4):
            mixed = Q8.qgemv_q8(x, raw, name, (n, k), bn=8, u=1, split=split, **one, **kw, combine=wts)
            assert mixed.shape == (1, n) and rel_err(mixed[0], (wts[:, None] * whole).sum(0)) < 1e-6
    assert int(split_counters(x.device, 1).abs().sum()) == 0


@pytest.mark.parametrize("name_b,k", [("Q6_K_R8", 2048), ("Q6_K_R3", 1536)])
@pytest.mark.parametrize("ca,cb", [(dict(bn=8, u=1), dict(bn=8, u=1)),
                                   (dict(bn=16, u=1, split=2), dict(bn=4, u=1, split=2)),
                                   (dict(bn=4, u=1, split=2), dict(bn=8, u=2))])
def test_q4k_and_q6k_in_one_launch(name_b, k, ca, cb, gen):
    """q and k (Q4_K) with v (Q6_K regrouped) in one launch, each with its own tiles and K split:
    the two GEMVs' rows side by side, as exact as each alone (integer dots on the same int8 x)."""
    na, nb = 37, 21  # partial tiles in both
    raw_a = random_blocks("Q4_K", na, k, gen, DEV)
    raw_b = random_blocks(name_b, nb, k, gen, DEV)
    x = torch.randn(1, k, generator=gen).to(DEV)
    xq = Q8.quantize_x(x)
    split_counters(torch.device(DEV), 1)  # the counters exist, armed (all zero)
    out = Q8.qgemv_q8_pair(x, (raw_a, (na, k), ca), (raw_b, name_b, (nb, k), cb), xq=xq)
    assert out.shape == (1, na + nb)
    xd = Q8.dequantized_x(xq[0], xq[1])
    assert rel_err(out[:, :na], reference_linear(xd, raw_a, "Q4_K")) < 1e-5
    assert rel_err(out[:, na:], reference_linear(xd, raw_b, name_b)) < 1e-5
    assert not split_counters(torch.device(DEV), 1)[:64].any()  # every finisher re-armed its counter


@pytest.mark.parametrize("cfg", [dict(bn=32, u=1), dict(bn=32, u=2, split=2), dict(bn=64, u=1, split=4)])
@pytest.mark.parametrize("limit", [None, 0.5])
@pytest.mark.parametrize("experts", [False, True])
def test_gate_up_gemv_forms_the_swiglu_rows(cfg, limit, experts, gen):
    """A Q4_K gate/up GEMV (rows [gate; up]) that also forms silu(gate) * up's int8 rows for the down
    projection (the second of each feature tile's two programs): the GEMV's output as without it,
    and rows equal to `quantize_swiglu` of that output; dense and MoE (3 pairs of one token)."""
    half, k, E = 128, 1024, 4
    n = 2 * half
    raw = random_blocks("Q4_K", (E if experts else 1) * n, k, gen, DEV)
    x = torch.randn(1, k, generator=gen).to(DEV)
    moe = dict(idx=torch.tensor([2, 0, 3], device=DEV), x_div=3) if experts else {}
    plain = Q8.qgemv_q8(x, raw, "Q4_K", (n, k), m1=True, **moe, **cfg)
    out, (sq, sdx, ssx) = Q8.qgemv_q8(x, raw, "Q4_K", (n, k), m1=True, swiglu=True, limit=limit, **moe, **cfg)
    assert torch.equal(out, plain)
    wq, wdx, wsx = Q8.quantize_swiglu(out, limit)
    assert torch.equal(sq, wq) and torch.equal(sdx, wdx) and torch.equal(ssx, wsx)
    assert not split_counters(torch.device(DEV), 1)[:256].any()  # every counter re-armed


@pytest.mark.skipif(INTERPRET, reason="the tuner times on a GPU")
@pytest.mark.parametrize("cold", ["0", "1"])
def test_tuned_gemv_is_exact_hot_or_cold(cold, gen, monkeypatch):
    """`cuda._gemv` tunes a config on first use in a CUDA graph, by default over copies of the matrix
    that read twice the L2 (`cold_variants`) and more tiles (COLD_EXTRA, some of which don't divide the
    shape and are skipped), or with OUZEL_TUNE_COLD=0 of the one matrix (L2 kept warm): the chosen
    config is one of the candidates and the product is exact. The timings' memory (each on a stream
    of its own, the copies) is handed back: the process holds no more than before but the output."""
    from ouzel.kernels import cuda
    monkeypatch.setenv("OUZEL_TUNE_COLD", cold)
    monkeypatch.setattr(cuda, "_TUNED", {})
    n, k = 2048, 4096  # qwen3moe's o_proj
    raw = random_blocks("Q4_K", n, k, gen).to(DEV)
    x = torch.randn(1, k, generator=gen).to(DEV)
    torch.cuda.synchronize()
    held = torch.cuda.memory_reserved()
    out = cuda._gemv(x, raw, "Q4_K", (n, k))
    assert torch.cuda.memory_reserved() <= held + (8 << 20)  # a new 2 MB segment or two; leaked: >= 2 MB a timing
    (cfg,) = cuda._TUNED.values()
    assert cfg in cuda.Q8_CONFIGS + (cuda.COLD_EXTRA["Q4_K"] if cold == "1" else ())
    xq, dx, _ = Q8.quantize_x(x)
    assert rel_err(out, reference_linear(Q8.dequantized_x(xq, dx), raw, "Q4_K")) < 1e-5


def test_cold_variants_read_other_weights_each_call(gen):
    """OUZEL_TUNE_COLD's timing calls: a dense matrix's equal copies in their own memory, as many as
    read twice the L2 (at most `most`); a MoE call's experts shifted by the top-k each time, so no two
    calls share an expert while the stack has more."""
    from ouzel.kernels.cuda import cold_variants
    raw = random_blocks("Q4_K", 64, 512, gen)  # 64 rows x 288 bytes
    calls = cold_variants(raw, (64, 512), {}, l2_bytes=raw.nbytes * 2)
    assert len(calls) == 4 and calls[0][0] is raw
    assert len({r.data_ptr() for r, _ in calls}) == 4 and all(torch.equal(r, raw) for r, _ in calls)
    assert len(cold_variants(raw, (64, 512), {}, l2_bytes=raw.nbytes * 100, most=5)) == 5
    assert len(cold_variants(raw, (64, 512), {}, l2_bytes=1)) == 1
    idx = torch.tensor([3, 7, 1], dtype=torch.int32)
    calls = cold_variants(raw, (8, 512), {"idx": idx, "x_div": 3}, l2_bytes=10**9)  # 8 experts of 8 rows
    assert len(calls) == 2 and all(r is raw and m["x_div"] == 3 for r, m in calls)
    assert torch.equal(calls[1][1]["idx"], torch.tensor([6, 2, 4], dtype=torch.int32))
    assert not set(calls[0][1]["idx"].tolist()) & set(calls[1][1]["idx"].tolist())
