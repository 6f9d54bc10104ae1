"""Paged K/V: one block pool shared by every sequence, and the batch view the model attends through.

The pool holds K and V for all full-attention layers in fixed-size blocks of `block_size` tokens
([layers, blocks, block_size, kv_heads, head_dim]). A sequence owns a block table (block ids in
position order). Blocks are reference counted so sequences sharing a prefix share its blocks;
a block nobody references but whose content is known (it has a prefix hash) stays resident as
cache until the space is needed, then it is evicted least-recently-used first.

`BatchKV` implements the model-facing `attention`/`commit` calls of `ouzel.kv.cache.KVState` for a
flattened batch of tokens from several sequences: the model runs its linears once over all T
tokens; attention runs per sequence segment over that sequence's own blocks.
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
    be alone."""

    def __init__(self, pool: BlockPool, segments: list[Segment]):
        from ..layers.attention import attend
        self._attend = attend
        self.pool, self.segments = pool, segments
        bs = pool.block_size
        self._plan = []  # (batch offset, n, write slots [n], read slots [start+n]) per segment
        off = 0
        for seg in segments:
            end = seg.start + seg.n
            if len(seg.table) * bs < end:
                raise OuzelError(f"block table covers {len(seg.table) * bs} tokens; {end} needed")
            used = seg.table[:-(-end // bs)]
            if used == list(range(used[0], used[0] + len(used))):
                # blocks side by side in the pool: plain slices, no gather copy of the whole context
                first = used[0] * bs
                self._plan.append((off, seg.n, slice(first + seg.start, first + end), slice(first, first + end)))
            else:
                table = torch.tensor(seg.table, dtype=torch.long)
                pos = torch.arange(end)
                # built once per step on the pool's device; every layer reuses these indices
                read = (table[pos // bs] * bs + pos % bs).to(pool.k.device)
                self._plan.append((off, seg.n, read[seg.start:], read))
            off += seg.n
        self.total = off

    def attention(self, layer, q, k, v, positions, window, scale):
        # q [T, H, D], k/v [T, Hkv, D] for the whole flattened batch
        kpool, vpool = self.pool.k[layer], self.pool.v[layer]
        out = torch.empty_like(q)
        for off, n, write, read in self._plan:
            kpool[write] = k[off:off + n].to(kpool.dtype)
            vpool[write] = v[off:off + n].to(vpool.dtype)
            out[off:off + n] = self._attend(q[off:off + n], kpool[read], vpool[read],
                                            positions[off:off + n], window, scale)
        return out

    def commit(self, n: int) -> None:
        # lengths live in the scheduler's sequences; nothing is pending here
        if n != self.total:
            raise OuzelError(f"commit({n}) after a batch of {self.total} tokens")

    def trim(self, n: int) -> None:
        raise OuzelError("a batch view cannot trim; the scheduler releases blocks instead")

    def nbytes(self) -> int:
        return self.pool.k.numel() * self.pool.k.element_size() * 2
