"""Prefix reuse for DeepSeek V4's compressed state through the scheduler: whole-state snapshots at
block boundaries (ouzel/kv/snapshots.py), resident and on disk. Every answer is compared with the
single-sequence generator on a fresh state (greedy), so a restored snapshot must continue exactly
as a full prefill would."""
from __future__ import annotations

import queue
import struct
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
pytest.importorskip("transformers")

from ouzel.engine.request import Request  # noqa: E402
from ouzel.engine.sampler import SamplingParams  # noqa: E402
from ouzel.engine.scheduler import Scheduler  # noqa: E402
from ouzel.kv.manager import BlockManager  # noqa: E402
from ouzel.kv.paged import BlockPool  # noqa: E402
from ouzel.kv.snapshots import SnapshotDisk, SnapshotStore  # noqa: E402

ROOT = b"v4-prefix-test!!"
N = 8  # reply tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import tiny_deepseek_v4 as v4
    return v4.tiny_fixture(tmp_path_factory)


def make(tiny, disk_dir=None, every=2, budget=64 << 20, step_tokens=16, full_every=16) -> Scheduler:
    disk = SnapshotDisk(disk_dir, 64 << 20, ROOT) if disk_dir else None
    snaps = SnapshotStore(budget, ROOT, 16, every, disk, full_every)
    llm = tiny.loaded
    return Scheduler(llm.model, llm.tokenizer, BlockManager(BlockPool(1, 64, 16, 1, 1), ROOT, None, snaps),
                     512, 4, step_tokens).start()


def run(s: Scheduler, ids: list[int], logprobs: list | None = None):
    q: queue.Queue = queue.Queue()
    s.submit(Request(ids, SamplingParams(temperature=0, max_tokens=N, ignore_eos=True), q.put,
                     logprobs=None if logprobs is None else 0))
    out = []
    while (e := q.get(timeout=300)).kind == "token":
        out.append(e.token)
        if logprobs is not None:
            logprobs.append(e.logprob)
    assert e.kind == "done", e.error
    return out, e.usage


def fresh(tiny, ids: list[int]) -> list[int]:
    return tiny.loaded.generate_ids(ids, max_tokens=N, temperature=0, ignore_eos=True)


def test_extension_restores_the_snapshot_and_answers_exactly(tiny):
    s = make(tiny)
    try:
        first = tiny.ids[:61].tolist()
        out1, u1 = run(s, first)
        assert u1.cached_tokens == 0 and out1 == fresh(tiny, first)
        # the conversation goes on: previous prompt + reply + a new turn
        second = first + out1 + tiny.ids[100:120].tolist()
        out2, u2 = run(s, second)
        # the finished sequence left a snapshot at its last block boundary (61 + 7 computed -> 64)
        assert u2.cached_tokens == 64
        assert out2 == fresh(tiny, second)
        # a request sharing only the first 40 tokens restores the every-2-blocks snapshot at 32
        branch = first[:40] + tiny.ids[130:140].tolist()
        out3, u3 = run(s, branch)
        assert u3.cached_tokens == 32 and out3 == fresh(tiny, branch)
        assert s.kv.stats()["snapshots"] >= 3
        # snapshots on top of an earlier one store only the compressed rows emitted since it
        deltas = [sn for sn in s.kv.snapshots.mem.values() if sn.base is not None]
        assert deltas
        for sn in deltas:  # layer 1 is CSA, ratio 4
            assert sn.state["1.compressor.rows"].shape[0] == (sn.n_tokens - sn.base_tokens) // 4
    finally:
        s.stop()


def test_three_interleaved_sessions_keep_their_prefixes(tiny):
    s = make(tiny, every=64)  # only the end-of-sequence snapshots
    try:
        starts = [tiny.ids[:37].tolist(), tiny.ids[40:90].tolist(), tiny.ids[95:140].tolist()]
        convo = [list(p) for p in starts]
        for turn in range(3):
            got = [None] * 3

            def go(i):
                got[i] = run(s, convo[i])
            threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
            [t.start() for t in threads]
            [t.join(300) for t in threads]
            for i in range(3):
                out, usage = got[i]
                assert out == fresh(tiny, convo[i])
                if turn:
                    assert usage.cached_tokens >= len(convo[i]) - N - 20 - 16 > 0
                convo[i] = convo[i] + out + tiny.ids[turn * 7:turn * 7 + 5].tolist()
    finally:
        s.stop()


def test_budget_evicts_least_recently_used_snapshots(tiny):
    s = make(tiny, every=1, budget=1)  # nothing fits: reuse silently off, answers still exact
    try:
        p = tiny.ids[:50].tolist()
        assert run(s, p)[0] == fresh(tiny, p)
        out, usage = run(s, p + [5, 6, 7])
        assert usage.cached_tokens == 0 and out == fresh(tiny, p + [5, 6, 7])
        assert s.kv.snapshots.used == 0
    finally:
        s.stop()


def by_length(d: Path) -> dict[int, Path]:
    """Snapshot files by the prefix length in their header (n_tokens, uint32 at offset 64)."""
    return {struct.unpack_from("<I", f.read_bytes(), 64)[0]: f for f in d.glob("*.kvs")}


def test_restart_finds_the_prefix_on_disk_and_bad_files_are_discarded(tiny, tmp_path):
    first = tiny.ids[:61].tolist()
    s = make(tiny, tmp_path)
    try:
        out1, _ = run(s, first)
    finally:
        s.stop()
        s.kv.snapshots.disk.flush()
    # boundaries 32 (every 2 blocks, a full record), 48 (the prompt's last, taken during prefill)
    # and 64 (the end of the sequence); 48 and 64 store only the compressed rows after their base,
    # plus the window and frontier
    assert sorted(by_length(tmp_path)) == [32, 48, 64]
    files = [by_length(tmp_path)[32], by_length(tmp_path)[64]]
    second = first + out1 + tiny.ids[100:120].tolist()
    want = fresh(tiny, second)

    s = make(tiny, tmp_path)  # a restart: nothing resident, the same directory
    try:
        out2, u2 = run(s, second)
        assert (u2.cached_tokens, u2.disk_tokens) == (64, 64)
        assert out2 == want
    finally:
        s.stop()

    # damage the longest snapshot (one payload byte): discarded, the 48-token one is used instead
    blob = bytearray(files[-1].read_bytes())
    blob[-5] ^= 0xFF
    files[-1].write_bytes(bytes(blob))
    s = make(tiny, tmp_path)
    try:
        out3, u3 = run(s, second)
        assert out3 == want
        assert u3.cached_tokens == 48
        assert s.kv.stats()["disk_files_discarded"] == 1
        assert not files[-1].exists() or files[-1].read_bytes() != bytes(blob)
    finally:
        s.stop()

    # damage the chain's first snapshot (32 tokens): the later ones store only rows after it, so
    # none is usable; the base file is discarded and the request prefills from scratch
    blob = bytearray(by_length(tmp_path)[32].read_bytes())
    blob[140] ^= 0x01
    by_length(tmp_path)[32].write_bytes(bytes(blob))
    s = make(tiny, tmp_path)
    try:
        out4, u4 = run(s, second)
        assert out4 == want and u4.cached_tokens == 0
        assert s.kv.stats()["disk_files_discarded"] == 1
    finally:
        s.stop()

    # a truncated file: also discarded; the request prefills from scratch
    for f in tmp_path.glob("*.kvs"):
        f.write_bytes(f.read_bytes()[:100])
    s = make(tiny, tmp_path)
    try:
        out5, u5 = run(s, second)
        assert out5 == want and u5.cached_tokens == 0
        assert s.kv.stats()["disk_files_discarded"] >= 1
    finally:
        s.stop()


def test_snapshot_chains_are_capped(tiny, tmp_path):
    """Every K-th snapshot of a chain is stored whole: a restore reads at most K records, and
    records before the chain's last full one are not needed."""
    K = 4
    first = tiny.ids[:130].tolist()  # a snapshot at each of the 8 block boundaries 16..128
    s = make(tiny, tmp_path, every=1, full_every=K)
    try:
        out1, _ = run(s, first)
    finally:
        s.stop()
        s.kv.snapshots.disk.flush()
    files = by_length(tmp_path)
    base_tokens = {n: struct.unpack_from("<I", f.read_bytes(), 120)[0] for n, f in files.items()}
    assert base_tokens == {16: 0, 32: 16, 48: 32, 64: 48, 80: 0, 96: 80, 112: 96, 128: 112}
    for n in (16, 32, 48, 64):  # the first chain: restoring 128 must not need it
        files[n].unlink()

    second = first + out1 + tiny.ids[140:150].tolist()
    live_lp: list[float] = []
    s = make(tiny, every=1, full_every=K)  # no cache: the live computation, chunked the same way
    try:
        live, _ = run(s, second, live_lp)
    finally:
        s.stop()
    restored_lp: list[float] = []
    s = make(tiny, tmp_path, every=1, full_every=K)  # a restart on the same directory
    try:
        out2, u2 = run(s, second, restored_lp)
        assert (u2.cached_tokens, u2.disk_tokens) == (128, 128)
        assert s.kv.snapshots.records_read == K
        assert out2 == live == fresh(tiny, second)
        assert restored_lp == live_lp  # bit for bit: the restored state is the live one
    finally:
        s.stop()


def test_restored_state_is_the_live_one_bit_for_bit(tmp_path):
    """A snapshot stores the window and frontier rows of the tokens since its base only; composing
    the chain gives back every tensor of the live state exactly (trimmed finals included), resident
    and after a restart, and a record 16 tokens after its base holds only those 16 tokens' rows."""
    import torch

    from ouzel.kv.compressed import CompressedKV
    from tiny_deepseek_v4 import LAYERS

    g = torch.Generator().manual_seed(3)
    series = {"compressed_sparse_attention": [("compressor", 32, 4, True), ("indexer", 16, 4, True)],
              "heavily_compressed_attention": [("compressor", 32, 16, False)]}

    def feed(st: CompressedKV, n: int) -> None:  # the calls the attention layers make, random rows
        pos = torch.arange(st.length, st.length + n)
        for i, kind in enumerate(LAYERS):
            st.window(i, torch.randn(n, 32, generator=g), pos, 8)
            for name, dim, ratio, overlap in series.get(kind, []):
                c = 2 if overlap else 1
                kv, _, _, _ = st.frontier(i, name, torch.randn(n, c * dim, generator=g),
                                          torch.randn(n, c * dim, generator=g), ratio, overlap)
                st.append_rows(i, name, torch.randn(kv.shape[0] // ratio, dim, generator=g), dim)
        st.commit(n)

    def manager(disk_dir: Path) -> BlockManager:
        snaps = SnapshotStore(64 << 20, ROOT, 16, 1, SnapshotDisk(disk_dir, 64 << 20, ROOT))
        return BlockManager(BlockPool(1, 64, 16, 1, 1), ROOT, None, snaps)

    kv, tokens = manager(tmp_path), list(range(2, 202))
    live, keys, snap, seen = CompressedKV(len(LAYERS), 512), [], None, {}
    for n in (5, 11, 16, 1, 15, 30, 2, 16, 9, 34):  # snapshots at 16, 32, 48, 80, 96 and (final) 128
        feed(live, n)
        snap = kv.snapshot(tokens, keys, live, snap)
        seen[live.length] = (live.meta(), {k: t.clone() for k, t in live.state().items()})
    kv.snapshot(tokens, keys, live, snap, final=True)  # trims 139 -> 128 first
    seen[128] = (live.meta(), live.state())
    kv.snapshots.disk.flush()
    at_48 = kv.snapshots.mem[keys[2]]
    assert at_48.base_tokens == 32 and {t.shape[0] for k, t in at_48.state.items() if k.endswith(".raw")} == {16}
    for restart in (False, True):
        if restart:
            kv = manager(tmp_path)
        for n in (16, 32, 48, 80, 96, 128):
            st = CompressedKV(len(LAYERS), 512)
            assert kv.restore(tokens[:n + 1], st) == n
            meta, want = seen[n]
            got = st.state()
            assert st.meta() == meta and got.keys() == want.keys()
            assert all(torch.equal(got[k], want[k]) for k in want), n


def serve_dir(tiny, tmp_path: Path) -> Path:
    """A copy of the tiny V4's directory that `ouzel serve` accepts (it wants a chat template)."""
    import json
    import shutil

    model = tmp_path / "hf"
    shutil.copytree(tiny.dir, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    return model


def test_real_server_sigkill_restart_finds_the_v4_prefix(tiny, tmp_path):
    """`ouzel serve` on the tiny V4 over loopback: a continued prompt is served from the snapshot,
    also after a SIGKILL and restart with the same --kv-disk-dir; a damaged file is discarded."""
    import time

    import openai
    from server_util import Server

    model = serve_dir(tiny, tmp_path)

    def start():
        return Server("-m", str(model), "--model-id", "v4", "--ctx", "256", "--kv-snapshot-every", "2",
                      "--kv-disk-dir", str(tmp_path / "kv"), log_path=str(tmp_path / "server.log"))

    def ask(s, ids):
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)
        r = c.completions.create(model="v4", prompt=ids, max_tokens=N, temperature=0)
        return r.choices[0].text, r.usage.prompt_tokens_details.cached_tokens

    first = tiny.ids[:61].tolist()
    s = start()
    try:
        text1, cached1 = ask(s, first)
        second = first + tiny.loaded.tokenizer.encode(text1, add_special=False) + [7, 8, 9]
        text2, cached2 = ask(s, second)
        assert cached1 == 0 and cached2 >= 32
        for _ in range(100):  # written by a background thread
            if len(list((tmp_path / "kv").glob("*.kvs"))) >= 2:
                break
            time.sleep(0.1)
    finally:
        s.kill()
    s = start()
    try:
        assert ask(s, second) == (text2, cached2)
        assert s.metrics()["ouzel_disk_hit_tokens_total"] == cached2
    finally:
        s.kill()
    for f in (tmp_path / "kv").glob("*.kvs"):
        blob = bytearray(f.read_bytes())
        blob[200] ^= 0xFF
        f.write_bytes(bytes(blob))
    s = start()
    try:
        text3, cached3 = ask(s, second)
        assert (text3, cached3) == (text2, 0)
        assert s.metrics()["ouzel_kv_disk_files_discarded_total"] >= 1
    finally:
        s.stop()


def test_real_server_sigkill_mid_reply_keeps_the_prompt_snapshot(tiny, tmp_path):
    """The snapshot at the prompt's last block boundary is taken (and written) when the prefill
    reaches it, not when the reply ends: after a SIGKILL mid-reply the resend prefills only the tail."""
    from server_util import Server, openai_client, stream_mid_reply

    model = serve_dir(tiny, tmp_path)
    prompt = tiny.ids[:100].tolist()  # 6 full blocks of prompt[:-1]; no every-64-blocks boundary

    def start():
        return Server("-m", str(model), "--model-id", "v4", "--ctx", "512", "--kv-disk-dir", str(tmp_path / "kv"),
                      log_path=str(tmp_path / "server.log"))

    s = start()
    try:
        chunks = stream_mid_reply(s, "v4", prompt, lambda: by_length(tmp_path / "kv"))
    finally:
        s.kill()  # SIGKILL mid-reply: no finish, no shutdown hook
    assert sorted(by_length(tmp_path / "kv")) == [96]

    s = start()
    try:
        again = openai_client(s).completions.create(model="v4", prompt=prompt, max_tokens=N, temperature=0)
        assert again.usage.prompt_tokens_details.cached_tokens == 96
        assert s.metrics()["ouzel_disk_hit_tokens_total"] == 96
        assert again.choices[0].text.startswith("".join(c.choices[0].text for c in chunks))
    finally:
        s.stop()
