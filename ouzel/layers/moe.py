"""Routed experts + shared expert (DeepSeek-style MoE), with top-k or hash routing.

Expert weights stay as stored (dense or GGUF blocks, per expert); only the experts some token
chose run, each on the tokens that chose it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedError
from ..kernels import cuda as _cuda
from ..kernels import ops
from ..quant.tensor import QTensor, Weight
from .hyper_connections import dense
from .linear import Linear, LinearGroup

FUSED_MAX_PAIRS = 64  # (token, expert) pairs up to which the fused kernels run (decode steps)
PAIRWISE_ON_CPU = False  # tests: the decode steps' pair-wise path (its torch reference) on the CPU too

SCORING = {
    "sqrtsoftplus": lambda x: F.softplus(x).sqrt(),
    "sigmoid": torch.sigmoid,
    "softmax": lambda x: x.softmax(dim=-1),
}


@dataclass
class ExpertStack:
    """E experts' matrices of one kind, logically [E, out, in]. Each expert's matrix is a list of
    row blocks concatenated along `out` (a fused gate_up may be stored as separate gate and up),
    each block a Weight (dense tensor, QTensor, or anything with `dequantize()` and a shape).

    `stacked` (GGUF files): per block kind, one QTensor [E * rows, in] whose row slices are the
    experts' blocks; it moves to a device in one piece and feeds the fused MoE kernels."""

    parts: list[list[Weight]]
    shape: tuple[int, int, int]
    stacked: list[QTensor] | None = None

    def linear(self, x: torch.Tensor, e: int) -> torch.Tensor:
        blocks = self.parts[e]
        if len(blocks) == 1:
            return ops.linear(x, blocks[0])
        return torch.cat([ops.linear(x, b) for b in blocks], dim=-1)

    def to(self, device) -> "ExpertStack":
        if self.stacked is None:
            return ExpertStack([[b.to(device) for b in p] for p in self.parts], self.shape)
        # CUDA runs gate and up as one stack; they are fused before the move, on the host: fused
        # after it, the moved pieces were freed on the GPU and left their bytes as holes in torch's
        # cache (Qwen3-30B-A3B: 3.9 GiB reserved over what was allocated, bench/memory_trace.py)
        src = self.fused() if torch.device(device).type == "cuda" else self
        return ExpertStack.from_stacked([w.to(device) for w in src.stacked], self.shape)

    def fused(self) -> "ExpertStack":
        """Gate and up stored as two stacks of one block type become one stack whose expert e is
        [gate_e; up_e]: one kernel per MoE step instead of two. Same bytes (the pieces are freed)."""
        if self.stacked is None or len(self.stacked) < 2 or len({w.bt.name for w in self.stacked}) != 1:
            return self
        E = self.shape[0]
        per = [w.raw.view(E, -1, w.raw.shape[1]) for w in self.stacked]
        if len({p.shape[2] for p in per}) != 1:
            return self
        raw = torch.cat(per, dim=1).reshape(-1, per[0].shape[2])
        return ExpertStack.from_stacked([QTensor(raw, self.stacked[0].bt, (raw.shape[0], self.shape[2]))], self.shape)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes if isinstance(b, QTensor) else b.numel() * b.element_size()
                   for p in self.parts for b in p)

    @classmethod
    def from_dense(cls, w: torch.Tensor) -> "ExpertStack":
        return cls([[w[e]] for e in range(w.shape[0])], tuple(w.shape))

    @classmethod
    def from_stacked(cls, pieces: list[QTensor], shape) -> "ExpertStack":
        E = shape[0]
        parts = [[QTensor(w.raw[e * (w.shape[0] // E):(e + 1) * (w.shape[0] // E)], w.bt,
                          (w.shape[0] // E, w.shape[1])) for w in pieces] for e in range(E)]
        return cls(parts, tuple(shape), pieces)


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float | None) -> torch.Tensor:
    """silu(gate) * up with the V4 clamp: gate from above only, up on both sides."""
    if limit:
        gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up


def softmax_topk(logits: torch.Tensor, k: int, renorm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax routing over logits [T, E]: the top k experts' probabilities (renormalised to sum
    to 1 if renorm) and indices. On CUDA in one launch (`kernels/triton/router.py`)."""
    if logits.is_cuda:
        fast = _cuda.route(logits, k, "softmax", renorm=renorm, eps=0.0)
        if fast is not None:
            return fast
    w, idx = torch.topk(logits.softmax(dim=-1), k, dim=-1)
    if renorm:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, idx


def softmax_topk_linear(x: torch.Tensor, weight, k: int, renorm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`softmax_topk` of the router logits x @ weight.T; for one token on CUDA the GEMV and the
    routing in one launch (`router.route_linear`)."""
    if x.is_cuda and x.dim() == 2 and x.shape[0] == 1:
        fast = _cuda.route_linear(x.float(), weight, k, "softmax", renorm=renorm, eps=0.0)
        if fast is not None:
            return fast
    return softmax_topk(ops.linear(x.float(), weight), k, renorm)


def softmax_topk_norm_linear(norm, x: torch.Tensor, delta: torch.Tensor, weight, k: int, renorm: bool):
    """((weights, experts), (norm(x + delta), x + delta, its int8 rows)): `norm.prepare(x, delta)` and
    `softmax_topk_linear` of its output in one launch for one CUDA token (`cuda.route_norm_linear`:
    unless OUZEL_NORM_ROUTER=0), or None: the caller runs the two."""
    if not x.is_cuda:
        return None
    return _cuda.route_norm_linear(x, delta, norm.weight, norm.eps, norm.unit_offset, weight, k, "softmax",
                                   renorm=renorm, eps=0.0)


class ClampedMLP(nn.Module):
    """The shared expert: a gated MLP with the same SwiGLU clamp as the routed experts."""

    def __init__(self, hidden: int, intermediate: int, limit: float | None):
        super().__init__()
        self.gate_proj, self.up_proj = Linear(hidden, intermediate), Linear(hidden, intermediate)
        self.down_proj = Linear(intermediate, hidden)
        self.limit = limit
        self.gate_up = LinearGroup([self.gate_proj, self.up_proj])

    def fuse_weights(self) -> None:
        self.gate_up.fuse()

    def forward(self, x: torch.Tensor, xq=None) -> torch.Tensor:
        if x.is_cuda and x.dim() == 2 and x.shape[0] == 1:
            # decode: one GEMV for gate and up, then the clamp, silu * up and the int8 rounding of
            # the down projection's input in one launch (as GatedMLP; 11 launches before)
            gu = self.gate_up.joint(x, xq)
            y = None if gu is None else _cuda.swiglu_linear(gu, self.down_proj.weight, self.limit)
            if y is not None:
                return y.to(x.dtype)
            if gu is not None:  # no fused down projection: the joint GEMV's halves, not two more GEMVs
                gate, up = gu.split(self.gate_proj.out_features, dim=-1)
                return self.down_proj(swiglu(gate, up, self.limit))
        gate, up = self.gate_up(x, xq)
        return self.down_proj(swiglu(gate, up, self.limit))


class Router(nn.Module):
    """weight [E, D]; e_score_correction_bias [E] (top-k: biases the choice, not the weights)
    or tid2eid [V, K] (hash: a frozen token-id -> experts table chooses)."""

    def __init__(self, hidden: int, n_experts: int, top_k: int, scoring: str, scaling: float,
                 hash_vocab: int | None = None):
        super().__init__()
        if scoring not in SCORING:
            raise UnsupportedError(f"router scoring {scoring!r} is not supported; supported: {', '.join(SCORING)}")
        self.hidden, self.n_experts, self.top_k, self.scaling = hidden, n_experts, top_k, scaling
        self.scoring, self.score, self.hash_vocab = scoring, SCORING[scoring], hash_vocab
        self.weight = self.e_score_correction_bias = self.tid2eid = None

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        if self.hash_vocab is not None:
            return {"weight": (self.n_experts, self.hidden), "tid2eid": (self.hash_vocab, self.top_k)}
        return {"weight": (self.n_experts, self.hidden), "e_score_correction_bias": (self.n_experts,)}

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D], ids [T] -> weights [T, K] (float32), expert indices [T, K]."""
        hashed = self.hash_vocab is not None
        fused = dict(bias=None if hashed else dense(self.e_score_correction_bias), renorm=True, eps=1e-20,
                     table=self.tid2eid if hashed else None, ids=ids if hashed else None)
        if x.is_cuda and x.dim() == 2 and x.shape[0] == 1:  # decode: the GEMV and the routing in one launch
            fast = _cuda.route_linear(x.float(), self.weight, self.top_k, self.scoring, self.scaling, **fused)
            if fast is not None:
                return fast
        logits = ops.linear(x.float(), self.weight)
        if logits.is_cuda:  # scores, choice, gather and renormalisation in one launch
            fast = _cuda.route(logits, self.top_k, self.scoring, self.scaling, **fused)
            if fast is not None:
                return fast
        scores = self.score(logits)
        if self.hash_vocab is not None:
            idx = self.tid2eid[ids].long()
        else:
            idx = torch.topk(scores + dense(self.e_score_correction_bias), self.top_k, dim=-1, sorted=False).indices
        w = scores.gather(1, idx)
        # the reference always renormalises the chosen weights (norm_topk_prob is not consulted)
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * self.scaling, idx


class RoutedExperts(nn.Module):
    """gate_up_proj [E, 2I, D] (gate rows first), down_proj [E, D, I]."""

    def __init__(self, hidden: int, intermediate: int, n_experts: int, limit: float | None):
        super().__init__()
        self.hidden, self.intermediate, self.n_experts, self.limit = hidden, intermediate, n_experts, limit
        self.gate_up_proj: ExpertStack | None = None
        self.down_proj: ExpertStack | None = None

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        E, D, I = self.n_experts, self.hidden, self.intermediate
        return {"gate_up_proj": (E, 2 * I, D), "down_proj": (E, D, I)}

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, xq=None) -> torch.Tensor:
        # x [T, D]; weights, idx [T, K]; xq: x's int8 rows for the decode GEMVs (or None)
        gu, down = self._stack(self.gate_up_proj), self._stack(self.down_proj)
        if x.is_cuda or (PAIRWISE_ON_CPU and idx.numel() <= FUSED_MAX_PAIRS):
            if idx.numel() <= FUSED_MAX_PAIRS:
                out = self._fused(x, weights, idx, gu, down, xq)
            else:
                out = self._grouped(x, weights, idx, gu, down)
            if out is not None:
                return out
        out = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():  # only the active experts
            tok, slot = torch.where(idx == e)
            h = gu.linear(x[tok], e)
            y = down.linear(swiglu(h[:, : self.intermediate], h[:, self.intermediate:], self.limit), e)
            out.index_add_(0, tok, (y * weights[tok, slot, None]).to(out.dtype))
        return out

    def fusable(self) -> bool:
        """Whether `_fused` runs for decode steps here (stacked GGUF blocks of kernel types on CUDA)."""
        stacks = [w for w in (self.gate_up_proj, self.down_proj) if isinstance(w, ExpertStack)]
        return len(stacks) == 2 and all(s.stacked is not None and all(w.raw.is_cuda and _cuda.gemv_supports(w)
                                                                      for w in s.stacked) for s in stacks)

    def _fused(self, x, weights, idx, gu: ExpertStack, down: ExpertStack, xq=None) -> torch.Tensor | None:
        """Every (token, expert) pair in one kernel per matrix, expert ids read on the device: no
        per-expert loop, no host sync (a decode step can be captured in a CUDA graph). None where
        the weights are not stacked GGUF blocks with a kernel."""
        if gu.stacked is None or down.stacked is None:
            return None
        T, K = idx.shape
        flat = idx.reshape(-1)
        act_rows = []  # silu(gate) * up's int8 rows, where the gate/up GEMV formed them

        def matmul(inp, w, first):
            if first and inp.is_cuda and len(gu.stacked) == 1:
                out = _cuda.gate_up_swiglu(inp, w, xq, self.limit, n_experts=self.n_experts, idx=flat, x_div=K)
                if out is not None:
                    act_rows.append(out[1])
                    return out[0]
            return ops.linear_experts(inp, w, self.n_experts, flat, K if first else 1, xq if first else None)

        combined = []

        def down_fast(h):  # one token: the down GEMV also forms the weighted sum of its K rows
            rows = act_rows[0] if act_rows else None
            if T == 1:
                out = _cuda.swiglu_experts(h, down.stacked[0], self.n_experts, flat, self.limit, combine=weights,
                                           rows=rows)
                if out is not None:
                    combined.append(True)
                    return out
            return _cuda.swiglu_experts(h, down.stacked[0], self.n_experts, flat, self.limit, rows=rows)

        y = self._through(x, gu, down, matmul, down_fast)
        if y is None:
            return None
        if combined:
            return y.to(x.dtype)
        out = _cuda.weighted_rows(y, weights, x.dtype) if y.is_cuda else None  # one launch
        if out is not None:
            return out
        return torch.bmm(weights[:, None, :].to(y.dtype), y.view(T, K, -1))[:, 0].to(x.dtype)

    def _through(self, x, gu: ExpertStack, down: ExpertStack, matmul, down_fast=None) -> torch.Tensor | None:
        """down(swiglu(gate_up(x))) over (token, expert) pairs with a pair-wise expert matmul
        `matmul(inp, stacked weight, first)` (first: the gate/up pieces, fed from x); None where it
        has no kernel for a weight. down_fast(h): swiglu + down in fewer launches, or None."""
        hs = [matmul(x, w, True) for w in gu.stacked]
        if any(h is None for h in hs):
            return None
        h = (hs[0] if len(hs) == 1 else torch.cat(hs, dim=-1)).float()  # [pairs, 2I]
        y = None if down_fast is None or not h.is_cuda else down_fast(h)
        if y is not None:
            return y
        I = self.intermediate
        act = _cuda.swiglu(h, self.limit, x.dtype) if h.is_cuda else None  # one launch, not 2-4
        if act is None:
            act = swiglu(h[:, :I], h[:, I:], self.limit).to(x.dtype)
        return matmul(act, down.stacked[0], False)

    def _grouped(self, x, weights, idx, gu: ExpertStack, down: ExpertStack) -> torch.Tensor | None:
        """Prefill: the (token, expert) pairs sorted by expert. On CUDA the grouped GEMM kernel
        decodes the blocks inside its tiles, its schedule built on the device (no host read, so
        the layers queue back to back). Elsewhere every expert's blocks dequantized in one kernel
        per matrix, the pairs padded to the busiest expert's count (one host read), two batched
        matmuls. On CUDA in bf16 (OUZEL_CUDA_PREFILL_DTYPE=f32: x's dtype); on the CPU in float32."""
        if gu.stacked is None or down.stacked is None:
            return None
        from ..kernels.ops import dequantize_stacked  # noqa: PLC0415
        T, K = idx.shape
        E, D, I = self.n_experts, self.hidden, self.intermediate
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)  # pairs grouped by expert
        # pairs per expert; not bincount, which reads the largest id on the host to size its output
        counts = torch.zeros(E, dtype=torch.long, device=flat.device).index_add_(0, flat, torch.ones_like(flat))
        if x.is_cuda:
            out = self._grouped_kernels(x, weights, order, counts, K, gu, down)  # counts stay on the device
            if out is not None:
                return out
        ws = [dequantize_stacked(w, x) for w in (*gu.stacked, *down.stacked)]
        if any(w is None for w in ws):
            return None
        dt = ws[0].dtype
        w_gu = torch.cat([w.view(E, -1, D) for w in ws[:-1]], dim=1)  # [E, 2I, D]
        w_down = ws[-1].view(E, D, I)
        e_sorted = flat[order]
        slot = torch.arange(len(order), device=x.device) - (torch.cumsum(counts, 0) - counts)[e_sorted]
        xs = torch.zeros((E, int(counts.max()), D), dtype=dt, device=x.device)
        xs[e_sorted, slot] = x[order // K].to(dt)
        h = torch.bmm(xs, w_gu.transpose(1, 2)).float()  # [E, cap, 2I]
        a = swiglu(h[..., :I], h[..., I:], self.limit).to(dt)
        y = torch.bmm(a, w_down.transpose(1, 2))[e_sorted, slot].float()  # [T*K, D], sorted order
        out = torch.zeros_like(x)
        out.index_add_(0, order // K, (y * weights.reshape(-1)[order, None]).to(out.dtype))
        return out

    def _grouped_kernels(self, x, weights, order, counts: torch.Tensor, K: int, gu: ExpertStack,
                         down: ExpertStack) -> torch.Tensor | None:
        """`_grouped` with the experts' blocks decoded inside the matmul tiles (no dense copy of
        every expert per layer): kernels/triton/gguf.py `qgemm_experts`."""
        pairs = (order // K).to(torch.int32)  # gate/up read the token's row, down its own pair's row
        own = torch.arange(len(order), dtype=torch.int32, device=x.device)
        y = None
        if len(gu.stacked) == 1:  # silu(gate) * up formed by the gate/up GEMM (None where it can't)
            act = _cuda.moe_gemm(x, gu.stacked[0], self.n_experts, pairs, counts, swiglu=True, limit=self.limit)
            y = None if act is None else _cuda.moe_gemm(act, down.stacked[0], self.n_experts, own, counts)
        if y is None:
            y = self._through(x, gu, down, lambda inp, w, first: _cuda.moe_gemm(inp, w, self.n_experts,
                                                                                   pairs if first else own, counts))
        if y is None:
            return None
        # back to token order, then each token's weighted sum in a fixed order: deterministic, where
        # index_add_'s atomics summed a token's K rows in whatever order they landed
        inv = torch.empty_like(order)
        inv[order] = torch.arange(len(order), device=order.device)
        out = _cuda.weighted_rows(y, weights, x.dtype, rows=inv)  # y read through inv: no gathered copy
        if out is not None:
            return out
        out = torch.zeros_like(x)
        out.index_add_(0, order // K, (y.float() * weights.reshape(-1)[order, None]).to(out.dtype))
        return out

    @staticmethod
    def _stack(w) -> ExpertStack:
        return w if isinstance(w, ExpertStack) else ExpertStack.from_dense(w)


class SparseMoE(nn.Module):
    def __init__(self, hidden: int, intermediate: int, n_experts: int, top_k: int, scoring: str,
                 scaling: float, limit: float | None, hash_vocab: int | None = None):
        super().__init__()
        self.gate = Router(hidden, n_experts, top_k, scoring, scaling, hash_vocab)
        self.experts = RoutedExperts(hidden, intermediate, n_experts, limit)
        self.shared_experts = ClampedMLP(hidden, intermediate, limit)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        w, idx = self.gate(x, ids)
        xq = _cuda.quantize_rows(x) if x.is_cuda and x.dim() == 2 and x.shape[0] == 1 else None  # made once, read twice
        return self.experts(x, w, idx, xq) + self.shared_experts(x, xq)
