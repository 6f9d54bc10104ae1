"""The operations layers call, dispatched on (device, weight format).

Each op has a pure-torch reference that runs anywhere and is the oracle in tests; a faster
implementation is used when one is registered for the device and the weight's block type.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant.tensor import QTensor, Weight


def linear_reference(x: torch.Tensor, w: Weight) -> torch.Tensor:
    if isinstance(w, QTensor):
        w = w.dequantize()
    return F.linear(x, w.to(x.dtype))


_CPU = []


def _cpu_kernels():
    """The compiled CPU kernels, or None where they can't be built (the reference runs then)."""
    if not _CPU:
        try:
            from . import cpu
            _CPU.append(cpu if cpu.available() else None)
        except ImportError:
            _CPU.append(None)
    return _CPU[0]


def linear(x: torch.Tensor, w: Weight, xq=None) -> torch.Tensor:
    """y = x @ w.T for x [..., in] and w [out, in] dense or in GGUF blocks. xq: x's int8 rows for
    the CUDA decode GEMVs, made with x (`RMSNorm.prepare`); ignored elsewhere."""
    if not isinstance(w, (torch.Tensor, QTensor)):  # other stored formats (HF FP8/FP4 blocks): per use
        return F.linear(x, w.dequantize().to(x.dtype))
    if isinstance(w, QTensor) and w.raw.is_cuda and w.float_view() is not None:
        w = w.float_view()  # a 16-bit GGUF weight is a dense one (the one-row kernel reads it as stored)
    if not isinstance(w, QTensor):
        if x.is_cuda and w.is_cuda and x.dim() == 2 and x.shape[0] == 1 and w.dim() == 2:
            from .cuda import dense_gemv  # noqa: PLC0415
            out = dense_gemv(x, w)
            if out is not None:
                return out
        if x.is_cuda and x.dtype == torch.float32 and w.dtype in (torch.float16, torch.bfloat16):
            from .cuda import prefill_dtype  # noqa: PLC0415
            cd = prefill_dtype(x.dtype)  # tensor cores, as the quantized weights' prefill matmuls
            if cd != x.dtype:  # (fp32 SGEMMs of V4's 16-bit compressor weights: ~4 ms of a 512 prefill)
                return F.linear(x.to(cd), w.to(cd)).to(x.dtype)
        return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype))
    if w.device.type == "cpu" and x.dtype == torch.float32:
        call = cpu_linear_call(w)
        if call is not None:
            return call(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], w.shape[0])
    if w.device.type == "cuda":
        from .cuda import qlinear  # noqa: PLC0415 (only on CUDA machines)
        out = qlinear(x, w, xq)
        if out is not None:
            return out
    return linear_reference(x, w)


def cpu_linear_call(w: Weight):
    """f with f(x) = `linear`(x, w) for 2-D float32 CPU x, the checks done once here, where the
    CPU kernels read w; else None."""
    if not isinstance(w, QTensor) or w.device.type != "cpu":
        return None
    cpu = _cpu_kernels()
    if cpu is None or not cpu.supports(w.bt):
        return None
    raw, bt, n = w.raw, w.bt, w.shape[0]
    return lambda x: cpu.qmatmul(x.contiguous(), raw, bt, n)


def cpu_multi_call(ws: list[Weight]):
    """f with f(x) = [x @ w_0.T | x @ w_1.T | ...] in one call of the CPU kernels, for 2-D float32
    CPU x of 1 to `MULTI_MAX_M` rows (a decode step's q/k/v or gate/up), the checks done once here;
    None where the kernels don't read every weight (the caller runs the products one by one)."""
    if not all(isinstance(w, QTensor) and w.device.type == "cpu" for w in ws):
        return None
    cpu = _cpu_kernels()
    if cpu is None or not all(cpu.supports(w.bt) for w in ws):
        return None
    parts, limit = [(w.raw, w.bt) for w in ws], cpu.MULTI_MAX_M
    return lambda x: cpu.qmatmul_multi(x.contiguous(), parts) if 1 <= x.shape[0] <= limit else None


def linear_pair(x: torch.Tensor, wa: Weight, wb: Weight, xq=None) -> torch.Tensor | None:
    """[x @ wa.T | x @ wb.T] in one launch where a kernel reads the pair (one CUDA row; Q4_K_M's
    q/k with its Q6_K v), else None: the caller runs the two products."""
    if isinstance(wa, QTensor) and isinstance(wb, QTensor) and wa.raw.is_cuda and wb.raw.is_cuda and x.is_cuda:
        from .cuda import qgemv_pair  # noqa: PLC0415
        return qgemv_pair(x, wa, wb, xq)
    return None


def embedding(ids: torch.Tensor, w: Weight) -> torch.Tensor:
    """Rows of w for the given ids, float32 [len(ids), dim]; dequantizes only those rows."""
    if not isinstance(w, QTensor):
        return F.embedding(ids, w).float()
    if w.device.type == "cpu":
        cpu = _cpu_kernels()
        if cpu is not None and cpu.supports(w.bt):
            return cpu.embedding(w.raw, w.bt, ids)
    if w.device.type == "cuda":
        from .cuda import embedding_rows  # noqa: PLC0415
        out = embedding_rows(ids, w)
        if out is not None:
            return out
    return w.dequantize(ids)


def linear_experts(x: torch.Tensor, w: QTensor, n_experts: int, idx: torch.Tensor, x_div: int,
                   xq=None) -> torch.Tensor | None:
    """MoE decode over (token, expert) pairs, expert ids read on the device: out [G, n] row g =
    x[g // x_div] @ W_e.T with e = idx[g], w a stacked QTensor [E * n, K]. On CUDA the Triton
    kernel (None where none reads the type); elsewhere the reference: the pairs' rows dequantized."""
    if w.raw.is_cuda:
        from .cuda import qgemv_experts  # noqa: PLC0415
        return qgemv_experts(x, w, n_experts, idx, x_div, xq)
    n, G = w.shape[0] // n_experts, idx.shape[0]
    rows = (idx[:, None] * n + torch.arange(n, device=idx.device)).reshape(-1)
    wg = w.dequantize(rows).view(G, n, -1)  # [G, n, K]
    xg = x[torch.arange(G, device=x.device) // x_div].float()  # [G, K]
    return torch.bmm(wg, xg[:, :, None])[..., 0]


def dequantize_stacked(w: Weight, like: torch.Tensor) -> torch.Tensor | None:
    """All of w [rows, in] dense, for a batched matmul with `like`: on CUDA through the Triton
    dequantizer into the prefill dtype (None where no kernel reads the type), elsewhere the exact
    torch dequantizer in like's dtype."""
    if not isinstance(w, QTensor):
        return w.to(like.dtype)
    if w.raw.is_cuda:
        from .cuda import dequantize_for_matmul  # noqa: PLC0415
        return dequantize_for_matmul(w, like.dtype)
    return w.dequantize().to(like.dtype)
