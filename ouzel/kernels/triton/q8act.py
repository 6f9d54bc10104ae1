"""Decode GEMVs with 8-bit activations: integer dot products of the GGUF quants with x rounded
to int8 per 32 values (llama.cpp's scheme for its CUDA decode matmuls).

Why: a GEMV over 4-bit weights at memory speed has ~1 instruction per weight to spend; decoding
each weight to float and multiplying in fp32 costs ~12 (measured in SASS). Here the weight bytes
stay packed: one `dp4a` multiplies 4 weight bytes by 4 activation bytes and accumulates in int32,
exactly. The scales are applied once per sub-block.

x [M, K] -> xq int8 (round(x / dx)), dx = max|x| / 127 and sx = dx * sum(xq) per 32 values
(fp32; for Q4_K's minimums). The only approximation is x's rounding to 8 bits (~0.4% per value);
the oracle is therefore the exact dequantized matmul of xq * dx (`dequantized_x`), which the
kernel matches to fp32 rounding.

`SUPPORTED`: Q4_K, and Q6_K / Q8_0 / Q2_K / IQ2_XXS regrouped at load (`*_R8`, and `Q6_K_R3` for
the Q6_K rows of K % 768 == 0 that R8 can't take, in quant/blocks.py; Q2_K and IQ2_XXS are
DeepSeek V4's routed experts): in GGUF's layout their blocks are only 2- or 4-byte aligned, and
the same scheme read through int16 pairs was no faster than the fp32-activation decoder on an
H200 (Q6_K and Q8_0; Q8_0 slower; bench/NOTES.md).

The one-row kernels (`*_m1_kernel`, the decode step's form; the regrouped types have only these)
are built for memory-level parallelism, which was the limit, not the instruction count:
every load of block step i + 1 (weights, their scales as words, x's words and scales) is issued
before step i computes, products are scaled per word and summed once at the end, and row strides
come in 16-byte units so that Triton emits 16-byte loads. On an H100 that took Q4_K 14336x4096
from 27 to 18 us (bench/NOTES.md).

Q4_K (144 B): d, dmin (f16), 12 B of 6-bit sub-block scales/mins, 128 B of nibbles where byte l
of 32-byte group j holds elements 64j + l (low nibble) and 64j + 32 + l (high). Read as
32-bit words, word w of group j masked with 0x0F0F0F0F holds elements 64j + 4w .. +3, which is
exactly the int8 word 16j + w of xq: one dp4a per 4 weights, no shuffling.

Q2_K_R8 and IQ2_XXS_R8 tile [4 quads, NB blocks, BN rows, 4 words] with every load (x's too,
repeated per row) in one layout of a 16-byte word per thread, so that nothing goes through shared
memory in the loop (sm_90: 40-96 registers, no spills; about 2.8 and 4 instructions per weight).
IQ2_XXS's magnitudes come from its 256-row grid (2 KB) and its signs from 128 8-bit patterns,
read per 8 weights from L1 by inline loads.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .gguf import finish_gemv, last_to_finish, plan_gemv, split_counters
from .pdl import wait_for_inputs

QBLOCK = 32  # activation values per int8 scale


@triton.jit
def round32(xr):
    """The int8 rounding of blocks of 32 values xr (fp32 [N, 32]): (int8 [N, 32], the scale max|x| / 127
    [N], scale * sum of the int8 values [N]). Every producer of int8 rows rounds through it."""
    amax = tl.max(tl.abs(xr), axis=1)
    d = amax / 127.0
    inv = tl.where(amax > 0, 127.0 / tl.where(amax > 0, amax, 1.0), 0.0)
    q = tl.minimum(tl.maximum(tl.floor(xr * inv[:, None] + 0.5), -127.0), 127.0)
    return q.to(tl.int8), d, d * tl.sum(q, axis=1)


@triton.jit
def _round_store(x, xq_ptr, dx_ptr, sx_ptr, m, b, K, BLOCK: tl.constexpr):
    """Values b*BLOCK .. of row m (x, fp32 [BLOCK]) -> int8, and per 32 the scale and dx * sum."""
    offs = b * BLOCK + tl.arange(0, BLOCK)
    q, d, s = round32(tl.reshape(x, [BLOCK // 32, 32]))
    tl.store(xq_ptr + m * K + offs, tl.reshape(q, [BLOCK]), mask=offs < K)
    sub = b * (BLOCK // 32) + tl.arange(0, BLOCK // 32)
    tl.store(dx_ptr + m * (K // 32) + sub, d, mask=sub < K // 32)
    tl.store(sx_ptr + m * (K // 32) + sub, s, mask=sub < K // 32)


@triton.jit
def _quant_x_kernel(x_ptr, xq_ptr, dx_ptr, sx_ptr, K, stride_xm, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Program (m, b): values b*BLOCK .. of row m -> int8, and per 32 the scale and the sum."""
    wait_for_inputs(PDL)
    m = tl.program_id(0)
    b = tl.program_id(1)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + m * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
    _round_store(x, xq_ptr, dx_ptr, sx_ptr, m, b, K, BLOCK)


@triton.jit
def _quant_swiglu_kernel(gu_ptr, xq_ptr, dx_ptr, sx_ptr, K, stride_m, limit, BLOCK: tl.constexpr,
                         LIMIT: tl.constexpr, PDL: tl.constexpr):
    """`_quant_x_kernel` of x = silu(gate) * up, gate and up the two halves of a gu row [2K]
    (LIMIT: gate clamped from above and up on both sides at `limit` first, as `moe.swiglu`)."""
    wait_for_inputs(PDL)
    m = tl.program_id(0)
    b = tl.program_id(1)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    g = tl.load(gu_ptr + m * stride_m + offs, mask=offs < K, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + m * stride_m + K + offs, mask=offs < K, other=0.0).to(tl.float32)
    if LIMIT:
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
    x = g / (1.0 + tl.exp(-g)) * u
    _round_store(x, xq_ptr, dx_ptr, sx_ptr, m, b, K, BLOCK)


def quantize_swiglu(gu: torch.Tensor, limit: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`quantize_x(silu(gate) * up)` for gu = [gate | up] [M, 2K], in one launch (the MLP's
    activation and the down projection's input rounding); limit: `moe.swiglu`'s clamp."""
    m, k2 = gu.shape
    k = k2 // 2
    if gu.stride(1) != 1 or k % QBLOCK:
        raise ValueError(f"quantize_swiglu: gu {tuple(gu.shape)} is not [M, 2K], K % 32 == 0, rows contiguous")
    xq = torch.empty((m, k), dtype=torch.int8, device=gu.device)
    dx = torch.empty((m, k // QBLOCK), dtype=torch.float32, device=gu.device)
    sx = torch.empty_like(dx)
    block = 256 if k % 256 == 0 else 32
    _quant_swiglu_kernel[(m, triton.cdiv(k, block))](gu, xq, dx, sx, k, gu.stride(0), float(limit or 0.0),
                                                     BLOCK=block, LIMIT=bool(limit), **pdl.launch(gu.device))
    return xq, dx, sx


def quantize_x(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] (K % 32 == 0) -> xq int8 [M, K], dx [M, K/32], sx = dx * sum(xq) [M, K/32] (fp32)."""
    m, k = x.shape
    xq = torch.empty((m, k), dtype=torch.int8, device=x.device)
    dx = torch.empty((m, k // QBLOCK), dtype=torch.float32, device=x.device)
    sx = torch.empty_like(dx)
    block = 256 if k % 256 == 0 else 32
    _quant_x_kernel[(m, triton.cdiv(k, block))](x, xq, dx, sx, k, x.stride(0), BLOCK=block, **pdl.launch(x.device))
    return xq, dx, sx


def dequantized_x(xq: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """The activations the kernels actually multiply: xq * dx, float32 [M, K] (the test oracle's x)."""
    return (xq.float().view(xq.shape[0], -1, QBLOCK) * dx[:, :, None]).view(xq.shape)


@triton.jit
def _dp4a(a, b, c, USE_ASM: tl.constexpr):
    """c + sum over the 4 bytes of (unsigned byte of a) * (signed byte of b)."""
    if USE_ASM:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:  # the same integer arithmetic, spelled out (Triton's CPU interpreter has no inline PTX)
        for t in tl.static_range(4):
            c += ((a >> (8 * t)) & 255) * ((b << (24 - 8 * t)) >> 24)
        return c


@triton.jit
def _dp4a_ss(a, b, c, USE_ASM: tl.constexpr):
    """c + sum over the 4 bytes of (signed byte of a) * (signed byte of b)."""
    if USE_ASM:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        for t in tl.static_range(4):
            c += ((a << (24 - 8 * t)) >> 24) * ((b << (24 - 8 * t)) >> 24)
        return c


@triton.jit
def _f16_lo(w):
    return (w & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _q4k_scale(p, s):
    """Q4_K's 6-bit scale and min of sub-block(s) s (0..7) from the 12 bytes at p, as float32."""
    j = s % 4
    a = tl.load(p + j).to(tl.int32)
    m = tl.load(p + 4 + j).to(tl.int32)
    c = tl.load(p + 8 + j).to(tl.int32)
    sc = tl.where(s < 4, a & 63, (c & 15) | ((a >> 2) & 48))
    mn = tl.where(s < 4, m & 63, (c >> 4) | ((m >> 2) & 48))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _q4k_kernel(xq_ptr, dx_ptr, sx_ptr, w_ptr, wb_ptr, out_ptr, idx_ptr, N, blocks_per_split, row_words,
                expert_words, K, x_div, stride_os, stride_og, stride_om,
                M: tl.constexpr, MP: tl.constexpr, BN: tl.constexpr, NB: tl.constexpr,
                HAS_IDX: tl.constexpr, USE_ASM: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr):
    """Program (i, split, g): rows i*BN.., blocks [split*blocks_per_split, ...), pair g (MoE: x row
    g // x_div, expert idx[g]). Tile [BN rows, NB blocks, 4 groups j, 8 words w]."""
    wait_for_inputs(PDL)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    g = tl.program_id(2)
    rows = pid * BN + tl.arange(0, BN)
    wrow = tl.minimum(rows, N - 1).to(tl.int64) * row_words
    if HAS_IDX:
        wrow += tl.load(idx_ptr + g).to(tl.int64) * expert_words
    xrow = (g // x_div) * M
    r4 = wrow[:, None, None, None]
    b4 = tl.arange(0, NB)[None, :, None, None]
    j4 = tl.arange(0, 4)[None, None, :, None]
    w4 = tl.arange(0, 8)[None, None, None, :]
    r3 = wrow[:, None, None]
    b3 = tl.arange(0, NB)[None, :, None]
    j3 = tl.arange(0, 4)[None, None, :]
    mi = tl.arange(0, MP)[:, None]
    acc = tl.zeros([MP, BN], dtype=tl.float32)
    acc1 = tl.zeros([BN, NB, 4], dtype=tl.float32)
    blk_begin = split * blocks_per_split
    blk_end = blk_begin + blocks_per_split
    nib = w_ptr + r4 + 4 + j4 * 8 + w4  # + block * 36: [BN, NB, 4, 8] nibble words
    qw = tl.load(nib + (blk_begin + b4) * 36)
    for i in range(0, blocks_per_split, NB):
        blk0 = blk_begin + i
        if PREFETCH:  # the next step's words are in flight while this step computes
            nxt = blk0 + NB + b4
            qw_next = tl.load(nib + nxt * 36, mask=nxt < blk_end, other=0)
        lo = qw & 0x0F0F0F0F
        hi = (qw >> 4) & 0x0F0F0F0F
        base = r3 + (blk0 + b3) * 36
        hdr = tl.load(w_ptr + base)  # [BN, NB, 1]: d | dmin << 16
        d = _f16_lo(hdr)
        dmin = _f16_lo(hdr >> 16)
        sc_lo, mn_lo = _q4k_scale(wb_ptr + base * 4 + 4, 2 * j3)  # sub-block 2j: the low nibbles
        sc_hi, mn_hi = _q4k_scale(wb_ptr + base * 4 + 4, 2 * j3 + 1)
        for m in tl.static_range(M):
            xw = xq_ptr + (xrow + m) * (K // 4) + (blk0 + b4) * 64 + j4 * 16 + w4  # int8 words
            dl = tl.sum(_dp4a(lo, tl.load(xw), 0, USE_ASM), axis=3)  # [BN, NB, 4] exact
            dh = tl.sum(_dp4a(hi, tl.load(xw + 8), 0, USE_ASM), axis=3)
            xs = (xrow + m) * (K // 32) + (blk0 + b3) * 8 + 2 * j3  # [1, NB, 4] sub-block index
            part = d * (sc_lo * tl.load(dx_ptr + xs) * dl.to(tl.float32)
                        + sc_hi * tl.load(dx_ptr + xs + 1) * dh.to(tl.float32)) \
                - dmin * (mn_lo * tl.load(sx_ptr + xs) + mn_hi * tl.load(sx_ptr + xs + 1))
            if M == 1:
                acc1 += part
            else:
                p = tl.sum(tl.sum(part, axis=2), axis=1)
                acc = tl.where(mi == m, acc + p[None, :], acc)
        if PREFETCH:
            qw = qw_next
        else:
            qw = tl.load(nib + (blk0 + NB + b4) * 36, mask=blk0 + NB + b4 < blk_end, other=0)
    if M == 1:
        acc = tl.sum(tl.sum(acc1, axis=2), axis=1)[None, :]
    mask = (mi < M) & (rows[None, :] < N)
    tl.store(out_ptr + split * stride_os + g * stride_og + mi * stride_om + rows[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _m1_store(res, rows, N, out_ptr, part_ptr, cnt_ptr, mix_ptr, tile, split, g, n_tiles, n_groups, stride_os,
              stride_og, SPLITS: tl.constexpr, SP: tl.constexpr, COMBINE: tl.constexpr, GP: tl.constexpr):
    """The one-row kernels' result for rows of row tile `tile` (of n_tiles) and group g (of n_groups): the output itself
    without a K split. With one, this split's fp32 partial; the last split of the tile to finish
    (a counter per tile) adds the partials (one load of all SPLITS, a fixed reduction order: the
    same sum whatever the arrival order) into the output and sets the counter back to zero: no
    second launch to sum them, which took 4.3 us beside a 21 us GEMV in the H100 profile of a
    llama8b layer. COMBINE (MoE decode, one token): the G groups are its (expert, weight mix_ptr[g])
    pairs and the output is the one row sum_g w[g] * y_g: the last program of the tile over all
    splits and groups forms it (the separate weighted sum of the pairs' rows took 1.6 us)."""
    final = tl.full([], True, tl.int1)  # whether this program stored its tile's output
    if SPLITS == 1 and not COMBINE:
        tl.store(out_ptr + g * stride_og + rows, res.to(out_ptr.dtype.element_ty), mask=rows < N)
    else:
        tl.store(part_ptr + split * stride_os + g * stride_og + rows, res, mask=rows < N)
        if COMBINE:
            counter = tile
            expected = SPLITS * n_groups
        else:
            counter = g * n_tiles + tile
            expected = SPLITS
        final = last_to_finish(cnt_ptr + counter, expected)
        if final:
            ok = (rows < N)[None, :]
            if COMBINE:
                gg = tl.arange(0, GP)
                g_ok = gg < n_groups
                y = tl.zeros([GP, rows.shape[0]], dtype=tl.float32)
                for s in range(0, SPLITS):
                    y += tl.load(part_ptr + s * stride_os + gg[:, None] * stride_og + rows[None, :],
                                 mask=g_ok[:, None] & ok, other=0.0, cache_modifier=".cg")
                mix = tl.load(mix_ptr + gg, mask=g_ok, other=0.0).to(tl.float32)
                tl.store(out_ptr + rows, tl.sum(y * mix[:, None], axis=0).to(out_ptr.dtype.element_ty), mask=rows < N)
            else:
                sp = tl.arange(0, SP)
                p = tl.load(part_ptr + sp[:, None] * stride_os + g * stride_og + rows[None, :],
                            mask=(sp < SPLITS)[:, None] & ok, other=0.0, cache_modifier=".cg")
                tl.store(out_ptr + g * stride_og + rows, tl.sum(p, axis=0).to(out_ptr.dtype.element_ty),
                         mask=rows < N)
            tl.store(cnt_ptr + counter, 0)
    return final


@triton.jit
def _swiglu_pair(out_ptr, g, stride_og, tile, half_tiles, sq_ptr, sdx_ptr, ssx_ptr, pair_ptr, limit, BN: tl.constexpr,
                 LIMIT: tl.constexpr):
    """After a gate/up GEMV's program stored its output rows (gu = [gate | up], half_tiles row
    tiles each): the second of a feature tile's two programs (gate rows f*BN.., up rows half +
    f*BN..; a counter per feature tile and group, re-armed) forms silu(gate) * up of those BN
    features and their int8 rounding for the down projection (`_quant_swiglu_kernel`'s arithmetic
    on the stored gu, BN % 32 == 0): the separate launch of that rounding took 1.5-1.8 us a layer."""
    f = tile % half_tiles
    half = half_tiles * BN
    if last_to_finish(pair_ptr + g * half_tiles + f, 2):
        offs = f * BN + tl.arange(0, BN)
        row = out_ptr + g * stride_og
        gate = tl.load(row + offs, cache_modifier=".cg").to(tl.float32)
        up = tl.load(row + half + offs, cache_modifier=".cg").to(tl.float32)
        if LIMIT:
            gate = tl.minimum(gate, limit)
            up = tl.minimum(tl.maximum(up, -limit), limit)
        _round_store(gate / (1.0 + tl.exp(-gate)) * up, sq_ptr, sdx_ptr, ssx_ptr, g, f, half, BN)
        tl.store(pair_ptr + g * half_tiles + f, 0)


@triton.jit
def _m1_rows(idx_ptr, N, row_quads, expert_quads, tile, g, BN: tl.constexpr, HAS_IDX: tl.constexpr,
             PDL: tl.constexpr):
    """The one-row kernels' (row tile, split, group g): rows tile*BN.., and their first words (row strides
    in 16-byte units, so Triton knows every row is 16-byte aligned; MoE: expert idx[g]'s rows).
    The experts come from the router: a MoE kernel waits for its inputs here (PDL, `pdl.py`)."""
    if HAS_IDX:
        wait_for_inputs(PDL)
    rows = tile * BN + tl.arange(0, BN)
    wrow = tl.minimum(rows, N - 1).to(tl.int64) * row_quads * 4
    if HAS_IDX:
        wrow += tl.load(idx_ptr + g).to(tl.int64) * expert_quads * 4
    return rows, wrow


@triton.jit
def _weights_loaded(PDL: tl.constexpr, HAS_IDX: tl.constexpr):
    """A one-row kernel of dense weights issues its first step's weight loads, then waits for x
    (PDL): the weights are constant, so their loads overlap the previous kernel's tail."""
    if not HAS_IDX:
        wait_for_inputs(PDL)


@triton.jit
def _q4k_m1_kernel(xq_ptr, dx_ptr, sx_ptr, w_ptr, out_ptr, part_ptr, cnt_ptr, mix_ptr, idx_ptr, N, blocks_per_split,
                   row_quads, expert_quads, K, x_div, stride_os, stride_og, sq_ptr, sdx_ptr, ssx_ptr, pair_ptr, limit,
                   BN: tl.constexpr, NB: tl.constexpr, HAS_IDX: tl.constexpr, SPLITS: tl.constexpr, SP: tl.constexpr,
                   COMBINE: tl.constexpr, GP: tl.constexpr, USE_ASM: tl.constexpr, SWIGLU: tl.constexpr,
                   LIMIT: tl.constexpr, PDL: tl.constexpr):
    """`_q4k_m1` on program (row tile, split, group); SWIGLU: `_swiglu_pair` after the output."""
    tile, g = tl.program_id(0), tl.program_id(2)
    final = _q4k_m1(tile, tl.program_id(1), g, tl.num_programs(0), tl.num_programs(2), xq_ptr, dx_ptr, sx_ptr,
                    w_ptr, out_ptr, part_ptr, cnt_ptr, mix_ptr, idx_ptr, N, blocks_per_split, row_quads,
                    expert_quads, K, x_div, stride_os, stride_og, BN, NB, HAS_IDX, SPLITS, SP, COMBINE, GP, USE_ASM,
                    PDL)
    if SWIGLU:
        if final:
            _swiglu_pair(out_ptr, g, stride_og, tile, tl.num_programs(0) // 2, sq_ptr, sdx_ptr, ssx_ptr, pair_ptr,
                         limit, BN, LIMIT)


@triton.jit
def _q4k_m1(tile, split, g, n_tiles, n_groups, xq_ptr, dx_ptr, sx_ptr, w_ptr, out_ptr, part_ptr, cnt_ptr, mix_ptr,
            idx_ptr, N, blocks_per_split, row_quads, expert_quads, K, x_div, stride_os, stride_og, BN: tl.constexpr,
            NB: tl.constexpr, HAS_IDX: tl.constexpr, SPLITS: tl.constexpr, SP: tl.constexpr, COMBINE: tl.constexpr,
            GP: tl.constexpr, USE_ASM: tl.constexpr, PDL: tl.constexpr):
    """`_q4k_kernel` for one activation row (decode), every load of step i + 1 in flight while step i
    computes: the nibble words, the block headers as one 16-byte word load each (d | dmin, then
    the three words of 6-bit scales, decoded with shifts instead of byte loads), and x's words
    and scales. Products are scaled per word and summed once at the end."""
    rows, wrow = _m1_rows(idx_ptr, N, row_quads, expert_quads, tile, g, BN, HAS_IDX, PDL)
    xrow = (g // x_div).to(tl.int64)
    b4 = tl.arange(0, NB)[None, :, None, None]
    j4 = tl.arange(0, 4)[None, None, :, None]
    w4 = tl.arange(0, 8)[None, None, None, :]
    b3 = tl.arange(0, NB)[None, :, None]
    k3 = tl.arange(0, 4)[None, None, :]  # header word k; also the group j of the scale math
    nib = w_ptr + wrow[:, None, None, None] + 4 + j4 * 8 + w4  # + block * 36
    hdr = w_ptr + wrow[:, None, None] + k3
    xw = xq_ptr + xrow * (K // 4) + j4 * 16 + w4  # + block * 64: x's int8 words for the low nibbles
    xs = xrow * (K // 32) + 2 * k3  # + block * 8: x's scale index of sub-block 2j
    blk_end = (split + 1) * blocks_per_split
    blk = split * blocks_per_split + b4
    blk3 = split * blocks_per_split + b3
    qw = tl.load(nib + blk * 36)
    hw = tl.load(hdr + blk3 * 36)
    _weights_loaded(PDL, HAS_IDX)
    xl = tl.load(xw + blk * 64)
    xh = tl.load(xw + blk * 64 + 8)
    dl = tl.load(dx_ptr + xs + blk3 * 8)
    dh = tl.load(dx_ptr + xs + blk3 * 8 + 1)
    sl = tl.load(sx_ptr + xs + blk3 * 8)
    sh = tl.load(sx_ptr + xs + blk3 * 8 + 1)
    acc = tl.zeros([BN, NB, 4, 8], dtype=tl.float32)
    accm = tl.zeros([BN, NB, 4], dtype=tl.float32)
    for _ in range(0, blocks_per_split, NB):
        nblk = blk + NB
        nblk3 = blk3 + NB
        ok, ok3 = nblk < blk_end, nblk3 < blk_end
        qw_n = tl.load(nib + nblk * 36, mask=ok, other=0)
        hw_n = tl.load(hdr + nblk3 * 36, mask=ok3, other=0)
        xl_n = tl.load(xw + nblk * 64, mask=ok, other=0)
        xh_n = tl.load(xw + nblk * 64 + 8, mask=ok, other=0)
        dl_n = tl.load(dx_ptr + xs + nblk3 * 8, mask=ok3, other=0.0)
        dh_n = tl.load(dx_ptr + xs + nblk3 * 8 + 1, mask=ok3, other=0.0)
        sl_n = tl.load(sx_ptr + xs + nblk3 * 8, mask=ok3, other=0.0)
        sh_n = tl.load(sx_ptr + xs + nblk3 * 8 + 1, mask=ok3, other=0.0)
        # header words -> [BN, NB, 1] each (the k axis is held by one thread: no shuffles)
        h0 = tl.sum(tl.where(k3 == 0, hw, 0), axis=2, keep_dims=True)
        wa = tl.sum(tl.where(k3 == 1, hw, 0), axis=2, keep_dims=True)
        wm = tl.sum(tl.where(k3 == 2, hw, 0), axis=2, keep_dims=True)
        wc = tl.sum(tl.where(k3 == 3, hw, 0), axis=2, keep_dims=True)
        d = _f16_lo(h0)
        dmin = _f16_lo(h0 >> 16)
        # sub-block s of the 8: byte s % 4 of the scale words; s = 2j (low nibbles), 2j + 1 (high)
        s_lo = 2 * k3
        s_hi = 2 * k3 + 1
        sc_lo, mn_lo = _q4k_scale_words(wa, wm, wc, s_lo)
        sc_hi, mn_hi = _q4k_scale_words(wa, wm, wc, s_hi)
        lo = _dp4a(qw & 0x0F0F0F0F, xl, 0, USE_ASM)
        hi = _dp4a((qw >> 4) & 0x0F0F0F0F, xh, 0, USE_ASM)
        acc += lo.to(tl.float32) * (d * sc_lo * dl)[:, :, :, None] + hi.to(tl.float32) * (d * sc_hi * dh)[:, :, :, None]
        accm += dmin * (mn_lo * sl + mn_hi * sh)
        qw, hw, xl, xh, dl, dh, sl, sh = qw_n, hw_n, xl_n, xh_n, dl_n, dh_n, sl_n, sh_n
        blk, blk3 = nblk, nblk3
    res = tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=1) - tl.sum(tl.sum(accm, axis=2), axis=1)
    return _m1_store(res, rows, N, out_ptr, part_ptr, cnt_ptr, mix_ptr, tile, split, g, n_tiles, n_groups, stride_os,
              stride_og, SPLITS, SP, COMBINE, GP)


@triton.jit
def _q4k_scale_words(wa, wm, wc, s):
    """`_q4k_scale` from the three scale words (bytes 4..15 of the block) instead of byte loads."""
    sh = 8 * (s % 4)
    a = (wa >> sh) & 255
    m = (wm >> sh) & 255
    c = (wc >> sh) & 255
    sc = tl.where(s < 4, a & 63, (c & 15) | ((a >> 2) & 48))
    mn = tl.where(s < 4, m & 63, (c >> 4) | ((m >> 2) & 48))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _q6k_r8_m1_kernel(xq_ptr, dx_ptr, w_ptr, out_ptr, part_ptr, cnt_ptr, mix_ptr, idx_ptr, N, blocks_per_split,
                      row_quads, expert_quads, K, x_div, stride_os, stride_og, BN: tl.constexpr, NB: tl.constexpr,
                      HAS_IDX: tl.constexpr, SPLITS: tl.constexpr, SP: tl.constexpr, COMBINE: tl.constexpr, GP:
                      tl.constexpr, USE_ASM: tl.constexpr, G: tl.constexpr, GW: tl.constexpr, PDL: tl.constexpr):
    """`_q6k_r8_m1` on program (row tile, split, group)."""
    _q6k_r8_m1(tl.program_id(0), tl.program_id(1), tl.program_id(2), tl.num_programs(0), tl.num_programs(2), xq_ptr,
               dx_ptr, w_ptr, out_ptr, part_ptr, cnt_ptr, mix_ptr, idx_ptr, N, blocks_per_split, row_quads,
               expert_quads, K, x_div, stride_os, stride_og, BN, NB, HAS_IDX, SPLITS, SP, COMBINE, GP, USE_ASM, G, GW,
               PDL)


@triton.jit
def _q6k_r8_m1(tile, split, g, n_tiles, n_groups, xq_ptr, dx_ptr, w_ptr, out_ptr, part_ptr, cnt_ptr, mix_ptr,
               idx_ptr, N, blocks_per_split, row_quads, expert_quads, K, x_div, stride_os, stride_og,
               BN: tl.constexpr, NB: tl.constexpr, HAS_IDX: tl.constexpr, SPLITS: tl.constexpr, SP: tl.constexpr,
               COMBINE: tl.constexpr, GP: tl.constexpr, USE_ASM: tl.constexpr, G: tl.constexpr, GW: tl.constexpr,
               PDL: tl.constexpr):
    """One x row times Q6_K_R8 or Q6_K_R3 rows (quant/blocks.py: per group of G = 8 or 3 blocks, GW =
    420 or 160 words: their Q6_K bodies of 208 bytes (52 words), then their G f16 d, two to a word;
    R3 then 10 bytes of padding). Tile [BN rows, NB blocks, 2 halves h, 16 words u]: ql word u of
    half h holds elements 128h + 4u .. +3 (low nibbles) and 128h + 64 + 4u .. (high); their top 2
    bits are field u // 8 (resp. 2 + u // 8) of qh word u % 8. The 6-bit values are unsigned; q - 32
    is exact in the integer dot as dp4a(q, x) - dp4a(32, x). Every load of step i + 1 is in flight
    during step i."""
    rows, wrow = _m1_rows(idx_ptr, N, row_quads, expert_quads, tile, g, BN, HAS_IDX, PDL)
    xrow = (g // x_div).to(tl.int64)
    b4 = tl.arange(0, NB)[None, :, None, None]
    h4 = tl.arange(0, 2)[None, None, :, None]
    u4 = tl.arange(0, 16)[None, None, None, :]
    r4 = wrow[:, None, None, None]
    qh_shift = 2 * (u4 // 8)
    sc_shift = 24 - 8 * (u4 // 4)
    xw = xq_ptr + xrow * (K // 4) + h4 * 32 + u4  # + block * 64: x's int8 words of the low nibbles
    xs = xrow * (K // 32) + h4 * 4 + u4 // 8  # + block * 8: x's scale of those words
    blk_end = (split + 1) * blocks_per_split
    blk = split * blocks_per_split + b4
    body = r4 + (blk // G) * GW + (blk % G) * 52  # word offset of each block's body
    ql = tl.load(w_ptr + body + h4 * 16 + u4)
    qh = tl.load(w_ptr + body + 32 + h4 * 8 + u4 % 8)
    sw = tl.load(w_ptr + body + 48 + h4 * 2)  # scale words: sub-blocks 8h .. 8h+3, then 8h+4 ..
    sw2 = tl.load(w_ptr + body + 49 + h4 * 2)
    dw = tl.load(w_ptr + r4 + (blk // G) * GW + G * 52 + (blk % G) // 2)
    _weights_loaded(PDL, HAS_IDX)
    xl = tl.load(xw + blk * 64)
    xh = tl.load(xw + blk * 64 + 16)
    dl = tl.load(dx_ptr + xs + blk * 8)
    dh = tl.load(dx_ptr + xs + blk * 8 + 2)
    acc = tl.zeros([BN, NB, 2, 16], dtype=tl.float32)
    for _ in range(0, blocks_per_split, NB):
        nblk = blk + NB
        ok = nblk < blk_end
        nbody = r4 + (nblk // G) * GW + (nblk % G) * 52
        ql_n = tl.load(w_ptr + nbody + h4 * 16 + u4, mask=ok, other=0)
        qh_n = tl.load(w_ptr + nbody + 32 + h4 * 8 + u4 % 8, mask=ok, other=0)
        sw_n = tl.load(w_ptr + nbody + 48 + h4 * 2, mask=ok, other=0)
        sw2_n = tl.load(w_ptr + nbody + 49 + h4 * 2, mask=ok, other=0)
        dw_n = tl.load(w_ptr + r4 + (nblk // G) * GW + G * 52 + (nblk % G) // 2, mask=ok, other=0)
        xl_n = tl.load(xw + nblk * 64, mask=ok, other=0)
        xh_n = tl.load(xw + nblk * 64 + 16, mask=ok, other=0)
        dl_n = tl.load(dx_ptr + xs + nblk * 8, mask=ok, other=0.0)
        dh_n = tl.load(dx_ptr + xs + nblk * 8 + 2, mask=ok, other=0.0)
        q_lo = (ql & 0x0F0F0F0F) | (((qh >> qh_shift) & 0x03030303) << 4)
        q_hi = ((ql >> 4) & 0x0F0F0F0F) | (((qh >> (qh_shift + 4)) & 0x03030303) << 4)
        c_lo = _dp4a(q_lo, xl, 0, USE_ASM) - _dp4a(tl.zeros_like(xl) + 0x20202020, xl, 0, USE_ASM)
        c_hi = _dp4a(q_hi, xh, 0, USE_ASM) - _dp4a(tl.zeros_like(xh) + 0x20202020, xh, 0, USE_ASM)
        sc_lo = (sw << sc_shift) >> 24  # the signed scale byte u // 4 of the word
        sc_hi = (sw2 << sc_shift) >> 24
        # d of block blk % G of its group: half (blk % G) % 2 of the word, which is blk % 2 for even G
        d = _f16_lo(dw >> (16 * (blk % 2 if G % 2 == 0 else (blk % G) % 2)))
        acc += d * ((c_lo * sc_lo).to(tl.float32) * dl + (c_hi * sc_hi).to(tl.float32) * dh)
        ql, qh, sw, sw2, dw, xl, xh, dl, dh = ql_n, qh_n, sw_n, sw2_n, dw_n, xl_n, xh_n, dl_n, dh_n
        blk = nblk
    res = tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=1)
    _m1_store(res, rows, N, out_ptr, part_ptr, cnt_ptr, mix_ptr, tile, split, g, n_tiles, n_groups, stride_os,
              stride_og, SPLITS, SP, COMBINE, GP)


@triton.jit
def _q8_0_r8_m1_kernel(xq_ptr, dx_ptr, w_ptr, out_ptr, part_ptr, cnt_ptr, mix_ptr, idx_ptr, N, blocks_per_split,
                       row_vecs, expert_vecs, K, x_div, stride_os, stride_og, BN: tl.constexpr, NB: tl.constexpr,
                       HAS_IDX: tl.constexpr, SPLITS: tl.constexpr, SP: tl.constexpr, COMBINE: tl.constexpr, GP:
                       tl.constexpr, USE_ASM: tl.constexpr, PDL: tl.constexpr):
    """One x row times Q8_0_R8 rows (quant/blocks.py: per 256 elements, 8 x 32 int8 quants, then
    their 8 f16 d; 68 words). Tile [16 quads q, NB steps, BN rows, 4 words w]: quant word 4q + w
    holds elements 16q + 4w .. +3 (block q // 2), as does x's int8 word 64 * step + 4q + w, so a
    quad is one 16-byte load of each and its 4 dp4a sum in int32, scaled once by d * dx. The quad
    axis comes first so that the compiler lays a warp's threads along K (coalesced); strides come
    in 16-byte units (row_vecs), which tells it the quads are 16-byte aligned. Every load of step
    i + 1 is in flight during step i."""
    tile, n_tiles, n_groups = tl.program_id(0), tl.num_programs(0), tl.num_programs(2)
    split = tl.program_id(1)
    g = tl.program_id(2)
    rows, wrow = _m1_rows(idx_ptr, N, row_vecs, expert_vecs, tile, g, BN, HAS_IDX, PDL)
    r4 = wrow[None, None, :, None]
    q4 = tl.arange(0, 16)[:, None, None, None]
    b4 = tl.arange(0, NB)[None, :, None, None]
    w4 = tl.arange(0, 4)[None, None, None, :]
    xrow = (g // x_div).to(tl.int64) * (K // 256)
    qp = w_ptr + r4 + q4 * 4 + w4  # + step * 68: the quant words
    dp = w_ptr + r4 + 64 + q4 // 4  # + step * 68: the d of blocks 2 (q // 4) and + 1
    d_shift = 16 * ((q4 // 2) % 2)
    # x per row too (0 * r4): tiles shaped as qp's get its layout (no conversion through shared
    # memory in the loop), and the compiler merges the repeated rows' loads
    xp = xq_ptr + xrow * 64 + q4 * 4 + w4 + 0 * r4  # + step * 64
    sp = dx_ptr + xrow * 8 + q4 // 2 + 0 * r4  # + step * 8
    blk_end = (split + 1) * blocks_per_split
    blk = split * blocks_per_split + b4
    qw = tl.load(qp + blk * 68)
    dw = tl.load(dp + blk * 68)
    _weights_loaded(PDL, HAS_IDX)
    xw = tl.load(xp + blk * 64)
    dx = tl.load(sp + blk * 8)
    acc = tl.zeros([16, NB, BN, 1], dtype=tl.float32)
    for _ in range(0, blocks_per_split, NB):
        nblk = tl.minimum(blk + NB, blk_end - 1)  # the last iteration reloads its own step: no masks
        qw_n = tl.load(qp + nblk * 68)
        dw_n = tl.load(dp + nblk * 68)
        xw_n = tl.load(xp + nblk * 64)
        dx_n = tl.load(sp + nblk * 8)
        c = tl.sum(_dp4a_ss(qw, xw, 0, USE_ASM), axis=3, keep_dims=True)  # [16, NB, BN, 1], exact
        acc += c.to(tl.float32) * (_f16_lo(dw >> d_shift) * dx)
        qw, dw, xw, dx = qw_n, dw_n, xw_n, dx_n
        blk = nblk
    res = tl.sum(tl.sum(tl.sum(acc, axis=3), axis=1), axis=0)
    _m1_store(res, rows, N, out_ptr, part_ptr, cnt_ptr, mix_ptr, tile, split, g, n_tiles, n_groups, stride_os,
              stride_og, SPLITS, SP, COMBINE, GP)


@triton.jit
def _pick(v, i4, I: tl.constexpr):
    """Word I of the 4 int32 words [..., 4] one thread holds, as [..., 1]: a register, no arithmetic."""
    return tl.sum(tl.where(i4 == I, v, 0), axis=3, keep_dims=True)


@triton.jit
def _q2k_field(qw, xw, dxw, sw, dd, dm, a4, i4, J: tl.constexpr, USE_ASM: tl.constexpr):
    """`_q2k_r8_m1_kernel`'s products of bit field J (bits 2J, 2J + 1 of each quant byte) with x's
    words xw; dxw: x's 4 scales of the quad's x blocks, sw: the 16 scale bytes, dd / dm: d / dmin."""
    # masked in place: bytes q * 4^J (<= 192) in the exact integer dot; 4^-J goes with d
    c = tl.sum(_dp4a(qw & (tl.full([], 0x03030303, tl.int32) << 2 * J), xw, 0, USE_ASM), axis=3, keep_dims=True)
    s = tl.sum(_dp4a(tl.full(xw.shape, 0x01010101, tl.int32), xw, 0, USE_ASM), axis=3, keep_dims=True)  # sum of x
    # sub-block 8 (a // 2) + 2J + a % 2: scale byte 2 (J % 2) + a % 2 of word 2 (a // 2) + J // 2
    word = tl.where(a4 < 2, _pick(sw, i4, J // 2), _pick(sw, i4, 2 + J // 2))
    byte = (word >> (8 * (a4 % 2) + 16 * (J % 2))) & 255
    dx = _pick(dxw.to(tl.int32, bitcast=True), i4, J).to(tl.float32, bitcast=True)
    return dx * ((dd * 0.25 ** J) * ((byte & 15) * c).to(tl.float32) - dm * ((byte >> 4) * s).to(tl.float32))


@triton.jit
def _q2k_r8_m1_kernel(xq_ptr, dx_ptr, w_ptr, out_ptr, part_ptr, cnt_ptr, mix_ptr, idx_ptr, N, blocks_per_split,
                      row_quads, expert_quads, K, x_div, stride_os, stride_og, BN: tl.constexpr, NB: tl.constexpr,
                      HAS_IDX: tl.constexpr, SPLITS: tl.constexpr, SP: tl.constexpr, COMBINE: tl.constexpr, GP:
                      tl.constexpr, USE_ASM: tl.constexpr, PDL: tl.constexpr):
    """One x row times Q2_K_R8 rows (quant/blocks.py: per 2048 elements, 8 Q2_K bodies of 20 words
    (16 scale bytes: low nibble scale, high nibble min, per 16 elements; 64 bytes of 2-bit quants),
    then their 8 words d | dmin << 16; 168 words). Tile [4 quads a, NB blocks, BN rows, 4 words i]:
    bits 2J of quant word 4a + i hold elements 128 (a // 2) + 32 J + 16 (a % 2) + 4i .. + 3, which
    is x's int8 word 32 (a // 2) + 8 J + 4 (a % 2) + i, of sub-block 8 (a // 2) + 2J + a % 2. Value
    d * sc * q - dmin * m: the mins take x's sums per 16, one dp4a by 0x01010101 per x word.
    Every load is a 16-byte word per thread in one layout (x per row too, 0 * r: no conversion
    through shared memory in the loop; the quad axis first: a warp's threads along K), and every
    load of step i + 1 is in flight during step i."""
    tile, n_tiles, n_groups = tl.program_id(0), tl.num_programs(0), tl.num_programs(2)
    split = tl.program_id(1)
    g = tl.program_id(2)
    rows, wrow = _m1_rows(idx_ptr, N, row_quads, expert_quads, tile, g, BN, HAS_IDX, PDL)
    xrow = (g // x_div).to(tl.int64)
    a4 = tl.arange(0, 4)[:, None, None, None]
    b4 = tl.arange(0, NB)[None, :, None, None]
    r4 = wrow[None, None, :, None]
    i4 = tl.arange(0, 4)[None, None, None, :]
    xw = xq_ptr + xrow * (K // 4) + 32 * (a4 // 2) + 4 * (a4 % 2) + i4 + 0 * r4  # + block * 64 + 8J: field J's
    xs = dx_ptr + xrow * (K // 32) + 4 * (a4 // 2) + i4 + 0 * r4  # + block * 8: their 4 scales (J = i)
    blk_end = (split + 1) * blocks_per_split
    blk = split * blocks_per_split + b4
    grp = w_ptr + r4 + (blk // 8) * 168  # each block's group of 8
    qw = tl.load(grp + (blk % 8) * 20 + 4 + 4 * a4 + i4)
    sw = tl.load(grp + (blk % 8) * 20 + i4 + 0 * a4)  # the 16 scale bytes
    hw = tl.load(grp + 160 + 4 * (blk % 8 // 4) + i4 + 0 * a4)  # the quad of headers with this block's
    _weights_loaded(PDL, HAS_IDX)
    x0, x1 = tl.load(xw + blk * 64), tl.load(xw + blk * 64 + 8)
    x2, x3 = tl.load(xw + blk * 64 + 16), tl.load(xw + blk * 64 + 24)
    dxw = tl.load(xs + blk * 8)
    acc = tl.zeros([4, NB, BN, 1], dtype=tl.float32)
    for _ in range(0, blocks_per_split, NB):
        nblk = tl.minimum(blk + NB, blk_end - 1)  # the last iteration reloads its own step: no masks
        ngrp = w_ptr + r4 + (nblk // 8) * 168
        qw_n = tl.load(ngrp + (nblk % 8) * 20 + 4 + 4 * a4 + i4)
        sw_n = tl.load(ngrp + (nblk % 8) * 20 + i4 + 0 * a4)
        hw_n = tl.load(ngrp + 160 + 4 * (nblk % 8 // 4) + i4 + 0 * a4)
        x0_n, x1_n = tl.load(xw + nblk * 64), tl.load(xw + nblk * 64 + 8)
        x2_n, x3_n = tl.load(xw + nblk * 64 + 16), tl.load(xw + nblk * 64 + 24)
        dxw_n = tl.load(xs + nblk * 8)
        h = tl.sum(tl.where(i4 == blk % 4, hw, 0), axis=3, keep_dims=True)  # d | dmin << 16
        dd = _f16_lo(h)
        dm = _f16_lo(h >> 16)
        acc += _q2k_field(qw, x0, dxw, sw, dd, dm, a4, i4, 0, USE_ASM)
        acc += _q2k_field(qw, x1, dxw, sw, dd, dm, a4, i4, 1, USE_ASM)
        acc += _q2k_field(qw, x2, dxw, sw, dd, dm, a4, i4, 2, USE_ASM)
        acc += _q2k_field(qw, x3, dxw, sw, dd, dm, a4, i4, 3, USE_ASM)
        qw, sw, hw, x0, x1, x2, x3, dxw = qw_n, sw_n, hw_n, x0_n, x1_n, x2_n, x3_n, dxw_n
        blk = nblk
    res = tl.sum(tl.sum(tl.sum(acc, axis=3), axis=1), axis=0)
    _m1_store(res, rows, N, out_ptr, part_ptr, cnt_ptr, mix_ptr, tile, split, g, n_tiles, n_groups, stride_os,
              stride_og, SPLITS, SP, COMBINE, GP)


@triton.jit
def _table_words(grid_ptr, signs_ptr, r, s7, USE_ASM: tl.constexpr):
    """IQ2_XXS grid row(s) r as two int32 words (8 magnitudes, a byte each) and sign pattern(s) s7
    (8 bits), from the L1-resident tables. On the GPU as inline loads, which take the layout of r:
    a tl.load gather would get its own (no vector axis) and a conversion through shared memory."""
    if USE_ASM:
        g0, g1 = tl.inline_asm_elementwise("ld.global.nc.v2.b32 {$0, $1}, [$2];", "=r,=r,l",
                                           [(grid_ptr + 2 * r).to(tl.int64, bitcast=True)],
                                           dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
        sb = tl.inline_asm_elementwise("ld.global.nc.u8 $0, [$1];", "=r,l",
                                       [(signs_ptr + s7).to(tl.int64, bitcast=True)], dtype=tl.int32, is_pure=True,
                                       pack=1)
    else:
        g0, g1 = tl.load(grid_ptr + 2 * r), tl.load(grid_ptr + 2 * r + 1)
        sb = tl.load(signs_ptr + s7).to(tl.int32)
    return g0, g1, sb


@triton.jit
def _signed(g, nib):
    """Grid word g (4 magnitudes 8..43) with byte t negated where bit t of nib (0..15) is set."""
    neg = (nib * 0x00204081) & 0x01010101  # bit t -> byte t (the 4 shifted copies don't overlap)
    return (g ^ (neg * 255)) + neg  # per byte g or 256 - g: no carries between bytes


@triton.jit
def _iq2xxs_group(gi, aux, xa, xb, grid_ptr, signs_ptr, i4, USE_ASM: tl.constexpr):
    """The exact integer dot of one 32-element group (grid indices gi, sign/scale word aux; 8 per
    block) with its 8 x words (xa: words 0..3, xb: 4..7), times the group's 2s + 1."""
    c = tl.zeros_like(gi)
    for p in tl.static_range(4):  # elements 8p .. 8p + 7: grid row byte p, sign pattern bits 7p
        g0, g1, sb = _table_words(grid_ptr, signs_ptr, (gi >> 8 * p) & 255, (aux >> 7 * p) & 127, USE_ASM)
        xw = xa if p < 2 else xb
        c = _dp4a_ss(_signed(g0, sb & 15), _pick(xw, i4, 2 * (p % 2)), c, USE_ASM)
        c = _dp4a_ss(_signed(g1, sb >> 4), _pick(xw, i4, 2 * (p % 2) + 1), c, USE_ASM)
    return c * (2 * ((aux >> 28) & 15) + 1)


@triton.jit
def _iq2xxs_r8_m1_kernel(xq_ptr, dx_ptr, w_ptr, out_ptr, part_ptr, cnt_ptr, mix_ptr, idx_ptr, N, blocks_per_split,
                         row_quads, expert_quads, K, x_div, stride_os, stride_og, grid_ptr, signs_ptr, BN:
                         tl.constexpr, NB: tl.constexpr, HAS_IDX: tl.constexpr, SPLITS: tl.constexpr, SP:
                         tl.constexpr, COMBINE: tl.constexpr, GP: tl.constexpr, USE_ASM: tl.constexpr,
                         PDL: tl.constexpr):
    """One x row times IQ2_XXS_R8 rows (quant/blocks.py: per 2048 elements, 8 IQ2_XXS bodies of 16
    words, then their 8 f16 d; 132 words). Body words 2g, 2g + 1 of group g (32 elements, x's
    block g): 4 grid indices (byte p: elements 32g + 8p .. + 7, magnitudes in {8, 25, 43} from the
    256-row grid), then 4 7-bit sign-pattern indices (bits 7p; `signs` gives the 8-bit pattern)
    and the group's scale s (top 4 bits): value d * (2s + 1) / 8 * grid * sign. Tile [4 quads a,
    NB blocks, BN rows, 4 words]: quad a holds groups 2a and 2a + 1, whose x words come in 4
    16-byte loads (per row too, 0 * r: one layout, no conversion in the loop, as in
    `_q2k_r8_m1_kernel`). Every load of step i + 1 but the table reads is in flight during step i."""
    tile, n_tiles, n_groups = tl.program_id(0), tl.num_programs(0), tl.num_programs(2)
    split = tl.program_id(1)
    g = tl.program_id(2)
    rows, wrow = _m1_rows(idx_ptr, N, row_quads, expert_quads, tile, g, BN, HAS_IDX, PDL)
    xrow = (g // x_div).to(tl.int64)
    a4 = tl.arange(0, 4)[:, None, None, None]
    b4 = tl.arange(0, NB)[None, :, None, None]
    r4 = wrow[None, None, :, None]
    i4 = tl.arange(0, 4)[None, None, None, :]
    xw = xq_ptr + xrow * (K // 4) + 16 * a4 + i4 + 0 * r4  # + block * 64 + 4j: x words 4j .. of groups 2a, 2a + 1
    xs = dx_ptr + xrow * (K // 32) + 4 * (a4 // 2) + i4 + 0 * r4  # + block * 8: scales of groups 4 (a // 2) ..
    blk_end = (split + 1) * blocks_per_split
    blk = split * blocks_per_split + b4
    grp = w_ptr + r4 + (blk // 8) * 132
    qw = tl.load(grp + (blk % 8) * 16 + 4 * a4 + i4)
    dw = tl.load(grp + 128 + i4 + 0 * a4)  # the 8 d of the group
    _weights_loaded(PDL, HAS_IDX)
    x0, x1 = tl.load(xw + blk * 64), tl.load(xw + blk * 64 + 4)
    x2, x3 = tl.load(xw + blk * 64 + 8), tl.load(xw + blk * 64 + 12)
    dxw = tl.load(xs + blk * 8)
    acc = tl.zeros([4, NB, BN, 1], dtype=tl.float32)
    for _ in range(0, blocks_per_split, NB):
        nblk = tl.minimum(blk + NB, blk_end - 1)  # the last iteration reloads its own step: no masks
        ngrp = w_ptr + r4 + (nblk // 8) * 132
        qw_n = tl.load(ngrp + (nblk % 8) * 16 + 4 * a4 + i4)
        dw_n = tl.load(ngrp + 128 + i4 + 0 * a4)
        x0_n, x1_n = tl.load(xw + nblk * 64), tl.load(xw + nblk * 64 + 4)
        x2_n, x3_n = tl.load(xw + nblk * 64 + 8), tl.load(xw + nblk * 64 + 12)
        dxw_n = tl.load(xs + nblk * 8)
        c0 = _iq2xxs_group(_pick(qw, i4, 0), _pick(qw, i4, 1), x0, x1, grid_ptr, signs_ptr, i4, USE_ASM)
        c1 = _iq2xxs_group(_pick(qw, i4, 2), _pick(qw, i4, 3), x2, x3, grid_ptr, signs_ptr, i4, USE_ASM)
        # d of block blk % 8: half blk % 2 of word (blk % 8) // 2; x's scales of groups 2a, 2a + 1
        d = _f16_lo(tl.sum(tl.where(i4 == blk % 8 // 2, dw, 0), axis=3, keep_dims=True) >> 16 * (blk % 2)) * 0.125
        dx = dxw.to(tl.int32, bitcast=True)
        dx0 = tl.where(a4 % 2 == 0, _pick(dx, i4, 0), _pick(dx, i4, 2)).to(tl.float32, bitcast=True)
        dx1 = tl.where(a4 % 2 == 0, _pick(dx, i4, 1), _pick(dx, i4, 3)).to(tl.float32, bitcast=True)
        acc += d * (c0.to(tl.float32) * dx0 + c1.to(tl.float32) * dx1)
        qw, dw, x0, x1, x2, x3, dxw = qw_n, dw_n, x0_n, x1_n, x2_n, x3_n, dxw_n
        blk = nblk
    res = tl.sum(tl.sum(tl.sum(acc, axis=3), axis=1), axis=0)
    _m1_store(res, rows, N, out_ptr, part_ptr, cnt_ptr, mix_ptr, tile, split, g, n_tiles, n_groups, stride_os,
              stride_og, SPLITS, SP, COMBINE, GP)


@triton.jit
def _q4k_q6k_m1_kernel(xq_ptr, dx_ptr, sx_ptr, wa_ptr, wb_ptr, out_ptr, part_a, part_b, cnt_ptr, N_A, N_B,
                       bps_a, bps_b, quads_a, quads_b, K, stride_a, stride_b, TILES_A, TILES_B,
                       BN_A: tl.constexpr, NB_A: tl.constexpr, SPLITS_A: tl.constexpr, SP_A: tl.constexpr,
                       BN_B: tl.constexpr, NB_B: tl.constexpr, SPLITS_B: tl.constexpr, SP_B: tl.constexpr,
                       G: tl.constexpr, GW: tl.constexpr, USE_ASM: tl.constexpr, PDL: tl.constexpr):
    """One x row times a Q4_K matrix A [N_A, K] and a Q6_K_R8 / R3 matrix B [N_B, K] in one launch:
    out[:N_A] = A x, out[N_A:] = B x. Q4_K_M gives a layer's q and k Q4_K and its v Q6_K in half
    the layers, which then took a launch of their own (a 1024-row v: 5.4 us beside 9.1 for q and
    k on an H100). The first TILES_A * SPLITS_A programs run `_q4k_m1` (program p: row tile
    p % TILES_A, split p // TILES_A), the rest `_q6k_r8_m1`, each with its own tiles, K split,
    partials and counters (B's after A's TILES_A)."""
    pid = tl.program_id(0)
    g = pid * 0  # the one group (a tensor: the bodies index with it)
    if pid < TILES_A * SPLITS_A:
        _q4k_m1(pid % TILES_A, pid // TILES_A, g, TILES_A, 1, xq_ptr, dx_ptr, sx_ptr, wa_ptr, out_ptr, part_a, cnt_ptr,
                dx_ptr, dx_ptr, N_A, bps_a, quads_a, 0, K, 1, stride_a, 0, BN_A, NB_A, False, SPLITS_A, SP_A, False, 1,
                USE_ASM, PDL)
    else:
        p = pid - TILES_A * SPLITS_A
        _q6k_r8_m1(p % TILES_B, p // TILES_B, g, TILES_B, 1, xq_ptr, dx_ptr, wb_ptr, out_ptr + N_A, part_b,
                   cnt_ptr + TILES_A, dx_ptr, dx_ptr, N_B, bps_b, quads_b, 0, K, 1, stride_b, 0, BN_B, NB_B, False,
                   SPLITS_B, SP_B, False, 1, USE_ASM, G, GW, PDL)


def qgemv_q8_pair(x: torch.Tensor, a: tuple, b: tuple, xq=None) -> torch.Tensor:
    """[x @ A.T | x @ B.T] for one x row [1, K] in one launch (`_q4k_q6k_m1_kernel`); a = (raw, shape,
    config) of a Q4_K matrix, b = (raw, type name, shape, config) of a Q6_K_R8 / Q6_K_R3 one, each
    config a `qgemv_q8` one (bn, u, split, target, num_warps; A's num_warps serves both)."""
    (raw_a, (na, k), ca), (raw_b, name_b, (nb, kb), cb) = a, b
    if name_b not in _Q6K_GROUPS or kb != k or x.shape != (1, k) or k % 256:
        raise ValueError(f"qgemv_q8_pair: Q4_K {(na, k)} with {name_b} {(nb, kb)} for x {tuple(x.shape)}")
    for raw in (raw_a, raw_b):
        if raw.dtype != torch.uint8 or raw.stride(1) != 1 or raw.stride(0) % 16 or raw.data_ptr() % 16:
            raise ValueError(f"qgemv_q8_pair: unsupported layout {tuple(raw.shape)}")
    xq, dx, sx = xq if xq is not None else quantize_x(x)
    out = torch.empty((1, na + nb), dtype=x.dtype, device=x.device)
    segs = []
    for n, cfg in ((na, ca), (nb, cb)):
        bn = cfg.get("bn", 8)
        u, split, _, dst = plan_gemv("qgemv_q8_pair", x, n, k // 256, 1, triton.cdiv(n, bn), cfg.get("u", 1),
                                     cfg.get("split"), cfg.get("target", 264), out[:, :n])
        segs.append((bn, u, split, triton.cdiv(n, bn), dst if split > 1 else out))
    (bn_a, u_a, sp_a, t_a, dst_a), (bn_b, u_b, sp_b, t_b, dst_b) = segs
    cnt = split_counters(x.device, t_a + t_b) if sp_a > 1 or sp_b > 1 else dx  # dx: unread
    _q4k_q6k_m1_kernel[(t_a * sp_a + t_b * sp_b,)](
        xq.view(torch.int32), dx, sx, raw_a.view(torch.int32), raw_b.view(torch.int32), out, dst_a, dst_b, cnt, na,
        nb, k // 256 // sp_a, k // 256 // sp_b, raw_a.stride(0) // 16, raw_b.stride(0) // 16, k,
        dst_a.stride(0) if sp_a > 1 else 0, dst_b.stride(0) if sp_b > 1 else 0, t_a, t_b, BN_A=bn_a, NB_A=u_a,
        SPLITS_A=sp_a, SP_A=triton.next_power_of_2(sp_a), BN_B=bn_b, NB_B=u_b, SPLITS_B=sp_b,
        SP_B=triton.next_power_of_2(sp_b), USE_ASM=x.is_cuda, num_warps=ca.get("num_warps", 4),
        **_Q6K_GROUPS[name_b], **pdl.launch(x.device))
    return out


_TABLES: dict = {}


def _iq2_tables(device) -> tuple[torch.Tensor, torch.Tensor]:
    """IQ2_XXS's grid as int32 [256 x 2] (each row's 8 magnitudes, 4 bytes to a word) and its 128
    8-bit sign patterns (uint8), on `device`: 2 KB + 128 B that stay in L1."""
    if device not in _TABLES:
        from ...quant.blocks import _IQ2_XXS_GRID, _IQ2_XXS_SIGNS  # noqa: PLC0415
        g = _IQ2_XXS_GRID.to(torch.int32).view(256, 2, 4) << torch.tensor([0, 8, 16, 24], dtype=torch.int32)
        _TABLES[device] = (g.sum(-1, dtype=torch.int32).reshape(-1).to(device),
                           _IQ2_XXS_SIGNS.to(torch.uint8).to(device))
    return _TABLES[device]


# the regrouped types (quant/blocks.py), one x row only (`supports`); IQ2_XXS_R8 also reads the tables
ONE_ROW = {"Q6_K_R8": _q6k_r8_m1_kernel, "Q6_K_R3": _q6k_r8_m1_kernel, "Q8_0_R8": _q8_0_r8_m1_kernel,
           "Q2_K_R8": _q2k_r8_m1_kernel, "IQ2_XXS_R8": _iq2xxs_r8_m1_kernel}
_Q6K_GROUPS = {"Q6_K_R8": dict(G=8, GW=420), "Q6_K_R3": dict(G=3, GW=160)}  # blocks, int32 words per group
SUPPORTED = ("Q4_K", *ONE_ROW)


def supports(bt_name: str, m: int) -> bool:
    return bt_name == "Q4_K" or (bt_name in ONE_ROW and m == 1)


def qgemv_q8(x: torch.Tensor, raw: torch.Tensor, bt_name: str, shape, out: torch.Tensor | None = None,
             bn: int = 8, u: int = 1, split: int | None = None, num_warps: int = 4, target: int = 264,
             prefetch: bool = True, idx: torch.Tensor | None = None, x_div: int = 1, xq=None,
             m1: bool = False, combine: torch.Tensor | None = None, swiglu: bool = False,
             limit: float | None = None):
    """out [M, N] = x [M, K] @ W.T with x rounded to int8 per 32 (see the module doc); M <= 16.
    MoE form as `gguf.qgemv`: idx [G] experts of raw [E * N, row_bytes], out [G, N], x row g // x_div.
    xq: a `quantize_x(x)` result to reuse (several matrices reading the same x). m1: one x row
    through `_q4k_m1_kernel` (the decode step's form); the `ONE_ROW` types have only that form.
    combine [G] fp32 (one-row MoE form, one token's G expert pairs): out [1, N] = sum_g combine[g] *
    (row g), the routing weights' sum formed by the kernel.
    swiglu (Q4_K, one x row, a gate/up matrix [gate; up], bn % 32 == 0 dividing N / 2): returns
    (out, the int8 rows of silu(gate) * up for the down projection: `quantize_swiglu(out, limit)`),
    formed by the kernel (`_swiglu_pair`)."""
    n, k = shape
    moe = idx is not None
    m = 1 if moe else x.shape[0]
    if not supports(bt_name, m):
        raise ValueError(f"qgemv_q8: {bt_name} is not supported for {m} x rows ({', '.join(SUPPORTED)}; "
                         f"{', '.join(ONE_ROW)}: one row)")
    groups = len(idx) if moe else 1
    if k % 256 or raw.dtype != torch.uint8 or raw.stride(1) != 1 or raw.stride(0) % 16 or raw.data_ptr() % 16:
        raise ValueError(f"qgemv_q8: unsupported layout {tuple(raw.shape)} for {shape}")
    if x.shape[-1] != k or not 1 <= m <= 16 or (moe and x.shape[0] * x_div != groups):
        raise ValueError(f"qgemv_q8: x {tuple(x.shape)} for weight {shape}")
    xq, dx, sx = xq if xq is not None else quantize_x(x)
    n_blocks = k // 256
    u, split, out, dst = plan_gemv("qgemv_q8", x, n, n_blocks, groups if moe else m, triton.cdiv(n, bn) * groups, u,
                                   split, target, out)
    grid = (triton.cdiv(n, bn), split, groups)
    common = dict(M=m, MP=1 << (m - 1).bit_length(), BN=bn, NB=u, HAS_IDX=moe, USE_ASM=x.is_cuda, num_warps=num_warps,
                  **pdl.launch(x.device))
    strides = (k, x_div, 0 if split == 1 else dst.stride(0), dst.stride(-2) if moe else 0, dst.stride(-2))
    idx_arg = idx if moe else dx
    one_row = bt_name in ONE_ROW or (m1 and m == 1)
    if combine is not None:
        if not (moe and one_row and combine.shape == (groups,) and combine.is_contiguous()):
            raise ValueError(f"qgemv_q8: combine needs the one-row MoE form and a weight per pair ({groups}), "
                             f"got {tuple(combine.shape)}")
        out = torch.empty((1, n), dtype=x.dtype, device=x.device)  # sum_g combine[g] * (row g)
        if dst.shape[0] != split or dst.dim() != 3:  # partials even without a K split
            dst = torch.empty((split, groups, n), dtype=torch.float32, device=x.device)
        strides = (*strides[:2], dst.stride(0), dst.stride(1), dst.stride(1))
    # the one-row kernels finish a K split (and a combine) themselves (`_m1_store`): a counter per row tile
    finish = dict(SPLITS=split, SP=triton.next_power_of_2(split), COMBINE=combine is not None,
                  GP=triton.next_power_of_2(groups))
    cnt = split_counters(x.device, grid[0] * groups) if split > 1 or combine is not None else dx  # dx: unread
    w_arg = combine if combine is not None else dx
    sw = dict(SWIGLU=False, LIMIT=False)
    sw_args = (dx, dx, dx, dx, 0.0)  # unread stand-ins
    if swiglu:
        half = n // 2
        if bt_name != "Q4_K" or not (m1 and m == 1) or combine is not None or n % 2 or bn % 32 or half % bn:
            raise ValueError(f"qgemv_q8: swiglu needs the Q4_K one-row form and bn % 32 == 0 dividing N / 2 "
                             f"({bt_name}, N {n}, bn {bn})")
        sq = torch.empty((groups, half), dtype=torch.int8, device=x.device)
        sdx = torch.empty((groups, half // QBLOCK), dtype=torch.float32, device=x.device)
        ssx = torch.empty_like(sdx)
        counters = split_counters(x.device, grid[0] * groups + half // bn * groups)  # the split's, then the pairs'
        cnt, pairs = counters, counters[grid[0] * groups:]
        sw = dict(SWIGLU=True, LIMIT=bool(limit))
        sw_args = (sq, sdx, ssx, pairs, float(limit or 0.0))
    if bt_name in ONE_ROW:
        tables = _iq2_tables(raw.device) if bt_name == "IQ2_XXS_R8" else ()
        ONE_ROW[bt_name][grid](xq.view(torch.int32), dx, raw.view(torch.int32), out, dst, cnt, w_arg, idx_arg, n,
                               n_blocks // split, raw.stride(0) // 16, n * raw.stride(0) // 16, k, x_div, strides[2],
                               strides[3], *tables, BN=bn, NB=u, HAS_IDX=moe, USE_ASM=x.is_cuda,
                               num_warps=num_warps, **finish, **_Q6K_GROUPS.get(bt_name, {}), **pdl.launch(x.device))
        return out
    if m1 and m == 1:
        _q4k_m1_kernel[grid](xq.view(torch.int32), dx, sx, raw.view(torch.int32), out, dst, cnt, w_arg, idx_arg, n,
                             n_blocks // split, raw.stride(0) // 16, n * raw.stride(0) // 16, k, x_div, strides[2],
                             strides[3], *sw_args, BN=bn, NB=u, HAS_IDX=moe, USE_ASM=x.is_cuda, num_warps=num_warps,
                             **finish, **sw, **pdl.launch(x.device))
        return (out, sw_args[:3]) if swiglu else out
    _q4k_kernel[grid](xq.view(torch.int32), dx, sx, raw.view(torch.int32), raw, dst, idx_arg, n, n_blocks // split,
                      raw.stride(0) // 4, n * raw.stride(0) // 4, *strides, PREFETCH=prefetch, **common)
    return finish_gemv(dst, out)
