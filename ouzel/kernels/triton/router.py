"""MoE routing of a decode step in one launch: the router's scores, top-k and the chosen weights'
renormalisation (torch launches ~7 kernels for it; per MoE layer of every token).

Reference: `qwen3_moe.SoftmaxTopKRouter.forward` after its logits matmul (and `moe.Router`'s
softmax/sigmoid form): scores = softmax(logits) (or sigmoid), idx = top-k of scores (+ bias),
w = scores[idx] (/ (sum + eps) if renormalised) * scaling.

Program per token row (one warp up to 512 experts: every reduction a warp shuffle, no barrier;
Qwen3's route took 4.8 us on 4 warps on an H100): the E logits in registers (E <= 1024), scores
in fp32, then K rounds of max / lowest index at the max / mask it out (torch.topk's set of experts; the order of the K may
differ, which only reorders the pairs the experts' sum runs over).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_E = 1024


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, w_ptr, idx_ptr, E, K, scaling, eps, s_l,
                  BE: tl.constexpr, BK: tl.constexpr, SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr,
                  RENORM: tl.constexpr):
    t = tl.program_id(0)
    e = tl.arange(0, BE)
    ok = e < E
    x = tl.load(logits_ptr + t * s_l + e, mask=ok, other=float("-inf")).to(tl.float32)
    if SOFTMAX:
        p = tl.exp(x - tl.max(x, axis=0))
        s = p / tl.sum(p, axis=0)
    else:  # sigmoid
        s = 1.0 / (1.0 + tl.exp(-x))
    s = tl.where(ok, s, 0.0)
    pick = s
    if HAS_BIAS:
        pick = s + tl.load(bias_ptr + e, mask=ok, other=0.0).to(tl.float32)
    pick = tl.where(ok, pick, float("-inf"))
    k = tl.arange(0, BK)
    chosen_w = tl.zeros([BK], dtype=tl.float32)
    chosen_i = tl.zeros([BK], dtype=tl.int32)
    for j in range(0, K):
        best = tl.max(pick, axis=0)
        at = tl.min(tl.where(pick == best, e, BE), axis=0)  # the lowest index among equal maxima
        chosen_w = tl.where(k == j, tl.sum(tl.where(e == at, s, 0.0), axis=0), chosen_w)
        chosen_i = tl.where(k == j, at, chosen_i)
        pick = tl.where(e == at, float("-inf"), pick)
    if RENORM:
        chosen_w = chosen_w / (tl.sum(chosen_w, axis=0) + eps)
    chosen_w = chosen_w * scaling
    tl.store(w_ptr + t * K + k, chosen_w, mask=k < K)
    tl.store(idx_ptr + t * K + k, chosen_i.to(tl.int64), mask=k < K)


def route(logits: torch.Tensor, k: int, scaling: float = 1.0, softmax: bool = True,
          bias: torch.Tensor | None = None, renorm: bool = True, eps: float = 1e-20) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights float32 [T, k], expert indices int64 [T, k]); renorm: the k
    weights divided by their sum + eps."""
    T, E = logits.shape
    if E > MAX_E or logits.stride(1) != 1 or not 1 <= k <= E:
        raise ValueError(f"route: logits {tuple(logits.shape)}, k={k}")
    w = torch.empty((T, k), dtype=torch.float32, device=logits.device)
    idx = torch.empty((T, k), dtype=torch.int64, device=logits.device)
    _route_kernel[(T,)](logits, bias if bias is not None else logits, w, idx, E, k, float(scaling), float(eps),
                        logits.stride(0), BE=triton.next_power_of_2(E), BK=triton.next_power_of_2(k),
                        SOFTMAX=softmax, HAS_BIAS=bias is not None, RENORM=renorm,
                        num_warps=1 if E <= 512 else 4)  # one warp: the 3K reductions stay in shuffles
    return w, idx
