"""RMSNorm, computed in float32."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cuda as _cuda


class RMSNorm(nn.Module):
    """x / rms(x) * w; with unit_offset (Gemma) the stored weight is w - 1, so it scales by 1 + w."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.dim, self.eps, self.unit_offset = dim, eps, unit_offset
        self.weight: torch.Tensor | None = None
        self._w1 = None  # (weight, 1 + weight) for unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # one fused launch instead of several elementwise + reduction kernels
            y = _cuda.rms_norm(x, self.weight, self.eps, self.unit_offset)
            if y is not None:
                return y
        elif x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # torch's own op: the reference's arithmetic in one call (a CPU decode step runs ~60)
            return F.rms_norm(x, (self.dim,), self._scale(), self.eps)
        return self.reference(x)

    def _scale(self) -> torch.Tensor:
        """The weight the normalized x is multiplied by: w, or 1 + w (kept while w is the same tensor)."""
        if not self.unit_offset:
            return self.weight
        kept = self._w1
        if kept is None or kept[0] is not self.weight:
            kept = self._w1 = (self.weight, 1.0 + self.weight)
        return kept[1]

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x): the residual add and the norm after it in one launch
        on CUDA, the two ops otherwise."""
        if x.is_cuda:
            out = _cuda.rms_norm(x, self.weight, self.eps, self.unit_offset, residual)
            if out is not None:
                return out
        h = residual + x
        return self(h), h

    def prepare(self, x: torch.Tensor, delta: torch.Tensor | None = None):
        """(norm(x + delta), x + delta, int8 rows of the norm or None): a decoder layer's input
        with the previous sublayer's output `delta` added in the same launch, and, for one row on
        CUDA, its rounding for the int8 decode GEMVs that read it (no separate launch)."""
        if x.is_cuda and x.dim() == 2 and x.shape[0] == 1:
            out = _cuda.rms_norm(x, self.weight, self.eps, self.unit_offset, delta, q8=True)
            if out is not None:
                return out if delta is not None else (out[0], x, out[1])
        if delta is None:
            return self(x), x, None
        return *self.add_norm(delta, x), None

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight.float()
        return (y * (1.0 + w) if self.unit_offset else y * w).to(x.dtype)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weight": (self.dim,)}
