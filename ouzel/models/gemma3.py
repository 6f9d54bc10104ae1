"""Gemma 3 (text): sliding-window and global layers, q/k norms, four norms per layer, scaled embedding."""
from __future__ import annotations

import torch
from torch import nn

from ..layers.attention import Attention
from ..layers.linear import Embedding, Linear
from ..layers.mlp import GatedMLP
from ..layers.norm import RMSNorm
from ..layers.rope import Rope
from .config import Config
from .llama import LlamaForCausalLM, rope_spec


def layer_types(cfg: Config) -> list[str]:
    pattern = cfg.opt("sliding_window_pattern", 6)
    return cfg.opt("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(cfg.num_hidden_layers)]


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: Config, layer: int, ropes: dict[str, Rope]):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        kind = layer_types(cfg)[layer]
        window = cfg.sliding_window if kind == "sliding_attention" else None
        scale = cfg.opt("query_pre_attn_scalar", cfg.head_dim) ** -0.5
        self.input_layernorm = RMSNorm(d, eps, unit_offset=True)
        self.self_attn = Attention(layer, d, cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim, ropes[kind],
                                   scale, window, qk_norm_eps=eps, unit_offset_norms=True,
                                   bias=cfg.opt("attention_bias", False))
        self.post_attention_layernorm = RMSNorm(d, eps, unit_offset=True)
        self.pre_feedforward_layernorm = RMSNorm(d, eps, unit_offset=True)
        self.mlp = GatedMLP(d, cfg.intermediate_size, cfg.opt("hidden_activation", "gelu_pytorch_tanh"))
        self.post_feedforward_layernorm = RMSNorm(d, eps, unit_offset=True)

    def forward(self, x, positions, kv, out_rows=None, pending=None):
        """LlamaDecoderLayer's protocol: `pending` is added to the stream x in the first norm's launch."""
        n, x, xq = self.input_layernorm.prepare(x, pending)
        h = self.post_attention_layernorm(self.self_attn(n, positions, kv, out_rows, xq))
        n, x, xq = self.pre_feedforward_layernorm.prepare(x if out_rows is None else x[out_rows], h)
        return x, self.post_feedforward_layernorm(self.mlp(n, xq))


def gemma3_ropes(cfg: Config) -> dict[str, Rope]:
    params = cfg.opt("rope_parameters") or {}
    if "full_attention" in params:  # transformers >= 5 layout: one rope per layer type
        return {kind: Rope(rope_spec(cfg, p.get("rope_theta"), p)) for kind, p in params.items()}
    return {"full_attention": Rope(rope_spec(cfg, cfg.opt("rope_theta", 1e6), cfg.opt("rope_scaling") or {})),
            "sliding_attention": Rope(rope_spec(cfg, cfg.opt("rope_local_base_freq", 1e4), {}))}


class Gemma3Model(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        ropes = gemma3_ropes(cfg)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(cfg, i, ropes) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, unit_offset=True)


class Gemma3ForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: Config):
        nn.Module.__init__(self)
        self.config = cfg
        self.model = Gemma3Model(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        self.embed_scale = torch.tensor(cfg.hidden_size ** 0.5, dtype=torch.float32)
        self.softcap = cfg.opt("final_logit_softcapping")

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids) * self.embed_scale

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.lm_head(hidden)
        return out if self.softcap is None else torch.tanh(out / self.softcap) * self.softcap
