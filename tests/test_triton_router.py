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


@pytest.mark.parametrize("E,D,K,scoring,wdtype,splits", [(128, 256, 8, "softmax", torch.float32, None),
                                                         (128, 256, 8, "softmax", torch.bfloat16, 3),
                                                         (60, 160, 4, "sigmoid", torch.float32, 1),
                                                         (256, 128, 6, "sqrtsoftplus", torch.float32, None)])
@pytest.mark.parametrize("hashed", [False, True])
def test_route_linear_matches_gemv_then_route(E, D, K, scoring, wdtype, splits, hashed):
    """One token's router GEMV and routing in one launch (the slices summed and routed by the last
    program) against F.linear then `route`; the counter back at zero after every call."""
    from ouzel.kernels.triton.gguf import split_counters
    gen = torch.Generator().manual_seed(E + D + hashed)
    x = torch.randn(1, D, generator=gen).to(DEV)
    wt = (torch.randn(E, D, generator=gen) * 0.2).to(DEV, wdtype)
    bias = None if hashed or scoring == "softmax" else torch.randn(E, generator=gen).to(DEV) * 0.05
    table = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(9)]).to(DEV) if hashed else None
    ids = torch.tensor([4], device=DEV) if hashed else None
    logits = torch.nn.functional.linear(x.double(), wt.double()).float()
    ref_w, ref_idx = router.route(logits, K, 1.5, scoring, bias, True, 1e-20, table, ids)
    for _ in range(2):
        w, idx = router.route_linear(x, wt, K, 1.5, scoring, bias, True, 1e-20, table, ids, splits=splits)
        assert int(split_counters(x.device, 1)[0]) == 0
        if hashed:
            assert torch.equal(idx, ref_idx)  # the table's order
        w, idx = _sorted(w, idx)
        rw, ri = _sorted(ref_w, ref_idx)
        assert torch.equal(idx, ri)
        assert torch.allclose(w, rw, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("E,D,K,dtype,splits,unit_offset", [(128, 2048, 8, torch.bfloat16, None, False),
                                                              (128, 2048, 8, torch.float32, 3, False),
                                                              (60, 320, 4, torch.float16, None, True)])
def test_route_norm_linear_matches_norm_then_router(E, D, K, dtype, splits, unit_offset):
    """The RMSNorm (residual add first, int8 rows after) inside the router's launch against
    `fused.rms_norm(..., residual, q8=True)` then `route_linear` of its output: the same stream, norm,
    int8 rows and scales, experts and weights; every program forms the norm's scale over the whole row,
    row block 0 stores its slice of each output (D = 320 over 64-wide steps: a partial last slice)."""
    from ouzel.kernels.triton import fused
    from ouzel.kernels.triton.gguf import split_counters
    gen = torch.Generator().manual_seed(E + D)
    x = torch.randn(1, D, generator=gen).to(DEV, dtype)
    res = (torch.randn(1, D, generator=gen) * 3).to(DEV, dtype)
    nw = (torch.rand(D, generator=gen) + 0.5).to(DEV)
    wt = (torch.randn(E, D, generator=gen) * 0.05).to(DEV)
    y, h, (xq, dx, sx) = fused.rms_norm(x, nw, 1e-6, unit_offset, res, q8=True)
    ref_w, ref_idx = router.route_linear(y.float(), wt, K, 1.0, "softmax", None, True, 0.0)
    for _ in range(2):
        (w, idx), (y2, h2, (xq2, dx2, sx2)) = router.route_norm_linear(x, res, nw, 1e-6, wt, K, 1.0, "softmax", None,
                                                                      True, 0.0, unit_offset=unit_offset,
                                                                      splits=splits)
        assert int(split_counters(x.device, 1)[0]) == 0
        assert torch.equal(h2, h) and h2.dtype == h.dtype
        assert (y2.float() - y.float()).abs().max() <= 1e-2 * y.float().abs().max()  # r: another sum order
        assert (xq2.int() - xq.int()).abs().max() <= 1 and torch.allclose(dx2, dx, rtol=1e-5)
        w, idx = _sorted(w, idx)
        rw, ri = _sorted(ref_w, ref_idx)
        assert torch.equal(idx, ri)
        assert torch.allclose(w, rw, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="route_norm_linear"):  # int8 rows need whole blocks of 32
        router.route_norm_linear(x[:, :D - 16], res[:, :D - 16], nw[:D - 16], 1e-6, wt[:, :D - 16], K)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the routers take the fused path on CUDA only")
@pytest.mark.parametrize("kind", ["qwen3", "v4-bias", "v4-hash"])
def test_router_modules_one_token_on_cuda(kind, monkeypatch):
    """A decode step's router module (Qwen3's softmax top-k, DeepSeek V4's biased or hashed
    sqrt-softplus) on CUDA: the one-launch GEMV + routing picks the CPU module's experts and
    weights, as the two-launch path does (OUZEL_NO_FUSED_ROUTER=1)."""
    from ouzel.layers.moe import Router
    from ouzel.models.qwen3_moe import SoftmaxTopKRouter
    gen = torch.Generator().manual_seed(11)
    if kind == "qwen3":
        r, E, K = SoftmaxTopKRouter(2048, 128, 8, True), 128, 8
    else:
        E, K = 256, 6
        r = Router(4096, E, K, "sqrtsoftplus", 1.5, hash_vocab=50 if kind == "v4-hash" else None)
        if kind == "v4-hash":
            r.tid2eid = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(50)]).to(torch.int32)
        else:
            r.e_score_correction_bias = torch.randn(E, generator=gen) * 0.05
    r.weight = torch.randn(E, r.hidden, generator=gen) * 0.02
    x = torch.randn(1, r.hidden, generator=gen)
    ids = torch.tensor([7])
    ref_w, ref_idx = _sorted(*r(x, ids))
    for name in ("weight", "e_score_correction_bias", "tid2eid"):
        if getattr(r, name, None) is not None:
            setattr(r, name, getattr(r, name).cuda())
    outs = [_sorted(*(t.cpu() for t in r(x.cuda(), ids.cuda())))]
    monkeypatch.setenv("OUZEL_NO_FUSED_ROUTER", "1")
    outs.append(_sorted(*(t.cpu() for t in r(x.cuda(), ids.cuda()))))
    for w, idx in outs:
        assert torch.equal(idx, ref_idx)
        assert torch.allclose(w, ref_w, rtol=1e-5, atol=1e-7)
