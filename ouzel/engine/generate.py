"""One sequence's generation: prefill (reusing the common prefix), decode, stop handling."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..errors import OuzelError
from ..kv.cache import DenseKV
from .graphs import ChunkGraph, DecodeGraph, chunk_graphs_enabled, graphs_enabled
from .sampler import Sampler, SamplingParams

PREFILL_CHUNK = 512


class Sequence:
    """The tokens a model has seen and their KV state; prefill reuses the common prefix."""

    def __init__(self, model, max_tokens: int, device: torch.device):
        self.model, self.max_tokens, self.device = model, max_tokens, device
        self.tokens: list[int] = []
        self.reused = 0  # tokens the last prefill took from the previous state instead of computing
        self.kv = (model.new_kv(max_tokens, device) if hasattr(model, "new_kv")
                   else DenseKV(len(model.model.layers), max_tokens, device))
        self.graph = DecodeGraph(model, self.kv, device) if graphs_enabled(model, self.kv, device) else None
        # full prefill chunks replay one captured graph (the last, shorter one runs eagerly)
        self.chunk_graph = (ChunkGraph(model, self.kv, device, PREFILL_CHUNK)
                            if chunk_graphs_enabled(model, self.kv, device) else None)

    def reset(self) -> None:
        self.tokens = []
        self.kv.trim(0)

    def _forward(self, ids: list[int], last_only: bool = False) -> torch.Tensor:
        """Run ids through the model; with last_only, only the last row of hidden is computed."""
        start = self.kv.length
        g = self.chunk_graph
        if last_only and g is not None and not g.failed and len(ids) == g.n_tokens:
            hidden = g(ids, start)
            self.kv.commit(len(ids))
            self.tokens.extend(ids)
            return hidden
        t = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos = torch.arange(start, start + len(ids), device=self.device)
        if last_only and getattr(self.model, "prunes_outputs", False):
            hidden = self.model(t, pos, self.kv, last_only=True)
        else:
            hidden = self.model(t, pos, self.kv)
        self.kv.commit(len(ids))
        self.tokens.extend(ids)
        return hidden

    @torch.inference_mode()
    def prefill(self, ids: list[int], progress=None) -> torch.Tensor:
        """Make the sequence hold exactly `ids`; return the logits [V] after the last one."""
        if len(ids) > self.max_tokens:
            raise OuzelError(f"prompt has {len(ids)} tokens; the context holds {self.max_tokens} (--ctx)")
        if not ids:
            raise OuzelError("empty prompt: nothing to condition on")
        common = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # recompute at least the last token for its logits
        self.kv.trim(common)
        common = min(common, self.kv.length)  # a state that can't cut at `common` keeps less
        self.tokens = self.tokens[:common]
        todo = ids[common:]
        hidden = None
        for i in range(0, len(todo), PREFILL_CHUNK):
            hidden = self._forward(todo[i:i + PREFILL_CHUNK], last_only=True)
            if progress is not None:
                progress(min(i + PREFILL_CHUNK, len(todo)), len(todo))
        self.reused = common
        return self.model.logits(hidden[-1:])[0].float()

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        if len(self.tokens) >= self.max_tokens:
            raise OuzelError(f"context full ({self.max_tokens} tokens)")
        if self.graph is not None and not self.graph.failed:
            logits = self.graph(token, self.kv.length)
            self.kv.commit(1)
            self.tokens.append(token)
            return logits[0].to(torch.float32, copy=True)  # the graph's output buffer is overwritten by the next step
        return self.model.logits(self._forward([token]))[0].float()


@dataclass
class Finish:
    reason: str  # "stop" (EOS or a stop string) | "length" (max_tokens or context)
    tokens: int


def generate_ids(seq: Sequence, prompt: list[int], params: SamplingParams, eog: set[int],
                 progress=None) -> Iterator[int]:
    """Yield sampled token ids; ends on EOS/EOT (not yielded), max_tokens, or a full context."""
    sampler = Sampler(params, seq.device)
    logits = seq.prefill(prompt, progress)
    for i in range(params.max_tokens):
        tok = sampler(logits)
        if tok in eog and not params.ignore_eos:
            return
        yield tok
        if i + 1 == params.max_tokens or len(seq.tokens) >= seq.max_tokens:
            return
        logits = seq.step(tok)


class StopMatcher:
    """Cuts text at the first stop string; holds back a tail that could start one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def push(self, text: str) -> str:
        if not self.stops:
            return text
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.matched = next(s for s in self.stops if self.pending.find(s) == cut)
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
