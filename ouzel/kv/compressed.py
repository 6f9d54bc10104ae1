"""Decode state of DeepSeek V4's compressed attention, for one sequence.

Per layer it keeps only what later tokens read:
- the sliding window's raw K=V rows (the last `window - 1` tokens; the current one is added
  by the next forward),
- for each compressor ("compressor"; CSA layers also "indexer"): the compressed rows emitted
  so far (one per `ratio` tokens), and the projected kv/gate rows of the recent tokens: the
  still-open window (the frontier) and, for the overlapping CSA series, the previous complete
  window, whose first series the next entry also pools.

`rewind` more tokens of raw and projected rows are kept, so `trim(n)` back by up to `rewind`
tokens is exact (a chat turn usually re-sends all but the last few tokens). Further back, a
compressed row or a slid-out raw row can't be taken back: trim resets to 0 and the caller
re-prefills (trim returns the length kept).

Attention modules call `split`, then per sequence `window`, `frontier` and `append_rows`; the
engine calls `commit(n)` after each forward. `MultiState` runs several sequences' new tokens
through one forward: everything but attention is per row, so only attention loops over the states.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class _Series:
    ratio: int
    overlap: bool  # CSA: a window's entry also pools the previous window's first series
    rows: torch.Tensor | None = None  # [n_rows, dim] compressed rows emitted so far
    kv: torch.Tensor | None = None  # [tokens, c*dim] projections of tokens hist_start..length-1
    gate: torch.Tensor | None = None  # (gate without the position bias)
    hist_start: int = 0

    def tensors(self):
        return [t for t in (self.rows, self.kv, self.gate) if t is not None]


@dataclass
class _Layer:
    raw: torch.Tensor | None = None  # K=V rows of the tokens just before `length`
    series: dict[str, _Series] = field(default_factory=dict)


class CompressedKV:
    """One sequence's V4 attention state: sliding rows + compressed rows + recent projections."""

    def __init__(self, n_layers: int, max_tokens: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, rewind: int = 16):
        self.n_layers, self.max_tokens, self.device, self.dtype = n_layers, max_tokens, torch.device(device), dtype
        self.rewind = rewind
        self.length = 0
        self._layers = [_Layer() for _ in range(n_layers)]

    def split(self, n_rows: int) -> list[tuple["CompressedKV", slice]]:
        """(state, rows of the forward) per sequence: here all rows are this state's."""
        return [(self, slice(0, n_rows))]

    # ---- sliding window

    def window(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, window: int):
        """Store the new tokens' K=V rows [T, dim]; return (rows, positions) of every raw row a
        query of this call may see: the kept rows followed by the new ones."""
        if self.length + rows.shape[0] > self.max_tokens:
            raise ValueError(f"KV state holds {self.max_tokens} tokens; {self.length + rows.shape[0]} needed")
        st = self._layers[layer]
        rows = rows.to(self.dtype)
        if st.raw is not None and st.raw.shape[0]:
            kept = torch.arange(self.length - st.raw.shape[0], self.length, device=positions.device)
            rows, positions = torch.cat([st.raw, rows]), torch.cat([kept, positions])
        st.raw = rows[max(rows.shape[0] - max(window - 1, 0) - self.rewind, 0):].clone()
        return rows, positions

    # ---- compressors

    def _series(self, layer: int, name: str, ratio: int, overlap: bool) -> _Series:
        return self._layers[layer].series.setdefault(name, _Series(ratio, overlap))

    def frontier(self, layer: int, name: str, kv: torch.Tensor, gate: torch.Tensor, ratio: int, overlap: bool):
        """Add the new tokens' projected kv/gate [T, c*dim]. Returns the windows completed now
        (kv, gate [n*ratio, c*dim]), the position of their first token, and for overlapping
        series the previous complete window's (kv, gate) [ratio, c*dim] (None at the start)."""
        s = self._series(layer, name, ratio, overlap)
        end = self.length + kv.shape[0]
        kv, gate = kv.to(self.dtype), gate.to(self.dtype)
        if s.kv is not None:
            kv, gate = torch.cat([s.kv, kv]), torch.cat([s.gate, gate])
        done = 0 if s.rows is None else s.rows.shape[0]
        first, stop = done * ratio, end // ratio * ratio
        at = lambda pos: pos - s.hist_start  # noqa: E731 (token position -> history row)
        prior = None
        if overlap and done and stop > first:
            prior = (kv[at(first - ratio):at(first)], gate[at(first - ratio):at(first)])
        chunk = (kv[at(first):at(stop)], gate[at(first):at(stop)])
        # keep what a trim back by `rewind` tokens needs: the open window and, with overlap, one more
        keep = max(0, ((end - self.rewind) // ratio - (1 if overlap else 0)) * ratio)
        keep = max(keep, s.hist_start)
        s.kv, s.gate, s.hist_start = kv[at(keep):].clone(), gate[at(keep):].clone(), keep
        return chunk[0], chunk[1], first, prior

    def append_rows(self, layer: int, name: str, rows: torch.Tensor, dim: int) -> torch.Tensor:
        """Add newly emitted compressed rows [n, dim]; return all of them."""
        s = self._layers[layer].series[name]
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
        """Forget tokens from position n on: exact back to `length - rewind`, else a reset to 0.
        Returns the length kept."""
        if n >= self.length:
            return self.length
        if n < 0 or not all(self._can_cut(st, n) for st in self._layers):
            self.length = 0
            self._layers = [_Layer() for _ in range(self.n_layers)]
            return 0
        drop = self.length - n
        for st in self._layers:
            if st.raw is not None:
                st.raw = st.raw[: max(st.raw.shape[0] - drop, 0)]
            for s in st.series.values():
                if s.rows is not None:
                    s.rows = s.rows[: n // s.ratio]
                if s.kv is not None:
                    s.kv, s.gate = s.kv[: n - s.hist_start], s.gate[: n - s.hist_start]
        self.length = n
        return n

    def _can_cut(self, st: _Layer, n: int) -> bool:
        drop = self.length - n
        if drop > self.rewind:
            return False
        for s in st.series.values():  # the history must reach back to what position n needs
            need = max(0, (n // s.ratio - (1 if s.overlap else 0)) * s.ratio)
            if s.hist_start > need:
                return False
        return True

    # ---- persistence (e.g. a disk tier): tensors + the small facts needed to rebuild

    def state(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, st in enumerate(self._layers):
            if st.raw is not None:
                out[f"{i}.raw"] = st.raw
            for name, s in st.series.items():
                for part in ("rows", "kv", "gate"):
                    if getattr(s, part) is not None:
                        out[f"{i}.{name}.{part}"] = getattr(s, part)
        return out

    def meta(self) -> dict[str, str]:
        out = {"length": str(self.length), "rewind": str(self.rewind), "layers": str(self.n_layers)}
        for i, st in enumerate(self._layers):
            for name, s in st.series.items():
                out[f"{i}.{name}"] = f"{s.ratio},{int(s.overlap)},{s.hist_start}"
        return out

    def load_state(self, state: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        """Restore what state()/meta() described (same model: the layer count must match)."""
        if int(meta["layers"]) != self.n_layers or int(meta["rewind"]) != self.rewind:
            raise ValueError(f"saved state has {meta['layers']} layers, rewind {meta['rewind']}; "
                             f"this one {self.n_layers}, {self.rewind}")
        self._layers = [_Layer() for _ in range(self.n_layers)]
        for key, value in meta.items():
            if key.count(".") == 1:
                i, name = key.split(".")
                ratio, overlap, start = (int(v) for v in value.split(","))
                s = self._layers[int(i)].series[name] = _Series(ratio, bool(overlap), hist_start=start)
                for part in ("rows", "kv", "gate"):
                    t = state.get(f"{i}.{name}.{part}")
                    setattr(s, part, None if t is None else t.to(self.device, self.dtype))
        for i, st in enumerate(self._layers):
            t = state.get(f"{i}.raw")
            st.raw = None if t is None else t.to(self.device, self.dtype)
        self.length = int(meta["length"])

    def nbytes(self) -> int:
        total = 0
        for st in self._layers:
            ts = [st.raw] if st.raw is not None else []
            ts += [t for s in st.series.values() for t in s.tensors()]
            total += sum(t.numel() * t.element_size() for t in ts)
        return total


class MultiState:
    """Several sequences in one forward: segments [(state, n_rows)] own consecutive rows of the
    batch, in order; each segment's positions are its own sequence's."""

    def __init__(self, segments: list[tuple[CompressedKV, int]]):
        self.segments = segments

    def split(self, n_rows: int) -> list[tuple[CompressedKV, slice]]:
        if n_rows != sum(n for _, n in self.segments):
            raise ValueError(f"{n_rows} rows for segments of {[n for _, n in self.segments]}")
        out, start = [], 0
        for state, n in self.segments:
            out.append((state, slice(start, start + n)))
            start += n
        return out

    def commit(self, n: int) -> None:
        for state, rows in self.split(n):
            state.commit(rows.stop - rows.start)


def state_bytes(n_tokens: int, layer_types: list[str], rates: dict[str, int], head_dim: int, index_head_dim: int,
                window: int, elem_bytes: int = 4, rewind: int = 16) -> int:
    """Bytes CompressedKV holds after n_tokens (fed in calls of at least `rewind` tokens or one
    at a time), from the dimensions alone (for sizing)."""
    total = 0
    for kind in layer_types:
        total += min(n_tokens, max(window - 1, 0) + rewind) * head_dim
        series = {"compressed_sparse_attention": [(head_dim, 2), (index_head_dim, 2)],
                  "heavily_compressed_attention": [(head_dim, 1)]}.get(kind, [])
        r = rates.get(kind, 1)
        for dim, c in series:
            keep = max(0, ((n_tokens - rewind) // r - (1 if c == 2 else 0)) * r)
            total += n_tokens // r * dim + (n_tokens - keep) * 2 * c * dim  # rows + recent kv/gate
    return total * elem_bytes
