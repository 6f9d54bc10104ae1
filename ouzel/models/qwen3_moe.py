"""Qwen3-MoE: Llama's skeleton with q/k norms and a sparse MLP of softmax-top-k routed experts.

    x -> input_layernorm -> Attention(q_norm, k_norm before rope, GQA) -> + ->
      -> post_attention_layernorm -> Qwen3SparseMoe (or a dense GatedMLP in mlp_only_layers) -> +

No shared expert and no router bias. Routing: softmax over all E experts, keep the top K, and
renormalise the kept weights when `norm_topk_prob` (Qwen3-30B-A3B does; llama.cpp always does).
"""
from __future__ import annotations

import torch
from torch import nn

from ..layers.attention import Attention
from ..layers.linear import Linear
from ..layers.mlp import GatedMLP
from ..layers.moe import Router, RoutedExperts, softmax_topk_linear, softmax_topk_norm_linear
from ..layers.norm import RMSNorm
from ..layers.rope import Rope
from .config import Config
from .llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


def num_experts(cfg: Config) -> int:
    # config.json spells it num_local_experts (transformers' attribute_map), the config class num_experts
    return int(cfg.opt("num_experts") or cfg.opt("num_local_experts") or 0)


def is_sparse_layer(cfg: Config, layer: int) -> bool:
    """transformers' rule: MoE unless listed in mlp_only_layers or off the decoder_sparse_step grid."""
    step = cfg.opt("decoder_sparse_step", 1)
    return (layer not in cfg.opt("mlp_only_layers", [])) and num_experts(cfg) > 0 and (layer + 1) % step == 0


class SoftmaxTopKRouter(Router):
    """weight [E, D]; no correction bias, no hash table: softmax scores choose and weigh."""

    def __init__(self, hidden: int, n_experts: int, top_k: int, renorm: bool):
        super().__init__(hidden, n_experts, top_k, "softmax", 1.0)
        self.renorm = renorm

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weight": (self.n_experts, self.hidden)}

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> weights [T, K] float32, expert indices [T, K]."""
        return softmax_topk_linear(x, self.weight, self.top_k, self.renorm)


class Qwen3SparseMoe(nn.Module):
    # T tokens, E experts, K experts per token, D hidden
    def __init__(self, cfg: Config):
        super().__init__()
        E, K = num_experts(cfg), cfg.num_experts_per_tok
        self.gate = SoftmaxTopKRouter(cfg.hidden_size, E, K, bool(cfg.opt("norm_topk_prob", False)))
        self.experts = RoutedExperts(cfg.hidden_size, cfg.moe_intermediate_size, E, limit=None)

    def forward(self, x: torch.Tensor, xq=None) -> torch.Tensor:  # x [T, D]; xq: its int8 rows or None
        w, idx = self.gate(x)  # [T, K], [T, K]
        return self.experts(x, w, idx, xq)  # [T, D]

    def norm_route(self, norm: RMSNorm, x: torch.Tensor, delta: torch.Tensor):
        """(x + delta, this MoE of norm(x + delta)) for one CUDA token with the norm, its residual add and
        its int8 rows inside the router's launch (`moe.softmax_topk_norm_linear`), or None where that can't run."""
        fast = softmax_topk_norm_linear(norm, x, delta, self.gate.weight, self.gate.top_k, self.gate.renorm)
        if fast is None:
            return None
        (w, idx), (y, h, yq) = fast
        return h, self.experts(y, w, idx, yq)


class Qwen3MoeDecoderLayer(LlamaDecoderLayer):  # same forward, its own attention and MoE
    def __init__(self, cfg: Config, layer: int, rope: Rope):
        nn.Module.__init__(self)
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(d, eps)
        self.self_attn = Attention(layer, d, cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim, rope,
                                   cfg.head_dim ** -0.5, qk_norm_eps=eps, bias=cfg.opt("attention_bias", False))
        self.post_attention_layernorm = RMSNorm(d, eps)
        if is_sparse_layer(cfg, layer):
            self.mlp = Qwen3SparseMoe(cfg)
        else:
            self.mlp = GatedMLP(d, cfg.intermediate_size, cfg.opt("hidden_act", "silu"))

    def mlp_block(self, x, h):
        """`LlamaDecoderLayer.mlp_block`; a decode step's MoE may take the norm into its router's launch."""
        if isinstance(self.mlp, Qwen3SparseMoe):
            fused = self.mlp.norm_route(self.post_attention_layernorm, x, h)
            if fused is not None:
                return fused
        return super().mlp_block(x, h)


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    """Same interface as Llama: forward(ids, positions, kv) -> hidden [T, D]; logits(h) -> [T, V]."""

    def __init__(self, cfg: Config):
        nn.Module.__init__(self)
        self.config = cfg
        self.model = LlamaModel(cfg, Qwen3MoeDecoderLayer)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)

    @property
    def graph_safe(self) -> bool:
        """Decode steps are capturable when every MoE layer runs the fused kernels (no host loop)."""
        return all(layer.mlp.experts.fusable() for layer in self.model.layers
                   if isinstance(layer.mlp, Qwen3SparseMoe))

    def weight_source(self, source):
        """Checkpoints store experts per expert (HF) or stacked per kind (GGUF); the model asks
        for transformers' fused [E, 2I, D] / [E, D, I] names, the adapter answers."""
        from ..formats.moe_weights import StackedExpertsSource
        return StackedExpertsSource(source)
