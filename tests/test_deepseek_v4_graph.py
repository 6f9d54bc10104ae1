"""DeepSeek V4's fixed-shape one-token step (`CompressedKV.fixed_step`, what a CUDA graph
captures) on the CPU: the same logits as the eager step, and not one host read of a tensor.

The tiny V4 here compresses HCA rows every 128 tokens (the real ratio) and CSA rows every 4, so
300 positions cross 74 CSA boundaries and two HCA ones, and the CSA row buffers grow (at 64 rows).
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
pytest.importorskip("transformers")

import ouzel  # noqa: E402

RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
PREFILL, END = 21, 300


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    import deepseek4_gguf as d4
    from tiny_deepseek_v4 import build_v4
    try:
        hf = build_v4(compress_rates=RATES)
    except ImportError as e:
        pytest.skip(f"transformers has no DeepSeek V4: {e}")
    # Q8_0 experts load stacked: the MoE runs its pair-wise decode path (on the CPU, its reference)
    path = d4.write(hf, tmp_path_factory.mktemp("v4g") / "tiny-q8.gguf", "Q8_0")
    ids = torch.randint(2, hf.config.vocab_size, (END,), generator=torch.Generator().manual_seed(7))
    return type("V4", (), dict(model=ouzel.load(path, progress=False).model, ids=ids))


def _prefilled(model, ids, fixed: bool):
    kv = model.new_kv(1024)
    kv.fixed_step = fixed
    model(ids[:PREFILL], torch.arange(PREFILL), kv)
    kv.commit(PREFILL)
    return kv


class HostReadError(AssertionError):
    pass


@contextlib.contextmanager
def no_host_reads():
    """Any read of a tensor's value into Python (or a data-dependent shape) raises inside."""
    def refuse(name):
        def fn(*args, **kwargs):
            raise HostReadError(f"host read in the decode step: {name}")
        return fn

    def where(cond, *rest, **kw):
        if not rest and not kw:
            raise HostReadError("host read in the decode step: torch.where(cond) (nonzero)")
        return real_where(cond, *rest, **kw)

    real_where = torch.where
    patched = [(torch.Tensor, n) for n in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__",
                                           "nonzero", "masked_select", "numpy", "cpu", "unique")]
    patched += [(torch, n) for n in ("nonzero", "masked_select", "unique", "tensor", "as_tensor")]
    saved = [(obj, n, getattr(obj, n)) for obj, n in patched]
    try:
        for obj, n in patched:
            setattr(obj, n, refuse(f"{getattr(obj, '__name__', obj)}.{n}"))
        torch.where = where
        yield
    finally:
        for obj, n, fn in saved:
            setattr(obj, n, fn)
        torch.where = real_where


def test_no_host_reads_guard_works():
    with no_host_reads(), pytest.raises(HostReadError):
        torch.ones(2).sum().item()
    assert torch.ones(2).sum().item() == 2.0


@torch.inference_mode()
def test_fixed_step_equals_eager_step(v4, monkeypatch):
    """Token by token from 21 to 300: logits within 1e-5 of the eager step, same state after."""
    from ouzel.layers import moe
    monkeypatch.setattr(moe, "PAIRWISE_ON_CPU", True)
    model, ids = v4.model, v4.ids
    eager, fixed = _prefilled(model, ids, False), _prefilled(model, ids, True)
    generations = fixed.generation
    worst = 0.0
    for p in range(PREFILL, END):
        pos = torch.tensor([p])
        want = model.logits(model(ids[p:p + 1], pos, eager))
        got = model.logits(model(ids[p:p + 1], pos, fixed))
        eager.commit(1)
        fixed.commit(1)
        worst = max(worst, float((got - want).abs().max()))
    assert worst < 1e-5
    assert fixed.generation > generations  # the CSA row buffers grew on the way
    a, b = eager.state(), fixed.state()
    assert a.keys() == b.keys() and eager.meta() == fixed.meta() and eager.nbytes() == fixed.nbytes()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@torch.inference_mode()
def test_fixed_step_reads_nothing_on_the_host(v4, monkeypatch):
    """The step as DecodeGraph drives it (token and position in static tensors, `reserve` before
    each step) runs with every host read of a tensor patched to raise, after one warm-up step."""
    from ouzel.layers import moe
    monkeypatch.setattr(moe, "PAIRWISE_ON_CPU", True)
    model, ids = v4.model, v4.ids
    kv = _prefilled(model, ids, True)
    tok, pos = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    out = []
    for p in range(PREFILL, 160):
        kv.reserve(p + 1)
        tok.fill_(int(ids[p]))
        pos.fill_(p)
        with no_host_reads() if p > PREFILL else contextlib.nullcontext():
            out.append(model.logits(model(tok, pos, kv)))
        kv.commit(1)
    eager = _prefilled(model, ids, False)
    want = model.logits(model(ids[PREFILL:160], torch.arange(PREFILL, 160), eager))
    assert float((torch.cat(out) - want).abs().max()) < 1e-4


def test_graphs_take_the_compressed_state():
    """DecodeGraph's state protocol (generation, reserve) holds for CompressedKV."""
    from ouzel.engine.graphs import replayable
    from ouzel.kv.cache import DenseKV
    from ouzel.kv.compressed import CompressedKV

    assert replayable(CompressedKV(2, 64)) and replayable(DenseKV(2, 64))
    assert CompressedKV(2, 64, "cuda" if torch.cuda.is_available() else "cpu").fixed_step == torch.cuda.is_available()
