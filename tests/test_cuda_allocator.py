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
