"""The one-launch mHC mix (kernels/triton/mhc.py) against `HyperConnection.mix`, the torch
reference (needs CUDA, or TRITON_INTERPRET=1 to run on the CPU through Triton's interpreter)."""
import os

import pytest
import torch

pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or INTERPRET):
    pytest.skip("needs CUDA (or TRITON_INTERPRET=1)", allow_module_level=True)

from ouzel.kernels.triton.mhc import mhc_mix  # noqa: E402
from ouzel.layers.hyper_connections import HyperConnection  # noqa: E402

DEV = "cpu" if INTERPRET else "cuda"


@pytest.mark.parametrize("n,iters,T", [(4, 20, 1), (4, 20, 7), (3, 5, 2), (4, 1, 3)])
def test_mix_matches_reference(n, iters, T):
    g = torch.Generator().manual_seed(n * 100 + iters + T)
    hc = HyperConnection(n, 8, iters, 1e-6, 1e-6)
    m = (2 + n) * n
    hc.base, hc.scale = torch.randn(m, generator=g).to(DEV), torch.randn(3, generator=g).to(DEV)
    mixes = torch.randn(T, m, generator=g).to(DEV) * 2
    want = hc.mix(mixes)
    got = mhc_mix(mixes, hc.base, hc.scale, n, iters, hc.hc_eps)
    for a, b in zip(got, want):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()
