"""The mHC mixing weights in one launch: `HyperConnection.mix` (layers/hyper_connections.py) is the
reference, ~125 small torch kernels per call with 20 Sinkhorn iterations (a decode step of a
43-layer V4 runs 86 of them).

`mhc_mix`, program per token: pre = sigmoid(m * s0 + b) + eps, post = 2 sigmoid(m * s1 + b),
comb = softmax over each row of (m * s2 + b) + eps, divided by its column sums, then iters - 1
rounds of row then column normalisation (each sum + eps), all in fp32 registers (N <= 16).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .pdl import wait_for_inputs


@triton.jit
def _mhc_mix_kernel(m_ptr, b_ptr, s_ptr, pre_ptr, post_ptr, comb_ptr, s_m, N, iters, eps,
                    BN: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BN)
    j = tl.arange(0, BN)
    mi = i < N
    m = m_ptr + t * s_m
    s0, s1, s2 = tl.load(s_ptr), tl.load(s_ptr + 1), tl.load(s_ptr + 2)
    pre = tl.sigmoid(tl.load(m + i, mask=mi, other=0.0) * s0 + tl.load(b_ptr + i, mask=mi, other=0.0)) + eps
    post = 2 * tl.sigmoid(tl.load(m + N + i, mask=mi, other=0.0) * s1 + tl.load(b_ptr + N + i, mask=mi, other=0.0))
    tl.store(pre_ptr + t * N + i, pre, mask=mi)
    tl.store(post_ptr + t * N + i, post, mask=mi)
    ij = i[:, None] * N + j[None, :]
    mij = mi[:, None] & (j[None, :] < N)
    c = tl.load(m + 2 * N + ij, mask=mij, other=0.0) * s2 + tl.load(b_ptr + 2 * N + ij, mask=mij, other=0.0)
    c = tl.where(mij, c, float("-inf"))
    c = tl.exp(c - tl.where(mi, tl.max(c, axis=1), 0.0)[:, None])  # padded rows: exp(-inf) = 0, no NaN
    c = tl.where(mij, c / tl.where(mi, tl.sum(c, axis=1), 1.0)[:, None] + eps, 0.0)
    c = c / (tl.sum(c, axis=0)[None, :] + eps)
    for _ in range(iters - 1):
        c = c / (tl.sum(c, axis=1)[:, None] + eps)
        c = c / (tl.sum(c, axis=0)[None, :] + eps)
    tl.store(comb_ptr + t * N * N + ij, c, mask=mij)


def mhc_mix(mixes: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, n: int, iters: int, eps: float):
    """mixes [T, (2+n)*n] fp32, base [(2+n)*n], scale [3] -> pre [T, n], post [T, n], comb [T, n, n]."""
    T = mixes.shape[0]
    if mixes.stride(-1) != 1:
        mixes = mixes.contiguous()
    pre = torch.empty((T, n), dtype=torch.float32, device=mixes.device)
    post = torch.empty((T, n), dtype=torch.float32, device=mixes.device)
    comb = torch.empty((T, n, n), dtype=torch.float32, device=mixes.device)
    if T:
        _mhc_mix_kernel[(T,)](mixes, base.contiguous(), scale.contiguous(), pre, post, comb, mixes.stride(0),
                              n, max(int(iters), 1), float(eps), BN=triton.next_power_of_2(n), num_warps=1,
                              **pdl.launch(mixes.device))
    return pre, post, comb
