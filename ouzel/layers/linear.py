"""Linear and Embedding: hold a dense or block-quantized weight, call the dispatched op."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels import ops
from ..quant.tensor import QTensor, Weight


class Linear(nn.Module):
    """y = x W^T (+ b); the loader sets `weight` (a tensor or a QTensor)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight: Weight | None = None
        self.bias: torch.Tensor | None = None
        self.has_bias = bias
        self._cpu_call = None  # (weight, x -> x @ weight.T where the CPU kernels read it, else None)

    def forward(self, x: torch.Tensor, xq=None) -> torch.Tensor:
        """xq: x's int8 rows for the CUDA decode GEMV (`RMSNorm.prepare`), or None."""
        if not x.is_cuda and x.dim() == 2 and x.dtype == torch.float32:
            # the CPU kernel without the dispatch's checks (a CPU decode step makes ~60 such calls)
            kept = self._cpu_call
            if kept is None or kept[0] is not self.weight:
                kept = self._cpu_call = (self.weight, ops.cpu_linear_call(self.weight))
            if kept[1] is not None:
                y = kept[1](x)
                return y if self.bias is None else y + self.bias
        y = ops.linear(x, self.weight, xq)
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


class LinearGroup:
    """Linears that read the same input (q/k/v, gate/up). After `fuse()` the ones whose weights
    are GGUF blocks of one type run as one matmul over their row-concatenated blocks (one kernel
    launch instead of three in a decode step); each Linear's weight becomes a view of its rows, so
    nothing is stored twice. Unfused, it calls each Linear in turn (the reference)."""

    def __init__(self, linears: list[Linear]):
        self.linears = linears
        self.groups: list[tuple[list[int], QTensor]] | None = None
        self.pair: tuple[list[int], QTensor, int] | None = None  # (a fused group, the one Linear left out)
        self._cpu_multi = None  # (weights, their one-call CPU product or None)

    def fuse(self) -> None:
        by_type: dict[str, list[int]] = {}
        for i, lin in enumerate(self.linears):
            w = lin.weight
            if isinstance(w, QTensor) and w.raw.is_contiguous():
                by_type.setdefault(w.bt.name, []).append(i)
        groups = []
        for members in by_type.values():
            if len(members) < 2:
                continue
            ws = [self.linears[i].weight for i in members]
            raw = torch.cat([w.raw for w in ws])
            fused = QTensor(raw, ws[0].bt, (sum(w.shape[0] for w in ws), ws[0].shape[1]))
            row = 0
            for i, w in zip(members, ws):
                self.linears[i].weight = QTensor(raw[row:row + w.shape[0]], w.bt, w.shape)
                row += w.shape[0]
            groups.append((members, fused))
        self.groups = groups or None
        # one fused group and one Linear of another type (Q4_K_M's q/k and its Q6_K v): a decode
        # step may run both in one launch (`ops.linear_pair`)
        left = [i for i in range(len(self.linears)) if not any(i in m for m, _ in groups)]
        if len(groups) == 1 and len(left) == 1 and isinstance(self.linears[left[0]].weight, QTensor):
            self.pair = (groups[0][0], groups[0][1], left[0])

    def _cpu_multi_call(self):
        """`ops.cpu_multi_call` of the members' weights, kept while they are the same tensors."""
        ws = [lin.weight for lin in self.linears]
        kept = self._cpu_multi
        if kept is None or any(a is not b for a, b in zip(kept[0], ws)):
            kept = self._cpu_multi = (ws, ops.cpu_multi_call(ws))
        return kept[1]

    def joint_weight(self) -> QTensor | None:
        """The fused weight of every member (rows in member order) if all are in one fused group
        without biases; else None."""
        if self.groups is None or len(self.groups) != 1 or self.groups[0][0] != list(range(len(self.linears))):
            return None
        if any(lin.bias is not None for lin in self.linears):
            return None
        return self.groups[0][1]

    def joint(self, x: torch.Tensor, xq=None) -> torch.Tensor | None:
        """The fused output [..., sum of out_features] (members in order), if every linear is in
        one fused group; else None."""
        w = self.joint_weight()
        return None if w is None else ops.linear(x, w, xq)

    def __call__(self, x: torch.Tensor, xq=None) -> list[torch.Tensor]:
        if self.groups is None:
            if not x.is_cuda and x.dim() == 2 and x.dtype == torch.float32:  # a CPU decode step: one kernel call
                call = self._cpu_multi_call()
                y = None if call is None else call(x)
                if y is not None:
                    ys = y.split([lin.out_features for lin in self.linears], dim=-1)
                    return [o if lin.bias is None else o + lin.bias for o, lin in zip(ys, self.linears)]
            return [lin(x, xq) for lin in self.linears]
        if self.pair is not None and x.dim() == 2 and x.shape[0] == 1 and all(lin.bias is None for lin in self.linears):
            members, w, other = self.pair
            y = ops.linear_pair(x, w, self.linears[other].weight, xq)
            if y is not None:
                ys = y.split([w.shape[0], self.linears[other].out_features], dim=-1)
                out = dict(zip(members, ys[0].split([self.linears[i].out_features for i in members], dim=-1)))
                out[other] = ys[1]
                return [out[i] for i in range(len(self.linears))]
        out: list[torch.Tensor | None] = [None] * len(self.linears)
        for members, w in self.groups:
            ys = ops.linear(x, w, xq).split([self.linears[i].out_features for i in members], dim=-1)
            for i, y in zip(members, ys):
                b = self.linears[i].bias
                out[i] = y if b is None else y + b
        return [o if o is not None else lin(x, xq) for o, lin in zip(out, self.linears)]
