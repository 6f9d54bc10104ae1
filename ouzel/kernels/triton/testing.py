"""Random valid GGUF blocks and the checks shared by tests/test_triton_kernels.py and bench/check_triton.py."""
from __future__ import annotations

import torch

from ...quant.blocks import block_type, dequantize

# byte offsets of each type's float16 scale fields (all other bytes may hold any value)
_F16_FIELDS = {"Q4_K": (0, 2), "Q6_K": (208,), "Q8_0": (0,), "Q4_0": (0,), "Q2_K": (80, 82), "IQ2_XXS": (0,)}


def random_blocks(name: str, n: int, k: int, gen: torch.Generator, device="cpu") -> torch.Tensor:
    """uint8 [n, row_bytes] of random blocks whose float16 scales are finite, positive and
    small (so values stay O(1))."""
    if name in ("Q6_K_R8", "Q6_K_R3", "Q8_0_R8", "Q2_K_R8", "IQ2_XXS_R8"):  # the GPU regroupings (quant/blocks.py)
        from ...quant import blocks  # noqa: PLC0415
        return getattr(blocks, f"repack_{name.lower()}")(random_blocks(name[:-3], n, k, gen)).to(device)
    bt = block_type(name)
    nb = k // bt.block_elems
    raw = torch.randint(0, 256, (n, nb, bt.block_bytes), dtype=torch.uint8, generator=gen)
    for off in _F16_FIELDS[name]:
        d = (torch.rand((n, nb), generator=gen) * 0.02 + 0.001).to(torch.float16)
        raw[:, :, off:off + 2] = d.view(torch.uint8).view(n, nb, 2)
    return raw.reshape(n, nb * bt.block_bytes).to(device)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf if out has any NaN/inf."""
    out = out.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref.double()).norm() / ref.double().norm()).item()


def reference_linear(x: torch.Tensor, raw: torch.Tensor, name: str) -> torch.Tensor:
    """float64 x @ W.T through the exact torch dequantizer: the oracle."""
    w = dequantize(raw, block_type(name))
    return x.double() @ w.double().t()
