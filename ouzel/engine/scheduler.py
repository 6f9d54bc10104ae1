"""Continuous batching on one background thread.

Each step builds one flattened batch: every running sequence that is decoding contributes its
next token, then prefilling sequences contribute chunks until the step's token budget is spent
(so a long prefill is cut into chunks interleaved with everybody else's decode). The model runs
once over the batch through a `BatchKV` view of the shared block pool; rows that end a
sequence's pending tokens are sampled.

Models whose attention state is not paged K/V (DeepSeek V4's compressed state: the model has
`new_kv(max_tokens, device)`) get one private state per sequence; each step runs the planned chunks
in one forward over the model's join of those states (`batch_kv`: only attention loops over them),
or one forward per sequence for a model without one. Scheduling, chunked prefill, streaming and
cancellation are the same; prefix reuse goes through whole-state snapshots at block boundaries,
keyed by the same chain keys (`BlockManager.restore` / `snapshot`, `ouzel.kv.snapshots`): prefill
chunks stop at snapshot boundaries (every N blocks, and the prompt's last block boundary, so the
prompt's prefix is on disk before the reply starts), and a finished sequence leaves a snapshot at
its last block boundary.

Admission control: a request whose prompt plus max_tokens can never fit the pool is refused at
submit (OuzelError -> HTTP 4xx); one that does not fit now waits in the queue. When a decode step
finds no free block, the most recently admitted other sequence is preempted: its named blocks stay
in the prefix cache and it is re-queued, so it resumes by recomputing little or nothing.
"""
from __future__ import annotations

import collections
import logging
import threading
import time

import torch

from ..errors import OuzelError
from ..kv.manager import BlockManager
from ..kv.paged import BatchKV, Segment
from .request import Event, Request, Running, Usage

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self):
        self.requests = self.finished = self.cancelled = self.rejected = 0
        self.prompt_tokens = self.generated_tokens = self.cached_tokens = 0
        self.prefill_tokens = self.decode_tokens = 0
        self.prefill_s = self.decode_s = 0.0
        self.steps = 0


class Scheduler:
    def __init__(self, model, tokenizer, manager: BlockManager, ctx: int, max_batch: int = 8,
                 step_tokens: int = 256, device: torch.device | str = "cpu"):
        self.model, self.tokenizer, self.kv = model, tokenizer, manager
        self.ctx, self.max_batch, self.step_tokens = ctx, max_batch, max(step_tokens, max_batch)
        self.device = torch.device(device)
        self.eog = set(tokenizer.eot_ids)
        self.private_state = callable(getattr(model, "new_kv", None))
        self.waiting: collections.deque[Request] = collections.deque()
        self.resumed: dict[int, Running] = {}  # preempted sequences waiting to be re-admitted
        self.running: list[Running] = []
        self.metrics = Metrics()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    # --- called from other threads ---
    def check(self, prompt: list[int], max_tokens: int) -> None:
        """Raise OuzelError if the request could never run (the server answers 4xx)."""
        if not prompt:
            raise OuzelError("empty prompt: nothing to condition on")
        if len(prompt) + max_tokens > self.ctx:
            raise OuzelError(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the "
                             f"context of {self.ctx} tokens (--ctx)")
        need = self.kv.pool.blocks_for(len(prompt) + max_tokens)
        if need > self.kv.pool.n_blocks:
            raise OuzelError(f"request needs {need} KV blocks; the pool holds {self.kv.pool.n_blocks}")
        bad = [t for t in prompt if not 0 <= t < self.tokenizer.vocab_size]
        if bad:
            raise OuzelError(f"token id {bad[0]} is outside the vocabulary (0..{self.tokenizer.vocab_size - 1})")

    def submit(self, req: Request) -> Request:
        self.check(req.prompt, req.params.max_tokens)
        with self._cv:
            self.waiting.append(req)
            self.metrics.requests += 1
            self._cv.notify()
        return req

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._loop, name="ouzel-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self.waiting and not self.running:
                    self._cv.wait()
                if self._stop:
                    return
            try:
                progressed = self.step()
            except Exception as e:  # never let one bad step kill the server: fail what was running
                log.exception("engine step failed")
                for run in list(self.running):
                    self._finish(run, "error", error=f"engine error: {e}")
                if not self.running and self.waiting:  # it failed while admitting: drop that one
                    with self._cv:
                        req = self.waiting.popleft()
                    req.emit(Event("error", error=f"engine error: {e}"))
                continue
            if not progressed:  # everyone is waiting for blocks: don't spin
                with self._cv:
                    self._cv.wait(0.01)

    # --- one step (engine thread) ---
    @torch.inference_mode()
    def step(self) -> bool:
        self._reap()
        self._admit()
        plan = self._plan()
        if not plan:
            return False
        t0 = time.perf_counter()
        ids = [t for run, n in plan for t in run.tokens[run.computed:run.computed + n]]
        hidden = self._forward_private(plan) if self.private_state else self._forward_paged(plan, ids)
        rows, sample = [], []
        off = 0
        for run, n in plan:
            run.computed += n
            off += n
            if self.private_state:
                run.snap = self.kv.snapshot(run.tokens, run.keys, run.state, run.snap)
            else:
                self.kv.filled(run.tokens, run.blocks, run.keys, run.computed)
                if run.pending == 0 and run.generated == 0:
                    # the prompt is in: its full blocks go to disk now, so a crash mid-reply keeps them
                    self.kv.persist(run.blocks)
            if run.pending == 0:
                rows.append(off - 1)
                sample.append(run)
        if rows:
            logits = self.model.logits(hidden[rows]).float()
            # every request's draw on the device, then one read-back for the batch (not one per request)
            draws = [run.sampler.pick(logits[i]) for i, run in enumerate(sample) if run.req.params.max_tokens]
            toks = iter(torch.cat(draws).tolist() if draws else [])
            for i, run in enumerate(sample):
                self._sampled(run, logits[i], next(toks) if run.req.params.max_tokens else None)
        dt = time.perf_counter() - t0
        n_decode = sum(1 for run, n in plan if n == 1 and run.generated > 0)
        m = self.metrics
        m.steps += 1
        m.prefill_tokens += len(ids) - n_decode
        m.decode_tokens += n_decode
        if len(ids) > n_decode:
            m.prefill_s += dt
        else:
            m.decode_s += dt
        return True

    def _forward_paged(self, plan, ids: list[int]) -> torch.Tensor:
        """One forward over every sequence's chunk: hidden [sum of chunks, D]."""
        pos = [p for run, n in plan for p in range(run.computed, run.computed + n)]
        kv = BatchKV(self.kv.pool, [Segment(run.blocks, run.computed, n) for run, n in plan])
        hidden = self.model(torch.tensor(ids, device=self.device), torch.tensor(pos, device=self.device), kv)
        kv.commit(len(ids))
        return hidden

    def _forward_private(self, plan) -> torch.Tensor:
        """Sequences with their own state (not pageable), same output layout: one forward over
        every chunk if the model joins states (`batch_kv`), else one forward per sequence."""
        join = getattr(self.model, "batch_kv", None)
        if join is None:
            return torch.cat([self._forward_state(run.state, [(run, n)]) for run, n in plan])
        return self._forward_state(join([(run.state, n) for run, n in plan]), plan)

    def _forward_state(self, kv, plan) -> torch.Tensor:
        ids = [t for run, n in plan for t in run.tokens[run.computed:run.computed + n]]
        pos = [p for run, n in plan for p in range(run.computed, run.computed + n)]
        hidden = self.model(torch.tensor(ids, device=self.device), torch.tensor(pos, device=self.device), kv)
        kv.commit(len(ids))
        return hidden

    def _reap(self) -> None:
        for run in [r for r in self.running if r.req.cancelled]:
            self._finish(run, "cancelled")
        with self._cv:
            keep = [r for r in self.waiting if not r.cancelled]
            for r in self.waiting:
                if r.cancelled:
                    run = self.resumed.pop(r.id, None)
                    usage = run.usage if run else Usage(prompt_tokens=len(r.prompt))
                    if run:
                        usage.completion_tokens = run.generated
                    r.emit(Event("done", finish_reason="cancelled", usage=usage))
                    self.metrics.cancelled += 1
            self.waiting = collections.deque(keep)

    def _admit(self) -> None:
        pool = self.kv.pool
        while self.waiting and len(self.running) < self.max_batch:
            req = self.waiting[0]
            run = self.resumed.get(req.id)
            n = len(run.tokens) if run else len(req.prompt)
            # room for the whole prompt plus one decode block for everyone running
            if not self.private_state and pool.blocks_for(n + 1) + len(self.running) > pool.available():
                break
            with self._cv:
                self.waiting.popleft()
            self.resumed.pop(req.id, None)
            if run is None:
                run = Running(req, self.tokenizer, self.device)
            disk_before = self.kv.disk_hit_tokens
            if self.private_state:
                run.state, run.keys = self.model.new_kv(self.ctx, self.device), []
                run.computed = self.kv.restore(run.tokens, run.state)
                run.snap = None
                if run.computed:  # later snapshots of this sequence store only what is new since
                    run.snap = (self.kv.index.keys_of(run.tokens[:run.computed])[-1], run.computed)
            else:
                run.blocks, run.computed = self.kv.match(run.tokens)
                run.keys = []
                self.kv.filled(run.tokens, run.blocks, run.keys, run.computed)
                # reserve the whole prompt now, so admitted prefills never wait on each other
                self.kv.grow(run.blocks, len(run.tokens))
            if run.generated == 0:
                run.usage.cached_tokens = run.computed
                run.usage.disk_tokens = self.kv.disk_hit_tokens - disk_before
                self.metrics.cached_tokens += run.computed
            self.running.append(run)

    def _plan(self) -> list[tuple[Running, int]]:
        plan: list[tuple[Running, int]] = []
        budget = self.step_tokens
        decoding = [r for r in self.running if r.pending == 1]
        # fewest pending tokens first: a short prompt is not stuck behind a long one's chunks
        prefilling = sorted((r for r in self.running if r.pending > 1), key=lambda r: r.pending)
        for run in decoding:
            if run in self.running and self._ensure(run, run.computed + 1, preempt=True):
                plan.append((run, 1))
                budget -= 1
        plan = [(r, n) for r, n in plan if r in self.running]  # drop any preempted meanwhile
        budget = self.step_tokens - len(plan)
        for run in prefilling:
            if budget <= 0:
                break
            if run not in self.running:
                continue
            n = min(run.pending, budget, self._to_snapshot(run))
            if not self._ensure(run, run.computed + n, preempt=False):
                # take what fits in the blocks already held
                n = min(n, len(run.blocks) * self.kv.block_size - run.computed)
                if n <= 0:
                    continue
            plan.append((run, n))
            budget -= n
        return plan

    def _to_snapshot(self, run: Running) -> int:
        """Private state is snapshotted only at exact block boundaries: end chunks there."""
        stop = self.kv.snapshot_stop(run.tokens, run.computed) if self.private_state else None
        return run.pending if stop is None else stop - run.computed

    def _ensure(self, run: Running, n_tokens: int, preempt: bool) -> bool:
        if self.private_state:
            return True
        while not self.kv.grow(run.blocks, n_tokens):
            victims = [r for r in self.running if r is not run]
            if not preempt or not victims:
                return False
            # newest first: the oldest requests keep making progress, so nothing starves
            self._preempt(max(victims, key=lambda r: r.req.arrival))
        return True

    def _preempt(self, run: Running) -> None:
        log.info("preempting request %d (KV pool full)", run.req.id)
        self.kv.release(run.blocks, persist=False)
        run.computed = 0
        self.running.remove(run)
        self.resumed[run.req.id] = run
        with self._cv:
            self.waiting.appendleft(run.req)

    def _sampled(self, run: Running, logits: torch.Tensor, tok: int | None) -> None:
        """Handle run's next token `tok`, drawn from its logits (None: a prefill-only request)."""
        now = time.perf_counter()
        if run.first_token_at is None:
            run.first_token_at = now
            run.usage.prefill_s = now - run.req.arrival
        if run.req.params.max_tokens == 0:  # prefill only (e.g. to warm the prefix cache)
            return self._finish(run, "length")
        if tok in self.eog and not run.req.params.ignore_eos:
            return self._finish(run, "stop")
        run.generated += 1
        self.metrics.generated_tokens += 1
        lp, top = run.log_probs(logits, tok)
        text = run.stops.push(run.decoder.push(tok))
        if run.stops.stopped:
            run.req.emit(Event("token", text=text, token=tok, logprob=lp, top=top))
            return self._finish(run, "stop")
        run.req.emit(Event("token", text=text, token=tok, logprob=lp, top=top))
        if run.generated >= run.req.params.max_tokens or len(run.tokens) + 1 > self.ctx:
            return self._finish(run, "length")
        run.tokens.append(tok)

    def _finish(self, run: Running, reason: str, error: str | None = None) -> None:
        if run in self.running:
            self.running.remove(run)
        tail = ""
        if reason in ("stop", "length") and not run.stops.stopped:
            tail = run.stops.push(run.decoder.flush())
            tail += "" if run.stops.stopped else run.stops.flush()
        self.kv.release(run.blocks, persist=reason != "error")
        if run.state is not None and reason != "error":
            self.kv.snapshot(run.tokens, run.keys, run.state, run.snap, final=True)
        run.state = None
        u = run.usage
        u.completion_tokens = run.generated
        if run.first_token_at is not None:
            u.decode_s = time.perf_counter() - run.first_token_at
        m = self.metrics
        m.finished += 1
        m.prompt_tokens += u.prompt_tokens
        if reason == "cancelled":
            m.cancelled += 1
        if error:
            run.req.emit(Event("error", error=error))
        else:
            run.req.emit(Event("done", text=tail, finish_reason=reason, usage=u, stop_sequence=run.stops.matched))

    def stats(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting), **self.kv.stats()}
