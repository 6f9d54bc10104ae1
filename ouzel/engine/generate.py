"""One sequence's generation: prefill (reusing the common prefix), decode, stop handling."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import torch

from ..errors import OuzelError
from ..kv.cache import DenseKV
from .graphs import ChunkGraph, DecodeGraph, chunk_graphs_enabled, graphs_enabled
from .sampler import Sampler, SamplingParams

PREFILL_CHUNK = 512  # tokens per prefill forward on the CPU
# On CUDA: larger chunks spread a chunk's fixed costs (an MoE GEMM decodes each expert's blocks once
# per tile, the dense prefill dequantizes every weight once per chunk) over more tokens. H100, walk
# to 16k: llama8b 16.5k -> 21.1k tok/s, qwen3moe 12.8k -> 15.0k, ds4flash 6.3k -> 8.3k (session 11).
PREFILL_CHUNK_CUDA = 2048
GRAPH_CHUNKS = (512,)  # captured chunk sizes below the chunk: a 512-token prompt replays a graph too


def prefill_chunk(device: torch.device | None = None) -> int:
    """Tokens per prefill forward: PREFILL_CHUNK (PREFILL_CHUNK_CUDA on CUDA), or OUZEL_PREFILL_CHUNK."""
    raw = os.environ.get("OUZEL_PREFILL_CHUNK")
    if raw is None:
        return PREFILL_CHUNK_CUDA if device is not None and device.type == "cuda" else PREFILL_CHUNK
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise OuzelError(f"OUZEL_PREFILL_CHUNK={raw!r}: expected a positive number of tokens, e.g. 2048")
    return n


class Sequence:
    """The tokens a model has seen and their KV state; prefill reuses the common prefix."""

    def __init__(self, model, max_tokens: int, device: torch.device):
        self.model, self.max_tokens, self.device = model, max_tokens, device
        self.tokens: list[int] = []
        self.reused = 0  # tokens the last prefill took from the previous state instead of computing
        self.kv = (model.new_kv(max_tokens, device) if hasattr(model, "new_kv")
                   else DenseKV(len(model.model.layers), max_tokens, device))
        self.graph = DecodeGraph(model, self.kv, device) if graphs_enabled(model, self.kv, device) else None
        self.chunk = prefill_chunk(device)
        # prefill chunks of these sizes replay a captured graph each (one memory pool for all: they
        # never run at once); the rest of a prompt, shorter than the smallest, runs eagerly
        self.chunk_graphs: dict[int, ChunkGraph] = {}
        if chunk_graphs_enabled(model, self.kv, device):
            pool = torch.cuda.graph_pool_handle()
            for n in sorted({self.chunk, *(c for c in GRAPH_CHUNKS if c < self.chunk)}, reverse=True):
                self.chunk_graphs[n] = ChunkGraph(model, self.kv, device, n, pool=pool)

    def reset(self) -> None:
        self.tokens = []
        self.kv.trim(0)

    def _piece(self, left: int) -> int:
        """Tokens of the next prefill forward with `left` to go: a full chunk, else the largest
        captured size that fits, else all of them (eagerly)."""
        if left >= self.chunk:
            return self.chunk
        return max((n for n in self.chunk_graphs if n <= left), default=left)

    def _forward(self, ids: list[int], last_only: bool = False) -> torch.Tensor:
        """Run ids through the model; with last_only, only the last row of hidden is computed."""
        start = self.kv.length
        g = self.chunk_graphs.get(len(ids))
        if last_only and g is not None and not g.failed:
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
        hidden, i = None, 0
        while i < len(todo):
            n = self._piece(len(todo) - i)
            hidden = self._forward(todo[i:i + n], last_only=True)
            i += n
            if progress is not None:
                progress(i, len(todo))
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

    @torch.inference_mode()
    def feed(self, token: torch.Tensor, pick=None, value: int | None = None) -> torch.Tensor:
        """`step` for a token held on the device ([1] long, e.g. the previous step's pick), which
        nothing reads back: the host queues the step and goes on. Returns the next token on the
        device ([1] long): pick(logits) (`Sampler.pick`), greedy by default. `tokens` gets `value`,
        or -1 until `settle` fills it in."""
        if len(self.tokens) >= self.max_tokens:
            raise OuzelError(f"context full ({self.max_tokens} tokens)")
        if self.graph is not None and not self.graph.failed:
            logits = self.graph(token, self.kv.length)
        else:
            pos = torch.arange(self.kv.length, self.kv.length + 1, device=self.device)
            logits = self.model.logits(self.model(token.to(self.device), pos, self.kv))
        self.kv.commit(1)
        self.tokens.append(-1 if value is None else value)
        return pick(logits[-1]) if pick is not None else torch.argmax(logits[-1]).view(1)

    def settle(self, start: int, values: list[int]) -> None:
        """Fill in the fed tokens' values from position `start` (read back after `feed`)."""
        self.tokens[start:start + len(values)] = values


@dataclass
class Finish:
    reason: str  # "stop" (EOS or a stop string) | "length" (max_tokens or context)
    tokens: int


def generate_ids(seq: Sequence, prompt: list[int], params: SamplingParams, eog: set[int],
                 progress=None) -> Iterator[int]:
    """Yield sampled token ids; ends on EOS/EOT (not yielded), max_tokens, or a full context."""
    sampler = Sampler(params, seq.device)
    logits = seq.prefill(prompt, progress)
    if ahead_enabled(seq.device) and params.max_tokens > 0:
        yield from _decode_ahead(seq, logits, params, eog, sampler)
        return
    for i in range(params.max_tokens):
        tok = sampler(logits)
        if tok in eog and not params.ignore_eos:
            return
        yield tok
        if i + 1 == params.max_tokens or len(seq.tokens) >= seq.max_tokens:
            return
        logits = seq.step(tok)


def ahead_enabled(device: torch.device) -> bool:
    """Whether decoding runs a token ahead of the host (`_decode_ahead`): on CUDA, unless
    OUZEL_SYNC_DECODE=1 (every step waits for its token to be read, for A/B runs)."""
    return device.type == "cuda" and not os.environ.get("OUZEL_SYNC_DECODE")


class _Reader:
    """Device tokens read back without waiting for the steps queued after them: a copy into pinned
    host memory and an event per token, from a ring of 4 (at most 2 are in flight) on CUDA; a plain
    read elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.ring = [(torch.empty(1, dtype=torch.long, pin_memory=True), torch.cuda.Event()) for _ in range(4)]
            self.next = 0

    def start(self, token: torch.Tensor):
        if not self.cuda:
            return token
        buf, event = self.ring[self.next]
        self.next = (self.next + 1) % len(self.ring)
        buf.copy_(token, non_blocking=True)
        event.record()
        return buf, event

    def finish(self, handle) -> int:
        if not self.cuda:
            return int(handle)
        buf, event = handle
        event.synchronize()
        return int(buf[0])


def _decode_ahead(seq: Sequence, logits: torch.Tensor, params: SamplingParams, eog: set[int],
                  sampler: Sampler | None = None) -> Iterator[int]:
    """generate_ids' loop with the GPU a token ahead of the host: each token is drawn on the device
    (`Sampler.pick`, no sync) and the step that feeds token i is queued, from the device, before
    token i is read back, so the host's work on a token (the sync, detokenizing, the caller's)
    overlaps the next step instead of leaving the GPU idle between steps. The tokens are the plain
    loop's (same draws in the same order); the step fed past the end is taken back: on exit the
    state is what the plain loop leaves (the prompt, then every yielded token but the last)."""
    sampler = sampler or Sampler(params, seq.device)
    reader = _Reader(seq.device)
    start = len(seq.tokens)  # where the generated tokens go
    cur = sampler.pick(logits)  # token 0, on the device
    handle = reader.start(cur)
    read = 0  # tokens read back (and yielded or ended on)
    try:
        while True:
            i = read  # token i is cur; its value is on its way to the host
            fed = i + 1 < params.max_tokens and len(seq.tokens) < seq.max_tokens
            if fed:  # queue the step after token i before waiting for it
                nxt = seq.feed(cur, sampler.pick)
                nxt_handle = reader.start(nxt)
            tok = reader.finish(handle)
            read += 1
            if fed:
                seq.settle(start + i, [tok])
            if tok in eog and not params.ignore_eos:
                return
            yield tok
            if not fed:
                return
            cur, handle = nxt, nxt_handle
    finally:
        keep = start + max(0, read - 1)  # the plain loop feeds every yielded token but the last
        if len(seq.tokens) > keep:
            seq.kv.trim(keep)
            seq.tokens = seq.tokens[:min(keep, seq.kv.length)]


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
