"""Linear and Embedding: hold a dense or block-quantized weight, call the dispatched op."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels import ops
from ..quant.tensor import Weight


class Linear(nn.Module):
    """y = x W^T (+ b); the loader sets `weight` (a tensor or a QTensor)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight: Weight | None = None
        self.bias: torch.Tensor | None = None
        self.has_bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ops.linear(x, self.weight)
        return y if self.bias is None else y + self.bias

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {"weight": (self.out_features, self.in_features)}
        if self.has_bias:
            shapes["bias"] = (self.out_features,)
        return shapes


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.num_embeddings, self.dim = num_embeddings, dim
        self.weight: Weight | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return ops.embedding(ids, self.weight)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weight": (self.num_embeddings, self.dim)}
