"""DeepSeek V4 against transformers' DeepseekV4ForCausalLM on a tiny random config.

The config has all three attention types (sliding, CSA ratio 4 with an indexer picking 3 rows,
HCA ratio 16 so it compresses within short prompts), hash- and top-k-routed MoE layers, hc_mult
4 and a YaRN compress rope. The indexer has 16 heads: with few heads `relu(q.k)` is often 0 for
all of them, and tied scores make top-k's choice depend on tensor length (in transformers too).

Tolerance as tests/test_hf_oracle.py: relative L2 < 1e-5 over the [T, V] float32 logits.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402

import ouzel  # noqa: E402
from ouzel.engine.generate import Sequence  # noqa: E402

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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = build_v4()
    path = tm.save_hf_dir(model, tmp_path_factory.mktemp("v4") / "hf")
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(2, model.config.vocab_size, (PROMPT_LEN,), generator=g)
    with torch.no_grad():
        ref = model(ids[None]).logits[0].float()
    loaded = ouzel.load(path, progress=False)
    return type("Tiny", (), dict(model=model, dir=path, ids=ids, ref=ref, loaded=loaded))


def ouzel_full(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        kv = model.new_kv(1024)
        return model.logits(model(ids, torch.arange(len(ids)), kv))


def test_full_forward_matches_transformers(tiny):
    out = ouzel_full(tiny.loaded.model, tiny.ids)
    assert rel_l2(out, tiny.ref) < REL_TOL


def test_decode_token_by_token_matches_transformers(tiny):
    """Prefill 37 tokens, then one token at a time to 150: crosses 28 CSA and 7 HCA boundaries."""
    seq = Sequence(tiny.loaded.model, 1024, torch.device("cpu"))
    ids = tiny.ids.tolist()
    outs = []
    with torch.inference_mode():
        h = tiny.loaded.model(torch.tensor(ids[:37]), torch.arange(37), seq.kv)
        seq.kv.commit(37)
        seq.tokens = ids[:37]
        outs.append(tiny.loaded.model.logits(h))
        for t in ids[37:]:
            outs.append(seq.step(t)[None])
    assert rel_l2(torch.cat(outs), tiny.ref) < REL_TOL


def test_chunked_prefill_matches_transformers(tiny):
    """Uneven chunks (5, 23, 1, 61, ...) leave partial windows and overlap state across calls."""
    model = tiny.loaded.model
    kv, outs, start = model.new_kv(1024), [], 0
    with torch.inference_mode():
        for n in (5, 23, 1, 61, 3, 57):
            ids = tiny.ids[start:start + n]
            outs.append(model.logits(model(ids, torch.arange(start, start + len(ids)), kv)))
            kv.commit(len(ids))
            start += n
    assert start == PROMPT_LEN
    assert rel_l2(torch.cat(outs), tiny.ref) < REL_TOL


def test_transformers_decode_agrees(tiny):
    """The oracle's own cached decode gives its full-forward logits on this config (so the
    comparisons above test ouzel, not a tie-break)."""
    from transformers import DynamicCache

    m, ids = tiny.model, tiny.ids[None]
    with torch.no_grad():
        cache = DynamicCache(config=m.config)
        outs = [m(ids[:, :100], past_key_values=cache, use_cache=True).logits[0]]
        for i in range(100, PROMPT_LEN):
            outs.append(m(ids[:, i:i + 1], past_key_values=cache, use_cache=True).logits[0])
    assert rel_l2(torch.cat(outs), tiny.ref) < REL_TOL


def test_greedy_generation_through_api(tiny):
    """ouzel.load + generate on the HF directory: the greedy continuation of the oracle."""
    from ouzel.engine.generate import generate_ids
    from ouzel.engine.sampler import SamplingParams

    prompt = tiny.ids[:20].tolist()
    seq = Sequence(tiny.loaded.model, 256, torch.device("cpu"))
    got = list(generate_ids(seq, prompt, SamplingParams(temperature=0.0, max_tokens=12), eog=set()))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(tiny.model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert got == ids[20:]


# ------------------------------------------------------------------------------------ decode state

def _state_bytes(cfg, n: int, elem: int = 4) -> int:
    from ouzel.kv.compressed import state_bytes
    return state_bytes(n, cfg.layer_types, cfg.compress_rates, cfg.head_dim, cfg.index_head_dim,
                       cfg.sliding_window, elem)


def test_decode_state_holds_only_what_the_architecture_needs(tiny):
    """After n tokens the state is the window's raw rows, n/ratio compressed rows per series and
    the open windows: far below a dense K/V cache, and exactly the sizing formula."""
    model, cfg = tiny.loaded.model, tiny.loaded.model.config
    kv = model.new_kv(1024)
    with torch.inference_mode():
        for start, n in ((0, 61), (61, 1), (62, 88)):
            model(tiny.ids[start:start + n], torch.arange(start, start + n), kv)
            kv.commit(n)
            assert kv.nbytes() == _state_bytes(cfg, start + n)
    dense = PROMPT_LEN * cfg.num_hidden_layers * cfg.head_dim * 4
    assert kv.nbytes() < dense


def test_kv_bytes_per_token_at_flash_dims():
    """transformers' default DeepseekV4Config (V4 Flash dims, 43 layers: 23 HCA, 20 CSA):
    float32 state grows 13168 bytes per token (CSA: 512/4 + 128/4 floats, HCA: 512/128), i.e.
    ~13.2 GB at 1M tokens (6.6 GB in 16-bit), plus a constant sliding window."""
    from transformers import DeepseekV4Config

    from ouzel.models.config import Config
    from ouzel.models.deepseek_v4 import normalize_config

    cfg = normalize_config(Config(DeepseekV4Config().to_dict()))
    assert cfg.layer_types.count("compressed_sparse_attention") == 20
    per_token = (_state_bytes(cfg, 1 << 20) - _state_bytes(cfg, 1 << 19)) / (1 << 19)
    assert per_token == 13168
    assert 13.0e9 < _state_bytes(cfg, 1 << 20) < 13.9e9


def test_reprompt_with_shared_prefix_recomputes(tiny):
    """trim() can't cut inside compressed state: Sequence re-prefills from what the state kept
    and still gives the oracle's logits for a prompt that diverges after a shared prefix."""
    model = tiny.loaded.model
    seq = Sequence(model, 1024, torch.device("cpu"))
    ids = tiny.ids.tolist()
    seq.prefill(ids[:90])
    other = ids[:60] + [5, 6, 7]
    got = seq.prefill(other)
    assert seq.tokens == other and seq.kv.length == len(other)
    with torch.no_grad():
        ref = tiny.model(torch.tensor([other])).logits[0, -1]
    assert rel_l2(got, ref) < REL_TOL


# ------------------------------------------------------------------------------------ GGUF deepseek4

import deepseek4_gguf as d4  # noqa: E402

# experts need rows of whole 256-element blocks for the K-quants: hidden and expert width 256
QUANT_OVERRIDES = dict(hidden_size=256, moe_intermediate_size=256)
QUANT_LEN = 45


def test_gguf_f32_gives_the_safetensors_logits(tiny, tmp_path):
    path = d4.write(tiny.model, tmp_path / "tiny-f32.gguf")
    loaded = ouzel.load(path, progress=False)
    assert loaded.loaded.architecture == "deepseek_v4"
    assert loaded.config.layer_types == LAYERS
    out = ouzel_full(loaded.model, tiny.ids)
    assert rel_l2(out, ouzel_full(tiny.loaded.model, tiny.ids)) < 1e-6
    assert rel_l2(out, tiny.ref) < REL_TOL


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    model = build_v4(seed=3, **QUANT_OVERRIDES)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(2, model.config.vocab_size, (QUANT_LEN,), generator=g)
    return type("Wide", (), dict(model=model, ids=ids, dir=tmp_path_factory.mktemp("v4q")))


@pytest.mark.parametrize("qtype", ["Q2_K", "IQ2_XXS", "Q4_K", "MXFP4"])
def test_gguf_quantized_experts_give_the_dequantized_logits(wide, qtype):
    """Routed experts stay in their blocks (one QTensor per expert, a view of the file); the
    logits are transformers' on the dequantized experts."""
    from ouzel.layers.moe import ExpertStack
    from ouzel.quant.tensor import QTensor

    path = d4.write(wide.model, wide.dir / f"tiny-{qtype}.gguf", qtype)
    loaded = ouzel.load(path, progress=False)
    experts = loaded.model.model.layers[1].mlp.experts.gate_up_proj
    assert isinstance(experts, ExpertStack) and isinstance(experts.parts[0][0], QTensor)
    assert experts.parts[0][0].bt.name == qtype
    ref_model = d4.reference_model(wide.model, qtype)
    with torch.no_grad():
        ref = ref_model(wide.ids[None]).logits[0]
    assert rel_l2(ouzel_full(loaded.model, wide.ids), ref) < REL_TOL


def test_gguf_runs_through_the_api(tiny, tmp_path):
    """ouzel.load on a deepseek4 GGUF (GGUF tokenizer) and greedy generation, as `ouzel run` does."""
    llm = ouzel.load(d4.write(tiny.model, tmp_path / "api.gguf"), progress=False)
    prompt = llm.tokenize("The quick brown fox")
    got = llm.generate_ids(prompt, max_tokens=6, temperature=0.0, ignore_eos=True)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(tiny.model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert got == ids[len(prompt):]
    assert isinstance(llm.generate("The quick", max_tokens=4, temperature=0.0), str)
