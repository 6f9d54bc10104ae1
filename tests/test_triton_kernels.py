"""Triton GGUF-block kernels against the exact torch dequantizer (needs CUDA + triton; skips otherwise).

With TRITON_INTERPRET=1 set and triton installed, the same checks run on CPU tensors through
Triton's interpreter (slow, small shapes; used to develop without a GPU).
"""
import os

import pytest
import torch

triton = pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or INTERPRET):
    pytest.skip("needs CUDA (or TRITON_INTERPRET=1)", allow_module_level=True)

from ouzel.kernels.triton import gguf as G  # noqa: E402
from ouzel.kernels.triton.testing import random_blocks, reference_linear, rel_err  # noqa: E402
from ouzel.quant.blocks import block_type, dequantize  # noqa: E402

DEV = "cpu" if INTERPRET else "cuda"
TYPES = ("Q4_K", "Q6_K", "Q8_0", "Q4_0", "Q2_K", "IQ2_XXS")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequant_exact(name, dtype, gen):
    n, k = 19, 512
    raw = random_blocks(name, n, k, gen, DEV)
    out = torch.full((n, k), float("nan"), dtype=dtype, device=DEV)
    G.qdequant(raw, name, (n, k), dtype, out=out, bn=8)
    ref = dequantize(raw, block_type(name))
    if dtype == torch.float32:
        assert torch.equal(out, ref)
    else:  # one bf16 rounding (the interpreter truncates rather than rounds to nearest)
        assert ((out.float() - ref).abs() <= ref.abs() * 2**-7).all()


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("m,bn,u,split", [(1, 8, 2, None), (1, 4, 1, 2), (3, 16, 2, 1), (16, 8, 2, 4)])
def test_gemv(name, m, bn, u, split, gen):
    n, k = 21, 2048
    raw = random_blocks(name, n, k, gen, DEV)
    x = torch.randn(m, k, generator=gen).to(DEV)
    out = torch.full((m, n), float("nan"), device=DEV)
    G.qgemv(x, raw, name, (n, k), out=out, bn=bn, u=u, split=split)
    assert rel_err(out, reference_linear(x, raw, name)) < 1e-5


@pytest.mark.parametrize("name", TYPES)
def test_gemv_bf16_and_matmul(name, gen):
    n, k = 24, 1024
    raw = random_blocks(name, n, k, gen, DEV)
    xb = torch.randn(2, k, generator=gen).to(DEV, torch.bfloat16)
    assert rel_err(G.qgemv(xb, raw, name, (n, k)), reference_linear(xb, raw, name)) < 1e-2
    x = torch.randn(20, k, generator=gen).to(DEV)
    assert rel_err(G.qmatmul(x, raw, name, (n, k)), reference_linear(x, raw, name)) < 1e-4


@pytest.mark.skipif(INTERPRET, reason="dispatch needs CUDA")
def test_ops_linear_dispatch(gen):
    from ouzel.kernels import cuda, ops
    from ouzel.quant.tensor import QTensor
    n, k = 40, 512
    w = QTensor(random_blocks("Q4_K", n, k, gen, DEV), block_type("Q4_K"), (n, k))
    for shape in ((1, k), (2, 3, k), (50, k)):
        x = torch.randn(*shape, generator=gen).to(DEV)
        assert cuda.qlinear(x, w) is not None
        y = ops.linear(x, w)
        assert y.shape == (*shape[:-1], n)
        tol = 2e-2  # prefill: bf16 operands; decode: x rounded to int8 per 32 values
        assert rel_err(y.reshape(-1, n), reference_linear(x.reshape(-1, k), w.raw, "Q4_K")) < tol
    q5 = QTensor(torch.zeros(4, 88, dtype=torch.uint8, device=DEV), block_type("Q5_0"), (4, 128))
    assert cuda.qlinear(torch.randn(1, 128, device=DEV), q5) is None  # no kernel: the reference runs


# --- int8-activation GEMVs (kernels/triton/q8act.py) ---
from ouzel.kernels.triton import q8act as Q8  # noqa: E402


def test_quantize_x(gen):
    x = torch.randn(3, 512, generator=gen).to(DEV)
    x[1, :32] = 0.0  # an all-zero group: scale 0, quants 0
    xq, dx, sx = Q8.quantize_x(x)
    g = x.view(3, -1, 32).cpu()
    d = g.abs().amax(-1, keepdim=True) / 127
    want = torch.clamp(torch.floor(g / torch.where(d > 0, d, 1) + 0.5), -127, 127)
    assert (xq.view(3, -1, 32).cpu().float() - want).abs().max() <= 1  # a tie may round either way
    assert torch.allclose(dx.cpu(), d[..., 0], rtol=1e-6)
    xd = Q8.dequantized_x(xq, dx)
    assert torch.allclose(sx, xd.view(3, -1, 32).sum(-1), rtol=1e-5, atol=1e-6)
    assert rel_err(xd, x) < 0.01


@pytest.mark.parametrize("name", ["Q4_K"])  # Q6_K_R8: below
@pytest.mark.parametrize("m,cfg", [(1, dict(bn=8, u=1)), (1, dict(bn=4, u=2, split=2)), (3, dict(bn=16, u=1)),
                                   (16, dict(bn=8, u=2, split=2)), (1, dict(bn=8, u=1, m1=True)),
                                   (1, dict(bn=4, u=2, split=2, m1=True)), (1, dict(bn=16, u=4, m1=True))])
def test_q8_gemv_matches_dequantized_x(name, m, cfg, gen):
    n, k = 21, 1024
    raw = random_blocks(name, n, k, gen, DEV)
    x = torch.randn(m, k, generator=gen).to(DEV)
    xq, dx, sx = Q8.quantize_x(x)
    out = torch.full((m, n), float("nan"), device=DEV)
    Q8.qgemv_q8(x, raw, name, (n, k), out=out, xq=(xq, dx, sx), **cfg)
    assert rel_err(out, reference_linear(Q8.dequantized_x(xq, dx), raw, name)) < 1e-5  # exact integer dots
    assert rel_err(out, reference_linear(x, raw, name)) < 2e-2  # x's rounding to 8 bits


@pytest.mark.parametrize("name", ["Q4_K"])  # Q6_K_R8: below
def test_q8_gemv_experts(name, gen):
    E, n, k, T, K = 5, 24, 512, 2, 3
    raw = random_blocks(name, E * n, k, gen, DEV)
    idx = torch.randint(0, E, (T * K,), generator=gen).to(DEV)
    x = torch.randn(T, k, generator=gen).to(DEV)
    xq, dx, sx = Q8.quantize_x(x)
    xd = Q8.dequantized_x(xq, dx)
    ref = torch.stack([reference_linear(xd[p // K][None], raw[idx[p] * n:(idx[p] + 1) * n], name)[0]
                       for p in range(T * K)])
    for m1 in (False, True):
        out = Q8.qgemv_q8(x, raw, name, (n, k), idx=idx, x_div=K, bn=8, u=1, xq=(xq, dx, sx), m1=m1)
        assert rel_err(out, ref) < 1e-5


def _moe_gemm_case(name, counts, bm, gen, device_tiles=False, k=512, **cfg):
    """qgemm_experts over pairs sorted by expert (counts[e] each, gate/up form: rows of x shared by
    pairs) against the reference per pair. device_tiles: the schedule built from counts on the
    device (with spare empty tiles)."""
    E, n = len(counts), 40
    raw = random_blocks(name, E * n, k, gen, DEV)
    P = sum(counts)
    x = torch.randn(P // 2 + 1, k, generator=gen).to(DEV)
    pair_rows = torch.randint(0, x.shape[0], (P,), generator=gen, dtype=torch.int32).to(DEV)
    tiles = G.moe_tiles(torch.tensor(counts, device=DEV) if device_tiles else counts, bm, DEV, P)
    out = torch.full((P, n), float("nan"), device=DEV)
    G.qgemm_experts(x, raw, name, (n, k), pair_rows, tiles, out=out, bm=bm, dot_dtype=torch.float32, **cfg)
    es = [e for e, c in enumerate(counts) for _ in range(c)]
    ref = torch.stack([reference_linear(x[pair_rows[p]][None], raw[es[p] * n:(es[p] + 1) * n], name)[0]
                       for p in range(P)])
    return rel_err(out, ref)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("quads", [True, False])
def test_moe_gemm_experts(name, quads, gen):
    """MoE prefill GEMM: pairs sorted by expert, tiles of one expert each, blocks decoded in the
    tiles (`_quads` where it reads the type, else `_decode`). Uneven counts: an expert with no
    pairs, one with a single pair, one over two tiles of 16 (a partial last tile)."""
    assert _moe_gemm_case(name, [5, 0, 1, 37, 9], 16, gen, bn=16, quads=quads) < 1e-5


@pytest.mark.parametrize("counts,bm", [([5, 0, 1, 37, 9], 16), ([0, 0, 3], 16), ([64, 1, 0, 31, 32], 32), ([7], 64)])
def test_moe_tiles_on_device(counts, bm):
    """The schedule built on the device (no host read of counts) has the host schedule's tiles,
    then only empty ones (start == end), and at most ceil(P / bm) + E tiles."""
    P = sum(counts)
    host = [t.tolist() for t in G.moe_tiles(counts, bm, DEV)]
    dev = [t.tolist() for t in G.moe_tiles(torch.tensor(counts, device=DEV), bm, DEV, P)]
    n = len(host[0])
    assert len(dev[0]) == -(-P // bm) + len(counts) >= n
    assert [d[:n] for d in dev] == host
    assert all(s == e for s, e in zip(dev[1][n:], dev[2][n:]))


@pytest.mark.parametrize("E,P,bm", [(128, 4096, 16), (128, 512 * 8, 64), (5, 3, 16), (256, 6 * 300, 32)])
def test_moe_tiles_kernel_equals_torch(E, P, bm, gen):
    """The one-launch schedule equals its torch reference on random routings (E up to 256)."""
    idx = torch.randint(0, E, (P,), generator=gen)
    counts = torch.zeros(E, dtype=torch.long).index_add_(0, idx, torch.ones_like(idx)).to(DEV)
    n_tiles = -(-P // bm) + E
    got = G._moe_tiles_device(counts, bm, n_tiles)
    want = G._moe_tiles_reference(counts, bm, n_tiles)
    for a, b in zip(got, want):
        assert a.dtype == torch.int32 and torch.equal(a, b)


def test_moe_gemm_device_tiles(gen):
    assert _moe_gemm_case("Q4_K", [5, 0, 1, 37, 9], 16, gen, device_tiles=True, bn=16) < 1e-5


@pytest.mark.parametrize("bm,bn,num_warps", [(16, 64, 8), (32, 32, 4), (64, 16, 4)])
def test_moe_gemm_tiles(bm, bn, num_warps, gen):
    """Other tile shapes; n = 40 is not a multiple of bn (masked tail columns)."""
    assert _moe_gemm_case("Q4_K", [3, 70, 0, 20], bm, gen, bn=bn, num_warps=num_warps) < 1e-5


@pytest.mark.parametrize("name", TYPES)
def test_gemv_experts(name, gen):
    """The MoE decode form of the fp32-x GEMV: expert ids read by the kernel, x shared per token."""
    E, n, k, T, K = 5, 24, 512, 2, 3
    raw = random_blocks(name, E * n, k, gen, DEV)
    idx = torch.randint(0, E, (T * K,), generator=gen).to(DEV)
    x = torch.randn(T, k, generator=gen).to(DEV)
    out = torch.full((T * K, n), float("nan"), device=DEV)
    G.qgemv(x, raw, name, (n, k), out=out, idx=idx, x_div=K, bn=8, u=1)
    ref = torch.stack([reference_linear(x[p // K][None], raw[idx[p] * n:(idx[p] + 1) * n], name)[0]
                       for p in range(T * K)])
    assert rel_err(out, ref) < 1e-5


# --- Q6_K_R8: Q6_K regrouped for 16-byte loads on the GPU (quant/blocks.py) ---
from ouzel.quant.blocks import repack_q6_k_r8  # noqa: E402


def test_q6_k_r8_is_q6_k(gen):
    """The regrouping is a byte permutation: same values through the torch reference and the kernels."""
    n, k = 9, 4096
    raw = random_blocks("Q6_K", n, k, gen, DEV)
    r8 = repack_q6_k_r8(raw)
    ref = dequantize(raw, block_type("Q6_K"))
    assert torch.equal(dequantize(r8, block_type("Q6_K_R8")), ref)
    assert torch.equal(G.qdequant(r8, "Q6_K_R8", (n, k)), ref)
    x = torch.randn(2, k, generator=gen).to(DEV)
    assert rel_err(G.qgemv(x, r8, "Q6_K_R8", (n, k), bn=4, u=2), x @ ref.T) < 1e-5


# --- Q6_K_R3: Q6_K rows of K % 768 == 0 regrouped for 16-byte loads (quant/blocks.py) ---
from ouzel.quant.blocks import repack_q6_k_r3, unpack_q6_k_r3  # noqa: E402


@pytest.mark.parametrize("k", [768, 1536])
def test_q6_k_r3_is_q6_k(k, gen):
    """Each 3 blocks: their bodies, their d, 10 zero bytes; back to GGUF's bytes exactly, and the
    same values through the torch reference, the dequantizer and the fp32-x GEMV."""
    n = 9
    raw = random_blocks("Q6_K", n, k, gen, DEV)
    r3 = repack_q6_k_r3(raw)
    assert r3.shape == (n, k // 768 * 640) and torch.equal(unpack_q6_k_r3(r3), raw)
    assert not r3.view(n, -1, 640)[..., 630:].any()
    ref = dequantize(raw, block_type("Q6_K"))
    assert torch.equal(dequantize(r3, block_type("Q6_K_R3")), ref)
    assert torch.equal(G.qdequant(r3, "Q6_K_R3", (n, k)), ref)
    x = torch.randn(2, k, generator=gen).to(DEV)
    assert rel_err(G.qgemv(x, r3, "Q6_K_R3", (n, k), bn=4, u=2), x @ ref.T) < 1e-5


@pytest.mark.parametrize("name,k,cfg", [
    ("Q6_K_R8", 4096, dict(bn=8, u=1)), ("Q6_K_R8", 4096, dict(bn=4, u=2, split=2)), ("Q6_K_R8", 4096, dict(bn=16, u=4)),
    ("Q6_K_R3", 768, dict(bn=8, u=1)), ("Q6_K_R3", 768, dict(bn=16, u=4)), ("Q6_K_R3", 1536, dict(bn=4, u=2, split=3)),
    ("Q6_K_R3", 1536, dict(bn=8, u=1, split=2)), ("Q6_K_R3", 1536, dict(bn=32, u=2, num_warps=8))])
def test_q8_gemv_q6_k_regrouped(name, k, cfg, gen):
    """The int8-x one-row GEMV on the regrouped Q6_K layouts (R3 at K = 1536: a tile of u = 2
    blocks, or a split of 3, may start mid-group)."""
    n = 21
    raw = random_blocks(name, n, k, gen, DEV)
    x = torch.randn(1, k, generator=gen).to(DEV)
    xq, dx, sx = Q8.quantize_x(x)
    out = torch.full((1, n), float("nan"), device=DEV)
    Q8.qgemv_q8(x, raw, name, (n, k), out=out, xq=(xq, dx, sx), **cfg)
    assert rel_err(out, reference_linear(Q8.dequantized_x(xq, dx), raw, name)) < 1e-5
    assert rel_err(out, reference_linear(x, raw, name)) < 2e-2
    with pytest.raises(ValueError):  # one x row only
        Q8.qgemv_q8(torch.randn(2, k).to(DEV), raw, name, (n, k))


@pytest.mark.parametrize("x_div", [3, 1])  # gate/up: a token's x shared by its experts; down: one x per pair
def test_q8_gemv_q6_k_r3_experts(x_div, gen):
    E, n, k, P = 5, 24, 768, 6
    raw = random_blocks("Q6_K_R3", E * n, k, gen, DEV)
    idx = torch.randint(0, E, (P,), generator=gen).to(DEV)
    x = torch.randn(P // x_div, k, generator=gen).to(DEV)
    xq, dx, sx = Q8.quantize_x(x)
    xd = Q8.dequantized_x(xq, dx)
    ref = torch.stack([reference_linear(xd[p // x_div][None], raw[idx[p] * n:(idx[p] + 1) * n], "Q6_K_R3")[0]
                       for p in range(P)])
    out = Q8.qgemv_q8(x, raw, "Q6_K_R3", (n, k), idx=idx, x_div=x_div, bn=8, u=1, xq=(xq, dx, sx))
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("name,k", [("Q6_K_R3", 1536), ("Q6_K_R8", 2048)])
@pytest.mark.parametrize("quads", [True, False])
def test_moe_gemm_experts_regrouped(name, k, quads, gen):
    """The MoE prefill GEMM on the regrouped Q6_K stacks (the loader's layouts on CUDA)."""
    assert _moe_gemm_case(name, [5, 0, 1, 37, 9], 16, gen, k=k, bn=16, quads=quads) < 1e-5


@pytest.mark.parametrize("halves", [1, 2, 4])
def test_moe_gemm_iq2xxs_r8(halves, gen):
    """DeepSeek V4's gate/up experts as the loader leaves them on CUDA (IQ2_XXS_R8, K = 2 x 2048),
    through the `_quads` decoder, each 256-step whole or in parts (halves: fewer registers)."""
    assert _moe_gemm_case("IQ2_XXS_R8", [5, 0, 1, 37, 9], 16, gen, k=4096, bn=16, halves=halves) < 1e-5


@pytest.mark.parametrize("name,k,halves", [("IQ2_XXS_R8", 4096, 1), ("IQ2_XXS_R8", 2048, 2), ("IQ2_XXS", 512, 2),
                                           ("Q2_K_R8", 2048, 1), ("Q2_K", 512, 1)])
def test_moe_gemm_prmt(name, k, halves, gen):
    """IQ2_XXS and Q2_K formed in bf16 by byte permutation (`_iq2_bf16`, `_q2k_bf16`): every weight
    is `prmt_reference`'s (scales rounded to bf16, then one rounding), so the GEMM matches a matmul
    of those weights to fp32 accuracy, and the exact weights to bf16's."""
    counts = [5, 0, 1, 37, 9]
    E, n, P = len(counts), 40, sum(counts)
    raw = random_blocks(name, E * n, k, gen, DEV)
    x = torch.randn(P // 2 + 1, k, generator=gen).to(DEV)
    pair_rows = torch.randint(0, x.shape[0], (P,), generator=gen, dtype=torch.int32).to(DEV)
    out = torch.full((P, n), float("nan"), device=DEV)
    G.qgemm_experts(x, raw, name, (n, k), pair_rows, G.moe_tiles(counts, 16, DEV, P), out=out, bm=16, bn=16,
                    dot_dtype=torch.float32, halves=halves, prmt=True)
    w16 = G.prmt_reference(raw, name)
    w = dequantize(raw, block_type(name))
    es = torch.tensor([e for e, c in enumerate(counts) for _ in range(c)], device=DEV)
    xs = x[pair_rows.long()]
    ref16 = torch.stack([xs[p] @ w16[es[p] * n:(es[p] + 1) * n].T for p in range(P)])
    ref = torch.stack([xs[p] @ w[es[p] * n:(es[p] + 1) * n].T for p in range(P)])
    assert rel_err(out, ref16) < 1e-5
    assert 1e-4 < rel_err(w16, w) < 2e-2 and rel_err(out, ref) < 2e-2


@pytest.mark.parametrize("name,k,cfg,limit", [("Q4_K", 512, dict(quads=False), None),
                                             ("Q4_K", 512, dict(quads=True), 0.5),
                                             ("IQ2_XXS_R8", 2048, dict(prmt=True, halves=2), 0.5)])
def test_moe_gemm_swiglu(name, k, cfg, limit, gen):
    """swiglu=True: the gate/up GEMM stores silu(gate) * up (V4's clamps with a limit) of its own
    accumulators, equal to the plain GEMM's [gate | up] output through `moe.swiglu`."""
    from ouzel.layers.moe import swiglu
    counts = [5, 0, 1, 37, 9]
    E, n, P = len(counts), 48, sum(counts)  # 24 gate rows, 24 up rows: bn 16 leaves a partial tile
    raw = random_blocks(name, E * n, k, gen, DEV)
    x = torch.randn(P // 2 + 1, k, generator=gen).to(DEV)
    pair_rows = torch.randint(0, x.shape[0], (P,), generator=gen, dtype=torch.int32).to(DEV)
    tiles = G.moe_tiles(counts, 16, DEV, P)
    h = G.qgemm_experts(x, raw, name, (n, k), pair_rows, tiles, bm=16, bn=16, dot_dtype=torch.float32, **cfg)
    act = G.qgemm_experts(x, raw, name, (n, k), pair_rows, tiles, bm=16, bn=16, dot_dtype=torch.float32,
                          swiglu=True, limit=limit, **cfg)
    assert act.shape == (P, n // 2) and act.dtype == torch.float32
    want = swiglu(h[:, :n // 2], h[:, n // 2:], limit)
    assert rel_err(act, want) < 1e-5
    if limit:
        assert (h[:, :n // 2] > limit).any()  # the clamp was exercised


def test_moe_gemm_iq2xxs_in_halves(gen):
    """The same split on GGUF's own IQ2_XXS layout (66-byte blocks)."""
    assert _moe_gemm_case("IQ2_XXS", [5, 0, 1, 37, 9], 16, gen, bn=16, halves=2) < 1e-5


# --- Q8_0_R8: Q8_0 regrouped for 16-byte loads on the GPU (quant/blocks.py) ---
from ouzel.quant.blocks import repack_q8_0_r8, unpack_q8_0_r8  # noqa: E402


@pytest.mark.parametrize("m,n,k,bm,bn", [(70, 40, 512, 16, 16), (5, 9, 256, 16, 32), (64, 128, 1024, 64, 64)])
def test_q8_gemm_matches_dequantize_then_matmul(m, n, k, bm, bn, gen):
    """The prefill GEMM on Q8_0_R8 rows (one launch: blocks decoded in the tiles) against the exact
    dequantizer; masked tails in M and N."""
    raw = random_blocks("Q8_0_R8", n, k, gen, DEV)
    x = torch.randn(m, k, generator=gen).to(DEV)
    out = G.q8_gemm(x, raw, (n, k), dot_dtype=torch.float32, bm=bm, bn=bn)
    assert out.shape == (m, n) and out.dtype == x.dtype
    assert rel_err(out, x @ dequantize(raw, block_type("Q8_0_R8")).T) < 1e-5
    with pytest.raises(ValueError, match="q8_gemm"):
        G.q8_gemm(x[:, :-32], raw, (n, k))


def test_q8_gemm_groups(gen):
    """Groups: a block-diagonal weight (V4's grouped output projection) in one launch, each group
    its own slice of x times its own rows."""
    G_, m, n, k = 3, 20, 24, 256
    raw = random_blocks("Q8_0_R8", G_ * n, k, gen, DEV)
    x = torch.randn(m, G_ * k, generator=gen).to(DEV)
    w = dequantize(raw, block_type("Q8_0_R8"))
    want = torch.cat([x[:, g * k:(g + 1) * k] @ w[g * n:(g + 1) * n].T for g in range(G_)], dim=1)
    out = G.q8_gemm(x, raw, (n, k), dot_dtype=torch.float32, bm=16, bn=16, groups=G_)
    assert out.shape == (m, G_ * n) and rel_err(out, want) < 1e-5


@pytest.mark.skipif(INTERPRET, reason="times tiles on the GPU")
def test_q8_prefill_choice_is_timed_and_exact(gen):
    """A prefill matmul on Q8_0_R8 weights picks, on first use of its shape, a timed tile of
    q8_gemm or dequantize + cuBLAS (None), kept per power-of-two row count; either way the
    product of bf16-rounded operands."""
    from ouzel.kernels import cuda as C
    from ouzel.quant.tensor import QTensor
    n, k, m = 1024, 1024, 300
    raw = random_blocks("Q8_0_R8", n, k, gen, DEV)
    w = QTensor(raw, block_type("Q8_0_R8"), (n, k))
    x = torch.randn(m, k, generator=gen).to(DEV)
    C._Q8_TUNED.clear()
    out = C.qlinear(x, w)
    (key, cfg), = C._Q8_TUNED.items()
    assert key[3] == 512 and (cfg is None or cfg in C.Q8_GEMM_CONFIGS)
    C.qlinear(x[:260], w)
    assert len(C._Q8_TUNED) == 1  # the same bucket: no second timing
    bf = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    assert rel_err(out, bf(x) @ bf(dequantize(raw, block_type("Q8_0_R8"))).T) < 5e-3  # cuBLAS: a bf16 output


def test_q8_0_r8_is_q8_0(gen):
    """A byte permutation: same values through the torch reference, the dequantizer and the fp32-x GEMV."""
    n, k = 9, 768
    raw = random_blocks("Q8_0", n, k, gen, DEV)
    r8 = repack_q8_0_r8(raw)
    assert torch.equal(unpack_q8_0_r8(r8), raw) and not torch.equal(r8, raw)
    ref = dequantize(raw, block_type("Q8_0"))
    assert torch.equal(dequantize(r8, block_type("Q8_0_R8")), ref)
    assert torch.equal(G.qdequant(r8, "Q8_0_R8", (n, k)), ref)
    x = torch.randn(2, k, generator=gen).to(DEV)
    assert rel_err(G.qgemv(x, r8, "Q8_0_R8", (n, k), bn=4, u=1), x @ ref.T) < 1e-5


@pytest.mark.parametrize("cfg", [dict(bn=8, u=1), dict(bn=4, u=2, split=2), dict(bn=16, u=4),
                                 dict(bn=32, u=2, num_warps=8)])
def test_q8_gemv_q8_0_r8(cfg, gen):
    n, k = 21, 1024  # 21 rows: a partial tile
    raw = random_blocks("Q8_0_R8", n, k, gen, DEV)
    x = torch.randn(1, k, generator=gen).to(DEV)
    xq, dx, sx = Q8.quantize_x(x)
    out = torch.full((1, n), float("nan"), device=DEV)
    Q8.qgemv_q8(x, raw, "Q8_0_R8", (n, k), out=out, xq=(xq, dx, sx), **cfg)
    assert rel_err(out, reference_linear(Q8.dequantized_x(xq, dx), raw, "Q8_0_R8")) < 1e-5  # exact integer dots
    assert rel_err(out, reference_linear(x, raw, "Q8_0_R8")) < 2e-2  # x's rounding to 8 bits
    with pytest.raises(ValueError):  # one x row only
        Q8.qgemv_q8(torch.randn(2, k).to(DEV), raw, "Q8_0_R8", (n, k))


def test_q8_gemv_q8_0_r8_experts(gen):
    E, n, k, T, K = 5, 24, 512, 2, 3
    raw = random_blocks("Q8_0_R8", E * n, k, gen, DEV)
    idx = torch.randint(0, E, (T * K,), generator=gen).to(DEV)
    x = torch.randn(T, k, generator=gen).to(DEV)
    xq, dx, sx = Q8.quantize_x(x)
    xd = Q8.dequantized_x(xq, dx)
    ref = torch.stack([reference_linear(xd[p // K][None], raw[idx[p] * n:(idx[p] + 1) * n], "Q8_0_R8")[0]
                       for p in range(T * K)])
    out = Q8.qgemv_q8(x, raw, "Q8_0_R8", (n, k), idx=idx, x_div=K, bn=8, u=2, xq=(xq, dx, sx))
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q8_0"])
def test_embedding_rows_exact(name, gen):
    """The CUDA embedding path (rows gathered, then the Triton dequantizer) equals the exact torch
    dequantizer of those rows; ids may repeat."""
    from ouzel.kernels import cuda
    from ouzel.quant.tensor import QTensor
    n, k = 40, 512
    w = QTensor(random_blocks(name, n, k, gen, DEV), block_type(name), (n, k))
    ids = torch.tensor([3, 0, 39, 3], device=DEV)
    got = cuda.embedding_rows(ids, w)
    assert got.dtype == torch.float32 and torch.equal(got, w.dequantize(ids))
