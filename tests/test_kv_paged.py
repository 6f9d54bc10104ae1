"""Paged KV pool, prefix keys and the disk tier, without a server."""
from __future__ import annotations

import torch

from ouzel.kv.disk import DiskTier
from ouzel.kv.manager import BlockManager
from ouzel.kv.paged import BatchKV, BlockPool, Segment
from ouzel.kv.cache import DenseKV
from ouzel.kv.prefix import chain_keys


def test_batch_view_attends_like_dense_kv():
    torch.manual_seed(0)
    pool = BlockPool(1, 8, 4, 2, 8)
    dense = [DenseKV(1, 64), DenseKV(1, 64)]
    tables = [[0, 1, 2], [5, 3]]
    lens = [0, 0]
    for n in ([5, 3], [1, 2], [1, 1]):
        q, k, v = torch.randn(sum(n), 4, 8), torch.randn(sum(n), 2, 8), torch.randn(sum(n), 2, 8)
        pos = torch.cat([torch.arange(lens[i], lens[i] + n[i]) for i in range(2)])
        out = BatchKV(pool, [Segment(tables[i], lens[i], n[i]) for i in range(2)]).attention(0, q, k, v, pos, None, 0.3)
        off = 0
        for i in range(2):
            s = slice(off, off + n[i])
            ref = dense[i].attention(0, q[s], k[s], v[s], pos[s], None, 0.3)
            dense[i].commit(n[i])
            assert torch.equal(out[s], ref)
            off += n[i]
            lens[i] += n[i]


def test_prefix_keys_chain_and_blocks_are_shared():
    pool = BlockPool(1, 4, 4, 1, 2)
    mgr = BlockManager(pool, b"r" * 16)
    toks = list(range(10))
    assert chain_keys(b"r" * 16, toks, 4)[:1] == chain_keys(b"r" * 16, toks[:4] + [99], 4)[:1]
    blocks, keys = [], []
    assert mgr.grow(blocks, 10)
    mgr.filled(toks, blocks, keys, 10)
    mgr.release(list(blocks))
    again, covered = mgr.match(toks + [7])
    assert covered == 8 and again == blocks[:2]


def test_disk_round_trip_and_validation(tmp_path):
    fp = b"f" * 16
    disk = DiskTier(tmp_path, 1 << 20, fp)
    key = chain_keys(b"r" * 16, [1, 2, 3, 4], 4)[0]
    k, v = torch.randn(2, 4, 1, 3), torch.randn(2, 4, 1, 3)
    assert disk.write(key, b"r" * 16, [1, 2, 3, 4], k, v)
    assert not disk.write(key, b"r" * 16, [1, 2, 3, 4], k, v)  # content-addressed: stored once
    toks, k1, _ = disk.read(key, b"r" * 16, (2, 4, 1, 3), torch.float32)  # maybe still queued
    assert toks == [1, 2, 3, 4] and torch.equal(k, k1)
    disk.flush()
    toks, k2, v2 = DiskTier(tmp_path, 1 << 20, fp).read(key, b"r" * 16, (2, 4, 1, 3), torch.float32)
    assert toks == [1, 2, 3, 4] and torch.equal(k, k2) and torch.equal(v, v2)
    assert DiskTier(tmp_path, 1 << 20, b"g" * 16).read(key, b"r" * 16, (2, 4, 1, 3), torch.float32) is None
    assert not disk.path(key).exists()  # a file for another model is discarded
    disk = DiskTier(tmp_path, 1 << 20, fp)
    assert disk.write(key, b"r" * 16, [1, 2, 3, 4], k, v)
    disk.flush()
    raw = bytearray(disk.path(key).read_bytes())
    raw[200] ^= 1
    disk.path(key).write_bytes(bytes(raw))
    assert DiskTier(tmp_path, 1 << 20, fp).read(key, b"r" * 16, (2, 4, 1, 3), torch.float32) is None


def test_disk_budget_drops_least_recently_used(tmp_path):
    disk = DiskTier(tmp_path, 3000, b"f" * 16)
    keys = chain_keys(b"r" * 16, list(range(40)), 4)
    for i, key in enumerate(keys[:4]):
        disk.write(key, b"p" * 16, list(range(4)), torch.zeros(1, 4, 1, 32), torch.zeros(1, 4, 1, 32))
    disk.flush()
    assert disk.used_bytes() <= 3000 and keys[3] in disk and keys[0] not in disk
