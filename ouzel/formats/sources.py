"""Weight sources: hand a model its tensors by HF name, from a GGUF file or a HF directory."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import OuzelError
from ..quant.blocks import BLOCK_TYPES, block_type
from ..quant.tensor import QTensor, Weight
from . import gguf_names
from .gguf import GGUFFile

F32_TYPE, F16_TYPE, BF16_TYPE = 0, 1, 30


class GGUFSource:
    def __init__(self, f: GGUFFile, arch: str, cfg: dict[str, Any]):
        self.file, self.arch, self.cfg = f, arch, cfg
        self._gguf_name = gguf_names.hf_to_gguf_names(arch)

    def has(self, hf_name: str) -> bool:
        g = self._gguf_name(hf_name)
        return g is not None and g in self.file.tensors

    def get(self, hf_name: str, shape: tuple[int, ...]) -> Weight:
        g = self._gguf_name(hf_name)
        if g is None or g not in self.file.tensors:
            raise OuzelError(f"{self.file.path}: missing tensor {g or hf_name!r}")
        info = self.file.tensors[g]
        if tuple(info.shape) != tuple(shape):
            raise OuzelError(f"{self.file.path}: tensor {g!r} has shape {list(info.shape)}, "
                             f"the metadata implies {list(shape)}")
        bt = block_type(info.ggml_type)
        raw = self.file.raw(g)
        if bt.ggml_type == F32_TYPE:
            w: Weight = raw.view(torch.float32).reshape(shape)
        elif len(shape) == 1:
            w = QTensor(raw.reshape(1, -1), bt, (1, shape[0])).dequantize().reshape(shape)
        else:
            w = QTensor(raw, bt, (shape[0], int(torch.tensor(shape[1:]).prod())))
        perm = gguf_names.row_permutation(self.arch, hf_name, self.cfg)
        if perm is not None:
            w = w.select_rows(perm) if isinstance(w, QTensor) else w[perm].contiguous()
        fn = gguf_names.value_transform(self.arch, hf_name)
        if fn is not None:
            w = fn(w)
        return w

    def nbytes(self) -> int:
        return self.file.nbytes()


class SafetensorsSource:
    """A Hugging Face directory: config.json + *.safetensors (memory-mapped)."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.dir = directory
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise OuzelError(f"{directory}: no *.safetensors files")
        self._where: dict[str, Any] = {}
        for f in files:
            try:
                h = safe_open(str(f), framework="pt")
            except Exception as e:
                raise OuzelError(f"{f}: unreadable safetensors file: {e}") from None
            for name in h.keys():
                self._where[name] = h
        self._size = sum(f.stat().st_size for f in files)

    def _key(self, hf_name: str) -> str | None:
        for key in (hf_name, hf_name.replace("model.", "model.language_model.", 1)):
            if key in self._where:
                return key
        return None

    def has(self, hf_name: str) -> bool:
        return self._key(hf_name) is not None

    def get(self, hf_name: str, shape: tuple[int, ...]) -> Weight:
        key = self._key(hf_name)
        if key is None:
            raise OuzelError(f"{self.dir}: missing tensor {hf_name!r}")
        t = self._where[key].get_tensor(key)
        if tuple(t.shape) != tuple(shape):
            raise OuzelError(f"{self.dir}: tensor {key!r} has shape {list(t.shape)}, config.json implies {list(shape)}")
        if t.dim() == 2 and t.dtype in (torch.float16, torch.bfloat16):  # keep 16-bit weights as they are
            bt = block_type(F16_TYPE if t.dtype == torch.float16 else BF16_TYPE)
            return QTensor(t.contiguous().view(torch.uint8), bt, tuple(t.shape))
        if not t.is_floating_point():
            raise OuzelError(f"{self.dir}: tensor {key!r} has dtype {t.dtype}; only float weights are supported")
        return t.float()

    def nbytes(self) -> int:
        return self._size

    def raw_tensor(self, key: str) -> torch.Tensor:
        """The stored tensor under its exact checkpoint key, any dtype (for format adapters)."""
        if key not in self._where:
            raise OuzelError(f"{self.dir}: missing tensor {key!r}")
        return self._where[key].get_tensor(key)


def read_hf_config(directory: Path) -> dict[str, Any]:
    p = directory / "config.json"
    if not p.is_file():
        raise OuzelError(f"{directory}: not a model directory (no config.json)")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise OuzelError(f"{p}: invalid JSON: {e}") from None
    if "text_config" in cfg:  # multimodal wrapper: the language model's config
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    return cfg
