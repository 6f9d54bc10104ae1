"""CUDA-graph replay of a single sequence's decode step and prefill chunks.

A decode step launches a few hundred small kernels (per layer: norms, q/k/v/o and MLP GEMVs,
rope, attention); launched one by one from Python their host cost is several times the GPU
work. `DecodeGraph` captures the whole step -- embedding, layers, final norm, logits -- once and
replays it per token. What changes between tokens goes in through two static device tensors
(token id, position); the KV cache writes at that position and attends up to it on the device,
so the captured step stays valid until the cache reallocates (`DenseKV.generation`), when it is
captured again. Any state with that `generation` and a `reserve(end)` that grows it before a
replay qualifies (DeepSeek V4's `CompressedKV`, whose one-token step has fixed shapes too).

`ChunkGraph` does the same for a prefill chunk of a fixed size (the cache's chunk attention reads
the positions on the device too), so a long prompt's chunks replay one graph at every depth; a
sequence keeps one per chunk size it replays (`generate.Sequence.chunk_graphs`), in one pool.

Used only for models that declare `graph_safe` (no host reads inside their forward) and only
on CUDA; OUZEL_NO_CUDA_GRAPH=1 switches both off, OUZEL_NO_CHUNK_GRAPH=1 the chunks' only (the
eager forward is the reference).
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def replayable(kv) -> bool:
    """A state a captured step can run on: `generation` counts its reallocations, `reserve(end)`
    makes room for position end - 1 outside the graph."""
    return isinstance(getattr(kv, "generation", None), int) and callable(getattr(kv, "reserve", None))


def graphs_enabled(model, kv, device: torch.device) -> bool:
    return (device.type == "cuda" and replayable(kv) and getattr(model, "graph_safe", False)
            and not os.environ.get("OUZEL_NO_CUDA_GRAPH"))


class _Captured:
    """One forward of a fixed number of tokens, captured once and replayed: ids and positions go in
    through static device tensors; `_run` is the captured work, its output tensor is reused."""

    def __init__(self, model, kv, device: torch.device, n_tokens: int, pool=None):
        self.model, self.kv, self.device, self.n_tokens = model, kv, device, n_tokens
        self.pool = pool  # a memory pool shared with graphs that never run at the same time
        self.ids = torch.zeros(n_tokens, dtype=torch.long, device=device)
        self.pos = torch.zeros(n_tokens, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None
        self.generation = -1
        self.captures = 0
        self.replays = 0
        self.failed = False

    def _run(self) -> torch.Tensor:
        raise NotImplementedError

    def _capture(self) -> None:
        # the old graph lives until the new one is captured: a pool shared with other graphs must keep
        # a user (torch asserts when a capture reuses a pool whose graphs are all gone)
        old, self.graph, self.out = self.graph, None, None
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._run()  # eager warm-up: compiles and tunes kernels, none of which may run in capture
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.out = self._run()
        self.graph, self.generation = graph, self.kv.generation
        self.captures += 1
        del old

    def _replay(self, start: int) -> torch.Tensor:
        """With ids/pos filled for positions start .. start + n_tokens - 1."""
        self.kv.reserve(start + self.n_tokens)
        if self.graph is None or self.generation != self.kv.generation:
            try:
                self._capture()  # the replay below recomputes the warm-up's work: same values
            except Exception as e:  # a host read inside the forward: run it eagerly from now on
                log.warning("%s not capturable (%s); running it eagerly", type(self).__name__, e)
                self.failed = True
                return self._run()
        self.graph.replay()
        self.replays += 1
        return self.out


class DecodeGraph(_Captured):
    """The decode step: embedding, layers, final norm and logits of one token."""

    def __init__(self, model, kv, device: torch.device):
        super().__init__(model, kv, device, 1)

    def _run(self) -> torch.Tensor:
        return self.model.logits(self.model(self.ids, self.pos, self.kv))

    def __call__(self, token: int | torch.Tensor, position: int) -> torch.Tensor:
        """Logits [1, V] after `token` at `position` (its k/v are written at that position). A
        token given as a device tensor [1] is copied on the device: nothing waits for it."""
        if isinstance(token, torch.Tensor):
            self.ids.copy_(token)
        else:
            self.ids.fill_(token)
        self.pos.fill_(position)
        return self._replay(position)


class ChunkGraph(_Captured):
    """A prefill chunk of exactly n_tokens: the layers (their k/v stored at the chunk's positions)
    and the last row's final hidden state. An eager 512-token chunk launches ~600 kernels from
    Python, 2-3x its GPU time on the H100 hosts; replayed, the GPU sets the pace. Needs a state
    whose chunk attention reads positions on the device only (`DenseKV.chunk_graphs`)."""

    def _run(self) -> torch.Tensor:
        return self.model(self.ids, self.pos, self.kv, last_only=True)[-1:]

    def __call__(self, ids: list[int], start: int) -> torch.Tensor:
        """Hidden [1, D] after the chunk ids at positions start .. start + n_tokens - 1."""
        self.ids.copy_(torch.tensor(ids, dtype=torch.long))
        torch.arange(start, start + self.n_tokens, out=self.pos)
        return self._replay(start)


def chunk_graphs_enabled(model, kv, device: torch.device) -> bool:
    return (graphs_enabled(model, kv, device) and getattr(kv, "chunk_graphs", False)
            and getattr(model, "prunes_outputs", False) and not os.environ.get("OUZEL_NO_CHUNK_GRAPH"))
