"""Causal self-attention with grouped KV heads, optional q/k norms and a sliding window."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from torch import nn

from ..kv.cache import KVState
from .linear import Linear, LinearGroup
from .norm import RMSNorm
from .rope import QKRope, Rope


def causal_mask(positions: torch.Tensor, n_keys: int, window: int | None) -> torch.Tensor:
    """[T, S] bool, True where query at positions[t] may see key s (key s sits at position s)."""
    keys = torch.arange(n_keys, device=positions.device)
    mask = keys[None, :] <= positions[:, None]
    if window is not None:
        mask &= keys[None, :] > positions[:, None] - window
    return mask


def attend(q, k, v, positions, window: int | None, scale: float) -> torch.Tensor:
    """q [T, H, D], k/v [S, Hkv, D] -> [T, H, D]; the pure-torch reference attention. The queries
    are the last T of the S keys (positions = S - T .. S - 1), as every cache's prefill calls it.
    A 16-bit cache is attended in its own dtype (the fused kernels need one dtype); out in q's."""
    T, S = q.shape[0], k.shape[0]
    out_dtype = q.dtype
    if k.dtype != q.dtype:
        q = q.to(k.dtype)
    # A fresh prefill the window cannot cut is plain causal: the fused kernel then skips the
    # masked half instead of reading an explicit [T, S] mask.
    plain_causal = T == S and T > 1 and (window is None or T <= window)
    need_mask = not plain_causal and (T > 1 or (window is not None and S > window))
    if need_mask and q.is_cuda and window is None and T < S:
        # a prefill chunk after cached tokens: causal aligned to the last key, which the CUDA flash
        # kernel takes without a [T, S] mask (an explicit mask falls back to a ~10x slower kernel)
        mask = causal_lower_right(T, S)
    else:
        mask = causal_mask(positions, S, window) if need_mask else None
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, is_causal=plain_causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1).to(out_dtype)


def decode_attention_reference(q, k_cache, v_cache, lengths, window: int | None, scale: float) -> torch.Tensor:
    """One new token: q [1, H, D] over the first lengths[0] rows of k/v_cache [C, Hkv, D]. The
    length stays on the device (masking the whole capacity), so a CUDA graph can replay it."""
    keys = torch.arange(k_cache.shape[0], device=q.device)
    mask = keys < lengths[:, None]
    if window is not None:
        mask &= keys >= lengths[:, None] - window
    return attend_masked(q, k_cache, v_cache, mask, scale)


def attend_masked(q, k, v, mask, scale: float) -> torch.Tensor:
    out = F.scaled_dot_product_attention(
        q.to(k.dtype).transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1).to(q.dtype)


def decode_attention(q, k_cache, v_cache, lengths, window: int | None, scale: float) -> torch.Tensor:
    """decode_attention_reference, through the Triton flash-decoding kernel where it runs."""
    if q.is_cuda:
        from ..kernels.cuda import decode_attention as fast  # noqa: PLC0415
        out = fast(q, k_cache, v_cache, lengths, window, scale)
        if out is not None:
            return out
    return decode_attention_reference(q, k_cache, v_cache, lengths, window, scale)


class Attention(nn.Module):
    def __init__(self, layer: int, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 rope: Rope, scale: float, window: int | None = None, qk_norm_eps: float | None = None,
                 unit_offset_norms: bool = False, bias: bool = False):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, n_heads, n_kv_heads, head_dim
        self.rope, self.scale, self.window = rope, scale, window
        self.q_proj = Linear(hidden, n_heads * head_dim, bias)
        self.k_proj = Linear(hidden, n_kv_heads * head_dim, bias)
        self.v_proj = Linear(hidden, n_kv_heads * head_dim, bias)
        self.o_proj = Linear(n_heads * head_dim, hidden)
        self.qkv = LinearGroup([self.q_proj, self.k_proj, self.v_proj])
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(head_dim, qk_norm_eps, unit_offset_norms)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps, unit_offset_norms)
        else:
            self.q_norm = self.k_norm = None

    def fuse_weights(self) -> None:
        self.qkv.fuse()

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv: KVState, out_rows: slice | None = None,
                xq=None):
        # x: [T, hidden]; positions: [T]; out_rows: the rows whose output is wanted (all by default;
        # every row's k/v is still stored); xq: x's int8 rows for the decode GEMVs (or None)
        T = x.shape[0]
        xo, qpos = (x, positions) if out_rows is None else (x[out_rows], positions[out_rows])
        if out_rows is None:
            q, k, v = self.qkv(x, xq)
        else:
            q, k, v = self.q_proj(xo), self.k_proj(x), self.v_proj(x)
        q = q.view(xo.shape[0], self.n_heads, self.head_dim)
        k = k.view(T, self.n_kv_heads, self.head_dim)
        v = v.view(T, self.n_kv_heads, self.head_dim)
        norms = (self.q_norm, self.k_norm) if self.q_norm is not None else None
        if out_rows is None:  # q and k share the positions: the q/k norms and rope go with the attention
            # (a CUDA decode step does them in its attention kernel, else one launch for both)
            out, oq = kv.attention(self.layer, q, k, v, qpos, self.window, self.scale, rope=QKRope(self.rope, norms),
                                   q8=True)
            return self.o_proj(out.reshape(xo.shape[0], -1), oq)
        if norms is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(q, qpos), self.rope(k, positions)
        out = kv.attention(self.layer, q, k, v, qpos, self.window, self.scale)
        return self.o_proj(out.reshape(xo.shape[0], -1))
