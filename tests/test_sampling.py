import pytest
import torch

from conftest import real_llm
from ouzel.engine.generate import StopMatcher
from ouzel.engine.sampler import Sampler, SamplingParams
from ouzel.errors import OuzelError


def test_greedy_is_argmax():
    logits = torch.randn(1000)
    assert Sampler(SamplingParams(temperature=0))(logits) == int(logits.argmax())


def test_top_k_one_is_greedy():
    logits = torch.randn(1000)
    s = Sampler(SamplingParams(temperature=1.5, top_k=1, seed=3))
    assert all(s(logits) == int(logits.argmax()) for _ in range(20))


def test_seed_reproducible_and_different_seeds_differ():
    logits = torch.randn(5000) * 0.1
    draw = lambda seed: [Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1, min_p=0, seed=seed))(logits)
                         for _ in range(1)]
    a = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0, seed=7))
    b = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0, seed=7))
    c = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0, seed=8))
    sa, sb, sc = [a(logits) for _ in range(30)], [b(logits) for _ in range(30)], [c(logits) for _ in range(30)]
    assert sa == sb and sa != sc
    assert draw(1) == draw(1)


def test_draws_follow_the_softmax():
    """The Gumbel-max draw picks each candidate with its softmax(logit / T) probability."""
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    s = Sampler(SamplingParams(temperature=2.0, top_k=0, top_p=1.0, min_p=0, seed=4))
    n = 20000
    counts = torch.bincount(torch.tensor([s(logits) for _ in range(n)]), minlength=4).float() / n
    want = torch.softmax(logits / 2.0, -1)
    assert (counts - want).abs().max() < 0.015


def test_top_p_and_min_p_restrict_the_support():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    top_p = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.7, min_p=0, seed=0))
    assert {top_p(logits) for _ in range(200)} == {0, 1}
    min_p = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.25, seed=0))
    assert {min_p(logits) for _ in range(200)} == {0, 1, 2}


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0), dict(top_p=1.5),
                                dict(min_p=2), dict(max_tokens=-1)])
def test_invalid_values_raise(kw):
    with pytest.raises(OuzelError):
        SamplingParams(**kw).validate()


def test_stop_matcher_holds_back_partial_stop():
    m = StopMatcher(["</end>"])
    out = m.push("hello </e") + m.push("nd> ignored")
    assert out == "hello " and m.stopped


def test_stop_matcher_releases_false_alarm():
    m = StopMatcher(["STOP"])
    out = m.push("ST") + m.push("ART") + m.flush()
    assert out == "START" and not m.stopped


def test_stop_string_cuts_generation():
    llm = real_llm("smollm2-135m")
    full = llm.generate("1, 2, 3, 4,", max_tokens=24, temperature=0)
    assert " 7" in full
    cut = llm.generate("1, 2, 3, 4,", max_tokens=24, temperature=0, stop=[" 7"])
    assert cut == full[: full.index(" 7")]
    assert llm.last_stats.finish_reason == "stop"


def test_seeded_generation_is_reproducible():
    llm = real_llm("smollm2-135m")
    a = llm.generate("Tell me a story", max_tokens=16, temperature=1.0, seed=42)
    b = llm.generate("Tell me a story", max_tokens=16, temperature=1.0, seed=42)
    assert a == b


def test_max_tokens_and_eos():
    llm = real_llm("smollm2-135m")
    ids = llm.tokenize("Hi")
    assert len(llm.generate_ids(ids, max_tokens=5, temperature=0, ignore_eos=True)) == 5
    assert llm.generate_ids(ids, max_tokens=0, temperature=0) == []


def _plain_and_ahead(tmp_path, max_tokens: int, eog: set, ctx: int, stop_after: int | None = None,
                     temperature: float = 0.0):
    """Greedy tokens and the sequence's state after generate_ids' plain loop and after the loop that
    feeds each step from the device a token ahead (`_decode_ahead`), on one tiny model."""
    import tiny_models as tm

    from ouzel.engine.generate import Sequence, _decode_ahead, generate_ids
    from ouzel.engine.sampler import SamplingParams
    from ouzel.loader import load
    hf = tm.build_hf_model("llama", seed=3)
    model = load(tm.write_gguf(hf, "llama", tmp_path / "m.gguf"), device="cpu", progress=False).model
    prompt = [5, 9, 13, 2, 7]
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=11)
    out = []
    for ahead in (False, True):
        seq = Sequence(model, ctx, torch.device("cpu"))
        gen = _decode_ahead(seq, seq.prefill(prompt), params, eog) if ahead else generate_ids(seq, prompt, params, eog)
        toks = []
        for t in gen:
            toks.append(t)
            if stop_after is not None and len(toks) == stop_after:
                break
        gen.close()
        out.append((toks, list(seq.tokens), seq.kv.length))
    return out


@pytest.mark.parametrize("max_tokens,stop_after,ctx", [(12, None, 64), (1, None, 64), (12, 4, 64), (40, None, 20)])
def test_greedy_a_token_ahead_equals_the_plain_loop(tmp_path, max_tokens, stop_after, ctx):
    """Same tokens and, at the end, the same tokens and KV length in the sequence (the step queued
    past the end taken back): after max_tokens, a caller that stops early, a full context."""
    plain, ahead = _plain_and_ahead(tmp_path, max_tokens, set(), ctx, stop_after)
    assert plain == ahead
    assert len(plain[0]) == (stop_after or min(max_tokens, ctx - 5 + 1))  # 5 prompt tokens


def test_sampling_a_token_ahead_draws_the_plain_loops_tokens(tmp_path):
    """Sampled decoding (temperature 1, seeded) a token ahead: each draw on the device, in the
    plain loop's order, so the same tokens."""
    plain, ahead = _plain_and_ahead(tmp_path, 24, set(), 64, temperature=1.0)
    assert plain == ahead and len(set(plain[0])) > 3  # a draw, not the argmax every time


def test_greedy_a_token_ahead_stops_on_eos(tmp_path):
    plain, _ = _plain_and_ahead(tmp_path, 12, set(), 64)
    eos = plain[0][5]  # the sixth greedy token acts as the end of text
    first = plain[0].index(eos)
    plain, ahead = _plain_and_ahead(tmp_path, 12, {eos}, 64)
    assert plain == ahead and len(ahead[0]) == first and len(ahead[1]) == 5 + first
