"""The captured decode step (engine/graphs.py) against the eager step, on CUDA (skips elsewhere).

Tiny models at kernel-sized dimensions (hidden 256) in Q8_0 GGUFs, so the Triton GEMVs, the
fused MoE kernels and the device-side KV write/attention are what the graph captures. A prompt
of 250 tokens makes the cache reallocate at 256 during decode: the step is captured again.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from cuda_tiny import tiny as _tiny, tiny_q4km, tiny_v4  # noqa: E402

from ouzel.engine.generate import Sequence  # noqa: E402
from ouzel.loader import load  # noqa: E402


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen3_moe"])
def test_graph_decode_equals_eager(arch, tmp_path):
    hf, path, model = _tiny(arch, tmp_path, 1024)
    dev = torch.device("cuda")
    graph, eager = Sequence(model, 512, dev), Sequence(model, 512, dev)
    assert graph.graph is not None, f"{arch}: decode graphs not enabled"
    eager.graph, eager.chunk_graphs = None, {}
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    prompt = torch.randint(2, hf.config.vocab_size, (250,), generator=g).tolist()
    a, b = graph.prefill(prompt), eager.prefill(prompt)
    for step in range(12):
        tok = int(b.argmax())
        assert int(a.argmax()) == tok, f"{arch}: greedy token differs at step {step}"
        a, b = graph.step(tok), eager.step(tok)
        assert torch.isfinite(a).all()
        rel = ((a - b).norm() / b.norm()).item()
        assert rel < 1e-5, f"{arch}: step {step} logits rel err {rel:.2e}"
    assert graph.graph.captures == 2  # captured once, then again after the cache grew past 256


def _switch_ab(model, vocab: int, monkeypatch, switch: str, fused: tuple[str, ...]):
    """The captured decode of `model` with the environment switch on, then off: (the logits of a
    prefill and 6 steps under "1" and "0", the switch's value at each call of the `cuda` functions
    `fused` that launched their kernel)."""
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    prompt = torch.randint(2, vocab, (40,), generator=g).tolist()
    from ouzel.kernels import cuda
    ran = []
    for name in fused:
        def counted(*a, _f=getattr(cuda, name), **k):
            out = _f(*a, **k)
            if out is not None:
                ran.append(os.environ[switch])
            return out
        monkeypatch.setattr(cuda, name, counted)
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv(switch, flag)
        seq = Sequence(model, 256, dev)
        logits = [seq.prefill(prompt)]
        for step in range(6):
            logits.append(seq.step(int(logits[0].argmax()) if step == 0 else 7 + step))
        runs[flag] = torch.stack(logits)
    assert torch.isfinite(runs["1"]).all()
    return runs, ran


def test_qwen3_moe_norm_in_the_router(tmp_path, monkeypatch):
    """OUZEL_NORM_ROUTER (on unless "0"): each MoE layer's RMSNorm runs inside its router's launch
    (`cuda.route_norm_linear`); the captured decode gives the logits of the norm's own launch."""
    hf, path, model = _tiny("qwen3_moe", tmp_path, 1024)
    runs, ran = _switch_ab(model, hf.config.vocab_size, monkeypatch, "OUZEL_NORM_ROUTER", ("route_norm_linear",))
    assert set(ran) == {"1"}, "the fused launch ran only under the switch"
    rel = ((runs["1"] - runs["0"]).norm() / runs["0"].norm()).item()
    assert rel < 5e-3, f"norm in the router: logits rel err {rel:.2e}"


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen3_moe"])
def test_captured_decode_matches_cpu(arch, tmp_path, monkeypatch):
    """The captured CUDA decode step, whose attention kernel applies the q/k norms and rope itself
    (`DenseKV.attention(rope=...)`), against the CPU's step with its separate norms and rope; fp32
    activations, KV and prefill, so the two compute the same function up to rounding."""
    for key, value in (("OUZEL_KV_DTYPE", "f32"), ("OUZEL_CUDA_PREFILL_DTYPE", "f32"), ("OUZEL_EXACT_GEMV", "1")):
        monkeypatch.setenv(key, value)
    hf, path, model = _tiny(arch, tmp_path, 1024)
    gpu = Sequence(model, 512, torch.device("cuda"))
    cpu = Sequence(load(path, device="cpu", progress=False).model, 512, torch.device("cpu"))
    assert gpu.graph is not None
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    ids = torch.randint(2, hf.config.vocab_size, (40,), generator=g).tolist()
    a, b = gpu.prefill(ids[:20]), cpu.prefill(ids[:20])
    for step, tok in enumerate(ids[20:]):
        a, b = gpu.step(tok), cpu.step(tok)
        rel = ((a.cpu() - b).norm() / b.norm()).item()
        assert rel < 1e-4, f"{arch}: step {step} logits rel err {rel:.2e}"


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen3_moe"])
def test_chunk_graph_prefill(arch, tmp_path, monkeypatch):
    """Prefill chunks replayed from captured graphs (ChunkGraph, one per size in one memory pool)
    against the eager chunks on the same GPU and against the CPU. With 1024-token chunks, 1700
    tokens are a chunk of 1024 and one of 512 replayed, then 164 eager; the cache grows at the
    second (the 512 graph is captured on the grown cache), then decode steps read what they stored.
    The graphs share one memory pool: neither may overwrite what the other's replay needs."""
    monkeypatch.setenv("OUZEL_PREFILL_CHUNK", "1024")
    hf, path, model = _tiny(arch, tmp_path, 2048)
    dev = torch.device("cuda")
    graph, eager = Sequence(model, 1800, dev), Sequence(model, 1800, dev)
    assert sorted(graph.chunk_graphs) == [512, 1024], f"{arch}: chunk graphs not enabled"
    eager.chunk_graphs = {}
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    prompt = torch.randint(2, hf.config.vocab_size, (1700,), generator=g).tolist()
    seen = []
    a, b = graph.prefill(prompt, progress=lambda done, total: seen.append(done)), eager.prefill(prompt)
    assert seen == [1024, 1536, 1700]
    big, small = graph.chunk_graphs[1024], graph.chunk_graphs[512]
    assert not big.failed and not small.failed and big.captures == 1 and small.captures == 1
    rel = ((a - b).norm() / b.norm()).item()
    assert rel < 1e-5, f"{arch}: prefill logits rel err {rel:.2e} (graph vs eager)"
    cpu = Sequence(load(path, device="cpu", progress=False).model, 1800, torch.device("cpu")).prefill(prompt)
    rel = ((a.cpu() - cpu).norm() / cpu.norm()).item()
    assert rel < 2e-2, f"{arch}: prefill logits rel err {rel:.2e} (GPU vs CPU)"
    for step in range(4):  # decode reads the k/v the replayed chunks stored
        tok = int(b.argmax())
        a, b = graph.step(tok), eager.step(tok)
        rel = ((a - b).norm() / b.norm()).item()
        assert rel < 1e-5, f"{arch}: step {step} logits rel err {rel:.2e}"
    # later prompts replay both graphs at other depths, each chunk after `keep` cached tokens; the
    # 1024 graph was captured before the cache grew: once more at its next replay, then never
    for keep, n, captures in ((600, 512, (1, 1)), (300, 1024, (2, 1)), (0, 1536, (2, 1))):
        fresh = torch.randint(2, hf.config.vocab_size, (n,), generator=g).tolist()
        fresh[0] = prompt[keep] ^ 1  # differs from the cached token there
        ids = prompt[:keep] + fresh
        a, b = graph.prefill(ids), eager.prefill(ids)
        assert graph.reused == keep and (big.captures, small.captures) == captures
        assert ((a - b).norm() / b.norm()).item() < 1e-5, f"{arch}: chunk at {keep}"
    assert (big.replays, small.replays) == (3, 3)
    # a graph captured again while it is the only one in the pool (bench's warm-up: 600 tokens, then
    # the cache sized for the run, then 512)
    lone = Sequence(model, 1800, dev)
    lone.prefill(prompt[:600])
    lone.kv.reserve(1800)
    lone.reset()
    a, b = lone.prefill(prompt[:512]), eager.prefill(prompt[:512])
    assert lone.chunk_graphs[512].captures == 2 and not lone.chunk_graphs[512].failed
    assert ((a - b).norm() / b.norm()).item() < 1e-5, f"{arch}: recaptured chunk"


@pytest.mark.parametrize("exact", [False, True])
def test_graph_decode_deepseek_v4(exact, tmp_path, monkeypatch):
    """DeepSeek V4 (Q8_0 experts at kernel-sized dims, CSA ratio 4, HCA 128): 300 captured steps
    against the same fixed-shape step run eagerly and against the eager T>1-style step. The CSA
    row buffers grow at position 256: captured twice.

    The T>1-style step is another algorithm (its own summation orders), so it matches only up to
    rounding; on int8 activations (the default) one ulp upstream may flip a value's int8 rounding
    (~1e-2 relative in the logits with the experts on int8 too, measured on an H100), so that
    comparison runs with `exact` (OUZEL_EXACT_GEMV=1: fp32 activations) only."""
    if exact:
        monkeypatch.setenv("OUZEL_EXACT_GEMV", "1")
    from tiny_deepseek_v4 import rel_l2

    hf, model = tiny_v4(tmp_path)
    dev = torch.device("cuda")
    graph, fixed, eager = (Sequence(model, 512, dev) for _ in range(3))
    assert graph.graph is not None, "deepseek_v4: decode graphs not enabled"
    fixed.graph = eager.graph = None
    eager.kv.fixed_step = False
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    ids = torch.randint(2, hf.config.vocab_size, (320,), generator=g).tolist()
    for seq in (graph, fixed, eager):
        seq.prefill(ids[:20])
    for step, tok in enumerate(ids[20:]):
        a, b, c = graph.step(tok), fixed.step(tok), eager.step(tok)
        assert torch.isfinite(a).all()
        assert rel_l2(a, b) < 1e-5, f"step {step}: graph vs fixed step {rel_l2(a, b):.2e}"
        if exact:
            assert rel_l2(a, c) < 1e-3, f"step {step}: graph vs eager step {rel_l2(a, c):.2e}"
    assert not graph.graph.failed and graph.graph.captures == 2


def _int8_rows(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the decode GEMVs round their activations (q8act.quantize_x), dequantized."""
    xr = x.float().reshape(*x.shape[:-1], -1, 32)
    amax = xr.abs().amax(-1, keepdim=True)
    q = torch.floor(xr * torch.where(amax > 0, 127 / amax, 0) + 0.5).clamp(-127, 127)
    return (q * (amax / 127)).reshape(x.shape).to(x.dtype)


@pytest.mark.parametrize("exact", [True, False])
def test_deepseek_v4_cuda_matches_cpu(exact, tmp_path, monkeypatch):
    """One V4 GGUF at kernel-sized dims with the flash file's kinds of weights (Q8_0 attention,
    grouped output and shared expert; F16 compressor and indexer projections) on CUDA against
    the CPU reference: prefill, then 20 captured decode steps. On CUDA the 16-bit weights are
    read as stored, the grouped output projection is regrouped for the int8 GEMV, the shared
    expert runs fused, routing is one launch and the mHC mix a split GEMV. fp32 KV and prefill.

    exact: fp32 activations, tight. Else the GEMVs' int8 activations, whose rounding alone moves
    this model's logits by ~2e-2..2e-1: the CPU then runs twice, exact and with each one-row
    product's input rounded to int8 the same way, and the GPU must be far closer to the second
    (only a few roundings may flip) than the second is to the first."""
    for key, value in (("OUZEL_KV_DTYPE", "f32"), ("OUZEL_CUDA_PREFILL_DTYPE", "f32")):
        monkeypatch.setenv(key, value)
    if exact:
        monkeypatch.setenv("OUZEL_EXACT_GEMV", "1")
    import deepseek4_gguf as d4
    from tiny_deepseek_v4 import build_v4, rel_l2

    from ouzel.kernels import ops
    from ouzel.quant.tensor import QTensor

    q8 = ("attn_q_a", "attn_q_b", "attn_kv", "attn_output_a", "attn_output_b", "ffn_gate_shexp", "ffn_up_shexp",
          "ffn_down_shexp")
    f16 = ("attn_compressor_kv", "attn_compressor_gate", "indexer_compressor_kv", "indexer_compressor_gate",
           "indexer.attn_q_b", "indexer.proj")
    types = {**{f"{n}.weight": "Q8_0" for n in q8}, **{f"{n}.weight": "F16" for n in f16}}
    rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 16}
    hf = build_v4(seed=5, hidden_size=256, moe_intermediate_size=256, q_lora_rank=256, head_dim=128,
                  index_head_dim=64, o_lora_rank=256, compress_rates=rates)
    path = d4.write(hf, tmp_path / "v4.gguf", "Q8_0", layer_types=types)
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    ids = torch.randint(2, hf.config.vocab_size, (60,), generator=g).tolist()

    decoding = []  # the CPU's int8 rounding is for decode steps (the GPU's prefill runs matmuls)

    def logits(device):
        seq = Sequence(load(path, device=device, progress=False).model, 512, torch.device(device))
        out = [seq.prefill(ids[:40])]
        decoding.append(True)
        out += [seq.step(tok) for tok in ids[40:]]
        decoding.clear()
        assert seq.graph is None or not seq.graph.failed
        return [o.cpu() for o in out]

    gpu, cpu = logits("cuda"), logits("cpu")
    assert all(torch.isfinite(o).all() for o in gpu)
    errs = [rel_l2(a, b) for a, b in zip(gpu, cpu)]
    if exact:
        assert max(errs) < 1e-4, "prefill, then steps: " + " ".join(f"{e:.1e}" for e in errs)
        return
    linear = ops.linear

    def int8_linear(x, w, xq=None):
        if decoding and isinstance(w, QTensor) and w.float_view() is None and x.dim() == 2 and x.shape[0] == 1:
            x = _int8_rows(x)
        return linear(x, w, xq)

    monkeypatch.setattr(ops, "linear", int8_linear)
    sim = logits("cpu")
    assert errs[0] < 1e-4, f"prefill (no int8 products): {errs[0]:.1e}"
    # per step: GPU to the int8 CPU over int8 CPU to exact; a flipped rounding or a near-tie of the
    # router may make a few steps differ more, so the median is judged
    ratios = sorted(rel_l2(a, b) / max(rel_l2(b, c), 1e-12) for a, b, c in zip(gpu[1:], sim[1:], cpu[1:]))
    assert ratios[len(ratios) // 2] < 0.25, "GPU-to-int8-CPU over int8-to-exact, per step: " + \
        " ".join(f"{r:.2f}" for r in ratios)


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "deepseek_v4"])
def test_pdl_decode_equals_serial(arch, tmp_path, monkeypatch):
    """Programmatic dependent launch (kernels/triton/pdl.py) changes when a kernel starts, never
    what it computes: a prefill (a captured 512-token chunk, an eager tail) and 48 captured decode
    steps with PDL on give the logits of PDL off bit for bit. A kernel that read an input before
    its wait (or wrote before it) would race with the kernel before it and differ somewhere."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs sm_90")
    from ouzel.kernels.triton import pdl
    if arch == "deepseek_v4":
        hf, model = tiny_v4(tmp_path)
    else:
        hf, _, model = _tiny(arch, tmp_path, 2048)
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    prompt = torch.randint(2, hf.config.vocab_size, (600,), generator=g).tolist()
    tokens = []

    def run(on: bool) -> torch.Tensor:
        monkeypatch.setattr(pdl, "_ENABLED", {("cuda", None): on, ("cuda", torch.cuda.current_device()): on})
        seq = Sequence(model, 1200, dev)
        out = [seq.prefill(prompt)]
        for step in range(48):
            if len(tokens) == step:  # the PDL-off run picks the tokens; the other feeds the same ones
                tokens.append(int(out[-1].argmax()))
            out.append(seq.step(tokens[step]))
        assert seq.graph is not None and not seq.graph.failed
        return torch.stack([o.reshape(-1) for o in out])

    serial, early = run(False), run(True)
    assert torch.isfinite(serial).all()
    bad = [i for i in range(len(serial)) if not torch.equal(serial[i], early[i])]
    assert not bad, f"{arch}: logits differ with PDL at {'prefill and ' if 0 in bad else ''}steps {bad}"


def test_greedy_a_token_ahead_on_cuda(tmp_path):
    """generate_ids' greedy loop on CUDA feeds each captured step its token from the device, a
    token ahead of the read-back (`_decode_ahead`): the tokens of stepping with a host argmax, and
    the same sequence state afterwards (the step queued past the end taken back)."""
    from ouzel.engine.generate import generate_ids
    from ouzel.engine.sampler import SamplingParams
    hf, _, model = _tiny("llama", tmp_path, 1024)
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    prompt = torch.randint(2, hf.config.vocab_size, (30,), generator=g).tolist()
    plain = Sequence(model, 512, dev)
    logits, want = plain.prefill(prompt), []
    for _ in range(40):
        want.append(int(logits.argmax()))
        logits = plain.step(want[-1])
    ahead = Sequence(model, 512, dev)
    got = list(generate_ids(ahead, prompt, SamplingParams(temperature=0, max_tokens=40), set()))
    assert got == want
    assert ahead.tokens == prompt + want[:-1] and ahead.kv.length == len(prompt) + 39


@pytest.mark.parametrize("arch", ["llama", "qwen3moe"])
def test_q4km_fusions_match_separate_launches(arch, tmp_path, monkeypatch):
    """The decode step's fusions on Q4_K_M weights (q/k and the Q6_K v in one launch; silu(gate) *
    up's int8 rows formed by the gate/up GEMV; rope and o_proj's int8 rows in the attention kernel)
    against the same step with each part in a launch of its own: the same function up to the
    order of roundings (the fused GEMVs tile differently)."""
    path = tiny_q4km(arch, tmp_path / f"{arch}.gguf")
    model = load(path, device="cuda", progress=False).model
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    ids = torch.randint(2, 49152, (60,), generator=g).tolist()
    out = []
    for off in ("", "1"):
        for key in ("OUZEL_NO_PAIR_GEMV", "OUZEL_NO_SWIGLU_FUSION", "OUZEL_NO_ATTENTION_FUSION"):
            monkeypatch.setenv(key, off) if off else monkeypatch.delenv(key, raising=False)
        seq = Sequence(model, 256, dev)
        logits = [seq.prefill(ids[:30])]
        logits += [seq.step(t) for t in ids[30:]]
        out.append(torch.stack(logits))
    assert torch.isfinite(out[0]).all()
    rel = ((out[0] - out[1]).norm(dim=-1) / out[1].norm(dim=-1)).max().item()
    assert rel < 2e-2, f"{arch}: fused vs separate launches, worst step rel err {rel:.2e}"
