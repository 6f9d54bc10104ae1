"""Write a transformers DeepseekV4ForCausalLM as a llama.cpp `deepseek4` GGUF (for tests).

Not a test file. Names, shapes and metadata keys are written out here from llama.cpp's
converter (conversion/deepseek.py) and loader (src/models/deepseek4.cpp), independently of
ouzel's own table (ouzel/formats/gguf_deepseek4.py), so a mistake in either shows up.
Routed experts may be stored in a block type: quantized with gguf.quants where it can
(MXFP4, Q8_0, Q4_0), else filled with random valid blocks (Q2_K, Q4_K, IQ2_XXS); `reference_model`
gives the transformers model holding exactly what the file stores.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

import tiny_models as tm

# transformers parameter suffix (per layer) -> llama.cpp name under blk.{i}.
LAYER = {
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
GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight", "model.hc_head.hc_fn": "output_hc_fn.weight",
          "model.hc_head.hc_base": "output_hc_base.weight", "model.hc_head.hc_scale": "output_hc_scale.weight"}
QUANTIZABLE = {"MXFP4", "Q8_0", "Q4_0"}
# byte offsets of the fp16 scale fields per block, set to small finite values in random blocks
_F16_FIELDS = {"Q2_K": (80, 82), "Q4_K": (0, 2), "IQ2_XXS": (0,)}


def _random_blocks(shape: tuple[int, ...], qtype: str, rng: np.random.Generator) -> np.ndarray:
    import gguf
    t = gguf.GGMLQuantizationType[qtype]
    elems, nbytes = gguf.GGML_QUANT_SIZES[t]
    if shape[-1] % elems:
        raise ValueError(f"{qtype} rows hold {elems}-element blocks; a row of {shape[-1]} does not fit")
    nb = shape[-1] // elems
    raw = rng.integers(0, 256, size=(*shape[:-1], nb, nbytes), dtype=np.uint8)
    for off in _F16_FIELDS.get(qtype, ()):
        d = rng.uniform(0.001, 0.004, size=raw.shape[:-1]).astype(np.float16)
        raw[..., off:off + 2] = d.view(np.uint8).reshape(*raw.shape[:-1], 2)
    return raw.reshape(*shape[:-1], nb * nbytes)


def _stored(w: np.ndarray, qtype: str, rng) -> np.ndarray:
    import gguf
    if qtype in QUANTIZABLE:
        return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), gguf.GGMLQuantizationType[qtype])
    return _random_blocks(w.shape, qtype, rng)


def gguf_tensors(model, expert_qtype: str = "F32", seed: int = 0,
                 layer_types: dict[str, str] | None = None) -> dict[str, tuple[np.ndarray, str]]:
    """llama.cpp name -> (array, type name); experts in expert_qtype, the per-layer matrices named
    in layer_types (llama.cpp suffix -> "F16" or a quantizable type) in theirs, everything else F32."""
    rng = np.random.default_rng(seed)
    I = model.config.moe_intermediate_size
    out = {}
    for name, t in model.state_dict().items():
        w = t.detach().cpu().numpy()
        if name in GLOBAL:
            out[GLOBAL[name]] = (w.astype(np.float32), "F32")
            continue
        _, _, i, rest = name.split(".", 3)
        if rest == "mlp.gate.tid2eid":
            out[f"blk.{i}.{LAYER[rest]}"] = (w.astype(np.int32), "I32")
        elif rest in LAYER:
            kind = (layer_types or {}).get(LAYER[rest], "F32")
            out[f"blk.{i}.{LAYER[rest]}"] = ((w.astype(np.float16), kind) if kind == "F16" else
                                             (w.astype(np.float32), kind) if kind == "F32" else (_stored(w, kind, rng), kind))
        elif rest == "mlp.experts.gate_up_proj":
            for part, g in ((w[:, :I], "ffn_gate_exps.weight"), (w[:, I:], "ffn_up_exps.weight")):
                out[f"blk.{i}.{g}"] = (part.astype(np.float32), "F32") if expert_qtype == "F32" else \
                    (_stored(part, expert_qtype, rng), expert_qtype)
        elif rest == "mlp.experts.down_proj":
            out[f"blk.{i}.ffn_down_exps.weight"] = (w.astype(np.float32), "F32") if expert_qtype == "F32" else \
                (_stored(w, expert_qtype, rng), expert_qtype)
        else:
            raise KeyError(f"no deepseek4 name for {name}")
    return out


def metadata(model) -> dict[str, tuple[object, str]]:
    c = model.config
    a = "deepseek4"
    rp = c.rope_parameters["compress"]
    rates = c.compress_rates
    ratios = [0 if t == "sliding_attention" else rates[t] for t in c.layer_types] + [0]  # + an MTP layer
    m = {
        f"{a}.block_count": (c.num_hidden_layers, "u32"), f"{a}.embedding_length": (c.hidden_size, "u32"),
        f"{a}.context_length": (c.max_position_embeddings, "u32"),
        f"{a}.attention.head_count": (c.num_attention_heads, "u32"), f"{a}.attention.head_count_kv": (1, "u32"),
        f"{a}.attention.key_length": (c.head_dim, "u32"), f"{a}.attention.value_length": (c.head_dim, "u32"),
        f"{a}.attention.layer_norm_rms_epsilon": (c.rms_norm_eps, "f32"),
        f"{a}.attention.q_lora_rank": (c.q_lora_rank, "u32"), f"{a}.attention.sliding_window": (c.sliding_window, "u32"),
        f"{a}.attention.output_group_count": (c.o_groups, "u32"), f"{a}.attention.output_lora_rank": (c.o_lora_rank, "u32"),
        f"{a}.attention.compress_ratios": (ratios, "i32arr"),
        f"{a}.attention.compress_rope_freq_base": (c.compress_rope_theta, "f32"),
        f"{a}.attention.indexer.head_count": (c.index_n_heads, "u32"),
        f"{a}.attention.indexer.key_length": (c.index_head_dim, "u32"),
        f"{a}.attention.indexer.top_k": (c.index_topk, "u32"),
        f"{a}.rope.freq_base": (c.rope_theta, "f32"), f"{a}.rope.dimension_count": (c.qk_rope_head_dim, "u32"),
        f"{a}.rope.scaling.type": ("yarn", "str"), f"{a}.rope.scaling.factor": (rp["factor"], "f32"),
        f"{a}.rope.scaling.original_context_length": (rp["original_max_position_embeddings"], "u32"),
        f"{a}.rope.scaling.yarn_beta_fast": (rp["beta_fast"], "f32"),
        f"{a}.rope.scaling.yarn_beta_slow": (rp["beta_slow"], "f32"),
        f"{a}.expert_count": (c.n_routed_experts, "u32"), f"{a}.expert_used_count": (c.num_experts_per_tok, "u32"),
        f"{a}.expert_shared_count": (c.n_shared_experts, "u32"),
        f"{a}.expert_feed_forward_length": (c.moe_intermediate_size, "u32"),
        f"{a}.expert_weights_scale": (c.routed_scaling_factor, "f32"), f"{a}.expert_weights_norm": (True, "bool"),
        f"{a}.expert_gating_func": (4, "u32"),
        f"{a}.swiglu_clamp_exp": ([c.swiglu_limit] * c.num_hidden_layers, "f32arr"),
        f"{a}.swiglu_clamp_shexp": ([c.swiglu_limit] * c.num_hidden_layers, "f32arr"),
        f"{a}.hash_layer_count": (c.mlp_layer_types.count("hash_moe"), "u32"),
        f"{a}.hyper_connection.count": (c.hc_mult, "u32"),
        f"{a}.hyper_connection.sinkhorn_iterations": (c.hc_sinkhorn_iters, "u32"),
        f"{a}.hyper_connection.epsilon": (c.hc_eps, "f32"),
    }
    tokens, types, merges = tm.gguf_vocab(c.vocab_size)
    m.update({"general.name": ("tiny-deepseek4", "str"), "tokenizer.ggml.model": ("gpt2", "str"),
              "tokenizer.ggml.pre": ("gpt2", "str"), "tokenizer.ggml.tokens": (tokens, "arr"),
              "tokenizer.ggml.token_type": (types, "arr"), "tokenizer.ggml.merges": (merges, "arr"),
              "tokenizer.ggml.bos_token_id": (c.bos_token_id, "u32"),
              "tokenizer.ggml.eos_token_id": (c.eos_token_id, "u32")})
    return m


def write(model, path: str | Path, expert_qtype: str = "F32", *, drop_keys=(), set_keys=None,
          tensor_types: dict | None = None, layer_types: dict | None = None) -> Path:
    """set_keys {key: (value, kind)} overrides metadata; tensor_types {name: raw ggml type id}
    relabels a stored tensor's type (for unsupported-type tests); layer_types: `gguf_tensors`'."""
    import gguf
    from gguf import GGUFValueType as VT

    path = Path(path)
    w = gguf.GGUFWriter(str(path), "deepseek4")
    meta = {**metadata(model), **(set_keys or {})}
    for key, (value, kind) in meta.items():
        if key in drop_keys or key == "general.architecture":
            continue
        if kind == "u32":
            w.add_uint32(key, int(value))
        elif kind == "f32":
            w.add_float32(key, float(value))
        elif kind == "bool":
            w.add_bool(key, bool(value))
        elif kind == "str":
            w.add_string(key, value)
        elif kind == "i32arr":
            w.add_key_value(key, [int(v) for v in value], VT.ARRAY, VT.INT32)
        elif kind == "f32arr":
            w.add_key_value(key, [float(v) for v in value], VT.ARRAY, VT.FLOAT32)
        else:
            w.add_array(key, value)
    for name, (arr, kind) in gguf_tensors(model, expert_qtype, layer_types=layer_types).items():
        if kind in ("F32", "I32", "F16"):
            w.add_tensor(name, np.ascontiguousarray(arr))
        else:
            t = gguf.GGMLQuantizationType[kind]
            w.add_tensor(name, np.ascontiguousarray(arr), raw_dtype=(tensor_types or {}).get(name, t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@torch.no_grad()
def reference_model(model, expert_qtype: str):
    """A copy of `model` whose routed experts hold what a file of expert_qtype stores."""
    import gguf
    if expert_qtype == "F32":
        return model
    ref = copy.deepcopy(model)
    stored = gguf_tensors(model, expert_qtype)
    t = gguf.GGMLQuantizationType[expert_qtype]
    I = model.config.moe_intermediate_size
    for i, layer in enumerate(ref.model.layers):
        deq = {g: gguf.quants.dequantize(stored[f"blk.{i}.{g}"][0], t)
               for g in ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")}
        layer.mlp.experts.gate_up_proj[:, :I] = torch.from_numpy(deq["ffn_gate_exps.weight"].copy())
        layer.mlp.experts.gate_up_proj[:, I:] = torch.from_numpy(deq["ffn_up_exps.weight"].copy())
        layer.mlp.experts.down_proj.copy_(torch.from_numpy(deq["ffn_down_exps.weight"].copy()))
    return ref
