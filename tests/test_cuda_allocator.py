"""ouzel's default for torch's CUDA allocator (`loader.cuda_allocator_defaults`): expandable
segments unless the user configured the allocator, and on a GPU that it takes effect."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ouzel.loader import cuda_allocator_defaults

_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def test_defaults_to_expandable_segments_unless_configured(monkeypatch):
    for v in _VARS:
        monkeypatch.delenv(v, raising=False)
    cuda_allocator_defaults()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    for v in _VARS:  # the user's setting, under either name, is kept as it is
        monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
        monkeypatch.setenv(v, "max_split_size_mb:64")
        cuda_allocator_defaults()
        assert os.environ[v] == "max_split_size_mb:64"
        assert os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64") == "max_split_size_mb:64"
        monkeypatch.delenv(v)


_PROBE = textwrap.dedent("""
    import torch
    from ouzel.loader import resolve_device
    dev = resolve_device("cuda")
    a = torch.empty(100 << 20, dtype=torch.uint8, device=dev)
    del a
    b = torch.empty(150 << 20, dtype=torch.uint8, device=dev)
    print(torch.cuda.memory_reserved(dev) >> 20)
""")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("user_conf,most_mib", [(None, 200), ("", None)])
def test_expandable_segments_take_effect(user_conf, most_mib):
    """In a fresh process: 100 MiB freed, then 150 MiB. Expandable segments grow the one segment
    (~150 MiB reserved); the default allocator (the user's empty setting) keeps the freed 100 MiB
    block and maps another segment (>= 250 MiB)."""
    env = {k: v for k, v in os.environ.items() if k not in _VARS}
    if user_conf is not None:
        env["PYTORCH_CUDA_ALLOC_CONF"] = user_conf
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    reserved = int(out.stdout.split()[-1])
    if most_mib is not None:
        assert reserved < most_mib
    else:
        assert reserved >= 250


_LOAD = textwrap.dedent("""
    import sys, torch
    import ouzel.loader as L
    L.CUDA_CACHE_TRIM = int(sys.argv[2])
    model = L.load(sys.argv[1], device="cuda", progress=False).model
    print(torch.cuda.memory_reserved() - torch.cuda.memory_allocated(), torch.cuda.max_memory_reserved(),
          torch.cuda.max_memory_allocated())
""")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_leaves_no_freed_weights_cached(tmp_path):
    """A Q4_K_M Qwen3-MoE in a fresh process: its Q6_K expert down projections are regrouped into
    new (padded) tensors and q/k/v fused, which frees the old weights. With the trim at 0 the freed
    bytes go back to the device as each module is done; with it off they stay cached (the trim's
    effect: the test can fail)."""
    from cuda_tiny import tiny_q4km
    path = tiny_q4km("qwen3moe", tmp_path / "q.gguf")
    env = {k: v for k, v in os.environ.items() if k not in _VARS}

    def run(trim: int) -> list[int]:
        out = subprocess.run([sys.executable, "-c", _LOAD, str(path), str(trim)], env=env, capture_output=True,
                             text=True, check=True)
        return [int(v) for v in out.stdout.split()[-3:]]

    on, off = run(0), run(1 << 40)
    msg = f"cached, peak reserved, peak allocated (MiB): trim {[v >> 20 for v in on]}, none {[v >> 20 for v in off]}"
    assert off[0] > 8 << 20, "no weight was freed at load: the test checks nothing; " + msg
    assert on[0] < off[0] / 2 and on[1] < off[1], msg


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_expert_stack_moves_without_a_gpu_copy():
    """Gate and up stacks fuse on the host before the move: the GPU never holds both the pieces
    and the fused stack (peak allocated during the move = the stack's own bytes)."""
    from ouzel.layers.moe import ExpertStack
    from ouzel.quant.blocks import block_type
    from ouzel.quant.tensor import QTensor
    bt = block_type("Q8_0")
    E, rows, k = 8, 512, 1024  # 4.5 MB a piece: a GPU copy of both would pass the bound below by 7 MB
    raw = [torch.randint(0, 256, (E * rows, bt.row_bytes(k)), dtype=torch.uint8) for _ in range(2)]
    for r in raw:  # finite fp16 scales
        r.view(-1, bt.block_bytes)[:, :2] = torch.tensor([0x00, 0x3C], dtype=torch.uint8)
    stack = ExpertStack.from_stacked([QTensor(r, bt, (E * rows, k)) for r in raw], (E, 2 * rows, k))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    moved = stack.to("cuda")
    nbytes = sum(r.numel() for r in raw)
    assert len(moved.stacked) == 1 and moved.stacked[0].raw.numel() == nbytes
    assert torch.cuda.max_memory_allocated() - before <= nbytes + (2 << 20)
    want = torch.cat([stack.stacked[0].dequantize().view(E, rows, k), stack.stacked[1].dequantize().view(E, rows, k)], 1)
    assert torch.equal(moved.stacked[0].dequantize().cpu().view(E, 2 * rows, k), want)
