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


def test_pair_in_one_launch_on_cuda():
    """On CUDA a one-row call of a group with one fused type and one Linear of another (Q4_K q/k,
    Q6_K_R8 v: `ops.linear_pair`) gives what the separate launches give."""
    import pytest
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from ouzel.quant.blocks import repack_q6_k_r8
    g = torch.Generator().manual_seed(1)
    k = 2048
    lins = [_linear("Q4_K", 256, k, g), _linear("Q4_K", 64, k, g), Linear(k, 64)]
    lins[2].weight = QTensor(repack_q6_k_r8(random_blocks("Q6_K", 64, k, g)), block_type("Q6_K_R8"), (64, k))
    for lin in lins:
        lin.weight = QTensor(lin.weight.raw.cuda(), lin.weight.bt, lin.weight.shape)
    group = LinearGroup(lins)
    group.fuse()
    assert group.pair is not None and group.pair[0] == [0, 1] and group.pair[2] == 2
    x = torch.randn(1, k, generator=g).cuda()
    got = group(x)
    group.pair = None
    want = group(x)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
