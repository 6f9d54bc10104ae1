"""Tiny random Hugging Face models and their GGUF twins, for oracle tests against transformers.

Not a test file. `TINY` holds one small config per architecture (transformers config kwargs);
`build_hf_model` makes a float32 transformers model with random weights (norm weights included),
`save_hf_dir` writes it as a Hugging Face directory with a matching byte-level BPE tokenizer, and
`write_gguf` writes the same weights in llama.cpp's GGUF layout (tensor names, q/k row permutation
of llama, Gemma's 1 + w norms, metadata keys, gpt2 tokenizer), optionally quantized.

The GGUF names and transforms below are written out independently of ouzel's own tables
(`ouzel/formats/gguf_names.py`), from llama.cpp's converter, so a mistake there is caught.
"""
from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

# One table: transformers config kwargs of each tiny model.
TINY = {
    "llama": dict(
        vocab_size=320, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=None,
    ),
    "gemma3": dict(
        # 6 layers: llama.cpp hard-codes Gemma 3's pattern of 5 sliding layers then 1 full one,
        # so the GGUF carries no pattern; layers 0-4 slide (window 8), layer 5 is global.
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,  # head_dim != hidden / heads
        query_pre_attn_scalar=32,  # llama.cpp's GGUF scale for Gemma 3 below 27B: head_dim
        sliding_window=8, rms_norm_eps=1e-6, max_position_embeddings=256,
        # llama.cpp: the local rope base is hard-coded 10000; the global one is rope.freq_base
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=None,
    ),
    "qwen3_moe": dict(
        # all layers sparse, as llama.cpp's qwen3moe assumes; 8 experts, top-3, renormalised
        vocab_size=320, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,  # head_dim != hidden / heads
        num_experts=8, num_experts_per_tok=3, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        rms_norm_eps=1e-6, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=None,
    ),
}
# GGUF general.architecture where llama.cpp spells it differently from HF's model_type
GGUF_ARCH = {"qwen3_moe": "qwen3moe"}

INIT_STD = 0.02
SPECIAL_TOKENS = ["<bos>", "<eos>"]  # ids 0 and 1, as in TINY


def hf_config(arch: str, **overrides):
    kw = {**TINY[arch], **overrides}
    if arch == "llama":
        from transformers import LlamaConfig
        return LlamaConfig(**kw)
    if arch == "gemma3":
        from transformers import Gemma3TextConfig
        return Gemma3TextConfig(**kw)
    if arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig
        return Qwen3MoeConfig(**kw)
    raise KeyError(arch)


@torch.no_grad()
def build_hf_model(arch: str, seed: int = 0, **overrides):
    """A float32 transformers model of TINY[arch]: weights ~ N(0, INIT_STD), norm weights random
    around their neutral value (Llama: w ~ U(0.5, 1.5); Gemma, which scales by 1 + w: w ~ U(-0.5, 0.5))."""
    from transformers import Gemma3ForCausalLM, LlamaForCausalLM, Qwen3MoeForCausalLM

    cfg = hf_config(arch, **overrides)
    cls = {"llama": LlamaForCausalLM, "gemma3": Gemma3ForCausalLM, "qwen3_moe": Qwen3MoeForCausalLM}[arch]
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            u = torch.rand(p.shape, generator=g) - 0.5
            p.copy_(u if arch == "gemma3" else 1.0 + u)
        elif name.endswith(".bias"):
            p.copy_(torch.randn(p.shape, generator=g) * INIT_STD)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * INIT_STD)
    return model


# ------------------------------------------------------------------------------------ tokenizer

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. A small model reads the text and predicts the "
    "next token; the engine loads weights from a file, runs attention over every position, and "
    "samples a continuation. Tokens, merges, bytes and words: byte-level pair encoding learns which "
    "neighbours appear together most often in the training text and joins them into new symbols. "
    "Sliding windows limit how far back a layer may look, while global layers see the whole "
    "sequence. Rotary embeddings turn positions into angles; norms rescale each hidden vector. "
    "Numbers like 12345, 2024 and 3.14159 appear too, with punctuation (commas, colons; quotes!) "
    "and mixed Case words such as Python, GGUF, Llama, Gemma, Transformers and Tokenizers. "
    "Otters swim in cold rivers, herons wait in the shallows, and ouzels dive under running water "
    "to walk along the stream bed looking for insects between the pebbles and stones. "
)


@lru_cache(maxsize=None)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1)
    corpus = [_CORPUS * 3, _CORPUS.lower(), _CORPUS.upper()]
    tok.train_from_iterator(corpus, trainer)
    n = tok.get_vocab_size(with_added_tokens=True)
    if n != vocab_size:
        raise RuntimeError(f"tiny tokenizer has {n} tokens, wanted {vocab_size} (grow the corpus)")
    return tok.to_str()


def build_tokenizer(vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` with exactly `vocab_size` tokens; <bos>=0, <eos>=1."""
    from tokenizers import Tokenizer
    return Tokenizer.from_str(_tokenizer_json(vocab_size))


def save_hf_dir(model, path: str | Path) -> Path:
    """save_pretrained + tokenizer.json + tokenizer_config.json."""
    path = Path(path)
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text(_tokenizer_json(model.config.vocab_size), encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[1], "add_bos_token": True,
        "add_eos_token": False, "model_max_length": model.config.max_position_embeddings,
    }))
    return path


def gguf_vocab(vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """tokens, token types, merges ("a b") of the tiny tokenizer, as llama.cpp's gpt2 vocab stores them."""
    spec = json.loads(_tokenizer_json(vocab_size))
    vocab = spec["model"]["vocab"]
    for t in spec["added_tokens"]:
        vocab[t["content"]] = t["id"]
    tokens = [""] * vocab_size
    for t, i in vocab.items():
        tokens[i] = t
    types = [3 if t in SPECIAL_TOKENS else 1 for t in tokens]  # 3 control, 1 normal
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, types, merges


# ------------------------------------------------------------------------------------ GGUF

# HF name -> llama.cpp GGUF name ("{i}" is the layer), as llama.cpp's converter writes them
_GGUF_NAMES = {
    "llama": {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
        "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
        "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
        "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
        "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
        "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
        "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
        "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
        "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
        "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
    },
    "gemma3": {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
        "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
        "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
        "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
        "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
        "model.layers.{i}.self_attn.q_norm.weight": "blk.{i}.attn_q_norm.weight",
        "model.layers.{i}.self_attn.k_norm.weight": "blk.{i}.attn_k_norm.weight",
        "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.post_attention_norm.weight",
        "model.layers.{i}.pre_feedforward_layernorm.weight": "blk.{i}.ffn_norm.weight",
        "model.layers.{i}.post_feedforward_layernorm.weight": "blk.{i}.post_ffw_norm.weight",
        "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
        "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
        "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
    },
    "qwen3_moe": {  # llama.cpp's Qwen3MoeModel (Qwen2MoeModel): experts stacked per kind, [E, out, in]
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
        "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
        "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
        "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
        "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
        "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
        "model.layers.{i}.self_attn.q_norm.weight": "blk.{i}.attn_q_norm.weight",
        "model.layers.{i}.self_attn.k_norm.weight": "blk.{i}.attn_k_norm.weight",
        "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
        "model.layers.{i}.mlp.gate.weight": "blk.{i}.ffn_gate_inp.weight",
        # transformers fuses gate and up ([E, 2I, D], gate rows first); GGUF keeps them apart
        "model.layers.{i}.mlp.experts.gate_up_proj": ("blk.{i}.ffn_gate_exps.weight", "blk.{i}.ffn_up_exps.weight"),
        "model.layers.{i}.mlp.experts.down_proj": "blk.{i}.ffn_down_exps.weight",
        "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
        "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
        "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
    },
}


def gguf_name(arch: str, hf_name: str) -> str | tuple[str, ...] | None:
    """The GGUF name, or a tuple of names for a fused HF tensor GGUF stores split (row blocks in order)."""
    parts = hf_name.split(".")
    layer = None
    if len(parts) > 3 and parts[1] == "layers" and parts[2].isdigit():
        layer = parts[2]
        parts[2] = "{i}"
    g = _GGUF_NAMES[arch].get(".".join(parts))
    if isinstance(g, tuple):
        return tuple(x.replace("{i}", layer or "") for x in g)
    return None if g is None else g.replace("{i}", layer or "")


def _permute_llama(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: interleave each head's rope halves."""
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _storage_type(name: str, ndim: int, qtype: str):
    """The GGUF type a weight gets in a file of `qtype`: 2-D weights (and 3-D stacked experts) take
    qtype, the rest F32; MoE routers stay F32, as llama.cpp's quantizer leaves ffn_gate_inp."""
    from gguf import GGMLQuantizationType as GT
    if isinstance(name, str) and name.endswith("ffn_gate_inp.weight"):
        return GT.F32
    return GT[qtype] if ndim in (2, 3) else GT.F32


def _quantize(w: np.ndarray, t) -> np.ndarray:
    import gguf
    return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), t)


def gguf_tensors(hf_model, arch: str, qtype: str = "F32") -> dict[str, tuple[np.ndarray, object]]:
    """GGUF name -> (stored array, GGMLQuantizationType), in llama.cpp's layout."""
    from gguf import GGMLQuantizationType as GT

    cfg = hf_model.config
    out = {}
    for hf_name, t in hf_model.state_dict().items():
        g = gguf_name(arch, hf_name)
        if g is None:
            if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            raise KeyError(f"no GGUF name for {hf_name}")
        w = t.detach().float().cpu().numpy().copy()
        if arch == "llama" and g.endswith("attn_q.weight"):
            w = _permute_llama(w, cfg.num_attention_heads)
        elif arch == "llama" and g.endswith("attn_k.weight"):
            w = _permute_llama(w, cfg.num_key_value_heads)
        if arch == "gemma3" and g.endswith("norm.weight"):
            w = w + np.float32(1.0)
        st = _storage_type(g, w.ndim, qtype)
        # a fused tensor stored split: equal row blocks along `out` (axis -2), one GGUF tensor each
        for name, part in zip(*((g, np.split(w, len(g), axis=-2)) if isinstance(g, tuple) else ((g,), (w,)))):
            part = np.ascontiguousarray(part)
            out[name] = (part if st == GT.F32 else _quantize(part, st), st)
    return out


def gguf_metadata(hf_model, arch: str) -> dict[str, tuple[object, str]]:
    """'{arch}.key' (and general./tokenizer. keys) -> (value, kind) where kind is u32|f32|str|arr."""
    cfg = hf_model.config
    rope = cfg.rope_parameters
    theta = rope["full_attention"]["rope_theta"] if arch == "gemma3" else rope["rope_theta"]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    m = {
        f"{arch}.context_length": (cfg.max_position_embeddings, "u32"),
        f"{arch}.embedding_length": (cfg.hidden_size, "u32"),
        f"{arch}.block_count": (cfg.num_hidden_layers, "u32"),
        f"{arch}.feed_forward_length": (cfg.intermediate_size, "u32"),
        f"{arch}.attention.head_count": (cfg.num_attention_heads, "u32"),
        f"{arch}.attention.head_count_kv": (cfg.num_key_value_heads, "u32"),
        f"{arch}.attention.layer_norm_rms_epsilon": (cfg.rms_norm_eps, "f32"),
        f"{arch}.rope.freq_base": (theta, "f32"),
    }
    if arch == "llama":
        m[f"{arch}.rope.dimension_count"] = (head_dim, "u32")
    if arch == "qwen3_moe":
        arch = GGUF_ARCH[arch]
        m = {k.replace("qwen3_moe.", f"{arch}.", 1): v for k, v in m.items()}
        m[f"{arch}.attention.key_length"] = (head_dim, "u32")
        m[f"{arch}.attention.value_length"] = (head_dim, "u32")
        m[f"{arch}.expert_count"] = (cfg.num_experts, "u32")
        m[f"{arch}.expert_used_count"] = (cfg.num_experts_per_tok, "u32")
        m[f"{arch}.expert_feed_forward_length"] = (cfg.moe_intermediate_size, "u32")
    if arch == "gemma3":
        m[f"{arch}.attention.key_length"] = (head_dim, "u32")
        m[f"{arch}.attention.value_length"] = (head_dim, "u32")
        m[f"{arch}.attention.sliding_window"] = (cfg.sliding_window, "u32")
    tokens, types, merges = gguf_vocab(cfg.vocab_size)
    m.update({
        "general.name": (f"tiny-{arch}", "str"),
        "tokenizer.ggml.model": ("gpt2", "str"),
        "tokenizer.ggml.pre": ("gpt2", "str"),
        "tokenizer.ggml.tokens": (tokens, "arr"),
        "tokenizer.ggml.token_type": (types, "arr"),
        "tokenizer.ggml.merges": (merges, "arr"),
        "tokenizer.ggml.bos_token_id": (cfg.bos_token_id, "u32"),
        "tokenizer.ggml.eos_token_id": (cfg.eos_token_id, "u32"),
    })
    return m


def write_gguf(hf_model, arch: str, path: str | Path, qtype: str = "F32", *, architecture: str | None = None,
               drop_tensors=(), drop_keys=(), set_keys: dict | None = None,
               raw_tensors: dict | None = None, extra_tensors: dict | None = None) -> Path:
    """Write hf_model's weights as a llama.cpp-layout GGUF file.

    qtype: F32, F16 or Q8_0 for the 2-D weights (norms stay F32). The keyword arguments make
    broken files for error tests: `architecture` (general.architecture), `drop_tensors` (GGUF
    names), `drop_keys` (metadata keys), `set_keys` ({key: value} overriding metadata values),
    `raw_tensors` ({GGUF name: (uint8 bytes, GGMLQuantizationType)} replacing a tensor as is).
    `extra_tensors` ({GGUF name: float32 array}) adds tensors HF has no weight for (rope_freqs)."""
    import gguf

    path = Path(path)
    writer = gguf.GGUFWriter(str(path), architecture or GGUF_ARCH.get(arch, arch))
    meta = gguf_metadata(hf_model, arch)
    for k, v in (set_keys or {}).items():
        meta[k] = (v, meta[k][1] if k in meta else ("f32" if isinstance(v, float) else "u32"))
    for key, (value, kind) in meta.items():
        if key in drop_keys:
            continue
        if kind == "u32":
            writer.add_uint32(key, int(value))
        elif kind == "f32":
            writer.add_float32(key, float(value))
        elif kind == "str":
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, (arr, t) in gguf_tensors(hf_model, arch, qtype).items():
        if name in drop_tensors:
            continue
        if raw_tensors and name in raw_tensors:
            arr, t = raw_tensors[name]
        writer.add_tensor(name, arr, raw_dtype=t if t != gguf.GGMLQuantizationType.F32 or arr.dtype == np.uint8 else None)
    for name, arr in (extra_tensors or {}).items():
        writer.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@torch.no_grad()
def stored_weights_model(hf_model, arch: str, qtype: str):
    """A copy of hf_model whose weights are what a GGUF of `qtype` holds: each stored tensor
    quantized and dequantized with gguf's reference (gguf.quants), in HF layout."""
    import gguf

    ref = copy.deepcopy(hf_model)
    for hf_name, p in ref.state_dict().items():
        g = gguf_name(arch, hf_name)
        if g is None:
            continue
        st = _storage_type(g, p.dim(), qtype)
        if st == gguf.GGMLQuantizationType.F32:
            continue
        w = p.float().cpu().numpy()
        deq = gguf.quants.dequantize(_quantize(w, st), st).reshape(w.shape)
        p.copy_(torch.from_numpy(np.ascontiguousarray(deq, dtype=np.float32)))
    return ref
