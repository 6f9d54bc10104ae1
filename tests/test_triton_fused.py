"""Fused RMSNorm and q/k rope kernels against the torch references (needs CUDA + triton; skips otherwise).

With TRITON_INTERPRET=1 the same checks run on CPU tensors through Triton's interpreter. Every
output buffer starts out NaN (fused.py's `torch.empty` is patched), so an unwritten element fails
the check (rel_err is inf on any NaN).
"""
import os

import pytest
import torch

triton = pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or INTERPRET):
    pytest.skip("needs CUDA (or TRITON_INTERPRET=1)", allow_module_level=True)

from ouzel.kernels.triton import fused  # noqa: E402
from ouzel.kernels.triton.gguf import split_counters  # noqa: E402
from ouzel.kernels.triton.testing import rel_err  # noqa: E402
from ouzel.layers.norm import RMSNorm  # noqa: E402
from ouzel.layers.rope import Rope, RopeSpec  # noqa: E402

DEV = "cpu" if INTERPRET else "cuda"
F32, BF16 = torch.float32, torch.bfloat16


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


class _TorchNanEmpty:
    """torch, except that `empty` gives NaN-filled tensors."""
    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(shape, dtype=None, device=None):
        if dtype is not None and not dtype.is_floating_point:  # int8 rounding never gives -128
            return torch.full(shape, -128, dtype=dtype, device=device)
        return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def nan_outputs(monkeypatch):
    """fused.py allocates its outputs with torch.empty: poison them so unwritten elements show."""
    monkeypatch.setattr(fused, "torch", _TorchNanEmpty())


def within_ulp(out, ref):
    """bf16 out within one bf16 ulp of ref elementwise: a 1-ulp fp32 difference may flip a rounding,
    and the interpreter truncates fp32 -> bf16 instead of rounding to nearest."""
    return ((out.float() - ref.float()).abs() <= ref.float().abs() * 2 ** -7 + 1e-30).all()


def norm_reference(x, w, eps, unit_offset):
    n = RMSNorm(x.shape[-1], eps, unit_offset)
    n.weight = w
    return n.reference(x)


@pytest.mark.parametrize("T", [1, 5, 64])
@pytest.mark.parametrize("D", [64, 100, 2048])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_rms_norm(T, D, dtype, gen):
    x = (torch.randn(T, D, generator=gen) * 3).to(DEV, dtype)
    for w_dtype, unit_offset in ((F32, False), (BF16, True)):
        w = (torch.randn(D, generator=gen) * 0.5 + 1).to(DEV, w_dtype)
        y = fused.rms_norm(x, w, 1e-6, unit_offset)
        ref = norm_reference(x, w, 1e-6, unit_offset)
        assert y.dtype == dtype and y.shape == x.shape
        assert rel_err(y, ref) < 1e-6 if dtype == F32 else within_ulp(y, ref)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_rms_norm_residual(dtype, gen):
    T, D = 5, 100
    x = torch.randn(T, D, generator=gen).to(DEV, dtype)
    res = torch.randn(T, D, generator=gen).to(DEV, dtype)
    w = torch.randn(D, generator=gen).to(DEV)
    y, h = fused.rms_norm(x, w, 1e-5, residual=res)
    if dtype == F32 or not INTERPRET:
        assert torch.equal(h, x + res)  # the same rounded sum the unfused add gives
    assert h.dtype == dtype and within_ulp(h, x + res)
    ref = norm_reference(h, w, 1e-5, False)  # the kernel normalizes the stored h
    assert rel_err(y, ref) < 1e-6 if dtype == F32 else within_ulp(y, ref)


def test_rms_norm_shapes_and_strides(gen):
    """[T, H, D] input (q/k norms) and a strided row view; T = 0 launches nothing."""
    w = torch.randn(64, generator=gen).to(DEV)
    q = torch.randn(3, 4, 64, generator=gen).to(DEV)
    assert rel_err(fused.rms_norm(q, w, 1e-6), norm_reference(q, w, 1e-6, False)) < 1e-6
    wide = torch.randn(6, 128, generator=gen).to(DEV)
    x = wide[::2, 64:]
    assert rel_err(fused.rms_norm(x, w, 1e-6), norm_reference(x, w, 1e-6, False)) < 1e-6
    assert fused.rms_norm(x[:0], w, 1e-6).shape == (0, 64)
    with pytest.raises(ValueError, match="rms_norm"):
        fused.rms_norm(x, w[:10], 1e-6)


@pytest.mark.parametrize("T,D", [(1, 256), (3, 2048), (1, 4096)])
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_q8_equals_quantize_x(T, D, dtype, residual, gen):
    """The norm's int8 rows (for the decode GEMVs) are exactly quantize_x of the stored output,
    and the output itself is the plain kernel's (up to the order of the compiled sum of squares)."""
    from ouzel.kernels.triton import q8act
    x = (torch.randn(T, D, generator=gen) * 3).to(DEV, dtype)
    res = torch.randn(T, D, generator=gen).to(DEV, dtype) if residual else None
    w = (torch.randn(D, generator=gen) * 0.5 + 1).to(DEV)
    *outs, (xq, dx, sx) = fused.rms_norm(x, w, 1e-6, residual=res, q8=True)
    plain = fused.rms_norm(x, w, 1e-6, residual=res)
    for a, b in zip(outs, plain if residual else [plain]):
        assert rel_err(a, b) < 1e-6 if dtype == F32 else within_ulp(a, b)
    want = q8act.quantize_x(outs[0].reshape(T, D))
    assert xq.dtype == torch.int8 and torch.equal(xq, want[0])
    assert torch.equal(dx, want[1]) and torch.equal(sx, want[2])
    with pytest.raises(ValueError, match="q8"):
        fused.rms_norm(x[:, :100], w[:100], 1e-6, q8=True)


@pytest.mark.parametrize("T,K,D", [(1, 8, 2048), (3, 6, 100), (2, 1, 4096)])
def test_weighted_rows_matches_bmm(T, K, D, gen):
    y = torch.randn(T * K, D, generator=gen).to(DEV)
    w = torch.rand(T, K, generator=gen).to(DEV)
    want = (w.double()[:, :, None] * y.double().view(T, K, D)).sum(1)  # any order: near-cancelling sums
    for dtype in (F32, BF16):
        out = fused.weighted_rows(y, w, dtype)
        assert out.dtype == dtype
        tol = 1e-6 if dtype == F32 else 2 ** -7
        assert ((out.double() - want).abs() <= want.abs() * tol + 1e-5).all()


def test_weighted_rows_through_an_index(gen):
    """rows: token t's k-th output read from y[rows[t * K + k]] (a prefill's outputs in expert
    order) equals the sum over the gathered copy y[rows], bit for bit."""
    T, K, D = 5, 3, 200
    y = torch.randn(T * K + 4, D, generator=gen).to(DEV)  # more rows than pairs: only rows' are read
    w = torch.rand(T, K, generator=gen).to(DEV)
    rows = torch.randperm(T * K + 4, generator=gen)[:T * K].to(DEV)
    assert torch.equal(fused.weighted_rows(y, w, F32, rows=rows), fused.weighted_rows(y[rows], w, F32))
    with pytest.raises(ValueError, match="weighted_rows"):
        fused.weighted_rows(y, w, F32, rows=rows[:-1])


def qkv_views(gen, T, H, Hkv, D, dtype):
    """q [T, H, D] and k [T, Hkv, D] as slices of one [T, (H + 2 Hkv) * D] projection output."""
    qkv = torch.randn(T, (H + 2 * Hkv) * D, generator=gen).to(DEV, dtype)
    q = qkv[:, : H * D].view(T, H, D)
    k = qkv[:, H * D: (H + Hkv) * D].view(T, Hkv, D)
    return q, k


@pytest.mark.parametrize("D,rot", [(64, 64), (64, 32), (128, 128), (128, 64)])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_rope_qk(D, rot, dtype, gen):
    T, H, Hkv = 3, 4, 2
    rope = Rope(RopeSpec(theta=10000.0, dim=rot))
    q, k = qkv_views(gen, T, H, Hkv, D, dtype)
    assert not q.is_contiguous() and not k.is_contiguous()
    positions = torch.tensor([17, 1000, 32767], device=DEV)
    qo, ko = fused.rope_qk(q, k, positions, rope._inv_for(q.device), rot)
    for out, x in ((qo, q), (ko, k)):
        ref = rope(x, positions)
        assert out.dtype == ref.dtype and out.is_contiguous() and out.shape == x.shape
        assert rel_err(out, ref) < 1e-6  # cos/sin may differ by an ulp; dtype is fp32 either way
        assert torch.equal(out[..., rot:], ref[..., rot:])


def test_rope_qk_llama3_scaling_and_int32_positions(gen):
    spec = RopeSpec(theta=500000.0, dim=128, scaling="llama3", factor=8.0, original_max_pos=8192)
    rope = Rope(spec)
    q, k = qkv_views(gen, 2, 8, 1, 128, F32)
    positions = torch.tensor([5, 100000], dtype=torch.int32, device=DEV)
    qo, ko = fused.rope_qk(q, k, positions, rope._inv_for(q.device), 128)
    assert rel_err(qo, rope(q, positions)) < 1e-6 and rel_err(ko, rope(k, positions)) < 1e-6


def test_rope_apply_qk_matches_two_calls(gen):
    """Rope.apply_qk is the dispatch point Attention uses (the kernel on CUDA, the reference elsewhere)."""
    rope = Rope(RopeSpec(theta=10000.0, dim=32))
    q, k = qkv_views(gen, 2, 4, 2, 64, F32)
    positions = torch.tensor([3, 4], device=DEV)
    qo, ko = rope.apply_qk(q, k, positions)
    assert rel_err(qo, rope(q, positions)) < 1e-6 and rel_err(ko, rope(k, positions)) < 1e-6


@pytest.mark.parametrize("D,rot,unit", [(128, 128, False), (64, 32, True), (256, 256, True)])
def test_rope_qk_with_qk_norms(D, rot, unit, gen):
    """Qwen3 / Gemma 3: each head RMS-normalised (own q and k weights) then roped, in one launch."""
    T, H, Hkv = 3, 4, 2
    rope = Rope(RopeSpec(theta=10000.0, dim=rot))
    q, k = qkv_views(gen, T, H, Hkv, D, F32)
    qn, kn = RMSNorm(D, 1e-6, unit), RMSNorm(D, 1e-6, unit)
    qn.weight = torch.randn(D, generator=gen).to(DEV)
    kn.weight = torch.randn(D, generator=gen).to(DEV)
    positions = torch.tensor([17, 1000, 32767], device=DEV)
    qo, ko = fused.rope_qk(q, k, positions, rope._inv_for(q.device), rot, (qn.weight, kn.weight, 1e-6, unit))
    assert rel_err(qo, rope(qn.reference(q), positions)) < 1e-6
    assert rel_err(ko, rope(kn.reference(k), positions)) < 1e-6
    qo2, ko2 = rope.apply_qk(q, k, positions, (qn, kn))  # the dispatch Attention uses
    assert rel_err(qo2, qo) < 1e-6 and rel_err(ko2, ko) < 1e-6


def test_rope_qk_rejects_bad_shapes():
    q = torch.zeros(2, 4, 64, device=DEV)
    pos = torch.zeros(2, dtype=torch.int64, device=DEV)
    inv = torch.ones(16, device=DEV)
    with pytest.raises(ValueError, match="rope_qk"):
        fused.rope_qk(q, q[:1], pos, inv, 32)
    with pytest.raises(ValueError, match="rope_qk"):
        fused.rope_qk(q, q, pos, inv, 64)  # inv_freq has 16 entries, not 32
    with pytest.raises(ValueError, match="positions"):
        fused.rope_qk(q, q, pos.float(), inv, 32)


@pytest.mark.skipif(INTERPRET, reason="CUDA graphs need CUDA")
def test_cuda_graph_replay_with_new_positions(gen):
    """Positions are read on the device: one captured graph serves every position."""
    rope = Rope(RopeSpec(theta=10000.0, dim=128))
    q, k = qkv_views(gen, 1, 32, 8, 128, BF16)
    positions = torch.zeros(1, dtype=torch.int64, device=DEV)
    w = torch.randn(128, generator=gen).to(DEV)
    inv = rope._inv_for(q.device)
    fused.rope_qk(q, k, positions, inv, 128)  # compile outside the capture
    fused.rms_norm(q, w, 1e-6)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        qo, ko = fused.rope_qk(q, k, positions, inv, 128)
        y = fused.rms_norm(qo, w, 1e-6)
    for p in (0, 7, 4095, 131071):
        positions.fill_(p)
        graph.replay()
        assert rel_err(qo, rope(q, positions)) < 1e-6 and rel_err(ko, rope(k, positions)) < 1e-6
        assert rel_err(y, norm_reference(rope(q, positions), w, 1e-6, False)) < 1e-6


@pytest.mark.parametrize("dtype", [F32, torch.float16])
def test_kv_write_matches_index_copy(dtype, gen):
    T, C, Hkv, D = 2, 40, 3, 64
    qkv = torch.randn(T, (4 + 2 * Hkv) * D, generator=gen).to(DEV)  # k, v: views of a wider row
    k = qkv[:, 4 * D:(4 + Hkv) * D].view(T, Hkv, D)
    v = qkv[:, (4 + Hkv) * D:].view(T, Hkv, D)
    pos = torch.tensor([7, 31], device=DEV)
    kc = torch.randn(C, Hkv, D, generator=gen).to(DEV, dtype)
    vc = torch.randn(C, Hkv, D, generator=gen).to(DEV, dtype)
    want_k, want_v = kc.clone().index_copy_(0, pos, k.to(dtype)), vc.clone().index_copy_(0, pos, v.to(dtype))
    fused.kv_write(k, v, pos, kc, vc)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


def test_swiglu_linear_matches_reference(gen, monkeypatch):
    """The MLP's decode path: silu(gate) * up rounded to int8 in one launch, then the int8 GEMV
    of the down projection; equal to the two-step path on the same rounding."""
    import torch.nn.functional as F
    from ouzel.kernels import cuda
    from ouzel.kernels.triton import q8act
    from ouzel.kernels.triton.testing import random_blocks, reference_linear
    from ouzel.quant.blocks import block_type
    from ouzel.quant.tensor import QTensor
    monkeypatch.setenv("OUZEL_TRITON_TUNE", "0")
    n, k = 24, 512
    w = QTensor(random_blocks("Q4_K", n, k, gen, DEV), block_type("Q4_K"), (n, k))
    gu = torch.randn(1, 2 * k, generator=gen).to(DEV)
    h = F.silu(gu[:, :k]) * gu[:, k:]
    xq, dx, sx = q8act.quantize_swiglu(gu)
    xq2, dx2, _ = q8act.quantize_x(h)
    assert (xq.int() - xq2.int()).abs().max() <= 1 and rel_err(dx, dx2) < 1e-5  # silu's exp may differ by an ulp
    out = cuda.swiglu_linear(gu, w)
    assert rel_err(out, reference_linear(q8act.dequantized_x(xq, dx), w.raw, "Q4_K")) < 1e-5
    assert rel_err(out, reference_linear(h, w.raw, "Q4_K")) < 2e-2
    assert cuda.swiglu_linear(gu[:, :k], w) is None  # not [gate | up] of this weight: the caller's reference


@pytest.mark.parametrize("limit", [None, 0.5])
def test_swiglu_experts_matches_reference(limit, gen, monkeypatch):
    """MoE decode: each pair's swiglu (with V4's clamp) rounded to int8 in one launch, then the
    pair's expert down projection."""
    from ouzel.kernels import cuda
    from ouzel.kernels.triton import q8act
    from ouzel.kernels.triton.testing import random_blocks, reference_linear
    from ouzel.layers.moe import swiglu
    from ouzel.quant.blocks import block_type
    from ouzel.quant.tensor import QTensor
    monkeypatch.setenv("OUZEL_TRITON_TUNE", "0")
    E, n, k, G = 4, 16, 256, 5
    w = QTensor(random_blocks("Q4_K", E * n, k, gen, DEV), block_type("Q4_K"), (E * n, k))
    idx = torch.tensor([3, 0, 3, 1, 2], device=DEV)
    h = torch.randn(G, 2 * k, generator=gen).to(DEV)
    xq, dx, _ = q8act.quantize_swiglu(h, limit)
    xq2, dx2, _ = q8act.quantize_x(swiglu(h[:, :k], h[:, k:], limit))
    assert (xq.int() - xq2.int()).abs().max() <= 1 and rel_err(dx, dx2) < 1e-5
    xd = q8act.dequantized_x(xq, dx)
    want = torch.stack([reference_linear(xd[g][None], w.raw[idx[g] * n:(idx[g] + 1) * n], "Q4_K")[0] for g in range(G)])
    assert rel_err(cuda.swiglu_experts(h, w, E, idx, limit), want) < 1e-5


@pytest.mark.parametrize("N,K", [(128, 2048), (5, 300), (1000, 64)])
@pytest.mark.parametrize("w_dtype", [F32, BF16, torch.float16])
def test_dense_gemv_matches_linear(N, K, w_dtype, gen):
    """One x row times a dense weight read in its own dtype: fp32 math, like F.linear on the
    weight converted to fp32 (what it replaces)."""
    x = torch.randn(1, K, generator=gen).to(DEV)
    w = torch.randn(N, K, generator=gen).to(DEV, w_dtype)
    want = torch.nn.functional.linear(x.double(), w.double())
    out = fused.dense_gemv(x, w)
    assert out.dtype == F32 and out.shape == (1, N)
    assert rel_err(out, want.float()) < 1e-6


@pytest.mark.parametrize("N,K,splits", [(24, 16384, None), (5, 3000, 3), (256, 4096, 4), (9, 1024, 1)])
def test_dense_gemv_split_k(N, K, splits, gen):
    """Few rows over a long K (V4's mHC mix, the routers): K split over programs, the last program
    of a row block adds the slices in a fixed order. Same result as F.linear, the same bits on
    every call (the counters reset themselves), and the slices cover K exactly once."""
    x = torch.randn(1, K, generator=gen).to(DEV)
    w = torch.randn(N, K, generator=gen).to(DEV)
    want = torch.nn.functional.linear(x.double(), w.double()).float()
    outs = [fused.dense_gemv(x, w, splits) for _ in range(3)]
    assert rel_err(outs[0], want) < 1e-6
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    assert int(split_counters(x.device, 1).abs().sum()) == 0


@pytest.mark.parametrize("M,K", [(8, 768), (3, 100), (1, 2048)])
@pytest.mark.parametrize("limit", [None, 0.5])
def test_swiglu_matches_reference(M, K, limit, gen):
    """silu(gate) * up of [gate | up] rows in one launch (with V4's clamp), as `moe.swiglu`."""
    from ouzel.layers.moe import swiglu as reference
    gu = (torch.randn(M, 2 * K, generator=gen) * 3).to(DEV)
    want = reference(gu[:, :K], gu[:, K:], limit)
    for dtype in (F32, BF16):
        out = fused.swiglu(gu, limit, dtype)
        assert out.dtype == dtype and out.shape == (M, K)
        assert rel_err(out, want) < 1e-6 if dtype == F32 else within_ulp(out, want)


def test_ring_write_slots(gen):
    """Rows into a ring buffer at positions % size, cast to the ring's dtype (V4's sliding window)."""
    ring = torch.zeros(7, 40, dtype=torch.float16, device=DEV)
    x = torch.randn(3, 40, generator=gen).to(DEV)
    pos = torch.tensor([5, 13, 15], device=DEV)
    fused.ring_write(x, pos, ring)
    want = torch.zeros(7, 40, dtype=torch.float16)
    want[[5, 6, 1]] = x.cpu().to(torch.float16)
    assert torch.equal(ring.cpu(), want)
