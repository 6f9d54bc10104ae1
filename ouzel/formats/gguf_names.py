"""How a GGUF file names what a Hugging Face checkpoint names: config keys, tensors, layouts.

The models use HF names and HF semantics; this table and its transforms are the only place
that knows the GGUF spelling.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import torch

from ..errors import OuzelError, UnsupportedError

# "{arch}.<key>" -> HF config.json field
CONFIG_KEYS = {
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "context_length": "max_position_embeddings",
    "attention.sliding_window": "sliding_window",
    "vocab_size": "vocab_size",
    "final_logit_softcapping": "final_logit_softcapping",
    "expert_count": "num_experts",
    "expert_used_count": "num_experts_per_tok",
    "expert_feed_forward_length": "moe_intermediate_size",
}
# our architecture name -> the GGUF `general.architecture` (and metadata prefix), where they differ
GGUF_ARCH = {"qwen3_moe": "qwen3moe"}
REQUIRED = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")

TENSOR_NAMES = {  # GGUF name -> HF name, "{i}" is the layer
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
ARCH_TENSOR_NAMES = {
    "gemma3": {
        "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
        "blk.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
        "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
    },
    "qwen3_moe": {  # routed experts (ffn_*_exps) go through formats/moe_weights.py
        "blk.{i}.ffn_gate_inp.weight": "model.layers.{i}.mlp.gate.weight",
    },
}


def hf_to_gguf_names(arch: str) -> Callable[[str], str | None]:
    """A function HF name -> GGUF name for this architecture."""
    table = {**TENSOR_NAMES, **ARCH_TENSOR_NAMES.get(arch, {})}
    patterns = []
    for g, h in table.items():
        rx = re.compile("^" + re.escape(h).replace(r"\{i\}", r"(\d+)") + "$")
        patterns.append((rx, g))

    def lookup(hf: str) -> str | None:
        for rx, g in patterns:
            m = rx.match(hf)
            if m:
                return g.replace("{i}", m.group(1)) if m.groups() else g
        return None
    return lookup


def vocab_size_from_tokens(meta: dict[str, Any], arch: str, path: str) -> int:
    """Files without '{arch}.vocab_size' have one row per tokenizer token."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise OuzelError(f"{path}: missing metadata key '{arch}.vocab_size' (and no tokenizer.ggml.tokens)")
    return len(tokens)


def config_from_gguf(arch: str, meta: dict[str, Any], path: str) -> dict[str, Any]:
    if arch == "deepseek_v4":  # its own key set (compress ratios, hyper-connections, indexer)
        from .gguf_deepseek4 import config_from_gguf as deepseek4_config
        return deepseek4_config(meta, path)
    if arch in GGUF_ARCH:  # keys under the GGUF spelling, config under ours
        cfg = config_from_gguf(GGUF_ARCH[arch], meta, path)
        cfg["model_type"] = arch
        if arch == "qwen3_moe":  # llama.cpp's qwen3moe always renormalises the top-k weights
            cfg["norm_topk_prob"] = bool(meta.get("qwen3moe.expert_weights_norm", True))
        return cfg
    cfg: dict[str, Any] = {"model_type": arch}
    for key in REQUIRED:
        if f"{arch}.{key}" not in meta:
            raise OuzelError(f"{path}: missing metadata key '{arch}.{key}'")
    for key, field in CONFIG_KEYS.items():
        value = meta.get(f"{arch}.{key}")
        if value is None:
            continue
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise UnsupportedError(f"{path}: per-layer '{arch}.{key}' values are not supported")
            value = value[0]
        cfg[field] = value
    if "vocab_size" not in cfg:
        cfg["vocab_size"] = vocab_size_from_tokens(meta, arch, path)
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise UnsupportedError(f"{path}: rope scaling {scaling!r} is not supported")
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    if arch == "gemma3":
        cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
        cfg["query_pre_attn_scalar"] = cfg["head_dim"]  # what llama.cpp uses for Gemma 3 below 27B
        cfg["rope_local_base_freq"] = 10000.0
    return cfg


def unpermute_rows(n_heads: int) -> Callable[[int], torch.Tensor]:
    """llama.cpp's converter interleaves each head's two rope halves in q/k rows; undo it."""
    def index(rows: int) -> torch.Tensor:
        hd = rows // n_heads
        # GGUF row h*hd + 2*i + half holds HF row h*hd + half*hd/2 + i
        return torch.arange(rows).view(n_heads, hd // 2, 2).transpose(1, 2).reshape(-1)
    return index


def row_permutation(arch: str, hf_name: str, cfg: dict[str, Any]) -> torch.Tensor | None:
    """Rows to gather from the GGUF tensor to get the HF layout (None: same layout)."""
    if arch != "llama":
        return None
    if hf_name.endswith("q_proj.weight") or hf_name.endswith("q_proj.bias"):
        heads = cfg["num_attention_heads"]
    elif hf_name.endswith("k_proj.weight") or hf_name.endswith("k_proj.bias"):
        heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    else:
        return None
    rows = cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"]) * heads
    return unpermute_rows(heads)(rows)


def value_transform(arch: str, hf_name: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Gemma's converter stores norm weights as 1 + w; HF (and our model) keep w."""
    if arch == "gemma3" and hf_name.endswith("norm.weight"):
        return lambda w: w - 1.0
    return None
