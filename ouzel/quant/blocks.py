"""Every GGUF block type ouzel reads, declared once, with a pure-torch dequantizer for each.

`dequantize(raw, bt)` turns uint8 blocks [..., nbytes] into float32 [..., n] on raw's device and
matches `gguf.quants.dequantize` bit for bit: every kernel works on int32 tensors with bit ops
and performs the same float32 operations in the same order as the numpy reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as GT

from ..errors import OuzelError, UnsupportedError


@dataclass(frozen=True)
class BlockType:
    name: str  # "Q4_K"
    ggml_type: int  # gguf.GGMLQuantizationType value
    block_elems: int  # elements per block (256 for K-quants)
    block_bytes: int  # bytes per block (144 for Q4_K)

    def row_bytes(self, n: int) -> int:
        """Bytes of a row of `n` elements."""
        if n < 0 or n % self.block_elems:
            raise OuzelError(f"{self.name}: a row of {n} elements is not a whole number of {self.block_elems}-element blocks")
        return n // self.block_elems * self.block_bytes


F32 = BlockType("F32", GT.F32.value, 1, 4)
F16 = BlockType("F16", GT.F16.value, 1, 2)
BF16 = BlockType("BF16", GT.BF16.value, 1, 2)
Q8_0 = BlockType("Q8_0", GT.Q8_0.value, 32, 34)
Q4_0 = BlockType("Q4_0", GT.Q4_0.value, 32, 18)
Q4_1 = BlockType("Q4_1", GT.Q4_1.value, 32, 20)
Q5_0 = BlockType("Q5_0", GT.Q5_0.value, 32, 22)
Q5_1 = BlockType("Q5_1", GT.Q5_1.value, 32, 24)
Q2_K = BlockType("Q2_K", GT.Q2_K.value, 256, 84)
Q3_K = BlockType("Q3_K", GT.Q3_K.value, 256, 110)
Q4_K = BlockType("Q4_K", GT.Q4_K.value, 256, 144)
Q5_K = BlockType("Q5_K", GT.Q5_K.value, 256, 176)
Q6_K = BlockType("Q6_K", GT.Q6_K.value, 256, 210)
IQ2_XXS = BlockType("IQ2_XXS", GT.IQ2_XXS.value, 256, 66)
IQ4_NL = BlockType("IQ4_NL", GT.IQ4_NL.value, 32, 18)
MXFP4 = BlockType("MXFP4", GT.MXFP4.value, 32, 17)

BLOCK_TYPES: dict[int, BlockType] = {bt.ggml_type: bt for bt in (
    F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ2_XXS, IQ4_NL, MXFP4)}
_BY_NAME: dict[str, BlockType] = {bt.name: bt for bt in BLOCK_TYPES.values()}


def _check_sizes() -> None:
    for bt in BLOCK_TYPES.values():
        want = gguf.GGML_QUANT_SIZES[GT(bt.ggml_type)]
        if (bt.block_elems, bt.block_bytes) != tuple(want) or bt.name != GT(bt.ggml_type).name:
            raise AssertionError(f"{bt} disagrees with gguf: {GT(bt.ggml_type).name} {want}")


_check_sizes()


def block_type(t: int | str) -> BlockType:
    """The BlockType for a ggml type id or name ("Q4_K", case-insensitive)."""
    bt = _BY_NAME.get(t.upper()) if isinstance(t, str) else BLOCK_TYPES.get(int(t))
    if bt is not None:
        return bt
    if isinstance(t, str):
        what = repr(t)
    else:
        try:
            what = f"{GT(int(t)).name} (ggml type {int(t)})"
        except ValueError:
            what = f"ggml type {int(t)}"
    raise UnsupportedError(f"unsupported block type {what}; supported: {', '.join(_BY_NAME)}")


# ---- public value tables (from the gguf package), kept on CPU and moved to the data's device

_IQ4_NL_VALUES = torch.tensor(gguf.quants.IQ4_NL.kvalues, dtype=torch.float32)
_MXFP4_VALUES = torch.tensor(gguf.quants.MXFP4.kvalues, dtype=torch.float32)  # e2m1, doubled
_IQ2_XXS_SIGNS = torch.tensor(list(gguf.quants.IQ2_XXS.ksigns), dtype=torch.int32)  # [128]
gguf.quants.IQ2_XXS.init_grid()
_IQ2_XXS_GRID = torch.from_numpy(np.array(gguf.quants.IQ2_XXS.grid, dtype=np.float32).reshape(256, 8))


# ---- helpers: b is uint8 [N, block_bytes]; results are [N, ...]

def _f16(b: torch.Tensor, off: int) -> torch.Tensor:
    """The float16 at byte `off` of each block, as float32 [N, 1]."""
    return b[:, off:off + 2].contiguous().view(torch.float16).to(torch.float32)


def _i8(b: torch.Tensor) -> torch.Tensor:
    """Bytes read as int8, widened to int32."""
    return b.contiguous().view(torch.int8).to(torch.int32)


def _bits(b: torch.Tensor, width: int, group: int) -> torch.Tensor:
    """Unpack `width`-bit fields: bytes [N, k] in runs of `group`; each run gives its lowest field of
    every byte, then the next field up, ... -> int32 [N, k * 8 // width]."""
    n, k = b.shape
    shifts = torch.arange(0, 8, width, dtype=torch.int32, device=b.device).view(1, 1, -1, 1)
    q = b.to(torch.int32).view(n, k // group, 1, group) >> shifts
    return (q & ((1 << width) - 1)).reshape(n, k * 8 // width)


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K 12 scale bytes -> (scales, mins), int32 [N, 8] of 6 bits each."""
    s = s.to(torch.int32)
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


# ---- kernels: uint8 [N, block_bytes] -> float32 [N, block_elems]

_KERNELS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}


def _kernel(bt: BlockType):
    def register(fn):
        _KERNELS[bt.ggml_type] = fn
        return fn
    return register


# F32: 4 B little-endian float
@_kernel(F32)
def _f32(b):
    return b.clone(memory_format=torch.contiguous_format).view(torch.float32)


# F16: 2 B half
@_kernel(F16)
def _f16_elems(b):
    return _f16(b, 0)


# BF16: 2 B, the high half of a float32
@_kernel(BF16)
def _bf16(b):
    return torch.cat([torch.zeros_like(b), b], dim=-1).view(torch.float32)


# Q8_0: d f16, qs 32 x int8
@_kernel(Q8_0)
def _q8_0(b):
    return _i8(b[:, 2:34]).to(torch.float32) * _f16(b, 0)


# Q4_0: d f16, qs 16 B (4-bit, low nibbles = elems 0..15, high = 16..31), value (q - 8) * d
@_kernel(Q4_0)
def _q4_0(b):
    q = _bits(b[:, 2:18], 4, 16) - 8
    return _f16(b, 0) * q.to(torch.float32)


# Q4_1: d f16, m f16, qs 16 B (4-bit), value q * d + m
@_kernel(Q4_1)
def _q4_1(b):
    q = _bits(b[:, 4:20], 4, 16)
    return _f16(b, 0) * q.to(torch.float32) + _f16(b, 2)


# Q5_0: d f16, qh 4 B (bit 4 of each elem), qs 16 B (low 4 bits), value (q - 16) * d
@_kernel(Q5_0)
def _q5_0(b):
    q = (_bits(b[:, 6:22], 4, 16) | (_bits(b[:, 2:6], 1, 1) << 4)) - 16
    return _f16(b, 0) * q.to(torch.float32)


# Q5_1: d f16, m f16, qh 4 B (bit 4), qs 16 B (low 4 bits), value q * d + m
@_kernel(Q5_1)
def _q5_1(b):
    q = _bits(b[:, 8:24], 4, 16) | (_bits(b[:, 4:8], 1, 1) << 4)
    return _f16(b, 0) * q.to(torch.float32) + _f16(b, 2)


# Q2_K: scales 16 B (4-bit sc | 4-bit m per 16 elems), qs 64 B (2-bit), d f16, dmin f16
def q2_k_parts(b):
    """Q2_K blocks b [N, 84] -> (scale, offset [N, 16, 1], q [N, 16, 16]): element 16 s + i is
    scale[s] * q[s, i] - offset[s] (the GPU's bf16 decoder rounds scale and offset first)."""
    s = b[:, 0:16].to(torch.int32)
    dl = (_f16(b, 80) * (s & 0x0F).to(torch.float32)).unsqueeze(-1)
    ml = (_f16(b, 82) * (s >> 4).to(torch.float32)).unsqueeze(-1)
    return dl, ml, _bits(b[:, 16:80], 2, 32).view(-1, 16, 16).to(torch.float32)


@_kernel(Q2_K)
def _q2_k(b):
    dl, ml, q = q2_k_parts(b)
    return (dl * q - ml).reshape(-1, 256)


# Q3_K: hmask 32 B (bit 2, set = no -4), qs 64 B (low 2 bits), scales 12 B (6-bit x16, -32), d f16
@_kernel(Q3_K)
def _q3_k(b):
    sc = (_bits(b[:, 96:104], 4, 8) | (_bits(b[:, 104:108], 2, 4) << 4)) - 32
    dl = (_f16(b, 108) * sc.to(torch.float32)).unsqueeze(-1)
    q = _bits(b[:, 32:96], 2, 32) - ((_bits(b[:, 0:32], 1, 32) ^ 1) << 2)
    return (dl * q.view(-1, 16, 16).to(torch.float32)).reshape(-1, 256)


# Q4_K: d f16, dmin f16, scales 12 B (6-bit sc/m x8), qs 128 B (4-bit), value d*sc*q - dmin*m
@_kernel(Q4_K)
def _q4_k(b):
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b, 0) * sc.to(torch.float32)).unsqueeze(-1)
    dm = (_f16(b, 2) * mn.to(torch.float32)).unsqueeze(-1)
    q = _bits(b[:, 16:144], 4, 32).view(-1, 8, 32).to(torch.float32)
    return (d * q - dm).reshape(-1, 256)


# Q5_K: d f16, dmin f16, scales 12 B (6-bit sc/m x8), qh 32 B (bit 4), qs 128 B (low 4 bits)
@_kernel(Q5_K)
def _q5_k(b):
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b, 0) * sc.to(torch.float32)).unsqueeze(-1)
    dm = (_f16(b, 2) * mn.to(torch.float32)).unsqueeze(-1)
    q = _bits(b[:, 48:176], 4, 32) | (_bits(b[:, 16:48], 1, 32) << 4)
    return (d * q.view(-1, 8, 32).to(torch.float32) - dm).reshape(-1, 256)


# Q6_K: ql 128 B (low 4 bits), qh 64 B (high 2 bits), scales 16 x int8, d f16, value d*sc*(q - 32)
@_kernel(Q6_K)
def _q6_k(b):
    d = (_f16(b, 208) * _i8(b[:, 192:208]).to(torch.float32)).unsqueeze(-1)
    q = (_bits(b[:, 0:128], 4, 64) | (_bits(b[:, 128:192], 2, 32) << 4)) - 32
    return (d * q.view(-1, 16, 16).to(torch.float32)).reshape(-1, 256)


# IQ2_XXS: d f16, then 8 x (4 grid-index bytes, u32: 4 x 7-bit sign index | 4-bit scale << 28)
def iq2_xxs_parts(b):
    """IQ2_XXS blocks b [N, 66] -> (scale [N, 8, 1, 1], signed grid values [N, 8, 4, 8]): element
    32 s + 8 p + i is scale[s] * v[s, p, i] (the GPU's bf16 decoder rounds the scale first)."""
    dev = b.device
    q = b[:, 2:66].to(torch.int64).view(-1, 8, 8)
    aux = q[..., 4] | (q[..., 5] << 8) | (q[..., 6] << 16) | (q[..., 7] << 24)  # [N, 8]
    db = (_f16(b, 0) * (0.5 + (aux >> 28).to(torch.float32)) * 0.25).view(-1, 8, 1, 1)
    sign_idx = (aux.unsqueeze(-1) >> torch.tensor([0, 7, 14, 21], device=dev)) & 0x7F  # [N, 8, 4]
    sign_bits = _IQ2_XXS_SIGNS.to(dev)[sign_idx].unsqueeze(-1) >> torch.arange(8, dtype=torch.int32, device=dev)
    signs = (1 - 2 * (sign_bits & 1)).to(torch.float32)  # +-1, [N, 8, 4, 8]
    return db, _IQ2_XXS_GRID.to(dev)[q[..., 0:4]] * signs  # grid [N, 8, 4, 8]


@_kernel(IQ2_XXS)
def _iq2_xxs(b):
    db, v = iq2_xxs_parts(b)
    return (db * v).reshape(-1, 256)


# IQ4_NL: d f16, qs 16 B (4-bit indices into a fixed 16-value table)
@_kernel(IQ4_NL)
def _iq4_nl(b):
    return _f16(b, 0) * _IQ4_NL_VALUES.to(b.device)[_bits(b[:, 2:18], 4, 16)]


# MXFP4: e 1 B (e8m0 scale, used halved), qs 16 B (4-bit e2m1 indices, table doubled)
@_kernel(MXFP4)
def _mxfp4(b):
    e = b[:, 0:1].to(torch.int32)
    bits = torch.where(e < 2, 0x00200000 << e.clamp(max=1), (e - 1).clamp(min=0) << 23)
    d = bits.view(torch.float32)
    return d * _MXFP4_VALUES.to(b.device)[_bits(b[:, 1:17], 4, 16)]


assert set(_KERNELS) == set(BLOCK_TYPES)

# Q6_K_R8: Q6_K repacked for the GPU (not a GGUF type). A Q6_K block is 210 bytes, so only every
# other block starts 4-byte aligned and none can be read in 16-byte words. R8 regroups each 8
# blocks (1680 bytes, a multiple of 16): their 208-byte bodies (ql, qh, scales) first, then their
# 8 f16 scales d. Same bytes, same values; rows of K % 2048 == 0 only.
Q6_K_R8 = BlockType("Q6_K_R8", 1000 + GT.Q6_K.value, 2048, 1680)
_BY_NAME[Q6_K_R8.name] = Q6_K_R8


def _field_last(raw: torch.Tensor, block_bytes: int, lo: int, hi: int) -> torch.Tensor:
    """Rows of blocks -> each 8 blocks as their bytes outside [lo, hi), then their [lo, hi) fields."""
    g = raw.reshape(raw.shape[0], -1, 8, block_bytes)
    rest = torch.cat([g[..., :lo], g[..., hi:]], dim=3)
    return torch.cat([rest.flatten(2), g[..., lo:hi].flatten(2)], dim=2).reshape(raw.shape)


def _field_back(raw: torch.Tensor, block_bytes: int, lo: int, hi: int) -> torch.Tensor:
    """The inverse of `_field_last`."""
    n_rest = 8 * (block_bytes - (hi - lo))
    g = raw.reshape(raw.shape[0], -1, 8 * block_bytes)
    rest = g[..., :n_rest].reshape(*g.shape[:2], 8, -1)
    field = g[..., n_rest:].reshape(*g.shape[:2], 8, -1)
    return torch.cat([rest[..., :lo], field, rest[..., lo:]], dim=3).reshape(raw.shape)


def repack_q6_k_r8(raw: torch.Tensor) -> torch.Tensor:
    """Q6_K rows [N, K / 256 * 210] -> Q6_K_R8 rows (same shape): d (bytes 208..209) last."""
    return _field_last(raw, 210, 208, 210)


def unpack_q6_k_r8(raw: torch.Tensor) -> torch.Tensor:
    """The inverse of `repack_q6_k_r8`: Q6_K_R8 rows -> Q6_K rows."""
    return _field_back(raw, 210, 208, 210)


@_kernel(Q6_K_R8)
def _q6_k_r8(b):
    return _q6_k(unpack_q6_k_r8(b).reshape(-1, 210)).reshape(-1, 2048)


# Q6_K_R3: the same for rows of K % 768 == 0 that R8 can't take (Qwen3-30B-A3B's expert down
# projections: K = 768). Each 3 blocks go to 640 bytes: their 3 bodies, their 3 d, then 10 zero
# bytes so that groups (and rows) stay 16-byte aligned. Same values; rows take 640 / 630 the bytes.
Q6_K_R3 = BlockType("Q6_K_R3", 2000 + GT.Q6_K.value, 768, 640)
_BY_NAME[Q6_K_R3.name] = Q6_K_R3


def repack_q6_k_r3(raw: torch.Tensor) -> torch.Tensor:
    """Q6_K rows [N, K / 256 * 210] -> new Q6_K_R3 rows [N, K / 768 * 640]."""
    g = raw.reshape(raw.shape[0], -1, 3, 210)
    pad = g.new_zeros((*g.shape[:2], 10))
    return torch.cat([g[..., :208].flatten(2), g[..., 208:].flatten(2), pad], dim=2).reshape(raw.shape[0], -1)


def unpack_q6_k_r3(raw: torch.Tensor) -> torch.Tensor:
    """The inverse of `repack_q6_k_r3`: Q6_K_R3 rows -> new Q6_K rows."""
    g = raw.reshape(raw.shape[0], -1, 640)
    body = g[..., :624].reshape(*g.shape[:2], 3, 208)
    d = g[..., 624:630].reshape(*g.shape[:2], 3, 2)
    return torch.cat([body, d], dim=3).reshape(raw.shape[0], -1)


@_kernel(Q6_K_R3)
def _q6_k_r3(b):
    return _q6_k(unpack_q6_k_r3(b).reshape(-1, 210)).reshape(-1, 768)


# Q8_0_R8: Q8_0 repacked for the GPU (not a GGUF type). A Q8_0 block is 34 bytes (d f16, 32 int8),
# so its quants are only 2-byte aligned. R8 regroups each 8 blocks (272 bytes, a multiple of 16):
# their 8 x 32 quant bytes first, then their 8 f16 d. Same bytes, same values; rows of K % 256 == 0.
Q8_0_R8 = BlockType("Q8_0_R8", 1000 + GT.Q8_0.value, 256, 272)
_BY_NAME[Q8_0_R8.name] = Q8_0_R8


def repack_q8_0_r8(raw: torch.Tensor) -> torch.Tensor:
    """Q8_0 rows [N, K / 32 * 34] -> Q8_0_R8 rows (same shape): d (bytes 0..1) last."""
    return _field_last(raw, 34, 0, 2)


def unpack_q8_0_r8(raw: torch.Tensor) -> torch.Tensor:
    """The inverse of `repack_q8_0_r8`: Q8_0_R8 rows -> Q8_0 rows."""
    return _field_back(raw, 34, 0, 2)


@_kernel(Q8_0_R8)
def _q8_0_r8(b):
    return _q8_0(unpack_q8_0_r8(b).reshape(-1, 34)).reshape(-1, 256)


# Q2_K_R8 and IQ2_XXS_R8: the same regrouping for DeepSeek V4's routed experts (GPU only, not GGUF
# types). Q2_K blocks (84 bytes) are 4-byte aligned, IQ2_XXS blocks (66 bytes) 2-byte aligned; each 8
# go to their bodies (Q2_K: scales and quants, 80 bytes; IQ2_XXS: 8 x (4 grid indices, sign/scale
# word), 64 bytes), then their headers (Q2_K: d | dmin; IQ2_XXS: d). 672 and 528 bytes, multiples
# of 16; same bytes, same values; rows of K % 2048 == 0.
Q2_K_R8 = BlockType("Q2_K_R8", 1000 + GT.Q2_K.value, 2048, 672)
IQ2_XXS_R8 = BlockType("IQ2_XXS_R8", 1000 + GT.IQ2_XXS.value, 2048, 528)
_BY_NAME[Q2_K_R8.name] = Q2_K_R8
_BY_NAME[IQ2_XXS_R8.name] = IQ2_XXS_R8


def repack_q2_k_r8(raw: torch.Tensor) -> torch.Tensor:
    """Q2_K rows [N, K / 256 * 84] -> Q2_K_R8 rows (same shape): d, dmin (bytes 80..83) last."""
    return _field_last(raw, 84, 80, 84)


def unpack_q2_k_r8(raw: torch.Tensor) -> torch.Tensor:
    return _field_back(raw, 84, 80, 84)


def repack_iq2_xxs_r8(raw: torch.Tensor) -> torch.Tensor:
    """IQ2_XXS rows [N, K / 256 * 66] -> IQ2_XXS_R8 rows (same shape): d (bytes 0..1) last."""
    return _field_last(raw, 66, 0, 2)


def unpack_iq2_xxs_r8(raw: torch.Tensor) -> torch.Tensor:
    return _field_back(raw, 66, 0, 2)


@_kernel(Q2_K_R8)
def _q2_k_r8(b):
    return _q2_k(unpack_q2_k_r8(b).reshape(-1, 84)).reshape(-1, 2048)


@_kernel(IQ2_XXS_R8)
def _iq2_xxs_r8(b):
    return _iq2_xxs(unpack_iq2_xxs_r8(b).reshape(-1, 66)).reshape(-1, 2048)


def dequantize(raw: torch.Tensor, bt: BlockType) -> torch.Tensor:
    """uint8 [..., nbytes] (whole blocks; never written to) -> float32 [..., nbytes // block_bytes * block_elems]."""
    if raw.dtype != torch.uint8:
        raise OuzelError(f"{bt.name}: expected uint8 block bytes, got {raw.dtype}")
    if raw.dim() == 0 or raw.shape[-1] % bt.block_bytes:
        raise OuzelError(f"{bt.name}: {tuple(raw.shape)} bytes is not a whole number of {bt.block_bytes}-byte blocks per row")
    kernel = _KERNELS.get(bt.ggml_type)
    if kernel is None:
        block_type(bt.ggml_type)  # raises UnsupportedError
    n = raw.shape[-1] // bt.block_bytes * bt.block_elems
    out = kernel(raw.reshape(-1, bt.block_bytes))
    return out.reshape(*raw.shape[:-1], n)
