"""Read GGUF files, memory-mapped: tensors stay in their blocks.

The header is parsed here rather than with `gguf.GGUFReader`, which takes ~10 s on Gemma 3's
262k-token vocabulary; the `gguf` package still supplies the format's constants.
"""
from __future__ import annotations

import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..errors import OuzelError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_SCALARS = {  # value type -> struct format
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # torch order: outermost first, so a weight is [out, in]
    nbytes: int
    offset: int  # absolute, in the file


class _Cursor:
    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise OuzelError(f"{self.path}: truncated GGUF header")
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise OuzelError(f"{self.path}: truncated GGUF header")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        vtype = GGUFValueType(vtype)
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            etype, n = GGUFValueType(self.take("<I")), self.take("<Q")
            if etype in _SCALARS and etype != GGUFValueType.BOOL:  # numeric arrays in one numpy read
                dt = np.dtype(_SCALARS[etype])
                end = self.pos + n * dt.itemsize
                if end > len(self.buf):
                    raise OuzelError(f"{self.path}: truncated GGUF header")
                arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos)
                self.pos = end
                return arr.tolist()
            return [self.value(etype) for _ in range(n)]
        return self.take(_SCALARS[vtype])


class GGUFFile:
    """The metadata and tensor table of one GGUF file; tensor bytes are views into an mmap."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise OuzelError(f"{self.path}: no such file")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise OuzelError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        self._file = open(self.path, "rb")
        try:
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise OuzelError(f"{self.path}: empty file") from None
        self.meta: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        try:
            self._parse()
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise OuzelError(f"{self.path}: corrupt GGUF header: {e}") from None

    def _parse(self) -> None:
        c = _Cursor(self._mm, self.path)
        c.take("<I")
        version = c.take("<I")
        if version not in (2, 3):
            raise OuzelError(f"{self.path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = c.take("<Q"), c.take("<Q")
        for _ in range(n_kv):
            key = c.string()
            self.meta[key] = c.value(c.take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            dims = [c.take("<Q") for _ in range(c.take("<I"))]
            ggml_type, offset = c.take("<I"), c.take("<Q")
            infos.append((name, dims, ggml_type, offset))
        align = int(self.meta.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = (c.pos + align - 1) // align * align
        size = len(self._mm)
        for name, dims, ggml_type, offset in infos:
            n = int(np.prod(dims)) if dims else 1
            try:
                elems, nbytes_block = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            except (ValueError, KeyError):
                elems, nbytes_block = 1, 0  # unknown type: reported when the tensor is used
            nbytes = n // elems * nbytes_block
            info = TensorInfo(name, ggml_type, tuple(reversed(dims)), nbytes, data_start + offset)
            if info.offset + info.nbytes > size:
                raise OuzelError(f"{self.path}: truncated file: tensor {name!r} ends at byte "
                                 f"{info.offset + info.nbytes}, the file has {size}")
            self.tensors[name] = info

    @property
    def architecture(self) -> str:
        arch = self.meta.get("general.architecture")
        if not arch:
            raise OuzelError(f"{self.path}: missing metadata key 'general.architecture'")
        return str(arch)

    def get(self, key: str, default: Any = None) -> Any:
        return self.meta.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.meta:
            raise OuzelError(f"{self.path}: missing metadata key {key!r}")
        return self.meta[key]

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes as a uint8 tensor [rows, row_bytes], sharing memory with the mmap."""
        if name not in self.tensors:
            raise OuzelError(f"{self.path}: missing tensor {name!r}")
        info = self.tensors[name]
        from ..quant.blocks import block_type
        bt = block_type(info.ggml_type)  # unsupported types fail here, by name
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        arr = np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        with warnings.catch_warnings():  # the mmap is read-only; nothing writes through this view
            warnings.simplefilter("ignore")
            return torch.from_numpy(arr).view(rows, bt.row_bytes(info.shape[-1]))

    def nbytes(self) -> int:
        return self.path.stat().st_size
