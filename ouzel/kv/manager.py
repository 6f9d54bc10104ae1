"""The block manager: the pool, the prefix index and the disk tier behind a few calls.

`match` gives a new sequence every block of its prompt that is already known (resident first,
then from disk), `grow` adds blocks as a sequence lengthens, `filled` names blocks as they fill,
`release` hands a finished sequence's blocks back (and writes their content to disk); `persist`
writes them without releasing (the scheduler calls it once a prompt is prefilled, so a crash
mid-reply keeps the prompt's blocks).
Models whose state is not paged (DeepSeek V4) use `restore` / `snapshot` instead: whole-state
snapshots at block boundaries, named by the same chain keys (`ouzel.kv.snapshots`).
"""
from __future__ import annotations

import logging

import torch

from .disk import DiskTier
from .paged import BlockPool
from .prefix import PrefixIndex, block_key, chain_keys
from .snapshots import SnapshotStore

log = logging.getLogger(__name__)


class BlockManager:
    def __init__(self, pool: BlockPool, root: bytes, disk: DiskTier | None = None,
                 snapshots: SnapshotStore | None = None):
        self.pool, self.disk, self.root, self.snapshots = pool, disk, root, snapshots
        self.index = PrefixIndex(pool, root)
        self.parent_of: dict[int, bytes] = {}  # registered block -> parent key (for disk writes)
        self.tokens_of: dict[int, list[int]] = {}
        pool.on_evict = self._evict
        self.hit_tokens = self.disk_hit_tokens = 0

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    # --- a new sequence ---
    def match(self, tokens: list[int]) -> tuple[list[int], int]:
        """Blocks holding the longest known prefix of tokens[:-1] (the last token is always
        recomputed: its logits are needed). Returns (blocks, tokens covered); blocks are acquired."""
        keys = self.index.keys_of(tokens[:-1])
        blocks: list[int] = []
        parent = self.root
        bs = self.block_size
        from_disk = 0
        for i, key in enumerate(keys):
            b = self.index.lookup(key)
            if b is not None:
                self.pool.acquire(b)
            else:
                b = self._load(key, parent, tokens[i * bs:(i + 1) * bs])
                if b is None:
                    break
                from_disk += 1
            blocks.append(b)
            parent = key
        self.hit_tokens += len(blocks) * bs
        self.disk_hit_tokens += from_disk * bs
        return blocks, len(blocks) * bs

    def _load(self, key: bytes, parent: bytes, tokens: list[int]) -> int | None:
        if self.disk is None or key not in self.disk or self.pool.available() == 0:
            return None
        p = self.pool
        got = self.disk.read(key, parent, (p.n_layers, p.block_size, p.kv_heads, p.head_dim), p.dtype)
        if got is None or got[0] != tokens:
            return None
        b = self.pool.allocate()
        p.write_block(b, got[1], got[2])
        self._name(b, key, parent, tokens)
        return b

    # --- a new sequence with private (snapshotted) state ---
    def snapshot(self, tokens: list[int], keys: list[bytes], state, base: tuple[bytes, int] | None = None,
                 final: bool = False) -> tuple[bytes, int] | None:
        """Called after each forward of a private-state sequence: `keys` (the chain keys of its full
        blocks) is extended to state.length; the state is snapshotted when it sits on a boundary
        every `snapshots.every` blocks or on the last block boundary of tokens[:-1] (the prompt's:
        taken during prefill, so a resend after a crash mid-reply finds it), or (final: the sequence
        ends, its state is no longer needed) after trimming it back to its last block boundary,
        where a continuation will resume.
        `base` is the sequence's previous snapshot (rows before it are not stored again). Returns
        the sequence's latest snapshot (key, tokens): the new one, or `base`."""
        snaps, bs = self.snapshots, self.block_size
        if snaps is None:
            return base
        n = state.length
        if final:
            n = n // bs * bs
        while (len(keys) + 1) * bs <= max(n, state.length):
            i = len(keys)
            keys.append(block_key(keys[-1] if keys else self.root, tokens[i * bs:(i + 1) * bs]))
        nb = n // bs
        if nb == 0 or (base is not None and base[1] >= n) or (not final and n != self.snapshot_stop(tokens, n - 1)):
            return base
        key = keys[nb - 1]
        if key in snaps:  # computed before (maybe by another sequence): build on it
            return key, n
        if final and state.trim(n) != n:  # not exactly reachable (trim is exact only 16 back)
            return base
        if not snaps.put(key, keys[nb - 2] if nb > 1 else self.root, tokens[(nb - 1) * bs:nb * bs], state, base):
            return base
        return key, n

    def snapshot_stop(self, tokens: list[int], computed: int) -> int | None:
        """The next length after `computed` where `snapshot` takes one while prefilling `tokens`:
        the next boundary every `snapshots.every` blocks, or the last block boundary of tokens[:-1]
        (the longest prefix a resend can restore) if sooner. None without snapshots."""
        if self.snapshots is None:
            return None
        every = self.snapshots.every * self.block_size
        stop = (computed // every + 1) * every
        last = (len(tokens) - 1) // self.block_size * self.block_size
        return last if computed < last < stop else stop

    def restore(self, tokens: list[int], state) -> int:
        """Load the snapshot of the longest known prefix of tokens[:-1] into `state`; tokens covered."""
        if self.snapshots is None:
            return 0
        disk_before = self.snapshots.disk_hit_tokens
        got = self.snapshots.restore(chain_keys(self.root, tokens[:-1], self.block_size), tokens, state)
        self.hit_tokens += got
        self.disk_hit_tokens += self.snapshots.disk_hit_tokens - disk_before
        return got

    # --- growth ---
    def grow(self, blocks: list[int], n_tokens: int) -> bool:
        """Add blocks until `blocks` covers n_tokens; False (nothing added) if the pool can't."""
        need = self.pool.blocks_for(n_tokens) - len(blocks)
        if need <= 0:
            return True
        if need > self.pool.available():
            return False
        blocks.extend(self.pool.allocate() for _ in range(need))
        return True

    def filled(self, tokens: list[int], blocks: list[int], keys: list[bytes], computed: int) -> None:
        """Name every block that became full now that `computed` tokens have K/V; keys grows."""
        bs = self.block_size
        while (len(keys) + 1) * bs <= computed:
            i = len(keys)
            parent = keys[-1] if keys else self.root
            chunk = tokens[i * bs:(i + 1) * bs]
            key = block_key(parent, chunk)
            keys.append(key)
            if self.pool.hash_of[blocks[i]] is None:
                self._name(blocks[i], key, parent, chunk)

    def _name(self, b: int, key: bytes, parent: bytes, tokens: list[int]) -> None:
        if self.index.register(key, b):
            self.parent_of[b], self.tokens_of[b] = parent, list(tokens)

    # --- the end of a sequence ---
    def release(self, blocks: list[int], persist: bool = True) -> int:
        """Give the blocks back; with persist, write their named blocks to disk first. Bytes written."""
        written = self.persist(blocks) if persist else 0
        for b in blocks:
            self.pool.release(b)
        blocks.clear()
        return written

    def persist(self, blocks: list[int]) -> int:
        if self.disk is None:
            return 0
        before = self.disk.bytes_written
        for b in blocks:
            self._write(b)
        return self.disk.bytes_written - before

    def _write(self, b: int) -> None:
        key = self.pool.hash_of[b]
        if key is None or key in self.disk or b not in self.parent_of:
            return
        k, v = self.pool.read_block(b)
        self.disk.write(key, self.parent_of[b], self.tokens_of[b], k, v)

    def _evict(self, b: int) -> None:
        # the block's content is about to be overwritten: keep it on disk, forget it in memory
        if self.disk is not None:
            self._write(b)
        self.index.drop_block(b)
        self.parent_of.pop(b, None)
        self.tokens_of.pop(b, None)

    def stats(self) -> dict[str, int]:
        d = self.disk
        return {"blocks_total": self.pool.n_blocks, "blocks_in_use": self.pool.in_use(),
                "blocks_cached": len(self.pool.cached), "prefix_blocks": len(self.index),
                "cache_hit_tokens": self.hit_tokens, "disk_hit_tokens": self.disk_hit_tokens,
                "disk_bytes": d.used_bytes() if d else 0, "disk_bytes_written": d.bytes_written if d else 0,
                "disk_files_discarded": d.discarded if d else 0, **self._snapshot_stats()}

    def _snapshot_stats(self) -> dict[str, int]:
        s = self.snapshots
        if s is None:
            return {}
        d = s.disk
        out = {"snapshots": len(s.mem), "snapshot_bytes": s.used}
        if d is not None:  # the private-state model's disk tier is the snapshot files
            out.update(disk_bytes=d.used_bytes(), disk_bytes_written=d.bytes_written, disk_files_discarded=d.discarded)
        return out


def kv_shape(model) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a model's full-attention KV."""
    cfg = model.config
    return len(model.model.layers), int(cfg.num_kv_heads), int(cfg.head_dim)


def default_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """DenseKV's choice (float32 on the CPU, float16 on GPUs, OUZEL_KV_DTYPE overrides); blocks on
    disk carry it in their fingerprint, so a restored block continues exactly as the live one would."""
    from .cache import default_kv_dtype
    return default_kv_dtype(device)
