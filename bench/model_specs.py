"""The benchmark models of make_models.py: GGUF metadata at real dimensions, and which block type
each tensor gets (llama.cpp's Q4_K_M recipe; ds4's q2 expert layout). Not a test file.

Dimensions: Llama 3.1 8B; Qwen3-30B-A3B; DeepSeek-V4-Flash per layer (transformers'
DeepseekV4Config defaults) cut to 8 layers. The vocabulary is SmolLM2's 49152 in all three (the
borrowed tokenizer), so embedding and output are smaller than the real models'.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from gguf import GGUFValueType as VT

from ouzel.formats import gguf_deepseek4 as ds4
from ouzel.formats import gguf_names
from ouzel.formats.moe_weights import GGUF_EXPERTS, split_expert_name

VOCAB = 49152
U32, F32, STR, BOOL, ARR = VT.UINT32, VT.FLOAT32, VT.STRING, VT.BOOL, VT.ARRAY


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp (llama-quant.cpp): the layers Q4_K_M gives Q6_K attn_v / ffn_down."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def q4_k_m(name: str, shape: tuple[int, ...], layer: int | None, n_layers: int) -> str:
    if len(shape) == 1 or name.endswith("ffn_gate_inp.weight"):  # norms; routers stay F32
        return "F32"
    if name == "output.weight":
        return "Q6_K"
    if ("attn_v." in name or "ffn_down" in name) and use_more_bits(layer, n_layers):
        return "Q6_K"
    return "Q4_K"


DS4_F16 = ("attn_compressor_kv.", "attn_compressor_gate.", "indexer_compressor_kv.", "indexer_compressor_gate.",
           "indexer.attn_q_b.", "indexer.proj.")
DS4_F32 = ("ffn_gate_inp.", "hc_", "attn_sinks.", "exp_probs_b.", "_ape.", "norm.")


def ds4_q2(name: str, shape: tuple[int, ...], layer: int | None, n_layers: int) -> str:
    if "tid2eid" in name:
        return "I32"
    if "ffn_gate_exps" in name or "ffn_up_exps" in name:
        return "IQ2_XXS"
    if "ffn_down_exps" in name:
        return "Q2_K"
    if len(shape) == 1 or any(k in name for k in DS4_F32):
        return "F32"
    if any(k in name for k in DS4_F16):
        return "F16"
    return "Q8_0"  # attention projections, shared expert, embedding, output


@lru_cache(maxsize=None)
def _hf_to_gguf(arch: str):
    return gguf_names.hf_to_gguf_names(arch)


def generic_names(arch: str, hf_name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """ouzel's module weight name -> GGUF tensor(s) and numpy shapes (stacked experts split by kind)."""
    where = split_expert_name(hf_name)
    if where is not None:
        layer, kind = where
        E, out, cols = shape
        parts = GGUF_EXPERTS[kind]
        return [(f"blk.{layer}.{s}", (E, out // len(parts), cols)) for s in parts]
    g = _hf_to_gguf(arch)(hf_name)
    if g is None:
        raise KeyError(f"{arch}: no GGUF name for {hf_name}")
    return [(g, shape)]


def ds4_names(arch: str, hf_name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    if hf_name in ds4.GLOBAL_TENSORS:
        return [(ds4.GLOBAL_TENSORS[hf_name], shape)]
    _, _, i, rest = hf_name.split(".", 3)
    if rest in ds4.LAYER_TENSORS:
        return [(f"blk.{i}.{ds4.LAYER_TENSORS[rest]}", shape)]
    E, out, cols = shape
    parts = ds4.EXPERT_TENSORS[rest]
    return [(f"blk.{i}.{s}", (E, out // len(parts), cols)) for s in parts]


@dataclass
class Spec:
    name: str
    arch: str  # GGUF general.architecture
    n_layers: int
    file_type: int  # llama.cpp LLAMA_FTYPE_*
    metadata: Callable[[int, int], dict]
    qtype: Callable
    gguf_names: Callable = generic_names

    @property
    def gguf_arch(self) -> str:
        return self.arch


def llama8b_meta(n: int, vocab: int) -> dict:
    a = "llama"
    return {f"{a}.block_count": (n, U32), f"{a}.context_length": (131072, U32),
            f"{a}.embedding_length": (4096, U32), f"{a}.feed_forward_length": (14336, U32),
            f"{a}.attention.head_count": (32, U32), f"{a}.attention.head_count_kv": (8, U32),
            f"{a}.attention.layer_norm_rms_epsilon": (1e-5, F32), f"{a}.rope.freq_base": (500000.0, F32),
            f"{a}.rope.dimension_count": (128, U32), f"{a}.vocab_size": (vocab, U32)}


def qwen3moe_meta(n: int, vocab: int) -> dict:
    a = "qwen3moe"
    return {f"{a}.block_count": (n, U32), f"{a}.context_length": (40960, U32),
            f"{a}.embedding_length": (2048, U32), f"{a}.feed_forward_length": (6144, U32),
            f"{a}.attention.head_count": (32, U32), f"{a}.attention.head_count_kv": (4, U32),
            f"{a}.attention.key_length": (128, U32), f"{a}.attention.value_length": (128, U32),
            f"{a}.attention.layer_norm_rms_epsilon": (1e-6, F32), f"{a}.rope.freq_base": (1000000.0, F32),
            f"{a}.expert_count": (128, U32), f"{a}.expert_used_count": (8, U32),
            f"{a}.expert_feed_forward_length": (768, U32), f"{a}.vocab_size": (vocab, U32)}


DS4_RATIOS = [128, 128, 128, 4, 128, 4, 128, 4]  # V4-Flash's first 8 layers: HCA x3, then CSA/HCA


def ds4flash_meta(n: int, vocab: int) -> dict:
    a = "deepseek4"
    ratios = [DS4_RATIOS[i] if i < len(DS4_RATIOS) else (4 if i % 2 else 128) for i in range(n)]
    return {
        f"{a}.block_count": (n, U32), f"{a}.context_length": (1048576, U32), f"{a}.embedding_length": (4096, U32),
        f"{a}.vocab_size": (vocab, U32),
        f"{a}.attention.head_count": (64, U32), f"{a}.attention.head_count_kv": (1, U32),
        f"{a}.attention.key_length": (512, U32), f"{a}.attention.value_length": (512, U32),
        f"{a}.attention.layer_norm_rms_epsilon": (1e-6, F32), f"{a}.attention.q_lora_rank": (1024, U32),
        f"{a}.attention.sliding_window": (128, U32), f"{a}.attention.output_group_count": (8, U32),
        f"{a}.attention.output_lora_rank": (1024, U32), f"{a}.attention.compress_ratios": (ratios, ARR, VT.INT32),
        f"{a}.attention.compress_rope_freq_base": (160000.0, F32),
        f"{a}.attention.indexer.head_count": (64, U32), f"{a}.attention.indexer.key_length": (128, U32),
        f"{a}.attention.indexer.top_k": (512, U32),
        f"{a}.rope.freq_base": (10000.0, F32), f"{a}.rope.dimension_count": (64, U32),
        f"{a}.expert_count": (256, U32), f"{a}.expert_used_count": (6, U32), f"{a}.expert_shared_count": (1, U32),
        f"{a}.expert_feed_forward_length": (2048, U32), f"{a}.expert_weights_scale": (1.5, F32),
        f"{a}.expert_weights_norm": (True, BOOL), f"{a}.expert_gating_func": (4, U32),  # sqrtsoftplus
        f"{a}.swiglu_clamp_exp": ([10.0] * n, ARR, VT.FLOAT32), f"{a}.swiglu_clamp_shexp": ([10.0] * n, ARR, VT.FLOAT32),
        f"{a}.hash_layer_count": (min(3, n), U32),
        f"{a}.hyper_connection.count": (4, U32), f"{a}.hyper_connection.sinkhorn_iterations": (20, U32),
        f"{a}.hyper_connection.epsilon": (1e-6, F32),
    }


SPECS = {
    "llama8b-q4km": Spec("llama8b-q4km", "llama", 32, 15, llama8b_meta, q4_k_m),
    "qwen3moe-30b-a3b-q4km": Spec("qwen3moe-30b-a3b-q4km", "qwen3moe", 48, 15, qwen3moe_meta, q4_k_m),
    "ds4flash-l8-q2": Spec("ds4flash-l8-q2", "deepseek4", 8, 10, ds4flash_meta, ds4_q2, ds4_names),
}
