"""The CPU fast paths of two layers against their references: RMSNorm through torch's rms_norm
(bit for bit, Gemma's 1 + w included) and RoPE's cos/sin computed once per step's positions."""
from __future__ import annotations

import pytest
import torch

from ouzel.layers.norm import RMSNorm
from ouzel.layers.rope import Rope, RopeSpec


@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("shape", [(1, 576), (7, 576), (3, 9, 576)])
def test_rms_norm_fast_path_equals_reference(unit_offset, shape):
    g = torch.Generator().manual_seed(1)
    n = RMSNorm(576, 1e-6, unit_offset)
    n.weight = torch.randn(576, generator=g)
    x = torch.randn(*shape, generator=g) * 3
    assert torch.equal(n(x), n.reference(x))
    n.weight = torch.randn(576, generator=g)  # a new weight: 1 + w is formed again
    assert torch.equal(n(x), n.reference(x))


def test_rms_norm_other_dtypes_take_the_reference():
    n = RMSNorm(64, 1e-5)
    n.weight = torch.randn(64).to(torch.bfloat16)
    x = torch.randn(2, 64).to(torch.bfloat16)
    assert torch.equal(n(x), n.reference(x))


def test_rope_reuses_cos_sin_only_for_the_same_positions():
    """The layers of one step share a positions tensor: one cos/sin for all. A tensor changed in
    place, or another tensor, gets its own."""
    spec = RopeSpec(10000.0, 32)
    rope, fresh = Rope(spec), lambda x, p: Rope(spec)(x, p)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 32, generator=g)
    pos = torch.tensor([5, 6, 7])
    assert torch.equal(rope(x, pos), fresh(x, pos))
    first = rope._last
    assert torch.equal(rope(x, pos), fresh(x, pos)) and rope._last is first  # reused
    pos += 100  # in place: same tensor, new values
    assert torch.equal(rope(x, pos), fresh(x, pos)) and rope._last is not first
    other = torch.tensor([1, 2, 3])
    assert torch.equal(rope(x, other), fresh(x, other))
    with torch.inference_mode():  # inference tensors (no version counter) too
        p = torch.tensor([9, 10, 11])
        assert torch.equal(rope(x, p), fresh(x, p))
        p[0] = 0
        assert torch.equal(rope(x, p), fresh(x, p))


def test_linear_keeps_its_cpu_call_only_for_its_weight():
    """A quantized Linear on CPU calls the kernel directly after its first call; the result is
    ops.linear's; a new weight is looked at again, a 3-D x goes through the dispatch; a dense
    weight keeps no call."""
    import numpy as np

    from ouzel.kernels import ops
    from ouzel.layers.linear import Linear
    from ouzel.quant.blocks import block_type
    from ouzel.quant.tensor import QTensor
    if ops._cpu_kernels() is None:
        pytest.skip("the CPU kernels could not be built here")
    from test_cpu_qmatmul import random_raw
    rng = np.random.default_rng(4)
    lin = Linear(256, 8)
    lin.weight = QTensor(random_raw(block_type("Q4_K"), 8, 256, rng), block_type("Q4_K"), (8, 256))
    x = torch.randn(2, 256)
    first = lin(x)
    assert lin._cpu_call[0] is lin.weight and lin._cpu_call[1] is not None
    assert torch.equal(lin(x), first) and torch.equal(first, ops.linear(x, lin.weight))
    lin.weight = QTensor(random_raw(block_type("Q8_0"), 8, 256, rng), block_type("Q8_0"), (8, 256))
    assert torch.equal(lin(x), ops.linear(x, lin.weight)) and lin._cpu_call[0] is lin.weight
    assert torch.equal(lin(x[None])[0], ops.linear(x, lin.weight))
    lin.weight = torch.randn(8, 256)
    assert torch.equal(lin(x), x @ lin.weight.T) and lin._cpu_call[1] is None
