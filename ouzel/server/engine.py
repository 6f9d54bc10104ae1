"""The server's engine: the loaded model, the scheduler thread, the KV tiers, and one async
generator (`stream`) that every HTTP handler consumes."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

from ..engine.request import Event, Request, Usage
from ..engine.sampler import SamplingParams
from ..engine.scheduler import Scheduler
from ..errors import OuzelError
from ..kv.disk import DiskTier, model_fingerprint
from ..kv.manager import BlockManager, default_dtype, kv_shape
from ..kv.paged import BlockPool
from ..kv.snapshots import SnapshotDisk, SnapshotStore
from ..text.reasoning import ReasoningStream, opens_thought, reply_events
from ..text.tool_formats import ToolCall, ToolStream
from .errors import ApiError
from .prompt import ChatPrompt, Sampled, ToolReplay

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    model: str = "smollm2-135m"
    model_id: str = ""          # the name /v1/models reports (default: model)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    cors: bool = False
    ctx: int | None = None
    max_batch: int = 8
    block_size: int = 16
    kv_mem_mb: int = 1024       # the resident block pool
    step_tokens: int = 256      # prefill chunk budget per step
    kv_disk_dir: str | None = None
    kv_disk_space_mb: int = 4096
    kv_snapshot_every: int = 64  # private-state models: snapshot every N blocks (kv/snapshots.py)
    keepalive_s: float = 5.0
    max_body_bytes: int = 16 << 20


@dataclass
class Delta:
    """What handlers format: answer text, reasoning text, a tool call starting/finished, or the end."""
    kind: str  # "text" | "reasoning" | "call_start" | "call_done" | "done" | "keepalive"
    text: str = ""
    call: ToolCall | None = None
    logprobs: list | None = None  # [(token text, logprob, [(alt text, logprob)])]
    finish_reason: str | None = None
    usage: Usage | None = None
    stop_sequence: str | None = None


class ServeEngine:
    def __init__(self, llm, cfg: ServeConfig):
        self.llm, self.cfg = llm, cfg
        self.model_id = cfg.model_id or cfg.model
        dtype = default_dtype(llm.device)
        private = callable(getattr(llm.model, "new_kv", None))
        if private:
            # per-sequence private state (DeepSeek V4): the paged pool is unused, keep it tiny
            layers, heads, dim, n_blocks = 1, 1, 1, -(-llm.ctx // cfg.block_size) + 1
        else:
            layers, heads, dim = kv_shape(llm.model)
            per_block = 2 * layers * cfg.block_size * heads * dim * dtype.itemsize
            n_blocks = max(cfg.kv_mem_mb * 2**20 // per_block, -(-llm.ctx // cfg.block_size) + 1)
        self.pool = BlockPool(layers, n_blocks, cfg.block_size, heads, dim, dtype, llm.device)
        fp = model_fingerprint(llm.loaded.path, f"kv={dtype}", f"block={cfg.block_size}")
        disk = snaps = None
        if private:
            # the state is snapshotted whole at block boundaries: kv_mem_mb bounds resident
            # snapshots, and the disk tier holds snapshot files instead of block files
            sdisk = SnapshotDisk(cfg.kv_disk_dir, cfg.kv_disk_space_mb * 2**20, fp) if cfg.kv_disk_dir else None
            snaps = SnapshotStore(cfg.kv_mem_mb * 2**20, fp, cfg.block_size, cfg.kv_snapshot_every, sdisk)
        elif cfg.kv_disk_dir:
            disk = DiskTier(cfg.kv_disk_dir, cfg.kv_disk_space_mb * 2**20, fp)
        self.kv = BlockManager(self.pool, fp, disk, snaps)
        self.scheduler = Scheduler(llm.model, llm.tokenizer, self.kv, llm.ctx, cfg.max_batch,
                                   cfg.step_tokens, llm.device)
        self.replay = ToolReplay()
        self.chat = ChatPrompt(llm, self.replay)
        self.started = time.time()
        self.http_requests = 0

    def start(self) -> "ServeEngine":
        self.scheduler.start()
        return self

    def stop(self) -> None:
        self.scheduler.stop()
        if self.kv.disk is not None:
            self.kv.disk.flush()
        if self.kv.snapshots is not None and self.kv.snapshots.disk is not None:
            self.kv.snapshots.disk.flush()

    # --- prompts ---
    def encode(self, prompt) -> list[int]:
        """A completion prompt: text, or a list of token ids."""
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.llm.tokenize(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise ApiError(400, "'prompt' must be a string or an array of token ids", param="prompt")

    def validate(self, ids: list[int], params: SamplingParams) -> None:
        """Refuse (400) a request that could never run, before any response header is sent."""
        try:
            self.scheduler.check(ids, params.max_tokens)
        except OuzelError as e:
            self.scheduler.metrics.rejected += 1
            raise ApiError(400, str(e)) from None

    def ctx_left(self, ids: list[int]) -> int:
        return self.llm.ctx - len(ids)

    # --- generation ---
    async def stream(self, ids: list[int], params: SamplingParams, *, logprobs: int | None = None,
                     tools: bool = False, forced: str = "", text: str = "", reasoning: bool = False,
                     is_disconnected=None) -> AsyncIterator[Delta]:
        """Run one request; yield Deltas (and "keepalive" while nothing happens, e.g. a long
        prefill). Leaving the generator early (client gone) cancels the request and frees its KV.
        reasoning: a chat reply of a thinking model, split into reasoning and answer."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        req = Request(ids, params, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev), logprobs)
        try:
            self.scheduler.submit(req)
        except OuzelError as e:
            self.scheduler.metrics.rejected += 1
            raise ApiError(400, str(e)) from None
        parser = ToolStream(self.chat.format, forced) if tools else None
        # a forced call starts the reply, so there is no thought to split off
        split = ReasoningStream(opens_thought(text)) if reasoning and self.chat.thinks and not forced else None
        out = _Out()
        done = closed = False
        raw = [forced]           # the reply exactly as sampled (forced prefix included), for replay
        sampled: list[int] = []  # its token ids
        checked = loop.time()
        try:
            if parser is not None:
                for d in out.deltas(parser.events, None):
                    yield d
            while True:
                try:
                    ev = await asyncio.wait_for(queue.get(), self.cfg.keepalive_s)
                except asyncio.TimeoutError:
                    if is_disconnected is not None and await is_disconnected():
                        return
                    yield Delta("keepalive")
                    continue
                if is_disconnected is not None and loop.time() - checked > 1.0:
                    # a non-streaming client that hung up is noticed here, not only when idle
                    checked = loop.time()
                    if await is_disconnected():
                        return
                if ev.kind == "error":
                    done = True
                    raise ApiError(500, ev.error or "engine error", kind="server_error")
                lps = self._logprobs(ev) if ev.kind == "token" and ev.logprob is not None else None
                if ev.kind == "token" and not closed:
                    sampled.append(ev.token)
                if not closed:  # once a forced call is complete, what the model said after it is dropped
                    raw.append(ev.text)
                    for d in out.deltas(reply_events(split, parser, ev.text, ev.kind == "done"), lps):
                        yield d
                    # a forced call ends as soon as its JSON closes: stop sampling there, as a
                    # grammar would, instead of letting a small model ramble on
                    if forced and parser.in_call and self.chat.format.end_of(parser.buf, True) is not None:
                        for d in out.deltas(parser.finish(), None):
                            yield d
                        closed = True
                        req.cancel()
                        self.scheduler.wake()
                if ev.kind == "done":
                    done = True
                    for d in out.deltas([], None, final=True):
                        yield d
                    if parser is not None and parser.calls:
                        self.replay.remember([c.id for c in parser.calls],
                                             self._sampled("".join(raw), forced, text, ids, sampled))
                    reason = ev.finish_reason
                    if parser is not None and parser.calls:
                        reason = "tool_calls"
                    yield Delta("done", finish_reason=reason, usage=ev.usage, stop_sequence=ev.stop_sequence)
                    return
        finally:
            if not done:
                req.cancel()
                self.scheduler.wake()

    def _sampled(self, raw: str, forced: str, text: str, ids: list[int], sampled: list[int]) -> Sampled:
        generated = self.llm.tokenizer.decode(sampled)
        if not text.endswith(forced) or raw != forced + generated:  # e.g. a stop string cut the text
            return Sampled(raw)
        return Sampled(raw, text + generated, list(ids) + sampled)

    def _logprobs(self, ev: Event) -> list:
        tok = self.llm.tokenizer
        text = lambda i: tok.token_bytes(i).decode("utf-8", "replace")  # noqa: E731
        return [(text(ev.token), ev.logprob, [(text(i), lp) for i, lp in (ev.top or [])])]

    async def collect(self, ids, params, **kw) -> dict:
        """Non-streaming: the whole reply."""
        text, thought, calls, lps, end = [], [], [], [], None
        async for d in self.stream(ids, params, **kw):
            if d.kind in ("text", "reasoning"):
                (text if d.kind == "text" else thought).append(d.text)
                lps.extend(d.logprobs or [])
            elif d.kind == "call_done":
                calls.append(d.call)
            elif d.kind == "done":
                end = d
        return {"text": "".join(text), "reasoning": "".join(thought), "calls": calls, "logprobs": lps,
                "finish_reason": end.finish_reason, "usage": end.usage, "stop_sequence": end.stop_sequence}

    # --- observability ---
    def metrics_text(self) -> str:
        m, s = self.scheduler.metrics, self.scheduler.stats()
        rows = [
            ("ouzel_http_requests_total", "counter", self.http_requests),
            ("ouzel_requests_total", "counter", m.requests),
            ("ouzel_requests_finished_total", "counter", m.finished),
            ("ouzel_requests_cancelled_total", "counter", m.cancelled),
            ("ouzel_requests_rejected_total", "counter", m.rejected),
            ("ouzel_requests_running", "gauge", s["running"]),
            ("ouzel_requests_waiting", "gauge", s["waiting"]),
            ("ouzel_prompt_tokens_total", "counter", m.prompt_tokens),
            ("ouzel_generated_tokens_total", "counter", m.generated_tokens),
            ("ouzel_prefill_tokens_total", "counter", m.prefill_tokens),
            ("ouzel_cache_hit_tokens_total", "counter", s["cache_hit_tokens"]),
            ("ouzel_disk_hit_tokens_total", "counter", s["disk_hit_tokens"]),
            ("ouzel_prefill_tokens_per_second", "gauge", m.prefill_tokens / m.prefill_s if m.prefill_s else 0.0),
            ("ouzel_decode_tokens_per_second", "gauge", m.decode_tokens / m.decode_s if m.decode_s else 0.0),
            ("ouzel_kv_blocks_total", "gauge", s["blocks_total"]),
            ("ouzel_kv_blocks_in_use", "gauge", s["blocks_in_use"]),
            ("ouzel_kv_blocks_cached", "gauge", s["blocks_cached"]),
            ("ouzel_kv_disk_bytes", "gauge", s["disk_bytes"]),
            ("ouzel_kv_disk_bytes_written_total", "counter", s["disk_bytes_written"]),
            ("ouzel_kv_disk_files_discarded_total", "counter", s["disk_files_discarded"]),
            ("ouzel_tool_call_replays_total", "counter", self.replay.hits),
        ]
        lines = []
        for name, kind, value in rows:
            lines += [f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(lines) + "\n"


class _Out:
    """Parser events -> Deltas. A token's logprobs ride on the next text it produces (text held
    back by a parser comes out with a later token); left over at the end, on an empty text."""

    def __init__(self):
        self.lps: list = []

    def deltas(self, events, lps, final: bool = False) -> list[Delta]:
        self.lps += lps or []
        out = []
        for kind, value in events:
            if kind not in ("text", "reasoning"):
                out.append(Delta(kind, call=value))
            elif value or self.lps:
                out.append(Delta(kind, value, logprobs=self.lps or None))
                self.lps = []
        if final and self.lps:
            out.append(Delta("text", "", logprobs=self.lps))
            self.lps = []
        return out
