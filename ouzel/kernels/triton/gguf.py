"""GGUF-block matmuls in Triton that read the stored blocks directly (no repacked copy).

Reference: `ouzel.quant.blocks.dequantize` (exact torch dequantizer) followed by `F.linear`
(`ouzel.kernels.ops.linear_reference`). The kernels decode one 256-element step of K at a time
for a tile of output rows, with integer ops on the block bytes in registers:

- `qgemv` (M = 1..16 rows of x): one program per BN output rows, a loop over K in 256-element
  steps, fp32 accumulation; each weight byte is read from memory once (the scale bytes are
  re-read per element but from L1).
  With `idx` (MoE decode) each program column is one (token, expert) pair, the expert id read on
  the device.
- `qdequant`: the same decoder writing a dense [N, K] matrix (fp32/bf16/fp16) for large M, which
  then goes to cuBLAS (tensor cores) through torch.matmul.
- `qgemm_experts` (MoE prefill): pairs sorted by expert, each tile one expert's pairs (16 by default:
  a prefill gives each expert few); the decoder feeds tl.dot directly, so no expert is written out
  dense. The decode of every expert's blocks bounds it, so `_quads` loads each stored byte once (as
  32-bit words where the block layout allows) and turns bytes into floats with one PRMT each;
  IQ2_XXS and Q2_K skip the floats: one PRMT forms two bf16 weights from a table of their bytes
  (`_iq2_bf16`, `_q2k_bf16`). With swiglu the gate/up GEMM stores silu(gate) * up itself.
- `q8_gemm` (dense prefill on Q8_0_R8 weights, or a block-diagonal one by groups): one launch.

Why direct reads rather than a repack at load: no second copy of the weights (MoE models are
large), and the decoder is the same one-screen function per type for both paths.

Per step of 256 elements a type is viewed as a [S, L] tile (S * L = 256):
Q4_K [8, 32] (sub-blocks of 32), Q6_K [16, 16], Q8_0 and Q4_0 [8, 32] (8 blocks of 32), Q2_K
[16, 16], IQ2_XXS [8, 32] (its 256-entry grid and 128 sign patterns come in as small tables); the
`_R8` / `_R3` regroupings of quant/blocks.py as their base types.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import pdl
from .pdl import wait_for_inputs

# type ids (constexpr in the kernels): name -> (id, S, L, GGUF's bytes per 256-element step)
_TYPES = {"Q4_K": (0, 8, 32, 144), "Q6_K": (1, 16, 16, 210), "Q8_0": (2, 8, 32, 272), "Q4_0": (3, 8, 32, 144),
          "Q2_K": (4, 16, 16, 84), "IQ2_XXS": (5, 8, 32, 66), "Q6_K_R8": (6, 16, 16, 210),
          "Q8_0_R8": (7, 8, 32, 272), "Q2_K_R8": (8, 16, 16, 84), "IQ2_XXS_R8": (9, 8, 32, 66),
          "Q6_K_R3": (10, 16, 16, 210)}
STEP = 256
MAX_GEMV_M = 16
_PTX = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")  # inline PTX: not in the CPU interpreter


def supports(bt_name: str) -> bool:
    return bt_name in _TYPES


@triton.jit
def _f16_at(p):
    """The little-endian float16 at byte pointer(s) p, as float32."""
    lo = tl.load(p).to(tl.uint16)
    hi = tl.load(p + 1).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _int_f32(q, bias: tl.constexpr):
    """float(q) - bias for int32 0 <= q < 2**22, without the slow int-to-float unit: the bits
    0x4B000000 | q are the float 2**23 + q."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + bias)


@triton.jit
def _body_head(row_ptr, kb, G: tl.constexpr, GROUP: tl.constexpr, BODY: tl.constexpr, HEAD: tl.constexpr):
    """Byte pointers to block kb's body and header for blocks stored as groups of G: the G bodies
    (BODY bytes each) first, then their G headers (HEAD bytes each), GROUP bytes per group with
    any padding. G = 1 is GGUF's own layout of a body-then-header block (Q6_K, Q2_K); the `_R8` /
    `_R3` regroupings of quant/blocks.py are G = 8 / 3."""
    base = row_ptr + (kb // G) * GROUP
    return base + (kb % G) * BODY, base + G * BODY + (kb % G) * HEAD


@triton.jit
def _q6k_at(row_ptr, kb, TYPE: tl.constexpr):
    """Q6_K (type 1; 208-byte body, f16 d), Q6_K_R8 (6), Q6_K_R3 (10: 10 bytes of padding)."""
    G: tl.constexpr = 1 if TYPE == 1 else (8 if TYPE == 6 else 3)
    GROUP: tl.constexpr = 210 if TYPE == 1 else (1680 if TYPE == 6 else 640)
    return _body_head(row_ptr, kb, G, GROUP, 208, 2)


@triton.jit
def _q2k_at(row_ptr, kb, TYPE: tl.constexpr):
    """Q2_K (type 4; 80-byte body, then d, dmin), Q2_K_R8 (8)."""
    G: tl.constexpr = 1 if TYPE == 4 else 8
    GROUP: tl.constexpr = 84 if TYPE == 4 else 672
    return _body_head(row_ptr, kb, G, GROUP, 80, 4)


@triton.jit
def _decode(row_ptr, kb, grid_ptr, signs_ptr, TYPE: tl.constexpr, S: tl.constexpr, L: tl.constexpr):
    """row_ptr: [BN, 1, 1] byte pointers to each row's blocks; kb: 256-element step index.
    Returns (q float32 [BN, S, L], scale, offset [BN, S, 1] or [BN, 1, 1]): elements
    kb*256 + s*L + l of each row are scale * q - offset, computed as the reference does."""
    s = tl.arange(0, S)[None, :, None]
    l = tl.arange(0, L)[None, None, :]
    if TYPE == 0:  # Q4_K: d, dmin f16; 12 B of 6-bit scales/mins; 128 B nibbles
        b = row_ptr + kb * 144
        d = _f16_at(b)
        dmin = _f16_at(b + 2)
        j = s % 4
        a = tl.load(b + 4 + j).to(tl.int32)
        m = tl.load(b + 8 + j).to(tl.int32)
        c = tl.load(b + 12 + j).to(tl.int32)
        sc = tl.where(s < 4, a & 63, (c & 15) | ((a >> 2) & 48))
        mn = tl.where(s < 4, m & 63, (c >> 4) | ((m >> 2) & 48))
        q = tl.load(b + 16 + (s // 2) * 32 + l).to(tl.int32)
        qf = _int_f32((q >> ((s % 2) * 4)) & 15, 0.0)
        scale = d * _int_f32(sc, 0.0)
        offset = dmin * _int_f32(mn, 0.0)
    elif TYPE == 1 or TYPE == 6 or TYPE == 10:  # Q6_K: ql 128 B, qh 64 B, 16 int8 scales, d f16 (Q6_K_R8: d
        # after 8 bodies; Q6_K_R3: d after 3 bodies, then 10 B of padding)
        b, d_at = _q6k_at(row_ptr, kb, TYPE)
        e = (s % 8) * 16 + l  # position within a 128-element half
        half = s // 8
        ql = tl.load(b + half * 64 + (e % 64)).to(tl.int32)
        qh = tl.load(b + 128 + half * 32 + (e % 32)).to(tl.int32)
        q = ((ql >> ((e // 64) * 4)) & 15) | (((qh >> ((e // 32) * 2)) & 3) << 4)
        qf = _int_f32(q, 32.0)
        sc = tl.load(b + 192 + s).to(tl.int8, bitcast=True).to(tl.float32)
        scale = _f16_at(d_at) * sc
        offset = 0.0
    elif TYPE == 2 or TYPE == 7:  # Q8_0: 8 blocks of (d f16, 32 int8) (Q8_0_R8: 8 x 32 int8, then 8 d)
        if TYPE == 2:
            b = row_ptr + (kb * 8 + s) * 34
            scale = _f16_at(b)
            b += 2
        else:
            b = row_ptr + kb * 272 + s * 32
            scale = _f16_at(row_ptr + kb * 272 + 256 + s * 2)
        qf = _int_f32(tl.load(b + l).to(tl.int32) ^ 0x80, 128.0)
        offset = 0.0
    elif TYPE == 4 or TYPE == 8:  # Q2_K: 16 scale bytes (low 4 bits scale, high 4 min), 64 B of 2-bit quants,
        # d, dmin (Q2_K_R8: 8 bodies of 80 B, then the 8 d, dmin)
        b, h = _q2k_at(row_ptr, kb, TYPE)
        sc = tl.load(b + s).to(tl.int32)  # sub-block s of 16: half s // 8, shift 2 * ((s % 8) // 2)
        q = tl.load(b + 16 + (s // 8) * 32 + (s % 2) * 16 + l).to(tl.int32)
        qf = _int_f32((q >> (2 * ((s % 8) // 2))) & 3, 0.0)
        scale = _f16_at(h) * _int_f32(sc & 15, 0.0)
        offset = _f16_at(h + 2) * _int_f32(sc >> 4, 0.0)
    elif TYPE == 5 or TYPE == 9:  # IQ2_XXS: d f16, then per 32: 4 grid-index bytes, u32 of 4 x 7-bit sign ids |
        # scale << 28 (IQ2_XXS_R8: 8 bodies of 64 B, then the 8 d)
        if TYPE == 5:
            b = row_ptr + kb * 66
            g = b + 2 + s * 8
        else:
            b = row_ptr + (kb // 8) * 528 + 512 + (kb % 8) * 2
            g = row_ptr + (kb // 8) * 528 + (kb % 8) * 64 + s * 8
        aux = (tl.load(g + 4).to(tl.int32) | (tl.load(g + 5).to(tl.int32) << 8)
               | (tl.load(g + 6).to(tl.int32) << 16) | (tl.load(g + 7).to(tl.int32) << 24))  # [BN, S, 1]
        part = l // 8  # 4 parts of 8 values, each a grid row with its own sign pattern
        grid = tl.load(grid_ptr + tl.load(g + part).to(tl.int32) * 8 + l % 8)
        signs = tl.load(signs_ptr + ((aux >> (7 * part)) & 127))
        qf = grid * (1 - 2 * ((signs >> (l % 8)) & 1)).to(tl.float32)
        scale = _f16_at(b) * (0.5 + ((aux >> 28) & 15).to(tl.float32)) * 0.25
        offset = 0.0
    else:  # Q4_0: 8 blocks of (d f16, 16 B nibbles: low = elems 0..15, high = 16..31)
        b = row_ptr + (kb * 8 + s) * 18
        scale = _f16_at(b)
        q = tl.load(b + 2 + (l % 16)).to(tl.int32)
        qf = _int_f32((q >> ((l // 16) * 4)) & 15, 8.0)
        offset = 0.0
    return qf, scale, offset


@triton.jit
def _qgemv_kernel(x_ptr, w_ptr, out_ptr, idx_ptr, grid_ptr, signs_ptr, N, steps_per_split, row_bytes, expert_bytes,
                  stride_xm, stride_xg, x_div, stride_os, stride_og, stride_om,
                  M: tl.constexpr, MP: tl.constexpr, TYPE: tl.constexpr, S: tl.constexpr,
                  L: tl.constexpr, BN: tl.constexpr, U: tl.constexpr, HAS_IDX: tl.constexpr,
                  STAGES: tl.constexpr = 1, PDL: tl.constexpr = False):
    """Program (i, j): rows i*BN.., K steps [j*steps_per_split, (j+1)*steps_per_split), U steps
    decoded per iteration (more loads in flight); writes out[j, m, row] (fp32 partials if split)."""
    wait_for_inputs(PDL)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    g = tl.program_id(2)  # MoE: (token, expert) pair g uses x row g // x_div and expert idx[g]
    rows = pid * BN + tl.arange(0, BN)
    rows_c = tl.minimum(rows, N - 1)  # tail rows re-read the last row; their results are not stored
    wrow = rows_c.to(tl.int64) * row_bytes
    if HAS_IDX:
        wrow += tl.load(idx_ptr + g).to(tl.int64) * expert_bytes
    row_ptr = (w_ptr + wrow)[:, None, None]
    x_ptr += (g // x_div) * stride_xg
    xo = tl.arange(0, S)[:, None] * L + tl.arange(0, L)[None, :]  # [S, L]
    mi = tl.arange(0, MP)[:, None]  # [MP, 1]
    acc = tl.zeros([MP, BN], dtype=tl.float32)
    acc1 = tl.zeros([BN, S, L], dtype=tl.float32)  # M = 1: elementwise, reduced once at the end
    k_begin = split * steps_per_split
    for i in tl.range(0, steps_per_split, U, num_stages=STAGES):
        kb0 = k_begin + i
        for u in tl.static_range(U):
            kb = kb0 + u
            qf, scale, offset = _decode(row_ptr, kb, grid_ptr, signs_ptr, TYPE, S, L)
            w = scale * qf - offset
            if M == 1:
                xv = tl.load(x_ptr + kb * 256 + xo).to(tl.float32)
                acc1 += w * xv[None, :, :]
            else:
                for m in tl.static_range(M):
                    xv = tl.load(x_ptr + m * stride_xm + kb * 256 + xo).to(tl.float32)
                    part = tl.sum(tl.sum(w * xv[None, :, :], axis=2), axis=1)  # [BN]
                    acc = tl.where(mi == m, acc + part[None, :], acc)
    if M == 1:
        acc = tl.sum(tl.sum(acc1, axis=2), axis=1)[None, :]
    mask = (mi < M) & (rows[None, :] < N)
    ptrs = out_ptr + split * stride_os + g * stride_og + mi * stride_om + rows[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qdequant_kernel(w_ptr, out_ptr, grid_ptr, signs_ptr, N, K, row_bytes, TYPE: tl.constexpr, S: tl.constexpr,
                     L: tl.constexpr, BN: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    pid = tl.program_id(0)
    kb = tl.program_id(1)
    rows = pid * BN + tl.arange(0, BN)
    rows_c = tl.minimum(rows, N - 1)
    row_ptr = (w_ptr + rows_c.to(tl.int64) * row_bytes)[:, None, None]
    qf, scale, offset = _decode(row_ptr, kb, grid_ptr, signs_ptr, TYPE, S, L)
    w = scale * qf - offset
    s = tl.arange(0, S)[None, :, None]
    l = tl.arange(0, L)[None, None, :]
    r = rows.to(tl.int64)[:, None, None]
    tl.store(out_ptr + r * K + kb * 256 + s * L + l, w.to(out_ptr.dtype.element_ty), mask=r < N)


_TABLES: dict = {}


def _tables(device) -> tuple[torch.Tensor, torch.Tensor]:
    """IQ2_XXS's grid (float32 [256 * 8]) and sign patterns (int32 [128]) on `device`."""
    if device not in _TABLES:
        from ...quant.blocks import _IQ2_XXS_GRID, _IQ2_XXS_SIGNS  # noqa: PLC0415
        _TABLES[device] = (_IQ2_XXS_GRID.reshape(-1).to(device), _IQ2_XXS_SIGNS.to(device))
    return _TABLES[device]


@triton.jit
def _byte_magic(words, i: tl.constexpr):
    """The bits 0x4B0000bb (the float 2**23 + b) of byte i of each int32 word: one PRMT on the GPU
    (shift, mask and or in the CPU interpreter, which runs no PTX)."""
    if _PTX:
        return tl.inline_asm_elementwise(f"prmt.b32 $0, 0x4B000000, $1, {0x3214 + i};", "=r,r", [words],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        return ((words >> (8 * i)) & 255) | 0x4B000000


@triton.jit
def _word_bytes(words):
    """[..., W] int32 words -> float32 [..., W, 2, 2]: each word's 4 bytes (little-endian), 0..255,
    byte 2r + a at [..., r, a] (in registers of one thread: the flattened tile stays contiguous)."""
    e0 = _byte_magic(words, 0)
    e1 = _byte_magic(words, 1)
    e2 = _byte_magic(words, 2)
    e3 = _byte_magic(words, 3)
    return tl.join(tl.join(e0, e2), tl.join(e1, e3)).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _quads(row_ptr, kb, TYPE: tl.constexpr, grid_ptr, signs_ptr, H: tl.constexpr = 0, HALVES: tl.constexpr = 1):
    """Decode of 256-element step kb for the MoE GEMM, each stored byte (or table word) loaded
    once and split into its values by shifts; row_ptr: [BN] byte pointers to each row. Returns
    float32 [BN, 256] in element order, computed as the reference does (Q2_K, Q4_K, Q6_K, IQ2_XXS)."""
    if TYPE == 4 or TYPE == 8:  # Q2_K: element h*128 + j*32 + l is bits 2j of byte 16 + h*32 + l; sub-block
        # of 16 s (Q2_K_R8: bodies of 80 B, d and dmin after 8 of them)
        b, hd = _q2k_at(row_ptr, kb, TYPE)
        words = tl.load((b[:, None, None, None] + 16 + tl.arange(0, 2)[None, :, None, None] * 32
                         + tl.arange(0, 8)[None, None, None, :] * 4).to(tl.pointer_type(tl.int32)))
        q = _word_bytes((words >> (2 * tl.arange(0, 4)[None, None, :, None])) & 0x03030303)
        sc = tl.load(b[:, None, None] + tl.arange(0, 16)[None, :, None]).to(tl.int32)  # scale low 4 bits, min high
        scale = _f16_at(hd)[:, None, None] * _int_f32(sc & 15, 0.0)
        offset = _f16_at(hd + 2)[:, None, None] * _int_f32(sc >> 4, 0.0)
        w = scale * tl.reshape(q, [q.shape[0], 16, 16]) - offset
    elif TYPE == 0:  # Q4_K: element g*64 + n*32 + l is nibble n of byte 16 + g*32 + l; sub-block of 32 s
        b = row_ptr + kb * 144
        words = tl.load((b[:, None, None, None] + 16 + tl.arange(0, 4)[None, :, None, None] * 32
                         + tl.arange(0, 8)[None, None, None, :] * 4).to(tl.pointer_type(tl.int32)))
        q = _word_bytes((words >> (4 * tl.arange(0, 2)[None, None, :, None])) & 0x0F0F0F0F)
        q = tl.reshape(q, [q.shape[0], 8, 32])
        s = tl.arange(0, 8)[None, :, None]
        b = b[:, None, None]
        a = tl.load(b + 4 + s % 4).to(tl.int32)
        m = tl.load(b + 8 + s % 4).to(tl.int32)
        c = tl.load(b + 12 + s % 4).to(tl.int32)
        sc = tl.where(s < 4, a & 63, (c & 15) | ((a >> 2) & 48))
        mn = tl.where(s < 4, m & 63, (c >> 4) | ((m >> 2) & 48))
        w = _f16_at(b) * _int_f32(sc, 0.0) * q - _f16_at(b + 2) * _int_f32(mn, 0.0)
    elif TYPE == 1 or TYPE == 6 or TYPE == 10:  # Q6_K: element h*128 + jh*64 + jl*32 + l2*16 + l: low 4 bits
        # are nibble jh of ql byte h*64 + jl*32 + l2*16 + l, high 2 bits are bits 2*(2jh + jl) of qh byte
        # h*32 + l2*16 + l (Q6_K_R8: bodies of 208 B, d after 8 of them; Q6_K_R3: after 3, then padding)
        b, d_at = _q6k_at(row_ptr, kb, TYPE)
        b = b[:, None, None, None, None, None]
        d_at = d_at[:, None, None, None, None, None]
        h = tl.arange(0, 2)[None, :, None, None, None, None]
        jh = tl.arange(0, 2)[None, None, :, None, None, None]
        jl = tl.arange(0, 2)[None, None, None, :, None, None]
        l2 = tl.arange(0, 2)[None, None, None, None, :, None]
        l = tl.arange(0, 16)[None, None, None, None, None, :]
        ql = tl.load(b + h * 64 + jl * 32 + l2 * 16 + l).to(tl.int32)
        qh = tl.load(b + 128 + h * 32 + l2 * 16 + l).to(tl.int32)
        q = ((ql >> (4 * jh)) & 15) | (((qh >> (4 * jh + 2 * jl)) & 3) << 4)
        sc = tl.load(b + 192 + h * 8 + jh * 4 + jl * 2 + l2).to(tl.int8, bitcast=True).to(tl.float32)
        w = (_f16_at(d_at) * sc) * _int_f32(q, 32.0)
    else:  # IQ2_XXS: element s*32 + p*8 + h*4 + i is byte i of word h of grid row idx[s, p] (a byte at
        # 2 + s*8 + p), negated where bit h*4 + i of sign pattern (aux_s >> 7p) & 127 is set
        # (IQ2_XXS_R8: bodies of 64 B without the d, which come after 8 of them)
        if TYPE == 5:
            b = (row_ptr + kb * 66)[:, None, None, None]
            body = b + 2
        else:
            b = (row_ptr + (kb // 8) * 528 + 512 + (kb % 8) * 2)[:, None, None, None]
            body = (row_ptr + (kb // 8) * 528 + (kb % 8) * 64)[:, None, None, None]
        s = H * (8 // HALVES) + tl.arange(0, 8 // HALVES)[None, :, None, None]  # IQ2_XXS: part H of the step
        p = tl.arange(0, 4)[None, None, :, None]
        a16 = (body + 4 + s * 8).to(tl.pointer_type(tl.uint16))  # the u32 aux at 4 + s*8 is 2-byte aligned
        aux = tl.load(a16).to(tl.int32) | (tl.load(a16 + 1).to(tl.int32) << 16)  # [BN, 8, 1, 1]
        word = tl.load(grid_ptr + tl.load(body + s * 8 + p).to(tl.int32) * 2 + tl.arange(0, 2)[None, None, None, :])
        v = _word_bytes(word)  # [BN, 8, 4, 2, 2, 2]: element s*32 + p*8 + h*4 + 2r + a
        sign = tl.load(signs_ptr + ((aux >> (7 * p)) & 127))  # [BN, 8, 4, 1]
        bit = (tl.arange(0, 2)[:, None, None] * 4 + tl.arange(0, 2)[None, :, None] * 2
               + tl.arange(0, 2)[None, None, :])  # h*4 + 2r + a
        neg = ((sign[:, :, :, :, None, None] >> bit[None, None, None, :, :, :]) & 1) != 0
        scale = (_f16_at(b) * (0.5 + ((aux >> 28) & 15).to(tl.float32)) * 0.25)[:, :, :, :, None, None]
        w = tl.where(neg, -scale, scale) * v
    return tl.reshape(w, [w.shape[0], 256 // HALVES])


# Weights formed in bf16 by byte permutation: a PRMT picks 4 bytes from an 8-byte table by 4 nibble
# selectors, i.e. two bf16 values, and one bf16x2 fma scales them. IQ2_XXS: every weight is +-8,
# +-25 or +-43 (bf16 41 00, 41 C8, 42 2C; the sign sets bit 7 of the high byte): 7 distinct bytes.
# Q2_K: q = 0..3 (bf16 00 00, 3F 80, 40 00, 40 40), then q * scale - offset.
_IQ2_T0, _IQ2_T1 = tl.constexpr(0x412CC800), tl.constexpr(0x00C2C142)  # bytes 00 C8 2C 41 | 42 C1 C2 00
_Q2_T0, _Q2_T1 = tl.constexpr(0x40008000), tl.constexpr(0x40403F00)  # low bytes of 0, 1, 2, 3 | high bytes


@triton.jit
def _bf16_bits(f):
    """float32 -> its bf16 bits (int32, 0..65535), rounded to nearest even (the interpreter's own
    conversion truncates, so it rounds here in integers)."""
    if _PTX:
        return f.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 65535
    else:
        b = f.to(tl.int32, bitcast=True)
        return ((b + 32767 + ((b >> 16) & 1)) >> 16) & 65535


@triton.jit
def _prmt_fma(sel, mul2, add2, LO: tl.constexpr, HI: tl.constexpr):
    """int32 words of two bf16 values each: the table bytes (LO: bytes 0..3, HI: 4..7) picked by
    the low 4 nibbles of sel (low byte, high byte of the first value, then of the second), times
    the bf16 pair mul2 plus the pair add2, rounded once (fma.rn.bf16x2). The CPU interpreter runs
    no PTX: it does the same in float32 (the product of two bf16 values is exact there)."""
    if _PTX:
        return tl.inline_asm_elementwise(
            f"{{ .reg .b32 t; prmt.b32 t, {LO}, {HI}, $1; fma.rn.bf16x2 $0, t, $2, $3; }}", "=r,r,r,r",
            [sel, mul2, add2], dtype=tl.int32, is_pure=True, pack=1)
    else:
        table = tl.full(sel.shape, (HI << 32) | LO, tl.int64)
        word = tl.zeros(sel.shape, tl.int32)
        for i in tl.static_range(4):
            word |= ((table >> (8 * ((sel >> (4 * i)) & 7)).to(tl.int64)) & 255).to(tl.int32) << (8 * i)
        m_lo = (mul2 << 16).to(tl.float32, bitcast=True)
        m_hi = (mul2 & -65536).to(tl.float32, bitcast=True)
        a_lo = (add2 << 16).to(tl.float32, bitcast=True)
        a_hi = (add2 & -65536).to(tl.float32, bitcast=True)
        lo = _bf16_bits((word << 16).to(tl.float32, bitcast=True) * m_lo + a_lo)
        hi = _bf16_bits((word & -65536).to(tl.float32, bitcast=True) * m_hi + a_hi)
        return lo | (hi << 16)


@triton.jit
def _bf16_halves(words):
    """int32 [...] of two bf16 each -> bf16 [..., 2] (low half first)."""
    return tl.join(words.to(tl.int16).to(tl.bfloat16, bitcast=True),
                   (words >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True))


@triton.jit
def _iq2_bf16(row_ptr, kb, TYPE: tl.constexpr, gsel_ptr, signs_ptr, H: tl.constexpr = 0, HALVES: tl.constexpr = 1):
    """IQ2_XXS(_R8) step kb as bf16 [BN, 256 // HALVES] (part H), each weight scale * grid * sign
    rounded to bf16 (the scale first, then the product: `prmt_reference`). Per 8 weights: one
    gathered grid row of selectors (`_iq2_selectors`: per weight the byte of its magnitude's low
    and high bf16 byte), one gathered 8-bit sign pattern, spread to bit 5 of each high-byte
    selector (adds 2: the negative high byte) by a multiply, then 4 PRMT + bf16x2 multiplies,
    against ~10 instructions a weight for the float decode of `_quads`."""
    # dims [S, BN, ...]: the group s ahead of the row, so that Triton spreads a warp's lanes over
    # the groups of a row (K) first and stores the decoded tile K-major (16-byte stores; rows
    # first gave one 2-byte store per weight)
    if TYPE == 5:
        b = (row_ptr + kb * 66)[None, :, None, None]
        body = b + 2
    else:
        b = (row_ptr + (kb // 8) * 528 + 512 + (kb % 8) * 2)[None, :, None, None]
        body = (row_ptr + (kb // 8) * 528 + (kb % 8) * 64)[None, :, None, None]
    s = H * (8 // HALVES) + tl.arange(0, 8 // HALVES)[:, None, None, None]
    p = tl.arange(0, 4)[None, None, :, None]
    h = tl.arange(0, 2)[None, None, None, :]
    a16 = (body + 4 + s * 8).to(tl.pointer_type(tl.uint16))  # the u32 aux at 4 + s*8 is 2-byte aligned
    aux = tl.load(a16).to(tl.int32) | (tl.load(a16 + 1).to(tl.int32) << 16)  # [S, BN, 1, 1]
    sel = tl.load(gsel_ptr + tl.load(body + s * 8 + p).to(tl.int32) * 2 + h)  # [S, BN, 4, 2]: weights 4h..4h+3
    sign = tl.load(signs_ptr + ((aux >> (7 * p)) & 127))  # [S, BN, 4, 1]: 8 bits, parity included
    sel += (((sign >> (4 * h)) & 15) * 0x04081020) & 0x20202020  # bit q of the nibble -> bit 8q + 5
    d = tl.load(b.to(tl.pointer_type(tl.float16))).to(tl.float32)  # d is 2-byte aligned too
    sc = _bf16_bits(d * (0.5 + ((aux >> 28) & 15).to(tl.float32)) * 0.25)  # [S, BN, 1, 1]
    sc |= sc << 16
    zero = -2147450880  # 0x80008000: -0.0 in both halves, fma(t, sc, -0) = t * sc
    # weights 4h, 4h + 1 from the selectors' low half, 4h + 2, 4h + 3 from the high half
    words = tl.join(_prmt_fma(sel, sc, zero, _IQ2_T0, _IQ2_T1), _prmt_fma(sel >> 16, sc, zero, _IQ2_T0, _IQ2_T1))  # [S, BN, 4, 2, 2]
    w = tl.permute(_bf16_halves(words), (1, 0, 2, 3, 4, 5))  # [BN, S, 4, 2, 2, 2]: element s*32 + p*8 + h*4 + half*2 + j
    return tl.reshape(w, [w.shape[0], 256 // HALVES])


@triton.jit
def _q2k_part(words, b, h, u, d, dmin, j: tl.constexpr):
    """Bits 2j of the Q2_K words [2, 2, 4, BN] as bf16 [2, 2, 4, BN, 2 (half), 2 (pair)]."""
    sc = tl.load(b + h * 8 + 2 * j + u).to(tl.int32)  # [2, 2, 1, BN]: scale low 4 bits, min high 4
    mul = _bf16_bits(d * _int_f32(sc & 15, 0.0))
    add = _bf16_bits(-dmin * _int_f32(sc >> 4, 0.0))
    mul |= mul << 16
    add |= add << 16
    m = (words >> (2 * j)) & 0x03030303  # q of l = 16 u + 4 v + i in byte i
    sel = m | (m << 4) | 0x40404040  # per q: nibble q (low byte), nibble 4 + q (high byte)
    return _bf16_halves(tl.join(_prmt_fma(sel, mul, add, _Q2_T0, _Q2_T1), _prmt_fma(sel >> 16, mul, add, _Q2_T0, _Q2_T1)))


@triton.jit
def _q2k_bf16(row_ptr, kb, TYPE: tl.constexpr):
    """Q2_K(_R8) step kb as bf16 [BN, 256]: q * scale - offset with scale = d * sc and offset =
    dmin * m each rounded to bf16 first, then one rounding (`prmt_reference`). Element
    h*128 + j*32 + l is bits 2j of qs byte h*32 + l, sub-block h*8 + 2j + l // 16. Per 4 weights
    (a byte of each of 4 l): shift, mask, spread to selectors, 2 PRMT + 2 bf16x2 fma; the scales
    once per sub-block of 16."""
    b, hd = _q2k_at(row_ptr, kb, TYPE)
    b = b[None, None, None, :]
    hd = hd[None, None, None, :]
    h = tl.arange(0, 2)[:, None, None, None]
    u = tl.arange(0, 2)[None, :, None, None]  # l // 16
    v = tl.arange(0, 4)[None, None, :, None]  # word v of the 16 l holds l = 16 u + 4 v .. + 3
    words = tl.load((b + 16 + h * 32 + u * 16 + v * 4).to(tl.pointer_type(tl.int32)))  # [2, 2, 4, BN]
    d = tl.load(hd.to(tl.pointer_type(tl.float16))).to(tl.float32)
    dmin = tl.load((hd + 2).to(tl.pointer_type(tl.float16))).to(tl.float32)
    p0 = _q2k_part(words, b, h, u, d, dmin, 0)
    p1 = _q2k_part(words, b, h, u, d, dmin, 1)
    p2 = _q2k_part(words, b, h, u, d, dmin, 2)
    p3 = _q2k_part(words, b, h, u, d, dmin, 3)
    w = tl.join(tl.join(p0, p1), tl.join(p2, p3))  # [2, 2, 4, BN, 2, 2, a, t]: j = 2t + a
    w = tl.permute(w, (3, 0, 7, 6, 1, 2, 4, 5))  # [BN, h, t, a, u, v, half, pair]
    return tl.reshape(w, [w.shape[0], 256])


@triton.jit
def _mma(acc, w, x_ptr, xrow, stride_xm, k, rmask, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """acc [BN, BM] += w [BN, len(k)] . x[xrow, k].T (the tile's pairs' rows of x, masked by rmask)."""
    xk = tl.load(x_ptr + xrow[None, :] * stride_xm + k[:, None], mask=rmask[None, :], other=0.0)
    return acc + tl.dot(w.to(DOT_DTYPE), xk.to(DOT_DTYPE), input_precision=PRECISION, out_dtype=tl.float32)


@triton.jit
def _moe_gemm_kernel(x_ptr, w_ptr, out_ptr, grid_ptr, signs_ptr, pair_row_ptr, tile_expert_ptr, tile_start_ptr,
                     tile_end_ptr, N, K, row_bytes, expert_bytes, stride_xm, stride_om,
                     TYPE: tl.constexpr, S: tl.constexpr, L: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, QUADS: tl.constexpr, STAGES: tl.constexpr,
                     PDL: tl.constexpr, HALVES: tl.constexpr = 1, PRMT: tl.constexpr = False,
                     SWIGLU: tl.constexpr = False, LIMIT: tl.constexpr = False, limit=0.0):
    """Program (t, j): (token, expert) pairs tile_start[t] .. tile_end[t] (all of one expert e =
    tile_expert[t], at most BM) times output rows j*BN.. of W_e: out[pair] = x[pair_row[pair]] . W_e.T.
    Each 256-step of W_e's blocks is decoded in registers and fed to tl.dot: the experts' weights
    are never written out dense. The decoded tile is the MMA's M side (out.T = W_e . x.T) so that
    a tile of few pairs (BM = 16) still fills the tensor-core instruction; QUADS picks `_quads`,
    PRMT the bf16 decoders by byte permutation, `_iq2_bf16` for IQ2_XXS (grid_ptr then holds
    `_iq2_selectors`) and `_q2k_bf16` for Q2_K.
    SWIGLU (W_e = [gate; up], N rows): program j takes gate rows j*BN/2.. and the same up rows,
    and stores silu(gate) * up [P, N / 2] (LIMIT: gate clamped from above, up on both sides, as
    `moe.swiglu`), so the [P, N] gate/up output is never written.
    (A K = 32 dot per IQ2_XXS group on unscaled grid values, fewer instructions per weight in the
    SASS, was 10% slower on the H100: bench/NOTES.md, session 9.)"""
    wait_for_inputs(PDL)
    t = tl.program_id(0)
    j = tl.program_id(1)
    start = tl.load(tile_start_ptr + t)
    end = tl.load(tile_end_ptr + t)
    if start >= end:  # a spare tile of a schedule sized on the host before the counts are known
        return
    e = tl.load(tile_expert_ptr + t).to(tl.int64)
    rows = start + tl.arange(0, BM)
    rmask = rows < end
    xrow = tl.load(pair_row_ptr + rows, mask=rmask, other=0).to(tl.int64)
    if SWIGLU:  # rows i < BN/2: gate row j*BN/2 + i; the rest: the up rows N/2 later
        i = tl.arange(0, BN)
        cols = (i // (BN // 2)) * (N // 2) + j * (BN // 2) + i % (BN // 2)
    else:
        cols = j * BN + tl.arange(0, BN)
    wrow = w_ptr + e * expert_bytes + tl.minimum(cols, N - 1).to(tl.int64) * row_bytes
    kk = tl.arange(0, 256)
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    for kb in tl.range(0, K // 256, num_stages=STAGES):
        if PRMT and (TYPE == 4 or TYPE == 8):  # Q2_K straight to bf16
            acc = _mma(acc, _q2k_bf16(wrow, kb, TYPE), x_ptr, xrow, stride_xm, kb * 256 + kk, rmask, DOT_DTYPE,
                       PRECISION)
        elif PRMT or (QUADS and HALVES > 1):  # IQ2_XXS, the step in HALVES parts (fewer registers)
            for h in tl.static_range(HALVES):
                if PRMT:  # straight to bf16
                    w = _iq2_bf16(wrow, kb, TYPE, grid_ptr, signs_ptr, h, HALVES)
                else:
                    w = _quads(wrow, kb, TYPE, grid_ptr, signs_ptr, h, HALVES)
                kh = kb * 256 + h * (256 // HALVES) + tl.arange(0, 256 // HALVES)
                acc = _mma(acc, w, x_ptr, xrow, stride_xm, kh, rmask, DOT_DTYPE, PRECISION)
        else:
            if QUADS:
                w = _quads(wrow, kb, TYPE, grid_ptr, signs_ptr)
            else:
                qf, scale, offset = _decode(wrow[:, None, None], kb, grid_ptr, signs_ptr, TYPE, S, L)
                w = tl.reshape(scale * qf - offset, [BN, 256])
            acc = _mma(acc, w, x_ptr, xrow, stride_xm, kb * 256 + kk, rmask, DOT_DTYPE, PRECISION)
    if SWIGLU:
        gate, up = tl.split(tl.permute(tl.reshape(acc, [2, BN // 2, BM]), (1, 2, 0)))  # [BN/2, BM] each
        if LIMIT:
            gate = tl.minimum(gate, limit)
            up = tl.minimum(tl.maximum(up, -limit), limit)
        c = j * (BN // 2) + tl.arange(0, BN // 2)
        tl.store(out_ptr + rows.to(tl.int64)[None, :] * stride_om + c[:, None],
                 (gate / (1.0 + tl.exp(-gate)) * up).to(out_ptr.dtype.element_ty),
                 mask=rmask[None, :] & (c < N // 2)[:, None])
    else:
        tl.store(out_ptr + rows.to(tl.int64)[None, :] * stride_om + cols[:, None], acc.to(out_ptr.dtype.element_ty),
                 mask=rmask[None, :] & (cols < N)[:, None])


def moe_tiles(counts, bm: int, device, pairs: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For pairs sorted by expert with counts[e] pairs each: per tile of at most bm pairs of one
    expert, (expert, first pair, end pair) as int32 device tensors.

    counts a list: exactly the tiles needed. counts a device tensor (with `pairs` = its sum, known
    to the caller): built on the device with no host read, so a prefill's MoE layers queue without
    waiting on each other. sum(ceil(c / bm)) <= ceil(pairs / bm) + E tiles; the unused ones are
    empty (start == end) and the kernel skips them."""
    if isinstance(counts, torch.Tensor):
        if pairs is None:
            raise ValueError("moe_tiles: device counts need the number of pairs")
        return _moe_tiles_device(counts.to(device).long(), bm, -(-pairs // bm) + counts.shape[0])
    experts, starts, ends, at = [], [], [], 0
    for e, c in enumerate(counts):
        for s in range(at, at + c, bm):
            experts.append(e), starts.append(s), ends.append(min(s + bm, at + c))
        at += c
    as_t = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    return as_t(experts), as_t(starts), as_t(ends)


@triton.jit(do_not_specialize=["E", "bm", "n_tiles"])  # one compile whatever the chunk's pair count
def _moe_tiles_kernel(counts_ptr, e_ptr, start_ptr, end_ptr, E, bm, n_tiles, BE: tl.constexpr, BT: tl.constexpr,
                      PDL: tl.constexpr):
    """Program i, tiles i*BT ..: tile t of the schedule belongs to the expert whose tiles
    (ceil(count / bm) of them, experts in order) cover t; its pairs are [start, end). Tiles past
    the last are empty. Every program forms the experts' running sums itself (E <= BE values)."""
    wait_for_inputs(PDL)
    e = tl.arange(0, BE)
    c = tl.load(counts_ptr + e, mask=e < E, other=0).to(tl.int32)
    per = (c + bm - 1) // bm  # tiles of each expert
    last = tl.cumsum(per, axis=0)  # one past each expert's last tile
    first_pair = tl.cumsum(c, axis=0) - c
    total = tl.sum(per, axis=0)
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    ex = tl.minimum(tl.sum(((last[None, :] <= t[:, None]) & (e < E)[None, :]).to(tl.int32), axis=1), E - 1)
    sel = e[None, :] == ex[:, None]  # one-hot rows: gather the expert's values by a masked sum
    fp = tl.sum(tl.where(sel, first_pair[None, :], 0), axis=1)
    first_tile = tl.sum(tl.where(sel, (last - per)[None, :], 0), axis=1)
    cnt = tl.sum(tl.where(sel, c[None, :], 0), axis=1)
    start = fp + (t - first_tile) * bm
    end = tl.minimum(start + bm, fp + cnt)
    used = t < total
    m = t < n_tiles
    tl.store(e_ptr + t, ex, mask=m)
    tl.store(start_ptr + t, tl.where(used, start, 0), mask=m)
    tl.store(end_ptr + t, tl.where(used, end, 0), mask=m)


def _moe_tiles_device(counts: torch.Tensor, bm: int, n_tiles: int):
    """`moe_tiles` from device counts in one launch (the torch version took ~13 small ops, a
    prefill's top host cost per MoE matmul); `_moe_tiles_reference` is the same in torch. One
    program per 64 tiles (ds4's 352 tiles: 41 -> 34 us in the H100 profile, whose kernel times
    include PDL's wait on the kernel before)."""
    out = torch.empty((3, n_tiles), dtype=torch.int32, device=counts.device)
    E, bt = counts.shape[0], 64
    _moe_tiles_kernel[(triton.cdiv(n_tiles, bt),)](counts, out[0], out[1], out[2], E, bm, n_tiles,
                                                   BE=triton.next_power_of_2(E), BT=bt, **pdl.launch(counts.device))
    return out[0], out[1], out[2]


def _moe_tiles_reference(counts: torch.Tensor, bm: int, n_tiles: int):
    per = (counts + bm - 1) // bm  # tiles of each expert
    last = torch.cumsum(per, 0)  # one past each expert's last tile
    first_pair = torch.cumsum(counts, 0) - counts
    t = torch.arange(n_tiles, device=counts.device)
    e = torch.searchsorted(last, t, right=True).clamp(max=counts.shape[0] - 1)  # the expert of tile t
    start = first_pair[e] + (t - (last[e] - per[e])) * bm
    end = torch.minimum(start + bm, first_pair[e] + counts[e])
    used = t < last[-1]
    return (e.to(torch.int32), torch.where(used, start, 0).to(torch.int32),
            torch.where(used, end, 0).to(torch.int32))


QUADS_TYPES = ("Q4_K", "Q6_K", "Q2_K", "IQ2_XXS", "Q6_K_R8", "Q6_K_R3", "Q2_K_R8", "IQ2_XXS_R8")
PRMT_TYPES = ("Q2_K", "IQ2_XXS", "Q2_K_R8", "IQ2_XXS_R8")  # bf16 by byte permutation (`prmt`)


def qgemm_experts(x: torch.Tensor, raw: torch.Tensor, bt_name: str, shape, pair_rows: torch.Tensor, tiles,
                  out: torch.Tensor | None = None, bm: int = 16, bn: int = 64, num_warps: int = 4,
                  stages: int = 1, quads: bool = True, dot_dtype=None, halves: int = 1,
                  prmt: bool = False, swiglu: bool = False, limit: float | None = None) -> torch.Tensor:
    """MoE prefill: out [P, n] row p = x[pair_rows[p]] @ W_e.T for pairs p sorted by expert, `tiles`
    from `moe_tiles(counts, bm)`; raw holds E experts' blocks [E * n, row_bytes]. Matmul operands in
    dot_dtype (default bf16 on CUDA, fp32 in the CPU interpreter), fp32 accumulation; x is cast to
    it once here rather than per tile. quads: the byte-once decoder where it reads the type.
    halves (IQ2_XXS with quads): each 256-step decoded and multiplied in that many parts, for
    fewer registers a program (more programs at once on a multiprocessor). prmt (IQ2_XXS, Q2_K):
    the weights formed in bf16 by byte permutation (`_iq2_bf16`, `_q2k_bf16`), rounded as
    `prmt_reference`. swiglu (raw the [gate; up] stack, n rows): out [P, n / 2] = silu(gate) * up
    (gate clamped from above at limit, up on both sides, when limit is set), formed from the
    accumulators, in the matmul operand dtype unless out is given."""
    tid, S, L, n, k = _check(raw, bt_name, shape)
    if x.dim() != 2 or x.shape[1] != k or x.stride(1) != 1:
        raise ValueError(f"qgemm_experts: x {tuple(x.shape)} for weight {shape}")
    if swiglu and (n % 2 or bn % 2):
        raise ValueError(f"qgemm_experts: swiglu needs an even number of rows (a [gate; up] stack), not {n}")
    p = len(pair_rows)
    dot = dot_dtype or (torch.bfloat16 if x.is_cuda else torch.float32)
    if out is None:
        out = torch.empty((p, n // 2), dtype=dot, device=x.device) if swiglu else \
            torch.empty((p, n), dtype=x.dtype, device=x.device)
    quads = quads and bt_name in QUADS_TYPES and raw.data_ptr() % 4 == 0  # Q2_K, Q4_K: 32-bit word loads
    grid, signs = _tables(raw.device)
    align = 4 if bt_name.startswith("Q2_K") else 2  # Q2_K's 32-bit words; IQ2_XXS reads 16-bit fields
    prmt = prmt and bt_name in PRMT_TYPES and raw.data_ptr() % align == 0 and raw.stride(0) % align == 0
    if prmt and bt_name.startswith("IQ2_XXS"):
        grid = _iq2_selectors(raw.device)
    elif quads and bt_name.startswith("IQ2_XXS"):
        grid = _grid_words(raw.device)
    tile_expert, tile_start, tile_end = tiles
    _moe_gemm_kernel[(len(tile_expert), triton.cdiv(n // 2, bn // 2) if swiglu else triton.cdiv(n, bn))](
        x.to(dot), raw, out, grid, signs, pair_rows, tile_expert, tile_start, tile_end, n, k, raw.stride(0),
        n * raw.stride(0), x.stride(0), out.stride(0), TYPE=tid, S=S, L=L, BM=bm, BN=bn,
        DOT_DTYPE=tl.bfloat16 if dot == torch.bfloat16 else (tl.float16 if dot == torch.float16 else tl.float32),
        PRECISION="ieee" if dot == torch.float32 else "tf32",  # fp32 operands: exact fp32, not TF32
        QUADS=quads, STAGES=stages, HALVES=halves if (quads or prmt) and bt_name.startswith("IQ2_XXS") else 1,
        PRMT=prmt, SWIGLU=swiglu, LIMIT=bool(limit), limit=float(limit or 0.0), num_warps=num_warps,
        **pdl.launch(x.device))
    return out


_SELECTORS: dict = {}


def _iq2_selectors(device) -> torch.Tensor:
    """IQ2_XXS's grid as PRMT selectors into the byte table `_IQ2_T0`, `_IQ2_T1`, int32 [256 * 2]:
    word h of row r holds, for its weights 4h + q, nibble 2q the low byte's index of |weight| (0,
    1, 2 for 8, 25, 43) and nibble 2q + 1 its positive high byte's (3, 3, 4); a negative weight's
    high byte is 2 further."""
    if device not in _SELECTORS:
        from ...quant.blocks import _IQ2_XXS_GRID  # noqa: PLC0415
        code = {8.0: 0, 25.0: 1, 43.0: 2}
        words = []
        for row in _IQ2_XXS_GRID.tolist():
            for h in range(2):
                c = [code[v] for v in row[4 * h:4 * h + 4]]
                words.append(sum((ci | (3 + (ci == 2)) << 4) << (8 * q) for q, ci in enumerate(c)))
        _SELECTORS[device] = torch.tensor(words, dtype=torch.int64).to(torch.int32).to(device)
    return _SELECTORS[device]


def prmt_reference(raw: torch.Tensor, bt_name: str) -> torch.Tensor:
    """The weights the byte-permutation decoders form (float32 [N, K] of bf16 values) for rows raw
    [N, row_bytes] of IQ2_XXS(_R8) (`_iq2_bf16`: each group's scale d * (0.5 + s) / 4 rounded to
    bf16, times the signed grid value, rounded to bf16) or Q2_K(_R8) (`_q2k_bf16`: scale d * sc and
    offset dmin * m rounded to bf16, then q * scale - offset rounded to bf16)."""
    from ...quant import blocks as B  # noqa: PLC0415
    bf16 = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    if bt_name.startswith("Q2_K"):
        scale, offset, q = B.q2_k_parts((B.unpack_q2_k_r8(raw) if bt_name == "Q2_K_R8" else raw).reshape(-1, 84))
        return bf16(bf16(scale) * q - bf16(offset)).reshape(raw.shape[0], -1)
    scale, v = B.iq2_xxs_parts((B.unpack_iq2_xxs_r8(raw) if bt_name == "IQ2_XXS_R8" else raw).reshape(-1, 66))
    return bf16(bf16(scale) * v).reshape(raw.shape[0], -1)


_WORDS: dict = {}


def _grid_words(device) -> torch.Tensor:
    """IQ2_XXS's grid as int32 [256 * 2]: each row's 8 byte values, four to a little-endian word."""
    if device not in _WORDS:
        g = _tables(device)[0].view(256, 2, 4).to(torch.int32)
        _WORDS[device] = (g << torch.tensor([0, 8, 16, 24], device=device)).sum(-1, dtype=torch.int32).reshape(-1)
    return _WORDS[device]


def _check(raw: torch.Tensor, bt_name: str, shape) -> tuple[int, int, int, int, int]:
    tid, S, L, _ = _TYPES[bt_name]
    n, k = shape
    if k % STEP or raw.dtype != torch.uint8 or raw.dim() != 2 or raw.stride(1) != 1:
        raise ValueError(f"{bt_name}: unsupported layout {tuple(raw.shape)} for {shape}")
    return tid, S, L, n, k


def plan_gemv(what: str, x: torch.Tensor, n: int, n_steps: int, rows_out: int, tiles: int, u: int,
              split: int | None, target: int, out: torch.Tensor | None):
    """The K split and buffers of a GEMV launch: u steps per iteration (1 where it doesn't divide),
    K split in two until the grid has about `target` programs (`tiles` without a split) unless
    given; out [rows_out, n], and dst = out or fp32 partials [split, rows_out, n] (`finish_gemv`)."""
    if n_steps % u:
        u = 1
    if split is None:
        split = 1
        while tiles * split < target and n_steps % (split * 2 * u) == 0 and split < 64:
            split *= 2
    if n_steps % (split * u):
        raise ValueError(f"{what}: {n_steps} steps do not split into {split} x {u}")
    if out is None:
        out = torch.empty((rows_out, n), dtype=x.dtype, device=x.device)
    dst = out if split == 1 else torch.empty((split, rows_out, n), dtype=torch.float32, device=x.device)
    return u, split, out, dst


_COUNTERS: dict = {}  # device -> int32 counters of the kernels that finish a K split themselves
_RETIRED: list = []  # outgrown counters: a captured graph may still hold their address


def split_counters(device: torch.device, n: int) -> torch.Tensor:
    """At least n int32 counters on device, all zero between launches: a kernel that splits K
    counts its row tile's finished splits in one, and the last split to finish sums the partials
    and sets it back to zero (so the next launch or graph replay finds it armed)."""
    c = _COUNTERS.get(device)
    if c is None or c.numel() < n:
        if c is not None:
            _RETIRED.append(c)
        c = _COUNTERS[device] = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
    return c


@triton.jit
def last_to_finish(cnt_ptr, expected):
    """After a program stored its partial results: whether it is the last of the `expected`
    programs counting on *cnt_ptr to finish. The barrier orders every thread's stores before the
    release of the acq_rel add, whose acquire side lets the last program read all partials (past
    L1: load them with cache_modifier=".cg"). That program must store 0 back (`split_counters`)."""
    tl.debug_barrier()
    return tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu") == expected - 1


def finish_gemv(dst: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Sum the split-K partials into out (nothing to do without a split)."""
    if dst is not out:
        torch.sum(dst, dim=0, out=out) if out.dtype == torch.float32 else out.copy_(dst.sum(0))
    return out


def qgemv(x: torch.Tensor, raw: torch.Tensor, bt_name: str, shape, out: torch.Tensor | None = None,
          bn: int = 8, u: int = 2, split: int | None = None, num_warps: int = 4,
          idx: torch.Tensor | None = None, x_div: int = 1, stages: int = 1, target: int = 264) -> torch.Tensor:
    """out [M, N] = x [M, K] @ W.T, W in GGUF blocks `raw` [N, row_bytes]; M <= 16; fp32 accumulate.

    MoE form (idx given): raw holds E experts' blocks [E * N, row_bytes]; out [G, N] row g is
    x[g // x_div] @ W[idx[g]].T (G = len(idx); x_div = experts per token for the shared input of
    gate/up, 1 for down's per-pair input). `target` sizes the grid when split is derived."""
    tid, S, L, n, k = _check(raw, bt_name, shape)
    moe = idx is not None
    m = 1 if moe else x.shape[0]
    groups = len(idx) if moe else 1
    if x.dim() != 2 or x.shape[1] != k or x.stride(1) != 1 or not 1 <= m <= MAX_GEMV_M:
        raise ValueError(f"qgemv: x {tuple(x.shape)} for weight {shape}")
    if moe and (raw.shape[0] % n or x.shape[0] * x_div != groups):
        raise ValueError(f"qgemv: {raw.shape[0]} rows are not experts of {n}, or x {tuple(x.shape)} "
                         f"does not feed {groups} pairs / {x_div}")
    n_steps = k // STEP
    u, split, out, dst = plan_gemv("qgemv", x, n, n_steps, groups if moe else m, triton.cdiv(n * groups, bn), u,
                                   split, target, out)
    stride_os = 0 if split == 1 else dst.stride(0)
    stride_og = dst.stride(-2) if moe else 0
    idx_arg = idx if moe else raw
    expert = n * raw.stride(0)
    mp = 1 << (m - 1).bit_length()
    grid = (triton.cdiv(n, bn), split, groups)
    _qgemv_kernel[grid](
        x, raw, dst, idx_arg, *_tables(raw.device), n, n_steps // split, raw.stride(0), expert,
        x.stride(0), x.stride(0), x_div, stride_os, stride_og, dst.stride(-2),
        M=m, MP=mp, TYPE=tid, S=S, L=L, BN=bn, U=u, HAS_IDX=moe, STAGES=stages, num_warps=num_warps,
        **pdl.launch(x.device))
    return finish_gemv(dst, out)


def qdequant(raw: torch.Tensor, bt_name: str, shape, dtype=torch.float32, out: torch.Tensor | None = None,
             bn: int = 16, num_warps: int = 4) -> torch.Tensor:
    """The dense [N, K] matrix of GGUF blocks `raw`, in `dtype` (matches blocks.dequantize)."""
    tid, S, L, n, k = _check(raw, bt_name, shape)
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=raw.device)
    _qdequant_kernel[(triton.cdiv(n, bn), k // STEP)](raw, out, *_tables(raw.device), n, k, raw.stride(0),
                                                       TYPE=tid, S=S, L=L, BN=bn, num_warps=num_warps,
                                                       **pdl.launch(raw.device))
    return out


@triton.jit
def _q8_gemm_kernel(x_ptr, w_ptr, out_ptr, M, N, K, row_bytes, stride_xm, stride_om, BM: tl.constexpr,
                    BN: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    """Program (j, i): out[i*BM.., j*BN..] = x . W.T for Q8_0_R8 rows W (per 256 elements: 8 x 32
    int8, then the 8 f16 d), each 128-element half of a group decoded in registers (q * d rounded
    to DOT_DTYPE, as `qdequant` does) and fed to tl.dot; x read in its own dtype and rounded to
    DOT_DTYPE in the tile. One launch where dequantize + cast + matmul + cast took four.
    Axis 2 of the grid: group g of a block-diagonal weight (x columns g*K.., W rows g*N.., out
    columns g*N..)."""
    wait_for_inputs(PDL)
    g = tl.program_id(2)
    x_ptr += g * K
    w_ptr += g.to(tl.int64) * N * row_bytes
    out_ptr += g * N
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    wrow = w_ptr + tl.minimum(rn, N - 1).to(tl.int64) * row_bytes  # [BN]
    kk = tl.arange(0, 128)
    xrow = x_ptr + rm.to(tl.int64) * stride_xm
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for kh in tl.range(0, K // 128, num_stages=3):
        at = (kh // 2) * 272 + (kh % 2) * 128  # this half's quants within its row's 8 blocks
        q = tl.load(wrow[:, None] + at + kk[None, :]).to(tl.int8, bitcast=True).to(tl.float32)  # [BN, 128]
        dp = (wrow[:, None] + (kh // 2) * 272 + 256 + (kh % 2) * 8 + 2 * tl.arange(0, 4)[None, :])
        d = tl.load(dp.to(tl.pointer_type(tl.float16))).to(tl.float32)  # [BN, 4]: the half's 4 blocks
        w = tl.reshape(tl.reshape(q, [BN, 4, 32]) * d[:, :, None], [BN, 128]).to(DOT_DTYPE)
        xk = tl.load(xrow[:, None] + kh * 128 + kk[None, :], mask=(rm < M)[:, None], other=0.0).to(DOT_DTYPE)
        acc += tl.dot(xk, tl.trans(w), input_precision=PRECISION, out_dtype=tl.float32)
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm < M)[:, None] & (rn < N)[None, :])


def q8_gemm(x: torch.Tensor, raw: torch.Tensor, shape, dot_dtype=None, bm: int = 64, bn: int = 64,
            num_warps: int = 4, groups: int = 1) -> torch.Tensor:
    """out [M, N] = x [M, K] @ W.T for Q8_0_R8 rows raw [N, K / 256 * 272], in x's dtype; operands in
    dot_dtype (default bf16 on CUDA, fp32 in the CPU interpreter), fp32 accumulation. Matches
    `qdequant` to dot_dtype then a matmul in that dtype (the same rounding of every weight).
    groups G: a block-diagonal weight, x [M, G * K] and W [G * N', K] (shape (N', K) a group's),
    out [M, G * N'] with group g's columns x[:, g*K..] @ W[g*N'..].T, in one launch."""
    n, k = shape
    if (raw.dtype != torch.uint8 or raw.dim() != 2 or raw.stride(1) != 1 or k % 256 or raw.shape[1] != k // 256 * 272
            or raw.shape[0] != n * groups or x.dim() != 2 or x.shape[1] != k * groups or x.stride(1) != 1):
        raise ValueError(f"q8_gemm: x {tuple(x.shape)} and Q8_0_R8 rows {tuple(raw.shape)} for {groups} x {shape}")
    dot = dot_dtype or (torch.bfloat16 if x.is_cuda else torch.float32)
    m = x.shape[0]
    out = torch.empty((m, n * groups), dtype=x.dtype, device=x.device)
    _q8_gemm_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm), groups)](
        x, raw, out, m, n, k, raw.stride(0), x.stride(0), out.stride(0), BM=bm, BN=bn,
        DOT_DTYPE=tl.bfloat16 if dot == torch.bfloat16 else (tl.float16 if dot == torch.float16 else tl.float32),
        PRECISION="ieee" if dot == torch.float32 else "tf32", num_warps=num_warps, **pdl.launch(x.device))
    return out


def qmatmul(x: torch.Tensor, raw: torch.Tensor, bt_name: str, shape, compute_dtype=None) -> torch.Tensor:
    """x [M, K] @ W.T for any M: the GEMV kernel for M <= 16, else dequantize + cuBLAS.
    compute_dtype (e.g. torch.bfloat16) sets the large-M matmul's operand type; default x.dtype."""
    if x.shape[0] <= MAX_GEMV_M:
        return qgemv(x, raw, bt_name, shape)
    cd = compute_dtype or x.dtype
    w = qdequant(raw, bt_name, shape, cd)
    return torch.matmul(x.to(cd), w.t()).to(x.dtype)
