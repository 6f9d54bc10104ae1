"""Decode state of DeepSeek V4's compressed attention, for one sequence.

Per layer it keeps only what later tokens read:
- the sliding window's raw K=V rows (the last `window - 1` tokens; the current one is added
  by the next forward),
- for each compressor ("compressor"; CSA layers also "indexer"): the compressed rows emitted
  so far (one per `ratio` tokens), the frontier (projected kv/gate rows of the tokens of the
  still-open window, fewer than `ratio`), and for the overlapping CSA series the previous
  complete window's first-half rows, which the next window's entry also pools.

Attention modules call `window`, `frontier`, `swap_overlap` and `append_rows`; the engine calls
`commit(n)` after each forward. `trim(n)` can only drop tokens whose effect is recomputable: a
compressed row or a slid-out raw row cannot be taken back, so trimming to n < length resets to
0 and the caller re-prefills (the returned length says where the state really is).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class _Series:
    rows: torch.Tensor | None = None  # [n_rows, dim] compressed rows emitted so far
    buf_kv: torch.Tensor | None = None  # [< ratio, c*dim] projected rows of the open window
    buf_gate: torch.Tensor | None = None
    overlap_kv: torch.Tensor | None = None  # [ratio, dim] previous full window's first series
    overlap_gate: torch.Tensor | None = None

    def tensors(self):
        return [t for t in (self.rows, self.buf_kv, self.buf_gate, self.overlap_kv, self.overlap_gate)
                if t is not None]


@dataclass
class _Layer:
    raw: torch.Tensor | None = None  # [<= window - 1, dim] K=V rows of the tokens just before `length`
    series: dict[str, _Series] = field(default_factory=dict)


class CompressedKV:
    """One sequence's V4 attention state: sliding rows + compressed rows + frontiers."""

    def __init__(self, n_layers: int, max_tokens: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.n_layers, self.max_tokens, self.device, self.dtype = n_layers, max_tokens, torch.device(device), dtype
        self.length = 0
        self._layers = [_Layer() for _ in range(n_layers)]

    # ---- sliding window

    def window(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, window: int):
        """Store the new tokens' K=V rows [T, dim]; return (rows, positions) of every raw row a
        query of this call may see: the kept window followed by the new rows."""
        if self.length + rows.shape[0] > self.max_tokens:
            raise ValueError(f"KV state holds {self.max_tokens} tokens; {self.length + rows.shape[0]} needed")
        st = self._layers[layer]
        rows = rows.to(self.dtype)
        if st.raw is not None and st.raw.shape[0]:
            kept = torch.arange(self.length - st.raw.shape[0], self.length, device=positions.device)
            rows, positions = torch.cat([st.raw, rows]), torch.cat([kept, positions])
        st.raw = rows[max(rows.shape[0] - max(window - 1, 0), 0):].clone()
        return rows, positions

    # ---- compressors

    def _series(self, layer: int, name: str) -> _Series:
        return self._layers[layer].series.setdefault(name, _Series())

    def frontier(self, layer: int, name: str, kv: torch.Tensor, gate: torch.Tensor, ratio: int):
        """Append the new tokens' projected kv/gate [T, c*dim] to the open window; return the
        complete windows (kv, gate [n*ratio, c*dim]) and the position of their first token.
        The rest stays as the frontier."""
        s = self._series(layer, name)
        first = 0 if s.rows is None else s.rows.shape[0] * ratio
        if s.buf_kv is not None:
            kv, gate = torch.cat([s.buf_kv, kv]), torch.cat([s.buf_gate, gate])
        usable = kv.shape[0] // ratio * ratio
        s.buf_kv, s.buf_gate = kv[usable:].clone(), gate[usable:].clone()
        return kv[:usable], gate[:usable], first

    def swap_overlap(self, layer: int, name: str, kv: torch.Tensor, gate: torch.Tensor):
        """Keep the last complete window's first-series rows [ratio, dim]; return the ones kept
        by the previous call (None at the start)."""
        s = self._series(layer, name)
        prior = (s.overlap_kv, s.overlap_gate)
        s.overlap_kv, s.overlap_gate = kv.clone(), gate.clone()
        return prior

    def append_rows(self, layer: int, name: str, rows: torch.Tensor, dim: int) -> torch.Tensor:
        """Add newly emitted compressed rows [n, dim]; return all of them."""
        s = self._series(layer, name)
        rows = rows.to(self.dtype)
        if s.rows is None:
            s.rows = torch.empty((0, dim), dtype=self.dtype, device=rows.device)
        if rows.shape[0]:
            s.rows = torch.cat([s.rows, rows])
        return s.rows

    # ---- bookkeeping

    def commit(self, n: int) -> None:
        self.length += n

    def trim(self, n: int) -> int:
        """Forget tokens from position n on where that is recomputable (n >= length: nothing to
        do; otherwise everything is dropped). Returns the length kept."""
        if n < self.length:
            self.length = 0
            self._layers = [_Layer() for _ in range(self.n_layers)]
        return self.length

    def nbytes(self) -> int:
        total = 0
        for st in self._layers:
            ts = [st.raw] if st.raw is not None else []
            ts += [t for s in st.series.values() for t in s.tensors()]
            total += sum(t.numel() * t.element_size() for t in ts)
        return total


def state_bytes(n_tokens: int, layer_types: list[str], rates: dict[str, int], head_dim: int, index_head_dim: int,
                window: int, elem_bytes: int = 4) -> int:
    """Bytes CompressedKV holds after n_tokens, from the dimensions alone (for sizing)."""
    total = 0
    for kind in layer_types:
        total += min(n_tokens, max(window - 1, 0)) * head_dim
        series = {"compressed_sparse_attention": [(head_dim, 2), (index_head_dim, 2)],
                  "heavily_compressed_attention": [(head_dim, 1)]}.get(kind, [])
        r = rates.get(kind, 1)
        for dim, c in series:
            total += n_tokens // r * dim + (n_tokens % r) * 2 * c * dim  # rows + open window kv/gate
            if c == 2 and n_tokens >= r:
                total += 2 * r * dim  # previous window's first series, kv and gate
    return total * elem_bytes
