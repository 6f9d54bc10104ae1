"""The tiny random DeepSeek V4 of the oracle tests (tests/test_deepseek_v4*.py). Not a test file.

The config has all three attention types (sliding, CSA ratio 4 with an indexer picking 3 rows,
HCA ratio 16 so it compresses within short prompts), hash- and top-k-routed MoE layers, hc_mult
4 and a YaRN compress rope. The indexer has 16 heads: with few heads `relu(q.k)` is often 0 for
all of them, and tied scores make top-k's choice depend on tensor length (in transformers too).
"""
from __future__ import annotations

import torch

import ouzel
import tiny_models as tm

REL_TOL = 1e-5
PROMPT_LEN = 150  # not a multiple of 4 or 16
LAYERS = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
          "compressed_sparse_attention"]
TINY_V4 = dict(
    vocab_size=320, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, head_dim=32, q_lora_rank=32, partial_rotary_factor=0.5,
    num_experts_per_tok=2, n_routed_experts=6, layer_types=LAYERS,
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
    mlp_layer_types=["hash_moe", "moe", "moe", "moe"], sliding_window=8, o_groups=2, o_lora_rank=16,
    index_n_heads=16, index_head_dim=16, index_topk=3, hc_mult=4,
    rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                     "beta_fast": 32, "beta_slow": 1},
    max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=None,
)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def build_v4(seed: int = 1, **overrides):
    """A float32 DeepseekV4ForCausalLM with random weights big enough that every branch matters
    (hyper-connection, sink and pooling-bias parameters ~ N(0, 0.5), a random token -> experts
    table, random router biases)."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = DeepseekV4Config(**{**TINY_V4, **overrides})
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(0.5 + torch.rand(p.shape, generator=g))
        else:
            big = any(k in name for k in ("hc", "sinks", "position_bias"))
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if big else 0.05))
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    for layer in model.model.layers:
        gate = layer.mlp.gate
        if hasattr(gate, "tid2eid"):
            gate.tid2eid.copy_(torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(cfg.vocab_size)]))
        else:
            gate.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.1)
    return model



def ouzel_full(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        kv = model.new_kv(1024)
        return model.logits(model(ids, torch.arange(len(ids)), kv))



def tiny_fixture(tmp_path_factory):
    """The tiny model, its HF directory, a prompt, transformers' logits and ouzel's load of it;
    skips the test where the installed transformers has no DeepSeek V4."""
    try:
        model = build_v4()
    except ImportError as e:
        import pytest
        pytest.skip(f"transformers has no DeepSeek V4: {e}")
    path = tm.save_hf_dir(model, tmp_path_factory.mktemp("v4") / "hf")
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(2, model.config.vocab_size, (PROMPT_LEN,), generator=g)
    with torch.no_grad():
        ref = model(ids[None]).logits[0].float()
    loaded = ouzel.load(path, progress=False)
    return type("Tiny", (), dict(model=model, dir=path, ids=ids, ref=ref, loaded=loaded))
