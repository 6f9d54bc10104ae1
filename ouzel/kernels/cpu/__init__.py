"""CPU kernels for weights kept in their GGUF blocks: y = x @ W.T (one weight, or several that read
the same x in one call), row dequantization, embedding gather; and a decode step's attention over
the KV cache (with its RoPE and cache write in the same call).

The C++ source beside this file (qmatmul.cpp) is compiled on first use with
torch.utils.cpp_extension (needs a C++ compiler and ninja) into
$TORCH_EXTENSIONS_DIR or ~/.cache/ouzel/torch_extensions, in a folder keyed by the torch and
Python versions, $CXX and the CPU's feature flags (it is built with -march=native); later processes
reuse it, and an edit to the source rebuilds it. If anything fails, `available()` logs one
warning and answers False, and callers use the pure-torch reference instead.

Results are exact with respect to ouzel.quant.blocks.dequantize: `dequantize_rows` and
`embedding` return the same bits, and `qmatmul` computes in float32 from those values
(it differs from the float64 product only by float32 accumulation).

Set OUZEL_CPU_KERNELS=0 to switch the kernels off; OUZEL_CPU_KERNELS_CFLAGS adds compiler flags
(its own build folder), e.g. "-mno-avx512f" builds the portable scalar path.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
from pathlib import Path

import torch

from ...errors import OuzelError
from ...quant.blocks import BLOCK_TYPES, BlockType

log = logging.getLogger(__name__)

_SRC = Path(__file__).with_name("qmatmul.cpp")
_NAMES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
          "Q6_K", "IQ2_XXS", "IQ4_NL", "MXFP4")
SUPPORTED: frozenset[int] = frozenset(bt.ggml_type for bt in BLOCK_TYPES.values() if bt.name in _NAMES)

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool once tried; "ops": torch.ops.ouzel_cpu
_qmatmul = _dequantize = _embedding = None  # the op overloads, set once loaded


def _cpu_tag() -> str:
    """A short hash of what the binary depends on: CPU features (-march=native), torch, Python, $CXX."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        pass
    key = "|".join([flags or platform.processor() or platform.machine(), torch.__version__,
                    f"{sys.version_info[0]}.{sys.version_info[1]}", os.environ.get("CXX", "")])
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def build_directory() -> Path:
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "ouzel" / "torch_extensions"
    extra = os.environ.get("OUZEL_CPU_KERNELS_CFLAGS", "").strip()
    tag = _cpu_tag() + ("_" + hashlib.sha1(extra.encode()).hexdigest()[:8] if extra else "")
    return Path(base) / f"ouzel_qmatmul_{tag}"


def _compile_flags() -> tuple[list[str], list[str]]:
    # OUZEL_CPU_KERNELS_CFLAGS adds flags (e.g. -mno-avx512f to try the portable path)
    cflags = ["-O3", "-march=native", "-ffp-contract=off"] + os.environ.get("OUZEL_CPU_KERNELS_CFLAGS", "").split()
    ldflags: list[str] = []
    # at::parallel_for is a header template: with torch's OpenMP backend it needs -fopenmp here,
    # and links the same libgomp.so.1 torch already loaded
    if "parallel backend: OpenMP" in torch.__config__.parallel_info():
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return cflags, ldflags


def _load() -> None:
    global _qmatmul, _dequantize, _embedding
    from torch.utils import cpp_extension

    bdir = build_directory()
    bdir.mkdir(parents=True, exist_ok=True)
    cflags, ldflags = _compile_flags()
    if not any(bdir.glob("*.so")):  # a first build takes ~15 s: say why the first run waits
        print(f"ouzel: compiling the CPU kernels once into {bdir} ...", file=sys.stderr, flush=True)
    cpp_extension.load(name="ouzel_qmatmul", sources=[str(_SRC)], extra_cflags=cflags, extra_ldflags=ldflags,
                       build_directory=str(bdir), is_python_module=False, verbose=False)
    ops = torch.ops.ouzel_cpu
    import gguf
    import numpy as np

    q = gguf.quants
    q.IQ2_XXS.init_grid()
    grid = np.asarray(q.IQ2_XXS.grid, dtype=np.float32).reshape(256, 8)
    ops.set_tables(torch.tensor(q.IQ4_NL.kvalues, dtype=torch.int8),
                   torch.tensor(q.MXFP4.kvalues, dtype=torch.int8),
                   torch.tensor(list(q.IQ2_XXS.ksigns), dtype=torch.uint8),
                   torch.from_numpy(grid.astype(np.uint8)))
    _qmatmul, _dequantize, _embedding = ops.qmatmul.default, ops.dequantize.default, ops.embedding.default
    _state["ops"] = ops


def available() -> bool:
    """Whether the kernels are compiled and loaded (compiles them on the first call; never raises)."""
    ok = _state.get("ok")
    if ok is not None:
        return ok  # type: ignore[return-value]
    with _lock:
        if "ok" not in _state:
            if os.environ.get("OUZEL_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
                _state["ok"] = False
            else:
                try:
                    _load()
                    _state["ok"] = True
                except Exception as e:  # compiler, ninja, headers, loading: all mean "use the reference"
                    msg = str(e).strip().splitlines()
                    log.warning("ouzel: CPU quantized kernels unavailable, using the slower reference "
                                "(%s: %s)", type(e).__name__, msg[-1] if msg else "")
                    _state["ok"] = False
    return _state["ok"]  # type: ignore[return-value]


def supports(bt: BlockType) -> bool:
    """Whether qmatmul/dequantize_rows/embedding handle this block type (and the kernels loaded)."""
    return bt.ggml_type in SUPPORTED and available()


def _need() -> None:
    if not available():
        raise OuzelError("ouzel CPU kernels are not available (see the warning logged when they were built)")


def qmatmul(x: torch.Tensor, raw: torch.Tensor, bt: BlockType, out_features: int) -> torch.Tensor:
    """y = x @ dequantize(raw, bt).T; x float32 [M, K] contiguous, raw uint8 [N, row_bytes] (only read),
    N == out_features; returns float32 [M, N]."""
    if _qmatmul is None:
        _need()
    return _qmatmul(x, raw, bt.ggml_type, out_features)


def decode_attention_rope(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, row: int, cos: torch.Tensor, sin: torch.Tensor, first_key: int,
                          scale: float) -> torch.Tensor:
    """`decode_attention` with what comes before it in a decode step, in the same call: q [H, D] and
    k [Hkv, D] rotated over their first len(cos) dims (rotate-half RoPE, `layers.rope.Rope`'s
    arithmetic), k and v [Hkv, D] stored at `row` of the caches, then keys first_key .. row."""
    _need()
    return _state["ops"].decode_attention_rope(q, k, v, k_cache, v_cache, row, cos, sin, first_key,  # type: ignore[attr-defined]
                                                scale)


MULTI_MAX_M = 8  # the GEMV register tile (MAXM in qmatmul.cpp)


def qmatmul_multi(x: torch.Tensor, weights: list[tuple[torch.Tensor, BlockType]]) -> torch.Tensor:
    """[x @ W_0.T | x @ W_1.T | ...] for weights (raw, bt) of any supported types that read the
    same x [M, K] (M <= MULTI_MAX_M): one call and one parallel loop for all of them, each output
    as `qmatmul` gives it alone. float32 [M, sum of the weights' rows]."""
    _need()
    return _state["ops"].qmatmul_multi(x, [r for r, _ in weights], [bt.ggml_type for _, bt in weights])  # type: ignore[attr-defined]


def dequantize_rows(raw: torch.Tensor, bt: BlockType, rows: slice | None = None) -> torch.Tensor:
    """float32 [R, K] of raw's rows (all, or `rows`), bit-identical to ouzel.quant.blocks.dequantize."""
    if _dequantize is None:
        _need()
    if rows is not None:
        raw = raw[rows]
    return _dequantize(raw, bt.ggml_type)


def embedding(raw: torch.Tensor, bt: BlockType, ids: torch.Tensor) -> torch.Tensor:
    """float32 [*ids.shape, K]: the rows `ids` of raw, dequantized (only those rows are read)."""
    if _embedding is None:
        _need()
    flat = ids.reshape(-1)
    out = _embedding(raw, bt.ggml_type, flat)
    return out if ids.dim() == 1 else out.reshape(*ids.shape, out.shape[-1])


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_key: int, n_keys: int,
                     scale: float) -> torch.Tensor:
    """One decode step's attention: q [H, D] (float32) over keys first_key .. n_keys - 1 of the
    cache k, v [C, Hkv, D] (float32, float16 or bfloat16, contiguous), query head h reading kv head
    h // (H / Hkv); float32 [H, D]. Equals `layers.attention.attend` on those keys (float32
    rounding of a different order of sums)."""
    _need()
    return _state["ops"].decode_attention(q, k, v, first_key, n_keys, scale)  # type: ignore[attr-defined]


def configure(gemv_max_m: int | None = None, tile_bytes: int | None = None, prefill: str | None = None) -> None:
    """Tuning knobs, for benchmarks and tests (process-wide; None leaves a knob as it is).

    gemv_max_m: the largest M that runs as fused GEMVs (-1: each type's default, 12, or 6 for the
    256-element types); above it the prefill path runs: prefill="blocked" (W dequantized block by block,
    own AVX-512 kernel; the default where AVX-512 is there), "mm" (float32 tiles of tile_bytes through
    at::mm) or "default"."""
    _need()
    mode = {None: -1, "blocked": 0, "mm": 1, "default": 2}[prefill]
    _state["ops"].configure(-2 if gemv_max_m is None else gemv_max_m,  # type: ignore[attr-defined]
                            -1 if tile_bytes is None else tile_bytes, mode)


def build_info() -> str:
    _need()
    return _state["ops"].build_info()  # type: ignore[attr-defined]
