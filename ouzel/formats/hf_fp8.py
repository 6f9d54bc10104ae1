"""Hugging Face block-scaled storage: FP8 (e4m3) weights with per-block scales, FP4 (e2m1,
two per byte) routed experts with per-32-column scales, as `quantization_config` describes
(quant_method "fp8", weight_block_size [128, 128], expert_dtype "fp4").

A weight stays in its stored bytes (`BlockScaledWeight`) and is dequantized where it is used
(`ops.linear` calls `dequantize()`), so loading never expands the model to float.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import OuzelError, UnsupportedError

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP8_TYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
SCALE_SUFFIXES = ("weight_scale_inv", "scale")  # transformers' name, DeepSeek's upstream name


def _scale_values(s: torch.Tensor) -> torch.Tensor:
    e8m0 = getattr(torch, "float8_e8m0fnu", None)
    if s.dtype == torch.uint8 or (e8m0 is not None and s.dtype == e8m0):
        return (s.view(torch.uint8).float() - 127.0).exp2()  # ue8m0: a power of two per byte
    return s.float()


@dataclass
class BlockScaledWeight:
    """data: FP8 [out, in] or FP4 packed int8/uint8 [out, in/2]; scale: [ceil(out/bo), ceil(in/bi)]."""

    data: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, int]
    fp4: bool

    def dequantize(self) -> torch.Tensor:
        if self.fp4:
            u8 = self.data.contiguous().view(torch.uint8)
            lut = torch.tensor(FP4_VALUES, device=u8.device)
            w = torch.stack([lut[(u8 & 0xF).long()], lut[(u8 >> 4).long()]], dim=-1).reshape(self.shape)
        else:
            w = self.data.float()
        s = _scale_values(self.scale)
        rows, cols = self.shape
        bo, bi = -(-rows // s.shape[0]), -(-cols // s.shape[1])
        s = s.repeat_interleave(bo, 0)[:rows].repeat_interleave(bi, 1)[:, :cols]
        return w * s

    def to(self, device) -> "BlockScaledWeight":
        return BlockScaledWeight(self.data.to(device), self.scale.to(device), self.shape, self.fp4)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()


class BlockScaled:
    """Reads one tensor by checkpoint key: plain float (via the inner source), integer tables
    as they are, FP8/FP4 with their scale tensor as a BlockScaledWeight."""

    def __init__(self, inner, cfg):
        self.inner = inner
        q = cfg.opt("quantization_config") or {}
        self.method = q.get("quant_method")
        if self.method not in (None, "fp8"):
            raise UnsupportedError(f"{inner.dir}: quantization {self.method!r} is not supported (fp8 with fp4 experts)")
        self.expert_fp4 = q.get("expert_dtype", cfg.opt("expert_dtype")) == "fp4"

    def _scale_key(self, key: str) -> str | None:
        base = key[: -len("weight")] if key.endswith("weight") else key + "."
        return next((base + s for s in SCALE_SUFFIXES if self.inner.has(base + s)), None)

    def get(self, key: str, shape: tuple[int, ...]):
        t = self.inner.raw_tensor(key)
        if t.dtype in FP8_TYPES or t.dtype in (torch.int8, torch.uint8) and tuple(t.shape) != tuple(shape):
            return self._scaled(key, t, shape)
        if not t.is_floating_point():
            if tuple(t.shape) != tuple(shape):
                raise OuzelError(f"{self.inner.dir}: tensor {key!r} has shape {list(t.shape)}, config implies {list(shape)}")
            return t.long()
        return self.inner.get(key, shape)

    def _scaled(self, key: str, t: torch.Tensor, shape) -> BlockScaledWeight:
        fp4 = t.dtype not in FP8_TYPES
        stored = (shape[0], shape[1] // 2) if fp4 else tuple(shape)
        if len(shape) != 2 or tuple(t.shape) != stored:
            raise OuzelError(f"{self.inner.dir}: tensor {key!r} has shape {list(t.shape)}, "
                             f"{'FP4' if fp4 else 'FP8'} storage of {list(shape)} is {list(stored)}")
        skey = self._scale_key(key)
        if skey is None:
            raise OuzelError(f"{self.inner.dir}: {key!r} is {'FP4' if fp4 else 'FP8'} but has no "
                             f"'{SCALE_SUFFIXES[0]}' scale tensor")
        return BlockScaledWeight(t, self.inner.raw_tensor(skey), tuple(shape), fp4)
