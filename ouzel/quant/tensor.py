"""A weight kept in its GGUF blocks: raw bytes, block type and logical shape."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .blocks import BlockType, dequantize


@dataclass
class QTensor:
    raw: torch.Tensor  # uint8 [rows, row_bytes]; rows are output features
    bt: BlockType
    shape: tuple[int, int]  # logical [out_features, in_features]

    def __post_init__(self):
        rows, cols = self.shape
        if self.raw.dim() != 2 or self.raw.shape[0] != rows or self.raw.shape[1] != self.bt.row_bytes(cols):
            raise ValueError(f"{self.bt.name} bytes {tuple(self.raw.shape)} do not hold a {self.shape} matrix")

    @property
    def device(self) -> torch.device:
        return self.raw.device

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    def dequantize(self, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """float32 [out, in] (or the selected rows); the reference every fast path is checked against."""
        raw = self.raw if rows is None else self.raw[rows]
        return dequantize(raw, self.bt)

    def float_view(self) -> torch.Tensor | None:
        """The weight itself as a dense [out, in] tensor (no copy) where its type is a plain float
        (F32 / F16 / BF16), else None."""
        dtype = _FLOAT_TYPES.get(self.bt.name)
        return None if dtype is None or self.raw.stride(1) != 1 else self.raw.view(dtype)

    def to(self, device: torch.device | str) -> "QTensor":
        return QTensor(self.raw.to(device), self.bt, self.shape)

    def select_rows(self, index: torch.Tensor) -> "QTensor":
        """A new QTensor of the given rows (a copy of their blocks; used to reorder heads at load)."""
        return QTensor(self.raw[index].contiguous(), self.bt, (len(index), self.shape[1]))


Weight = torch.Tensor | QTensor
_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
