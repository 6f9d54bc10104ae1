"""The Python API: `ouzel.load(...)` returns an `LLM`."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .engine.generate import Sequence, StopMatcher, generate_ids
from .engine.sampler import SamplingParams
from .errors import OuzelError
from .loader import Loaded, load as load_model


@dataclass
class Stats:
    prompt_tokens: int = 0
    reused_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str = ""

    @property
    def prefill_tps(self) -> float:
        n = self.prompt_tokens - self.reused_tokens
        return n / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        # the first token comes out of prefill; the rest are decode steps
        n = max(self.generated_tokens - 1, 0)
        return n / self.decode_s if self.decode_s > 0 else 0.0


class LLM:
    def __init__(self, loaded: Loaded, device: torch.device, ctx: int | None = None):
        self.loaded = loaded
        self.model, self.tokenizer, self.config = loaded.model, loaded.tokenizer, loaded.config
        self.device = device
        train_ctx = int(self.config.opt("max_position_embeddings", 4096))
        self.ctx = int(ctx or train_ctx)
        if self.ctx <= 0:
            raise OuzelError(f"--ctx must be positive (got {self.ctx})")
        self._seq = Sequence(self.model, self.ctx, device)
        self.last_stats = Stats()
        self._template = None

    # --- text ---
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    @property
    def eog_ids(self) -> set[int]:
        return set(self.tokenizer.eot_ids)

    # --- one forward ---
    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """float32 [len(ids), vocab] from one forward pass over a fresh context."""
        if not ids:
            raise OuzelError("logits() needs at least one token")
        seq = Sequence(self.model, max(self.ctx, len(ids)), self.device)
        hidden = seq._forward(list(ids))
        return self.model.logits(hidden).float().cpu()

    # --- generation ---
    def _params(self, **kw) -> SamplingParams:
        return SamplingParams(**{k: v for k, v in kw.items() if v is not None}).validate()

    def generate_ids(self, ids: list[int], max_tokens: int = 256, temperature: float | None = None,
                     top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                     seed: int | None = None, ignore_eos: bool = False) -> list[int]:
        params = self._params(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              min_p=min_p, seed=seed, ignore_eos=ignore_eos)
        return list(self._run(list(ids), params))

    def _run(self, ids: list[int], params: SamplingParams, progress=None) -> Iterator[int]:
        stats = self.last_stats = Stats(prompt_tokens=len(ids))
        t0 = time.perf_counter()
        first = True
        for tok in generate_ids(self._seq, ids, params, self.eog_ids, progress):
            now = time.perf_counter()
            if first:
                stats.prefill_s, stats.reused_tokens, first, t1 = now - t0, self._seq.reused, False, now
            stats.generated_tokens += 1
            stats.decode_s = now - t1
            yield tok
        stats.finish_reason = "length" if stats.generated_tokens >= params.max_tokens else "stop"
        if first:
            stats.prefill_s = time.perf_counter() - t0

    def stream_text(self, ids: list[int], params: SamplingParams, progress=None) -> Iterator[str]:
        """Decode generated ids to text as it completes, cutting at stop strings."""
        decoder = self.tokenizer.stream()
        stops = StopMatcher(params.stop)
        gen = self._run(ids, params, progress)
        for tok in gen:
            text = stops.push(decoder.push(tok))
            if text:
                yield text
            if stops.stopped:
                gen.close()
                self.last_stats.finish_reason = "stop"
                return
        tail = stops.push(decoder.flush()) + ("" if stops.stopped else stops.flush())
        if tail:
            yield tail

    def generate(self, prompt: str | list[int], max_tokens: int = 256, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 seed: int | None = None, stop: list[str] | str | None = None, ignore_eos: bool = False,
                 stream: bool = False, add_special: bool = True):
        """Continue a prompt (text or ids); a string, or an iterator of text pieces with stream=True."""
        ids = self.tokenize(prompt, add_special=add_special) if isinstance(prompt, str) else list(prompt)
        params = self._params(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              min_p=min_p, seed=seed, stop=stop, ignore_eos=ignore_eos)
        pieces = self.stream_text(ids, params)
        return pieces if stream else "".join(pieces)

    # --- chat ---
    @property
    def chat_template(self):
        if self._template is None:
            from .text.chat import chat_template_for
            self._template = chat_template_for(self.tokenizer, self.loaded.architecture)
        return self._template

    def chat_prompt(self, messages: list[dict], tools: list | None = None) -> list[int]:
        from .text.chat import encode_chat_prompt
        text = self.chat_template.render(messages, add_generation_prompt=True, tools=tools)
        return encode_chat_prompt(self.tokenizer, text)

    def chat(self, messages: list[dict], max_tokens: int = 256, stream: bool = False, **kw):
        """Reply to a conversation; the KV state of the shared prefix with the last call is reused."""
        ids = self.chat_prompt(messages, kw.pop("tools", None))
        return self.generate(ids, max_tokens=max_tokens, stream=stream, **kw)

    def reset(self) -> None:
        self._seq.reset()


def load(model: str | Path = "smollm2-135m", device: str = "cpu", ctx: int | None = None,
         progress: bool = False) -> LLM:
    """Load a short name, a .gguf path or a HF model directory."""
    from .loader import resolve_device
    loaded = load_model(model, device, progress=progress)
    return LLM(loaded, resolve_device(device), ctx)
