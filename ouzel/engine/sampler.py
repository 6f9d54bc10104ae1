"""Token sampling: greedy, or top-k -> top-p -> min-p -> temperature -> draw (llama.cpp's order)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import OuzelError


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int | None = None
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> "SamplingParams":
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0 (got {self.temperature})"),
            (self.top_k >= 0, f"top_k must be >= 0 (got {self.top_k})"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1] (got {self.top_p})"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1] (got {self.min_p})"),
            (self.max_tokens >= 0, f"max_tokens must be >= 0 (got {self.max_tokens})"),
        ]
        for ok, message in checks:
            if not ok:
                raise OuzelError(message)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        return self


class Sampler:
    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        self.params = params.validate()
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed if params.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: [V] float32 -> the next token id."""
        return int(self.pick(logits)[0])

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token id as a [1] long tensor on logits' device, with nothing read back to the
        host (no sync): fixed shapes throughout, the filtered candidates masked rather than
        gathered, and the draw a Gumbel-max (argmax of logit / T + Gumbel noise), which picks
        each candidate with its softmax(logit / T) probability."""
        p = self.params
        logits = logits.reshape(-1)
        if p.temperature == 0:
            return torch.argmax(logits).view(1)
        logits = logits.float()
        if 0 < p.top_k < logits.shape[-1]:
            values, ids = torch.topk(logits, p.top_k)
        else:
            values, ids = torch.sort(logits, descending=True)
        probs = torch.softmax(values, -1)
        keep = torch.ones_like(probs, dtype=torch.bool)
        if p.top_p < 1:  # smallest prefix whose mass reaches top_p
            before = torch.cumsum(probs, -1) - probs
            keep &= before < p.top_p
        if p.min_p > 0:
            keep &= probs >= p.min_p * probs[0]
        keep[0] = True
        u = torch.rand(values.shape, generator=self.generator, device=values.device)
        gumbel = -torch.log(-torch.log(u))  # u in [0, 1): -inf at 0 (never drawn), finite above
        choice = torch.argmax(torch.where(keep, values / p.temperature + gumbel, float("-inf")))
        return ids.gather(0, choice.view(1))
