"""Flash-decoding attention for the decode step: one query row per sequence against its KV cache.

Reference: `decode_attention_reference` below (plain torch, fp32 softmax over the valid keys only).

The call is CUDA-graph capturable with `lengths` changing between replays: the host never reads
`lengths`, so the grid depends only on shapes (B, Hkv, the capacity C and the split count).

- `_split_kernel`, program (b, kv head, head block) x split: the valid keys [lo, len) (lo from the
  sliding window) are cut into SPLITS equal chunks *on the device*, so the work stays balanced at
  any length; a chunk past the end does nothing and writes a neutral partial (lse = -inf, o = 0).
  It loads each [BN, D] tile of K and V once for all G query heads that share the kv head
  (GQA), with an online softmax in fp32 (exp2; scores scaled by scale * log2(e) after the dot).
- `_combine_kernel`, program (b, h): merges the SPLITS partials (o normalized, lse in log2 units).
  With splits == 1 the first kernel writes the output itself.

Scores and P @ V use `tl.dot`: the G heads are padded to 16 rows (mma needs M >= 16; the padding
rows are zeros and never stored). q and P go in at the cache dtype, as flash attention does; the
softmax scale is applied to the fp32 scores, so a bf16 q on a bf16 cache is not rounded at all.
An fp32 q on a 16-bit cache goes in as hi + lo 16-bit pieces (P too): one more mma per dot, fp32-
level accuracy. An fp32 cache uses fp32 "ieee" dots (no tf32).

Compiled for sm_90 (ptxas, no GPU run yet): bf16, D=128, BN=64, 4 warps: 95 registers, no spills,
72 KB shared, K/V loads pipelined with cp.async over 3 stages. An elementwise multiply + sum
version (no tensor cores) spilled at BN=64, took 255 registers at BN=32 and its loads were not
pipelined, so it was dropped.

`paged_decode_attention` is the same kernel reading one layer of a paged pool (PAGE = the block
size, a constexpr; 0 for contiguous caches): a key's row is its block's id from the sequence's
block table (read on the device) * PAGE + key % PAGE. A tile may straddle blocks, so the table is
read once per key (BN ints, cached). Compiled for sm_90 (bf16, D=128, BN=64, block 16, 4 warps):
121 registers, no spills, 39 KB shared, cp.async; the pipeliner puts the table reads one stage
ahead of the K/V loads they address, so K/V tiles are prefetched one ahead instead of two. Not run
on a GPU yet. Reference: `paged_decode_attention_reference` (gather, then the oracle above).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import pdl
from .pdl import wait_for_inputs
from .q8act import round32

MAX_SPLITS = 64
_LOG2E = math.log2(math.e)


@triton.jit
def _dot(a, b, SPLIT: tl.constexpr, F32_DOT: tl.constexpr):
    """a (fp32) @ b with a rounded to b's dtype; SPLIT adds the product of the rounding remainder
    (two 16-bit pieces carry ~16 bits of a's mantissa)."""
    hi = a.to(b.dtype)
    if F32_DOT:  # the interpreter's bf16 x bf16 dot is wrong: same rounded operands, fp32 product
        r = tl.dot(hi.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        r = tl.dot(hi, b, input_precision="ieee")
    if SPLIT:
        r += _dot(a - hi.to(tl.float32), b, False, F32_DOT)
    return r


@triton.jit
def _tile(q, qk_scale, k_head, v_head, s_kc, s_vc, tbl, key0, end, m_i, l_i, acc, D: tl.constexpr,
          DP: tl.constexpr, BN: tl.constexpr, PAGE: tl.constexpr, SPLIT: tl.constexpr, F32_DOT: tl.constexpr):
    """One online-softmax step over keys key0 .. key0+BN-1 (those < end): q [BG, DP] fp32;
    k_head/v_head point at row 0 of this kv head; returns the updated (m_i, l_i, acc).
    PAGE > 0: key t sits at row tbl[t // PAGE] * PAGE + t % PAGE (tbl: the sequence's block table)."""
    keys = key0 + tl.arange(0, BN)
    key_ok = keys < end
    d = tl.arange(0, DP)
    if PAGE > 0:  # a tile may straddle blocks: one table entry per key (a few bytes, cached)
        blk = tl.load(tbl + keys // PAGE, mask=key_ok, other=0)
        rows = blk.to(tl.int64) * PAGE + keys % PAGE
    else:
        rows = keys.to(tl.int64)
    mask = key_ok[:, None] & (d < D)[None, :]  # rows past len are never loaded
    v = tl.load(v_head + rows[:, None] * s_vc + d[None, :], mask=mask, other=0.0)  # [BN, DP]
    # K^T loaded as [DP, BN] (a tl.trans of a loaded [BN, DP] tile kept the load out of the pipeline)
    kt = tl.load(k_head + rows[None, :] * s_kc + d[:, None], mask=tl.trans(mask), other=0.0)
    s = _dot(q, kt, SPLIT, F32_DOT) * qk_scale  # [BG, BN], log2 units; scaled after the dot: q exact if bf16
    s = tl.where(key_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile with no valid key changes nothing
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    pv = _dot(p, v, SPLIT, F32_DOT)  # [BG, DP]
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + pv


@triton.jit
def _new_key(q, qk_scale, kn, nv, k_row, v_row, d, m_i, l_i, acc, write, D: tl.constexpr):
    """The online-softmax step of the one new key: its k row kn [DP] (values) and v row at nv,
    rounded to the cache dtype (as a read back from the cache would give), stored at k_row / v_row
    if `write`."""
    kn = kn.to(k_row.dtype.element_ty)
    vn = tl.load(nv + d, mask=d < D, other=0.0).to(v_row.dtype.element_ty)
    tl.store(k_row + d, kn, mask=(d < D) & write)
    tl.store(v_row + d, vn, mask=(d < D) & write)
    s = tl.sum(q * kn.to(tl.float32)[None, :], axis=1) * qk_scale  # [BG]
    m_new = tl.maximum(m_i, s)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new)
    return m_new, l_i * alpha + p, acc * alpha[:, None] + p[:, None] * vn.to(tl.float32)[None, :]


@triton.jit
def _roped_rows(ptr, rows_ok, d, pos, inv_ptr, w_ptr, eps, D: tl.constexpr, ROT: tl.constexpr, NORM: tl.constexpr,
                UNIT_OFFSET: tl.constexpr):
    """Rows [R, DP] at ptr [R, 1] + d, fp32: RMS-normalised over D with weights w first (NORM; Qwen3's
    and Gemma 3's q/k norms), then rotated at position pos over the first ROT dims (rotate-half:
    dim i < ROT / 2 pairs with i + ROT / 2). `fused.rope_qk`'s arithmetic; each row's partner half
    is a second load of the same row, not a shuffle."""
    HALF: tl.constexpr = ROT // 2
    in_rot = d < ROT
    partner = tl.where(in_rot, tl.where(d < HALF, d + HALF, d - HALF), d)
    mask = rows_ok & (d < D)[None, :]
    x = tl.load(ptr + d[None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(ptr + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    if NORM:
        r = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
        w = tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32)
        wp = tl.load(w_ptr + partner, mask=d < D, other=0.0).to(tl.float32)
        if UNIT_OFFSET:
            w, wp = 1.0 + w, 1.0 + wp
        x, xp = x * r * w[None, :], xp * r * wp[None, :]
    f = pos.to(tl.float32) * tl.load(inv_ptr + d % HALF, mask=in_rot, other=0.0)
    sin = tl.where(d < HALF, -tl.sin(f), tl.sin(f))[None, :]
    return tl.where(in_rot[None, :], x * tl.cos(f)[None, :] + xp * sin, x)


@triton.jit
def _q8_rows(o, rows_ok, heads, b, xq_ptr, dx_ptr, sx_ptr, HD, D: tl.constexpr, DP: tl.constexpr):
    """The int8 rounding of output rows o [R, DP] (heads [R] of sequence b; a row of the output is
    b's H * D = HD values) for the next GEMV, as `q8act.quantize_x` of the stored output: per 32
    values the scale max|x| / 127, the int8 values, and scale * their sum (`q8act.round32`; D % 32
    == 0, DP == D)."""
    R: tl.constexpr = o.shape[0]
    q, d, s = round32(tl.reshape(o, [R * (DP // 32), 32]))
    at = b.to(tl.int64) * HD + heads[:, None] * D + tl.arange(0, DP)[None, :]
    tl.store(xq_ptr + at, tl.reshape(q, [R, DP]), mask=rows_ok)
    blk = (b.to(tl.int64) * HD + heads[:, None] * D) // 32 + tl.arange(0, DP // 32)[None, :]
    tl.store(dx_ptr + blk, tl.reshape(d, [R, DP // 32]), mask=rows_ok)
    tl.store(sx_ptr + blk, tl.reshape(s, [R, DP // 32]), mask=rows_ok)


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, len_ptr, tbl_ptr, o_ptr, lse_ptr, nk_ptr, nv_ptr, inv_ptr, wq_ptr, wk_ptr,
                  xq_ptr, dx_ptr, sx_ptr, qk_scale, norm_eps, window, C, G,
                  Hkv, s_qb, s_qh, s_kb, s_kc, s_kh, s_vb, s_vc, s_vh, s_tb, s_ob, s_oh, s_nkb, s_nkh, s_nvb, s_nvh,
                  D: tl.constexpr, DP: tl.constexpr, BG: tl.constexpr, BN: tl.constexpr,
                  PAGE: tl.constexpr, SPLITS: tl.constexpr, ONE_PASS: tl.constexpr,
                  SPLIT_DOT: tl.constexpr, MAX_ITERS: tl.constexpr, NEW_KV: tl.constexpr, ROPE: tl.constexpr,
                  ROT: tl.constexpr, NORM: tl.constexpr, UNIT_OFFSET: tl.constexpr, Q8: tl.constexpr,
                  PDL: tl.constexpr):
    """q [B, H, D]; BG heads of one kv head per program. PAGE == 0: k/v rows at b*s_kb + key*s_kc
    + hkv*s_kh. PAGE > 0 (a paged pool, s_kb = 0): the row of a key comes from the block table
    tbl_ptr + b*s_tb (see `_tile`); C is then the table's capacity in keys.
    ONE_PASS: o_ptr is the output [B, H, D]; else o_ptr [B*H, SPLITS, D] fp32 and lse [B*H, SPLITS].
    NEW_KV (PAGE == 0): len_ptr holds positions, length = position + 1, and the key at the position
    is the new token's, read from nk/nv [B, Hkv, D]; the split holding it uses it from there and
    its first head block stores it into the caches (no other program reads that row).
    ROPE (with NEW_KV): q and the new k come unrotated; each program rotates its q rows at the
    position (after the q/k norms with NORM), and the split holding the new key rotates that key
    before it attends and stores it (`_roped_rows`): no launch of their own.
    Q8 (with ONE_PASS): also the output's int8 rows for the next GEMV (`_q8_rows`)."""
    wait_for_inputs(PDL)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_gblk = tl.cdiv(G, BG)
    gb = pid % n_gblk
    hkv = (pid // n_gblk) % Hkv
    b = pid // (n_gblk * Hkv)

    pos = tl.load(len_ptr + b).to(tl.int32)  # with NEW_KV the new token's position
    length = pos + (1 if NEW_KV else 0)
    length = tl.minimum(tl.maximum(length, 0), C)  # clamp: never read past C
    lo = tl.maximum(length - window, 0)
    chunk = tl.cdiv(tl.cdiv(length - lo, SPLITS), BN) * BN
    start = lo + split * chunk
    end = tl.minimum(start + chunk, length)

    g = gb * BG + tl.arange(0, BG)
    heads = hkv * G + g
    d = tl.arange(0, DP)
    gd_mask = (g < G)[:, None] & (d < D)[None, :]
    if ROPE:
        q = _roped_rows(q_ptr + b * s_qb + heads[:, None] * s_qh, (g < G)[:, None], d, pos, inv_ptr, wq_ptr,
                        norm_eps, D, ROT, NORM, UNIT_OFFSET)
    else:
        q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=gd_mask, other=0.0)
        q = q.to(tl.float32)
    k_head = k_ptr + b.to(tl.int64) * s_kb + hkv * s_kh
    v_head = v_ptr + b.to(tl.int64) * s_vb + hkv * s_vh
    tbl = tbl_ptr + b.to(tl.int64) * s_tb

    m_i = tl.full([BG], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BG], dtype=tl.float32)
    acc = tl.zeros([BG, DP], dtype=tl.float32)
    cached = tl.minimum(end, length - 1) if NEW_KV else end  # keys read from the cache
    if MAX_ITERS == 0:  # GPU: the trip count comes from the device-side length
        for i in range(0, tl.cdiv(tl.maximum(cached - start, 0), BN)):
            m_i, l_i, acc = _tile(q, qk_scale, k_head, v_head, s_kc, s_vc, tbl, start + i * BN, cached,
                                  m_i, l_i, acc, D, DP, BN, PAGE, SPLIT_DOT, False)
    else:  # the interpreter cannot loop to a runtime bound: loop to the capacity's, idle tiles masked
        for i in range(0, MAX_ITERS):
            m_i, l_i, acc = _tile(q, qk_scale, k_head, v_head, s_kc, s_vc, tbl, start + i * BN, cached,
                                  m_i, l_i, acc, D, DP, BN, PAGE, SPLIT_DOT, True)
    if NEW_KV:
        last = length - 1
        if (start <= last) & (last < end):
            nk = nk_ptr + b.to(tl.int64) * s_nkb + hkv * s_nkh
            nv = nv_ptr + b.to(tl.int64) * s_nvb + hkv * s_nvh
            if ROPE:
                kn = tl.reshape(_roped_rows(nk + tl.zeros([1, 1], tl.int32), tl.full([1, 1], True, tl.int1), d, pos,
                                            inv_ptr, wk_ptr, norm_eps, D, ROT, NORM, UNIT_OFFSET), [DP])
            else:
                kn = tl.load(nk + d, mask=d < D, other=0.0)
            m_i, l_i, acc = _new_key(q, qk_scale, kn, nv, k_head + last.to(tl.int64) * s_kc,
                                     v_head + last.to(tl.int64) * s_vc, d, m_i, l_i, acc, gb == 0, D)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]  # an empty range gives o = 0
    if ONE_PASS:
        o = o.to(o_ptr.dtype.element_ty)
        tl.store(o_ptr + b * s_ob + heads[:, None] * s_oh + d[None, :], o, mask=gd_mask)
        if Q8:
            _q8_rows(o.to(tl.float32), (g < G)[:, None], heads, b, xq_ptr, dx_ptr, sx_ptr, Hkv * G * D, D, DP)
    else:
        row = b * (Hkv * G) + heads  # b * H + h
        tl.store(o_ptr + (row[:, None] * SPLITS + split) * D + d[None, :], o, mask=gd_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + row * SPLITS + split, lse, mask=g < G)


@triton.jit
def _combine_kernel(o_part_ptr, lse_ptr, out_ptr, xq_ptr, dx_ptr, sx_ptr, H, s_ob, s_oh,
                    D: tl.constexpr, DP: tl.constexpr, SPLITS: tl.constexpr, SP: tl.constexpr, Q8: tl.constexpr,
                    PDL: tl.constexpr):
    """out[b, h] = sum_s w_s o_s / sum_s w_s, w_s = 2**(lse_s - max lse); 0 if every split is empty."""
    wait_for_inputs(PDL)
    row = tl.program_id(0)
    s = tl.arange(0, SP)
    d = tl.arange(0, DP)
    lse = tl.load(lse_ptr + row * SPLITS + s, mask=s < SPLITS, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    mask = (s < SPLITS)[:, None] & (d < D)[None, :]
    o = tl.load(o_part_ptr + (row * SPLITS + s)[:, None] * D + d[None, :], mask=mask, other=0.0)
    tot = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.where(tot > 0, tot, 1.0)
    b = row // H
    h = row % H
    out = out.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + b * s_ob + h * s_oh + d, out, mask=d < D)
    if Q8:  # the next GEMV's int8 rows of this head (`_q8_rows`)
        _q8_rows(out.to(tl.float32)[None, :], tl.full([1, 1], True, tl.int1), tl.zeros([1], tl.int32) + h, b, xq_ptr,
                 dx_ptr, sx_ptr, H * D, D, DP)


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def _block_n_for(DP: int, dtype: torch.dtype, split_dot: bool = False) -> int:
    """Keys per tile: 16 KB K tiles for 16-bit caches (64 keys at D = 128); fp32 caches take the
    non-tensor-core dot, which spilled registers past 16 keys at D = 128 (sm_90, 4 warps).
    split_dot (fp32 q on a 16-bit cache, the models' decode): at most 32, which on 4 warps (~200
    registers at D = 128) beat 64 on 8 (H100, bench_decode_attention.py --step: 29.2 vs 31.1 us at
    16k, 8.5 vs 8.9 at 600 keys, Llama-3's heads)."""
    per_tile = 2048 if dtype == torch.float32 else 8192
    return min(32 if split_dot else 64, max(16, per_tile // DP))


def _splits_for(progs: int, capacity: int, block_n: int, sms: int) -> int:
    """Double the splits while the grid stays within one wave of ~2 programs per SM (a partial
    second wave costs more than it spreads) and each split still gets a tile at full capacity (the
    real length is only known on the device). A short context is latency-bound: its few kv heads'
    programs each walked ~5 tiles in a row (6 us per layer on an H100) at two tiles per split."""
    splits = 1
    while progs * splits * 2 <= 2 * sms and capacity >= (2 * splits) * block_n and splits < MAX_SPLITS:
        splits *= 2
    return splits


def _kv_view(cache: torch.Tensor, B: int) -> tuple[torch.Tensor, int]:
    """[B, C, Hkv, D] or [C, Hkv, D] (B == 1) -> (4-d view, batch stride)."""
    if cache.dim() == 3 and B == 1:
        return cache[None], 0
    if cache.dim() != 4 or cache.shape[0] != B:
        raise ValueError(f"decode_attention: cache {tuple(cache.shape)} is not [B={B}, C, Hkv, D]")
    return cache, cache.stride(0)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     scale: float, window: int | None = None, out: torch.Tensor | None = None,
                     block_n: int | None = None, splits: int | None = None, *, num_warps: int | None = None,
                     num_stages: int = 3, new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                     rope: tuple | None = None, q8: bool = False):
    """out [B, H, D] = softmax(q k^T * scale) v over keys [max(0, len - window), len) of each sequence.

    q [B, H, D]; k_cache/v_cache [B, C, Hkv, D] (or [C, Hkv, D] if B == 1), last dim contiguous,
    H = G * Hkv (head h reads kv head h // G); lengths [B] int32/int64 on the device, read only by
    the kernel (graph-capturable). A sequence of length 0 gives zeros. block_n (keys per tile) and
    splits (programs per kv head along the keys) default to `_block_n_for` / `_splits_for`.

    new_kv = (k, v) [B, Hkv, D]: the new token's rows, not yet in the caches; `lengths` then holds
    the positions (length = position + 1). The kernel stores them at the position (in the
    caches' dtype) and attends them from there: the caches' write costs no launch of its own.

    rope = (inv_freq [rot_dim / 2] fp32, rot_dim, norm) with new_kv: q and the new k are not yet
    rotated; the kernel applies `fused.rope_qk(q, k, positions, inv_freq, rot_dim, norm)` itself
    (norm = (q weight [D], k weight [D], eps, unit_offset) or None), one launch less.
    q8 (D % 32 == 0, D a power of two): returns (out, (xq, dx, sx)), the output's int8 rows as
    `q8act.quantize_x(out.reshape(B, H * D))` makes them, written by the kernel that writes out."""
    B = q.shape[0]
    k4, s_kb = _kv_view(k_cache, B)
    v4, s_vb = _kv_view(v_cache, B)
    _check_kv(q, k4, v4, "decode_attention")
    if new_kv is not None:
        nk, nv = new_kv
        if nk.shape != (B, *k4.shape[2:]) or nv.shape != nk.shape or nk.stride(-1) != 1 or nv.stride(-1) != 1:
            raise ValueError(f"decode_attention: new k/v {tuple(nk.shape)}, {tuple(nv.shape)} are not "
                             f"[B={B}, Hkv, D] with contiguous rows")
    if rope is not None and new_kv is None:
        raise ValueError("decode_attention: rope needs new_kv (the new key is rotated with q)")
    if q8 and (q.shape[-1] % 32 or q.shape[-1] & (q.shape[-1] - 1)):
        raise ValueError(f"decode_attention: q8 needs D a power of two >= 32, got {q.shape[-1]}")
    return _launch(q, k4, v4, (s_kb, s_vb), k4.shape[1], lengths, None, 0, scale, window, out, block_n,
                   splits, num_warps, num_stages, "decode_attention", new_kv, rope, q8)


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                           block_table: torch.Tensor, lengths: torch.Tensor, block_size: int, scale: float,
                           window: int | None = None, out: torch.Tensor | None = None,
                           block_n: int | None = None, splits: int | None = None, *, num_warps: int | None = None,
                           num_stages: int = 3) -> torch.Tensor:
    """`decode_attention` over a paged pool: key t of sequence b sits at pool row
    block_table[b, t // block_size] * block_size + t % block_size.

    q [B, H, D]; k_pool/v_pool [slots, Hkv, D] (one layer of the pool, last dim contiguous);
    block_table int32/int64 [B, max_blocks] and lengths [B] on the device, read only by the kernel
    (graph-capturable). Lengths are clamped to max_blocks * block_size; table entries past a
    sequence's length are never read. Other arguments as `decode_attention`."""
    B = q.shape[0]
    name = "paged_decode_attention"
    if k_pool.dim() != 3:
        raise ValueError(f"{name}: pool {tuple(k_pool.shape)} is not [slots, Hkv, D]")
    _check_kv(q, k_pool[None], v_pool[None], name)
    if (block_table.dim() != 2 or block_table.shape[0] != B
            or block_table.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"{name}: block_table must be int32/int64 [B={B}, max_blocks], "
                         f"got {block_table.dtype} {tuple(block_table.shape)}")
    if block_size < 1:
        raise ValueError(f"{name}: block_size must be >= 1, got {block_size}")
    if block_table.stride(1) != 1:
        block_table = block_table.contiguous()
    C = block_table.shape[1] * block_size
    return _launch(q, k_pool[None], v_pool[None], (0, 0), C, lengths, block_table, block_size, scale,
                   window, out, block_n, splits, num_warps, num_stages, name, None)


def _check_kv(q: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, name: str) -> None:
    H, D = q.shape[1:]
    Hkv, Dk = k4.shape[2:]
    if k4.shape != v4.shape or Dk != D or H % Hkv:
        raise ValueError(f"{name}: q {tuple(q.shape)}, k {tuple(k4.shape)}, v {tuple(v4.shape)} "
                         f"(need H = G * Hkv, same D)")
    if k4.stride(-1) != 1 or v4.stride(-1) != 1:
        raise ValueError(f"{name}: k/v rows must be contiguous in the last dim")


def _q_and_out(q: torch.Tensor, out: torch.Tensor | None, window: int | None, name: str):
    """q with a contiguous last dim, and out (q's shape and dtype) checked or made."""
    if window is not None and window < 1:
        raise ValueError(f"{name}: window must be >= 1, got {window}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"{name}: out must be {list(q.shape)} {q.dtype} with a contiguous last dim")
    return q, out


def _launch(q, k4, v4, batch_strides, C, lengths, table, page, scale, window, out, block_n, splits,
            num_warps, num_stages, name, new_kv, rope=None, q8=False):
    """Shared by both entry points: k4/v4 [B or 1, C or slots, Hkv, D] checked by `_check_kv`;
    table None (contiguous caches) or the block table of a paged pool with `page` keys a block."""
    B, H, D = q.shape
    Hkv = k4.shape[2]
    if lengths.shape != (B,) or lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: lengths must be int32/int64 [B={B}], got {lengths.dtype} {tuple(lengths.shape)}")
    q, out = _q_and_out(q, out, window, name)

    G = H // Hkv
    DP = max(16, triton.next_power_of_2(D))  # D need not be a power of two: masked to DP
    BG = min(64, max(16, triton.next_power_of_2(G)))  # tl.dot needs >= 16 rows
    progs = B * Hkv * triton.cdiv(G, BG)
    # fp32 q on a 16-bit cache (the models' decode): q and P go through the dots as hi + lo pieces
    split_dot = q.dtype == torch.float32 and k4.dtype != torch.float32
    block_n = block_n or _block_n_for(DP, k4.dtype, split_dot)
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"{name}: block_n must be a power of two >= 16, got {block_n}")
    if splits is None:
        splits = _splits_for(progs, C, block_n, _sm_count(q.device))
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"{name}: splits must be in 1..{MAX_SPLITS}, got {splits}")
    win = C + 1 if window is None else min(window, C + 1)  # int32-safe "all keys"
    qk_scale = float(scale) * _LOG2E
    max_iters = 0 if q.device.type == "cuda" else max(1, triton.cdiv(triton.cdiv(C, splits), block_n))
    if num_warps is None:  # the split dots on 64-key tiles: 255 registers and spills on 4 warps (sm_90 ptxas)
        num_warps = 8 if split_dot and block_n * DP > 32 * 128 else 4
    inv, rot, norm = rope if rope is not None else (q, D, None)  # q: an unread stand-in
    if rope is not None and (rot % 2 or not 0 < rot <= D or inv.shape != (rot // 2,) or inv.dtype != torch.float32):
        raise ValueError(f"{name}: rope over {rot} of {D} dims with inv_freq {inv.dtype} {tuple(inv.shape)}")
    wq, wk, eps, unit = norm if norm is not None else (q, q, 0.0, False)
    meta = dict(D=D, DP=DP, BG=BG, BN=block_n, PAGE=page, SPLITS=splits, SPLIT_DOT=split_dot,
                MAX_ITERS=max_iters, NEW_KV=new_kv is not None, ROPE=rope is not None, ROT=rot,
                NORM=norm is not None, UNIT_OFFSET=bool(unit), Q8=q8, num_warps=num_warps, num_stages=num_stages,
                **pdl.launch(q.device))
    if q8:
        xq = torch.empty((B, H * D), dtype=torch.int8, device=q.device)
        dx = torch.empty((B, H * D // 32), dtype=torch.float32, device=q.device)
        sx = torch.empty_like(dx)
    else:
        xq = dx = sx = lengths  # unread stand-ins
    extra = (inv, wq, wk, xq, dx, sx)
    nk, nv = new_kv if new_kv is not None else (q, q)  # unread stand-ins without new rows
    new = (nk, nv)
    s_kb, s_vb = batch_strides
    tbl, s_tb = (lengths, 0) if table is None else (table, table.stride(0))  # lengths: an unread stand-in
    strides = (q.stride(0), q.stride(1), s_kb, k4.stride(1), k4.stride(2), s_vb, v4.stride(1), v4.stride(2), s_tb)
    new_strides = (nk.stride(0), nk.stride(1), nv.stride(0), nv.stride(1))
    done = (out, (xq, dx, sx)) if q8 else out
    if splits == 1:
        _split_kernel[(progs, 1)](q, k4, v4, lengths, tbl, out, out, *new, *extra, qk_scale, float(eps), win, C, G,
                                  Hkv, *strides, out.stride(0), out.stride(1), *new_strides, ONE_PASS=True, **meta)
        return done
    o_part = torch.empty((B * H, splits, D), dtype=torch.float32, device=q.device)
    lse = torch.empty((B * H, splits), dtype=torch.float32, device=q.device)
    _split_kernel[(progs, splits)](q, k4, v4, lengths, tbl, o_part, lse, *new, *extra, qk_scale, float(eps), win, C,
                                   G, Hkv, *strides, 0, 0, *new_strides, ONE_PASS=False, **dict(meta, Q8=False))
    _combine_kernel[(B * H,)](o_part, lse, out, xq, dx, sx, H, out.stride(0), out.stride(1),
                              D=D, DP=DP, SPLITS=splits, SP=triton.next_power_of_2(splits), Q8=q8, num_warps=4,
                              **pdl.launch(q.device))
    return done


@triton.jit
def _prefill_tile(q, p, qk_scale, k_head, v_head, s_kc, s_vc, key0, hi, window, m_i, l_i, acc,
                  D: tl.constexpr, DP: tl.constexpr, BN: tl.constexpr, F32_DOT: tl.constexpr):
    """One online-softmax step of a query block (rows at positions p) over keys key0 .. key0+BN-1
    (those < hi); row t takes the keys in (p[t] - window, p[t]]."""
    keys = key0 + tl.arange(0, BN)
    key_ok = keys < hi
    d = tl.arange(0, DP)
    kd = key_ok[:, None] & (d < D)[None, :]
    v = tl.load(v_head + keys[:, None].to(tl.int64) * s_vc + d[None, :], mask=kd, other=0.0)
    kt = tl.load(k_head + keys[None, :].to(tl.int64) * s_kc + d[:, None], mask=tl.trans(kd), other=0.0)
    if F32_DOT:  # the interpreter's 16-bit dot is wrong: same rounded operands, fp32 product
        s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
    else:
        s = tl.dot(q, kt)
    s = s * qk_scale  # [BM, BN], log2 units
    seen = (keys[None, :] <= p[:, None]) & (keys[None, :] > p[:, None] - window) & key_ok[None, :]
    s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet changes nothing
    alpha = tl.exp2(m_i - m_ref)
    pr = tl.exp2(s - m_ref[:, None])
    if F32_DOT:
        pv = tl.dot(pr.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(pr.to(v.dtype), v)
    return m_new, l_i * alpha + tl.sum(pr, axis=1), acc * alpha[:, None] + pv


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, qk_scale, window, T, G,
                    s_qt, s_qh, s_kc, s_kh, s_vc, s_vh, s_ot, s_oh,
                    D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    F32_DOT: tl.constexpr, MAX_ITERS: tl.constexpr, PDL: tl.constexpr):
    """Program (query block, head h): BM query rows of head h, row t at position pos[t], over the
    keys of kv head h // G it may see: (pos[t] - window, pos[t]]. The key range of the block,
    [min pos - window + 1, max pos], is read from the device (no host length); keys past it are
    never loaded. q and P enter the dots in the cache dtype (flash attention's rounding); the
    scores, the online softmax (exp2) and the accumulator are fp32."""
    wait_for_inputs(PDL)
    mb = tl.program_id(0)
    h = tl.program_id(1)
    hkv = h // G
    rows = mb * BM + tl.arange(0, BM)
    row_ok = rows < T
    p = tl.load(pos_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
    hi = tl.max(p, axis=0) + 1  # one past the last key any row of the block sees
    lo = tl.maximum(tl.min(tl.where(row_ok, p, hi), axis=0) - window + 1, 0)
    d = tl.arange(0, DP)
    q = tl.load(q_ptr + rows[:, None].to(tl.int64) * s_qt + h * s_qh + d[None, :],
                mask=row_ok[:, None] & (d < D)[None, :], other=0.0).to(k_ptr.dtype.element_ty)
    k_head = k_ptr + hkv * s_kh
    v_head = v_ptr + hkv * s_vh
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, DP], dtype=tl.float32)
    if MAX_ITERS == 0:  # GPU: the trip count comes from the device-side positions
        for i in range(0, tl.cdiv(tl.maximum(hi - lo, 0), BN)):
            m_i, l_i, acc = _prefill_tile(q, p, qk_scale, k_head, v_head, s_kc, s_vc, lo + i * BN, hi, window,
                                          m_i, l_i, acc, D, DP, BN, F32_DOT)
    else:  # the interpreter cannot loop to a runtime bound: loop over the capacity, idle tiles masked
        for i in range(0, MAX_ITERS):
            m_i, l_i, acc = _prefill_tile(q, p, qk_scale, k_head, v_head, s_kc, s_vc, lo + i * BN, hi, window,
                                          m_i, l_i, acc, D, DP, BN, F32_DOT)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + rows[:, None].to(tl.int64) * s_ot + h * s_oh + d[None, :], o.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (d < D)[None, :])


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                      scale: float, window: int | None = None, out: torch.Tensor | None = None,
                      block_m: int | None = None, block_n: int | None = None, *, num_warps: int | None = None,
                      num_stages: int = 3) -> torch.Tensor:
    """out [T, H, D]: query t (at positions[t]) over the cached keys (positions[t] - window,
    positions[t]] -- causal attention of a prefill chunk whose k/v are already in the caches.

    q [T, H, D]; k_cache/v_cache [C, Hkv, D] in a 16-bit dtype, last dim contiguous, H = G * Hkv;
    positions [T] int32/int64 on the device, read only by the kernel: the launch depends on shapes
    alone, so a CUDA graph captured for one chunk replays at any depth. Keys past a block's last
    position are never read. Reference: `prefill_attention_reference`."""
    name = "prefill_attention"
    T, H, D = q.shape
    if k_cache.dim() != 3:
        raise ValueError(f"{name}: cache {tuple(k_cache.shape)} is not [C, Hkv, D]")
    _check_kv(q, k_cache[None], v_cache[None], name)
    if k_cache.dtype not in (torch.float16, torch.bfloat16) or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"{name}: caches must be float16/bfloat16, got {k_cache.dtype}, {v_cache.dtype}")
    if positions.shape != (T,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: positions must be int32/int64 [T={T}], got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    q, out = _q_and_out(q, out, window, name)
    C, Hkv = k_cache.shape[:2]
    DP = max(16, triton.next_power_of_2(D))
    # tiles by the capacity (the depth is only known on the device; a cache doubles as it fills):
    # the H100 sweep's best for D = 128 (bench/bench_prefill_attention.py): 64 x 32 keys on 4 warps
    # for a fresh chunk (28 vs 53 us at 64 x 64), 128 x 64 on 8 warps at depth 4k-16k
    deep = C > 4096
    if num_warps is None:
        num_warps = 8 if deep and DP <= 128 else 4
    block_m = block_m or (32 if DP > 128 else 128 if deep else 64)
    block_n = block_n or (32 if DP > 128 or not deep else 64)
    interp = q.device.type != "cuda"
    win = C + 1 if window is None else min(window, C + 1)  # int32-safe "all keys"
    # the interpreter can't loop to a device-side bound: every block loops over the capacity's tiles
    max_iters = triton.cdiv(C, block_n) if interp else 0
    _prefill_kernel[(triton.cdiv(T, block_m), H)](
        q, k_cache, v_cache, positions, out, float(scale) * _LOG2E, win, T, H // Hkv,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1), D=D, DP=DP, BM=block_m, BN=block_n, F32_DOT=interp, MAX_ITERS=max_iters,
        num_warps=num_warps, num_stages=num_stages, **pdl.launch(q.device))
    return out


def prefill_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                positions: torch.Tensor, scale: float, window: int | None = None) -> torch.Tensor:
    """The oracle: per query row, its visible keys sliced on the host, fp32 scores and softmax."""
    T, H, D = q.shape
    G = H // k_cache.shape[1]
    out = torch.zeros((T, H, D), dtype=torch.float32, device=q.device)
    for t in range(T):
        p = int(positions[t])
        lo = 0 if window is None else max(0, p - window + 1)
        kb = k_cache[lo:p + 1].float().repeat_interleave(G, dim=1)  # [S, H, D]
        vb = v_cache[lo:p + 1].float().repeat_interleave(G, dim=1)
        s = torch.einsum("hd,shd->hs", q[t].float(), kb) * scale
        out[t] = torch.einsum("hs,shd->hd", torch.softmax(s, dim=-1), vb)
    return out.to(q.dtype)


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               lengths: torch.Tensor, scale: float, window: int | None = None) -> torch.Tensor:
    """The oracle: per sequence, slice the visible keys, fp32 scores and softmax, q's dtype out."""
    B, H, D = q.shape
    out = torch.zeros((B, H, D), dtype=torch.float32, device=q.device)
    for b in range(B):
        k = k_cache[b] if k_cache.dim() == 4 else k_cache  # [C, Hkv, D]
        v = v_cache[b] if v_cache.dim() == 4 else v_cache
        n = int(lengths[b])
        lo = 0 if window is None else max(0, n - window)
        if n == 0:
            continue
        G = H // k.shape[1]
        kb = k[lo:n].float().repeat_interleave(G, dim=1)  # [S, H, D]
        vb = v[lo:n].float().repeat_interleave(G, dim=1)
        s = torch.einsum("hd,shd->hs", q[b].float(), kb) * scale
        out[b] = torch.einsum("hs,shd->hd", torch.softmax(s, dim=-1), vb)
    return out.to(q.dtype)



def paged_decode_attention_reference(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                                     block_table: torch.Tensor, lengths: torch.Tensor, block_size: int,
                                     scale: float, window: int | None = None) -> torch.Tensor:
    """The paged oracle: gather each sequence's keys into [B, C, Hkv, D] (zeros past its length),
    then `decode_attention_reference`."""
    B = q.shape[0]
    C = block_table.shape[1] * block_size
    lengths = lengths.clamp(0, C)
    k = k_pool.new_zeros((B, C, *k_pool.shape[1:]))
    v = v_pool.new_zeros((B, C, *v_pool.shape[1:]))
    for b in range(B):
        t = torch.arange(int(lengths[b]), device=k_pool.device)
        rows = block_table[b].long()[t // block_size] * block_size + t % block_size
        k[b, :len(t)] = k_pool[rows]
        v[b, :len(t)] = v_pool[rows]
    return decode_attention_reference(q, k, v, lengths, scale, window)
