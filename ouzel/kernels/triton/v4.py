"""DeepSeek V4 decode-step groups in one or two launches each, where torch runs 10-50 small kernels.

References (the torch code they replace, the oracle in tests/test_triton_v4.py):
- `compress_step`: `Compressor._compress_step` (layers/compressed_attention.py) with
  `CompressedKV.frontier_step`/`emit_step`: store the token's kv/gate in the rings, softmax-pool
  the open window per channel (online, over slot chunks), RMSNorm, rotate the row at the
  window's first position, write it at positions // ratio. Two launches: the pool, program per
  channel block; the norm, rope and write, one program (the norm needs the whole row).
- `compress_chunk`: `Compressor._pool`, a prefill chunk's complete windows pooled (the same
  online softmax), program per (window, channel block).
- `rms_rope`: `unit_rms` or `RMSNorm` then `InterleavedRope.rotate` (optional each), program per
  row of [T, H, D]; cos/sin of the position computed on the device (graph-capturable).
- `hc_pre`: `HyperConnection.forward` after its GEMV (whose input is left unnormalised: the
  stream RMS scales the [T, (2+N)N] result instead) + the block's input RMSNorm: rms, the mix
  (as kernels/triton/mhc.py), the pre-weighted collapse and its norm, program per token.
- `hc_merge`: `HyperConnection.merge`, program per (token, D block).
- `attention_step`: `V4Attention._sequence`'s torch path for the fixed step (mask of the window
  ring's slots, the compressed rows: all complete ones or the indexer's picks gathered in the
  kernel, scores, softmax with the per-head sinks, weighted sum), flash-decoding: program per
  (16 heads, split of the keys), a second launch merging the splits' partials with the sinks.
  The output's inverse rope stays `rms_rope` (sign -1).
- `attention_chunk`: the same attention for a prefill chunk (`V4Attention._attend` over the torch
  path's mask): program per (query, 16 heads, 256 output channels), each query over its window's
  keys and its compressed rows or picks only (the torch code scores every key of the chunk).
- `index_scores`: `Indexer.select`'s scores for one query: sum_h w_h relu(q_h . row) * scale
  per compressed row, -inf for rows the query may not read yet (index >= (p + 1) // ratio);
  program per block of rows, the heads in blocks of 16 on the tensor cores. The top-k stays torch.

Channels are handled as (even, odd) halves so a rope pair (2i, 2i+1) sits in one lane. Compiled
without fp fusion so x * cos and x * sin round apart, as in torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .pdl import wait_for_inputs


@triton.jit
def _norm_rope(xe, xo, j, w_ptr, inv_ptr, pos_f, scale, sign, eps, D: tl.constexpr, ROT: tl.constexpr,
               NORM: tl.constexpr):
    """Even/odd channel halves [BH] (pair j) -> normed (NORM 1: unit, 2: weighted) and rotated."""
    HALF: tl.constexpr = D // 2
    mj = j < HALF
    if NORM > 0:
        r = tl.rsqrt(tl.sum(xe * xe + xo * xo, axis=0) / D + eps)
        xe = xe * r
        xo = xo * r
        if NORM == 2:
            xe = xe * tl.load(w_ptr + 2 * j, mask=mj, other=0.0).to(tl.float32)
            xo = xo * tl.load(w_ptr + 2 * j + 1, mask=mj, other=0.0).to(tl.float32)
    if ROT > 0:
        jr = j - (HALF - ROT // 2)
        rot = mj & (jr >= 0)
        f = pos_f * tl.load(inv_ptr + jr, mask=rot, other=0.0)
        c = tl.cos(f) * scale
        s = tl.sin(f) * scale * sign
        ye = xe * c - xo * s
        yo = xo * c + xe * s
        xe = tl.where(rot, ye, xe)
        xo = tl.where(rot, yo, xo)
    return xe, xo


@triton.jit
def _pool_start(BC: tl.constexpr):
    """The online softmax-pool's state for BC channels: max -inf, sums 0 (`_pool_slots`)."""
    return tl.full((BC,), float("-inf"), tl.float32), tl.zeros((BC,), tl.float32), tl.zeros((BC,), tl.float32)


@triton.jit
def _pool_slots(m, l, a, k, g, gone):
    """One chunk of slots [BR, BC] into the online softmax-pool per channel: running max m, sum
    of exp l, weighted sum a (slots `gone` take no part)."""
    k = tl.where(gone, 0.0, k)
    g = tl.where(gone, float("-inf"), g)
    n = tl.maximum(m, tl.max(g, axis=0))
    z = tl.where(n == float("-inf"), 0.0, n)  # all -inf so far: no NaN from -inf - -inf
    p = tl.exp(g - z[None, :])
    f = tl.exp(m - z)
    return n, l * f + tl.sum(p, axis=0), a * f + tl.sum(p * k, axis=0)


@triton.jit
def _compress_pool_kernel(kv_ring, gate_ring, kv_x, gate_x, pos_ptr, bias_ptr, pooled_ptr, size, W,
                          R: tl.constexpr, OVERLAP: tl.constexpr, D: tl.constexpr, BR: tl.constexpr,
                          BC: tl.constexpr, PDL: tl.constexpr):
    """Program per BC channels of the row: the token's kv/gate columns of them into its ring slot,
    then the per-channel softmax-pool over the open window's slots (online, BR slots a chunk) ->
    pooled [D] fp32. Channels are independent here; only the norm needs the whole row."""
    wait_for_inputs(PDL)
    pos = tl.load(pos_ptr)
    slot = pos % size
    base = pos // R * R
    c = tl.program_id(0) * BC + tl.arange(0, BC)
    mc = c < D
    for ser in tl.static_range(0, 2 if OVERLAP else 1):  # the token's own slot is read from kv_x below
        dst = slot * W + ser * D + c
        tl.store(kv_ring + dst, tl.load(kv_x + ser * D + c, mask=mc).to(kv_ring.dtype.element_ty), mask=mc)
        tl.store(gate_ring + dst, tl.load(gate_x + ser * D + c, mask=mc).to(gate_ring.dtype.element_ty), mask=mc)
    NS: tl.constexpr = 2 * R if OVERLAP else R
    m, l, a = _pool_start(BC)
    for s0 in range(0, NS, BR):
        s = s0 + tl.arange(0, BR)
        ms = s < NS
        if OVERLAP:  # slots 0..R-1: the previous window's first series; R..2R-1: this one's second
            first = s < R
            ring = (base - R + s + size) % size  # C remainder: keep it non-negative
            col = tl.where(first, 0, D)
            absent = first & (pos < R)  # window 0 has no previous one
        else:
            ring = (base + s) % size
            col = tl.zeros((BR,), tl.int32)
            absent = s < 0
        ring = tl.where(ms, ring, 0)
        cc = col[:, None] + c[None, :]
        m2 = ms[:, None] & mc[None, :]
        own = (ring == slot)[:, None]
        at = ring[:, None] * W + cc
        k = tl.load(kv_ring + at, mask=m2 & ~own, other=0.0).to(tl.float32)
        g = tl.load(gate_ring + at, mask=m2 & ~own, other=0.0).to(tl.float32)
        # the token's own slot from kv_x/gate_x (rounded to the ring's dtype, as stored)
        k += tl.load(kv_x + cc, mask=m2 & own, other=0.0).to(kv_ring.dtype.element_ty).to(tl.float32)
        g += tl.load(gate_x + cc, mask=m2 & own, other=0.0).to(gate_ring.dtype.element_ty).to(tl.float32)
        g += tl.load(bias_ptr + (s % R)[:, None] * W + cc, mask=m2, other=0.0)
        m, l, a = _pool_slots(m, l, a, k, g, absent[:, None] | ~m2)
    tl.store(pooled_ptr + c, a / l, mask=mc)


@triton.jit
def _compress_chunk_kernel(kv_ptr, gate_ptr, pkv_ptr, pgate_ptr, bias_ptr, pooled_ptr, W, R: tl.constexpr,
                           OVERLAP: tl.constexpr, PRIOR: tl.constexpr, D: tl.constexpr, BR: tl.constexpr,
                           BC: tl.constexpr, PDL: tl.constexpr):
    """Program (window w, BC channels): a prefill's softmax-pool of complete window w of the
    chunk's kv/gate rows [n * R, W] -> pooled [n, D] fp32, online over BR slots a chunk. With
    OVERLAP, slots 0..R-1 are the previous window's first series: window w - 1's rows, or for
    w = 0 the prior window's rows [R, W] (PRIOR) or none; slots R..2R-1 this window's second."""
    wait_for_inputs(PDL)
    w = tl.program_id(0)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    mc = c < D
    NS: tl.constexpr = 2 * R if OVERLAP else R
    m, l, a = _pool_start(BC)
    for s0 in range(0, NS, BR):
        s = s0 + tl.arange(0, BR)
        ms = s < NS
        if OVERLAP:
            first = s < R
            row = tl.where(first, (w - 1) * R + s, w * R + s - R)
            col = tl.where(first, 0, D)
            before = first & (w == 0)  # window 0's previous one: the prior rows, if any
            if PRIOR:
                absent = s < 0
            else:
                absent = before
        else:
            row = w * R + s
            col = tl.zeros((BR,), tl.int32)
            before = s < 0
            absent = before
        row = tl.where(ms & ~before, row, 0)
        cc = col[:, None] + c[None, :]
        m2 = ms[:, None] & mc[None, :]
        b2 = before[:, None]
        k = tl.load(kv_ptr + row[:, None] * W + cc, mask=m2 & ~b2, other=0.0).to(tl.float32)
        g = tl.load(gate_ptr + row[:, None] * W + cc, mask=m2 & ~b2, other=0.0).to(tl.float32)
        if PRIOR:
            at = (s % R)[:, None] * W + cc
            k += tl.load(pkv_ptr + at, mask=m2 & b2, other=0.0).to(tl.float32)
            g += tl.load(pgate_ptr + at, mask=m2 & b2, other=0.0).to(tl.float32)
        g += tl.load(bias_ptr + (s % R)[:, None] * W + cc, mask=m2, other=0.0)
        m, l, a = _pool_slots(m, l, a, k, g, absent[:, None] | ~m2)
    tl.store(pooled_ptr + w * D + c, a / l, mask=mc)


def compress_chunk(kv: torch.Tensor, gate: torch.Tensor, prior, bias: torch.Tensor, ratio: int, overlap: bool,
                   dim: int) -> torch.Tensor:
    """A prefill's compressor pool (`Compressor._pool`): the chunk's complete windows kv, gate
    [n * ratio, W] (W = (1+overlap) * dim), prior = (kv, gate) [ratio, W] of the window before
    them or None, bias [ratio, W] fp32 -> pooled [n, dim] fp32, one launch (the torch code: ~15)."""
    W, n = kv.shape[1], kv.shape[0] // ratio
    if W != (2 if overlap else 1) * dim or kv.shape[0] % ratio or bias.shape != (ratio, W):
        raise ValueError(f"compress_chunk: kv {tuple(kv.shape)}, bias {tuple(bias.shape)}, ratio {ratio}, dim {dim}")
    ns = triton.next_power_of_2((2 if overlap else 1) * ratio)
    BC = min(triton.next_power_of_2(dim), max(32 // kv.element_size(), min(64, 1024 // ns)))
    BR = min(ns, max(1, 2048 // BC))
    pooled = torch.empty((n, dim), dtype=torch.float32, device=kv.device)
    pkv, pgate = prior if prior is not None else (kv, gate)
    if n:
        _compress_chunk_kernel[(n, triton.cdiv(dim, BC))](
            kv.contiguous(), gate.contiguous(), pkv.contiguous(), pgate.contiguous(), bias.contiguous(), pooled, W,
            R=ratio, OVERLAP=bool(overlap), PRIOR=prior is not None, D=dim, BR=BR, BC=BC, num_warps=4,
            **pdl.launch(kv.device))
    return pooled


@triton.jit
def _compress_row_kernel(pooled_ptr, pos_ptr, w_ptr, inv_ptr, rows_ptr, eps, scale, R: tl.constexpr,
                         D: tl.constexpr, ROT: tl.constexpr, BH: tl.constexpr, PDL: tl.constexpr):
    """One program: RMSNorm of the pooled row, rope at the window's first position, written at
    positions // R."""
    wait_for_inputs(PDL)
    pos = tl.load(pos_ptr)
    j = tl.arange(0, BH)
    mj = j < D // 2
    xe = tl.load(pooled_ptr + 2 * j, mask=mj, other=0.0)
    xo = tl.load(pooled_ptr + 2 * j + 1, mask=mj, other=0.0)
    xe, xo = _norm_rope(xe, xo, j, w_ptr, inv_ptr, (pos // R * R).to(tl.float32), scale, 1.0, eps, D, ROT, 2)
    dst = rows_ptr + (pos // R).to(tl.int64) * D
    ty = rows_ptr.dtype.element_ty
    tl.store(dst + 2 * j, xe.to(ty), mask=mj)
    tl.store(dst + 2 * j + 1, xo.to(ty), mask=mj)


def compress_step(kv_ring, gate_ring, kv_x, gate_x, positions, bias, rows, norm_w, eps, inv_freq, rope_scale,
                  ratio: int, overlap: bool) -> None:
    """The fixed step's compressor for one token: rings [size, W] and rows [capacity, D] updated
    in place. kv_x, gate_x [1, W] (W = (1+overlap) * D), positions [1] on the device, bias [ratio, W]
    fp32, norm_w [D], inv_freq [rot/2] fp32 (the trailing rot channels rotate).
    Two launches: the pool, program per BC channels (so the kv ring, gate ring and bias reads,
    3 x (1+overlap) * ratio x D values, spread over D / BC programs, each the whole window in one
    tile of <= 2048 values), then one program for the norm, rope and the row's write. V4-Flash:
    ratio 128, D 512: 64 programs of 8 channels x 128 slots (bf16 rings: 32 of 16); ratio 4 with
    overlap, D 512: 8 programs of 64 x 8 slots; the indexer's (D 128): 2.
    The former single program put all of it on one SM: at ratio 128 (768 KB of fp32 ring and
    bias), 8 serial chunks of 16 slots x 256 channel pairs, each ~1860 SASS instructions a warp
    (384 of them shuffles: the slot axis it reduces sat across lanes), 8 warps.

    Compiled for sm_90 (ptxas; not run on a GPU yet), 4 warps: the pool 56 registers at ratio 128
    (fp32 rings; 96 bf16), 40 at ratio 4, no spills; the row 30-31 registers."""
    D, W, rot = rows.shape[1], kv_ring.shape[1], 2 * inv_freq.shape[0]
    if W != (2 if overlap else 1) * D or D % 2 or rot > D or bias.shape != (ratio, W):
        raise ValueError(f"compress_step: W {W}, D {D}, rot {rot}, bias {tuple(bias.shape)}, ratio {ratio}")
    ns = triton.next_power_of_2((2 if overlap else 1) * ratio)
    # >= 32 bytes of each ring row per program (one sector); many programs where the window is long
    BC = min(triton.next_power_of_2(D), max(32 // kv_ring.element_size(), min(64, 1024 // ns)))
    BR = min(ns, max(1, 2048 // BC))
    pooled = torch.empty(D, dtype=torch.float32, device=rows.device)
    _compress_pool_kernel[(triton.cdiv(D, BC),)](kv_ring, gate_ring, kv_x.contiguous(), gate_x.contiguous(),
                                                 positions, bias.contiguous(), pooled, kv_ring.shape[0], W,
                                                 R=ratio, OVERLAP=bool(overlap), D=D, BR=BR, BC=BC, num_warps=4,
                                                 enable_fp_fusion=False, **pdl.launch(kv_ring.device))
    BH = triton.next_power_of_2(D // 2)
    _compress_row_kernel[(1,)](pooled, positions, norm_w.contiguous(), inv_freq.contiguous(), rows, float(eps),
                               float(rope_scale), R=ratio, D=D, ROT=rot, BH=BH, num_warps=max(1, min(4, BH // 128)),
                               enable_fp_fusion=False, **pdl.launch(pooled.device))


@triton.jit
def _rms_rope_kernel(x_ptr, y_ptr, pos_ptr, w_ptr, inv_ptr, H, s_t, s_h, eps, scale, sign,
                     D: tl.constexpr, ROT: tl.constexpr, NORM: tl.constexpr, BH: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    row = tl.program_id(0)
    t = row // H
    src = x_ptr + t.to(tl.int64) * s_t + (row % H) * s_h
    j = tl.arange(0, BH)
    mj = j < D // 2
    xe = tl.load(src + 2 * j, mask=mj, other=0.0).to(tl.float32)
    xo = tl.load(src + 2 * j + 1, mask=mj, other=0.0).to(tl.float32)
    pos_f = tl.load(pos_ptr + t).to(tl.float32)
    xe, xo = _norm_rope(xe, xo, j, w_ptr, inv_ptr, pos_f, scale, sign, eps, D, ROT, NORM)
    dst = y_ptr + row.to(tl.int64) * D
    ty = y_ptr.dtype.element_ty
    tl.store(dst + 2 * j, xe.to(ty), mask=mj)
    tl.store(dst + 2 * j + 1, xo.to(ty), mask=mj)


def rms_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor | None, rope_scale: float = 1.0,
             sign: float = 1.0, norm: str | None = None, weight: torch.Tensor | None = None,
             eps: float = 0.0) -> torch.Tensor:
    """x [T, D] or [T, H, D] (last dim contiguous) -> new contiguous tensor in x's dtype: norm
    (None, "unit", "weighted" with weight [D]) then the trailing 2 * len(inv_freq) channels rotated
    in pairs by positions[t] * inv_freq (sin times sign: -1 undoes a rotation)."""
    shape = x.shape
    x3 = x if x.dim() == 3 else x[:, None]
    T, H, D = x3.shape
    rot = 0 if inv_freq is None else 2 * inv_freq.shape[0]
    if D % 2 or rot > D or x3.stride(-1) != 1:
        raise ValueError(f"rms_rope: D {D}, rot {rot}, stride {x3.stride(-1)}")
    y = torch.empty(shape, dtype=x.dtype, device=x.device)
    if T * H:
        mode = {None: 0, "unit": 1, "weighted": 2}[norm]
        _rms_rope_kernel[(T * H,)](x3, y, positions, weight if weight is not None else x3,
                                   inv_freq if inv_freq is not None else x3, H, x3.stride(0), x3.stride(1),
                                   float(eps), float(rope_scale), float(sign), D=D, ROT=rot, NORM=mode,
                                   BH=triton.next_power_of_2(D // 2), num_warps=max(1, min(4, D // 256)),
                                   enable_fp_fusion=False, **pdl.launch(x3.device))
    return y


@triton.jit
def _hc_pre_kernel(m_ptr, st_ptr, b_ptr, s_ptr, w_ptr, post_ptr, comb_ptr, y_ptr, N, D, s_m, iters,
                   hc_eps, rms_eps, norm_eps, BN: tl.constexpr, BD: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BN)
    mi = i < N
    d = tl.arange(0, BD)
    st = st_ptr + t * N * D
    acc = tl.zeros((BN, BD), tl.float32)
    for d0 in range(0, D, BD):
        md = mi[:, None] & (d0 + d < D)[None, :]
        x = tl.load(st + i[:, None] * D + d0 + d[None, :], mask=md, other=0.0).to(tl.float32)
        acc += x * x
    r = tl.rsqrt(tl.sum(tl.sum(acc, axis=1), axis=0) / (N * D) + rms_eps)
    m = m_ptr + t * s_m
    s0, s1, s2 = tl.load(s_ptr), tl.load(s_ptr + 1), tl.load(s_ptr + 2)
    pre = tl.sigmoid(tl.load(m + i, mask=mi, other=0.0) * r * s0 + tl.load(b_ptr + i, mask=mi, other=0.0)) + hc_eps
    post = 2 * tl.sigmoid(tl.load(m + N + i, mask=mi, other=0.0) * r * s1
                          + tl.load(b_ptr + N + i, mask=mi, other=0.0))
    tl.store(post_ptr + t * N + i, post, mask=mi)
    jj = tl.arange(0, BN)
    ij = i[:, None] * N + jj[None, :]
    mij = mi[:, None] & (jj[None, :] < N)
    c = tl.load(m + 2 * N + ij, mask=mij, other=0.0) * r * s2 + tl.load(b_ptr + 2 * N + ij, mask=mij, other=0.0)
    c = tl.where(mij, c, float("-inf"))
    c = tl.exp(c - tl.where(mi, tl.max(c, axis=1), 0.0)[:, None])
    c = tl.where(mij, c / tl.where(mi, tl.sum(c, axis=1), 1.0)[:, None] + hc_eps, 0.0)
    c = c / (tl.sum(c, axis=0)[None, :] + hc_eps)
    for _ in range(iters - 1):
        c = c / (tl.sum(c, axis=1)[:, None] + hc_eps)
        c = c / (tl.sum(c, axis=0)[None, :] + hc_eps)
    tl.store(comb_ptr + t * N * N + ij, c, mask=mij)
    # collapse: x = sum_n pre_n streams_n, then y = x * rsqrt(mean(x^2) + eps) * w (x recomputed)
    pre = tl.where(mi, pre, 0.0)
    sq = tl.zeros((BD,), tl.float32)
    for d0 in range(0, D, BD):
        md = mi[:, None] & (d0 + d < D)[None, :]
        s = tl.load(st + i[:, None] * D + d0 + d[None, :], mask=md, other=0.0)
        x = tl.sum(pre[:, None] * s.to(tl.float32), axis=0).to(s.dtype).to(tl.float32)
        sq += x * x
    rn = tl.rsqrt(tl.sum(sq, axis=0) / D + norm_eps)
    for d0 in range(0, D, BD):
        md = mi[:, None] & (d0 + d < D)[None, :]
        s = tl.load(st + i[:, None] * D + d0 + d[None, :], mask=md, other=0.0)
        x = tl.sum(pre[:, None] * s.to(tl.float32), axis=0).to(s.dtype).to(tl.float32)
        w = tl.load(w_ptr + d0 + d, mask=d0 + d < D, other=0.0).to(tl.float32)
        tl.store(y_ptr + t * D + d0 + d, (x * rn * w).to(y_ptr.dtype.element_ty), mask=d0 + d < D)


def hc_pre(mixes: torch.Tensor, streams: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, norm_w: torch.Tensor,
           iters: int, hc_eps: float, rms_eps: float, norm_eps: float):
    """mixes [T, (2+N)N] fp32 = fn applied to the unnormalised streams [T, N, D] -> post [T, N],
    comb [T, N, N] (fp32) and the block input RMSNorm(collapse) [T, D] in the streams' dtype."""
    T, N, D = streams.shape
    st = streams.contiguous()
    mixes = mixes if mixes.stride(-1) == 1 else mixes.contiguous()
    post = torch.empty((T, N), dtype=torch.float32, device=streams.device)
    comb = torch.empty((T, N, N), dtype=torch.float32, device=streams.device)
    y = torch.empty((T, D), dtype=streams.dtype, device=streams.device)
    if T:
        BD = min(triton.next_power_of_2(D), 4096)  # flash (D = 4096): each pass one iteration, not 4
        _hc_pre_kernel[(T,)](mixes, st, base.contiguous(), scale.contiguous(), norm_w.contiguous(), post, comb, y,
                             N, D, mixes.stride(0), max(int(iters), 1), float(hc_eps), float(rms_eps),
                             float(norm_eps), BN=triton.next_power_of_2(N), BD=BD,
                             num_warps=8 if BD * N >= 8192 else 4, **pdl.launch(st.device))
    return post, comb, y


@triton.jit
def _hc_merge_kernel(st_ptr, out_ptr, post_ptr, comb_ptr, y_ptr, N, D, BN: tl.constexpr, BD: tl.constexpr,
                     PDL: tl.constexpr):
    wait_for_inputs(PDL)
    t = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    md = d < D
    j = tl.arange(0, BN)
    mj = j < N
    s = tl.load(st_ptr + t * N * D + j[:, None] * D + d[None, :], mask=mj[:, None] & md[None, :], other=0.0)
    ty = s.dtype
    o = tl.load(out_ptr + t * D + d, mask=md, other=0.0).to(ty)
    for k in range(0, N):
        ck = tl.load(comb_ptr + t * N * N + j * N + k, mask=mj, other=0.0).to(ty)  # comb[j, k]
        pk = tl.load(post_ptr + t * N + k).to(ty)
        y = pk * o + tl.sum(ck[:, None] * s, axis=0)
        tl.store(y_ptr + t * N * D + k * D + d, y, mask=md)


def hc_merge(streams: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """new [T, N, D] = post[..., None] * out[:, None] + comb^T @ streams, in the streams' dtype."""
    T, N, D = streams.shape
    st, out = streams.contiguous(), out.contiguous()
    y = torch.empty_like(st)
    if T:
        BD = min(triton.next_power_of_2(D), 512)
        _hc_merge_kernel[(T, triton.cdiv(D, BD))](st, out, post.contiguous(), comb.contiguous(), y, N, D,
                                                  BN=triton.next_power_of_2(N), BD=BD, num_warps=4,
                                                  **pdl.launch(st.device))
    return y


@triton.jit
def _dot(a, b, F32_DOT: tl.constexpr):
    """a @ b with a rounded to b's dtype (b: keys or values, already in q's dtype). fp32 operands
    take 3xTF32 (fp32-level accuracy on the tensor cores)."""
    a = a.to(b.dtype)
    if F32_DOT:  # the interpreter's bf16 x bf16 dot is wrong: same rounded operands, fp32 product
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if b.dtype == tl.float32:
        return tl.dot(a, b, input_precision="tf32x3")
    return tl.dot(a, b)


@triton.jit
def _attend_tile(q_ptr, h, qk_scale, base, rows, ok, m_i, l_i, acc, d0, H, D: tl.constexpr, BH: tl.constexpr,
                 BN: tl.constexpr, BD: tl.constexpr, BDO: tl.constexpr, F32_DOT: tl.constexpr):
    """One online-softmax step of heads h [BH] over the K=V rows [BN] of base (ok: which count):
    scores over all D channels in BD chunks (q re-read per chunk: L1 hits, few registers), then
    P @ V for the output channels d0..d0+BDO-1 (the rows read again, from L1/L2). Keys are cast to
    q's dtype, as the torch code does; scores in log2 units. Returns the updated (m_i, l_i, acc)."""
    r64 = rows.to(tl.int64)
    s = tl.zeros((BH, BN), tl.float32)
    NC: tl.constexpr = (D + BD - 1) // BD
    for c in tl.static_range(0, NC):
        dc = c * BD + tl.arange(0, BD)
        qc = tl.load(q_ptr + h[:, None] * D + dc[None, :], mask=(h < H)[:, None] & (dc < D)[None, :], other=0.0)
        kt = tl.load(base + r64[None, :] * D + dc[:, None], mask=(dc < D)[:, None] & ok[None, :], other=0.0)
        s += _dot(qc, kt.to(qc.dtype), F32_DOT)  # [BH, BN]
    s = tl.where(ok[None, :], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing valid yet: no -inf - -inf
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    do = d0 + tl.arange(0, BDO)
    v = tl.load(base + r64[:, None] * D + do[None, :], mask=ok[:, None] & (do < D)[None, :], other=0.0)
    v = v.to(q_ptr.dtype.element_ty)
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + _dot(p, v, F32_DOT)


@triton.jit
def _attention_step_kernel(q_ptr, ring_ptr, rows_ptr, top_ptr, sink_ptr, pos_ptr, out_ptr, part_ptr, ml_ptr,
                           H, size, n_rows, n_top, window, ratio, qk_scale, ring_tiles, n_tiles, per_split,
                           D: tl.constexpr, BH: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                           BDO: tl.constexpr, MODE: tl.constexpr, SPLIT: tl.constexpr, DEVICE_BOUND: tl.constexpr,
                           F32_DOT: tl.constexpr, PDL: tl.constexpr):
    """Program per (block of BH query heads, split, block of BDO output channels). The keys are
    BN-row tiles: ring_tiles of the window ring, then MODE 1: the compressed rows (those complete
    count), 2: the picked rows top[0..n_top-1] (-1: none). Split s takes tiles s, s + splits, ...
    (strided: however many rows are complete, their tiles spread evenly over the splits), and on
    the GPU stops after the last tile with a key (MODE 1: the last complete row's; a device-side
    loop bound, not an `if` in the loop, which stops the loads' cp.async pipelining). SPLIT:
    write the partial (max, sum, unnormalised acc) to ml/part for _attention_combine_kernel, else
    the output."""
    wait_for_inputs(PDL)
    h = tl.program_id(0) * BH + tl.arange(0, BH)
    split, splits = tl.program_id(1), tl.num_programs(1)
    d0 = tl.program_id(2) * BDO
    pos = tl.load(pos_ptr).to(tl.int32)
    ready = tl.minimum((pos + 1) // ratio, n_rows)  # MODE 1: rows whose window the query has seen to its end
    m_i = tl.full([BH], float("-inf"), tl.float32)
    l_i = tl.zeros([BH], tl.float32)
    acc = tl.zeros([BH, BDO], tl.float32)
    if DEVICE_BOUND:  # stop after the last tile with a key (MODE 1: the last complete row's)
        live = n_tiles
        if MODE == 1:
            live = ring_tiles + tl.cdiv(ready, BN)
        n_iter = tl.cdiv(tl.maximum(live - split, 0), splits)
    else:  # the interpreter cannot loop to a device-side bound: every tile of the split, idle ones masked
        n_iter = per_split
    for i in range(0, n_iter):
        t = split + i * splits
        in_ring = t < ring_tiles
        k = (t - tl.where(in_ring, 0, ring_tiles)) * BN + tl.arange(0, BN)
        # ring slot k holds the latest position = k (mod size), if any
        key_pos = pos - ((pos - k) % size + size) % size  # C remainder: keep it non-negative
        ok = in_ring & (k < size) & (key_pos >= 0) & (key_pos > pos - window)
        row = k
        if MODE == 1:
            ok = ok | (~in_ring & (k < ready))
        if MODE == 2:
            idx = tl.load(top_ptr + k, mask=~in_ring & (k < n_top), other=-1)
            pick = (idx >= 0) & (idx < n_rows)
            ok = ok | pick
            row = tl.where(in_ring, k, tl.where(pick, idx, 0))
        ok = ok & (t < n_tiles)
        m_i, l_i, acc = _attend_tile(q_ptr, h, qk_scale, tl.where(in_ring, ring_ptr, rows_ptr), row, ok, m_i, l_i,
                                     acc, d0, H, D, BH, BN, BD, BDO, F32_DOT)
    do = d0 + tl.arange(0, BDO)
    mh = h < H
    if SPLIT:
        tl.store(ml_ptr + split * H + h, m_i, mask=mh)
        tl.store(ml_ptr + (splits + split) * H + h, l_i, mask=mh)
        tl.store(part_ptr + (split * H + h[:, None]) * D + do[None, :], acc, mask=mh[:, None] & (do < D)[None, :])
    else:
        # the sink joins the softmax's denominator only (rounded to q's dtype, as the torch code does)
        sink = tl.load(sink_ptr + h, mask=mh, other=0.0).to(q_ptr.dtype.element_ty).to(tl.float32)
        sink = sink * 1.4426950408889634
        m_f = tl.maximum(m_i, sink)
        alpha = tl.exp2(m_i - m_f)
        o = acc * (alpha / (l_i * alpha + tl.exp2(sink - m_f)))[:, None]
        tl.store(out_ptr + h[:, None] * D + do[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=mh[:, None] & (do < D)[None, :])


@triton.jit(do_not_specialize=["n_keys", "T", "n_rows", "n_top"])  # lengths: one compile for every depth
def _attention_chunk_kernel(q_ptr, keys_ptr, rows_ptr, top_ptr, sink_ptr, pos_ptr, out_ptr, H, n_keys, T, n_rows,
                            n_top, window, ratio, qk_scale, D: tl.constexpr, BH: tl.constexpr, BN: tl.constexpr,
                            BD: tl.constexpr, BDO: tl.constexpr, MODE: tl.constexpr, WIN_TILES: tl.constexpr,
                            ROW_TILES: tl.constexpr, DEVICE_BOUND: tl.constexpr, F32_DOT: tl.constexpr,
                            PDL: tl.constexpr):
    """Program per (query t of a prefill chunk, block of BH heads, block of BDO output channels): the
    query's window keys, a contiguous range of keys [n_keys, D] (positions in order, the chunk's T
    rows last), then MODE 1: the compressed rows [n_rows, D] it has seen complete (a prefix), 2:
    its picks top[t, :n_top] (-1: none); the head's sink in the denominator. `_attend_tile` steps,
    as the decode step's kernel: scores over all D channels, P @ V for this program's channels."""
    wait_for_inputs(PDL)
    t = tl.program_id(0)
    h = tl.program_id(1) * BH + tl.arange(0, BH)
    d0 = tl.program_id(2) * BDO
    pos = tl.load(pos_ptr + t).to(tl.int32)
    first = tl.load(pos_ptr).to(tl.int32) - (n_keys - T)  # the position of keys[0]
    hi = pos - first + 1  # the query's keys: [lo, hi), its own row last
    lo = tl.maximum(hi - window, 0)
    qt = q_ptr + t.to(tl.int64) * H * D
    m_i = tl.full([BH], float("-inf"), tl.float32)
    l_i = tl.zeros([BH], tl.float32)
    acc = tl.zeros([BH, BDO], tl.float32)
    n_win = tl.cdiv(hi - lo, BN) if DEVICE_BOUND else WIN_TILES
    for i in range(0, n_win):
        k = lo + i * BN + tl.arange(0, BN)
        m_i, l_i, acc = _attend_tile(qt, h, qk_scale, keys_ptr, k, k < hi, m_i, l_i, acc, d0, H, D, BH, BN, BD, BDO,
                                     F32_DOT)
    if MODE == 1:
        ready = tl.minimum((pos + 1) // ratio, n_rows)  # rows whose window the query has seen to its end
        n_row_tiles = tl.cdiv(ready, BN) if DEVICE_BOUND else ROW_TILES
        for i in range(0, n_row_tiles):
            k = i * BN + tl.arange(0, BN)
            m_i, l_i, acc = _attend_tile(qt, h, qk_scale, rows_ptr, k, k < ready, m_i, l_i, acc, d0, H, D, BH, BN, BD,
                                         BDO, F32_DOT)
    if MODE == 2:
        n_pick_tiles = tl.cdiv(n_top, BN) if DEVICE_BOUND else ROW_TILES
        for i in range(0, n_pick_tiles):
            j = i * BN + tl.arange(0, BN)
            idx = tl.load(top_ptr + t.to(tl.int64) * n_top + j, mask=j < n_top, other=-1)
            pick = (idx >= 0) & (idx < n_rows)
            m_i, l_i, acc = _attend_tile(qt, h, qk_scale, rows_ptr, tl.where(pick, idx, 0), pick, m_i, l_i, acc, d0,
                                         H, D, BH, BN, BD, BDO, F32_DOT)
    do = d0 + tl.arange(0, BDO)
    mh = h < H
    sink = tl.load(sink_ptr + h, mask=mh, other=0.0).to(q_ptr.dtype.element_ty).to(tl.float32) * 1.4426950408889634
    m_f = tl.maximum(m_i, sink)
    alpha = tl.exp2(m_i - m_f)
    o = acc * (alpha / (l_i * alpha + tl.exp2(sink - m_f)))[:, None]
    tl.store(out_ptr + (t.to(tl.int64) * H + h[:, None]) * D + do[None, :], o.to(out_ptr.dtype.element_ty),
             mask=mh[:, None] & (do < D)[None, :])


@triton.jit
def _attention_combine_kernel(part_ptr, ml_ptr, sink_ptr, out_ptr, H, splits, D: tl.constexpr, BS: tl.constexpr,
                              BDC: tl.constexpr, PDL: tl.constexpr):
    """Program per (head, BDC output channels): the splits' partials merged, the head's sink in
    the denominator only (rounded to the output's = q's dtype, as the torch code does)."""
    wait_for_inputs(PDL)
    h = tl.program_id(0)
    d = tl.program_id(1) * BDC + tl.arange(0, BDC)
    s = tl.arange(0, BS)
    ms = s < splits
    m = tl.load(ml_ptr + s * H + h, mask=ms, other=float("-inf"))
    l = tl.load(ml_ptr + (splits + s) * H + h, mask=ms, other=0.0)
    sink = tl.load(sink_ptr + h).to(out_ptr.dtype.element_ty).to(tl.float32) * 1.4426950408889634
    m_f = tl.maximum(tl.max(m, axis=0), sink)
    w = tl.exp2(m - m_f)
    den = tl.sum(l * w, axis=0) + tl.exp2(sink - m_f)
    seen = ms & (m > float("-inf"))  # a split with no key: weight 0, its acc not read
    acc = tl.load(part_ptr + (s[:, None] * H + h) * D + d[None, :], mask=seen[:, None] & (d < D)[None, :], other=0.0)
    o = tl.sum(acc * w[:, None], axis=0) / den
    tl.store(out_ptr + h * D + d, o.to(out_ptr.dtype.element_ty), mask=d < D)


def attention_step(q: torch.Tensor, ring: torch.Tensor, positions: torch.Tensor, window: int, sinks: torch.Tensor,
                   scale: float, rows: torch.Tensor | None = None, ratio: int = 0, top: torch.Tensor | None = None,
                   block_n: int = 16, block_d: int = 64, block_out: int = 512, num_warps: int = 8,
                   num_stages: int = 2, programs: int = 128, splits: int | None = None) -> torch.Tensor:
    """The fixed step's attention of one token: q [1, H, D] over the K=V ring [size, D] (the token's
    row already written at positions % size; slot s holds position p - (p - s) % size, valid if >= 0
    and within the window), plus the compressed rows [n, D]: with top None every complete one
    (index < (p + 1) // ratio), else the picks top [1, k] (-1: none). Each head's sink [H] (fp32)
    joins the softmax. positions [1] is read on the device only (graph-capturable: the split
    count comes from the shapes). Returns [1, H, D] in q's dtype.
    Flash-decoding: programs (H / 16) x splits x (D / block_out). The key tiles (block_n rows;
    their count from the shapes: ring slots, row buffer or picks) are dealt to at most
    programs / (H / 16) splits, as few as keep the tiles a split that low; a second launch,
    program per (head, 128 channels), merges the partials and adds the sink. With 2 tiles or
    fewer one launch writes the output (no partials: the merge's launch would cost more).
    V4-Flash, 64 heads of 512: 4 head blocks x <= 32 splits; HCA at 16k, 8 ring tiles + 8-16 of
    the row buffer (8 of them complete): 16-24 splits of 1 tile; CSA, 8 + 32 tiles of picks: 20
    splits of 2. Each program scores its keys once over all D channels (block_d chunks, q and
    keys re-read from L1/L2) and keeps all D output channels (block_out 512): 1 program a head
    block per key range instead of 4, each re-scoring every key.

    Compiled for sm_90 (ptxas; not run on a GPU yet), D 512, block_n 16, block_d 64, 8 warps,
    2 stages: fp32 q and cache 228-255 registers, no spills, 130 KB shared (cp.async stages);
    bf16 150-255, no spills, 33 KB; fp32 q with a bf16 cache spills 32-60 bytes (80 KB). The
    merge: 80 registers, no shared memory. Rejected: block_n 32 (fp32: 628 bytes of spills,
    196 KB), 4 warps (320), block_d 128 (fp32 q: 16-24, bf16 CSA: 48)."""
    T, H, D = q.shape
    if T != 1 or ring.shape[1] != D or sinks.shape != (H,) or (rows is not None and rows.shape[1] != D):
        raise ValueError(f"attention_step: q {tuple(q.shape)}, ring {tuple(ring.shape)}, sinks {tuple(sinks.shape)}")
    mode = 0 if rows is None else 1 if top is None else 2
    if mode == 1 and ratio < 1:
        raise ValueError(f"attention_step: ratio {ratio}")
    rows = ring if rows is None else rows
    top = positions if top is None else top
    BH = 16  # tl.dot needs >= 16 rows; padding heads are zeros, never stored
    BD, BDO = (min(b, triton.next_power_of_2(D)) for b in (block_d, block_out))
    blocks = (triton.cdiv(H, BH), triton.cdiv(D, BDO))
    ring_tiles = triton.cdiv(ring.shape[0], block_n)
    n_tiles = ring_tiles + (0 if mode == 0 else triton.cdiv(rows.shape[0] if mode == 1 else top.shape[-1], block_n))
    if splits is None:
        splits = 1 if n_tiles <= 2 else max(1, programs // (blocks[0] * blocks[1]))
    per_split = triton.cdiv(n_tiles, min(splits, n_tiles))
    splits = triton.cdiv(n_tiles, per_split)
    out = torch.empty((1, H, D), dtype=q.dtype, device=q.device)
    part = ml = out  # unused without splits
    if splits > 1:
        part = torch.empty((splits, H, D), dtype=torch.float32, device=q.device)
        ml = torch.empty((2, splits, H), dtype=torch.float32, device=q.device)
    interpret = q.device.type != "cuda"
    _attention_step_kernel[(blocks[0], splits, blocks[1])](
        q.contiguous(), ring, rows, top.contiguous(), sinks, positions, out, part, ml, H, ring.shape[0],
        rows.shape[0], top.shape[-1], int(window), max(int(ratio), 1), float(scale) * 1.4426950408889634,
        ring_tiles, n_tiles, per_split, D=D, BH=BH, BN=block_n, BD=BD, BDO=BDO, MODE=mode, SPLIT=splits > 1,
        DEVICE_BOUND=not interpret, F32_DOT=interpret, num_warps=num_warps, num_stages=num_stages,
        **pdl.launch(q.device))
    if splits > 1:
        BS = triton.next_power_of_2(splits)
        BDC = min(triton.next_power_of_2(D), max(16, 4096 // BS))
        _attention_combine_kernel[(H, triton.cdiv(D, BDC))](part, ml, sinks, out, H, splits, D=D, BS=BS, BDC=BDC,
                                                            num_warps=4, **pdl.launch(q.device))
    return out


def attention_chunk(q: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, window: int, sinks: torch.Tensor,
                    scale: float, rows: torch.Tensor | None = None, ratio: int = 0, top: torch.Tensor | None = None,
                    block_n: int = 32, block_d: int = 64, block_out: int = 512, num_warps: int = 8,
                    num_stages: int = 2) -> torch.Tensor:
    """A prefill chunk's attention (`V4Attention._sequence` / `_attend` for T > 1 on a state that is
    not the fixed step): q [T, H, D] at consecutive positions [T] over the K=V keys [S, D] in
    position order, the chunk's T rows last (what `CompressedKV.window` returns): each query reads
    the keys of the last `window` positions up to its own; plus the compressed rows [n, D], with
    top None every complete one (index < (p + 1) // ratio), else its picks top [T, k] (-1: none);
    each head's sink [H] (fp32) joins the softmax. Returns [T, H, D] in q's dtype. The torch code
    scored every query against all S keys and materialized fp32 scores [T, H, S] (3.3 ms of ds4's
    512-token prefill on an H100); here each program reads only its query's keys. Programs: T x
    (H / 16) x (D / block_out): by default all D = 512 output channels in one program (the
    scores formed once, not once per 256 channels), 32-key tiles, 8 warps. ds4's 512-token chunk
    (fp32 q, fp16 keys, H100, bench/v4_chunk_bench.py; 16-key tiles and 256 channels before): HCA
    layer at depth 0 1423 -> 496 us, CSA at 0 2036 -> 660, CSA with 512 picks at 4096 6958 -> 2187
    (16-key tiles on 4 warps: 460, 738, 2286). 64 heads a program needed 320-460 KB of shared memory;
    32 was slower than 16 (session 12)."""
    T, H, D = q.shape
    if keys.shape[1] != D or sinks.shape != (H,) or positions.shape != (T,) or keys.shape[0] < T or (
            rows is not None and rows.shape[1] != D) or (top is not None and top.shape[0] != T):
        raise ValueError(f"attention_chunk: q {tuple(q.shape)}, keys {tuple(keys.shape)}, sinks {tuple(sinks.shape)}")
    mode = 0 if rows is None else 1 if top is None else 2
    if mode == 1 and ratio < 1:
        raise ValueError(f"attention_chunk: ratio {ratio}")
    rows = keys if rows is None else rows
    top = positions if top is None else top.contiguous()
    n_top = top.shape[-1] if mode == 2 else 0
    BH, BD, BDO = 16, min(block_d, triton.next_power_of_2(D)), min(block_out, triton.next_power_of_2(D))
    out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    interpret = q.device.type != "cuda"
    # the interpreter's static trip counts; on the GPU the bounds come from the device (constexprs
    # that follow the row counts would compile the kernel again at each new depth: tests/test_compiles.py)
    win_tiles = triton.cdiv(min(window, keys.shape[0]), block_n) + 1 if interpret else 0
    row_tiles = triton.cdiv(rows.shape[0] if mode == 1 else n_top, block_n) if mode and interpret else 0
    _attention_chunk_kernel[(T, triton.cdiv(H, BH), triton.cdiv(D, BDO))](
        q.contiguous(), keys.contiguous(), rows.contiguous(), top, sinks, positions, out, H, keys.shape[0], T,
        rows.shape[0], n_top, int(window), max(int(ratio), 1), float(scale) * 1.4426950408889634, D=D, BH=BH,
        BN=block_n, BD=BD, BDO=BDO, MODE=mode, WIN_TILES=win_tiles, ROW_TILES=row_tiles, DEVICE_BOUND=not interpret,
        F32_DOT=interpret, num_warps=num_warps, num_stages=num_stages, **pdl.launch(q.device))
    return out


@triton.jit
def _index_scores_kernel(q_ptr, w_ptr, rows_ptr, pos_ptr, out_ptr, n, H, ratio, scale, D: tl.constexpr,
                         BH: tl.constexpr, BN: tl.constexpr, F32_DOT: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    r = tl.program_id(0) * BN + tl.arange(0, BN)
    ok = r < n
    d = tl.arange(0, D)
    kt = tl.load(rows_ptr + r.to(tl.int64)[None, :] * D + d[:, None], mask=ok[None, :], other=0.0).to(tl.float32)
    acc = tl.zeros((BN,), tl.float32)
    for h0 in range(0, H, BH):
        h = h0 + tl.arange(0, BH)
        qh = tl.load(q_ptr + h[:, None] * D + d[None, :], mask=(h < H)[:, None], other=0.0).to(tl.float32)
        s = tl.maximum(_dot(qh, kt, F32_DOT), 0.0) * scale  # [BH, BN]
        acc += tl.sum(s * tl.load(w_ptr + h, mask=h < H, other=0.0).to(tl.float32)[:, None], axis=0)
    ready = (tl.load(pos_ptr).to(tl.int32) + 1) // ratio
    tl.store(out_ptr + r, tl.where(r < ready, acc, float("-inf")), mask=ok)


def index_scores(q: torch.Tensor, w: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, ratio: int,
                 scale: float, block_n: int = 64) -> torch.Tensor:
    """One query's indexer scores: q [H, D] (rotated), w [H] head weights, rows [n, D] (the
    compressed rows so far, any float dtype), positions [1] on the device -> float32 [n]."""
    H, D = q.shape
    n = rows.shape[0]
    if rows.shape[1] != D or w.shape != (H,) or D & (D - 1) or D < 16 or not rows.is_contiguous():
        raise ValueError(f"index_scores: q {tuple(q.shape)}, w {tuple(w.shape)}, rows {tuple(rows.shape)}")
    out = torch.empty(n, dtype=torch.float32, device=q.device)
    if n:
        _index_scores_kernel[(triton.cdiv(n, block_n),)](q.contiguous(), w.contiguous(), rows, positions, out, n, H,
                                                         ratio, float(scale), D=D, BH=16, BN=block_n,
                                                         F32_DOT=not q.is_cuda, num_warps=4,
                                                         **pdl.launch(q.device))
    return out
