"""Tiny models at kernel-sized dimensions (hidden 256) in Q8_0 GGUFs, loaded on CUDA, for the GPU
tests (not a test file): the Triton GEMVs, the fused MoE kernels and the device-side attention
then run on them."""
from __future__ import annotations

import tiny_models as tm

from ouzel.loader import load

SIZES = dict(hidden_size=256, intermediate_size=512)
V4_RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}


def tiny(arch: str, tmp_path, max_positions: int):
    """(its HF model, its Q8_0 GGUF, the model loaded on CUDA) for a tiny model of arch."""
    extra = dict(moe_intermediate_size=256) if arch == "qwen3_moe" else {}
    hf = tm.build_hf_model(arch, max_position_embeddings=max_positions, **SIZES, **extra)
    path = tm.write_gguf(hf, arch, tmp_path / f"{arch}.gguf", "Q8_0")
    return hf, path, load(path, device="cuda", progress=False).model


def tiny_v4(tmp_path, seed: int = 3, **overrides):
    """(the HF DeepSeek V4, the model loaded on CUDA from its Q8_0 GGUF); CSA ratio 4 and HCA 128
    unless overrides say otherwise."""
    import deepseek4_gguf as d4
    from tiny_deepseek_v4 import build_v4
    hf = build_v4(seed=seed, hidden_size=256, moe_intermediate_size=256, **{"compress_rates": V4_RATES, **overrides})
    return hf, load(d4.write(hf, tmp_path / "v4-q8.gguf", "Q8_0"), device="cuda", progress=False).model
