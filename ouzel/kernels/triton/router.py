"""MoE routing of a decode step in one launch: the router's scores, top-k and the chosen weights'
renormalisation (torch launches ~7 kernels for it; per MoE layer of every token).

Reference: `qwen3_moe.SoftmaxTopKRouter.forward` after its logits matmul and `moe.Router.forward`
(DeepSeek V3/V4): scores = softmax(logits), sigmoid or sqrt(softplus), idx = top-k of scores
(+ bias) or, for hash routing, the token's row of a frozen table, w = scores[idx] (/ (sum + eps)
if renormalised) * scaling. softplus(x) = max(x, 0) + log1p(exp(-|x|)), log1p(y) as
log(u) * y / (u - 1) with u = 1 + y (exact to a few ulp where log(1 + y) loses y's low bits).

Program per token row (one warp up to 512 experts: every reduction a warp shuffle, no barrier;
Qwen3's route took 4.8 us on 4 warps on an H100): the E logits in registers (E <= 1024), scores
in fp32, then K rounds of max / lowest index at the max / mask it out (torch.topk's set of experts; the order of the K may
differ, which only reorders the pairs the experts' sum runs over).

`route_linear` also does the router's GEMV for one token in the same launch: the weight's rows and
K split over ~128 programs, the last of which (a counter it re-arms) adds the slices and routes.
`route_norm_linear` also does the RMSNorm before the router (with the residual add before it, and
the norm's int8 rows for the experts' GEMVs): every program reads the whole row to form the norm's
scale, then its K slice of the normalized row; the programs of row block 0 store their slices of
the stream, the normalized row and its int8 rounding (`fused.rms_norm(residual=..., q8=True)`'s three
outputs) -- one launch a layer fewer in a decode step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .fused import dense_slice, norm_values, stream_values
from .gguf import last_to_finish, split_counters
from .pdl import wait_for_inputs
from .q8act import QBLOCK, _round_store

MAX_E = 1024


SCORES = {"softmax": 0, "sigmoid": 1, "sqrtsoftplus": 2}


@triton.jit
def _route_row(x, t, e, ok, bias_ptr, tab_ptr, ids_ptr, w_ptr, idx_ptr, K, scaling, eps, BE: tl.constexpr,
               BK: tl.constexpr, SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr,
               HASH: tl.constexpr):
    """Token t's routing from its logits x [BE] (experts e, ok = e < E): weights and experts stored."""
    if SCORE == 0:  # softmax
        p = tl.exp(x - tl.max(x, axis=0))
        s = p / tl.sum(p, axis=0)
    elif SCORE == 1:  # sigmoid
        s = 1.0 / (1.0 + tl.exp(-x))
    else:  # sqrt(softplus)
        y = tl.exp(-tl.abs(x))
        u = 1.0 + y
        s = tl.sqrt(tl.maximum(x, 0.0) + tl.where(u == 1.0, y, tl.log(u) * (y / (u - 1.0))))
    s = tl.where(ok, s, 0.0)
    k = tl.arange(0, BK)
    if HASH:  # the experts are the token's row of the table; their scores gathered
        tok = tl.load(ids_ptr + t).to(tl.int64)
        chosen_i = tl.load(tab_ptr + tok * K + k, mask=k < K, other=0).to(tl.int32)
        chosen_w = tl.sum(tl.where(e[None, :] == chosen_i[:, None], s[None, :], 0.0), axis=1)
    else:
        pick = s
        if HAS_BIAS:
            pick = s + tl.load(bias_ptr + e, mask=ok, other=0.0).to(tl.float32)
        pick = tl.where(ok, pick, float("-inf"))
        chosen_w = tl.zeros([BK], dtype=tl.float32)
        chosen_i = tl.zeros([BK], dtype=tl.int32)
        for j in range(0, K):
            best = tl.max(pick, axis=0)
            at = tl.min(tl.where(pick == best, e, BE), axis=0)  # the lowest index among equal maxima
            chosen_w = tl.where(k == j, tl.sum(tl.where(e == at, s, 0.0), axis=0), chosen_w)
            chosen_i = tl.where(k == j, at, chosen_i)
            pick = tl.where(e == at, float("-inf"), pick)
    chosen_w = tl.where(k < K, chosen_w, 0.0)
    if RENORM:
        chosen_w = chosen_w / (tl.sum(chosen_w, axis=0) + eps)
    chosen_w = chosen_w * scaling
    tl.store(w_ptr + t * K + k, chosen_w, mask=k < K)
    tl.store(idx_ptr + t * K + k, chosen_i.to(tl.int64), mask=k < K)


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, tab_ptr, ids_ptr, w_ptr, idx_ptr, E, K, scaling, eps, s_l,
                  BE: tl.constexpr, BK: tl.constexpr, SCORE: tl.constexpr, HAS_BIAS: tl.constexpr,
                  RENORM: tl.constexpr, HASH: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    t = tl.program_id(0)
    e = tl.arange(0, BE)
    ok = e < E
    x = tl.load(logits_ptr + t * s_l + e, mask=ok, other=float("-inf")).to(tl.float32)
    _route_row(x, t, e, ok, bias_ptr, tab_ptr, ids_ptr, w_ptr, idx_ptr, K, scaling, eps, BE, BK, SCORE, HAS_BIAS,
               RENORM, HASH)


@triton.jit
def _finish_route(part_ptr, cnt_ptr, bias_ptr, tab_ptr, ids_ptr, w_ptr, idx_ptr, E, K, scaling, eps,
                  SPLITS: tl.constexpr, CH: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, SCORE: tl.constexpr,
                  HAS_BIAS: tl.constexpr, RENORM: tl.constexpr, HASH: tl.constexpr):
    """After a program stored its K slice's logits in part[s]: the last program of the grid to finish
    (one counter, re-armed by it) adds the slices in split order per expert and routes (`_route_row`)."""
    if last_to_finish(cnt_ptr, tl.num_programs(0) * SPLITS):
        e = tl.arange(0, BE)
        ok = e < E
        logits = tl.zeros([BE], dtype=tl.float32)
        for c in range(0, SPLITS, CH):  # CH slices per load (a few loads, not one per slice)
            sp = c + tl.arange(0, CH)
            m = (sp < SPLITS)[:, None] & ok[None, :]
            logits += tl.sum(tl.load(part_ptr + sp[:, None] * BE + e[None, :], mask=m, other=0.0, cache_modifier=".cg"),
                             axis=0)
        logits = tl.where(ok, logits, float("-inf"))
        _route_row(logits, 0, e, ok, bias_ptr, tab_ptr, ids_ptr, w_ptr, idx_ptr, K, scaling, eps, BE, BK, SCORE,
                   HAS_BIAS, RENORM, HASH)
        tl.store(cnt_ptr, 0)


@triton.jit
def _route_linear_kernel(x_ptr, r_ptr, part_ptr, cnt_ptr, bias_ptr, tab_ptr, ids_ptr, w_ptr, idx_ptr, E, D, s_r,
                         k_per, K, scaling, eps, SPLITS: tl.constexpr, CH: tl.constexpr, BR: tl.constexpr,
                         BD: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, SCORE: tl.constexpr,
                         HAS_BIAS: tl.constexpr, RENORM: tl.constexpr, HASH: tl.constexpr, PDL: tl.constexpr):
    """Program (row block b, K slice s): router rows b*BR.. times x's slice s (the router weight in
    its own dtype, fp32 sums) into part[s]. The last program of the grid to finish (one counter,
    re-armed by it) adds the slices in split order per expert and routes (`_route_row`)."""
    wait_for_inputs(PDL)
    sk = tl.program_id(1)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    tl.store(part_ptr + sk * BE + rows, dense_slice(x_ptr, r_ptr, rows, E, D, s_r, sk, k_per, BR, BD), mask=rows < E)
    _finish_route(part_ptr, cnt_ptr, bias_ptr, tab_ptr, ids_ptr, w_ptr, idx_ptr, E, K, scaling, eps, SPLITS, CH, BE, BK,
                  SCORE, HAS_BIAS, RENORM, HASH)


def route(logits: torch.Tensor, k: int, scaling: float = 1.0, scoring: str = "softmax",
          bias: torch.Tensor | None = None, renorm: bool = True, eps: float = 1e-20,
          table: torch.Tensor | None = None, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights float32 [T, k], expert indices int64 [T, k]); renorm: the k
    weights divided by their sum + eps. table [V, k] and ids [T]: hash routing (the experts of
    token t are table[ids[t]], not the top k)."""
    T, E = logits.shape
    if E > MAX_E or logits.stride(1) != 1 or not 1 <= k <= E or scoring not in SCORES:
        raise ValueError(f"route: logits {tuple(logits.shape)}, k={k}, scoring {scoring!r}")
    if table is not None and (ids is None or table.dim() != 2 or table.shape[1] != k or not table.is_contiguous()
                              or ids.shape != (T,)):
        raise ValueError(f"route: hash table {tuple(table.shape)} and ids do not give {k} experts for {T} tokens")
    w = torch.empty((T, k), dtype=torch.float32, device=logits.device)
    idx = torch.empty((T, k), dtype=torch.int64, device=logits.device)
    _route_kernel[(T,)](logits, bias if bias is not None else logits, table if table is not None else idx,
                        ids if ids is not None else idx, w, idx, E, k, float(scaling), float(eps),
                        logits.stride(0), BE=triton.next_power_of_2(E), BK=triton.next_power_of_2(k),
                        SCORE=SCORES[scoring], HAS_BIAS=bias is not None, RENORM=renorm, HASH=table is not None,
                        num_warps=1 if E <= 512 else 4,  # one warp: the 3K reductions stay in shuffles
                        **pdl.launch(logits.device))
    return w, idx


def _plan(name: str, x: torch.Tensor, weight: torch.Tensor, k: int, scoring: str, table, ids, splits: int | None):
    """The checks and the launch plan shared by `route_linear` and `route_norm_linear`: the weight's
    rows in blocks of BR, K in slices of whole BD steps over ~128 programs; the outputs allocated."""
    E, D = weight.shape
    if (x.shape != (1, D) or x.stride(-1) != 1 or weight.stride(1) != 1 or E > MAX_E or not 1 <= k <= E
            or scoring not in SCORES):
        raise ValueError(f"{name}: x {tuple(x.shape)}, weight {tuple(weight.shape)}, k={k}, {scoring!r}")
    if table is not None and (ids is None or table.dim() != 2 or table.shape[1] != k or not table.is_contiguous()
                              or ids.shape != (1,)):
        raise ValueError(f"{name}: hash table {tuple(table.shape)} and ids do not give {k} experts")
    BE, BR = triton.next_power_of_2(E), min(64, triton.next_power_of_2(E))
    BD = max(QBLOCK, 4096 // BR)
    blocks = triton.cdiv(E, BR)
    if splits is None:  # ~128 programs, each slice whole BD steps
        splits = max(1, min(64, 128 // blocks, D // BD))
    k_per = triton.cdiv(triton.cdiv(D, splits), BD) * BD
    splits = triton.cdiv(D, k_per)
    w = torch.empty((1, k), dtype=torch.float32, device=x.device)
    idx = torch.empty((1, k), dtype=torch.int64, device=x.device)
    part = torch.empty((splits, BE), dtype=torch.float32, device=x.device)
    meta = dict(SPLITS=splits, CH=max(1, min(triton.next_power_of_2(splits), 8192 // BE)), BR=BR, BD=BD, BE=BE,
                BK=triton.next_power_of_2(k), SCORE=SCORES[scoring], HAS_BIAS=False, RENORM=True,
                HASH=table is not None, num_warps=4, **pdl.launch(x.device))
    return (blocks, splits), k_per, w, idx, part, meta


def route_linear(x: torch.Tensor, weight: torch.Tensor, k: int, scaling: float = 1.0, scoring: str = "softmax",
                 bias: torch.Tensor | None = None, renorm: bool = True, eps: float = 1e-20,
                 table: torch.Tensor | None = None, ids: torch.Tensor | None = None,
                 splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`route(x @ weight.T, ...)` for one token x [1, D] in one launch: the router GEMV (a dense
    weight [E, D] read in its own dtype) split over ~128 programs, the last of which sums the
    slices and routes. A decode step's router GEMV and routing took 3.4 + 3.1 us per Qwen3 layer
    on an H100 as two launches; as one (with the MoE combine) qwen3moe's tg128 rose 3% (session 9)."""
    grid, k_per, w, idx, part, meta = _plan("route_linear", x, weight, k, scoring, table, ids, splits)
    E, D = weight.shape
    _route_linear_kernel[grid](
        x, weight, part, split_counters(x.device, 1), bias if bias is not None else x,
        table if table is not None else idx, ids if ids is not None else idx, w, idx, E, D, weight.stride(0), k_per,
        k, float(scaling), float(eps), **dict(meta, HAS_BIAS=bias is not None, RENORM=renorm))
    return w, idx


@triton.jit
def _route_norm_linear_kernel(x_ptr, res_ptr, nw_ptr, h_ptr, y_ptr, xq_ptr, dx_ptr, sx_ptr, r_ptr, part_ptr,
                              cnt_ptr, bias_ptr, tab_ptr, ids_ptr, w_ptr, idx_ptr, E, D, s_r, k_per, K, norm_eps,
                              scaling, eps, SPLITS: tl.constexpr, CH: tl.constexpr, BR: tl.constexpr,
                              BD: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr,
                              SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr,
                              HASH: tl.constexpr, UNIT_OFFSET: tl.constexpr, PDL: tl.constexpr):
    """`_route_linear_kernel` of y = RMSNorm(x + residual) (one token): program (row block b, K slice s)
    first sums h^2 over the whole row (BF values a load), then multiplies router rows b*BR.. by its
    slice of y formed in registers; programs (0, s) store slice s of h, y and y's int8 rows (k_per
    a multiple of BD, BD of 32)."""
    wait_for_inputs(PDL)
    sk = tl.program_id(1)
    ss = tl.zeros([BF], dtype=tl.float32)
    for k0 in range(0, D, BF):
        k = k0 + tl.arange(0, BF)
        h = stream_values(x_ptr, res_ptr, h_ptr, k, k < D)
        ss += h * h
    inv = tl.rsqrt(tl.sum(ss, axis=0) / D + norm_eps)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    r64 = tl.minimum(rows, E - 1).to(tl.int64)
    acc = tl.zeros([BR, BD], dtype=tl.float32)
    k_end = tl.minimum(D, (sk + 1) * k_per)
    first = tl.program_id(0) == 0
    for k0 in range(sk * k_per, k_end, BD):
        k = k0 + tl.arange(0, BD)
        ok = k < k_end
        h = stream_values(x_ptr, res_ptr, h_ptr, k, ok)
        y = norm_values(h, nw_ptr, y_ptr, k, ok, inv, UNIT_OFFSET)
        wt = tl.load(r_ptr + r64[:, None] * s_r + k[None, :], mask=ok[None, :], other=0.0).to(tl.float32)
        acc += wt * y[None, :]
        if first:
            tl.store(h_ptr + k, h.to(h_ptr.dtype.element_ty), mask=ok)
            tl.store(y_ptr + k, y.to(y_ptr.dtype.element_ty), mask=ok)
            _round_store(tl.where(ok, y, 0.0), xq_ptr, dx_ptr, sx_ptr, 0, k0 // BD, D, BD)
    tl.store(part_ptr + sk * BE + rows, tl.sum(acc, axis=1), mask=rows < E)
    _finish_route(part_ptr, cnt_ptr, bias_ptr, tab_ptr, ids_ptr, w_ptr, idx_ptr, E, K, scaling, eps, SPLITS, CH, BE, BK,
                  SCORE, HAS_BIAS, RENORM, HASH)


def route_norm_linear(x: torch.Tensor, residual: torch.Tensor, norm_w: torch.Tensor, norm_eps: float,
                      weight: torch.Tensor, k: int, scaling: float = 1.0, scoring: str = "softmax",
                      bias: torch.Tensor | None = None, renorm: bool = True, eps: float = 1e-20,
                      table: torch.Tensor | None = None, ids: torch.Tensor | None = None,
                      unit_offset: bool = False, splits: int | None = None):
    """One token's `rms_norm(x, norm_w, norm_eps, unit_offset, residual, q8=True)` and `route_linear` of
    its result in one launch: ((weights, experts), (y, h, (xq, dx, sx))) as the two calls return them."""
    E, D = weight.shape
    if residual.shape != (1, D) or residual.stride(-1) != 1 or norm_w.shape != (D,) or D % QBLOCK:
        raise ValueError(f"route_norm_linear: residual {tuple(residual.shape)}, norm {tuple(norm_w.shape)} for "
                         f"weight {tuple(weight.shape)} (the int8 rows need D % {QBLOCK} == 0)")
    grid, k_per, w, idx, part, meta = _plan("route_norm_linear", x, weight, k, scoring, table, ids, splits)
    dev = x.device
    dtype = torch.promote_types(x.dtype, residual.dtype)
    h, y = torch.empty((1, D), dtype=dtype, device=dev), torch.empty((1, D), dtype=dtype, device=dev)
    xq = torch.empty((1, D), dtype=torch.int8, device=dev)
    dx = torch.empty((1, D // QBLOCK), dtype=torch.float32, device=dev)
    sx = torch.empty_like(dx)
    _route_norm_linear_kernel[grid](
        x, residual, norm_w.contiguous(), h, y, xq, dx, sx, weight, part, split_counters(dev, 1),
        bias if bias is not None else x, table if table is not None else idx, ids if ids is not None else idx, w,
        idx, E, D, weight.stride(0), k_per, k, float(norm_eps), float(scaling), float(eps),
        BF=min(triton.next_power_of_2(D), 2048), UNIT_OFFSET=bool(unit_offset),
        **dict(meta, HAS_BIAS=bias is not None, RENORM=renorm))
    return (w, idx), (y, h, (xq, dx, sx))
