"""A prefill chunk after cached tokens (T queries, the last T of S keys): `attend` equals the
explicit-mask reference. On CUDA it takes the lower-right causal flash kernel instead of a mask."""
import pytest
import torch

from ouzel.layers.attention import attend, attend_masked, causal_mask

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,S,H,Hkv,window", [(7, 7, 4, 2, None), (5, 19, 4, 2, None), (64, 300, 8, 2, None),
                                              (16, 40, 4, 4, 24)])
def test_chunk_after_cache_matches_mask(device, T, S, H, Hkv, window):
    gen = torch.Generator().manual_seed(T * 1000 + S)
    dtype = torch.float16 if device == "cuda" else torch.float32
    q = torch.randn(T, H, 64, generator=gen).to(device, dtype)
    k = torch.randn(S, Hkv, 64, generator=gen).to(device, dtype)
    v = torch.randn(S, Hkv, 64, generator=gen).to(device, dtype)
    pos = torch.arange(S - T, S, device=device)
    got = attend(q, k, v, pos, window, 0.125).float()
    want = attend_masked(q.float(), k.float(), v.float(), causal_mask(pos, S, window), 0.125)
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() < tol
