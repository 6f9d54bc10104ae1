"""DeepSeek V4 attention: one shared K=V head (MQA) over a sliding window of raw rows, plus
compressed rows on CSA/HCA layers.

- sliding only: the last `window` tokens (plain RoPE, theta `rope_theta`);
- HCA: + one row per `ratio` tokens (non-overlapping windows, softmax-gated pooling), all
  causally complete rows visible;
- CSA: + one row per `ratio` tokens pooled over two overlapping series (window w mixes the
  previous window's first series with its own second one), of which a lightning indexer picks
  the `index_topk` best rows per query.
Compressed layers use the "compress" RoPE (YaRN). Per-head attention sinks, a low-rank query with
its norm, and a grouped low-rank output projection. The K=V rows carry RoPE into the output, so
the output's rope slice is rotated back by the query's angle.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cuda as _cuda
from ..kernels import ops
from ..quant.tensor import QTensor
from .hyper_connections import dense, fused_kernels, unit_rms
from .interleaved_rope import InterleavedRope
from .linear import Linear, LinearGroup
from .moe import FUSED_MAX_PAIRS
from .norm import RMSNorm


class Compressor(nn.Module):
    """kv_proj, gate_proj: hidden -> c*dim (c = 2 with overlap); position_bias [ratio, c*dim];
    kv_norm [dim]. Emits one RMS-normed, RoPE'd row per complete window of `ratio` tokens."""

    series = "compressor"

    def __init__(self, hidden: int, dim: int, ratio: int, overlap: bool, eps: float, rope: InterleavedRope):
        super().__init__()
        self.dim, self.ratio, self.overlap, self.rope = dim, ratio, overlap, rope
        width = (2 if overlap else 1) * dim
        self.kv_proj, self.gate_proj = Linear(hidden, width), Linear(hidden, width)
        self.kv_gate = LinearGroup([self.kv_proj, self.gate_proj])
        self.kv_norm = RMSNorm(dim, eps)
        self.position_bias = None

    def fuse_weights(self) -> None:
        self.kv_gate.fuse()  # one GEMV for both (16-bit in the flash GGUFs: one dense launch)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"position_bias": (self.ratio, (2 if self.overlap else 1) * self.dim)}

    def project(self, x: torch.Tensor, q_residual: torch.Tensor, positions: torch.Tensor) -> tuple:
        """The per-row projections [T, ...] the per-sequence part reads (batched over sequences)."""
        return tuple(self.kv_gate(x))

    def compress(self, kv_x: torch.Tensor, gate_x: torch.Tensor, kv, layer: int, positions: torch.Tensor):
        """One sequence's projections kv_x, gate_x [T, c*dim] -> every compressed row so far [n, dim]
        (the fixed step: the state's whole row buffer, rows from (positions + 1) // ratio on invalid)."""
        if kv.fixed(kv_x.shape[0]):
            return self._compress_step(kv_x, gate_x, kv, layer, positions)
        chunk_kv, chunk_gate, first, prior = kv.frontier(layer, self.series, kv_x, gate_x, self.ratio, self.overlap)
        n, r, d = chunk_kv.shape[0] // self.ratio, self.ratio, self.dim
        new = kv_x.new_zeros((0, d))
        if n:
            bias = dense(self.position_bias)
            pooled = None
            if fused_kernels(chunk_kv):  # one launch (the torch code: ~15)
                pooled = _cuda.v4_compress_chunk(chunk_kv, chunk_gate, prior, bias, r, self.overlap, d)
            if pooled is None:
                pooled = self._pool(chunk_kv, chunk_gate, prior, bias)
            positions = torch.arange(n, device=kv_x.device) * r + first
            new = None
            if fused_kernels(pooled):  # norm and rope in one launch (the reference: ~14 torch ops)
                new = self.rope.fused(pooled, positions, norm="weighted", weight=self.kv_norm.weight,
                                      eps=self.kv_norm.eps)
            if new is None:
                new = self.rope(self.kv_norm(pooled), positions)
        return kv.append_rows(layer, self.series, new, d)

    def _pool(self, chunk_kv, chunk_gate, prior, bias) -> torch.Tensor:
        """The complete windows' rows [n * ratio, c*dim] -> pooled [n, dim]: per channel, the
        softmax of gate + position bias over the window's slots weighs its kv (float32 whatever
        the state stores). The reference of `v4.compress_chunk`."""
        n, r = chunk_kv.shape[0] // self.ratio, self.ratio
        ckv, cgate = chunk_kv.float().view(n, r, -1), chunk_gate.float().view(n, r, -1) + bias
        if self.overlap:
            ckv, cgate = self._overlap(ckv, cgate, prior, bias)
        return (ckv * cgate.softmax(dim=1, dtype=torch.float32).to(ckv.dtype)).sum(dim=1)

    def _compress_step(self, kv_x, gate_x, kv, layer: int, positions: torch.Tensor) -> torch.Tensor:
        """compress() for one token at a device-side position, with no branch on it: every step
        pools the open window (slots of tokens not seen yet hold stale rows) into row
        positions // ratio, which readers mask until the window's last token has written it."""
        r = self.ratio
        if fused_kernels(kv_x):  # rings, pooling, norm, rope and the row's write in one launch
            rings = kv.step_buffers(layer, self.series, kv_x.shape[1], self.dim, r, self.overlap)
            self.rope._to(positions.device)
            if _cuda.v4_compress_step(*rings[:2], kv_x, gate_x, positions, dense(self.position_bias), rings[2],
                                      self.kv_norm.weight, self.kv_norm.eps, self.rope.inv_freq,
                                      self.rope.scaling, r, self.overlap):
                return rings[2]
        wkv, wgate = kv.frontier_step(layer, self.series, kv_x, gate_x, positions, r, self.overlap)
        bias = dense(self.position_bias)
        ckv, cgate = wkv[-r:].float()[None], wgate[-r:].float()[None] + bias
        if self.overlap:  # window 0 has no previous one: zero kv, -inf gate as in _overlap
            has_prior = (positions >= r)[:, None]
            prior = (torch.where(has_prior, wkv[:r].float(), 0.0),
                     torch.where(has_prior, wgate[:r].float(), float("-inf")))
            ckv, cgate = self._overlap(ckv, cgate, prior, bias)
        pooled = (ckv * cgate.softmax(dim=1, dtype=torch.float32).to(ckv.dtype)).sum(dim=1)
        row = self.rope(self.kv_norm(pooled), positions // r * r)
        return kv.emit_step(layer, self.series, row, positions)

    def _overlap(self, ckv, cgate, prior, bias):
        """[n, r, 2d] -> [n, 2r, d]: slots 0..r-1 hold the previous window's first series (zero
        kv, -inf gate where there is none), slots r..2r-1 this window's second series."""
        n, r, d = ckv.shape[0], self.ratio, self.dim
        okv = ckv.new_zeros((n, 2 * r, d))
        ogate = cgate.new_full((n, 2 * r, d), float("-inf"))
        okv[:, r:], ogate[:, r:] = ckv[..., d:], cgate[..., d:]
        okv[1:, :r], ogate[1:, :r] = ckv[:-1, :, :d], cgate[:-1, :, :d]
        if prior is not None:  # the window before this call's first, from the decode state
            okv[0, :r], ogate[0, :r] = prior[0][:, :d].float(), (prior[1].float() + bias)[:, :d]
        return okv, ogate


class _Scorer(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.weights_proj = Linear(hidden, heads)


class Indexer(Compressor):
    """Lightning indexer: its own small overlapping compressor at index_head_dim, and queries
    q_b_proj(q_residual) scored as sum_h w_h(x) * relu(q_h . k)."""

    series = "indexer"

    def __init__(self, hidden: int, q_rank: int, heads: int, dim: int, ratio: int, top_k: int, eps: float,
                 rope: InterleavedRope):
        super().__init__(hidden, dim, ratio, True, eps, rope)
        self.heads, self.top_k = heads, top_k
        self.q_b_proj = Linear(q_rank, heads * dim)
        self.scorer = _Scorer(hidden, heads)

    def project(self, x, q_residual, positions, scored: bool = True) -> tuple:
        """+ (scored) the queries [T, heads, dim] and their head weights [T, heads]."""
        if not scored:
            return super().project(x, q_residual, positions)
        q = self.q_b_proj(q_residual).view(x.shape[0], self.heads, self.dim)
        rotated = self.rope.fused(q, positions) if fused_kernels(q) else None
        q = self.rope(q, positions) if rotated is None else rotated
        w = self.scorer.weights_proj(x).float() * self.heads ** -0.5
        return *super().project(x, q_residual, positions), q, w

    def select(self, proj, positions, kv, layer) -> torch.Tensor | None:
        """One sequence: indices [T, min(top_k, n)] of the compressed rows each query reads, -1 =
        none; None (projected unscored) when every row fits the top-k: all complete rows."""
        rows = self.compress(proj[0], proj[1], kv, layer, positions)  # [n, dim]
        if len(proj) == 2:
            return None
        q, w = proj[2:]
        n = rows.shape[0]
        k = min(self.top_k, n)
        if n == 0:
            return q.new_zeros((q.shape[0], 0), dtype=torch.long)
        ready = ((positions + 1) // self.ratio)[:, None]  # rows a query may read: index < ready
        index = None
        if q.shape[0] == 1 and fused_kernels(q):  # a decode step: the scores in one launch
            index = _cuda.v4_index_scores(q[0], w[0], rows, positions, self.ratio, self.dim ** -0.5)
        if index is None:
            scores = F.relu(torch.einsum("thd,nd->thn", q.float(), rows.float())) * self.dim ** -0.5
            index = (scores * w[..., None]).sum(dim=1)  # [T, n]
            index = index.masked_fill(torch.arange(n, device=q.device)[None, :] >= ready, float("-inf"))
        top = index.view(q.shape[0], n).topk(k, dim=-1).indices
        return torch.where(top >= ready, torch.full_like(top, -1), top)


class CSACompressor(Compressor):
    def __init__(self, cfg, rope: InterleavedRope, ratio: int):
        super().__init__(cfg.hidden_size, cfg.head_dim, ratio, True, cfg.rms_norm_eps, rope)
        self.indexer = Indexer(cfg.hidden_size, cfg.q_lora_rank, cfg.index_n_heads, cfg.index_head_dim, ratio,
                               cfg.index_topk, cfg.rms_norm_eps, rope)

    def project(self, x, q_residual, positions, scored: bool = True) -> tuple:
        return *super().project(x, q_residual, positions), *self.indexer.project(x, q_residual, positions, scored)

    def scored(self, kv, layer: int, n_rows: int) -> bool:
        """Whether any sequence of this forward may see more compressed rows than the indexer keeps
        (else it keeps them all: no scores, no top-k; V4-Flash's 512 of ratio 4 up to 2k tokens)."""
        return any(state.rows_bound(layer, self.indexer.series, self.ratio, s.stop - s.start) > self.indexer.top_k
                   for state, s in kv.split(n_rows))

    def picks(self, proj, positions, kv, layer):
        """One sequence: (compressed rows [n, dim], indices [T, k] of the rows each query reads, -1 =
        none; or None: every complete row)."""
        rows = self.compress(proj[0], proj[1], kv, layer, positions)
        return rows, self.indexer.select(proj[2:], positions, kv, layer)


class HCACompressor(Compressor):
    def __init__(self, cfg, rope: InterleavedRope, ratio: int):
        super().__init__(cfg.hidden_size, cfg.head_dim, ratio, False, cfg.rms_norm_eps, rope)


def complete(rows: torch.Tensor, positions: torch.Tensor, ratio: int) -> torch.Tensor:
    """Mask [T, n]: the compressed rows whose window query t has seen to its end."""
    return torch.arange(rows.shape[0], device=rows.device)[None, :] < ((positions + 1) // ratio)[:, None]


class GroupedLinear(nn.Module):
    """Block-diagonal projection: input split in `groups` slices, slice g times rows
    [g*out_per_group, (g+1)*out_per_group) of weight [groups*out_per_group, in_per_group]."""

    gpu_regroup = True  # the loader may regroup its blocks as a Linear's (the decode GEMV reads int8 x)

    def __init__(self, in_per_group: int, out_total: int, groups: int):
        super().__init__()
        self.in_per_group, self.out_total, self.groups = in_per_group, out_total, groups
        self.weight = None
        self._groups: dict = {}  # (T, device) -> each row's group index

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weight": (self.out_total, self.in_per_group)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [T, groups, in_per_group] -> [T, out_total]
        g, per = self.groups, self.out_total // self.groups
        if not isinstance(self.weight, QTensor):  # dense, or a stored format dequantized per use
            w = self.weight if isinstance(self.weight, torch.Tensor) else self.weight.dequantize()
            w = w.to(x.dtype).view(g, per, -1)
            return torch.einsum("tgi,goi->tgo", x, w).reshape(x.shape[0], -1)
        if fused_kernels(self.weight.raw) and x.shape[0] * g <= FUSED_MAX_PAIRS:  # groups as MoE experts: one GEMV
            key = (x.shape[0], x.device)
            if key not in self._groups:  # made once per shape, outside any capture
                self._groups[key] = torch.arange(g, device=x.device).repeat(x.shape[0])
            y = ops.linear_experts(x.reshape(-1, x.shape[-1]), self.weight, g, self._groups[key], 1)
            if y is not None:
                return y.reshape(x.shape[0], -1).to(x.dtype)
        if x.is_cuda:  # a prefill: every group in one launch
            y = _cuda.grouped_qlinear(x, self.weight, g)
            if y is not None:
                return y
        parts = [ops.linear(x[:, i], QTensor(self.weight.raw[i * per:(i + 1) * per], self.weight.bt,
                                             (per, self.in_per_group))) for i in range(g)]
        return torch.cat(parts, dim=-1)


GATHER_ELEMS = 1 << 22  # gathered compressed rows per query block (16 MiB in float32)
COMPRESSORS = {"compressed_sparse_attention": CSACompressor, "heavily_compressed_attention": HCACompressor}


class V4Attention(nn.Module):
    def __init__(self, cfg, layer: int, layer_type: str, rope: InterleavedRope, ratio: int | None):
        super().__init__()
        d, H, hd, eps = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.rms_norm_eps
        self.layer, self.heads, self.head_dim, self.eps = layer, H, hd, eps
        self.window, self.rope, self.scale = cfg.sliding_window, rope, hd ** -0.5
        self.q_a_proj, self.q_a_norm = Linear(d, cfg.q_lora_rank), RMSNorm(cfg.q_lora_rank, eps)
        self.q_b_proj = Linear(cfg.q_lora_rank, H * hd)
        self.kv_proj, self.kv_norm = Linear(d, hd), RMSNorm(hd, eps)
        self.q_kv = LinearGroup([self.q_a_proj, self.kv_proj])  # both read x: one GEMV once fused
        self.o_groups = cfg.o_groups
        self.o_a_proj = GroupedLinear(H * hd // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, cfg.o_groups)
        self.o_b_proj = Linear(cfg.o_groups * cfg.o_lora_rank, d)
        self.compressor = COMPRESSORS[layer_type](cfg, rope, ratio) if layer_type in COMPRESSORS else None
        self.sinks = None

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"sinks": (self.heads,)}

    def fuse_weights(self) -> None:
        self.q_kv.fuse()

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv) -> torch.Tensor:
        # x [T, hidden]; one K=V head of head_dim shared by all H query heads
        T = x.shape[0]
        q_a, rows = self.q_kv(x)
        q_res, _, q_res8 = self.q_a_norm.prepare(q_a)  # + its int8 rows for q_b_proj (one CUDA row)
        q = self.q_b_proj(q_res, q_res8).view(T, self.heads, self.head_dim)
        fused = fused_kernels(q)
        cos_sin = None
        q_rot = self.rope.fused(q, positions, norm="unit", eps=self.eps) if fused else None
        if q_rot is None:  # the reference
            cos_sin = self.rope.cos_sin(positions)
            q_rot = self.rope.rotate(unit_rms(q, self.eps), *cos_sin)
        kv_rot = self.rope.fused(rows, positions, norm="weighted", weight=self.kv_norm.weight,
                                 eps=self.kv_norm.eps) if fused else None
        if kv_rot is None:
            cos_sin = cos_sin or self.rope.cos_sin(positions)
            kv_rot = self.rope.rotate(self.kv_norm(rows), *cos_sin)
        q, rows = q_rot, kv_rot
        proj = ()
        if isinstance(self.compressor, CSACompressor):
            proj = self.compressor.project(x, q_res, positions, self.compressor.scored(kv, self.layer, T))
        elif self.compressor is not None:
            proj = self.compressor.project(x, q_res, positions)
        # kv may hold several sequences (MultiState): all else is per row, attention per sequence
        outs = [self._sequence(q[s], rows[s], positions[s], [p[s] for p in proj], state)
                for state, s in kv.split(T)]
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        undone = self.rope.fused(out, positions, sign=-1.0) if fused else None
        if undone is None:
            cos, sin = cos_sin or self.rope.cos_sin(positions)
            undone = self.rope.rotate(out, cos, -sin)
        out = undone
        return self.o_b_proj(self.o_a_proj(out.reshape(T, self.o_groups, -1)))

    def _sequence(self, q, rows, positions, proj, kv) -> torch.Tensor:
        """One sequence's attention over its window and compressed rows: q [T, H, D] -> [T, H, D]."""
        fused = kv.fixed(q.shape[0]) and fused_kernels(q)  # the whole softmax in one launch
        keys, key_pos = kv.window(self.layer, rows, positions, self.window, slot_positions=not fused)
        crows, top = None, None  # compressed rows [n, D]; the indexer's picks [T, k] (None: all complete)
        if isinstance(self.compressor, HCACompressor):
            crows = self.compressor.compress(*proj, kv, self.layer, positions)
        elif self.compressor is not None:
            crows, top = self.compressor.picks(proj, positions, kv, self.layer)
        if fused:
            out = _cuda.v4_attention_step(q, keys, positions, self.window, dense(self.sinks), self.scale, crows,
                                          getattr(self.compressor, "ratio", 0), top)
            if out is not None:
                return out
            key_pos = kv.ring_positions(self.layer, positions)
        elif fused_kernels(q):  # a prefill chunk: each query over its own keys only, in one launch
            out = _cuda.v4_attention_chunk(q, keys, positions, self.window, dense(self.sinks), self.scale, crows,
                                           getattr(self.compressor, "ratio", 0), top)
            if out is not None:
                return out
        mask = ((key_pos[None, :] <= positions[:, None]) & (key_pos[None, :] > positions[:, None] - self.window)
                & (key_pos[None, :] >= 0))  # the fixed step's ring: negative = never written
        picked = None
        if crows is not None and top is None:  # dense over every complete compressed row
            keys = torch.cat([keys, crows.to(keys.dtype)])
            mask = torch.cat([mask, complete(crows, positions, self.compressor.ratio)], dim=1)
        elif crows is not None:  # only the indexer's picks: gathered per query
            picked = (crows.to(q.dtype), top)
        return self._attend(q, keys.to(q.dtype), mask, picked)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, picked=None) -> torch.Tensor:
        """q [T, H, D], keys (= values) [S, D], mask [T, S] -> [T, H, D]; with picked = (rows [n, D],
        indices [T, k]) each query also attends its own k rows. Each head's sink logit joins the
        softmax and takes its share of the probability mass. Queries go in blocks so the
        gathered rows [block, k, D] stay small."""
        sinks = dense(self.sinks).to(q.dtype).view(1, -1, 1)
        k = 0 if picked is None else picked[1].shape[1]
        block = max(1, GATHER_ELEMS // max(1, k * q.shape[-1]))
        outs = []
        for t0 in range(0, q.shape[0], block):
            qb, mb = q[t0:t0 + block], mask[t0:t0 + block]
            scores = (torch.einsum("thd,sd->ths", qb, keys) * self.scale).masked_fill(~mb[:, None, :], float("-inf"))
            parts = [scores]
            if k:
                rows, top = picked[0], picked[1][t0:t0 + block]
                sel = rows[top.clamp(min=0)]  # [b, k, D]
                cs = torch.einsum("thd,tkd->thk", qb, sel) * self.scale
                parts.append(cs.masked_fill((top < 0)[:, None, :], float("-inf")))
            parts.append(sinks.expand(qb.shape[0], -1, 1))
            probs = torch.cat(parts, dim=-1).softmax(dim=-1)
            out = torch.einsum("ths,sd->thd", probs[..., : keys.shape[0]], keys)
            if k:
                out = out + torch.einsum("thk,tkd->thd", probs[..., keys.shape[0]:-1], sel)
            outs.append(out)
        return torch.cat(outs)
