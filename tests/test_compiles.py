"""A long prefill compiles its Triton kernels in its first chunks only, on CUDA (skips elsewhere).

A kernel specialized on a length (a constexpr that follows the number of cached or compressed
rows) compiles again at each new depth: a second or more per compile, paid inside the prefill.
`cuda.compiles` (Triton's JIT hook) counts the compiles while a sequence prefills chunk after
chunk past the depths its first chunks saw.
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from cuda_tiny import tiny, tiny_v4  # noqa: E402

from ouzel.engine.generate import PREFILL_CHUNK, Sequence  # noqa: E402
from ouzel.kernels.cuda import compiles  # noqa: E402


def _model(arch: str, tmp_path):
    if arch == "deepseek_v4":  # HCA ratio 16: 32 more compressed rows a chunk; CSA past its top-k early
        rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 16}
        return tiny_v4(tmp_path, compress_rates=rates, max_position_embeddings=4096)[1]
    return tiny(arch, tmp_path, 4096)[2]


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "deepseek_v4"])
def test_deeper_chunks_compile_nothing(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("OUZEL_LOG_COMPILES", "1")  # a failure's log names the kernels
    model = _model(arch, tmp_path)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 256, (6 * PREFILL_CHUNK,), generator=g).tolist()
    seq = Sequence(model, len(ids) + 64, torch.device("cuda"))
    seq.prefill(ids[:2 * PREFILL_CHUNK])  # the first chunks compile (and tune) what a chunk runs
    with compiles() as deeper:
        logits = seq.prefill(ids)  # four chunks deeper than any before
    assert torch.isfinite(logits).all()
    assert deeper.n == 0, f"{arch}: {deeper.n} kernels compiled at new depths (the log names them)"


def test_counter_counts_cache_misses():
    import triton
    import triton.language as tl

    @triton.jit
    def fill(out_ptr, value, N: tl.constexpr):
        tl.store(out_ptr + tl.arange(0, N), tl.full((N,), value, tl.float32))

    out = torch.zeros(32, device="cuda")
    with compiles() as c:
        fill[(1,)](out, 1.0, N=16)
        fill[(1,)](out, 2.0, N=16)  # the same specialization: cached
        fill[(1,)](out, 3.0, N=32)
    assert c.n == 2 and out.tolist() == [3.0] * 32
