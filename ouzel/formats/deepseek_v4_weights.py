"""DeepSeek V4 weights by module name, from any of the layouts they ship in.

The model's modules carry transformers' names (`model.layers.3.self_attn.q_a_proj.weight`);
checkpoints use DeepSeek's upstream names (`layers.3.attn.wq_a.weight`, with or without a
`model.` prefix: transformers' save_pretrained writes them back that way), one tensor per expert
(`ffn.experts.7.w1.weight`), and officially FP8 / FP4 blocks with scales. GGUF files
(`deepseek4`) go through `gguf_deepseek4`. Routed experts come back as an `ExpertStack` of
per-expert weights so nothing stacks or dequantizes the experts at load.
"""
from __future__ import annotations

import re

import torch

from ..errors import OuzelError
from ..layers.moe import ExpertStack
from ..quant.blocks import block_type
from ..quant.tensor import QTensor
from .sources import GGUFSource, SafetensorsSource

# per-layer suffix: module name -> upstream name
LAYER_NAMES = {
    "self_attn.q_a_proj.weight": "attn.wq_a.weight",
    "self_attn.q_a_norm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b.weight",
    "self_attn.kv_proj.weight": "attn.wkv.weight",
    "self_attn.kv_norm.weight": "attn.norm.weight",
    "self_attn.o_a_proj.weight": "attn.wo_a.weight",
    "self_attn.o_b_proj.weight": "attn.wo_b.weight",
    "self_attn.sinks": "attn.attn_sink",
    "self_attn.compressor.kv_proj.weight": "attn.compressor.wkv.weight",
    "self_attn.compressor.gate_proj.weight": "attn.compressor.wgate.weight",
    "self_attn.compressor.position_bias": "attn.compressor.ape",
    "self_attn.compressor.kv_norm.weight": "attn.compressor.norm.weight",
    "self_attn.compressor.indexer.kv_proj.weight": "attn.indexer.compressor.wkv.weight",
    "self_attn.compressor.indexer.gate_proj.weight": "attn.indexer.compressor.wgate.weight",
    "self_attn.compressor.indexer.position_bias": "attn.indexer.compressor.ape",
    "self_attn.compressor.indexer.kv_norm.weight": "attn.indexer.compressor.norm.weight",
    "self_attn.compressor.indexer.q_b_proj.weight": "attn.indexer.wq_b.weight",
    "self_attn.compressor.indexer.scorer.weights_proj.weight": "attn.indexer.weights_proj.weight",
    "mlp.gate.weight": "ffn.gate.weight",
    "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.gate.tid2eid": "ffn.gate.tid2eid",
    "mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.w1.weight",
    "mlp.shared_experts.up_proj.weight": "ffn.shared_experts.w3.weight",
    "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.w2.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "attn_hc.fn": "hc_attn_fn", "attn_hc.base": "hc_attn_base", "attn_hc.scale": "hc_attn_scale",
    "ffn_hc.fn": "hc_ffn_fn", "ffn_hc.base": "hc_ffn_base", "ffn_hc.scale": "hc_ffn_scale",
}
# routed experts: module name -> upstream per-expert names ({e} = expert), row blocks in order
EXPERT_NAMES = {
    "mlp.experts.gate_up_proj": ("ffn.experts.{e}.w1.weight", "ffn.experts.{e}.w3.weight"),
    "mlp.experts.down_proj": ("ffn.experts.{e}.w2.weight",),
}
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "embed.weight",
    "lm_head.weight": "head.weight",
    "model.norm.weight": "norm.weight",
    "model.hc_head.hc_fn": "hc_head_fn",
    "model.hc_head.hc_base": "hc_head_base",
    "model.hc_head.hc_scale": "hc_head_scale",
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def upstream_names(name: str) -> list[str]:
    """Names a tensor may have in a checkpoint: upstream, upstream under `model.`, and as is."""
    m = _LAYER.match(name)
    if m and m.group(2) in LAYER_NAMES:
        up = f"layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}"
    else:
        up = GLOBAL_NAMES.get(name)
    return [up, f"model.{up}", name] if up else [name]


class DeepseekV4Source:
    """Wraps a SafetensorsSource or GGUFSource; `get(module_name, shape)` as they do."""

    def __init__(self, inner, cfg):
        self.inner, self.cfg = inner, cfg
        if isinstance(inner, GGUFSource):
            from .gguf_deepseek4 import GGUFNames
            self._gguf = GGUFNames(inner, cfg)
        else:
            self._gguf = None
        if isinstance(inner, SafetensorsSource):
            from .hf_fp8 import BlockScaled
            self._fp = BlockScaled(inner, cfg)
        else:
            self._fp = None

    def nbytes(self) -> int:
        return self.inner.nbytes()

    def has(self, name: str) -> bool:
        if self._gguf is not None:
            return self._gguf.has(name)
        return any(self.inner.has(k) for k in upstream_names(name))

    def get(self, name: str, shape: tuple[int, ...]):
        if self._gguf is not None:
            return self._gguf.get(name, shape)
        m = _LAYER.match(name)
        if m and m.group(2) in EXPERT_NAMES:
            return self._experts(int(m.group(1)), m.group(2), name, shape)
        for key in upstream_names(name):
            if self.inner.has(key):
                return self._fp.get(key, shape)
        raise OuzelError(f"{self.inner.dir}: missing tensor {upstream_names(name)[0]!r}")

    def _experts(self, layer: int, kind: str, name: str, shape) -> ExpertStack:
        if self.inner.has(name):  # transformers' own stacked layout [E, out, in]
            t = self.inner.raw_tensor(name)
            if tuple(t.shape) != tuple(shape) or not t.is_floating_point():
                raise OuzelError(f"{self.inner.dir}: tensor {name!r} has shape {list(t.shape)} ({t.dtype}), "
                                 f"config implies {list(shape)}")
            if t.dtype in (torch.float16, torch.bfloat16):  # per-expert 16-bit views, not expanded
                bt = block_type("F16" if t.dtype == torch.float16 else "BF16")
                u8 = t.contiguous().view(torch.uint8)
                return ExpertStack([[QTensor(u8[e], bt, tuple(shape[1:]))] for e in range(shape[0])], tuple(shape))
            return ExpertStack.from_dense(t.float())
        E, out, cols = shape
        pieces = EXPERT_NAMES[kind]
        rows = out // len(pieces)
        parts = []
        for e in range(E):
            blocks = []
            for p in pieces:
                key = next((k for k in (f"layers.{layer}.{p}", f"model.layers.{layer}.{p}")
                            if self.inner.has(k.format(e=e))), None)
                if key is None:
                    raise OuzelError(f"{self.inner.dir}: missing tensor 'layers.{layer}.{p.format(e=e)}'")
                blocks.append(self._fp.get(key.format(e=e), (rows, cols)))
            parts.append(blocks)
        return ExpertStack(parts, tuple(shape))
