"""Per-sequence KV state behind one small interface.

A model's attention layer hands its new q, k, v to `kv.attention(...)` and gets the attention
output back; it never knows how (or for how many sequences) keys and values are stored.
`DenseKV` keeps one sequence in contiguous, growable buffers per layer; a paged block pool
serving a batch of sequences implements the same two calls (`attention`, `commit`).
"""
from __future__ import annotations

import os
from typing import Protocol

import torch

KV_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def default_kv_dtype(device: torch.device | str) -> torch.dtype:
    """float32 on the CPU; float16 on GPUs (what llama.cpp stores: half the bytes read per decoded
    token at depth). OUZEL_KV_DTYPE=f32|f16|bf16 overrides."""
    name = os.environ.get("OUZEL_KV_DTYPE")
    if name:
        if name not in KV_DTYPES:
            from ..errors import OuzelError
            raise OuzelError(f"OUZEL_KV_DTYPE={name!r}: expected one of {', '.join(KV_DTYPES)}")
        return KV_DTYPES[name]
    return torch.float32 if torch.device(device).type == "cpu" else torch.float16


class KVState(Protocol):
    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  window: int | None, scale: float, rope=None, q8: bool = False):
        """Store k, v [T, Hkv, D] of the new tokens, attend q [T, H, D] over everything visible.
        rope (`layers.rope.QKRope`): q and k are not yet rotated (nor normed); apply it first.
        q8: return (out, the int8 rows of out [T, H * D] for the next decode GEMV, or None)."""
        ...

    def commit(self, n: int) -> None: ...
    def trim(self, n: int) -> None: ...
    def nbytes(self) -> int: ...


def cpu_decode_attention(q, k_all, v_all, window, scale):
    """`attend` for one new token on the CPU through the C++ kernel (one call for every head;
    torch's attention took ~90 us a layer at 500 keys for SmolLM2's heads); None where it
    doesn't run. k_all, v_all: the cache's first n rows (a view of its contiguous buffer)."""
    if q.device.type != "cpu" or k_all.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    from ..kernels import cpu  # noqa: PLC0415
    if not cpu.available() or not (k_all.is_contiguous() and v_all.is_contiguous()):
        return None
    n = k_all.shape[0]
    out = cpu.decode_attention(q[0].float(), k_all, v_all, max(0, n - window) if window else 0, n, scale)
    return out[None].to(q.dtype)


class DenseKV:
    """One sequence; contiguous K/V per layer: [capacity, kv_heads, head_dim], doubled when full.

    A single-token step writes its k/v at `positions` and attends with the visible length read
    from `positions` on the device, so the step has no host-side shape that depends on the length:
    it can be captured once in a CUDA graph and replayed while the buffers stay the same
    (`generation` counts reallocations). On CUDA a prefill chunk does the same (the Triton causal
    kernel reads its key range from the positions): `chunk_graphs` says a captured chunk of one
    size replays at any depth."""

    chunk_graphs = True

    def __init__(self, n_layers: int, max_tokens: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None):
        self.max_tokens, self.device = max_tokens, torch.device(device)
        self.dtype = dtype or default_kv_dtype(self.device)
        self.length = 0
        self.generation = 0
        self._k: list[torch.Tensor | None] = [None] * n_layers
        self._v: list[torch.Tensor | None] = [None] * n_layers
        self._offsets: dict[int, torch.Tensor] = {}  # chunk size -> [1 - T .. 0] on the device

    def _reserve(self, layer: int, k_shape, v_shape, end: int) -> None:
        cur = self._k[layer]
        if cur is not None and cur.shape[0] >= end:
            return
        size = min(self.max_tokens, max(end, 256, 2 * (0 if cur is None else cur.shape[0])))
        nk = torch.empty((size, *k_shape), dtype=self.dtype, device=self.device)
        nv = torch.empty((size, *v_shape), dtype=self.dtype, device=self.device)
        if cur is not None:
            nk[: self.length] = cur[: self.length]
            nv[: self.length] = self._v[layer][: self.length]
        self._k[layer], self._v[layer] = nk, nv
        self.generation += 1

    def _room(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> int:
        """Make layer's buffers hold the new rows k, v [T, H, D] after `length`; returns the end."""
        end = self.length + k.shape[0]
        if end > self.max_tokens:
            raise ValueError(f"KV cache holds {self.max_tokens} tokens; {end} needed")
        self._reserve(layer, k.shape[1:], v.shape[1:], end)
        return end

    def reserve(self, end: int) -> None:
        """Make every layer seen so far hold `end` tokens (before replaying a captured step)."""
        for i, k in enumerate(self._k):
            if k is not None:
                self._reserve(i, k.shape[1:], self._v[i].shape[1:], end)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [T, H, D] at positions length..length+T-1; return all [length+T, H, D]."""
        end = self._room(layer, k, v)
        self._k[layer][self.length:end] = k
        self._v[layer][self.length:end] = v
        return self._k[layer][:end], self._v[layer][:end]

    def attention(self, layer, q, k, v, positions, window, scale, rope=None, q8=False):
        from ..layers.attention import attend, decode_attention
        if q.shape[0] == 1 and k.shape[0] == 1 and self.device.type == "cuda":
            self._room(layer, k, v)
            kc, vc = self._k[layer], self._v[layer]
            from ..kernels import cuda  # noqa: PLC0415
            out = cuda.decode_attention(q, kc, vc, positions, window, scale, new_kv=(k, v), rope=rope, q8=q8)
            if out is not None:  # the kernel also stores k, v at positions (and rotates them): one launch
                return out
            if rope is not None:  # no kernel took the rope: rotate first, then the kernel on rotated q, k
                q, k = rope.apply(q, k, positions)
                out = cuda.decode_attention(q, kc, vc, positions, window, scale, new_kv=(k, v))
            if out is None:
                if not cuda.kv_write(k, v, positions, kc, vc):  # one launch; else torch's four
                    kc.index_copy_(0, positions, k.to(self.dtype))
                    vc.index_copy_(0, positions, v.to(self.dtype))
                out = decode_attention(q, kc, vc, positions + 1, window, scale)
            return (out, None) if q8 else out
        if rope is not None and q.shape[0] == 1 and k.shape[0] == 1 and self.device.type == "cpu":
            out = self._cpu_rope_step(layer, q, k, v, positions, window, scale, rope)
            if out is not None:
                return (out, None) if q8 else out
        if rope is not None:
            q, k = rope.apply(q, k, positions)
        if self.device.type == "cuda":
            out = self._chunk_attention(layer, q, k, v, positions, window, scale)
            if out is None and torch.cuda.is_current_stream_capturing():  # slices would bake in today's length
                raise RuntimeError("DenseKV: this prefill chunk's attention needs host-side lengths")
        else:
            out = None
        if out is None:
            k_all, v_all = self.update(layer, k, v)
            out = cpu_decode_attention(q, k_all, v_all, window, scale) if q.shape[0] == 1 else None
            if out is None:
                out = attend(q, k_all, v_all, positions, window, scale)
        return (out, None) if q8 else out

    def _cpu_rope_step(self, layer, q, k, v, positions, window, scale, rope):
        """A CPU decode step's q/k norms (torch), then its RoPE, cache write and attention in one
        call of the C++ kernels (the reference: `rope.apply`, `update`, `attend`); None where
        that call doesn't run (nothing is written then)."""
        from ..layers.rope import Rope  # noqa: PLC0415
        from ..kernels import cpu  # noqa: PLC0415
        if type(rope.rope) is not Rope or self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return None
        if q.dtype != torch.float32 or not cpu.available():
            return None
        if rope.norms is not None:
            q, k = rope.norms[0](q), rope.norms[1](k)
        cos, sin = rope.rope._cos_sin(positions)
        self._room(layer, k, v)
        end = self.length + 1
        out = cpu.decode_attention_rope(q[0], k[0], v[0], self._k[layer], self._v[layer], self.length, cos.view(-1),
                                        sin.view(-1), max(0, end - window) if window else 0, scale)
        return out[None]

    def _chunk_attention(self, layer, q, k, v, positions, window, scale):
        """A prefill chunk on CUDA with the positions read on the device only (so a captured chunk
        replays at any depth): k/v stored at the chunk's positions, then the Triton causal kernel.
        The chunk's keys end where its queries do (q may be only its last rows). None where the
        kernel can't run (nothing is written then)."""
        from ..kernels import cuda  # noqa: PLC0415
        if not cuda.prefill_attention_supports(q, self.dtype):
            return None
        self._room(layer, k, v)
        kc, vc = self._k[layer], self._v[layer]
        back = self._offsets.get(k.shape[0])
        if back is None:
            back = self._offsets[k.shape[0]] = torch.arange(1 - k.shape[0], 1, device=self.device)
        k_pos = positions[-1:] + back
        if not cuda.kv_write(k, v, k_pos, kc, vc):
            kc.index_copy_(0, k_pos, k.to(self.dtype))
            vc.index_copy_(0, k_pos, v.to(self.dtype))
        return cuda.prefill_attention(q, kc, vc, positions, window, scale)

    def commit(self, n: int) -> None:
        self.length += n

    def trim(self, n: int) -> None:
        """Forget every token from position n on (e.g. to re-run a suffix)."""
        self.length = min(self.length, max(0, n))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._k + self._v if t is not None)
