"""CUDA fast paths: the dispatch to the Triton kernels in `kernels/triton/` (GGUF-block GEMV,
dequantize and MoE GEMM in gguf.py, int8-activation GEMV and the fused activation rounding in
q8act.py, flash-decoding attention in attention.py, RMSNorm, rope and the KV store in fused.py,
MoE routing in router.py, DeepSeek V4's step pieces in v4.py and mhc.py). docs/gpu.md has the map.

Every function returns None when no kernel fits (other block types, no Triton, odd layouts), and
the caller then runs the torch reference. Environment switches (for A/B runs; also OUZEL_KV_DTYPE
in kv/cache.py and OUZEL_NO_CUDA_GRAPH in engine/graphs.py):
  OUZEL_NO_TRITON=1              never use the Triton kernels
  OUZEL_CUDA_PREFILL_DTYPE=f32   large-M matmuls (prefill) in x's dtype instead of bf16 operands
                                 with fp32 accumulation on the tensor cores (the default)
  OUZEL_TRITON_TUNE=0            use the default GEMV config instead of timing a few on first use
  OUZEL_TUNE_COLD=0              time them on one matrix left in L2 (default: on weights read from memory)
  OUZEL_NO_MOE_COMBINE=1         MoE decode: the experts' weighted sum in its own launch, not formed
                                 by the down GEMV
  OUZEL_NO_FUSED_ROUTER=1        MoE decode: the router GEMV and the routing as two launches
  OUZEL_NO_ATTENTION_FUSION=1    decode: rope (and q/k norms) and o_proj's int8 rounding in launches of
                                 their own, not in the attention kernel
  OUZEL_NO_PAIR_GEMV=1           decode: a layer's Q4_K q/k and Q6_K v as two GEMV launches, not one
  OUZEL_NO_V4_CHUNK_ATTENTION=1  DeepSeek V4 prefill: the torch attention (scores of every query against
                                 every key of the chunk) instead of the Triton kernel
  OUZEL_NO_SWIGLU_FUSION=1       decode: silu(gate) * up's int8 rounding in a launch of its own, not
                                 formed by the gate/up GEMV
  OUZEL_PDL=0                    no programmatic dependent launch (sm_90+: by default a Triton kernel
                                 starts while the one before it finishes; kernels/triton/pdl.py)
  OUZEL_LOG_COMPILES=1           log each Triton compile (kernel and constexprs) while `compiles()` counts
  OUZEL_EXACT_GEMV=1             decode GEMVs multiply fp32 activations (default: Q4_K rounds x to
                                 int8 per 32 values and uses integer dot products, as llama.cpp does)
"""
from __future__ import annotations

import importlib
import logging
import os

import torch

log = logging.getLogger(__name__)

_TUNED: dict = {}  # (kernel, type, n, k, m, dtype, rows, pairs) -> kwargs
# A handful of tile shapes (u: 256-element steps per loop iteration); unless a config says,
# the split of K is derived so that the grid fills the chip.
GEMV_CONFIGS = (dict(bn=4, u=2), dict(bn=16, u=2), dict(bn=16, u=4), dict(bn=16, u=8), dict(bn=16, u=1),
                dict(bn=4, u=4, target=2048), dict(bn=16, u=2, target=2048), dict(bn=32, u=2, num_warps=8))
Q8_CONFIGS = (dict(bn=32, u=2), dict(bn=16, u=2), dict(bn=32, u=4, num_warps=8), dict(bn=64, u=1, num_warps=8),
              dict(bn=8, u=1), dict(bn=16, u=1, target=1024), dict(bn=32, u=2, target=1024),
              # one x row (decode): the kernel with every load of the next step in flight
              dict(bn=32, u=2, m1=True), dict(bn=16, u=2, m1=True), dict(bn=16, u=4, m1=True),
              dict(bn=32, u=4, num_warps=8, m1=True), dict(bn=64, u=2, num_warps=8, m1=True),
              dict(bn=16, u=2, target=1024, m1=True), dict(bn=8, u=2, target=1024, m1=True),
              # no K split: small matrices (Qwen3's o_proj 2048x4096) then skip the partials' sum,
              # a second launch that took 3-4 us beside a 5 us GEMV (H100 profile)
              dict(bn=16, u=2, split=1, m1=True), dict(bn=8, u=2, split=1, m1=True), dict(bn=8, u=4, split=1, m1=True))
Q8_M1_CONFIGS = tuple(c for c in Q8_CONFIGS if c.get("m1"))  # the kernels of one x row (Q6_K_R8, Q6_K_R3)
# Q8_0_R8 (one x row): 2 * bn * u / num_warps quant words per thread and step; 16 compile to 80
# registers on sm_90 (6 blocks of 4 warps per SM), 32 to ~170
Q8_0_R8_CONFIGS = (dict(bn=16, u=2), dict(bn=8, u=4), dict(bn=32, u=1), dict(bn=32, u=2, num_warps=8),
                   dict(bn=16, u=4, num_warps=8), dict(bn=8, u=2), dict(bn=16, u=2, target=1024),
                   dict(bn=32, u=2), dict(bn=16, u=4), dict(bn=8, u=2, split=1), dict(bn=8, u=4, split=1))
# Q2_K_R8 / IQ2_XXS_R8 (one x row; DeepSeek V4's experts): 4 * bn * u quads of 16
# bytes per step, so bn * u >= 8 * num_warps keeps one 16-byte load per thread; 40-96 registers on sm_90.
# The sweep's best (H100, 6 of 256 experts): bn=64, u=2 for both (IQ2_XXS 24.1 us, Q2_K 8.8 us, 10.2 before)
Q2_R8_CONFIGS = (dict(bn=64, u=2), dict(bn=16, u=2), dict(bn=32, u=1), dict(bn=8, u=4), dict(bn=32, u=2),
                 dict(bn=16, u=4), dict(bn=32, u=2, num_warps=8), dict(bn=64, u=1, num_warps=8),
                 dict(bn=16, u=2, target=1024))
Q8_TYPE_CONFIGS = {"Q4_K": Q8_CONFIGS, "Q6_K_R8": Q8_M1_CONFIGS, "Q6_K_R3": Q8_M1_CONFIGS,
                   "Q8_0_R8": Q8_0_R8_CONFIGS, "Q2_K_R8": Q2_R8_CONFIGS, "IQ2_XXS_R8": Q2_R8_CONFIGS}
# Tuned cold (the default; not under OUZEL_TUNE_COLD=0), also tiles that load a program's whole K
# range in one or two steps over a finer K split: a one-row program has one step of loads in flight
# ahead of the one it computes, so its time is about (steps) x (the memory's latency) where a GEMV reads < 10 MB (qwen3moe's o_proj:
# 7.0 us for 4.7 MB on an H100, some 8 steps' worth of latency; session 11)
# (or without a split, each program's whole K range in one step: loaded before its PDL wait, so while
# the kernel before it runs; sm_90, Q4_K: 150-236 registers, no spills; Q6_K_R8 at 16 steps: 255 and a
# stack, so 8 at most)
_COLD_M1 = (dict(bn=8, u=4, target=1024, m1=True), dict(bn=16, u=4, target=1024, m1=True),
            dict(bn=8, u=2, target=2048, m1=True), dict(bn=16, u=2, target=2048, m1=True),
            dict(bn=8, u=8, split=1, m1=True), dict(bn=8, u=16, split=1, m1=True),
            dict(bn=16, u=16, split=1, num_warps=8, m1=True))
_COLD_M1_Q6 = tuple(c for c in _COLD_M1 if c["u"] <= 8)
COLD_EXTRA = {"Q4_K": _COLD_M1, "Q6_K_R8": _COLD_M1_Q6, "Q6_K_R3": _COLD_M1_Q6}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _q8():
    """The int8-activation GEMVs (`triton/q8act.py`), unless OUZEL_EXACT_GEMV=1 asks for fp32 x."""
    return None if os.environ.get("OUZEL_EXACT_GEMV") else _triton("q8act")


_MODS: dict[str, object] = {}


def _triton(name: str):
    """ouzel.kernels.triton.<name>, or None where Triton can't run here (no CUDA, no triton,
    OUZEL_NO_TRITON=1). With TRITON_INTERPRET=1 (the tests on a CPU machine) the modules load too:
    the kernels then run on CPU tensors through Triton's interpreter, for the callers that pass
    them CPU tensors explicitly; the ops keep dispatching CPU weights to the CPU kernels."""
    if name not in _MODS:
        mod = None
        runnable = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
        if not os.environ.get("OUZEL_NO_TRITON") and runnable:
            try:
                mod = importlib.import_module(f".triton.{name}", __package__)
            except ImportError:
                mod = None
        _MODS[name] = mod
    return _MODS[name]


class compiles:
    """Counts the Triton kernels compiled inside a `with` block (`n`; JIT cache misses, through
    Triton's jit_cache_hook, any hook already set still called): a kernel specialized on a length
    compiles again at each new size, seconds each. OUZEL_LOG_COMPILES=1 logs each one. Counts
    nothing where Triton has no hook (the interpreter, no triton)."""

    def __enter__(self):
        self.n, self._knobs = 0, None
        try:
            from triton import knobs  # noqa: PLC0415
        except ImportError:
            return self
        self._knobs, self._prev = knobs.runtime, knobs.runtime.jit_cache_hook
        log = os.environ.get("OUZEL_LOG_COMPILES") == "1"

        def hook(**kw):
            self.n += 1
            if log:
                import logging  # noqa: PLC0415
                logging.getLogger("ouzel.compiles").warning("compile %s %s", kw["fn"].name,
                                                            dict(kw["compile"]["constants"]))
            return self._prev(**kw) if self._prev else None

        self._knobs.jit_cache_hook = hook
        return self

    def __exit__(self, *exc):
        if self._knobs is not None:
            self._knobs.jit_cache_hook = self._prev
        return False


def _gguf():
    return _triton("gguf")


def _attention():
    return _triton("attention")


def _fused():
    return _triton("fused")


def gemv_supports(w) -> bool:
    """Whether the Triton kernels read this QTensor (block type and a K of whole 256-steps)."""
    g = _gguf()
    return g is not None and g.supports(w.bt.name) and w.shape[1] % g.STEP == 0 and w.raw.stride(1) == 1


def _gemv(x2, raw, bt_name: str, shape, xq=None, **moe) -> torch.Tensor:
    """x2 [M <= 16, K] @ W.T: int8 activations where a kernel reads this type, else fp32 x.
    xq: x2 already rounded to int8 (`q8act.quantize_x`'s triple; only where q8 supports the type)."""
    q8 = _q8()
    if q8 is not None and q8.supports(bt_name, 1 if moe else x2.shape[0]):
        fn, configs = q8.qgemv_q8, Q8_TYPE_CONFIGS[bt_name]
        if moe.get("combine") is not None:  # the weighted sum is formed by the one-row kernels only
            configs = tuple(c for c in configs if c.get("m1") or bt_name in q8.ONE_ROW)
        extra = dict(xq=xq) if xq is not None else {}
    else:
        fn, configs, extra = _gguf().qgemv, GEMV_CONFIGS, {}
    return fn(x2, raw, bt_name, shape, **_gemv_config(fn, configs, x2, raw, bt_name, shape, **moe), **moe, **extra)


def _gemv_config(fn, configs, x2, raw, bt_name: str, shape, tag: str = "", **moe) -> dict:
    """The fastest of a few configs for this shape, timed on first use (must not run while a
    CUDA graph is being captured: the first call of every shape happens in an eager warm-up).
    tag: a variant of the kernel with its own configs (its own entry)."""
    key = (fn.__name__, tag, bt_name, *shape, x2.shape[0], x2.dtype, raw.shape[0], len(moe["idx"]) if moe else 0,
           moe.get("combine") is not None)
    cfg = _TUNED.get(key)
    if cfg is None:
        cfg = configs[0]
        if os.environ.get("OUZEL_TRITON_TUNE", "1") != "0":
            best = None
            cold = os.environ.get("OUZEL_TUNE_COLD") != "0"
            calls = cold_variants(raw, shape, moe, _l2_bytes(raw.device)) if cold else [(raw, moe)]
            for c in configs + (COLD_EXTRA.get(bt_name, ()) if cold else ()):
                try:
                    t = _time_config(lambda c=c: [fn(x2, r, bt_name, shape, **c, **m) for r, m in calls])
                except ValueError:  # a tile that does not divide this shape (an explicit K split)
                    continue
                if best is None or t < best:
                    best, cfg = t, c
            # the timings' memory (the cold copies, twice the L2; each `do_bench_cudagraph` on a
            # stream of its own) is handed back. Not the source of qwen3moe's 3.8 GiB reserved over
            # allocated, as once thought: that was weights freed at load (loader._trim_cuda_cache)
            del calls
            torch.cuda.empty_cache()
        _TUNED[key] = cfg
    return cfg


def _time_config(call) -> float:
    """GPU time of `call` (ms, median), timed inside a CUDA graph (GPU time, not Python's launch
    overhead; an eager `do_bench` of a 5 us GEMV times the host, and chose configs that cost
    qwen3moe 14% of its decode speed, session 12)."""
    import triton.testing as tt  # noqa: PLC0415
    return tt.do_bench_cudagraph(call, rep=10, return_mode="median")


def _l2_bytes(device: torch.device) -> int:
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)


def cold_variants(raw: torch.Tensor, shape, moe: dict, l2_bytes: int, most: int = 32) -> list[tuple]:
    """(weights, MoE arguments) for the successive calls of one timing (unless OUZEL_TUNE_COLD=0), so
    that each call reads its weights from memory as a decode step does (its layers' weights, ~1.7
    GB for qwen3moe, pass through the 50 MB L2 once a token), not from L2 as a GEMV timed alone
    again and again: the calls together read over twice the L2. A dense matrix is copied; a MoE
    call takes the next experts (idx + j * len(idx), modulo the experts) of the one stack. Where
    L2 holds the weights, a config that hides its latency may not hide the memory's: tuned this way,
    qwen3moe decodes 461.7 -> 480.6 tok/s on an H100 (session 12; llama8b 368.2 -> 367.1, ds4 634.7 ->
    639.9)."""
    if moe.get("idx") is not None:
        idx = moe["idx"]
        g, n_experts = idx.numel(), raw.shape[0] // shape[0]
        per_call = g * raw[:shape[0]].nbytes
        n = max(1, min(most, n_experts // g, -(-2 * l2_bytes // per_call)))
        return [(raw, dict(moe, idx=(idx + j * g) % n_experts)) for j in range(n)]
    n = max(1, min(most, -(-2 * l2_bytes // raw.nbytes)))
    return [(raw, moe)] + [(raw.clone(), moe) for _ in range(n - 1)]


def qgemv_experts(x: torch.Tensor, w, n_experts: int, idx: torch.Tensor, x_div: int, xq=None) -> torch.Tensor | None:
    """MoE decode: out [G, n] row g = x[g // x_div] @ W_e.T, e = idx[g], w a stacked QTensor
    [E * n, K]; None where no kernel reads the type."""
    if not gemv_supports(w) or x.dtype not in _DTYPES:
        return None
    return _gemv(x.contiguous(), w.raw, w.bt.name, (w.shape[0] // n_experts, w.shape[1]), xq=xq, idx=idx,
                 x_div=x_div)


def gate_up_swiglu(x: torch.Tensor, w, xq=None, limit: float | None = None, n_experts: int = 1, **moe):
    """A Q4_K gate/up GEMV (w's rows [gate; up], or each expert's with n_experts and the MoE
    form's idx / x_div) for one x row that also forms silu(gate) * up's int8 rows for the down
    projection (`q8act.qgemv_q8(swiglu=True)`: no launch of their own): (gate/up output, rows), or
    None where it doesn't apply (OUZEL_NO_SWIGLU_FUSION=1: never)."""
    q8 = _q8()
    if (q8 is None or os.environ.get("OUZEL_NO_SWIGLU_FUSION") or w.bt.name != "Q4_K" or not gemv_supports(w)
            or x.dtype not in _DTYPES or x.dim() != 2 or (not moe and x.shape[0] != 1) or x.shape[1] != w.shape[1]):
        return None
    shape = (w.shape[0] // n_experts, w.shape[1])
    half = shape[0] // 2
    configs = tuple(c for c in Q8_CONFIGS if c.get("m1") and c.get("bn", 8) % 32 == 0 and half % c["bn"] == 0)
    if shape[0] % 2 or not configs:
        return None
    x = x.contiguous()
    cfg = _gemv_config(q8.qgemv_q8, configs, x, w.raw, "Q4_K", shape, tag="swiglu", **moe)
    return q8.qgemv_q8(x, w.raw, "Q4_K", shape, xq=xq, swiglu=True, limit=limit, **cfg, **moe)


def swiglu_linear(gu: torch.Tensor, w, limit: float | None = None, rows=None) -> torch.Tensor | None:
    """down(silu(gate) * up) for one row, gu = [gate | up] [1, 2K] and w the down projection's
    QTensor [N, K]: the activation (limit: `moe.swiglu`'s clamp) and the int8 rounding of its
    result in one launch, then the int8 GEMV. rows: that rounding, made already (`gate_up_swiglu`).
    None where no kernel fits (the caller runs the reference)."""
    q8 = _q8()
    if (q8 is None or gu.dim() != 2 or gu.shape[0] != 1 or gu.dtype not in _DTYPES or gu.stride(1) != 1
            or not gemv_supports(w) or not q8.supports(w.bt.name, 1) or gu.shape[1] != 2 * w.shape[1]
            or gu.device != w.device):
        return None
    k = w.shape[1]
    return _gemv(gu[:, :k], w.raw, w.bt.name, w.shape, xq=rows if rows is not None else q8.quantize_swiglu(gu, limit))


def quantize_rows(x: torch.Tensor):
    """x's int8 rows (`q8act.quantize_x`'s triple) for several decode GEMVs reading x, or None."""
    q8 = _q8()
    if q8 is None or x.dim() != 2 or x.dtype not in _DTYPES or x.shape[1] % q8.QBLOCK or x.stride(1) != 1:
        return None
    return q8.quantize_x(x)


def swiglu_experts(h: torch.Tensor, w, n_experts: int, idx: torch.Tensor, limit: float | None,
                   combine: torch.Tensor | None = None, rows=None) -> torch.Tensor | None:
    """MoE decode: out [G, n] row g = swiglu(h[g]) @ W_e.T (e = idx[g]), h [G, 2K] the pairs'
    gate/up outputs, w the down stack [E * n, K]; the activation and its int8 rounding in one
    launch. combine [G] (one token's routing weights): out [1, n] = their weighted sum of the
    rows, formed by the GEMV itself. rows: the activation's int8 rounding, made already
    (`gate_up_swiglu`). None where no kernel fits."""
    q8 = _q8()
    k = w.shape[1]
    if (q8 is None or h.dim() != 2 or h.dtype not in _DTYPES or h.stride(1) != 1 or not gemv_supports(w)
            or not q8.supports(w.bt.name, 1) or h.shape[1] != 2 * k or h.device != w.device):
        return None
    if combine is not None and os.environ.get("OUZEL_NO_MOE_COMBINE"):
        return None
    extra = {} if combine is None else dict(combine=combine.reshape(-1).float().contiguous())
    xq = rows if rows is not None else q8.quantize_swiglu(h, limit)
    return _gemv(h[:, :k], w.raw, w.bt.name, (w.shape[0] // n_experts, k), xq=xq, idx=idx, x_div=1, **extra)


def ring_write(x: torch.Tensor, positions: torch.Tensor, ring: torch.Tensor) -> bool:
    """`fused.ring_write` (rows into a ring buffer's slots positions % size); False where it can't run."""
    f = _fused()
    if (f is None or not x.is_cuda or x.dim() != 2 or x.dtype not in _DTYPES or ring.dtype not in _DTYPES
            or x.stride(1) != 1 or ring.stride(1) != 1 or positions.dtype not in (torch.int32, torch.int64)):
        return False
    f.ring_write(x, positions, ring)
    return True


def kv_write(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor) -> bool:
    """`fused.kv_write` (k and v into the caches at positions, one launch); False where it can't run."""
    f = _fused()
    if (f is None or not k.is_cuda or k.dtype not in _DTYPES or v.dtype not in _DTYPES or not k[0].is_contiguous()
            or not v[0].is_contiguous() or not k_cache[0].is_contiguous() or not v_cache[0].is_contiguous()
            or positions.dtype not in (torch.int32, torch.int64)):
        return False
    f.kv_write(k, v, positions, k_cache, v_cache)
    return True


def weighted_rows(y: torch.Tensor, w: torch.Tensor, dtype: torch.dtype, rows=None) -> torch.Tensor | None:
    """`fused.weighted_rows` (MoE's weighted sum of each token's expert rows, y's rows picked by
    rows if given), or None."""
    f = _fused()
    if f is None or y.dtype not in _DTYPES or w.dtype not in _DTYPES or y.dim() != 2 or w.dim() != 2:
        return None
    return f.weighted_rows(y.contiguous(), w.contiguous(), dtype, rows)


DENSE_GEMV_MAX_N = 8192  # bigger dense weights (an HF model's own projections) stay with cuBLAS


def dense_gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """`fused.dense_gemv` (one row times a small dense weight, read in its own dtype), or None."""
    f = _fused()
    if (f is None or x.dtype not in _DTYPES or w.dtype not in _DTYPES or w.shape[0] > DENSE_GEMV_MAX_N
            or w.stride(1) != 1 or x.stride(-1) != 1 or x.shape[-1] != w.shape[1] or x.device != w.device):
        return None
    return f.dense_gemv(x, w)


def swiglu(gu: torch.Tensor, limit: float | None, dtype: torch.dtype) -> torch.Tensor | None:
    """`fused.swiglu` (silu(gate) * up of [gate | up] rows in one launch), or None."""
    f = _fused()
    if f is None or gu.dim() != 2 or gu.dtype not in _DTYPES or gu.stride(1) != 1 or gu.shape[1] % 2:
        return None
    return f.swiglu(gu, limit, dtype)


def embedding_rows(ids: torch.Tensor, w) -> torch.Tensor | None:
    """Rows ids of a QTensor, float32, through the Triton dequantizer (exact: two launches where the
    torch dequantizer takes ~25 small ones); None where no kernel reads the type."""
    if not gemv_supports(w) or ids.dim() != 1:
        return None
    return _gguf().qdequant(w.raw.index_select(0, ids), w.bt.name, (ids.shape[0], w.shape[1]), torch.float32)


def prefill_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the CUDA prefill matmuls: bf16 (OUZEL_CUDA_PREFILL_DTYPE=f32: x's own)."""
    return x_dtype if os.environ.get("OUZEL_CUDA_PREFILL_DTYPE", "bf16") in ("f32", "fp32") else torch.bfloat16


def dequantize_for_matmul(w, x_dtype: torch.dtype) -> torch.Tensor | None:
    """The dense [N, K] matrix of a CUDA QTensor in the prefill matmul dtype, or None (no kernel)."""
    if not gemv_supports(w):
        return None
    return _gguf().qdequant(w.raw, w.bt.name, w.shape, prefill_dtype(x_dtype))


def qlinear(x: torch.Tensor, w, xq=None) -> torch.Tensor | None:
    """y = x @ w.T for a CUDA QTensor w, or None where no kernel applies. xq: x's int8 rows made
    beforehand (`rms_norm(q8=True)`), used where the GEMV reads int8 activations."""
    if not gemv_supports(w) or x.dtype not in _DTYPES or x.device != w.device or x.shape[-1] != w.shape[1]:
        return None
    g = _gguf()
    n, k = w.shape
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return None
    if m <= g.MAX_GEMV_M:
        out = _gemv(x2, w.raw, w.bt.name, w.shape, xq=xq)
    elif w.bt.name == "Q8_0_R8" and (cfg := _q8_gemm_config(x2, w)) is not None:
        out = g.q8_gemm(x2, w.raw, w.shape, prefill_dtype(x.dtype), **cfg)
    else:
        out = _dequant_matmul(x2, w.raw, w.bt.name, w.shape)
    return out.reshape(*x.shape[:-1], n)


def _dequant_matmul(x2: torch.Tensor, raw: torch.Tensor, bt_name: str, shape) -> torch.Tensor:
    """x2 @ W.T through the dense weight: `qdequant` in the prefill dtype, cuBLAS, x2's dtype out."""
    cd = prefill_dtype(x2.dtype)
    return torch.matmul(x2.to(cd), _gguf().qdequant(raw, bt_name, shape, cd).t()).to(x2.dtype)


# tiles of `gguf.q8_gemm` tried per shape against dequantize + cuBLAS. H100, ds4 at 512 rows (session 13):
# 128 x 128 on 8 warps for V4's grouped o_a (8 x [1024, 4096]), cuBLAS for its other Q8_0 shapes; pp512
# 10083 -> 11436 tok/s in one call
Q8_GEMM_CONFIGS = (dict(bm=64, bn=64, num_warps=4), dict(bm=128, bn=128, num_warps=8),
                   dict(bm=128, bn=64, num_warps=4), dict(bm=64, bn=128, num_warps=4))
Q8_GEMM_SLACK = 1.25  # q8_gemm is kept up to this much slower on the GPU: it saves 3 launches of host time
_Q8_TUNED: dict = {}


def _q8_gemm_config(x2: torch.Tensor, w, groups: int = 1) -> dict | None:
    """The tile of `gguf.q8_gemm` for a prefill matmul of this shape (rows to a power of two), or
    None: dequantize + cuBLAS. Timed on first use (GPU time, as `_gemv_config`), the one-launch
    GEMM kept unless cuBLAS beats it by Q8_GEMM_SLACK: an eager chunk (DeepSeek V4's) is paced by
    its host, and the cuBLAS path costs 4 launches where q8_gemm costs 1. OUZEL_NO_Q8_GEMM=1:
    always cuBLAS; OUZEL_TRITON_TUNE=0: the first tile untimed."""
    if os.environ.get("OUZEL_NO_Q8_GEMM"):
        return None
    rows = min(1 << (x2.shape[0] - 1).bit_length(), 8192)
    key = (*w.shape, groups, rows, x2.dtype)
    if key not in _Q8_TUNED:
        cfg = Q8_GEMM_CONFIGS[0]
        if os.environ.get("OUZEL_TRITON_TUNE", "1") != "0":
            g, cd = _gguf(), prefill_dtype(x2.dtype)
            n, k = w.shape[0] // groups, w.shape[1]
            xs = torch.randn((rows, x2.shape[1]), dtype=x2.dtype, device=x2.device)
            times = {}
            for i, c in enumerate(Q8_GEMM_CONFIGS):
                times[i] = _time_config(lambda c=c: g.q8_gemm(xs, w.raw, (n, k), cd, groups=groups, **c))
            best = min(times, key=times.get)
            cfg = Q8_GEMM_CONFIGS[best]
            t_blas = _time_config(lambda: [_dequant_matmul(xs[:, j * k:(j + 1) * k], w.raw[j * n:(j + 1) * n],
                                                           w.bt.name, (n, k)) for j in range(groups)])
            if t_blas * Q8_GEMM_SLACK < times[best]:
                cfg = None
            log.info("q8_gemm %s x %s x %d groups, %d rows: %s (tiles %s us, cuBLAS %.1f us)", n, k, groups, rows,
                     cfg, [round(t * 1e3, 1) for t in times.values()], t_blas * 1e3)
            del xs
            torch.cuda.empty_cache()
        _Q8_TUNED[key] = cfg
    return _Q8_TUNED[key]


def grouped_qlinear(x: torch.Tensor, w, groups: int) -> torch.Tensor | None:
    """A block-diagonal projection for many rows (a prefill): x [T, groups, K] -> [T, groups * N]
    with group g's rows of w [groups * N, K] (Q8_0_R8), in one launch (`gguf.q8_gemm`); None where
    that kernel does not apply."""
    if (not gemv_supports(w) or w.bt.name != "Q8_0_R8" or x.dim() != 3 or x.shape[1] != groups
            or x.dtype not in _DTYPES or x.device != w.device or w.shape[0] % groups or x.shape[2] != w.shape[1]):
        return None
    x2 = x.reshape(x.shape[0], -1)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    cfg = _q8_gemm_config(x2, w, groups)
    if cfg is None:
        return None
    return _gguf().q8_gemm(x2, w.raw, (w.shape[0] // groups, w.shape[1]), prefill_dtype(x.dtype), groups=groups, **cfg)


def decode_attention(q, k_cache, v_cache, lengths, window, scale, new_kv=None, rope=None, q8: bool = False):
    """The Triton flash-decoding kernel (`kernels/triton/attention.py`), or None where it can't run.
    new_kv = (k, v): the new token's rows, stored by the kernel; lengths are then the positions.
    rope (`layers.rope.QKRope`, with new_kv): q and k unrotated, rotated by the kernel (None where
    it can't). q8: returns (out, int8 rows of out or None)."""
    a = _attention()
    if a is None or k_cache.stride(-1) != 1:
        return None
    if new_kv is not None:
        k, v = new_kv
        if k.dtype not in _DTYPES or v.dtype not in _DTYPES or k.stride(-1) != 1 or v.stride(-1) != 1:
            return None
    D = q.shape[-1]
    rope_args = None
    if (rope is not None or q8) and os.environ.get("OUZEL_NO_ATTENTION_FUSION"):
        if rope is not None:
            return None
        out = a.decode_attention(q, k_cache, v_cache, lengths, scale, window=window, new_kv=new_kv)
        return out, None
    if rope is not None:
        rope_args = rope.kernel_args(q.device) if new_kv is not None and q.stride(-1) == 1 else None
        norm = rope_args[2] if rope_args is not None else None
        if rope_args is None or (norm is not None and (norm[0].device != q.device or norm[0].dtype not in _DTYPES
                                                       or norm[1].dtype not in _DTYPES)):
            return None
    kernel_q8 = q8 and D % 32 == 0 and D & (D - 1) == 0 and _q8() is not None
    out = a.decode_attention(q, k_cache, v_cache, lengths, scale, window=window, new_kv=new_kv, rope=rope_args,
                             q8=kernel_q8)
    if q8 and not kernel_q8:
        return out, None
    return out


def prefill_attention_supports(q: torch.Tensor, cache_dtype: torch.dtype) -> bool:
    """Whether `prefill_attention` runs for these queries on a cache of this dtype."""
    return (_attention() is not None and q.is_cuda and q.dtype in _DTYPES and q.shape[-1] <= 256
            and cache_dtype in (torch.float16, torch.bfloat16))


def prefill_attention(q, k_cache, v_cache, positions, window, scale) -> torch.Tensor:
    """A prefill chunk's causal attention over its cached keys, the key ranges read from `positions`
    on the device (`attention.prefill_attention`); check `prefill_attention_supports` first."""
    return _attention().prefill_attention(q, k_cache, v_cache, positions, scale, window=window)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False,
             residual: torch.Tensor | None = None, q8: bool = False):
    """`fused.rms_norm` (one launch), or None where it can't run (the caller runs the reference).
    q8: with the output's int8 rows for the decode GEMVs appended (None where they can't be made)."""
    f = _fused()
    if (f is None or x.dtype not in _DTYPES or weight.dtype not in _DTYPES or weight.device != x.device
            or x.shape[-1] > f.MAX_D or (residual is not None and residual.dtype not in _DTYPES)
            or (q8 and (x.shape[-1] % 256 or _q8() is None))):
        return None
    return f.rms_norm(x, weight, eps, unit_offset, residual, q8=q8)


def rope_qk(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, rot_dim: int,
            norms=None):
    """`fused.rope_qk` (q and k in one launch; norms = (q_norm, k_norm) RMSNorms applied first, in
    the same launch), or None where it can't run."""
    f = _fused()
    if (f is None or q.dtype not in _DTYPES or k.dtype != q.dtype or q.stride(-1) != 1 or k.stride(-1) != 1
            or positions.dtype not in (torch.int32, torch.int64) or positions.device != q.device):
        return None
    norm = None
    if norms is not None:
        qn, kn = norms
        if (qn.eps != kn.eps or qn.unit_offset != kn.unit_offset or qn.weight.device != q.device
                or kn.weight.device != q.device or qn.weight.dtype not in _DTYPES or kn.weight.dtype not in _DTYPES):
            return None
        norm = (qn.weight, kn.weight, qn.eps, qn.unit_offset)
    return f.rope_qk(q, k, positions, inv_freq, rot_dim, norm)


# MoE prefill GEMM tiles (`gguf.qgemm_experts`) per block type: the decode of every expert's blocks,
# not the tensor cores, bounds it, so tiles are as few pairs as a prefill gives each expert (BM 16
# fits ~12 of ds4's 512 x 6 / 256) and the decoded [BN, 256] step is the MMA's M side.
# bench/moe_gemm_bench.py times the candidates and prints this table's entries.
MOE_GEMM_CONFIGS = {  # H100, 512-token prefill, bench/moe_gemm_bench.py (bench/NOTES.md)
    # ds4 gate/up: 3.06 ms in halves (126 registers: 4 programs an SM) against 3.68 whole (254: 2 an SM);
    # pp512 8290 against 7755 in the same call (session 11). Formed in bf16 by byte permutation
    # (`gguf._iq2_bf16`, ~700 instructions a 256-step against ~1200): 2.29 ms, pp512 10286 against 9081
    # (session 13)
    "IQ2_XXS": dict(bm=32, bn=64, num_warps=4, stages=1, quads=True, halves=2, prmt=True),
    # ds4 down: 1.31 ms; formed in bf16 by byte permutation (`gguf._q2k_bf16`) 0.95-0.96 ms at bm 32 against
    # 1.29 for the float decode at bm 16, 2 stages (its best; session 13)
    "Q2_K": dict(bm=32, bn=64, num_warps=4, stages=1, quads=True, prmt=True),
    "Q4_K": dict(bm=64, bn=64, num_warps=4, stages=1, quads=False),  # qwen3 gate/up: 0.36 ms
    "Q6_K": dict(bm=64, bn=128, num_warps=8, stages=1, quads=True)}  # qwen3 down: 0.31 ms
for _name in ("IQ2_XXS", "Q2_K", "Q6_K"):  # the regrouped layouts: same bytes, same tiles (untimed)
    MOE_GEMM_CONFIGS[_name + "_R8"] = MOE_GEMM_CONFIGS[_name]
# (IQ2_XXS_R8 at bm 16: 3.50 ms against 3.68 at bm 32 in moe_gemm_bench, but ds4 pp512 7239 against
# 7852-7981 end to end; H100, session 9)
MOE_GEMM_CONFIGS["Q6_K_R3"] = MOE_GEMM_CONFIGS["Q6_K"]  # same values, 10 bytes of padding per 3 blocks (untimed)
MOE_GEMM_DEFAULT = dict(bn=64, num_warps=4)


def moe_gemm(x: torch.Tensor, w, n_experts: int, pair_rows: torch.Tensor, counts, swiglu: bool = False,
             limit: float | None = None) -> torch.Tensor | None:
    """MoE prefill: out [P, n] row p = x[pair_rows[p]] @ W_e.T for pairs sorted by expert (counts[e]
    each), w a stacked QTensor [E * n, K]; the blocks are decoded inside the matmul tiles. None where
    no kernel reads the type. Tile rows: 16, or 32 / 64 where the experts average more pairs (each
    tile decodes its expert's blocks again). swiglu (w the [gate; up] stack): silu(gate) * up
    [P, n / 2] (clamped at limit as `moe.swiglu`) in the prefill dtype, formed in the GEMM (None
    with OUZEL_NO_MOE_SWIGLU=1: the caller writes [gate | up] and runs the swiglu launch)."""
    if not gemv_supports(w) or x.dtype not in _DTYPES or (swiglu and os.environ.get("OUZEL_NO_MOE_SWIGLU")):
        return None
    g, dot = _gguf(), prefill_dtype(x.dtype)
    mean = len(pair_rows) / n_experts  # counts may live on the device: no host read for the tile size
    cfg = dict(MOE_GEMM_CONFIGS.get(w.bt.name, MOE_GEMM_DEFAULT))
    if "halves" in cfg and os.environ.get("OUZEL_IQ2_HALVES"):  # A/B switch: 1, 2 or 4 parts a step,
        cfg["halves"] = int(os.environ["OUZEL_IQ2_HALVES"])  # 254 / 126 / 82 registers (bench/sass.py)
    if os.environ.get("OUZEL_PRMT") in ("0", "1"):  # A/B: bf16 by byte permutation (0: `_quads` floats)
        cfg["prmt"] = os.environ["OUZEL_PRMT"] == "1"
    bm = cfg.pop("bm", 16 if mean <= 24 else 32 if mean <= 48 else 64)
    bm = 64 if mean > 48 else bm  # long prefills: every tile decodes its expert's blocks again
    return g.qgemm_experts(x.contiguous(), w.raw, w.bt.name, (w.shape[0] // n_experts, w.shape[1]), pair_rows,
                           g.moe_tiles(counts, bm, x.device, len(pair_rows)), bm=bm, dot_dtype=dot, swiglu=swiglu,
                           limit=limit, **cfg)


def qgemv_pair(x: torch.Tensor, wa, wb, xq=None) -> torch.Tensor | None:
    """[x @ wa.T | x @ wb.T] for one CUDA row x in one launch (`q8act.qgemv_q8_pair`: wa Q4_K, wb
    Q6_K_R8 / Q6_K_R3, as Q4_K_M's q/k and v), or None where that kernel doesn't apply."""
    q8 = _q8()
    if (q8 is None or os.environ.get("OUZEL_NO_PAIR_GEMV") or x.dim() != 2 or x.shape[0] != 1
            or x.dtype not in _DTYPES or wa.bt.name != "Q4_K" or wb.bt.name not in ("Q6_K_R8", "Q6_K_R3")
            or wa.shape[1] != wb.shape[1] or x.shape[1] != wa.shape[1] or not (gemv_supports(wa) and gemv_supports(wb))
            or wa.raw.stride(0) % 16 or wb.raw.stride(0) % 16 or wa.raw.data_ptr() % 16 or wb.raw.data_ptr() % 16):
        return None
    x = x.contiguous()
    ca = _gemv_config(q8.qgemv_q8, Q8_TYPE_CONFIGS["Q4_K"], x, wa.raw, "Q4_K", wa.shape)
    cb = _gemv_config(q8.qgemv_q8, Q8_TYPE_CONFIGS[wb.bt.name], x, wb.raw, wb.bt.name, wb.shape)
    return q8.qgemv_q8_pair(x, (wa.raw, wa.shape, ca), (wb.raw, wb.bt.name, wb.shape, cb), xq=xq)


def paged_decode_attention(q, k_pool, v_pool, block_table, lengths, block_size: int, window, scale, out=None):
    """One new token of each of B sequences against a paged pool in one launch
    (`attention.paged_decode_attention`), or None where it can't run."""
    a = _attention()
    if (a is None or q.dtype not in _DTYPES or k_pool.dtype not in _DTYPES or k_pool.stride(-1) != 1
            or v_pool.stride(-1) != 1):
        return None
    return a.paged_decode_attention(q, k_pool, v_pool, block_table, lengths, block_size, scale,
                                    window=window, out=out)


def route(logits: torch.Tensor, k: int, scoring: str, scaling: float = 1.0, bias: torch.Tensor | None = None,
          renorm: bool = True, eps: float = 1e-20, table: torch.Tensor | None = None, ids: torch.Tensor | None = None):
    """`router.route` (scores, top-k or the hash table's experts, renormalised weights in one
    launch), or None where it can't run (other scorings, too many experts)."""
    r = _triton("router")
    if (r is None or scoring not in r.SCORES or logits.dim() != 2 or logits.shape[1] > r.MAX_E
            or logits.dtype not in _DTYPES or any(t is not None and t.device != logits.device for t in (bias, table, ids))):
        return None
    if table is not None and (ids is None or table.dtype not in (torch.int32, torch.int64) or not table.is_contiguous()):
        return None
    return r.route(logits.contiguous(), k, scaling, scoring, bias, renorm, eps, table, ids)


def route_linear(x: torch.Tensor, weight, k: int, scoring: str, scaling: float = 1.0,
                 bias: torch.Tensor | None = None, renorm: bool = True, eps: float = 1e-20,
                 table: torch.Tensor | None = None, ids: torch.Tensor | None = None):
    """`router.route_linear` (one token's router GEMV and routing in one launch), or None where it
    can't run (OUZEL_NO_FUSED_ROUTER=1: the GEMV and `route` as two launches)."""
    r = _triton("router")
    weight = _router_weight(r, x, weight, scoring) if not os.environ.get("OUZEL_NO_FUSED_ROUTER") else None
    if weight is None or any(t is not None and t.device != x.device for t in (bias, table, ids)):
        return None
    if table is not None and (ids is None or table.dtype not in (torch.int32, torch.int64) or not table.is_contiguous()):
        return None
    return r.route_linear(x.contiguous(), weight, k, scaling, scoring, bias, renorm, eps, table, ids)


def _router_weight(r, x: torch.Tensor, weight, scoring: str) -> torch.Tensor | None:
    """The dense router weight [E, D] that `router.route_linear` (module r) reads for one CUDA row x,
    or None where it can't: a GGUF F32/F16/BF16 weight is the dense tensor it holds."""
    if r is None:
        return None
    if not isinstance(weight, torch.Tensor):
        weight = weight.float_view() if hasattr(weight, "float_view") and weight.raw.is_cuda else None
    if (weight is None or not x.is_cuda or scoring not in r.SCORES or x.dim() != 2 or x.shape[0] != 1
            or weight.dim() != 2 or weight.shape[0] > r.MAX_E or x.shape[1] != weight.shape[1]
            or weight.stride(1) != 1 or weight.dtype not in _DTYPES or x.dtype not in _DTYPES
            or weight.device != x.device):
        return None
    return weight


def route_norm_linear(x: torch.Tensor, residual: torch.Tensor, norm_w: torch.Tensor, norm_eps: float,
                      unit_offset: bool, weight, k: int, scoring: str, scaling: float = 1.0, renorm: bool = True,
                      eps: float = 1e-20):
    """One token's RMSNorm of x + residual (with its int8 rows) and `route_linear` of it in one launch
    (`router.route_norm_linear`): ((weights, experts), (norm, stream, int8 rows)), or None where it
    can't run (OUZEL_NORM_ROUTER=0: never). One launch a MoE layer fewer: qwen3moe tg128 444.6 -> 458.9 on
    an H100 (session 12)."""
    if os.environ.get("OUZEL_NORM_ROUTER") == "0" or not x.is_cuda:
        return None
    r = _triton("router")
    weight = _router_weight(r, x, weight, scoring)
    if (weight is None or residual.shape != x.shape or x.shape[1] % 32 or norm_w is None
            or norm_w.shape != (x.shape[1],)
            or any(t.dtype not in _DTYPES or t.device != x.device for t in (residual, norm_w))):
        return None
    return r.route_norm_linear(x.contiguous(), residual.contiguous(), norm_w, norm_eps, weight, k, scaling, scoring,
                               None, renorm, eps, unit_offset=unit_offset)


# ---- DeepSeek V4 decode-step groups (`triton/v4.py`); each None where it can't run

def _v4(*tensors) -> object | None:
    v = _triton("v4")
    if v is None or any(t.dtype not in _DTYPES or t.device != tensors[0].device for t in tensors):
        return None
    return v


def v4_compress_step(kv_ring, gate_ring, kv_x, gate_x, positions, bias, rows, norm_w, eps, inv_freq, rope_scale,
                     ratio: int, overlap: bool) -> bool:
    """`v4.compress_step` (rings and row buffer updated in place); False where it can't run."""
    v = _v4(kv_ring, gate_ring, kv_x, gate_x, bias, rows, norm_w, inv_freq)
    if v is None or rows.shape[1] // 2 > 2048 or not (kv_ring.is_contiguous() and gate_ring.is_contiguous()
                                                       and rows.is_contiguous()):
        return False
    v.compress_step(kv_ring, gate_ring, kv_x, gate_x, positions, bias.float(), rows, norm_w, eps,
                    inv_freq.float(), rope_scale, ratio, overlap)
    return True


def v4_compress_chunk(kv, gate, prior, bias, ratio: int, overlap: bool, dim: int):
    """`v4.compress_chunk` (a prefill's compressor pool in one launch), or None."""
    v = _v4(kv, gate, bias, *(prior or ()))
    if v is None or dim > 4096:
        return None
    return v.compress_chunk(kv, gate, prior, bias.float(), ratio, overlap, dim)


def v4_rms_rope(x, positions, inv_freq, rope_scale: float = 1.0, sign: float = 1.0, norm: str | None = None,
                weight=None, eps: float = 0.0):
    """`v4.rms_rope` (optional RMSNorm, then interleaved rope on the trailing channels)."""
    v = _v4(x, *(t for t in (inv_freq, weight) if t is not None))
    if v is None or x.shape[-1] > 4096 or x.stride(-1) != 1:
        return None
    return v.rms_rope(x, positions, inv_freq, rope_scale, sign, norm, weight, eps)


def v4_hc_pre(mixes, streams, base, scale, norm_w, iters: int, hc_eps: float, rms_eps: float, norm_eps: float):
    """`v4.hc_pre` (mHC rms + mix + collapse + the block's input norm), or None."""
    v = _v4(mixes, streams, base, scale, norm_w)
    if v is None or streams.shape[1] > 16:
        return None
    return v.hc_pre(mixes, streams, base, scale, norm_w, iters, hc_eps, rms_eps, norm_eps)


def v4_hc_merge(streams, out, post, comb):
    """`v4.hc_merge` (mHC residual update), or None."""
    v = _v4(streams, out, post, comb)
    if v is None or streams.shape[1] > 16:
        return None
    return v.hc_merge(streams, out, post, comb)


def v4_index_scores(q, w, rows, positions, ratio: int, scale: float):
    """`v4.index_scores` (one query's indexer scores over the compressed rows, unreadable ones
    -inf), or None."""
    v = _v4(q, w, rows)
    D = q.shape[-1]
    if v is None or q.dim() != 2 or D & (D - 1) or not 16 <= D <= 256 or not rows.is_contiguous():
        return None
    return v.index_scores(q, w, rows, positions, ratio, scale)


def v4_attention_chunk(q, keys, positions, window: int, sinks, scale: float, rows=None, ratio: int = 0, top=None):
    """`v4.attention_chunk` (a prefill chunk's window + compressed-row attention with sinks, each
    query reading only its own keys), or None (OUZEL_NO_V4_CHUNK_ATTENTION=1: the torch code)."""
    v = _v4(q, keys, sinks, *(t for t in (rows,) if t is not None))
    if (v is None or os.environ.get("OUZEL_NO_V4_CHUNK_ATTENTION") or q.shape[-1] > 1024
            or (rows is not None and rows.dtype != keys.dtype)
            or (top is not None and (top.dtype not in (torch.int32, torch.int64) or top.device != q.device))):
        return None
    return v.attention_chunk(q, keys, positions, window, sinks.float(), scale, rows, ratio, top)


def v4_attention_step(q, ring, positions, window: int, sinks, scale: float, rows=None, ratio: int = 0, top=None):
    """`v4.attention_step` (the fixed step's window + compressed-row attention with sinks), or None."""
    v = _v4(q, ring, sinks, *(t for t in (rows,) if t is not None))
    if (v is None or q.shape[0] != 1 or q.shape[-1] > 1024 or not ring.is_contiguous()
            or (rows is not None and (not rows.is_contiguous() or rows.dtype != ring.dtype))
            or (top is not None and (top.dtype not in (torch.int32, torch.int64) or top.device != q.device))):
        return None
    return v.attention_step(q, ring, positions, window, sinks.float(), scale, rows, ratio, top)
