"""The one-launch MoE router (kernels/triton/router.py) against the torch routing it replaces."""
import os

import pytest
import torch

triton = pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or INTERPRET):
    pytest.skip("needs CUDA (or TRITON_INTERPRET=1)", allow_module_level=True)

from ouzel.kernels.triton import router  # noqa: E402

DEV = "cpu" if INTERPRET else "cuda"


def _sorted(w, idx):
    order = idx.argsort(dim=-1)
    return w.gather(-1, order), idx.gather(-1, order)


@pytest.mark.parametrize("E,K,renorm,softmax,bias", [(128, 8, True, True, False), (128, 8, False, True, False),
                                                     (60, 4, True, True, False), (256, 6, True, False, True)])
def test_route_matches_torch(E, K, renorm, softmax, bias):
    gen = torch.Generator().manual_seed(E + K)
    logits = torch.randn(3, E, generator=gen).to(DEV)
    b = torch.randn(E, generator=gen).to(DEV) * 0.1 if bias else None
    w, idx = router.route(logits, K, 2.5, softmax, b, renorm, 1e-20)
    s = logits.softmax(-1) if softmax else logits.sigmoid()
    ref_idx = torch.topk(s + (b if bias else 0), K, dim=-1).indices
    ref_w = s.gather(-1, ref_idx)
    if renorm:
        ref_w = ref_w / (ref_w.sum(-1, keepdim=True) + 1e-20)
    ref_w = ref_w * 2.5
    w, idx = _sorted(w, idx)
    ref_w, ref_idx = _sorted(ref_w, ref_idx)
    assert torch.equal(idx, ref_idx)
    assert torch.allclose(w, ref_w, rtol=1e-5, atol=1e-7)
