"""Gated feed-forward: down(act(gate(x)) * up(x))."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cuda as _cuda
from .linear import Linear, LinearGroup

ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate)
        self.up_proj = Linear(hidden, intermediate)
        self.down_proj = Linear(intermediate, hidden)
        self.act = ACTIVATIONS[act]
        self.gate_up = LinearGroup([self.gate_proj, self.up_proj])

    def fuse_weights(self) -> None:
        self.gate_up.fuse()

    def forward(self, x: torch.Tensor, xq=None) -> torch.Tensor:
        """xq: x's int8 rows for the decode GEMVs (`RMSNorm.prepare`), or None."""
        if x.is_cuda and x.dim() == 2 and x.shape[0] == 1 and self.act is F.silu and self.down_proj.bias is None:
            # decode: silu(gate) * up's int8 rounding for the down projection formed by the gate/up
            # GEMV itself (Q4_K), else in one launch of its own
            w = self.gate_up.joint_weight()
            fused = _cuda.gate_up_swiglu(x, w, xq) if w is not None else None
            gu, rows = fused if fused is not None else (self.gate_up.joint(x, xq), None)
            y = None if gu is None else _cuda.swiglu_linear(gu, self.down_proj.weight, rows=rows)
            if y is not None:
                return y
            if gu is not None:  # no fused down projection: the joint GEMV's halves, not two more GEMVs
                gate, up = gu.split(self.gate_proj.out_features, dim=-1)
                return self.down_proj(self.act(gate) * up)
        gate, up = self.gate_up(x, xq)
        return self.down_proj(self.act(gate) * up)
