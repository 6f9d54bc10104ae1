"""Self-consistency on a real model: incremental = full forward; chat turn 2 = a fresh run."""
import pytest
import torch

import ouzel
from conftest import real_llm
from ouzel.engine.generate import Sequence


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_incremental_decode_equals_full_forward():
    llm = real_llm("smollm2-135m")
    ids = llm.tokenize("The quick brown fox jumps over the lazy dog because it was")
    full = llm.logits(ids)
    seq = Sequence(llm.model, 64, llm.device)
    steps = [seq.prefill(ids[:3])]
    steps += [seq.step(t) for t in ids[3:]]
    inc = torch.stack(steps)
    assert rel(inc, full[2:]) < 1e-5


def test_prefill_in_chunks_equals_one_forward(monkeypatch):
    from ouzel.engine import generate
    llm = real_llm("smollm2-135m")
    ids = llm.tokenize("one two three four five six seven eight nine ten eleven twelve")
    whole = Sequence(llm.model, 64, llm.device).prefill(ids)
    monkeypatch.setattr(generate, "PREFILL_CHUNK", 5)
    chunked = Sequence(llm.model, 64, llm.device).prefill(ids)
    assert rel(chunked, whole) < 1e-5


def test_prefill_chunk_from_the_environment(monkeypatch):
    """OUZEL_PREFILL_CHUNK sets the tokens per prefill forward (same logits as one forward); a
    value that is not a positive count is a clear error."""
    from ouzel.errors import OuzelError
    llm = real_llm("smollm2-135m")
    ids = llm.tokenize("one two three four five six seven eight nine ten eleven twelve")
    whole = Sequence(llm.model, 64, llm.device).prefill(ids)
    monkeypatch.setenv("OUZEL_PREFILL_CHUNK", "4")
    seq = Sequence(llm.model, 64, llm.device)
    seen = []
    chunked = seq.prefill(ids, progress=lambda done, total: seen.append(done))
    assert seq.chunk == 4 and seen[:2] == [4, 8] and seen[-1] == len(ids)
    assert rel(chunked, whole) < 1e-5
    for bad in ("0", "-512", "2k"):
        monkeypatch.setenv("OUZEL_PREFILL_CHUNK", bad)
        with pytest.raises(OuzelError, match="OUZEL_PREFILL_CHUNK"):
            Sequence(llm.model, 64, llm.device)


def test_chat_turn_two_equals_fresh_run():
    llm = real_llm("smollm2-135m")
    llm.reset()
    conv = [{"role": "user", "content": "Name a colour."}]
    first = llm.chat(conv, max_tokens=12, temperature=0)
    conv += [{"role": "assistant", "content": first}, {"role": "user", "content": "And another one?"}]
    second = llm.chat(conv, max_tokens=12, temperature=0)
    reused = llm.last_stats.reused_tokens
    assert reused > 0.6 * llm.last_stats.prompt_tokens, "turn 2 should reuse turn 1's KV state"
    llm.reset()
    fresh = llm.chat(conv, max_tokens=12, temperature=0)
    assert llm.last_stats.reused_tokens == 0
    assert second == fresh


def test_logits_api_shape_and_dtype():
    llm = real_llm("smollm2-135m")
    out = llm.logits(llm.tokenize("Hello"))
    assert out.dtype == torch.float32 and out.shape == (1, llm.config.vocab_size)
    assert torch.isfinite(out).all()


def test_stream_equals_non_stream():
    llm = real_llm("smollm2-135m")
    text = llm.generate("Once upon a time", max_tokens=20, temperature=0)
    pieces = list(llm.generate("Once upon a time", max_tokens=20, temperature=0, stream=True))
    assert len(pieces) > 1 and "".join(pieces) == text


def test_public_api_names():
    for name in ("load", "LLM", "OuzelError"):
        assert hasattr(ouzel, name)


def test_prefill_chunk_defaults(monkeypatch):
    """Without OUZEL_PREFILL_CHUNK a CUDA sequence prefills 2048 tokens a forward, a CPU one 512; a CPU
    sequence captures no chunk graph."""
    from ouzel.engine.generate import prefill_chunk
    monkeypatch.delenv("OUZEL_PREFILL_CHUNK", raising=False)
    assert prefill_chunk(torch.device("cuda")) == 2048 and prefill_chunk(torch.device("cpu")) == 512
    llm = real_llm("smollm2-135m")
    seq = Sequence(llm.model, 64, llm.device)
    assert seq.chunk == 512 and seq.chunk_graphs == {}


def test_prefill_pieces_follow_the_graph_sizes(monkeypatch):
    """A prompt is cut into full chunks, then pieces of the largest captured size that fits, then an
    eager rest (`Sequence._piece`); the logits are those of the whole prompt in one forward. On the
    CPU no graph is captured: the sizes alone are given here (a size without a graph runs eagerly)."""
    monkeypatch.setenv("OUZEL_PREFILL_CHUNK", "64")
    llm = real_llm("smollm2-135m")
    ids = llm.tokenize("the quick brown fox jumps over the lazy dog " * 20)[:170]
    whole = Sequence(llm.model, 256, llm.device)
    whole.chunk = 256
    ref = whole.prefill(ids)
    seq = Sequence(llm.model, 256, llm.device)
    seq.chunk_graphs = {64: None, 16: None}
    seen = []
    out = seq.prefill(ids, progress=lambda done, total: seen.append(done))
    assert seen == [64, 128, 144, 160, 170]
    assert rel(out, ref) < 1e-5
