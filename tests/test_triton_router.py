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
    w, idx = router.route(logits, K, 2.5, "softmax" if softmax else "sigmoid", b, renorm, 1e-20)
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


@pytest.mark.parametrize("hashed", [False, True])
def test_route_matches_deepseek_router(hashed):
    """DeepSeek V4's routing (`moe.Router`: sqrt(softplus) scores, top-k of score + bias or the hash
    table's experts, renormalised, scaled) in one launch, against the module's torch path."""
    from ouzel.layers.moe import Router
    E, K, V, T = 256, 6, 50, 5
    gen = torch.Generator().manual_seed(7 + hashed)
    r = Router(64, E, K, "sqrtsoftplus", 1.5, hash_vocab=V if hashed else None)
    r.weight = torch.randn(E, 64, generator=gen) * 0.3
    if hashed:
        r.tid2eid = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(V)]).to(torch.int32)
    else:
        r.e_score_correction_bias = torch.randn(E, generator=gen) * 0.05
    x = torch.randn(T, 64, generator=gen) * 4  # logits from about -30 to 30: softplus's both tails
    ids = torch.randint(0, V, (T,), generator=gen)
    ref_w, ref_idx = r(x, ids)
    logits = torch.nn.functional.linear(x, r.weight)
    w, idx = router.route(logits.to(DEV), K, 1.5, "sqrtsoftplus", None if hashed else r.e_score_correction_bias.to(DEV),
                          True, 1e-20, r.tid2eid.to(DEV) if hashed else None, ids.to(DEV) if hashed else None)
    if hashed:  # the table's order is kept
        assert torch.equal(idx.cpu(), ref_idx)
    w, idx = _sorted(w.cpu(), idx.cpu())
    ref_w, ref_idx = _sorted(ref_w, ref_idx)
    assert torch.equal(idx, ref_idx)
    assert torch.allclose(w, ref_w, rtol=2e-6, atol=1e-7)
