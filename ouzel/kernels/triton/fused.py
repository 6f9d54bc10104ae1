"""Small fused kernels for the decode step: RMSNorm (optionally with the residual add) and the
q + k rotary embedding, one launch each where torch launches several.

References: `RMSNorm.reference` (`layers/norm.py`) and `Rope.__call__` (`layers/rope.py`).

- `rms_norm`, program per row: fp32 math in the reference's order, x * rsqrt(mean(x^2) + eps) * w
  (or * (1 + w)); with a residual it first stores h = x + residual (rounded to h's dtype, as the
  separate torch add would) and normalizes that.
- `rope_qk`, program (token, head) over the H query heads then the Hkv key heads: cos/sin of
  positions[t] * inv_freq in fp32 on the device (no host read: graph-capturable), rotate-half on
  the first rot_dim dims, the rest copied. Compiled without fp fusion, so x * cos and
  rot * sin are rounded apart as in torch (only cos/sin themselves may differ by an ulp). The
  outputs are fp32 for any input dtype, as the reference's x * (fp32 cos) promotes.

Compiled for sm_90 (ptxas, no GPU run yet), no spills: rms_norm bf16 D = 8192 on 16 warps, 64
registers; rope_qk (tl.cos/tl.sin lower to libdevice's accurate __nv_cosf/__nv_sinf), 22.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .gguf import last_to_finish, split_counters
from .pdl import wait_for_inputs
from .q8act import QBLOCK, _round_store

MAX_D = 16384  # one row must fit one program's registers


@triton.jit
def stream_values(x_ptr, res_ptr, h_ptr, k, ok):
    """Values k of a residual stream h = x + residual, rounded to h's dtype (as stored), as fp32."""
    h = tl.load(x_ptr + k, mask=ok, other=0.0).to(tl.float32) + tl.load(res_ptr + k, mask=ok, other=0.0).to(tl.float32)
    return h.to(h_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def norm_values(h, nw_ptr, y_ptr, k, ok, inv, UNIT_OFFSET: tl.constexpr):
    """RMSNorm of stream values h (fp32) at k given inv = rsqrt(mean(h^2) + eps): h * inv * w (1 + w with
    UNIT_OFFSET) rounded to y's dtype, as fp32."""
    w = tl.load(nw_ptr + k, mask=ok, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        w = 1.0 + w
    return (h * inv * w).to(y_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, xq_ptr, dx_ptr, sx_ptr, D, eps, s_x, s_r, s_y, s_h,
                     BD: tl.constexpr, UNIT_OFFSET: tl.constexpr, RESIDUAL: tl.constexpr, Q8: tl.constexpr,
                     PDL: tl.constexpr):
    """y[row] = h * rsqrt(mean(h^2) + eps) * w with h = x[row] (+ residual[row], stored to h_ptr).
    Q8: also y's int8 rounding for the next GEMV (q8act.quantize_x's arithmetic on the stored y)."""
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BD)
    m = d < D
    if RESIDUAL:  # normalize the stored (rounded) sum, as the unfused path does
        h = stream_values(x_ptr + row * s_x, r_ptr + row * s_r, h_ptr, d, m)
        tl.store(h_ptr + row * s_h + d, h.to(h_ptr.dtype.element_ty), mask=m)
    else:
        h = tl.load(x_ptr + row * s_x + d, mask=m, other=0.0).to(tl.float32)
    y = norm_values(h, w_ptr, y_ptr, d, m, tl.rsqrt(tl.sum(h * h, axis=0) / D + eps), UNIT_OFFSET)
    tl.store(y_ptr + row * s_y + d, y.to(y_ptr.dtype.element_ty), mask=m)
    if Q8:
        _round_store(tl.where(m, y, 0.0), xq_ptr, dx_ptr, sx_ptr, row, 0, D, BD)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False,
             residual: torch.Tensor | None = None, q8: bool = False):
    """x [..., D] -> y in x's dtype; with residual (x's shape): h = x + residual, returns (norm(h), h).
    weight [D] fp32 or 16-bit. Any leading shape and row stride (the last dim is made contiguous).
    q8 (D % 32 == 0): also y's `q8act.quantize_x` triple (int8 rows, scales, scaled sums), appended
    to what is returned: (y, q) or (y, h, q)."""
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match D={D}")
    if D > MAX_D:
        raise ValueError(f"rms_norm: D={D} > {MAX_D}")
    if q8 and D % QBLOCK:
        raise ValueError(f"rms_norm: q8 needs D % {QBLOCK} == 0, not {D}")
    x2 = x.reshape(-1, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out_dtype = x.dtype
    r2 = h = None
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"rms_norm: residual {tuple(residual.shape)} is not x's {tuple(x.shape)}")
        out_dtype = torch.promote_types(x.dtype, residual.dtype)
        r2 = residual.reshape(-1, D)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        h = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    T = x2.shape[0]
    xq = torch.empty((T, D), dtype=torch.int8, device=x.device) if q8 else None
    dx = torch.empty((T, D // QBLOCK), dtype=torch.float32, device=x.device) if q8 else None
    sx = torch.empty_like(dx) if q8 else None
    if T:
        BD = max(triton.next_power_of_2(D), QBLOCK)
        y2, h2 = y.view(-1, D), (h.view(-1, D) if h is not None else y.view(-1, D))
        _rms_norm_kernel[(T,)](x2, r2 if r2 is not None else x2, weight.contiguous(), y2, h2,
                               xq if q8 else y2, dx if q8 else y2, sx if q8 else y2, D, float(eps),
                               x2.stride(0), r2.stride(0) if r2 is not None else 0, y2.stride(0), h2.stride(0),
                               BD=BD, UNIT_OFFSET=bool(unit_offset), RESIDUAL=residual is not None, Q8=q8,
                               num_warps=max(1, min(16, BD // 512)), **pdl.launch(x.device))
    out = (y,) if residual is None else (y, h)
    if q8:
        out += ((xq, dx, sx),)
    return out[0] if len(out) == 1 else out


@triton.jit
def _rope_qk_kernel(q_ptr, k_ptr, pos_ptr, inv_ptr, qo_ptr, ko_ptr, wq_ptr, wk_ptr, eps, H, Hkv, s_qt, s_qh, s_kt,
                    s_kh, D: tl.constexpr, ROT: tl.constexpr, HP: tl.constexpr, DP: tl.constexpr,
                    NORM: tl.constexpr, UNIT_OFFSET: tl.constexpr, PDL: tl.constexpr):
    """Program (t, j): head j of q (j < H) or head j - H of k; outputs contiguous [T, heads, D].
    NORM: each head first RMS-normalised over its D values with weights wq / wk (`_rms_norm_kernel`'s
    arithmetic), as Qwen3's and Gemma 3's q/k norms."""
    wait_for_inputs(PDL)
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    if j < H:
        src = q_ptr + t * s_qt + j * s_qh
        dst = qo_ptr + (t * H + j) * D
        w_ptr = wq_ptr
    else:
        src = k_ptr + t * s_kt + (j - H) * s_kh
        dst = ko_ptr + (t * Hkv + (j - H)) * D
        w_ptr = wk_ptr
    HALF: tl.constexpr = ROT // 2
    i = tl.arange(0, HP)
    m = i < HALF
    p = ROT + tl.arange(0, DP)
    pm = p < D
    f = tl.load(pos_ptr + t).to(tl.float32) * tl.load(inv_ptr + i, mask=m, other=0.0)
    c = tl.cos(f)
    s = tl.sin(f)
    x1 = tl.load(src + i, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + i, mask=m, other=0.0).to(tl.float32)
    x3 = tl.load(src + p, mask=pm, other=0.0).to(tl.float32)  # dims past ROT (partial rope)
    if NORM:
        ss = tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)
        if ROT < D:
            ss += tl.sum(x3 * x3, axis=0)
        r = tl.rsqrt(ss / D + eps)
        w1 = tl.load(w_ptr + i, mask=m, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + i, mask=m, other=0.0).to(tl.float32)
        w3 = tl.load(w_ptr + p, mask=pm, other=0.0).to(tl.float32)
        if UNIT_OFFSET:
            w1, w2, w3 = 1.0 + w1, 1.0 + w2, 1.0 + w3
        x1, x2, x3 = x1 * r * w1, x2 * r * w2, x3 * r * w3
    ty = dst.dtype.element_ty
    tl.store(dst + i, (x1 * c + -x2 * s).to(ty), mask=m)  # rotate_half(x) = [-x2, x1]
    tl.store(dst + HALF + i, (x2 * c + x1 * s).to(ty), mask=m)
    if ROT < D:  # partial rope: the remaining dims pass through
        tl.store(dst + p, x3.to(ty), mask=pm)


def rope_qk(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
            rot_dim: int, norm: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rope.__call__ on q [T, H, D] and k [T, Hkv, D] (same dtype; any strides in the first two
    dims, last dim contiguous) in one launch. positions [T] int32/int64 and inv_freq [rot_dim / 2]
    fp32 on the device. New contiguous outputs in the reference's dtype: fp32 (x * fp32 cos).
    norm = (q weight [D], k weight [D], eps, unit_offset): each head RMS-normalised first (the
    q/k norms of Qwen3 and Gemma 3, in the same launch)."""
    T, H, D = q.shape
    Tk, Hkv, Dk = k.shape
    if Tk != T or Dk != D or q.dtype != k.dtype:
        raise ValueError(f"rope_qk: q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype}")
    if rot_dim % 2 or not 0 < rot_dim <= D or inv_freq.shape != (rot_dim // 2,):
        raise ValueError(f"rope_qk: rot_dim {rot_dim}, D {D}, inv_freq {tuple(inv_freq.shape)}")
    if positions.shape != (T,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"rope_qk: positions must be int32/int64 [T={T}], got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("rope_qk: q and k rows must be contiguous in the last dim")
    out_dtype = torch.promote_types(q.dtype, torch.float32)
    qo = torch.empty((T, H, D), dtype=out_dtype, device=q.device)
    ko = torch.empty((T, Hkv, D), dtype=out_dtype, device=q.device)
    if T:
        HP = triton.next_power_of_2(rot_dim // 2)
        DP = triton.next_power_of_2(D - rot_dim) if rot_dim < D else 1
        wq, wk, eps, unit = norm if norm is not None else (inv_freq, inv_freq, 0.0, False)
        if norm is not None and (wq.shape != (D,) or wk.shape != (D,)):
            raise ValueError(f"rope_qk: norm weights {tuple(wq.shape)}, {tuple(wk.shape)} for D={D}")
        _rope_qk_kernel[(T, H + Hkv)](q, k, positions, inv_freq.float().contiguous(), qo, ko, wq.contiguous(),
                                      wk.contiguous(), float(eps), H, Hkv, q.stride(0), q.stride(1), k.stride(0),
                                      k.stride(1), D=D, ROT=rot_dim, HP=HP, DP=DP, NORM=norm is not None,
                                      UNIT_OFFSET=bool(unit), num_warps=1, enable_fp_fusion=False,
                                      **pdl.launch(q.device))
    return qo, ko


@triton.jit
def _kv_write_kernel(k_ptr, v_ptr, pos_ptr, kc_ptr, vc_ptr, s_kt, s_vt, s_kc, s_vc, n_k, n_v,
                     BK: tl.constexpr, BV: tl.constexpr, PDL: tl.constexpr):
    """Program t: row t of k [T, n_k] and v [T, n_v] (heads flattened) into the caches' row pos[t],
    converted to the caches' dtypes."""
    wait_for_inputs(PDL)
    t = tl.program_id(0)
    row = tl.load(pos_ptr + t).to(tl.int64)
    dk = tl.arange(0, BK)
    dv = tl.arange(0, BV)
    k = tl.load(k_ptr + t * s_kt + dk, mask=dk < n_k)
    v = tl.load(v_ptr + t * s_vt + dv, mask=dv < n_v)
    tl.store(kc_ptr + row * s_kc + dk, k.to(kc_ptr.dtype.element_ty), mask=dk < n_k)
    tl.store(vc_ptr + row * s_vc + dv, v.to(vc_ptr.dtype.element_ty), mask=dv < n_v)


def kv_write(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor) -> None:
    """k_cache[positions[t]] = k[t] and v_cache[positions[t]] = v[t] (k/v [T, Hkv, D], caches
    [C, Hkv, D], heads and dims contiguous): one launch for what torch does in four (two casts,
    two index_copy_). positions stay on the device (graph-capturable)."""
    T = k.shape[0]
    n_k, n_v = k[0].numel(), v[0].numel()
    _kv_write_kernel[(T,)](k, v, positions, k_cache, v_cache, k.stride(0), v.stride(0), k_cache.stride(0),
                           v_cache.stride(0), n_k, n_v, BK=triton.next_power_of_2(n_k), BV=triton.next_power_of_2(n_v),
                           **pdl.launch(k.device))


@triton.jit
def _ring_write_kernel(x_ptr, pos_ptr, ring_ptr, size, s_x, s_r, n, BD: tl.constexpr, PDL: tl.constexpr):
    """Program t: row t of x into the ring's slot pos[t] % size, converted to the ring's dtype."""
    wait_for_inputs(PDL)
    t = tl.program_id(0)
    slot = (tl.load(pos_ptr + t) % size).to(tl.int64)
    d = tl.arange(0, BD)
    x = tl.load(x_ptr + t * s_x + d, mask=d < n)
    tl.store(ring_ptr + slot * s_r + d, x.to(ring_ptr.dtype.element_ty), mask=d < n)


def ring_write(x: torch.Tensor, positions: torch.Tensor, ring: torch.Tensor) -> None:
    """ring[positions[t] % len(ring)] = x[t] for x [T, n] and a ring [size, n] (rows contiguous):
    one launch where torch takes three (the slot, the cast, index_copy_)."""
    T, n = x.shape
    if ring.dim() != 2 or ring.shape[1] != n or ring.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(f"ring_write: x {tuple(x.shape)}, ring {tuple(ring.shape)}")
    if T:
        _ring_write_kernel[(T,)](x, positions, ring, ring.shape[0], x.stride(0), ring.stride(0), n,
                                 BD=triton.next_power_of_2(n), **pdl.launch(x.device))


@triton.jit
def _weighted_rows_kernel(y_ptr, w_ptr, out_ptr, rows_ptr, K, D, BK: tl.constexpr, BD: tl.constexpr,
                          ROWS: tl.constexpr, PDL: tl.constexpr):
    """Program (t, block of D): out[t] = sum over k of w[t, k] * y[t * K + k] (ROWS: of
    y[rows[t * K + k]]), in fp32."""
    wait_for_inputs(PDL)
    t = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    k = tl.arange(0, BK)
    w = tl.load(w_ptr + t * K + k, mask=k < K, other=0.0).to(tl.float32)
    r = t * K + k
    if ROWS:
        r = tl.load(rows_ptr + r, mask=k < K, other=0).to(tl.int64)
    y = tl.load(y_ptr + r[:, None] * D + d[None, :], mask=(k < K)[:, None] & (d < D)[None, :],
                other=0.0).to(tl.float32)
    tl.store(out_ptr + t * D + d, tl.sum(w[:, None] * y, axis=0).to(out_ptr.dtype.element_ty), mask=d < D)


def weighted_rows(y: torch.Tensor, w: torch.Tensor, dtype: torch.dtype, rows: torch.Tensor | None = None) -> torch.Tensor:
    """MoE's weighted sum: y [T * K, D] (each token's K expert outputs), w [T, K] -> [T, D] in
    dtype, in one launch (torch's batched matmul takes two here). rows [T * K]: token t's k-th
    output is y[rows[t * K + k]] (a prefill's outputs in expert order, read in place of y[rows])."""
    T, K = w.shape
    D = y.shape[1]
    if ((y.shape[0] != T * K if rows is None else rows.shape != (T * K,)) or not y.is_contiguous()
            or not w.is_contiguous()):
        raise ValueError(f"weighted_rows: y {tuple(y.shape)}, w {tuple(w.shape)}")
    out = torch.empty((T, D), dtype=dtype, device=y.device)
    if T:
        BD = min(512, triton.next_power_of_2(D))
        _weighted_rows_kernel[(T, triton.cdiv(D, BD))](y, w, out, y if rows is None else rows.contiguous(), K, D,
                                                      BK=triton.next_power_of_2(K), BD=BD, ROWS=rows is not None,
                                                      num_warps=4, **pdl.launch(y.device))
    return out


@triton.jit
def dense_slice(x_ptr, w_ptr, rows, N, K, s_w, sk, k_per, BN: tl.constexpr, BK: tl.constexpr):
    """[BN] fp32: rows of a dense W [N, K] (any float dtype, read as stored) times x over K slice
    sk (k_per wide)."""
    r64 = tl.minimum(rows, N - 1).to(tl.int64)
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    k_end = tl.minimum(K, (sk + 1) * k_per)
    for k0 in range(sk * k_per, k_end, BK):
        k = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + k, mask=k < k_end, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + r64[:, None] * s_w + k[None, :], mask=(k < k_end)[None, :], other=0.0).to(tl.float32)
        acc += w * x[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def _dense_gemv_kernel(x_ptr, w_ptr, out_ptr, part_ptr, cnt_ptr, N, K, s_w, k_per, SPLITS,
                       BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    """Program (i, s): rows i*BN.. of W over K slice s (k_per wide), W in any float dtype read as
    stored, fp32 products and sums. SPLITS > 1: each slice's sums go to part[s]; the program that
    finishes a row block last (a counter per block, reset by it for the next launch) adds the
    slices in order 0..SPLITS-1, so the result does not depend on which program ran when."""
    wait_for_inputs(PDL)
    i = tl.program_id(0)
    sk = tl.program_id(1)
    rows = i * BN + tl.arange(0, BN)
    part = dense_slice(x_ptr, w_ptr, rows, N, K, s_w, sk, k_per, BN, BK)
    if SPLITS == 1:
        tl.store(out_ptr + rows, part.to(out_ptr.dtype.element_ty), mask=rows < N)
    else:
        tl.store(part_ptr + sk * N + rows, part, mask=rows < N)
        if last_to_finish(cnt_ptr + i, SPLITS):
            total = tl.zeros([BN], dtype=tl.float32)
            for s in range(0, SPLITS):
                total += tl.load(part_ptr + s * N + rows, mask=rows < N, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty), mask=rows < N)
            tl.store(cnt_ptr + i, 0)


def dense_gemv(x: torch.Tensor, w: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    """x [1, K] @ w.T for a dense w [N, K] of any float dtype (fp32 math, out in x's dtype), in one
    launch: cuBLAS took two for an fp32 router, and a 16-bit weight under fp32 x first needed a
    converted copy of itself (another launch, and the weight's bytes read twice). Few rows over a
    long K (V4's mHC mix: 24 x 16384) split K over up to 64 programs (one program per 4 rows read
    all of K: 32 us on an H100 for 1.5 MB)."""
    N, K = w.shape
    if x.shape != (1, K) or w.stride(1) != 1 or x.stride(-1) != 1:
        raise ValueError(f"dense_gemv: x {tuple(x.shape)}, w {tuple(w.shape)}")
    out = torch.empty((1, N), dtype=x.dtype, device=x.device)
    bn, bk = (4 if N <= 512 else 8), 256
    blocks = triton.cdiv(N, bn)
    if splits is None:  # ~512 programs, each at least 256 columns (one load step)
        splits = max(1, min(64, 512 // blocks, K // 256))
    k_per = triton.cdiv(triton.cdiv(K, splits), bk) * bk
    splits = triton.cdiv(K, k_per)
    part = torch.empty((splits, N), dtype=torch.float32, device=x.device) if splits > 1 else out
    cnt = split_counters(x.device, blocks) if splits > 1 else out
    _dense_gemv_kernel[(blocks, splits)](x, w, out, part, cnt, N, K, w.stride(0), k_per, splits, BN=bn, BK=bk,
                                         num_warps=4, **pdl.launch(x.device))
    return out


@triton.jit
def _swiglu_kernel(gu_ptr, out_ptr, K, s_gu, s_out, limit, BLOCK: tl.constexpr, LIMIT: tl.constexpr, PDL: tl.constexpr):
    """Program (m, block): out[m] = silu(gate) * up of the row's halves gu[m] = [gate | up]
    (LIMIT: gate clamped from above and up on both sides first, as `moe.swiglu`)."""
    wait_for_inputs(PDL)
    m = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    g = tl.load(gu_ptr + m * s_gu + offs, mask=offs < K, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + m * s_gu + K + offs, mask=offs < K, other=0.0).to(tl.float32)
    if LIMIT:
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
    tl.store(out_ptr + m * s_out + offs, (g / (1.0 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty), mask=offs < K)


def swiglu(gu: torch.Tensor, limit: float | None, dtype: torch.dtype) -> torch.Tensor:
    """silu(gate) * up for gu = [gate | up] [M, 2K] -> [M, K] in dtype, one launch (torch: two or,
    with V4's clamp, four)."""
    M, K2 = gu.shape
    if K2 % 2 or gu.stride(1) != 1:
        raise ValueError(f"swiglu: gu {tuple(gu.shape)} is not [M, 2K] with contiguous rows")
    K = K2 // 2
    out = torch.empty((M, K), dtype=dtype, device=gu.device)
    if M:
        block = min(1024, triton.next_power_of_2(K))
        _swiglu_kernel[(M, triton.cdiv(K, block))](gu, out, K, gu.stride(0), out.stride(0), float(limit or 0.0),
                                                   BLOCK=block, LIMIT=bool(limit), num_warps=4, **pdl.launch(gu.device))
    return out
