"""LinearGroup: q/k/v (or gate/up) of one block type fused into one matmul over row-concatenated
blocks (the loader does it on CUDA; the rows are independent, so the CPU kernels check it here)."""
import torch

from ouzel.kernels.triton.testing import random_blocks
from ouzel.layers.linear import Linear, LinearGroup
from ouzel.quant.blocks import block_type
from ouzel.quant.tensor import QTensor


def _linear(name: str, out: int, k: int, g) -> Linear:
    lin = Linear(k, out)
    lin.weight = QTensor(random_blocks(name, out, k, g), block_type(name), (out, k))
    return lin


def test_fused_group_equals_the_separate_linears():
    g = torch.Generator().manual_seed(0)
    k = 512
    lins = [_linear("Q4_K", 64, k, g), _linear("Q4_K", 32, k, g), _linear("Q6_K", 32, k, g)]
    lins[1].bias = torch.randn(32, generator=g)
    group = LinearGroup(lins)
    x = torch.randn(5, k, generator=g)
    want = group(x)  # not fused: each Linear in turn
    group.fuse()
    assert group.groups is not None and len(group.groups) == 1  # the two Q4_K ones; Q6_K stays alone
    members, fused = group.groups[0]
    assert members == [0, 1] and fused.shape == (96, k)
    assert lins[0].weight.raw.data_ptr() == fused.raw.data_ptr()  # views of the fused blocks: no copy kept
    for got, ref in zip(group(x), want):
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
