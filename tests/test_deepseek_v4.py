"""DeepSeek V4 against transformers' DeepseekV4ForCausalLM on a tiny random config
(tests/tiny_deepseek_v4.py): full forward, token-by-token and chunked decode, the decode state's
size and rewind, greedy generation, HF FP8/FP4 storage.

Tolerance as tests/test_hf_oracle.py: relative L2 < 1e-5 over the [T, V] float32 logits.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_deepseek_v4 import PROMPT_LEN, REL_TOL, ouzel_full, rel_l2, tiny_fixture  # noqa: E402

import ouzel  # noqa: E402
from ouzel.engine.generate import Sequence  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_fixture(tmp_path_factory)


def test_full_forward_matches_transformers(tiny):
    out = ouzel_full(tiny.loaded.model, tiny.ids)
    assert rel_l2(out, tiny.ref) < REL_TOL


def test_query_blocks_of_the_gathered_attention(tiny, monkeypatch):
    """CSA attention gathers each query's picked rows in query blocks; small blocks, same logits."""
    from ouzel.layers import compressed_attention

    monkeypatch.setattr(compressed_attention, "GATHER_ELEMS", 7 * 3 * 32)  # 7 queries a block
    assert rel_l2(ouzel_full(tiny.loaded.model, tiny.ids), tiny.ref) < REL_TOL


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


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 2e-2)])
def test_16_bit_state(tiny, tmp_path, dtype, tol):
    """A 16-bit decode state: half the bytes, logits near the float32 oracle. The indexer keeps
    every row here (top-k 64): with 3 of many, rounding flips picks and the logits jump."""
    import tiny_models as tm
    from tiny_deepseek_v4 import build_v4

    hf = build_v4(index_topk=64)
    model = ouzel.load(tm.save_hf_dir(hf, tmp_path / "hf"), progress=False).model
    ids = tiny.ids[:52]
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    kv32, kv16 = model.new_kv(1024), model.new_kv(1024, dtype=dtype)
    with torch.inference_mode():
        for kv in (kv32, kv16):
            out = [model.logits(model(ids[:40], torch.arange(40), kv))]
            kv.commit(40)
            for i in range(40, 52):
                out.append(model.logits(model(ids[i:i + 1], torch.arange(i, i + 1), kv)))
                kv.commit(1)
            kv.out = torch.cat(out)
    assert kv16.nbytes() * 2 == kv32.nbytes()
    assert rel_l2(kv32.out, ref) < REL_TOL
    assert rel_l2(kv16.out, ref) < tol


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


@pytest.mark.parametrize("common,reused", [(85, 85), (60, 0)])
def test_reprompt_with_shared_prefix(tiny, common, reused):
    """A prompt that diverges after `common` tokens of the last one: within the state's rewind
    (16 tokens) trim is exact and the prefix is reused; further back it can't cut compressed
    rows, so the sequence re-prefills. Either way the logits are the oracle's, also for decode
    steps after it."""
    model = tiny.loaded.model
    seq = Sequence(model, 1024, torch.device("cpu"))
    ids = tiny.ids.tolist()
    seq.prefill(ids[:90])
    other = ids[:common] + [5, 6, 7]
    outs = [seq.prefill(other)[None]]
    assert seq.reused == reused and seq.tokens == other and seq.kv.length == len(other)
    for t in ids[90:99]:
        outs.append(seq.step(t)[None])
    full = other + ids[90:99]
    with torch.no_grad():
        ref = tiny.model(torch.tensor([full])).logits[0, len(other) - 1:]
    assert rel_l2(torch.cat(outs), ref) < REL_TOL



def test_state_round_trips_through_disk(tiny, tmp_path):
    """Save the decode state after 93 tokens to a safetensors file, restore it into a fresh state
    and continue: the restored sequence decodes exactly as the live one (and as the oracle)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model, ids = tiny.loaded.model, tiny.ids
    live = model.new_kv(1024)
    with torch.inference_mode():
        model(ids[:93], torch.arange(93), live)
        live.commit(93)
        save_file(live.state(), tmp_path / "v4.kv", metadata=live.meta())
        with safe_open(str(tmp_path / "v4.kv"), "pt") as f:
            meta = f.metadata()
        restored = model.new_kv(1024)
        restored.load_state(load_file(tmp_path / "v4.kv"), meta)
        assert restored.nbytes() == live.nbytes()
        outs = {}
        for name, kv in (("live", live), ("restored", restored)):
            outs[name] = [model.logits(model(ids[93:110], torch.arange(93, 110), kv))]
            kv.commit(17)
            for i in range(110, 130):
                outs[name].append(model.logits(model(ids[i:i + 1], torch.arange(i, i + 1), kv)))
                kv.commit(1)
    assert torch.equal(torch.cat(outs["live"]), torch.cat(outs["restored"]))
    assert rel_l2(torch.cat(outs["restored"]), tiny.ref[93:130]) < REL_TOL


def test_transformers_own_names_in_bf16(tiny, tmp_path):
    """A checkpoint under transformers' module names (fused gate_up_proj [E, 2I, D]) in bf16:
    experts stay 16-bit per-expert views; logits are transformers' on the bf16-rounded weights."""
    import shutil

    from safetensors.torch import save_file

    from ouzel.quant.tensor import QTensor

    path = tmp_path / "internal"
    shutil.copytree(tiny.dir, path)
    ref = __import__("copy").deepcopy(tiny.model)
    with torch.no_grad():
        sd = {}
        for k, v in ref.state_dict().items():
            if v.is_floating_point() and v.dim() >= 2:
                v.copy_(v.to(torch.bfloat16).float())
                sd[k] = v.to(torch.bfloat16).contiguous()
            else:
                sd[k] = v.contiguous()
        save_file(sd, path / "model.safetensors")
        want = ref(tiny.ids[None]).logits[0]
    llm = ouzel.load(path, progress=False)
    part = llm.model.model.layers[1].mlp.experts.gate_up_proj.parts[0][0]
    assert isinstance(part, QTensor) and part.bt.name == "BF16"
    assert rel_l2(ouzel_full(llm.model, tiny.ids), want) < REL_TOL

# ------------------------------------------------------------------------------------ HF FP8 / FP4 storage

def _fp8_blocks(w: torch.Tensor, block: int = 128):
    """e4m3 weight and float32 per-block dequant multipliers (weight_scale_inv)."""
    rows, cols = w.shape
    nr, nc = -(-rows // block), -(-cols // block)
    pad = torch.zeros(nr * block, nc * block)
    pad[:rows, :cols] = w
    amax = pad.view(nr, block, nc, block).abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = amax / 448.0
    full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
    return (w / full).to(torch.float8_e4m3fn), scale


def _fp4_blocks(w: torch.Tensor):
    """e2m1 codes two per byte (low nibble first) and ue8m0 exponents per 32 columns."""
    from ouzel.formats.hf_fp8 import FP4_VALUES
    rows, cols = w.shape
    g = w.view(rows, cols // 32, 32)
    exp = torch.ceil(torch.log2(g.abs().amax(-1).clamp(min=1e-12) / 6.0))
    x = g / torch.exp2(exp)[..., None]
    lut = torch.tensor(FP4_VALUES)
    codes = (x.reshape(rows, cols, 1) - lut).abs().argmin(-1).to(torch.uint8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.view(torch.int8), (exp + 127).to(torch.uint8)


def test_hf_fp8_weights_and_fp4_experts(tiny, tmp_path):
    """An official-style checkpoint: FP8 e4m3 linears with 128x128 weight_scale_inv, FP4 experts
    with per-32 ue8m0 `scale`, as quantization_config says. Loaded weights stay in those bytes
    (dequantized per use); logits are transformers' on the dequantized weights."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from ouzel.formats.hf_fp8 import BlockScaledWeight

    path = tmp_path / "fp8"
    shutil.copytree(tiny.dir, path)
    st = load_file(path / "model.safetensors")
    ref = __import__("copy").deepcopy(tiny.model)
    ref_sd = ref.state_dict()
    fp8_parts = ("attn.wq_a.", "attn.wq_b.", "attn.wkv.", "attn.wo_a.", "attn.wo_b.", "shared_experts.w")
    out = {}
    with torch.no_grad():
        for key, w in st.items():
            if key.endswith(".weight") and any(p in key for p in fp8_parts):
                q, s = _fp8_blocks(w)
                out[key], out[key[:-len("weight")] + "weight_scale_inv"] = q, s
            elif ".ffn.experts." in key:
                q, s = _fp4_blocks(w)
                out[key], out[key[:-len("weight")] + "scale"] = q, s
            else:
                out[key] = w
        save_file(out, path / "model.safetensors")
        cfg = json.loads((path / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                      "scale_fmt": "ue8m0", "expert_dtype": "fp4"}
        (path / "config.json").write_text(json.dumps(cfg))
        llm = ouzel.load(path, progress=False)
        layer = llm.model.model.layers[1]
        assert isinstance(layer.self_attn.q_b_proj.weight, BlockScaledWeight)
        assert isinstance(layer.mlp.experts.down_proj.parts[0][0], BlockScaledWeight)
        # the reference: transformers with every stored weight dequantized
        for i, hl in enumerate(ref.model.layers):
            ol = llm.model.model.layers[i]
            for name in ("q_a_proj", "q_b_proj", "kv_proj", "o_b_proj"):
                getattr(hl.self_attn, name).weight.copy_(getattr(ol.self_attn, name).weight.dequantize())
            hl.self_attn.o_a_proj.weight.copy_(ol.self_attn.o_a_proj.weight.dequantize())
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(hl.mlp.shared_experts, name).weight.copy_(getattr(ol.mlp.shared_experts, name).weight.dequantize())
            E = hl.mlp.experts.gate_up_proj.shape[0]
            gu = ol.mlp.experts.gate_up_proj.parts
            hl.mlp.experts.gate_up_proj.copy_(torch.stack([torch.cat([b.dequantize() for b in gu[e]]) for e in range(E)]))
            dn = ol.mlp.experts.down_proj.parts
            hl.mlp.experts.down_proj.copy_(torch.stack([dn[e][0].dequantize() for e in range(E)]))
        want = ref(tiny.ids[None]).logits[0]
    assert rel_l2(want, tiny.ref) > 1e-3  # the storage really is lossy
    assert rel_l2(ouzel_full(llm.model, tiny.ids), want) < REL_TOL
