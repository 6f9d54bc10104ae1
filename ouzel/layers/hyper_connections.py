"""Manifold-constrained hyper-connections (mHC): the residual is N parallel streams.

Before a block, a one-layer perceptron over the flattened streams yields `pre` (collapse N
streams into the block input), `post` (spread the block output over the streams) and `comb`
(an N x N stream mixing matrix, projected near doubly stochastic by Sinkhorn iterations so the
residual norm cannot grow layer after layer). The hyper-head collapses the streams at the end.
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels import cuda as _cuda
from ..kernels import ops
from ..quant.tensor import QTensor

TRITON_ON_CPU = False  # tests: the V4 Triton kernels (kernels/triton/v4.py) on CPU tensors too (interpreter)


def fused_kernels(x: torch.Tensor) -> bool:
    """Whether V4's one-launch kernels are tried for this tensor (CUDA; the CPU in tests)."""
    return x.is_cuda or TRITON_ON_CPU


def dense(w) -> torch.Tensor:
    """A small parameter as float32 (checkpoints may keep it in 16-bit blocks)."""
    return (w.dequantize().reshape(w.shape) if isinstance(w, QTensor) else w).float()


def unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def _fused_mix(hc: "HyperConnection", mixes: torch.Tensor):
    """`HyperConnection.mix` in one Triton launch on CUDA (kernels/triton/mhc.py), or None."""
    if not mixes.is_cuda or hc.n > 16:
        return None
    try:
        from ..kernels.triton.mhc import mhc_mix  # noqa: PLC0415 (only on CUDA machines)
    except ImportError:
        return None
    return mhc_mix(mixes, dense(hc.base), dense(hc.scale), hc.n, hc.iters, hc.hc_eps)


class HyperConnection(nn.Module):
    """fn [(2+N)*N, N*D], base [(2+N)*N], scale [3] (pre, post, comb)."""

    def __init__(self, hc_mult: int, hidden: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.n, self.hidden, self.iters, self.hc_eps, self.norm_eps = hc_mult, hidden, sinkhorn_iters, hc_eps, norm_eps
        self.fn = self.base = self.scale = None

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        m = (2 + self.n) * self.n
        return {"fn": (m, self.n * self.hidden), "base": (m,), "scale": (3,)}

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams [T, N, D] -> post [T, N], comb [T, N, N], collapsed block input [T, D]."""
        T = streams.shape[0]
        mixes = ops.linear(unit_rms(streams.reshape(T, -1).float(), self.norm_eps), self.fn)
        pre, post, comb = _fused_mix(self, mixes) or self.mix(mixes)
        collapsed = (pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype)
        return post, comb, collapsed

    def pre(self, streams: torch.Tensor, norm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """forward() then the block's input RMSNorm `norm` on the collapsed row: post, comb, norm(x).
        On CUDA the GEMV reads the unnormalised streams and one launch does the rest."""
        if fused_kernels(streams) and not norm.unit_offset:
            mixes = ops.linear(streams.reshape(streams.shape[0], -1).float(), self.fn)
            out = _cuda.v4_hc_pre(mixes, streams, dense(self.base), dense(self.scale), norm.weight, self.iters,
                                  self.hc_eps, self.norm_eps, norm.eps)
            if out is not None:
                return out
        post, comb, x = self(streams)
        return post, comb, norm(x)

    def mix(self, mixes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mixes [T, (2+N)*N] -> pre [T, N], post [T, N], comb [T, N, N] (the reference)."""
        T, n = mixes.shape[0], self.n
        pre_w, post_w, comb_w = mixes.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = dense(self.base).split([n, n, n * n])
        pre_s, post_s, comb_s = dense(self.scale).unbind(0)
        pre = torch.sigmoid(pre_w * pre_s + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * post_s + post_b)
        comb = torch.softmax(comb_w.view(T, n, n) * comb_s + comb_b.view(n, n), dim=-1) + self.hc_eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        for _ in range(self.iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + self.hc_eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        return pre, post, comb

    @staticmethod
    def merge(streams: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """New streams: post-weighted block output plus the streams mixed by comb (transposed:
        new_k = sum_j comb[j, k] * old_j)."""
        if fused_kernels(streams):
            new = _cuda.v4_hc_merge(streams, out, post, comb)
            if new is not None:
                return new
        dt = streams.dtype
        return post.to(dt).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dt).transpose(-1, -2), streams)


class HyperHead(nn.Module):
    """Final collapse of the N streams: hc_fn [N, N*D], hc_base [N], hc_scale [1]."""

    def __init__(self, hc_mult: int, hidden: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.n, self.hidden, self.hc_eps, self.norm_eps = hc_mult, hidden, hc_eps, norm_eps
        self.hc_fn = self.hc_base = self.hc_scale = None

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"hc_fn": (self.n, self.n * self.hidden), "hc_base": (self.n,), "hc_scale": (1,)}

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        T = streams.shape[0]
        mixes = ops.linear(unit_rms(streams.reshape(T, -1).float(), self.norm_eps), self.hc_fn)
        pre = torch.sigmoid(mixes * dense(self.hc_scale) + dense(self.hc_base)) + self.hc_eps
        return (pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype)
