"""Llama (and its many look-alikes: SmolLM, Mistral without sliding window, ...)."""
from __future__ import annotations

import torch
from torch import nn

from ..layers.attention import Attention
from ..layers.linear import Embedding, Linear
from ..layers.mlp import GatedMLP
from ..layers.norm import RMSNorm
from ..layers.rope import Rope, RopeSpec
from .config import Config


def rope_spec(cfg: Config, theta: float | None = None, scaling: dict | None = None) -> RopeSpec:
    params = cfg.opt("rope_parameters") or {}
    scaling = scaling if scaling is not None else (cfg.opt("rope_scaling") or params)
    theta = theta or params.get("rope_theta") or cfg.opt("rope_theta", 10000.0)
    kind = (scaling.get("rope_type") or scaling.get("type") or "default") if scaling else "default"
    factors = cfg.opt("rope_freq_factors")  # GGUF files carry Llama 3's scaling as per-frequency factors
    if kind == "default":
        return RopeSpec(float(theta), cfg.head_dim, freq_factors=tuple(factors) if factors else None)
    if kind in ("linear", "llama3"):
        return RopeSpec(float(theta), cfg.head_dim, kind, float(scaling["factor"]),
                        float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0)),
                        int(scaling.get("original_max_position_embeddings", 8192)))
    from ..errors import UnsupportedError
    raise UnsupportedError(f"rope scaling {kind!r} is not supported")


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: Config, layer: int, rope: Rope):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(d, eps)
        self.self_attn = Attention(layer, d, cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim, rope,
                                   cfg.head_dim ** -0.5, bias=cfg.opt("attention_bias", False))
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.mlp = GatedMLP(d, cfg.intermediate_size, cfg.opt("hidden_act", "silu"))

    def forward(self, x, positions, kv, out_rows=None, pending=None):
        """x: the residual stream [T, D], `pending` (the last layer's MLP output) not yet added:
        each residual add runs inside the norm after it. Returns (stream, this layer's MLP output)."""
        n, x, xq = self.input_layernorm.prepare(x, pending)
        h = self.self_attn(n, positions, kv, out_rows, xq)
        return self.mlp_block(x if out_rows is None else x[out_rows], h)

    def mlp_block(self, x, h):
        """(x + h, the MLP of norm(x + h)): the attention's residual add runs inside the norm."""
        n, x, xq = self.post_attention_layernorm.prepare(x, h)
        return x, self.mlp(n, xq)


class LlamaModel(nn.Module):
    def __init__(self, cfg: Config, layer_cls=LlamaDecoderLayer):
        super().__init__()
        rope = Rope(rope_spec(cfg))
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layer_cls(cfg, i, rope) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """forward(ids [T], positions [T], kv) -> final hidden states [T, D]; logits(h) -> [T, V]."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    graph_safe = True  # no host reads in forward: a decode step can be captured in a CUDA graph
    prunes_outputs = True  # forward(..., last_only=True) computes the last layer's output for one row

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, kv, last_only: bool = False) -> torch.Tensor:
        x, pending = self.embed(ids), None
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            # a prefill needs logits for its last token only: the last layer skips the other rows
            x, pending = layer(x, positions, kv, slice(-1, None) if last_only and i == last else None, pending)
        return self.model.norm.prepare(x, pending)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    tied_weights = {"lm_head.weight": "model.embed_tokens.weight"}
