"""CUDA fast paths: Triton kernels that read GGUF blocks directly (`kernels/triton/gguf.py`).

`qlinear` returns None when no kernel fits (other block types, no Triton, odd layouts), and
`ops.linear` then runs the torch reference. Environment switches (for A/B runs):
  OUZEL_NO_TRITON=1              never use the Triton kernels
  OUZEL_CUDA_PREFILL_DTYPE=bf16  large-M matmuls in bf16 on the tensor cores (default: x's dtype)
  OUZEL_TRITON_TUNE=0            use the default GEMV config instead of timing a few on first use
"""
from __future__ import annotations

import os

import torch

_MOD: list = []
_TUNED: dict = {}  # (type, n, k, m, dtype) -> qgemv kwargs
# A handful of tile shapes; the split of K is derived so that the grid fills the chip.
GEMV_CONFIGS = (dict(bn=16, u=2), dict(bn=4, u=2), dict(bn=8, u=2), dict(bn=16, u=1),
                dict(bn=32, u=2), dict(bn=32, u=2, num_warps=8))
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _gguf():
    """The Triton module, or None where it can't be used."""
    if not _MOD:
        mod = None
        if not os.environ.get("OUZEL_NO_TRITON") and torch.cuda.is_available():
            try:
                from .triton import gguf as mod  # noqa: PLC0415 (needs triton)
            except ImportError:
                mod = None
        _MOD.append(mod)
    return _MOD[0]


def _gemv_config(g, x2, w) -> dict:
    key = (w.bt.name, *w.shape, x2.shape[0], x2.dtype)
    cfg = _TUNED.get(key)
    if cfg is None:
        cfg = GEMV_CONFIGS[0]
        if os.environ.get("OUZEL_TRITON_TUNE", "1") != "0":
            from triton.testing import do_bench  # noqa: PLC0415
            best = None
            for c in GEMV_CONFIGS:
                t = do_bench(lambda c=c: g.qgemv(x2, w.raw, w.bt.name, w.shape, **c), warmup=2, rep=10,
                             return_mode="median")
                if best is None or t < best:
                    best, cfg = t, c
        _TUNED[key] = cfg
    return cfg


def qlinear(x: torch.Tensor, w) -> torch.Tensor | None:
    """y = x @ w.T for a CUDA QTensor w, or None where no kernel applies."""
    g = _gguf()
    if g is None or not g.supports(w.bt.name) or x.dtype not in _DTYPES or x.device != w.device:
        return None
    n, k = w.shape
    if k % g.STEP or w.raw.stride(1) != 1 or x.shape[-1] != k:
        return None
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return None
    if m <= g.MAX_GEMV_M:
        out = g.qgemv(x2, w.raw, w.bt.name, w.shape, **_gemv_config(g, x2, w))
    else:
        cd = torch.bfloat16 if os.environ.get("OUZEL_CUDA_PREFILL_DTYPE") == "bf16" else x.dtype
        wd = g.qdequant(w.raw, w.bt.name, w.shape, cd)
        out = torch.matmul(x2.to(cd), wd.t()).to(x.dtype)
    return out.reshape(*x.shape[:-1], n)
