"""DeepSeek V4's one-launch decode kernels (kernels/triton/v4.py) against the torch code they
replace, and the whole fixed step with them against the eager step (needs CUDA, or
TRITON_INTERPRET=1 to run on the CPU through Triton's interpreter)."""
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or INTERPRET):
    pytest.skip("needs CUDA (or TRITON_INTERPRET=1)", allow_module_level=True)

from ouzel.kernels.triton import v4  # noqa: E402
from ouzel.kv.compressed import CompressedKV  # noqa: E402
from ouzel.layers import hyper_connections as hcm  # noqa: E402
from ouzel.layers.compressed_attention import Compressor  # noqa: E402
from ouzel.layers.hyper_connections import HyperConnection, unit_rms  # noqa: E402
from ouzel.layers.interleaved_rope import InterleavedRope  # noqa: E402
from ouzel.layers.norm import RMSNorm  # noqa: E402

DEV = "cpu" if INTERPRET else "cuda"
YARN = {"rope_type": "yarn", "rope_theta": 160000.0, "partial_rotary_factor": 0.25, "factor": 4.0,
        "original_max_position_embeddings": 128, "attention_factor": 1.3}


def _close(a, b, tol=1e-5):
    assert a.shape == b.shape and torch.allclose(a, b, rtol=tol, atol=tol), (a - b).abs().max()


@pytest.mark.parametrize("norm", [None, "unit", "weighted"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_rms_rope(norm, sign):
    g = torch.Generator().manual_seed(3)
    rope = InterleavedRope(YARN, 64)
    x = torch.randn(3, 5, 64, generator=g).to(DEV)
    pos = torch.tensor([0, 7, 300]).to(DEV)
    w = (0.5 + torch.rand(64, generator=g)).to(DEV)
    cos, sin = rope.cos_sin(pos)
    ref = x if norm is None else unit_rms(x, 1e-6)
    ref = ref * w if norm == "weighted" else ref
    want = rope.rotate(ref, cos, sign * sin)
    got = v4.rms_rope(x, pos, rope.inv_freq, rope.scaling, sign, norm, w, 1e-6)
    _close(got, want)
    _close(v4.rms_rope(x[:, 0], pos, rope.inv_freq, rope.scaling, sign, norm, w, 1e-6), want[:, 0])


def _hc(n=4, d=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    hc = HyperConnection(n, d, 20, 1e-6, 1e-6)
    m = (2 + n) * n
    hc.fn = (torch.randn(m, n * d, generator=g) * 0.1).to(DEV)
    hc.base, hc.scale = torch.randn(m, generator=g).to(DEV), torch.randn(3, generator=g).to(DEV)
    norm = RMSNorm(d, 1e-6)
    norm.weight = (0.5 + torch.rand(d, generator=g)).to(DEV)
    return hc, norm, g


@pytest.mark.parametrize("T", [1, 3])
def test_hc_pre_and_merge(T):
    hc, norm, g = _hc()
    streams = torch.randn(T, hc.n, hc.hidden, generator=g).to(DEV)
    post, comb, x = hc(streams)
    want = (post, comb, norm.reference(x))
    mixes = streams.reshape(T, -1) @ hc.fn.T
    got = v4.hc_pre(mixes, streams, hc.base, hc.scale, norm.weight, hc.iters, hc.hc_eps, hc.norm_eps, norm.eps)
    for a, b in zip(got, want):
        _close(a, b)
    out = torch.randn(T, hc.hidden, generator=g).to(DEV)
    _close(v4.hc_merge(streams, out, post, comb), HyperConnection.merge(streams, out, post, comb))


@pytest.mark.parametrize("ratio,overlap,d", [(4, True, 32), (16, False, 32), (128, False, 32), (4, True, 128),
                                             (16, False, 80)])
def test_compress_step(ratio, overlap, d):
    """Token by token over three windows: the kernel's rings and rows equal the torch step's. The
    pool's programs: 1, 1, 4 (8 channels each), 2, 2 (64 + 16 channels, the last one masked)."""
    g = torch.Generator().manual_seed(ratio)
    hidden = 16
    comp = Compressor(hidden, d, ratio, overlap, 1e-6, InterleavedRope(YARN, d))
    width = (2 if overlap else 1) * d
    comp.position_bias = torch.randn(ratio, width, generator=g).to(DEV)
    comp.kv_norm.weight = (0.5 + torch.rand(d, generator=g)).to(DEV)
    ref, fast = (CompressedKV(1, 4096, DEV) for _ in range(2))
    for kv in (ref, fast):
        kv.fixed_step = True
    for p in range(3 * ratio):
        kv_x, gate_x = torch.randn(2, 1, width, generator=g).to(DEV).unbind(0)
        pos = torch.tensor([p], device=DEV)
        want = comp._compress_step(kv_x, gate_x, ref, 0, pos)
        rings = fast.step_buffers(0, comp.series, width, d, ratio, overlap)
        comp.rope._to(pos.device)
        v4.compress_step(rings[0], rings[1], kv_x, gate_x, pos, comp.position_bias, rings[2], comp.kv_norm.weight,
                         comp.kv_norm.eps, comp.rope.inv_freq, comp.rope.scaling, ratio, overlap)
        _close(rings[2], want)
        s_ref, s_fast = ref._layers[0].series[comp.series], fast._layers[0].series[comp.series]
        _close(s_fast.kv, s_ref.kv, 0)
        _close(s_fast.gate, s_ref.gate, 0)
        for kv in (ref, fast):
            kv.commit(1)


@pytest.mark.parametrize("ratio,overlap,d,n,prior,dtype", [
    (4, True, 32, 5, True, torch.float32), (4, True, 128, 3, False, torch.float16), (16, False, 80, 2, False, torch.float32),
    (128, False, 32, 2, False, torch.float16), (4, True, 48, 1, True, torch.bfloat16)])
def test_compress_chunk(ratio, overlap, d, n, prior, dtype):
    """A prefill's pool of n complete windows in one launch equals `Compressor._pool` (window 0's
    previous one from the prior rows, or none at the start; 16-bit states; a masked channel tail)."""
    g = torch.Generator().manual_seed(ratio + d)
    comp = Compressor(16, d, ratio, overlap, 1e-6, InterleavedRope(YARN, d))
    width = (2 if overlap else 1) * d
    bias = torch.randn(ratio, width, generator=g).to(DEV)
    kv, gate = (torch.randn(n * ratio, width, generator=g).to(DEV, dtype) for _ in range(2))
    before = tuple(torch.randn(ratio, width, generator=g).to(DEV, dtype) for _ in range(2)) if prior else None
    want = comp._pool(kv, gate, before, bias)
    got = v4.compress_chunk(kv, gate, before, bias, ratio, overlap, d)
    assert got.shape == (n, d) and got.dtype == torch.float32
    _close(got, want, 1e-5)


def _step_case(g, p, H, D, size, window, n, q_dtype, cache_dtype):
    """A ring of `size` slots after position p's write, n compressed rows, q and sinks; the kernel's
    copies hold NaN in every slot/row the step may not read (never written or out of range)."""
    q = torch.randn(1, H, D, generator=g).to(DEV, q_dtype)
    ring, rows = torch.randn(size, D, generator=g), torch.randn(n, D, generator=g)
    key_pos = p - (p - torch.arange(size)) % size
    seen = (key_pos >= 0) & (key_pos > p - window)
    sinks = torch.randn(H, generator=g).to(DEV)
    return q, ring.to(DEV, cache_dtype), rows.to(DEV, cache_dtype), key_pos.to(DEV), seen.to(DEV), sinks


def _check_step(p, mode, q_dtype, cache_dtype, H=20, D=48, window=8, size=11, n=16, ratio=4, k=5, **blocks):
    """The fixed step's attention (V4Attention._sequence's torch path) against the kernel: window
    slots masked by their position, all complete compressed rows (HCA) or k of the indexer's picks
    (CSA, -1 where fewer rows are complete)."""
    from types import SimpleNamespace

    from ouzel.kernels.triton.testing import rel_err
    from ouzel.layers.compressed_attention import V4Attention, complete

    g = torch.Generator().manual_seed(p)
    q, ring, rows, key_pos, seen, sinks = _step_case(g, p, H, D, size, window, n, q_dtype, cache_dtype)
    pos = torch.tensor([p], device=DEV)
    attn = SimpleNamespace(sinks=sinks, scale=D ** -0.5)
    mask, keys, picked, top = seen[None], ring, None, None
    ready = min((p + 1) // ratio, n)
    if mode == "hca":
        keys, mask = torch.cat([ring, rows]), torch.cat([mask, complete(rows, pos, ratio)], dim=1)
    elif mode == "csa":
        top = torch.randperm(max(ready, 1), generator=g)[:k]
        top = torch.cat([top, torch.full((k - len(top),), -1)]).to(DEV)[None]
        top[top >= ready] = -1
        picked = (rows.to(q_dtype), top)
    want = V4Attention._attend(attn, q, keys.to(q_dtype), mask, picked)
    assert torch.isfinite(want).all()
    ring_nan, rows_nan = ring.clone(), rows.clone()
    ring_nan[~seen] = float("nan")  # slots the step must not read
    if mode == "hca":
        rows_nan[ready:] = float("nan")
    elif mode == "csa":
        keep = torch.zeros(n, dtype=torch.bool, device=DEV)
        keep[top[top >= 0]] = True
        rows_nan[~keep] = float("nan")
    got = v4.attention_step(q, ring_nan, pos, window, sinks, attn.scale, None if mode == "window" else rows_nan,
                            ratio, top, **blocks)
    tol = 1e-5 if q_dtype == torch.float32 else 1e-2
    assert got.dtype == q_dtype and rel_err(got, want) < tol, rel_err(got, want)  # inf if a NaN got through


@pytest.mark.parametrize("p", [0, 3, 9, 30])  # window not full, full, full and wrapped
@pytest.mark.parametrize("mode", ["window", "hca", "csa"])
@pytest.mark.parametrize("q_dtype,cache_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                                 (torch.bfloat16, torch.bfloat16)])
def test_attention_step(p, mode, q_dtype, cache_dtype):
    """One launch (2 key tiles, no split): 2 head blocks (4 padding heads), D 48 padded to 64 in 4
    output blocks."""
    _check_step(p, mode, q_dtype, cache_dtype, block_n=16, block_d=32, block_out=16)


@pytest.mark.parametrize("p", [0, 5, 50, 100])  # 1 key; window not full; full, 12 rows; wrapped, 25 rows
@pytest.mark.parametrize("mode", ["window", "hca", "csa"])
@pytest.mark.parametrize("splits,block_out", [(None, 64), (3, 16), (64, 64), (1, 64)])
@pytest.mark.parametrize("q_dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_attention_step_split(p, mode, splits, block_out, q_dtype, cache_dtype, monkeypatch):
    """Flash-decoding: ring 45 slots (3 tiles of 16), 64 rows (4 tiles, ready from 0 to 25) or 40
    picks (3 tiles, from all -1 to all set). Splits dealt tiles s, s + splits, ...: some see no key
    (ring slots not written, rows not complete, picks -1), 64 asks more splits than tiles (capped),
    None: the default (one split a tile here), 1: one launch over every tile. Scratch starts as
    NaN: a partial the kernel leaves unwritten must never be read."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    _check_step(p, mode, q_dtype, cache_dtype, window=40, size=45, n=64, k=40, block_n=16, block_d=32,
                block_out=block_out, programs=64, splits=splits)


@pytest.mark.parametrize("kept,T", [(0, 13), (5, 9), (8, 20)])  # a fresh chunk; kept rows shorter / as long as the window
@pytest.mark.parametrize("mode", ["window", "hca", "csa"])
@pytest.mark.parametrize("q_dtype,cache_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16)])
def test_attention_chunk(kept, T, mode, q_dtype, cache_dtype):
    """A prefill chunk's attention (T queries at consecutive positions after `kept` cached keys)
    against `V4Attention._attend` on the torch path's mask: each query over the keys of its window,
    then every complete compressed row (HCA) or its own picks (CSA, -1 where none). Compressed rows
    no query may read hold NaN in the kernel's copy (a NaN read fails the check). kept 8: the default
    tiles (32 keys, every output channel in one program)."""
    from types import SimpleNamespace

    from ouzel.kernels.triton.testing import rel_err
    from ouzel.layers.compressed_attention import V4Attention, complete

    g = torch.Generator().manual_seed(kept * 100 + T)
    H, D, window, n, ratio, k = 20, 48, 8, 9, 4, 3
    first = 30  # the position of the chunk's first query
    positions = torch.arange(first, first + T)
    key_pos = torch.arange(first - kept, first + T)
    keys = torch.randn(kept + T, D, generator=g).to(DEV, cache_dtype)
    rows = torch.randn(n, D, generator=g).to(DEV, cache_dtype)
    q = torch.randn(T, H, D, generator=g).to(DEV, q_dtype)
    sinks = torch.randn(H, generator=g).to(DEV)
    attn = SimpleNamespace(sinks=sinks, scale=D ** -0.5)
    mask = (key_pos[None, :] <= positions[:, None]) & (key_pos[None, :] > positions[:, None] - window)
    all_keys, picked, top = keys, None, None
    if mode == "hca":
        all_keys = torch.cat([keys, rows])
        mask = torch.cat([mask, complete(rows.cpu(), positions, ratio)], dim=1)
    elif mode == "csa":
        ready = (positions + 1) // ratio
        top = torch.stack([torch.cat([torch.randperm(int(min(r, n)), generator=g)[:k],
                                      torch.full((k,), -1)])[:k] for r in ready])
        picked = (rows.to(q_dtype), top.to(DEV))
    want = V4Attention._attend(attn, q, all_keys.to(q_dtype), mask.to(DEV), picked)
    assert torch.isfinite(want).all()
    rows_nan = rows.clone()
    if mode == "hca":
        rows_nan[int((positions[-1] + 1) // ratio):] = float("nan")
    elif mode == "csa":
        unread = torch.ones(n, dtype=torch.bool)
        unread[top[top >= 0]] = False
        rows_nan[unread.to(DEV)] = float("nan")
    got = v4.attention_chunk(q, keys, positions.to(DEV), window, sinks, attn.scale,
                             None if mode == "window" else rows_nan, ratio, None if top is None else top.to(DEV),
                             **({} if kept == 8 else dict(block_n=16, block_d=32, block_out=32 if kept == 5 else 64)))
    tol = 1e-5 if cache_dtype == torch.float32 else 1e-4
    assert got.dtype == q_dtype and rel_err(got, want) < tol, rel_err(got, want)


def _tiny_v4(tmp_path):
    """The tiny V4 (CSA ratio 4 with top-k 3, HCA 16) as a Q8_0 GGUF loaded on DEV: (HF model, model)."""
    sys.path.insert(0, str(Path(__file__).parent))
    pytest.importorskip("transformers")
    import deepseek4_gguf as d4
    from tiny_deepseek_v4 import build_v4

    import ouzel
    try:
        hf = build_v4()
    except ImportError as e:
        pytest.skip(f"transformers has no DeepSeek V4: {e}")
    return hf, ouzel.load(d4.write(hf, tmp_path / "tiny-q8.gguf", "Q8_0"), device=DEV, progress=False).model


@torch.inference_mode()
def test_prefill_with_kernels_equals_torch(tmp_path, monkeypatch):
    """The tiny V4's prefill (two chunks: 21 tokens, then 19 after them) with the V4 kernels, the
    chunk attention among them (the interpreter on a CPU), against the torch code."""
    hf, model = _tiny_v4(tmp_path)
    ids = torch.randint(2, hf.config.vocab_size, (40,), generator=torch.Generator().manual_seed(6)).to(DEV)
    out = []
    for kernels in (False, True):
        monkeypatch.setattr(hcm, "TRITON_ON_CPU", kernels)
        kv = model.new_kv(1024, DEV)
        kv.fixed_step = False
        logits = []
        for a, b in ((0, 21), (21, 40)):
            logits.append(model.logits(model(ids[a:b], torch.arange(a, b, device=DEV), kv)))
            kv.commit(b - a)
        out.append(torch.cat(logits))
    monkeypatch.setattr(hcm, "TRITON_ON_CPU", False)
    assert float((out[1] - out[0]).abs().max() / out[0].abs().max()) < 1e-4


@torch.inference_mode()
def test_fixed_step_with_kernels_equals_eager(tmp_path, monkeypatch):
    """The tiny V4 (CSA ratio 4 with top-k 3, HCA 16): the fixed step through every V4 kernel
    (the interpreter on a CPU) against the torch eager step, 40 tokens after a 21-token prefill."""
    from ouzel.layers import moe
    hf, model = _tiny_v4(tmp_path)
    monkeypatch.setattr(moe, "PAIRWISE_ON_CPU", True)
    ids = torch.randint(2, hf.config.vocab_size, (61,), generator=torch.Generator().manual_seed(5)).to(DEV)
    states = []
    for fixed in (False, True):
        kv = model.new_kv(1024, DEV)
        kv.fixed_step = fixed
        model(ids[:21], torch.arange(21, device=DEV), kv)
        kv.commit(21)
        states.append(kv)
    worst = 0.0
    for p in range(21, 61):
        pos = torch.tensor([p], device=DEV)
        want = model.logits(model(ids[p:p + 1], pos, states[0]))
        monkeypatch.setattr(hcm, "TRITON_ON_CPU", True)
        got = model.logits(model(ids[p:p + 1], pos, states[1]))
        monkeypatch.setattr(hcm, "TRITON_ON_CPU", False)
        for kv in states:
            kv.commit(1)
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    assert worst < 1e-4


def test_grouped_linear_as_experts(monkeypatch):
    """o_a_proj's groups through the MoE pair-wise GEMV (one launch) equal the per-group loop."""
    from ouzel.layers.compressed_attention import GroupedLinear
    from ouzel.quant.blocks import block_type
    from ouzel.quant.tensor import QTensor

    g, per, K, T = 4, 8, 256, 2
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(-127, 128, (g * per, K // 32, 34), generator=gen, dtype=torch.int8).view(torch.uint8)
    blocks[..., :2] = torch.full((g * per, K // 32), 0.01, dtype=torch.float16).view(torch.uint8).view(
        g * per, K // 32, 2)
    lin = GroupedLinear(K, g * per, g)
    lin.weight = QTensor(blocks.reshape(g * per, -1).contiguous().to(DEV), block_type("Q8_0"), (g * per, K))
    x = torch.randn(T, g, K, generator=gen).to(DEV)
    monkeypatch.setattr(hcm, "TRITON_ON_CPU", False)
    want = lin(x) if not x.is_cuda else torch.cat([x[:, i] @ lin.weight.dequantize()[i * per:(i + 1) * per].T
                                                   for i in range(g)], dim=-1)
    monkeypatch.setattr(hcm, "TRITON_ON_CPU", True)
    _close(lin(x), want, 1e-4)


@pytest.mark.parametrize("H,n,p", [(20, 150, 401), (64, 64, 3), (16, 7, 100)])
@pytest.mark.parametrize("rows_dtype", [torch.float32, torch.float16])
def test_index_scores(H, n, p, rows_dtype):
    """The indexer's scores of one query (`Indexer.select`'s torch code): sum over heads of
    w_h relu(q_h . row) * scale, -inf for the rows the query may not read yet."""
    g = torch.Generator().manual_seed(H + n)
    D, ratio = 32, 4
    q = torch.randn(H, D, generator=g)
    w = torch.randn(H, generator=g)
    rows = torch.randn(n, D, generator=g).to(rows_dtype)
    scores = torch.relu(torch.einsum("hd,nd->hn", q, rows.float())) * D ** -0.5
    want = (scores * w[:, None]).sum(0).masked_fill(torch.arange(n) >= (p + 1) // ratio, float("-inf"))
    out = v4.index_scores(q.to(DEV), w.to(DEV), rows.to(DEV), torch.tensor([p], device=DEV), ratio, D ** -0.5)
    out = out.cpu()
    assert torch.equal(torch.isinf(out), torch.isinf(want))
    fin = torch.isfinite(want)
    assert torch.allclose(out[fin], want[fin], rtol=1e-5, atol=1e-5)
