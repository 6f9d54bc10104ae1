"""Weights regrouped for the GPU at load (`loader._regroup_for_gpu`): same values, stored once."""
import torch
from torch import nn

from ouzel.kernels.triton.testing import random_blocks
from ouzel.layers.linear import Embedding, Linear
from ouzel.loader import _regroup_for_gpu
from ouzel.quant.blocks import block_type, dequantize
from ouzel.quant.tensor import QTensor


def _q6k(rows: int, k: int, seed: int) -> QTensor:
    raw = random_blocks("Q6_K", rows, k, torch.Generator().manual_seed(seed))
    return QTensor(raw, block_type("Q6_K"), (rows, k))


def test_regroup_q6_k_linears():
    m = nn.Module()
    m.a, m.b, m.c, m.small, m.emb = Linear(4096, 8), Linear(4096, 8), Linear(4096, 5), Linear(256, 4), Embedding(5, 4096)
    m.a.weight = m.b.weight = _q6k(8, 4096, 0)  # two Linears, one weight
    m.c.weight = m.emb.weight = _q6k(5, 4096, 1)  # shared with an embedding: left as is
    m.small.weight = _q6k(4, 256, 2)  # K % 2048 != 0: left as is
    want = {n: dequantize(getattr(m, n).weight.raw, block_type("Q6_K")) for n in ("a", "c", "small")}
    raw_a = m.a.weight.raw
    _regroup_for_gpu(m)
    assert m.a.weight.bt.name == "Q6_K_R8" and m.b.weight is m.a.weight
    assert m.a.weight.raw.data_ptr() == raw_a.data_ptr()  # in place: nothing stored twice
    assert torch.equal(m.a.weight.dequantize(), want["a"])
    assert m.c.weight.bt.name == "Q6_K" and torch.equal(m.c.weight.dequantize(), want["c"])
    assert m.small.weight.bt.name == "Q6_K" and torch.equal(m.small.weight.dequantize(), want["small"])
    x = torch.randn(3, 4096)
    assert torch.allclose(m.a(x), x @ want["a"].T, rtol=1e-4, atol=1e-4)
