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
