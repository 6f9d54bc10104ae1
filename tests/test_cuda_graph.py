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

import tiny_models as tm  # noqa: E402

from ouzel.engine.generate import Sequence  # noqa: E402
from ouzel.loader import load  # noqa: E402

SIZES = dict(hidden_size=256, intermediate_size=512)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen3_moe"])
def test_graph_decode_equals_eager(arch, tmp_path):
    extra = dict(moe_intermediate_size=256) if arch == "qwen3_moe" else {}
    hf = tm.build_hf_model(arch, max_position_embeddings=1024, **SIZES, **extra)
    path = tm.write_gguf(hf, arch, tmp_path / f"{arch}.gguf", "Q8_0")
    model = load(path, device="cuda", progress=False).model
    dev = torch.device("cuda")
    graph, eager = Sequence(model, 512, dev), Sequence(model, 512, dev)
    assert graph.graph is not None, f"{arch}: decode graphs not enabled"
    eager.graph = None
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
