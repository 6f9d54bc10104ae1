"""A long prefill compiles its Triton kernels in its first chunks only, on CUDA (skips elsewhere).

A kernel specialized on a length (a constexpr that follows the number of cached or compressed
rows) compiles again at each new depth: a second or more per compile, paid inside the prefill.
ds4's walk to 16k spent most of its 43 s that way. Here Triton's JIT hook counts the compiles
while a sequence prefills chunk after chunk past the depths its first chunks saw.
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

import tiny_models as tm  # noqa: E402
from triton import knobs  # noqa: E402

from ouzel.engine.generate import PREFILL_CHUNK, Sequence  # noqa: E402
from ouzel.loader import load  # noqa: E402


def _model(arch: str, tmp_path):
    if arch == "deepseek_v4":
        import deepseek4_gguf as d4
        from tiny_deepseek_v4 import build_v4
        # HCA ratio 16: 32 more compressed rows a chunk; CSA ratio 4 beyond its top-k from the first chunk
        hf = build_v4(seed=3, hidden_size=256, moe_intermediate_size=256, max_position_embeddings=4096)
        return load(d4.write(hf, tmp_path / "v4.gguf", "Q8_0"), device="cuda", progress=False).model
    extra = dict(moe_intermediate_size=256) if arch == "qwen3_moe" else {}
    hf = tm.build_hf_model(arch, max_position_embeddings=4096, hidden_size=256, intermediate_size=512, **extra)
    return load(tm.write_gguf(hf, arch, tmp_path / f"{arch}.gguf", "Q8_0"), device="cuda", progress=False).model


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "deepseek_v4"])
def test_deeper_chunks_compile_nothing(arch, tmp_path, monkeypatch):
    model = _model(arch, tmp_path)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 256, (6 * PREFILL_CHUNK,), generator=g).tolist()
    seq = Sequence(model, len(ids) + 64, torch.device("cuda"))
    seq.prefill(ids[:2 * PREFILL_CHUNK])  # the first chunks compile (and tune) what a chunk runs
    compiled = []

    def hook(*, fn, compile, **_):
        compiled.append(f"{fn.name} {dict(compile['constants'])}")
        return None  # compile as usual

    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", hook)
    logits = seq.prefill(ids)  # four chunks deeper than any before
    assert torch.isfinite(logits).all()
    assert not compiled, f"{arch}: compiled at new depths: " + "; ".join(compiled[:4])
