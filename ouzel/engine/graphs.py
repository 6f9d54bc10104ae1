"""CUDA-graph replay of a single sequence's decode step.

A decode step launches a few hundred small kernels (per layer: norms, q/k/v/o and MLP GEMVs,
rope, attention); launched one by one from Python their host cost is several times the GPU
work. `DecodeGraph` captures the whole step -- embedding, layers, final norm, logits -- once and
replays it per token. What changes between tokens goes in through two static device tensors
(token id, position); the KV cache writes at that position and attends up to it on the device,
so the captured step stays valid until the cache reallocates (`DenseKV.generation`), when it is
captured again. Any state with that `generation` and a `reserve(end)` that grows it before a
replay qualifies (DeepSeek V4's `CompressedKV`, whose one-token step has fixed shapes too).

Used only for models that declare `graph_safe` (no host reads inside their forward) and only
on CUDA; OUZEL_NO_CUDA_GRAPH=1 switches it off (the eager step is the reference).
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


class DecodeGraph:
    def __init__(self, model, kv, device: torch.device):
        self.model, self.kv, self.device = model, kv, device
        self.ids = torch.zeros(1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.generation = -1
        self.captures = 0
        self.failed = False

    def _step(self) -> torch.Tensor:
        return self.model.logits(self.model(self.ids, self.pos, self.kv))

    def _capture(self) -> None:
        self.graph = self.logits = None
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._step()  # eager warm-up: compiles and tunes kernels, none of which may run in capture
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._step()
        self.graph, self.generation = graph, self.kv.generation
        self.captures += 1

    def __call__(self, token: int, position: int) -> torch.Tensor:
        """Logits [1, V] after `token` at `position` (its k/v are written at that position)."""
        self.kv.reserve(position + 1)
        self.ids.fill_(token)
        self.pos.fill_(position)
        if self.graph is None or self.generation != self.kv.generation:
            try:
                self._capture()  # the replay below recomputes the warm-up's step: same values
            except Exception as e:  # a host read inside the step: run it eagerly from now on
                log.warning("decode step not capturable (%s); running it eagerly", e)
                self.failed = True
                return self._step()
        self.graph.replay()
        return self.logits
