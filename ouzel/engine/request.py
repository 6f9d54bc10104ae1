"""What the scheduler is asked to do (Request), what it says back (Event), and its per-sequence
state while it runs (Running)."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .generate import StopMatcher
from .sampler import Sampler, SamplingParams

_ids = itertools.count(1)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (memory or disk)
    disk_tokens: int = 0    # ... of which read from the disk tier
    prefill_s: float = 0.0  # submit -> first token
    decode_s: float = 0.0


@dataclass
class Event:
    kind: str  # "token" | "done" | "error"
    text: str = ""
    token: int | None = None
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    usage: Usage | None = None
    error: str | None = None
    stop_sequence: str | None = None  # the stop string that ended the reply, if one did


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    logprobs: int | None = None  # None: off; n >= 0: the chosen token's logprob and n alternatives
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False
    arrival: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        # read by the engine thread at its next step; a bool store is atomic in CPython
        self.cancelled = True


class Running:
    """One admitted request: its tokens, blocks and how far its KV has been computed."""

    def __init__(self, req: Request, tokenizer, device):
        self.req = req
        self.tokens = list(req.prompt)
        self.blocks: list[int] = []
        self.keys: list[bytes] = []  # chain keys of the full blocks, as they fill
        self.computed = 0
        self.generated = 0
        self.state = None  # a private KV state, for models whose state is not paged (DeepSeek V4)
        self.snap: tuple[bytes, int] | None = None  # its latest snapshot (key, tokens): the next one's base
        self.sampler = Sampler(req.params, device)
        self.decoder = tokenizer.stream()
        self.stops = StopMatcher(req.params.stop)
        self.usage = Usage(prompt_tokens=len(req.prompt))
        self.first_token_at: float | None = None

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.computed

    def log_probs(self, logits: torch.Tensor, token: int) -> tuple[float | None, list | None]:
        n = self.req.logprobs
        if n is None:
            return None, None
        lp = torch.log_softmax(logits.float(), -1)
        top = []
        if n > 0:
            vals, ids = torch.topk(lp, n)
            top = [(int(i), float(v)) for i, v in zip(ids, vals)]
        return float(lp[token]), top
