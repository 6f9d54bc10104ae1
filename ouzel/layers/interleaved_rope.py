"""Interleaved partial RoPE (DeepSeek V4): channel pairs (2i, 2i+1) rotate together, and only the
trailing `dim` channels of a head rotate (heads are laid out [nope | rope]).

Plain RoPE and YaRN frequencies; YaRN here never rescales cos/sin (attention_factor defaults to
1, as V4's reference does), only blends interpolated and extrapolated frequencies.
"""
from __future__ import annotations

import math

import torch

from ..errors import UnsupportedError


def _yarn_inv_freq(base: float, dim: int, params: dict) -> torch.Tensor:
    factor = float(params["factor"])
    original = float(params["original_max_position_embeddings"])
    beta_fast, beta_slow = float(params.get("beta_fast") or 32), float(params.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # share of the unscaled (extrapolated) frequency per channel pair
    return interpolated * (1 - keep) + extrapolated * keep


class InterleavedRope:
    """Built from one `rope_parameters` entry: rope_theta, partial_rotary_factor, rope_type."""

    def __init__(self, params: dict, head_dim: int):
        self.dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        base = float(params["rope_theta"])
        kind = params.get("rope_type", params.get("type", "default"))
        if kind == "default":
            self.inv_freq = 1.0 / (base ** (torch.arange(0, self.dim, 2, dtype=torch.float) / self.dim))
            self.scaling = 1.0
        elif kind == "yarn":
            self.inv_freq = _yarn_inv_freq(base, self.dim, params)
            self.scaling = float(params.get("attention_factor", 1.0))
        else:
            raise UnsupportedError(f"DeepSeek V4 rope type {kind!r} is not supported (default, yarn)")

    def fused(self, x: torch.Tensor, positions: torch.Tensor, sign: float = 1.0, norm: str | None = None,
              weight: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor | None:
        """Optional RMSNorm ("unit", or "weighted" by weight) then rotate(x) (sin times sign) in one
        launch (kernels/triton/v4.py), or None where it can't run (the caller runs the reference)."""
        from ..kernels.cuda import v4_rms_rope  # noqa: PLC0415
        self._to(positions.device)
        return v4_rms_rope(x, positions, self.inv_freq, self.scaling, sign, norm, weight, eps)

    def _to(self, device: torch.device) -> None:
        if self.inv_freq.device != device:  # moved once: a copy per step would block graph capture
            self.inv_freq = self.inv_freq.to(device)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T] positions -> cos, sin [T, dim/2] (one angle per channel pair)."""
        self._to(positions.device)
        freqs = positions[:, None].float() * self.inv_freq
        return freqs.cos() * self.scaling, freqs.sin() * self.scaling

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the trailing 2*cos.shape[-1] channels of x [T, ..., D] by the per-token angles
        (pass -sin to undo a rotation)."""
        d = 2 * cos.shape[-1]
        shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
        c, s = cos.reshape(shape), sin.reshape(shape)
        rope = x[..., -d:].float()
        x1, x2 = rope[..., 0::2], rope[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2).to(x.dtype)
        return torch.cat([x[..., :-d], rotated], dim=-1)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self.cos_sin(positions)
        return self.rotate(x, cos, sin)
