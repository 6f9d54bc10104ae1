"""The batching scheduler without HTTP: exact batching, admission control and preemption."""
from __future__ import annotations

import queue
import threading

import pytest

from conftest import real_llm
from ouzel.engine.request import Request
from ouzel.engine.sampler import SamplingParams
from ouzel.engine.scheduler import Scheduler
from ouzel.errors import OuzelError
from ouzel.kv.cache import DenseKV
from ouzel.kv.manager import BlockManager, kv_shape
from ouzel.kv.paged import BlockPool


def make(n_blocks: int, ctx: int = 256, max_batch: int = 8, step_tokens: int = 64, model=None):
    llm = real_llm("smollm2-135m")
    layers, heads, dim = kv_shape(llm.model)
    pool = BlockPool(layers, n_blocks, 16, heads, dim)
    return llm, Scheduler(model or llm.model, llm.tokenizer, BlockManager(pool, b"t" * 16), ctx, max_batch,
                          step_tokens).start()


class PrivateStateModel:
    """The real model behind the interface of models whose state is not paged (DeepSeek V4's
    `new_kv`): the scheduler must give each sequence its own state."""

    def __init__(self, model):
        self.inner, self.config, self.model = model, model.config, model.model

    def new_kv(self, max_tokens, device):
        return DenseKV(len(self.inner.model.layers), max_tokens, device)

    def __call__(self, ids, positions, kv):
        assert isinstance(kv, DenseKV)
        return self.inner(ids, positions, kv)

    def logits(self, hidden):
        return self.inner.logits(hidden)


def run(s: Scheduler, ids: list[int], n: int) -> list[int]:
    q: queue.Queue = queue.Queue()
    s.submit(Request(ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), q.put))
    out = []
    while (e := q.get()).kind == "token":
        out.append(e.token)
    assert e.kind == "done", e.error
    return out


def prompts(llm, k: int) -> list[list[int]]:
    return [llm.chat_prompt([{"role": "user", "content": f"Give me fact number {i} about owls."}]) for i in range(k)]


def test_matches_the_single_sequence_generator():
    llm, s = make(64)
    try:
        p = prompts(llm, 1)[0]
        assert run(s, p, 12) == llm.generate_ids(p, max_tokens=12, temperature=0, ignore_eos=True)
    finally:
        s.stop()


def test_full_pool_queues_and_preempts_but_answers_exactly():
    """6 requests of ~5 blocks each on a 12-block pool: they wait or get preempted, never fail."""
    llm, s = make(12, ctx=180)
    try:
        ps = prompts(llm, 6)
        alone = [run(s, p, 30) for p in ps]
        together = [None] * len(ps)

        def go(i):
            together[i] = run(s, ps[i], 30)
        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(ps))]
        [t.start() for t in threads]
        [t.join(300) for t in threads]
        assert together == alone
        assert s.kv.pool.in_use() == 0
    finally:
        s.stop()


def test_private_state_models_are_scheduled_too():
    llm, paged = make(64)
    try:
        ps = prompts(llm, 3)
        want = [run(paged, p, 10) for p in ps]
    finally:
        paged.stop()
    _, s = make(64, model=PrivateStateModel(llm.model), step_tokens=16)  # 16: prefill in chunks
    try:
        got = [None] * 3

        def go(i):
            got[i] = run(s, ps[i], 10)
        threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
        [t.start() for t in threads]
        [t.join(300) for t in threads]
        assert got == want
    finally:
        s.stop()


def test_long_prefill_is_chunked_and_does_not_block_a_short_request():
    llm, s = make(128, ctx=1024, step_tokens=64)
    try:
        long_ids = llm.chat_prompt([{"role": "user", "content": "Summarise: " + "the owl hoots at night. " * 60}])
        assert len(long_ids) > 5 * 64
        order: queue.Queue = queue.Queue()  # (name, event kind) in arrival order
        for name, ids in (("long", long_ids), ("short", prompts(llm, 1)[0])):  # long is queued first
            s.submit(Request(ids, SamplingParams(temperature=0, max_tokens=3),
                             lambda e, name=name: order.put((name, e.kind))))
        seen = []
        while sum(kind != "token" for _, kind in seen) < 2:
            seen.append(order.get(timeout=300))
        names = [n for n, kind in seen if kind == "token"]
        assert names.index("short") < names.index("long")
        assert s.metrics.steps >= len(long_ids) // 64
    finally:
        s.stop()


def test_request_that_can_never_fit_is_refused():
    llm, s = make(4, ctx=1000)
    try:
        with pytest.raises(OuzelError, match="KV blocks"):
            s.submit(Request(list(range(10, 70)), SamplingParams(max_tokens=10), lambda e: None))
        with pytest.raises(OuzelError, match="context"):
            s.submit(Request(list(range(10, 70)), SamplingParams(max_tokens=2000), lambda e: None))
    finally:
        s.stop()


def test_deepseek_v4_private_state_through_the_scheduler(tmp_path_factory):
    """The tiny random DeepSeek V4 (compressed state, not paged) served by the same scheduler:
    concurrent, chunk-prefilled sequences equal the single-sequence generator."""
    pytest.importorskip("transformers")
    import tiny_deepseek_v4 as v4
    tiny = v4.tiny_fixture(tmp_path_factory)
    llm = tiny.loaded
    prompts_v4 = [tiny.ids[:n].tolist() for n in (37, 50, 61)]
    want = [llm.generate_ids(p, max_tokens=8, temperature=0, ignore_eos=True) for p in prompts_v4]
    pool = BlockPool(1, 64, 16, 1, 1)
    s = Scheduler(llm.model, llm.tokenizer, BlockManager(pool, b"v" * 16), 256, 4, 16).start()
    try:
        got = [None] * 3

        def go(i):
            got[i] = run(s, prompts_v4[i], 8)
        threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
        [t.start() for t in threads]
        [t.join(300) for t in threads]
        assert got == want
    finally:
        s.stop()
