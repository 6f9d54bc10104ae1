"""DeepSeek V4 sequences batched in one forward (`MultiState`): per-row work runs over all rows, the
compressed attention per sequence, so a batch must equal its sequences run alone."""
from __future__ import annotations

import json
import queue
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
pytest.importorskip("transformers")

from ouzel.engine.request import Request  # noqa: E402
from ouzel.engine.sampler import SamplingParams  # noqa: E402
from ouzel.engine.scheduler import Scheduler  # noqa: E402
from ouzel.kv.compressed import MultiState  # noqa: E402
from ouzel.kv.manager import BlockManager  # noqa: E402
from ouzel.kv.paged import BlockPool  # noqa: E402

N = 8  # reply tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import tiny_deepseek_v4 as v4
    return v4.tiny_fixture(tmp_path_factory)


def prefilled(model, ids: list[int]):
    kv = model.new_kv(512)
    if ids:
        model(torch.tensor(ids), torch.arange(len(ids)), kv)
        kv.commit(len(ids))
    return kv


def fresh(tiny, ids: list[int]) -> list[int]:
    return tiny.loaded.generate_ids(ids, max_tokens=N, temperature=0, ignore_eos=True)


@torch.inference_mode()
def test_one_forward_over_several_states_equals_each_alone(tiny):
    model, ids = tiny.loaded.model, tiny.ids.tolist()
    # (tokens already in the state, new tokens): prefill chunks on a fresh and on a used state,
    # and decode rows past CSA (ratio 4) and HCA (ratio 16) boundaries
    seqs = [([], ids[:13]), (ids[20:41], ids[41:70]), (ids[70:107], ids[107:108]), (ids[:63], ids[63:64])]
    alone = [prefilled(model, p) for p, _ in seqs]
    batch = [prefilled(model, p) for p, _ in seqs]
    for step in range(2):  # then one decode row each, on the committed states
        new = [chunk if step == 0 else [7 + i] for i, (_, chunk) in enumerate(seqs)]
        want = []
        for kv, rows in zip(alone, new):
            want.append(model(torch.tensor(rows), torch.arange(kv.length, kv.length + len(rows)), kv))
            kv.commit(len(rows))
        pos = [p for kv, rows in zip(batch, new) for p in range(kv.length, kv.length + len(rows))]
        multi = model.batch_kv([(kv, len(rows)) for kv, rows in zip(batch, new)])
        got = model(torch.tensor(sum(new, [])), torch.tensor(pos), multi)
        multi.commit(len(pos))
        torch.testing.assert_close(got, torch.cat(want), rtol=1e-5, atol=1e-5)
        for a, b in zip(alone, batch):
            assert a.meta() == b.meta()
            sa, sb = a.state(), b.state()
            assert sa.keys() == sb.keys()
            for k in sa:
                torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-5)  # BLAS blocking


def test_multistate_checks_its_row_count(tiny):
    multi = MultiState([(tiny.loaded.model.new_kv(64), 3), (tiny.loaded.model.new_kv(64), 1)])
    assert [s for _, s in multi.split(4)] == [slice(0, 3), slice(3, 4)]
    with pytest.raises(ValueError):
        multi.commit(5)


def test_scheduler_runs_a_step_in_one_forward(tiny, monkeypatch):
    """Prefill chunks (16 tokens a step) and decode rows of three requests share each forward."""
    llm = tiny.loaded
    segments = []
    forward = llm.model.forward

    def counting(ids, positions, kv):
        segments.append(len(kv.segments))
        return forward(ids, positions, kv)
    monkeypatch.setattr(llm.model, "forward", counting)
    s = Scheduler(llm.model, llm.tokenizer, BlockManager(BlockPool(1, 64, 16, 1, 1), b"v4-batch-test!!!", None),
                  512, 4, 16)
    prompts = [tiny.ids[:37].tolist(), tiny.ids[40:45].tolist(), tiny.ids[50:71].tolist()]
    queues = [queue.Queue() for _ in prompts]
    for p, q in zip(prompts, queues):  # all queued before the engine starts: admitted together
        s.submit(Request(p, SamplingParams(temperature=0, max_tokens=N, ignore_eos=True), q.put))
    s.start()
    outs = []
    try:
        for q in queues:
            outs.append([])
            while (e := q.get(timeout=120)).kind == "token":
                outs[-1].append(e.token)
            assert e.kind == "done", e.error
    finally:
        s.stop()
    monkeypatch.undo()
    assert outs == [fresh(tiny, p) for p in prompts]
    # alone, each request would take its prefill chunks plus N - 1 decode forwards
    assert max(segments) == 3 and len(segments) < sum(-(-len(p) // 16) + N - 1 for p in prompts)


def test_real_server_concurrent_clients_answer_as_alone(tiny, tmp_path):
    openai = pytest.importorskip("openai")
    from server_util import Server

    model = tmp_path / "hf"
    shutil.copytree(tiny.dir, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # serve wants one
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    prompts = [tiny.ids[:61].tolist(), tiny.ids[70:75].tolist(), tiny.ids[80:110].tolist(), tiny.ids[3:20].tolist()]
    s = Server("-m", str(model), "--model-id", "v4", "--ctx", "256", "--max-batch", "4",
               log_path=str(tmp_path / "server.log"))
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)

        def ask(ids):
            return c.completions.create(model="v4", prompt=ids, max_tokens=N, temperature=0).choices[0].text
        together = [None] * len(prompts)
        start = threading.Barrier(len(prompts))

        def go(i):
            start.wait()
            together[i] = ask(prompts[i])
        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
        [t.start() for t in threads]
        [t.join(120) for t in threads]
        assert together == [ask(p) for p in prompts]  # alone, one after another
    finally:
        s.stop()
