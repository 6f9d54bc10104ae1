"""Qwen3-MoE against transformers' Qwen3MoeForCausalLM on tiny random configs.

The plain TINY["qwen3_moe"] config (all layers sparse, 8 experts, top-3, renormalised) also runs
through every test of test_hf_oracle.py. Here: the MoE-specific variants (dense layers from
`mlp_only_layers` / `decoder_sparse_step`, un-normalised top-k weights), the GGUF expert layout
(3-D stacked tensors loaded as per-expert views), and a check that routing is really exercised.
Tolerances as in test_hf_oracle.py (relative L2 < 1e-5 over the [T, V] logits).
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402
from test_hf_oracle import REL_TOL, assert_close, close, hf_logits  # noqa: E402

import ouzel  # noqa: E402
from ouzel.engine.generate import Sequence  # noqa: E402
from ouzel.layers.moe import ExpertStack  # noqa: E402
from ouzel.quant.tensor import QTensor  # noqa: E402

ARCH = "qwen3_moe"
PROMPT_LEN = 24
VARIANTS = {
    "all-sparse": {},
    # layer 1 dense via mlp_only_layers; un-normalised top-k weights (transformers' default)
    "mlp-only-layer": dict(mlp_only_layers=[1], norm_topk_prob=False),
    # every second layer sparse (layers 1 and 3), top-2 of 4 experts
    "sparse-step-2": dict(decoder_sparse_step=2, num_hidden_layers=4, num_experts=4, num_experts_per_tok=2),
}


def _ids(vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(3)
    return torch.randint(2, vocab, (PROMPT_LEN,), generator=g).tolist()


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    model = tm.build_hf_model(ARCH, seed=5, **VARIANTS[request.param])
    d = tm.save_hf_dir(model, tmp_path_factory.mktemp(request.param) / "hf")
    ids = _ids(model.config.vocab_size)
    return model, d, ids, hf_logits(model, ids)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    model = tm.build_hf_model(ARCH, seed=7)
    ids = _ids(model.config.vocab_size)
    work = tmp_path_factory.mktemp("q3m-gguf")
    files = {q: tm.write_gguf(model, ARCH, work / f"m-{q}.gguf", q) for q in ("F32", "Q8_0")}
    return model, files, ids, hf_logits(model, ids)


def test_variant_layers_are_what_the_config_says(variant):
    model, d, _, _ = variant
    llm = ouzel.load(d)
    for ours, theirs in zip(llm.model.model.layers, model.model.layers):
        assert type(ours.mlp).__name__.endswith("Moe") == type(theirs.mlp).__name__.endswith("SparseMoeBlock")


def test_hf_dir_logits_and_decode(variant):
    model, d, ids, ref = variant
    llm = ouzel.load(d)
    full = llm.logits(ids)
    assert_close(full, ref, "qwen3_moe HF dir full forward")
    seq = Sequence(llm.model, len(ids), torch.device("cpu"))
    steps = torch.stack([seq.prefill(ids[:1])] + [seq.step(t) for t in ids[1:]])
    assert_close(steps, full, "qwen3_moe decode vs full forward", abs_tol=None)


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_gguf_logits_and_decode(plain, qtype):
    model, files, ids, ref = plain
    llm = ouzel.load(files[qtype])
    assert llm.loaded.architecture == ARCH
    if qtype != "F32":
        ref = hf_logits(tm.stored_weights_model(model, ARCH, qtype), ids)
        assert close(ref, plain[3])[0] > 10 * REL_TOL  # quantization moved the logits
    full = llm.logits(ids)
    assert_close(full, ref, f"qwen3_moe GGUF {qtype}")
    seq = Sequence(llm.model, len(ids), torch.device("cpu"))
    steps = torch.stack([seq.prefill(ids[:1])] + [seq.step(t) for t in ids[1:]])
    assert_close(steps, full, f"qwen3_moe GGUF {qtype} decode vs full forward", abs_tol=None)


def test_gguf_experts_are_3d_and_stay_in_blocks(plain):
    """llama.cpp's layout: one [E, out, in] tensor per kind (ne = [in, out, E]); ouzel keeps
    each expert as a row slice of the file's blocks."""
    from ouzel.formats.gguf import GGUFFile

    model, files, _, _ = plain
    cfg = model.config
    f = GGUFFile(files["Q8_0"])
    E, I, D = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    assert f.tensors["blk.0.ffn_gate_exps.weight"].shape == (E, I, D)
    assert f.tensors["blk.0.ffn_down_exps.weight"].shape == (E, D, I)
    assert f.tensors["blk.0.ffn_gate_inp.weight"].ggml_type == 0  # router F32
    assert f.meta["qwen3moe.expert_count"] == E
    llm = ouzel.load(files["Q8_0"])
    experts = llm.model.model.layers[0].mlp.experts
    assert isinstance(experts.gate_up_proj, ExpertStack) and experts.gate_up_proj.shape == (E, 2 * I, D)
    gate, up = experts.gate_up_proj.parts[1]
    assert isinstance(gate, QTensor) and gate.bt.name == "Q8_0" and gate.shape == (I, D)
    # expert 1's gate equals the HF fused tensor's rows [0, I) of expert 1 (to Q8_0 precision)
    want = model.model.layers[0].mlp.experts.gate_up_proj[1, :I].detach()
    assert close(gate.dequantize(), want)[0] < 1e-2


@torch.no_grad()
def test_greedy_generate_matches_transformers(plain):
    model, files, ids, _ = plain
    gen_cfg = copy.deepcopy(model.generation_config)
    gen_cfg.eos_token_id, gen_cfg.pad_token_id = None, 0
    out = model.generate(torch.tensor([ids]), generation_config=gen_cfg, max_new_tokens=8, min_new_tokens=8,
                         do_sample=False)
    want = out[0, len(ids):].tolist()
    got = ouzel.load(files["F32"]).generate_ids(ids, max_tokens=8, temperature=0.0, ignore_eos=True)
    assert got == want


def test_routing_matters(plain):
    """Sensitivity: with routing changed (no renormalisation; top-1) the logits leave the
    tolerance by far, so the tests above do test the router."""
    model, files, ids, ref = plain
    llm = ouzel.load(files["F32"])
    for layer in llm.model.model.layers:
        layer.mlp.gate.renorm = False
    assert close(llm.logits(ids), ref)[0] > 100 * REL_TOL
    for layer in llm.model.model.layers:
        layer.mlp.gate.renorm, layer.mlp.gate.top_k = True, 1
    assert close(llm.logits(ids), ref)[0] > 100 * REL_TOL


def test_decode_bytes_count_only_active_experts(plain):
    """`ouzel bench`'s bandwidth floor: of the routed experts a token reads K of E; the embedding
    table (one row per token) not at all."""
    from ouzel.bench import decode_weight_bytes

    model, files, _, _ = plain
    cfg = model.config
    llm = ouzel.load(files["Q8_0"])
    layers = llm.model.model.layers
    experts = sum(l.mlp.experts.gate_up_proj.nbytes + l.mlp.experts.down_proj.nbytes for l in layers)
    embed = llm.model.model.embed_tokens.weight.nbytes
    total = ouzel.loader.weight_bytes(llm.model)
    want = total - embed - experts + experts * cfg.num_experts_per_tok // cfg.num_experts
    assert abs(decode_weight_bytes(llm.model) - want) <= 1


def _routed(plain, tokens: int, seed: int):
    """A fresh Q8_0 load's first MoE layer, and random hidden states routed through its gate."""
    model, files, _, _ = plain
    mlp = ouzel.load(files["Q8_0"]).model.model.layers[0].mlp
    x = torch.randn(tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    return mlp.experts, x, *mlp.gate(x)


@torch.no_grad()
def test_grouped_prefill_equals_the_expert_loop(plain):
    """The batched (padded, sorted-by-expert) MoE path used for CUDA prefills computes what the
    per-expert loop does; run here on the CPU in float32 with the exact dequantizer."""
    experts, x, w, idx = _routed(plain, 37, 11)
    gu, down = experts._stack(experts.gate_up_proj), experts._stack(experts.down_proj)
    grouped = experts._grouped(x, w, idx, gu, down)
    assert grouped is not None
    assert_close(grouped, experts(x, w, idx), "grouped MoE vs the expert loop", abs_tol=1e-6)


@torch.no_grad()
def test_fused_gate_up_stack_gives_the_same_experts(plain):
    """On CUDA gate and up stacks are fused into one (one kernel per step); same outputs."""
    experts, x, w, idx = _routed(plain, 9, 12)
    before = experts(x, w, idx)
    stack = experts.gate_up_proj
    fused = stack.fused()
    assert len(stack.stacked) == 2 and len(fused.stacked) == 1 and fused.shape == stack.shape
    experts.gate_up_proj = fused
    assert torch.equal(experts(x, w, idx), before)
    assert_close(experts._grouped(x, w, idx, fused, experts.down_proj), before, "grouped, fused stack", abs_tol=1e-6)
