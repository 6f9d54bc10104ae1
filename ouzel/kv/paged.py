"""Paged K/V: one block pool shared by every sequence, and the batch view the model attends through.

The pool holds K and V for all full-attention layers in fixed-size blocks of `block_size` tokens
([layers, blocks, block_size, kv_heads, head_dim]). A sequence owns a block table (block ids in
position order). Blocks are reference counted so sequences sharing a prefix share its blocks;
a block nobody references but whose content is known (it has a prefix hash) stays resident as
cache until the space is needed, then it is evicted least-recently-used first.

`BatchKV` implements the model-facing `attention`/`commit` calls of `ouzel.kv.cache.KVState` for a
flattened batch of tokens from several sequences: the model runs its linears once over all T
tokens; attention runs per sequence segment over that sequence's own blocks (on CUDA all decode
segments go in one paged-attention launch).
"""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import OuzelError


class BlockPool:
    """Fixed K/V block storage plus the bookkeeping of who uses which block."""

    def __init__(self, n_layers: int, n_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if n_blocks < 1:
            raise OuzelError(f"the KV pool needs at least one block (got {n_blocks})")
        self.n_layers, self.n_blocks, self.block_size = n_layers, n_blocks, block_size
        self.kv_heads, self.head_dim, self.dtype = kv_heads, head_dim, dtype
        shape = (n_layers, n_blocks * block_size, kv_heads, head_dim)
        # empty, not zeros: untouched pages of a large pool are then never faulted in on CPU
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.refs = [0] * n_blocks
        self.hash_of: list[bytes | None] = [None] * n_blocks
        self.free: collections.deque[int] = collections.deque(range(n_blocks))
        # refs == 0 but content known (hash set): evictable cache, oldest first
        self.cached: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.on_evict: Callable[[int], None] | None = None  # called before a cached block is reused

    # --- capacity ---
    def blocks_for(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.block_size)

    def available(self) -> int:
        """Blocks that can be handed out now (free plus evictable cache)."""
        return len(self.free) + len(self.cached)

    def in_use(self) -> int:
        return self.n_blocks - self.available()

    def bytes_per_block(self) -> int:
        return 2 * self.n_layers * self.block_size * self.kv_heads * self.head_dim * self.k.element_size()

    # --- allocation ---
    def allocate(self) -> int:
        if self.free:
            b = self.free.popleft()
        elif self.cached:
            b, _ = self.cached.popitem(last=False)
            if self.on_evict is not None:
                self.on_evict(b)
            self.hash_of[b] = None
        else:
            raise OuzelError("KV block pool exhausted")
        self.refs[b] = 1
        return b

    def acquire(self, b: int) -> None:
        """Take one more reference to a block (a shared prefix block, maybe revived from cache)."""
        if self.refs[b] == 0:
            self.cached.pop(b, None)
        self.refs[b] += 1

    def release(self, b: int) -> None:
        self.refs[b] -= 1
        if self.refs[b] > 0:
            return
        if self.hash_of[b] is not None:
            self.cached[b] = None
        else:
            self.free.append(b)

    def forget(self, b: int) -> None:
        """Drop a cached block's identity (its prefix hash) so it returns to the free list."""
        self.hash_of[b] = None
        if self.refs[b] == 0 and b in self.cached:
            del self.cached[b]
            self.free.append(b)

    # --- content (for the disk tier) ---
    def slots(self, b: int) -> slice:
        return slice(b * self.block_size, (b + 1) * self.block_size)

    def read_block(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of one block: [layers, block_size, kv_heads, head_dim] each (views)."""
        s = self.slots(b)
        return self.k[:, s], self.v[:, s]

    def write_block(self, b: int, k: torch.Tensor, v: torch.Tensor) -> None:
        s = self.slots(b)
        self.k[:, s] = k
        self.v[:, s] = v


@dataclass
class Segment:
    """One sequence's slice of a flattened batch: tokens at positions start..start+n-1."""
    table: list[int]  # the sequence's block ids, covering at least start+n tokens
    start: int
    n: int


class BatchKV:
    """The KVState a model sees for one forward over several sequences' new tokens.

    Token order in the batch is segment order; each segment's k/v land in its own blocks and its
    queries attend only to its own keys, so a sequence's attention is computed exactly as it would
    be alone.

    Paged (CUDA pools): each layer stores the whole batch's k/v with one indexed copy, and every
    decode segment (one new token) attends in one flash-decoding launch that reads the pool through
    the block tables (`kernels/triton/attention.py`), with no gather copy; prefill segments attend
    per segment as on CPU. The tables are built once per BatchKV (one step) for every layer."""

    def __init__(self, pool: BlockPool, segments: list[Segment], paged: bool | None = None):
        """paged: None takes the paged path on CUDA pools; True forces it (tests run it on CPU
        through Triton's interpreter, TRITON_INTERPRET=1)."""
        from ..layers.attention import attend
        from .cache import cpu_decode_attention
        self._attend, self._attend_one = attend, cpu_decode_attention
        self.pool, self.segments = pool, segments
        self.paged = pool.k.is_cuda if paged is None else paged
        bs = pool.block_size
        for seg in segments:
            if len(seg.table) * bs < seg.start + seg.n:
                raise OuzelError(f"block table covers {len(seg.table) * bs} tokens; {seg.start + seg.n} needed")
        self.total = sum(seg.n for seg in segments)
        self._plan, decode = self._split(self.paged)
        if self.paged:
            self._paged_setup(decode)

    def _split(self, paged: bool):
        """(plan, decode): plan holds (batch offset, n, write slots [n], read slots [start+n]) of
        each segment attended in torch; decode (batch offset, segment) of those the paged kernel
        attends (one new token each, when paged)."""
        plan, decode, off = [], [], 0
        for seg in self.segments:
            if paged and seg.n == 1:
                decode.append((off, seg))
            else:
                plan.append((off, seg.n, *self._slots(seg)))
            off += seg.n
        return plan, decode

    def _slots(self, seg: Segment):
        """(write slots of the new tokens, read slots of all start+n keys): slices when the blocks
        sit side by side in the pool, else index tensors on the pool's device."""
        bs, end = self.pool.block_size, seg.start + seg.n
        used = seg.table[:-(-end // bs)]
        if used == list(range(used[0], used[0] + len(used))):
            # blocks side by side in the pool: plain slices, no gather copy of the whole context
            first = used[0] * bs
            return slice(first + seg.start, first + end), slice(first, first + end)
        table = torch.tensor(seg.table, dtype=torch.long)
        pos = torch.arange(end)
        # built once per step on the pool's device; every layer reuses these indices
        read = (table[pos // bs] * bs + pos % bs).to(self.pool.k.device)
        return read[seg.start:], read

    def _paged_setup(self, decode: list[tuple[int, Segment]]) -> None:
        bs, dev = self.pool.block_size, self.pool.k.device
        slots = [s.table[p // bs] * bs + p % bs for s in self.segments for p in range(s.start, s.start + s.n)]
        self._write = torch.tensor(slots, dtype=torch.long, device=dev)
        self._decode = None  # (batch rows, block table [B, W] int32, lengths [B] int32)
        if not decode:
            return
        width = max(s.start // bs + 1 for _, s in decode)  # blocks of the longest; shorter rows padded
        table = [s.table[:width] + [0] * (width - min(width, len(s.table))) for _, s in decode]
        offs = [o for o, _ in decode]
        rows = slice(offs[0], offs[-1] + 1) if offs[-1] - offs[0] == len(offs) - 1 else torch.tensor(offs, device=dev)
        self._decode = (rows, torch.tensor(table, dtype=torch.int32, device=dev),
                        torch.tensor([s.start + 1 for _, s in decode], dtype=torch.int32, device=dev))

    def attention(self, layer, q, k, v, positions, window, scale, rope=None, q8=False):
        # q [T, H, D], k/v [T, Hkv, D] for the whole flattened batch
        if rope is not None:
            q, k = rope.apply(q, k, positions)
        out = self._attention(layer, q, k, v, positions, window, scale)
        return (out, None) if q8 else out

    def _attention(self, layer, q, k, v, positions, window, scale):
        kpool, vpool = self.pool.k[layer], self.pool.v[layer]
        out = torch.empty_like(q)
        if self.paged:
            kpool.index_copy_(0, self._write, k.to(kpool.dtype))
            vpool.index_copy_(0, self._write, v.to(vpool.dtype))
            if self._decode is not None and not self._paged_decode(q, kpool, vpool, window, scale, out):
                # no kernel here (no Triton, OUZEL_NO_TRITON=1): every segment through torch
                self.paged = False
                self._plan, _ = self._split(False)
        for off, n, write, read in self._plan:
            if not self.paged:
                kpool[write] = k[off:off + n].to(kpool.dtype)
                vpool[write] = v[off:off + n].to(vpool.dtype)
            kr, vr = kpool[read], vpool[read]
            one = self._attend_one(q[off:off + n], kr, vr, window, scale) if n == 1 else None  # as DenseKV
            out[off:off + n] = one if one is not None else self._attend(q[off:off + n], kr, vr, positions[off:off + n],
                                                                        window, scale)
        return out

    def _paged_decode(self, q, kpool, vpool, window, scale, out) -> bool:
        """All decode segments in one kernel launch, into their rows of out; False if no kernel runs."""
        from ..kernels import cuda  # noqa: PLC0415
        rows, table, lengths = self._decode
        dst = out[rows] if isinstance(rows, slice) and out.stride(-1) == 1 else None
        res = cuda.paged_decode_attention(q[rows], kpool, vpool, table, lengths, self.pool.block_size, window,
                                          scale, out=dst)
        if res is None:
            return False
        if dst is None:
            out[rows] = res
        return True

    def commit(self, n: int) -> None:
        # lengths live in the scheduler's sequences; nothing is pending here
        if n != self.total:
            raise OuzelError(f"commit({n}) after a batch of {self.total} tokens")

    def trim(self, n: int) -> None:
        raise OuzelError("a batch view cannot trim; the scheduler releases blocks instead")

    def nbytes(self) -> int:
        return self.pool.k.numel() * self.pool.k.element_size() * 2
