"""Triton flash-decoding attention against the plain torch oracle (needs CUDA + triton; skips otherwise).

With TRITON_INTERPRET=1 the same checks run on CPU tensors through Triton's interpreter (small shapes).
Cache rows outside each sequence's visible range hold NaN and every output buffer starts as NaN, so
a read past the length or an unwritten output fails the check.
"""
import os

import pytest
import torch

triton = pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or INTERPRET):
    pytest.skip("needs CUDA (or TRITON_INTERPRET=1)", allow_module_level=True)

from ouzel.kernels.triton.attention import (decode_attention, decode_attention_reference,  # noqa: E402
                                            paged_decode_attention, paged_decode_attention_reference,
                                            prefill_attention, prefill_attention_reference)
from ouzel.kernels.triton.testing import rel_err  # noqa: E402

DEV = "cpu" if INTERPRET else "cuda"
F32, BF16 = torch.float32, torch.bfloat16
TOL = {F32: 1e-5, BF16: 1e-2}


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def make_case(gen, lens, H, Hkv, D, C, q_dtype, cache_dtype, window=None, batched=True):
    """q [B, H, D], caches [B, C, Hkv, D] (or [C, Hkv, D] if not batched) with NaN outside each
    sequence's visible rows [max(0, len - window), len), lengths int32 [B]."""
    B = len(lens)
    q = torch.randn(B, H, D, generator=gen).to(DEV, q_dtype)
    k = torch.randn(B, C, Hkv, D, generator=gen)
    v = torch.randn(B, C, Hkv, D, generator=gen)
    for b, n in enumerate(lens):
        lo = 0 if window is None else max(0, n - window)
        for t in (k, v):
            t[b, :lo] = float("nan")
            t[b, n:] = float("nan")
    k, v = k.to(DEV, cache_dtype), v.to(DEV, cache_dtype)
    if not batched:
        k, v = k[0], v[0]
    return q, k, v, torch.tensor(lens, dtype=torch.int32, device=DEV)


def _against(kernel, reference, q, k, v, where, window, tol, **kw):
    """kernel(...) writing into an all-NaN out against reference(...): rel err < tol (inf, so a
    failure, if a NaN row was read or an output row left unwritten)."""
    scale = q.shape[-1] ** -0.5
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=DEV)
    assert kernel(q, k, v, where, scale, window=window, out=out, **kw) is out
    ref = reference(q, k, v, where, scale, window=window)
    assert torch.isfinite(ref).all()
    err = rel_err(out, ref)
    assert err < tol, f"rel err {err:.2e}"


def check(q, k, v, lengths, window, tol, **kw):
    _against(decode_attention, decode_attention_reference, q, k, v, lengths, window, tol, **kw)


@pytest.mark.parametrize("lens", [(200,), (256,), (1, 17, 256)])
@pytest.mark.parametrize("H,Hkv,D", [(32, 8, 128), (8, 8, 64), (4, 1, 64)])
@pytest.mark.parametrize("window", [None, 32])
@pytest.mark.parametrize("q_dtype,cache_dtype", [(F32, F32), (BF16, BF16)])
def test_matches_reference(lens, H, Hkv, D, window, q_dtype, cache_dtype, gen):
    # (200,) uses the [C, Hkv, D] cache of B == 1; 2 splits of <= 2 tiles (few tiles: the interpreter is slow)
    q, k, v, lengths = make_case(gen, lens, H, Hkv, D, 256, q_dtype, cache_dtype, window, batched=lens != (200,))
    check(q, k, v, lengths, window, TOL[cache_dtype], block_n=64, splits=2)


@pytest.mark.parametrize("block_n,splits", [(64, 1), (32, 3), (16, 16)])
@pytest.mark.parametrize("lens,window", [((1, 100, 256), None), ((5, 256, 64), 40), ((0, 3), None)])
def test_splits_and_lengths(block_n, splits, lens, window, gen):
    """Splits past the length write neutral partials; length 0 gives zeros."""
    q, k, v, lengths = make_case(gen, lens, 8, 2, 64, 256, F32, F32, window)
    scale = 0.125
    out = torch.full(q.shape, float("nan"), device=DEV)
    decode_attention(q, k, v, lengths, scale, window=window, out=out, block_n=block_n, splits=splits)
    ref = decode_attention_reference(q, k, v, lengths, scale, window=window)
    assert torch.isfinite(out).all()
    for b, n in enumerate(lens):
        if n == 0:
            assert (out[b] == 0).all()
        else:
            assert rel_err(out[b], ref[b]) < 1e-5


def test_mixed_dtypes_strides_and_big_groups(gen):
    """fp32 q on a bf16 cache (hi + lo dots: near fp32 accuracy); K and V interleaved in one tensor (strided rows) and q a slice of
    a wider tensor; G = 128 query heads on one kv head (two head blocks per program row)."""
    B, C, D = 2, 96, 64
    for H, Hkv, q_dtype, cache_dtype, tol in ((8, 2, F32, BF16, 1e-4), (128, 1, BF16, torch.float16, 1e-2)):
        kv = torch.randn(B, C, 2, Hkv, D, generator=gen).to(DEV, cache_dtype)
        kv[0, 40:] = float("nan")
        qw = torch.randn(B, H, 2 * D, generator=gen).to(DEV, q_dtype)
        lengths = torch.tensor([40, C], dtype=torch.int64, device=DEV)
        check(qw[:, :, D:], kv[:, :, 0], kv[:, :, 1], lengths, None, tol, block_n=32, splits=2)


@pytest.mark.parametrize("lens,window,splits", [((1, 100, 256), None, 2), ((5, 64), 40, 3), ((200,), None, 1)])
@pytest.mark.parametrize("q_dtype,cache_dtype", [(F32, F32), (F32, torch.float16), (BF16, BF16)])
def test_new_kv_is_stored_and_attended(lens, window, splits, q_dtype, cache_dtype, gen):
    """new_kv: the kernel stores the new token's k/v at its position (in the caches' dtype) and
    attends it as if it had been stored before; no other cache row changes."""
    q, k, v, lengths = make_case(gen, lens, 8, 2, 64, 256, q_dtype, cache_dtype, window, batched=lens != (200,))
    B = q.shape[0]
    pos = lengths - 1
    nk = torch.randn(B, 2, 64, generator=gen).to(DEV)  # fp32, as the rope leaves it
    nv = torch.randn(B, 2 * 3, 64, generator=gen).to(DEV)[:, ::3]  # a strided view (a slice of qkv)
    kw, vw = k.clone(), v.clone()
    for b in range(B):
        (kw[b] if k.dim() == 4 else kw)[pos[b]] = nk[b].to(cache_dtype)
        (vw[b] if v.dim() == 4 else vw)[pos[b]] = nv[b].to(cache_dtype)
    ref = decode_attention_reference(q, kw, vw, lengths, 0.125, window=window)
    out = decode_attention(q, k, v, pos, 0.125, window=window, block_n=32, splits=splits, new_kv=(nk, nv))
    for got, want in ((k, kw), (v, vw)):  # the interpreter truncates fp32 -> bf16: one ulp apart there
        got, want = torch.nan_to_num(got.float(), 7.0), torch.nan_to_num(want.float(), 7.0)
        assert torch.equal(got, want) if cache_dtype != BF16 else ((got - want).abs() <= want.abs() * 2 ** -7).all()
    assert rel_err(out, ref) < {F32: 1e-5, torch.float16: 1e-4, BF16: 1e-2}[cache_dtype]


@pytest.mark.parametrize("norm,rot,splits", [(True, 64, 4), (False, 64, 1), (True, 32, 1), (False, 32, 4)])
def test_rope_and_int8_rows_in_the_kernel(norm, rot, splits, gen):
    """rope: q and the new k come unrotated and the kernel rotates them (after the q/k norms),
    as `fused.rope_qk` then the kernel on rotated inputs; the stored k row is the rotated one.
    rot 32 of 64: partial rope. q8: the output's int8 rows equal `quantize_x` of the output."""
    from ouzel.kernels.triton.fused import rope_qk
    from ouzel.kernels.triton.q8act import quantize_x
    H, Hkv, D = 8, 2, 64
    q, k, v, lengths = make_case(gen, (50, 17, 1), H, Hkv, D, 64, F32, torch.float16)
    B = q.shape[0]
    pos = lengths - 1
    nk = torch.randn(B, Hkv, D, generator=gen).to(DEV)
    nv = torch.randn(B, Hkv, D, generator=gen).to(DEV)
    inv = (1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot)).to(DEV)
    w = (torch.rand(D, generator=gen) + 0.5).to(DEV), (torch.rand(D, generator=gen) + 0.5).to(DEV)
    nrm = (w[0], w[1], 1e-6, False) if norm else None
    qr = torch.empty_like(q)
    kr = torch.empty_like(nk)
    for b in range(B):  # rope_qk rotates the rows of one position
        qr[b:b + 1], kr[b:b + 1] = rope_qk(q[b:b + 1], nk[b:b + 1], pos[b:b + 1], inv, rot, nrm)
    k2, v2 = k.clone(), v.clone()
    want = decode_attention(qr, k2, v2, pos, 0.125, block_n=16, splits=splits, new_kv=(kr, nv))
    out, (xq, dx, sx) = decode_attention(q, k, v, pos, 0.125, block_n=16, splits=splits, new_kv=(nk, nv),
                                         rope=(inv, rot, nrm), q8=True)
    assert rel_err(out, want) < 1e-5
    assert rel_err(k.float().nan_to_num(7.0), k2.float().nan_to_num(7.0)) < 1e-3  # the rotated k, stored
    xq2, dx2, sx2 = quantize_x(out.reshape(B, H * D))
    assert (xq.int() - xq2.int()).abs().max() <= 0 and torch.equal(dx, dx2) and rel_err(sx, sx2) < 1e-6


def test_d_not_power_of_two(gen):
    q, k, v, lengths = make_case(gen, (30, 7), 4, 2, 80, 64, F32, F32)
    check(q, k, v, lengths, None, 1e-5)  # default block_n / splits
    check(q, k, v, lengths, None, 1e-5, block_n=16, splits=1)


def test_rejects_bad_shapes():
    q = torch.zeros(2, 8, 64, device=DEV)
    k = torch.zeros(2, 32, 3, 64, device=DEV)
    lengths = torch.ones(2, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="decode_attention"):
        decode_attention(q, k, k, lengths, 1.0)  # 8 heads on 3 kv heads
    with pytest.raises(ValueError, match="lengths"):
        decode_attention(q, k[:, :, :2], k[:, :, :2], lengths.float(), 1.0)


def _captured(kernel, q, k, v, where):
    """kernel(q, k, v, where, scale 0.088, out=out) run once (compiled outside the capture), then
    captured in a CUDA graph: (graph, out)."""
    out = torch.empty_like(q)
    kernel(q, k, v, where, 0.088, out=out)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernel(q, k, v, where, 0.088, out=out)
    return graph, out


@pytest.mark.skipif(INTERPRET, reason="CUDA graphs need CUDA")
def test_cuda_graph_replay_with_new_lengths(gen):
    """Lengths are read on the device: one captured graph serves every length."""
    lens0 = (300, 4096)
    q, k, v, lengths = make_case(gen, lens0, 32, 8, 128, 4096, BF16, BF16)
    k = torch.nan_to_num(k)  # later replays use longer lengths than the NaN layout above
    v = torch.nan_to_num(v)
    graph, out = _captured(decode_attention, q, k, v, lengths)
    for lens in ((300, 4096), (1, 17), (4000, 64), (4096, 4096)):
        lengths.copy_(torch.tensor(lens, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        assert rel_err(out, decode_attention_reference(q, k, v, lengths, 0.088)) < 1e-2


def make_paged(gen, lens, H, Hkv, D, bs, n_blocks, q_dtype, pool_dtype, window=None):
    """q [B, H, D], one layer's pool [n_blocks * bs, Hkv, D] holding NaN in every slot no query may
    see (other blocks, rows past a length or before the window), shuffled block tables int32
    [B, W] whose entries past a length point at NaN blocks, lengths int32 [B]."""
    B, W = len(lens), max(1, *(-(-n // bs) for n in lens))
    table = torch.randperm(n_blocks, generator=gen)[:B * W].view(B, W).to(torch.int32)
    k = torch.full((n_blocks * bs, Hkv, D), float("nan"))
    v = torch.full((n_blocks * bs, Hkv, D), float("nan"))
    for b, n in enumerate(lens):
        t = torch.arange(0 if window is None else max(0, n - window), n)
        rows = table[b, t // bs].long() * bs + t % bs
        k[rows] = torch.randn(len(t), Hkv, D, generator=gen)
        v[rows] = torch.randn(len(t), Hkv, D, generator=gen)
    q = torch.randn(B, H, D, generator=gen).to(DEV, q_dtype)
    return (q, k.to(DEV, pool_dtype), v.to(DEV, pool_dtype), table.to(DEV),
            torch.tensor(lens, dtype=torch.int32, device=DEV))


def check_paged(q, k, v, table, lengths, bs, window, tol, **kw):
    scale = q.shape[-1] ** -0.5
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=DEV)
    assert paged_decode_attention(q, k, v, table, lengths, bs, scale, window=window, out=out, **kw) is out
    ref = paged_decode_attention_reference(q, k, v, table, lengths, bs, scale, window=window)
    assert torch.isfinite(ref).all()
    err = rel_err(out, ref)  # inf if a NaN slot leaked or a row was left unwritten
    assert err < tol, f"rel err {err:.2e}"


@pytest.mark.parametrize("bs,lens", [(16, (1, 32, 23)), (4, (1, 8, 23))])  # 1, block boundary, mid-block
@pytest.mark.parametrize("window", [None, 10])
@pytest.mark.parametrize("q_dtype,pool_dtype", [(F32, F32), (BF16, BF16)])
def test_paged_matches_reference(bs, lens, window, q_dtype, pool_dtype, gen):
    # bs 4 < block_n 16: each tile reads keys of several blocks
    q, k, v, table, lengths = make_paged(gen, lens, 8, 2, 64, bs, 24, q_dtype, pool_dtype, window)
    check_paged(q, k, v, table, lengths, bs, window, TOL[pool_dtype], block_n=16, splits=2)


def test_paged_defaults_and_mixed_dtypes(gen):
    """Default block_n / splits; an fp32 q on a bf16 pool (hi + lo dots); a block size that is no
    power of two; an int64 table; a length 0 gives zeros."""
    q, k, v, table, lengths = make_paged(gen, (0, 13, 40), 4, 1, 32, 6, 24, F32, BF16)
    check_paged(q[1:], k, v, table[1:].long(), lengths[1:], 6, None, 1e-4)
    out = paged_decode_attention(q, k, v, table, lengths, 6, 0.2)
    assert (out[0] == 0).all() and torch.isfinite(out).all()


@pytest.mark.skipif(INTERPRET, reason="CUDA graphs need CUDA")
def test_paged_cuda_graph_replay_with_new_tables(gen):
    """Tables and lengths are read on the device: one captured graph serves every step."""
    bs, n_blocks = 16, 160
    q, k, v, table, lengths = make_paged(gen, (300, 1000), 32, 8, 128, bs, n_blocks, BF16, BF16)
    k, v = torch.nan_to_num(k), torch.nan_to_num(v)
    table = torch.zeros(2, 64, dtype=torch.int32, device=DEV)
    out = torch.empty_like(q)
    paged_decode_attention(q, k, v, table, lengths, bs, 0.088, out=out)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(q, k, v, table, lengths, bs, 0.088, out=out)
    for lens in ((300, 1000), (1, 17), (1024, 64)):
        table.copy_(torch.randperm(n_blocks, generator=gen)[:128].view(2, 64).to(torch.int32))
        lengths.copy_(torch.tensor(lens, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        assert rel_err(out, paged_decode_attention_reference(q, k, v, table, lengths, bs, 0.088)) < 1e-2


F16 = torch.float16
PREFILL_TOL = {F16: 3e-3, BF16: 2e-2}  # q and P enter the dots rounded to the cache dtype


def make_prefill(gen, start, T, H, Hkv, D, C, q_dtype, cache_dtype, window=None):
    """A chunk of T queries at positions start .. start+T-1 whose k/v are already cached; every
    cache row no query may see (past the chunk, before the first query's window) holds NaN."""
    q = torch.randn(T, H, D, generator=gen).to(DEV, q_dtype)
    k = torch.randn(C, Hkv, D, generator=gen)
    v = torch.randn(C, Hkv, D, generator=gen)
    lo = 0 if window is None else max(0, start - window + 1)
    for t in (k, v):
        t[:lo] = float("nan")
        t[start + T:] = float("nan")
    pos = torch.arange(start, start + T, device=DEV)
    return q, k.to(DEV, cache_dtype), v.to(DEV, cache_dtype), pos


def check_prefill(q, k, v, pos, window, tol, **kw):
    _against(prefill_attention, prefill_attention_reference, q, k, v, pos, window, tol, **kw)


@pytest.mark.parametrize("start,T", [(0, 40), (100, 37), (139, 1)])  # fresh, a chunk at depth, one row
@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("q_dtype,cache_dtype", [(F32, F16), (BF16, BF16)])
def test_prefill_matches_reference(start, T, window, q_dtype, cache_dtype, gen):
    """Causal attention of a chunk over its cached keys, the bounds read from the device; query
    blocks of 16 rows cross the chunk's end, key tiles of 32 straddle every diagonal."""
    q, k, v, pos = make_prefill(gen, start, T, 8, 2, 64, 160, q_dtype, cache_dtype, window)
    check_prefill(q, k, v, pos, window, PREFILL_TOL[cache_dtype], block_m=16, block_n=32)


def test_prefill_last_row_only_and_odd_shapes(gen):
    """The last layer's pruned prefill: one query row (the chunk's last position) over keys the
    chunk wrote; D = 80 (masked to 128), one kv head per query head, default tiles."""
    q, k, v, pos = make_prefill(gen, 50, 30, 4, 4, 80, 96, F32, F16)
    check_prefill(q[-1:], k, v, pos[-1:], None, PREFILL_TOL[F16])
    check_prefill(q, k, v, pos.to(torch.int32), 7, PREFILL_TOL[F16])


def test_prefill_rejects_bad_input():
    q = torch.zeros(4, 8, 64, device=DEV)
    k = torch.zeros(16, 2, 64, device=DEV, dtype=F16)
    pos = torch.arange(4, device=DEV)
    with pytest.raises(ValueError, match="float16/bfloat16"):
        prefill_attention(q, k.float(), k.float(), pos, 1.0)
    with pytest.raises(ValueError, match="positions"):
        prefill_attention(q, k, k, pos[:3], 1.0)
    with pytest.raises(ValueError, match="prefill_attention"):
        prefill_attention(q, k[:, :1].expand(16, 3, 64), k[:, :1].expand(16, 3, 64), pos, 1.0)  # 8 on 3


@pytest.mark.skipif(INTERPRET, reason="CUDA graphs need CUDA")
def test_prefill_graph_replays_at_any_depth(gen):
    """One captured chunk of 512 replays at other positions: the key range is read on the device
    (a cache of 8192: the tiles for depth)."""
    q, k, v, pos = make_prefill(gen, 0, 512, 32, 8, 128, 8192, F32, F16)
    k, v = torch.nan_to_num(k), torch.nan_to_num(v)
    graph, out = _captured(prefill_attention, q, k, v, pos)
    for start in (0, 1000, 7680):
        pos.copy_(torch.arange(start, start + 512, device=DEV))
        out.fill_(float("nan"))
        graph.replay()
        assert rel_err(out, prefill_attention_reference(q, k, v, pos, 0.088)) < 3e-3
