"""Routed experts for models that name them as transformers does (`mlp.experts.gate_up_proj`
[E, 2I, D], gate rows first, and `mlp.experts.down_proj` [E, D, I]), from whichever layout a
checkpoint uses:

- GGUF (llama.cpp): `blk.N.ffn_{gate,up,down}_exps.weight`, one 3-D tensor per kind, stored
  [E, out, in] (ne = [in, out, E]); each expert is a row slice of the raw blocks, nothing copied.
- HF safetensors: fused 3-D tensors (transformers' in-memory layout), or one tensor per expert
  (`mlp.experts.{e}.gate_proj.weight`, `up_proj`, `down_proj`: what checkpoints ship and what
  save_pretrained writes back).

Everything else passes through to the wrapped source. Experts come back as an `ExpertStack`.
"""
from __future__ import annotations

import torch

from ..errors import OuzelError, UnsupportedError
from ..layers.moe import ExpertStack
from ..quant.blocks import block_type
from ..quant.tensor import QTensor
from .sources import GGUFSource, SafetensorsSource

KINDS = ("gate_up_proj", "down_proj")
GGUF_EXPERTS = {"gate_up_proj": ("ffn_gate_exps.weight", "ffn_up_exps.weight"),
                "down_proj": ("ffn_down_exps.weight",)}
HF_PER_EXPERT = {"gate_up_proj": ("gate_proj.weight", "up_proj.weight"), "down_proj": ("down_proj.weight",)}


def split_expert_name(name: str) -> tuple[int, str] | None:
    """'model.layers.3.mlp.experts.down_proj' -> (3, 'down_proj'); None for other names."""
    parts = name.split(".")
    if (len(parts) == 6 and parts[:2] == ["model", "layers"] and parts[2].isdigit()
            and parts[3:5] == ["mlp", "experts"] and parts[5] in KINDS):
        return int(parts[2]), parts[5]
    return None


def gguf_expert_stack(f, names, shape) -> ExpertStack:
    """Experts from llama.cpp's stacked [E, rows, cols] GGUF tensors, one per fused piece
    (gate, up): each expert is a row slice of the file's blocks, nothing copied."""
    E, out, cols = shape
    rows = out // len(names)
    pieces = []  # per GGUF tensor: E row blocks
    for g in names:
        if g not in f.tensors:
            raise OuzelError(f"{f.path}: missing tensor {g!r}")
        info = f.tensors[g]
        if tuple(info.shape) != (E, rows, cols):
            raise OuzelError(f"{f.path}: tensor {g!r} has shape {list(info.shape)}, "
                             f"the metadata implies {[E, rows, cols]}")
        try:
            bt = block_type(info.ggml_type)
        except UnsupportedError as e:  # name the tensor: expert files mix block types
            raise UnsupportedError(f"{f.path}: routed experts {g!r}: {e}") from None
        raw = f.raw(g)  # [E * rows, row_bytes]
        if bt.name == "F32":
            dense = raw.view(torch.float32).reshape(E, rows, cols)
            pieces.append([dense[e] for e in range(E)])
        else:
            pieces.append(QTensor(raw, bt, (E * rows, cols)))
    if all(isinstance(p, QTensor) for p in pieces):
        return ExpertStack.from_stacked(pieces, shape)
    return ExpertStack([[p[e] if isinstance(p, list) else QTensor(p.raw[e * rows:(e + 1) * rows], p.bt, (rows, cols))
                         for p in pieces] for e in range(E)], shape)


class StackedExpertsSource:
    def __init__(self, source):
        self.source = source

    def has(self, name: str) -> bool:
        return self.source.has(name) if split_expert_name(name) is None else True

    def get(self, name: str, shape: tuple[int, ...]):
        where = split_expert_name(name)
        if where is None:
            return self.source.get(name, shape)
        layer, kind = where
        if isinstance(self.source, GGUFSource):
            return self._gguf(layer, kind, tuple(shape))
        if isinstance(self.source, SafetensorsSource):
            return self._hf(name, layer, kind, tuple(shape))
        raise OuzelError(f"routed experts from {type(self.source).__name__} are not supported")

    def nbytes(self) -> int:
        return self.source.nbytes()

    def _gguf(self, layer: int, kind: str, shape) -> ExpertStack:
        names = [f"blk.{layer}.{s}" for s in GGUF_EXPERTS[kind]]
        return gguf_expert_stack(self.source.file, names, tuple(shape))

    def _hf(self, name: str, layer: int, kind: str, shape) -> ExpertStack:
        if self.source.has(name):  # already fused and stacked
            return ExpertStack.from_dense(self.source.get(name, shape))
        E, out, cols = shape
        suffixes = HF_PER_EXPERT[kind]
        rows = out // len(suffixes)
        parts = [[self.source.get(f"model.layers.{layer}.mlp.experts.{e}.{s}", (rows, cols)) for s in suffixes]
                 for e in range(E)]
        return ExpertStack(parts, shape)
