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

Storage has fixed shapes so a one-token step can run from device tensors alone (and be captured
in a CUDA graph): raw and projected rows live in rings (position t in slot t % size), the
compressed rows in a buffer grown by doubling (`reserve`; `generation` counts reallocations).
Host integers say which positions are valid; only `commit` and `trim` move them.

Attention modules call `split`, then per sequence `window`, `frontier` and `append_rows` (or, for
the fixed one-token step, `window` and `frontier_step`/`emit_step`); the engine calls `commit(n)`
after each forward. `MultiState` runs several sequences' new tokens through one forward:
everything but attention is per row, so only attention loops over the states.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..kernels import cuda as _cuda

MIN_ROWS = 64  # first capacity of a compressed-row buffer


def _ring(rows: torch.Tensor, first: int, size: int) -> torch.Tensor:
    """A ring [size, dim] holding rows [n, dim] of positions first.. (the last `size` of them)."""
    ring = rows.new_zeros((size, rows.shape[1]))
    _ring_write(ring, rows, first)
    return ring


def _ring_write(ring: torch.Tensor, rows: torch.Tensor, first: int) -> None:
    size, n = ring.shape[0], rows.shape[0]
    keep = min(n, size)
    pos = torch.arange(first + n - keep, first + n, device=ring.device)
    ring.index_copy_(0, pos % size, rows[n - keep:].to(ring.dtype))


def _ring_read(ring: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows of positions start..end-1 (end - start <= ring size)."""
    return ring[torch.arange(start, end, device=ring.device) % ring.shape[0]]


@dataclass
class _Series:
    ratio: int
    overlap: bool  # CSA: a window's entry also pools the previous window's first series
    rows: torch.Tensor | None = None  # [capacity, dim]; the first length // ratio are emitted
    kv: torch.Tensor | None = None  # ring [span, c*dim] of projections; positions hist_start..length-1 valid
    gate: torch.Tensor | None = None  # (gate without the position bias)
    hist_start: int = 0
    offsets: torch.Tensor | None = None  # [(1+overlap)*ratio] window slots relative to its first token

    def span(self, rewind: int) -> int:
        """Ring size: what a trim by `rewind` needs, plus the open window and the previous one."""
        return rewind + (2 if self.overlap else 1) * self.ratio

    def keep(self, end: int, rewind: int) -> int:
        """First position a state of `end` tokens keeps: a trim back by `rewind` tokens needs the
        open window and, with overlap, one more."""
        return max(0, ((end - rewind) // self.ratio - (1 if self.overlap else 0)) * self.ratio)


@dataclass
class _Layer:
    raw: torch.Tensor | None = None  # ring [size, dim] of K=V rows; positions raw_start..length-1 valid
    raw_start: int = 0
    window: int | None = None
    series: dict[str, _Series] = field(default_factory=dict)


class CompressedKV:
    """One sequence's V4 attention state: sliding rows + compressed rows + recent projections.
    With `fixed_step` (the default on CUDA) a one-token forward takes the fixed-shape path."""

    def __init__(self, n_layers: int, max_tokens: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, rewind: int = 16):
        self.n_layers, self.max_tokens, self.device, self.dtype = n_layers, max_tokens, torch.device(device), dtype
        self.rewind = rewind
        self.length = 0
        self.generation = 0
        self.fixed_step = self.device.type == "cuda"
        self._layers = [_Layer() for _ in range(n_layers)]
        self._aranges: dict[int, torch.Tensor] = {}

    def split(self, n_rows: int) -> list[tuple["CompressedKV", slice]]:
        """(state, rows of the forward) per sequence: here all rows are this state's."""
        return [(self, slice(0, n_rows))]

    def fixed(self, n_rows: int) -> bool:
        """Whether a forward of n_rows new rows takes the fixed-shape step (positions read on the
        device only): one row, and `fixed_step` set."""
        return n_rows == 1 and self.fixed_step

    def _arange(self, n: int) -> torch.Tensor:
        if n not in self._aranges:  # made once, outside any capture
            self._aranges[n] = torch.arange(n, device=self.device)
        return self._aranges[n]

    def _check_room(self, n_new: int) -> None:
        if self.length + n_new > self.max_tokens:
            raise ValueError(f"KV state holds {self.max_tokens} tokens; {self.length + n_new} needed")

    # ---- sliding window

    def _raw_ring(self, st: _Layer, window: int, dim: int) -> torch.Tensor:
        """The layer's raw ring, sized for `window` (a loaded state's is refitted once)."""
        size = max(window - 1, 0) + max(self.rewind, 1)
        if st.raw is None or st.raw.shape[0] != size:
            if st.raw is None:
                st.raw = torch.zeros((size, dim), dtype=self.dtype, device=self.device)
            else:
                st.raw_start = max(st.raw_start, self.length - size)
                st.raw = _ring(_ring_read(st.raw, st.raw_start, self.length), st.raw_start, size)
            self.generation += 1
        st.window = window
        return st.raw

    def window(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, window: int, slot_positions: bool = True):
        """Store the new tokens' K=V rows [T, dim]; return (rows, positions) of every raw row a
        query of this call may see: the kept rows followed by the new ones. The fixed step
        returns the whole ring and each slot's position (negative: never written; None unless
        slot_positions: the one-launch attention derives them itself)."""
        self._check_room(rows.shape[0])
        st = self._layers[layer]
        ring = self._raw_ring(st, window, rows.shape[1])
        if self.fixed(rows.shape[0]):
            size = ring.shape[0]
            if not (rows.is_cuda and _cuda.ring_write(rows, positions, ring)):
                ring.index_copy_(0, positions % size, rows.to(self.dtype))
            return ring, (self.ring_positions(layer, positions) if slot_positions else None)
        kept = _ring_read(ring, st.raw_start, self.length)
        kept_pos = torch.arange(st.raw_start, self.length, device=positions.device)
        _ring_write(ring, rows, self.length)
        return torch.cat([kept, rows.to(self.dtype)]), torch.cat([kept_pos, positions])

    def ring_positions(self, layer: int, positions: torch.Tensor) -> torch.Tensor:
        """Fixed step: the position each slot of the layer's raw ring holds (negative: never written)."""
        size = self._layers[layer].raw.shape[0]
        return positions - (positions - self._arange(size)) % size

    # ---- compressors

    def _series(self, layer: int, name: str, ratio: int, overlap: bool, width: int) -> _Series:
        s = self._layers[layer].series.setdefault(name, _Series(ratio, overlap))
        if s.kv is None:
            size = s.span(self.rewind)
            s.kv = torch.zeros((size, width), dtype=self.dtype, device=self.device)
            s.gate = torch.zeros_like(s.kv)
            self.generation += 1
        if s.offsets is None:
            s.offsets = torch.arange(-ratio if overlap else 0, ratio, device=self.device)
        return s

    def _capacity(self, s: _Series | None, ratio: int, need: int) -> int:
        """The row buffer's size once it holds `need` rows (doubling, up to what max_tokens needs)."""
        cap = 0 if s is None or s.rows is None else s.rows.shape[0]
        return cap if cap >= need else max(need, min(max(2 * cap, MIN_ROWS), self.max_tokens // ratio + 1))

    def rows_bound(self, layer: int, name: str, ratio: int, n_new: int) -> int:
        """The compressed rows a forward of n_new tokens returns for this series (host-side): the
        emitted ones, or for the fixed step the whole buffer."""
        if not self.fixed(n_new):
            return (self.length + n_new) // ratio
        return self._capacity(self._layers[layer].series.get(name), ratio, self.length // ratio + 1)

    def _grow(self, s: _Series, dim: int, need: int) -> None:
        """Make the compressed-row buffer hold `need` rows (doubling; zeros, so a masked row is finite)."""
        cap = 0 if s.rows is None else s.rows.shape[0]
        if s.rows is not None and cap >= need:
            return
        size = self._capacity(s, s.ratio, need)
        rows = torch.zeros((size, dim), dtype=self.dtype, device=self.device)
        if s.rows is not None:
            rows[:cap] = s.rows
        s.rows = rows
        self.generation += 1

    def frontier(self, layer: int, name: str, kv: torch.Tensor, gate: torch.Tensor, ratio: int, overlap: bool):
        """Add the new tokens' projected kv/gate [T, c*dim]. Returns the windows completed now
        (kv, gate [n*ratio, c*dim]), the position of their first token, and for overlapping
        series the previous complete window's (kv, gate) [ratio, c*dim] (None at the start)."""
        s = self._series(layer, name, ratio, overlap, kv.shape[1])
        end = self.length + kv.shape[0]
        kv, gate = kv.to(self.dtype), gate.to(self.dtype)
        hist = (_ring_read(s.kv, s.hist_start, self.length), _ring_read(s.gate, s.hist_start, self.length))
        _ring_write(s.kv, kv, self.length)
        _ring_write(s.gate, gate, self.length)
        kv, gate = torch.cat([hist[0], kv]), torch.cat([hist[1], gate])
        done = self.length // ratio
        first, stop = done * ratio, end // ratio * ratio
        at = lambda pos: pos - s.hist_start  # noqa: E731 (token position -> history row)
        prior = None
        if overlap and done and stop > first:
            prior = (kv[at(first - ratio):at(first)], gate[at(first - ratio):at(first)])
        return kv[at(first):at(stop)], gate[at(first):at(stop)], first, prior

    def append_rows(self, layer: int, name: str, rows: torch.Tensor, dim: int) -> torch.Tensor:
        """Add newly emitted compressed rows [n, dim]; return all of them."""
        s = self._layers[layer].series[name]
        done = self.length // s.ratio
        self._grow(s, dim, done + rows.shape[0])
        if rows.shape[0]:
            s.rows[done:done + rows.shape[0]] = rows.to(self.dtype)
        return s.rows[:done + rows.shape[0]]

    def frontier_step(self, layer: int, name: str, kv: torch.Tensor, gate: torch.Tensor, positions: torch.Tensor,
                      ratio: int, overlap: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed step: store the token's kv, gate [1, c*dim] at positions [1]; return kv, gate
        [(1+overlap)*ratio, c*dim] of the previous window (with overlap) and the open one, in
        position order. Slots after the token's hold stale rows, as does window 0's previous one."""
        s = self._series(layer, name, ratio, overlap, kv.shape[1])
        size = s.kv.shape[0]
        slot = positions % size
        s.kv.index_copy_(0, slot, kv.to(self.dtype))
        s.gate.index_copy_(0, slot, gate.to(self.dtype))
        idx = (positions // ratio * ratio + s.offsets) % size
        return s.kv[idx], s.gate[idx]

    def step_buffers(self, layer: int, name: str, width: int, dim: int, ratio: int, overlap: bool):
        """Fixed step, for a kernel doing frontier_step + emit_step in one launch: the kv and gate
        rings [span, width] (position t in slot t % span) and the row buffer [capacity, dim]."""
        s = self._series(layer, name, ratio, overlap, width)
        self._grow(s, dim, self.length // ratio + 1)
        return s.kv, s.gate, s.rows

    def emit_step(self, layer: int, name: str, row: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Fixed step: write the open window's row [1, dim] at index positions // ratio (its value
        is final at the window's last token); return the whole row buffer [capacity, dim]."""
        s = self._layers[layer].series[name]
        self._grow(s, row.shape[1], self.length // s.ratio + 1)
        s.rows.index_copy_(0, positions // s.ratio, row.to(self.dtype))
        return s.rows

    def reserve(self, end: int) -> None:
        """Make every compressed-row buffer hold the row of position end - 1 (before replaying a
        captured step, which can't allocate)."""
        self._check_room(end - self.length)
        for st in self._layers:
            for s in st.series.values():
                if s.rows is not None:
                    self._grow(s, s.rows.shape[1], (end - 1) // s.ratio + 1)

    # ---- bookkeeping

    def commit(self, n: int) -> None:
        self.length += n
        for st in self._layers:
            if st.raw is not None:
                st.raw_start = max(st.raw_start, self.length - st.raw.shape[0])
            for s in st.series.values():
                s.hist_start = max(s.hist_start, s.keep(self.length, self.rewind))

    def trim(self, n: int) -> int:
        """Forget tokens from position n on: exact back to `length - rewind`, else a reset to 0.
        Returns the length kept."""
        if n >= self.length:
            return self.length
        if n < 0 or not all(self._can_cut(st, n) for st in self._layers):
            self.length = 0
            self._layers = [_Layer() for _ in range(self.n_layers)]
            self.generation += 1
            return 0
        self.length = n  # the rings' and row buffer's later entries are simply no longer valid
        return n

    def _can_cut(self, st: _Layer, n: int) -> bool:
        if self.length - n > self.rewind:
            return False
        if st.window is not None and st.raw_start > max(0, n - (st.window - 1)):
            return False  # earlier trims already gave up the raw rows position n needs
        for s in st.series.values():  # the history must reach back to what position n needs
            need = max(0, (n // s.ratio - (1 if s.overlap else 0)) * s.ratio)
            if s.hist_start > need:
                return False
        return True

    # ---- persistence (e.g. a disk tier): tensors + the small facts needed to rebuild

    def state(self) -> dict[str, torch.Tensor]:
        """The valid rows, in position order (views or copies of the buffers: copy to keep)."""
        out = {}
        for i, st in enumerate(self._layers):
            if st.raw is not None:
                out[f"{i}.raw"] = _ring_read(st.raw, st.raw_start, self.length)
            for name, s in st.series.items():
                if s.rows is not None:
                    out[f"{i}.{name}.rows"] = s.rows[: self.length // s.ratio]
                if s.kv is not None:
                    out[f"{i}.{name}.kv"] = _ring_read(s.kv, s.hist_start, self.length)
                    out[f"{i}.{name}.gate"] = _ring_read(s.gate, s.hist_start, self.length)
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
        self.generation += 1
        self.length = int(meta["length"])
        load = lambda t: t.to(self.device, self.dtype)  # noqa: E731
        for key, value in meta.items():
            if key.count(".") == 1:
                i, name = key.split(".")
                ratio, overlap, start = (int(v) for v in value.split(","))
                s = self._layers[int(i)].series[name] = _Series(ratio, bool(overlap), hist_start=start)
                rows, kv = state.get(f"{i}.{name}.rows"), state.get(f"{i}.{name}.kv")
                if rows is not None:
                    self._grow(s, rows.shape[1], max(rows.shape[0], 1))
                    s.rows[: rows.shape[0]] = load(rows)
                if kv is not None:
                    s.kv = _ring(load(kv), start, s.span(self.rewind))
                    s.gate = _ring(load(state[f"{i}.{name}.gate"]), start, s.span(self.rewind))
        for i, st in enumerate(self._layers):
            t = state.get(f"{i}.raw")
            if t is not None:  # sized to its rows; the first forward refits it to the window
                st.raw_start = self.length - t.shape[0]
                st.raw = _ring(load(t), st.raw_start, max(t.shape[0], 1))

    def nbytes(self) -> int:
        """Bytes of the state held (what state() returns); the buffers are allocated a little larger."""
        total = 0
        for st in self._layers:
            if st.raw is not None:
                total += (self.length - st.raw_start) * st.raw.shape[1]
            for s in st.series.values():
                if s.rows is not None:
                    total += self.length // s.ratio * s.rows.shape[1]
                if s.kv is not None:
                    total += 2 * (self.length - s.hist_start) * s.kv.shape[1]
        return total * self.dtype.itemsize


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
