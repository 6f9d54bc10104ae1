"""DeepSeek V4 (Flash, Pro): mHC residual streams around compressed attention and a MoE.

    ids -> embed -> N copies (hc_mult streams)
    per layer:  streams --attn_hc--> input_layernorm -> V4Attention  --merge--> streams
                streams --ffn_hc---> post_attention_layernorm -> SparseMoE(ids) --merge--> streams
    hc_head (collapse) -> norm -> lm_head

Attention per `layer_types[i]`: sliding only, CSA (ratio-4 rows picked by an indexer) or HCA
(ratio-128 rows, dense); MoE per `mlp_layer_types[i]`: hash-routed or top-k routed.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import OuzelError
from ..kv.compressed import CompressedKV, MultiState
from ..layers.compressed_attention import V4Attention
from ..layers.hyper_connections import HyperConnection, HyperHead
from ..layers.interleaved_rope import InterleavedRope
from ..layers.linear import Embedding, Linear
from ..layers.moe import SparseMoE
from ..layers.norm import RMSNorm
from .config import Config

LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
MLP_LAYER_TYPES = ("hash_moe", "moe")


def normalize_config(cfg: Config) -> Config:
    """Fill the derived fields the way transformers' DeepseekV4Config does, from either its own
    config.json or an upstream one (compress_ratios, num_hash_layers, qk_rope_head_dim,
    rope_scaling), and check the per-layer schedules."""
    n = cfg.num_hidden_layers
    rates = dict(cfg.opt("compress_rates") or {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128})
    for legacy, kind in (("compress_rate_csa", "compressed_sparse_attention"),
                         ("compress_rate_hca", "heavily_compressed_attention")):
        if cfg.opt(legacy) is not None:
            rates[kind] = int(cfg[legacy])
    cfg["compress_rates"] = rates
    if cfg.opt("layer_types") is None and cfg.opt("compress_ratios") is not None:
        ratios = list(cfg["compress_ratios"])
        mtp = int(cfg.opt("num_nextn_predict_layers", 0))
        if len(ratios) not in (n, n + mtp):  # upstream configs also list the MTP layers
            raise OuzelError(f"DeepSeek V4: compress_ratios has {len(ratios)} entries for {n} layers")
        ratios = ratios[:n]
        by_ratio = {0: "sliding_attention", rates["compressed_sparse_attention"]: "compressed_sparse_attention",
                    rates["heavily_compressed_attention"]: "heavily_compressed_attention"}
        bad = [r for r in ratios if r not in by_ratio]
        if bad:
            raise OuzelError(f"DeepSeek V4: compress ratio {bad[0]} matches no layer type (ratios {sorted(by_ratio)})")
        cfg["layer_types"] = [by_ratio[r] for r in ratios]
    if cfg.opt("layer_types") is None:  # transformers' default: 2 HCA, then HCA/CSA alternating
        cfg["layer_types"] = (["heavily_compressed_attention"] * min(n, 2)
                              + ["compressed_sparse_attention" if i % 2 else "heavily_compressed_attention"
                                 for i in range(max(n - 2, 0))])
    if cfg.opt("mlp_layer_types") is None:
        n_hash = int(cfg.opt("num_hash_layers", 3))
        cfg["mlp_layer_types"] = ["hash_moe"] * min(n, n_hash) + ["moe"] * max(0, n - n_hash)
    for name, allowed in (("layer_types", LAYER_TYPES), ("mlp_layer_types", MLP_LAYER_TYPES)):
        types = cfg[name]
        if len(types) != n:
            raise OuzelError(f"DeepSeek V4: {name} has {len(types)} entries for {n} layers")
        bad = [t for t in types if t not in allowed]
        if bad:
            raise OuzelError(f"DeepSeek V4: unknown {name} entry {bad[0]!r}; allowed: {', '.join(allowed)}")
    if cfg.opt("partial_rotary_factor") is None:  # transformers' default is 64 / 512 of any head_dim
        rope_dim = cfg.opt("qk_rope_head_dim")
        cfg["partial_rotary_factor"] = rope_dim / cfg.head_dim if rope_dim else 64 / 512
    rp = cfg.opt("rope_parameters") or cfg.opt("rope_scaling") or {}
    if not (isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict)):
        yarn = {k: v for k, v in rp.items() if k not in ("main", "compress")}
        main = {"rope_type": "default", "rope_theta": cfg.opt("rope_theta", 10000.0),
                "partial_rotary_factor": cfg.partial_rotary_factor}
        compress = {**yarn, "rope_theta": cfg.opt("compress_rope_theta", 160000.0),
                    "partial_rotary_factor": cfg.partial_rotary_factor}
        compress["rope_type"] = compress.get("rope_type", compress.pop("type", "default"))
        if compress["rope_type"] == "yarn":
            compress.setdefault("attention_factor", 1.0)  # V4 does not rescale cos/sin
        cfg["rope_parameters"] = {"main": main, "compress": compress}
    return cfg


class DeepseekV4DecoderLayer(nn.Module):
    def __init__(self, cfg: Config, layer: int, ropes: dict[str, InterleavedRope]):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        kind = cfg.layer_types[layer]
        rope = ropes["main" if kind == "sliding_attention" else "compress"]
        ratio = cfg.compress_rates.get(kind)
        self.self_attn = V4Attention(cfg, layer, kind, rope, ratio)
        is_hash = cfg.mlp_layer_types[layer] == "hash_moe"
        self.mlp = SparseMoE(d, cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.num_experts_per_tok,
                             cfg.opt("scoring_func", "sqrtsoftplus"), float(cfg.opt("routed_scaling_factor", 1.0)),
                             cfg.opt("swiglu_limit"), cfg.vocab_size if is_hash else None)
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(d, eps), RMSNorm(d, eps)
        hc = (cfg.hc_mult, d, cfg.opt("hc_sinkhorn_iters", 20), cfg.opt("hc_eps", 1e-6), eps)
        self.attn_hc, self.ffn_hc = HyperConnection(*hc), HyperConnection(*hc)

    def forward(self, streams, ids, positions, kv):
        # streams [T, N, D]
        post, comb, x = self.attn_hc.pre(streams, self.input_layernorm)
        streams = HyperConnection.merge(streams, self.self_attn(x, positions, kv), post, comb)
        post, comb, x = self.ffn_hc.pre(streams, self.post_attention_layernorm)
        return HyperConnection.merge(streams, self.mlp(x, ids), post, comb)


class DeepseekV4Model(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        ropes = {k: InterleavedRope(v, cfg.head_dim) for k, v in cfg.rope_parameters.items()}
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DeepseekV4DecoderLayer(cfg, i, ropes) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hc_head = HyperHead(cfg.hc_mult, cfg.hidden_size, cfg.opt("hc_eps", 1e-6), cfg.rms_norm_eps)


class DeepseekV4ForCausalLM(nn.Module):
    """forward(ids [T], positions [T], kv) -> hidden [T, D]; logits(hidden) -> [T, V];
    kv comes from new_kv() (compressed per-layer state, not a dense K/V cache), or batch_kv() joins
    several sequences' states for one forward (their rows in order; only attention is per sequence)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.config = normalize_config(cfg)
        self.model = DeepseekV4Model(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)

    @property
    def graph_safe(self) -> bool:
        """Decode steps are capturable when every MoE layer runs the fused kernels (the attention
        state's one-token step already reads the position on the device only)."""
        return all(layer.mlp.experts.fusable() for layer in self.model.layers)

    def new_kv(self, max_tokens: int, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> CompressedKV:
        return CompressedKV(len(self.model.layers), max_tokens, device, dtype)

    def batch_kv(self, segments: list[tuple[CompressedKV, int]]) -> MultiState:
        """One forward's view of several sequences' states, each with its number of new rows."""
        return MultiState(segments)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, kv) -> torch.Tensor:
        x = self.embed(ids)
        streams = x.unsqueeze(1).expand(-1, self.config.hc_mult, -1).contiguous()
        for layer in self.model.layers:
            streams = layer(streams, ids, positions, kv)
        return self.model.norm(self.model.hc_head(streams))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def weight_source(self, source):
        """Checkpoint names and storage (upstream names, per-expert or FP8/FP4 weights) differ
        from the module names; the adapter answers by module name."""
        from ..formats.deepseek_v4_weights import DeepseekV4Source
        return DeepseekV4Source(source, self.config)

    tied_weights = {"lm_head.weight": "model.embed_tokens.weight"}
