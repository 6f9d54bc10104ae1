"""Rotary position embeddings (the rotate-half layout of Hugging Face checkpoints)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kernels import cuda as _cuda


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    dim: int  # rotated dims per head (partial rope rotates the first `dim`)
    scaling: str = "none"  # none | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_pos: int = 8192
    freq_factors: tuple[float, ...] | None = None  # llama.cpp's rope_freqs tensor: theta_i / factor_i


def inv_freq(spec: RopeSpec) -> torch.Tensor:
    freqs = 1.0 / (spec.theta ** (torch.arange(0, spec.dim, 2, dtype=torch.int64).float() / spec.dim))
    if spec.scaling == "linear":
        freqs = freqs / spec.factor
    elif spec.scaling == "llama3":
        low_wavelen = spec.original_max_pos / spec.low_freq_factor
        high_wavelen = spec.original_max_pos / spec.high_freq_factor
        wavelen = 2 * math.pi / freqs
        smooth = (spec.original_max_pos / wavelen - spec.low_freq_factor) / (spec.high_freq_factor - spec.low_freq_factor)
        scaled = torch.where(wavelen > low_wavelen, freqs / spec.factor, freqs)
        mid = (1 - smooth) * scaled / spec.factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        freqs = torch.where(is_mid, mid, scaled)
    if spec.freq_factors is not None:
        if len(spec.freq_factors) != len(freqs):
            from ..errors import OuzelError
            raise OuzelError(f"rope_freqs has {len(spec.freq_factors)} factors; the rotary dims need {len(freqs)}")
        freqs = freqs / torch.tensor(spec.freq_factors, dtype=torch.float32)
    return freqs


class Rope:
    """Rotates by position; cos/sin are computed from the positions tensor on its device, so no
    step reads a position back to the host (a table sized by positions.max() would)."""

    def __init__(self, spec: RopeSpec):
        self.spec = spec
        self._inv = inv_freq(spec)
        self._inv_on: dict[torch.device, torch.Tensor] = {}
        self._last = None  # (positions, their values, cos, sin): every layer of a CPU step rotates by the same

    def _inv_for(self, device: torch.device) -> torch.Tensor:
        inv = self._inv_on.get(device)
        if inv is None:
            inv = self._inv_on[device] = self._inv.to(device)
        return inv

    def _cos_sin(self, positions: torch.Tensor):
        last = self._last
        if last is not None and last[0] is positions and torch.equal(last[1], positions):
            return last[2], last[3]
        inv = self._inv_for(positions.device)
        f = positions.float()[:, None] * inv[None, :]  # the outer product HF computes, in float32
        emb = torch.cat([f, f], dim=-1)
        cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
        if positions.device.type == "cpu":  # (not on CUDA: a captured graph must compute them each replay)
            self._last = (positions, positions.clone(), cos, sin)  # values kept: changed in place, recomputed
        return cos, sin

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [T, H, D] float32, positions: [T]."""
        cos, sin = self._cos_sin(positions)
        d = self.spec.dim
        xr = x[..., :d]
        x1, x2 = xr[..., : d // 2], xr[..., d // 2:]
        rot = torch.cat([-x2, x1], dim=-1)
        out = xr * cos + rot * sin
        return out if d == x.shape[-1] else torch.cat([out, x[..., d:]], dim=-1)

    def apply_qk(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 norms=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(q, positions), self(k, positions)), after norms = (q_norm, k_norm) if given; on
        CUDA one fused launch for all of it."""
        if q.is_cuda:
            out = _cuda.rope_qk(q, k, positions, self._inv_for(q.device), self.spec.dim, norms)
            if out is not None:
                return out
        if norms is not None:
            q, k = norms[0](q), norms[1](k)
        return self(q, positions), self(k, positions)


@dataclass(frozen=True)
class QKRope:
    """A rope, and the q/k norms before it, still to be applied to q and k at their positions: an
    attention that can do it in its own kernel (DenseKV's CUDA decode step) does; any other calls
    `apply` first."""
    rope: Rope
    norms: tuple | None = None  # (q_norm, k_norm) RMSNorms

    def apply(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope.apply_qk(q, k, positions, self.norms)

    def kernel_args(self, device: torch.device) -> tuple | None:
        """(inv_freq, rotated dims, (q weight, k weight, eps, unit_offset) or None) for the CUDA
        kernels, or None where the norms differ in eps or kind (the kernel has one of each)."""
        norm = None
        if self.norms is not None:
            qn, kn = self.norms
            if qn.eps != kn.eps or qn.unit_offset != kn.unit_offset:
                return None
            norm = (qn.weight, kn.weight, qn.eps, qn.unit_offset)
        return self.rope._inv_for(device), self.rope.spec.dim, norm
