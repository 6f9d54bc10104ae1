"""Prefix index: full KV blocks named by a hash chained over token ids, shared by all sequences.

key_0 = H(root, tokens of block 0); key_i = H(key_{i-1}, tokens of block i). The root is the model
fingerprint, so two models never share a key, and a key names its whole prefix, not one block:
equal keys mean equal token histories, hence equal K/V. The same keys name the files of the disk
tier (`ouzel.kv.disk`), so a prefix found resident or on disk is looked up the same way.
"""
from __future__ import annotations

import hashlib
import struct

from .paged import BlockPool

KEY_BYTES = 16


def block_key(parent: bytes, tokens: list[int]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=KEY_BYTES)
    h.update(struct.pack(f"<{len(tokens)}I", *tokens))
    return h.digest()


def chain_keys(root: bytes, tokens: list[int], block_size: int) -> list[bytes]:
    """The key of every full block of `tokens`, in order."""
    keys, parent = [], root
    for i in range(len(tokens) // block_size):
        parent = block_key(parent, tokens[i * block_size:(i + 1) * block_size])
        keys.append(parent)
    return keys


class PrefixIndex:
    """key -> resident block id, over every full block any sequence (live or finished) computed."""

    def __init__(self, pool: BlockPool, root: bytes):
        self.pool, self.root = pool, root
        self.blocks: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self.blocks)

    def lookup(self, key: bytes) -> int | None:
        return self.blocks.get(key)

    def register(self, key: bytes, block: int) -> bool:
        """Name a just-filled block; False when another block already holds that prefix."""
        if key in self.blocks:
            return False
        self.blocks[key] = block
        self.pool.hash_of[block] = key
        return True

    def drop_block(self, block: int) -> None:
        """The pool is reusing `block` for something else: forget its key."""
        key = self.pool.hash_of[block]
        if key is not None and self.blocks.get(key) == block:
            del self.blocks[key]

    def keys_of(self, tokens: list[int]) -> list[bytes]:
        return chain_keys(self.root, tokens, self.pool.block_size)
