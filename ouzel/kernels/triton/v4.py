"""DeepSeek V4 decode-step groups in one launch each, where torch runs 10-50 small kernels.

References (the torch code they replace, the oracle in tests/test_triton_v4.py):
- `compress_step`: `Compressor._compress_step` (layers/compressed_attention.py) with
  `CompressedKV.frontier_step`/`emit_step`: store the token's kv/gate in the rings, softmax-pool
  the open window per channel (online, over slot chunks), RMSNorm, rotate the row at the
  window's first position, write it at positions // ratio. One program: the norm needs the row.
- `rms_rope`: `unit_rms` or `RMSNorm` then `InterleavedRope.rotate` (optional each), program per
  row of [T, H, D]; cos/sin of the position computed on the device (graph-capturable).
- `hc_pre`: `HyperConnection.forward` after its GEMV (whose input is left unnormalised: the
  stream RMS scales the [T, (2+N)N] result instead) + the block's input RMSNorm: rms, the mix
  (as kernels/triton/mhc.py), the pre-weighted collapse and its norm, program per token.
- `hc_merge`: `HyperConnection.merge`, program per (token, D block).
- `attention_step`: `V4Attention._sequence`'s torch path for the fixed step (mask of the window
  ring's slots, the compressed rows: all complete ones or the indexer's picks gathered in the
  kernel, scores, softmax with the per-head sinks, weighted sum), program per (16 heads, output
  channel block). The output's inverse rope stays `rms_rope` (sign -1).

Channels are handled as (even, odd) halves so a rope pair (2i, 2i+1) sits in one lane. Compiled
without fp fusion so x * cos and x * sin round apart, as in torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


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
def _compress_step_kernel(kv_ring, gate_ring, kv_x, gate_x, pos_ptr, bias_ptr, w_ptr, inv_ptr, rows_ptr,
                          size, W, eps, scale,
                          R: tl.constexpr, OVERLAP: tl.constexpr, D: tl.constexpr, ROT: tl.constexpr,
                          BR: tl.constexpr, BH: tl.constexpr):
    pos = tl.load(pos_ptr)
    slot = pos % size
    base = pos // R * R
    j = tl.arange(0, BH)
    mj = j < D // 2
    # the token's projections go to the rings; its own slot is read from them below via kv_x
    for c in range(0, 2 if OVERLAP else 1):
        tl.store(kv_ring + slot * W + c * D + 2 * j, tl.load(kv_x + c * D + 2 * j, mask=mj).to(
            kv_ring.dtype.element_ty), mask=mj)
        tl.store(kv_ring + slot * W + c * D + 2 * j + 1, tl.load(kv_x + c * D + 2 * j + 1, mask=mj).to(
            kv_ring.dtype.element_ty), mask=mj)
        tl.store(gate_ring + slot * W + c * D + 2 * j, tl.load(gate_x + c * D + 2 * j, mask=mj).to(
            gate_ring.dtype.element_ty), mask=mj)
        tl.store(gate_ring + slot * W + c * D + 2 * j + 1, tl.load(gate_x + c * D + 2 * j + 1, mask=mj).to(
            gate_ring.dtype.element_ty), mask=mj)
    NS: tl.constexpr = 2 * R if OVERLAP else R
    m_e = tl.full((BH,), float("-inf"), tl.float32)
    m_o = tl.full((BH,), float("-inf"), tl.float32)
    l_e = tl.zeros((BH,), tl.float32)
    l_o = tl.zeros((BH,), tl.float32)
    a_e = tl.zeros((BH,), tl.float32)
    a_o = tl.zeros((BH,), tl.float32)
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
        ce = col[:, None] + 2 * j[None, :]
        m2 = ms[:, None] & mj[None, :]
        own = (ring == slot)[:, None]
        ke = tl.load(kv_ring + ring[:, None] * W + ce, mask=m2, other=0.0).to(tl.float32)
        ko = tl.load(kv_ring + ring[:, None] * W + ce + 1, mask=m2, other=0.0).to(tl.float32)
        ge = tl.load(gate_ring + ring[:, None] * W + ce, mask=m2, other=0.0).to(tl.float32)
        go = tl.load(gate_ring + ring[:, None] * W + ce + 1, mask=m2, other=0.0).to(tl.float32)
        # the token's own slot from kv_x/gate_x (rounded to the ring's dtype, as stored)
        mo = m2 & own
        ke = tl.where(own, tl.load(kv_x + ce, mask=mo, other=0.0).to(kv_ring.dtype.element_ty).to(tl.float32), ke)
        ko = tl.where(own, tl.load(kv_x + ce + 1, mask=mo, other=0.0).to(kv_ring.dtype.element_ty).to(tl.float32), ko)
        ge = tl.where(own, tl.load(gate_x + ce, mask=mo, other=0.0).to(gate_ring.dtype.element_ty).to(tl.float32), ge)
        go = tl.where(own, tl.load(gate_x + ce + 1, mask=mo, other=0.0).to(gate_ring.dtype.element_ty)
                      .to(tl.float32), go)
        brow = (s % R)[:, None] * W + ce
        ge = ge + tl.load(bias_ptr + brow, mask=m2, other=0.0)
        go = go + tl.load(bias_ptr + brow + 1, mask=m2, other=0.0)
        gone = absent[:, None] | ~m2
        ke = tl.where(gone, 0.0, ke)
        ko = tl.where(gone, 0.0, ko)
        ge = tl.where(gone, float("-inf"), ge)
        go = tl.where(gone, float("-inf"), go)
        n_e = tl.maximum(m_e, tl.max(ge, axis=0))
        n_o = tl.maximum(m_o, tl.max(go, axis=0))
        z_e = tl.where(n_e == float("-inf"), 0.0, n_e)  # all -inf so far: no NaN from -inf - -inf
        z_o = tl.where(n_o == float("-inf"), 0.0, n_o)
        p_e = tl.exp(ge - z_e[None, :])
        p_o = tl.exp(go - z_o[None, :])
        f_e = tl.exp(m_e - z_e)
        f_o = tl.exp(m_o - z_o)
        l_e = l_e * f_e + tl.sum(p_e, axis=0)
        l_o = l_o * f_o + tl.sum(p_o, axis=0)
        a_e = a_e * f_e + tl.sum(p_e * ke, axis=0)
        a_o = a_o * f_o + tl.sum(p_o * ko, axis=0)
        m_e, m_o = n_e, n_o
    xe = tl.where(mj, a_e / l_e, 0.0)
    xo = tl.where(mj, a_o / l_o, 0.0)
    xe, xo = _norm_rope(xe, xo, j, w_ptr, inv_ptr, base.to(tl.float32), scale, 1.0, eps, D, ROT, 2)
    dst = rows_ptr + (pos // R) * D
    ty = rows_ptr.dtype.element_ty
    tl.store(dst + 2 * j, xe.to(ty), mask=mj)
    tl.store(dst + 2 * j + 1, xo.to(ty), mask=mj)


def compress_step(kv_ring, gate_ring, kv_x, gate_x, positions, bias, rows, norm_w, eps, inv_freq, rope_scale,
                  ratio: int, overlap: bool) -> None:
    """The fixed step's compressor for one token: rings [size, W] and rows [capacity, D] updated
    in place. kv_x, gate_x [1, W] (W = (1+overlap) * D), positions [1] on the device, bias [ratio, W]
    fp32, norm_w [D], inv_freq [rot/2] fp32 (the trailing rot channels rotate)."""
    D, W, rot = rows.shape[1], kv_ring.shape[1], 2 * inv_freq.shape[0]
    if W != (2 if overlap else 1) * D or D % 2 or rot > D or bias.shape != (ratio, W):
        raise ValueError(f"compress_step: W {W}, D {D}, rot {rot}, bias {tuple(bias.shape)}, ratio {ratio}")
    BH = triton.next_power_of_2(D // 2)
    ns = (2 if overlap else 1) * ratio
    BR = max(1, min(triton.next_power_of_2(ns), max(1, 4096 // BH)))
    _compress_step_kernel[(1,)](kv_ring, gate_ring, kv_x.contiguous(), gate_x.contiguous(), positions,
                                bias.contiguous(), norm_w.contiguous(), inv_freq.contiguous(), rows,
                                kv_ring.shape[0], W, float(eps), float(rope_scale),
                                R=ratio, OVERLAP=bool(overlap), D=D, ROT=rot, BR=BR, BH=BH,
                                num_warps=max(1, min(8, BR * BH // 256)), enable_fp_fusion=False)


@triton.jit
def _rms_rope_kernel(x_ptr, y_ptr, pos_ptr, w_ptr, inv_ptr, H, s_t, s_h, eps, scale, sign,
                     D: tl.constexpr, ROT: tl.constexpr, NORM: tl.constexpr, BH: tl.constexpr):
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
                                   enable_fp_fusion=False)
    return y


@triton.jit
def _hc_pre_kernel(m_ptr, st_ptr, b_ptr, s_ptr, w_ptr, post_ptr, comb_ptr, y_ptr, N, D, s_m, iters,
                   hc_eps, rms_eps, norm_eps, BN: tl.constexpr, BD: tl.constexpr):
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
        BD = min(triton.next_power_of_2(D), 1024)
        _hc_pre_kernel[(T,)](mixes, st, base.contiguous(), scale.contiguous(), norm_w.contiguous(), post, comb, y,
                             N, D, mixes.stride(0), max(int(iters), 1), float(hc_eps), float(rms_eps),
                             float(norm_eps), BN=triton.next_power_of_2(N), BD=BD, num_warps=4)
    return post, comb, y


@triton.jit
def _hc_merge_kernel(st_ptr, out_ptr, post_ptr, comb_ptr, y_ptr, N, D, BN: tl.constexpr, BD: tl.constexpr):
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
                                                  BN=triton.next_power_of_2(N), BD=BD, num_warps=4)
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
    P @ V for the output channels d0..d0+BDO-1. Keys are cast to q's dtype, as the torch code does;
    scores in log2 units. Returns the updated (m_i, l_i, acc)."""
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
def _attention_step_kernel(q_ptr, ring_ptr, rows_ptr, top_ptr, sink_ptr, pos_ptr, out_ptr,
                           H, size, n_rows, n_top, window, ratio, qk_scale,
                           D: tl.constexpr, BH: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                           BDO: tl.constexpr, MODE: tl.constexpr, MAX_ITERS: tl.constexpr, F32_DOT: tl.constexpr):
    """Program per (block of BH query heads, block of BDO output channels); MODE 0: window only,
    1: + every complete compressed row, 2: + the picked rows top[0..n_top-1] (-1: none)."""
    h = tl.program_id(0) * BH + tl.arange(0, BH)
    d0 = tl.program_id(1) * BDO
    pos = tl.load(pos_ptr).to(tl.int32)
    m_i = tl.full([BH], float("-inf"), tl.float32)
    l_i = tl.zeros([BH], tl.float32)
    acc = tl.zeros([BH, BDO], tl.float32)
    for s0 in range(0, size, BN):  # the ring: slot s holds the latest position = s (mod size), if any
        slot = s0 + tl.arange(0, BN)
        key_pos = pos - ((pos - slot) % size + size) % size  # C remainder: keep it non-negative
        ok = (slot < size) & (key_pos >= 0) & (key_pos > pos - window)
        m_i, l_i, acc = _attend_tile(q_ptr, h, qk_scale, ring_ptr, slot, ok, m_i, l_i, acc, d0, H,
                                     D, BH, BN, BD, BDO, F32_DOT)
    if MODE == 1:  # rows whose window the query has seen to its end
        ready = tl.minimum((pos + 1) // ratio, n_rows)
        if MAX_ITERS == 0:
            n_iters = tl.cdiv(ready, BN)
        else:  # the interpreter cannot loop to a device-side bound: the buffer's, idle tiles masked
            n_iters = MAX_ITERS
        for i in range(0, n_iters):
            idx = i * BN + tl.arange(0, BN)
            m_i, l_i, acc = _attend_tile(q_ptr, h, qk_scale, rows_ptr, idx, idx < ready, m_i, l_i, acc, d0, H,
                                         D, BH, BN, BD, BDO, F32_DOT)
    if MODE == 2:
        for k0 in range(0, n_top, BN):
            k = k0 + tl.arange(0, BN)
            idx = tl.load(top_ptr + k, mask=k < n_top, other=-1)
            ok = (idx >= 0) & (idx < n_rows)
            m_i, l_i, acc = _attend_tile(q_ptr, h, qk_scale, rows_ptr, tl.where(ok, idx, 0), ok, m_i, l_i, acc, d0,
                                         H, D, BH, BN, BD, BDO, F32_DOT)
    # the sink joins the softmax's denominator only (rounded to q's dtype, as the torch code does)
    sink = tl.load(sink_ptr + h, mask=h < H, other=0.0).to(q_ptr.dtype.element_ty).to(tl.float32)
    sink = sink * 1.4426950408889634
    m_f = tl.maximum(m_i, sink)
    alpha = tl.exp2(m_i - m_f)
    o = acc * (alpha / (l_i * alpha + tl.exp2(sink - m_f)))[:, None]
    do = d0 + tl.arange(0, BDO)
    tl.store(out_ptr + h[:, None] * D + do[None, :], o.to(out_ptr.dtype.element_ty),
             mask=(h < H)[:, None] & (do < D)[None, :])


def attention_step(q: torch.Tensor, ring: torch.Tensor, positions: torch.Tensor, window: int, sinks: torch.Tensor,
                   scale: float, rows: torch.Tensor | None = None, ratio: int = 0, top: torch.Tensor | None = None,
                   block_n: int = 32, block_d: int = 128, block_out: int = 128, num_warps: int = 8,
                   num_stages: int = 2) -> torch.Tensor:
    """The fixed step's attention of one token: q [1, H, D] over the K=V ring [size, D] (the token's
    row already written at positions % size; slot s holds position p - (p - s) % size, valid if >= 0
    and within the window), plus the compressed rows [n, D]: with top None every complete one
    (index < (p + 1) // ratio), else the picks top [1, k] (-1: none). Each head's sink [H] (fp32)
    joins the softmax. positions [1] is read on the device only. Returns [1, H, D] in q's dtype.
    Programs: (H / 16) x (D / block_out), each scoring every key over all D (in block_d chunks):
    V4-Flash's 64 heads of 512 give 16 programs, all keys read from L2 after the first.

    Compiled for sm_90 (ptxas; not run on a GPU yet), D 512, BN 32, BD = BDO = 128, 8 warps, 2
    stages: fp32 cache 255 registers, no spills, 148 KB shared (cp.async); bf16 25 KB, no spills.
    4 warps spill (fp32 q + acc + the K chunks in flight); 3 stages need 228 KB (over sm_90's 227)."""
    T, H, D = q.shape
    if T != 1 or ring.shape[1] != D or sinks.shape != (H,) or (rows is not None and rows.shape[1] != D):
        raise ValueError(f"attention_step: q {tuple(q.shape)}, ring {tuple(ring.shape)}, sinks {tuple(sinks.shape)}")
    mode = 0 if rows is None else 1 if top is None else 2
    if mode == 1 and ratio < 1:
        raise ValueError(f"attention_step: ratio {ratio}")
    rows = ring if rows is None else rows
    top = positions if top is None else top
    out = torch.empty((1, H, D), dtype=q.dtype, device=q.device)
    interpret = q.device.type != "cuda"
    max_iters = triton.cdiv(rows.shape[0], block_n) if interpret and mode == 1 else 0
    BH = 16  # tl.dot needs >= 16 rows; padding heads are zeros, never stored
    BD, BDO = (min(b, triton.next_power_of_2(D)) for b in (block_d, block_out))
    _attention_step_kernel[(triton.cdiv(H, BH), triton.cdiv(D, BDO))](
        q.contiguous(), ring, rows, top.contiguous(), sinks, positions, out, H, ring.shape[0], rows.shape[0],
        top.shape[-1], int(window), max(int(ratio), 1), float(scale) * 1.4426950408889634,
        D=D, BH=BH, BN=block_n, BD=BD, BDO=BDO, MODE=mode, MAX_ITERS=max_iters, F32_DOT=interpret,
        num_warps=num_warps, num_stages=num_stages)
    return out
