"""DeepSeek V4 in llama.cpp's GGUF layout (`general.architecture` = "deepseek4").

Metadata `deepseek4.*` -> transformers' DeepseekV4Config fields, and module names -> GGUF tensor
names. Facts from llama.cpp's converter and loader: per-layer `attention.compress_ratios`
(0 = sliding only; the converter writes the MTP layers' ratios too, so the list may be longer
than block_count), routed experts stacked [E, out, in] as `ffn_{gate,up,down}_exps`, the hash
table `ffn_gate_tid2eid` as I32 [vocab, k], the router bias as `exp_probs_b.bias`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import OuzelError, UnsupportedError
from ..layers.moe import ExpertStack
from ..quant.blocks import block_type
from ..quant.tensor import QTensor

ARCH = "deepseek4"
# deepseek4.<key> -> config field; all required
REQUIRED_KEYS = {
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.q_lora_rank": "q_lora_rank",
    "attention.sliding_window": "sliding_window",
    "attention.output_group_count": "o_groups",
    "attention.output_lora_rank": "o_lora_rank",
    "attention.compress_rope_freq_base": "compress_rope_theta",
    "attention.indexer.head_count": "index_n_heads",
    "attention.indexer.key_length": "index_head_dim",
    "attention.indexer.top_k": "index_topk",
    "rope.freq_base": "rope_theta",
    "expert_count": "n_routed_experts",
    "expert_used_count": "num_experts_per_tok",
    "expert_shared_count": "n_shared_experts",
    "expert_feed_forward_length": "moe_intermediate_size",
    "expert_weights_scale": "routed_scaling_factor",
    "hash_layer_count": "num_hash_layers",
    "hyper_connection.count": "hc_mult",
    "hyper_connection.sinkhorn_iterations": "hc_sinkhorn_iters",
    "hyper_connection.epsilon": "hc_eps",
}
OPTIONAL_KEYS = {"context_length": "max_position_embeddings", "vocab_size": "vocab_size",
                 "expert_weights_norm": "norm_topk_prob"}
GATING = {1: "softmax", 2: "sigmoid", 4: "sqrtsoftplus"}  # llama.cpp's expert_gating_func ids

# module suffix (per layer) -> GGUF name suffix under blk.{i}.
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.sinks": "attn_sinks.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_norm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_proj.weight": "attn_kv.weight",
    "self_attn.kv_norm.weight": "attn_kv_a_norm.weight",
    "self_attn.o_a_proj.weight": "attn_output_a.weight",
    "self_attn.o_b_proj.weight": "attn_output_b.weight",
    "self_attn.compressor.kv_proj.weight": "attn_compressor_kv.weight",
    "self_attn.compressor.gate_proj.weight": "attn_compressor_gate.weight",
    "self_attn.compressor.position_bias": "attn_compressor_ape.weight",
    "self_attn.compressor.kv_norm.weight": "attn_compressor_norm.weight",
    "self_attn.compressor.indexer.kv_proj.weight": "indexer_compressor_kv.weight",
    "self_attn.compressor.indexer.gate_proj.weight": "indexer_compressor_gate.weight",
    "self_attn.compressor.indexer.position_bias": "indexer_compressor_ape.weight",
    "self_attn.compressor.indexer.kv_norm.weight": "indexer_compressor_norm.weight",
    "self_attn.compressor.indexer.q_b_proj.weight": "indexer.attn_q_b.weight",
    "self_attn.compressor.indexer.scorer.weights_proj.weight": "indexer.proj.weight",
    "attn_hc.fn": "hc_attn_fn.weight", "attn_hc.base": "hc_attn_base.weight", "attn_hc.scale": "hc_attn_scale.weight",
    "ffn_hc.fn": "hc_ffn_fn.weight", "ffn_hc.base": "hc_ffn_base.weight", "ffn_hc.scale": "hc_ffn_scale.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.gate.tid2eid": "ffn_gate_tid2eid.weight",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}
EXPERT_TENSORS = {"mlp.experts.gate_up_proj": ("ffn_gate_exps.weight", "ffn_up_exps.weight"),
                  "mlp.experts.down_proj": ("ffn_down_exps.weight",)}
GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.hc_head.hc_fn": "output_hc_fn.weight",
    "model.hc_head.hc_base": "output_hc_base.weight",
    "model.hc_head.hc_scale": "output_hc_scale.weight",
}


def _scalar(meta: dict, key: str, path: str):
    value = meta[key]
    if isinstance(value, list):  # llama.cpp writes some per-layer values as arrays
        if not value or len(set(value)) != 1:
            raise UnsupportedError(f"{path}: per-layer values in '{key}' differ ({sorted(set(value))}); "
                                   "only one value for all layers is supported")
        value = value[0]
    return value


def config_from_gguf(meta: dict[str, Any], path: str) -> dict[str, Any]:
    """A DeepseekV4Config-style dict from `deepseek4.*` metadata; a missing or inconsistent key
    is an OuzelError naming it."""
    cfg: dict[str, Any] = {"model_type": "deepseek_v4"}
    for key, field in {**REQUIRED_KEYS, **OPTIONAL_KEYS}.items():
        full = f"{ARCH}.{key}"
        if full not in meta:
            if key in REQUIRED_KEYS:
                raise OuzelError(f"{path}: missing metadata key '{full}'")
            continue
        cfg[field] = _scalar(meta, full, path)
    n = int(cfg["num_hidden_layers"])
    if cfg["num_key_value_heads"] != 1:
        raise OuzelError(f"{path}: '{ARCH}.attention.head_count_kv' is {cfg['num_key_value_heads']}; "
                         "DeepSeek V4 shares one K=V head")
    if "vocab_size" not in cfg:
        from .gguf_names import vocab_size_from_tokens
        cfg["vocab_size"] = vocab_size_from_tokens(meta, ARCH, path)
    gating = meta.get(f"{ARCH}.expert_gating_func")
    if gating is None:
        raise OuzelError(f"{path}: missing metadata key '{ARCH}.expert_gating_func'")
    if gating not in GATING:
        raise UnsupportedError(f"{path}: '{ARCH}.expert_gating_func' = {gating} is not supported "
                               f"({', '.join(f'{k} {v}' for k, v in GATING.items())})")
    cfg["scoring_func"] = GATING[gating]
    for key in ("swiglu_clamp_exp", "swiglu_clamp_shexp"):
        if f"{ARCH}.{key}" in meta:
            limit = float(_scalar(meta, f"{ARCH}.{key}", path))
            if cfg.setdefault("swiglu_limit", limit) != limit:
                raise UnsupportedError(f"{path}: '{ARCH}.{key}' ({limit}) differs from the routed experts' clamp")
    cfg["layer_types"], cfg["compress_rates"] = _layer_types(meta, n, path)
    n_hash = min(n, int(cfg.pop("num_hash_layers")))
    cfg["mlp_layer_types"] = ["hash_moe"] * n_hash + ["moe"] * (n - n_hash)
    rope_dim = meta.get(f"{ARCH}.rope.dimension_count", cfg["head_dim"])
    cfg["partial_rotary_factor"] = int(rope_dim) / int(cfg["head_dim"])
    cfg["rope_parameters"] = _rope(meta, cfg, path)
    return cfg


def _layer_types(meta: dict, n: int, path: str) -> tuple[list[str], dict[str, int]]:
    """Sliding where the ratio is 0. The indexed (CSA) layers take the smaller nonzero ratio and
    HCA the larger; with one nonzero ratio, 4 is CSA (as llama.cpp assumes) and others HCA."""
    key = f"{ARCH}.attention.compress_ratios"
    if key not in meta:
        raise OuzelError(f"{path}: missing metadata key '{key}'")
    ratios = [int(r) for r in meta[key]]
    if len(ratios) < n:
        raise OuzelError(f"{path}: '{key}' has {len(ratios)} entries for {n} layers ('{ARCH}.block_count')")
    ratios = ratios[:n]  # the rest belong to MTP layers
    if any(r < 0 for r in ratios):
        raise OuzelError(f"{path}: '{key}' has a negative ratio")
    kinds = sorted(set(r for r in ratios if r))
    if len(kinds) > 2:
        raise OuzelError(f"{path}: '{key}' has {len(kinds)} different nonzero ratios {kinds}; "
                         "DeepSeek V4 has two (CSA, HCA)")
    csa = kinds[0] if len(kinds) == 2 or kinds == [4] else None
    by_ratio = {0: "sliding_attention"}
    rates = {}
    for r in kinds:
        kind = "compressed_sparse_attention" if r == csa else "heavily_compressed_attention"
        by_ratio[r], rates[kind] = kind, r
    return [by_ratio[r] for r in ratios], rates


def _rope(meta: dict, cfg: dict, path: str) -> dict:
    main = {"rope_type": "default", "rope_theta": float(cfg["rope_theta"]),
            "partial_rotary_factor": cfg["partial_rotary_factor"]}
    compress = {"rope_type": "default", "rope_theta": float(cfg["compress_rope_theta"]),
                "partial_rotary_factor": cfg["partial_rotary_factor"]}
    scaling = meta.get(f"{ARCH}.rope.scaling.type")
    if scaling == "yarn":  # YaRN applies to the compressed layers only; V4 never rescales cos/sin
        for k, f in (("factor", "factor"), ("original_context_length", "original_max_position_embeddings")):
            if f"{ARCH}.rope.scaling.{k}" not in meta:
                raise OuzelError(f"{path}: missing metadata key '{ARCH}.rope.scaling.{k}' (rope scaling is yarn)")
            compress[f] = meta[f"{ARCH}.rope.scaling.{k}"]
        compress.update(rope_type="yarn", attention_factor=1.0,
                        beta_fast=float(meta.get(f"{ARCH}.rope.scaling.yarn_beta_fast", 32.0)),
                        beta_slow=float(meta.get(f"{ARCH}.rope.scaling.yarn_beta_slow", 1.0)))
    elif scaling not in (None, "none"):
        raise UnsupportedError(f"{path}: '{ARCH}.rope.scaling.type' = {scaling!r} is not supported (yarn)")
    return {"main": main, "compress": compress}


class GGUFNames:
    """Answers the model's weight requests from a deepseek4 GGUF file."""

    def __init__(self, source, cfg):
        self.source, self.file, self.cfg = source, source.file, cfg

    def _name(self, name: str) -> str | tuple[str, ...] | None:
        if name in GLOBAL_TENSORS:
            return GLOBAL_TENSORS[name]
        parts = name.split(".", 3)
        if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
            i, rest = parts[2], parts[3]
            if rest in LAYER_TENSORS:
                return f"blk.{i}.{LAYER_TENSORS[rest]}"
            if rest in EXPERT_TENSORS:
                return tuple(f"blk.{i}.{s}" for s in EXPERT_TENSORS[rest])
        return None

    def has(self, name: str) -> bool:
        g = self._name(name)
        return g is not None and all(x in self.file.tensors for x in ((g,) if isinstance(g, str) else g))

    def get(self, name: str, shape: tuple[int, ...]):
        g = self._name(name)
        if g is None:
            raise OuzelError(f"{self.file.path}: no deepseek4 tensor for {name!r}")
        if isinstance(g, tuple):
            return self._experts(g, shape)
        if name.endswith("tid2eid"):
            return self._table(g, shape)
        info = self._info(g)
        if tuple(info.shape) != tuple(shape):
            raise OuzelError(f"{self.file.path}: tensor {g!r} has shape {list(info.shape)}, "
                             f"the metadata implies {list(shape)}")
        bt = block_type(info.ggml_type)
        raw = self.file.raw(g)
        if bt.name == "F32":
            return raw.view(torch.float32).reshape(shape)
        if len(shape) == 1:
            return QTensor(raw.reshape(1, -1), bt, (1, shape[0])).dequantize().reshape(shape)
        return QTensor(raw, bt, tuple(shape))

    def _info(self, g: str):
        if g not in self.file.tensors:
            raise OuzelError(f"{self.file.path}: missing tensor {g!r}")
        return self.file.tensors[g]

    def _table(self, g: str, shape) -> torch.Tensor:
        info = self._info(g)
        if tuple(info.shape) != tuple(shape) or info.ggml_type not in (24, 25, 26, 27):  # I8, I16, I32, I64
            raise OuzelError(f"{self.file.path}: tensor {g!r} must be an integer table of shape {list(shape)}; "
                             f"it is {list(info.shape)} (ggml type {info.ggml_type})")
        dt = {24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64}[info.ggml_type]
        arr = np.fromfile(self.file.path, dtype=dt, count=int(np.prod(shape)), offset=info.offset)
        return torch.from_numpy(arr.astype(np.int64)).reshape(shape)

    def _experts(self, names: tuple[str, ...], shape) -> ExpertStack:
        from .moe_weights import gguf_expert_stack
        return gguf_expert_stack(self.file, names, tuple(shape))
