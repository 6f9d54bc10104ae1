"""Paged KV pool, prefix keys and the disk tier, without a server."""
from __future__ import annotations

import os

import pytest
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


@pytest.mark.parametrize("order", ["decode_first", "interleaved"])
@pytest.mark.parametrize("window", [None, 3])
def test_paged_decode_path_matches_per_segment(order, window):
    """2 decode segments + 1 prefill: the paged path (one indexed write, one kernel launch for the
    decodes) gives the per-segment torch outputs and leaves the same pool. On CPU the kernel runs
    in Triton's interpreter."""
    pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(1)
    ref_pool = BlockPool(2, 16, 4, 2, 16, device=dev)
    # one decode at a block boundary (position 4), one mid-block (9), a prefill of 6 after 2 cached
    segs = {"a": Segment([7, 2, 9], 9, 1), "b": Segment([3, 4], 4, 1), "c": Segment([11, 0, 5], 2, 6)}
    ref_pool.k.fill_(float("nan"))  # slots nobody wrote must never be read
    ref_pool.v.fill_(float("nan"))
    for seg in segs.values():
        for p in range(seg.start):
            slot = seg.table[p // 4] * 4 + p % 4
            ref_pool.k[:, slot] = torch.randn(2, 2, 16, generator=g).to(dev)
            ref_pool.v[:, slot] = torch.randn(2, 2, 16, generator=g).to(dev)
    pool = BlockPool(2, 16, 4, 2, 16, device=dev)
    pool.k.copy_(ref_pool.k)
    pool.v.copy_(ref_pool.v)
    batch = [segs[x] for x in ("abc" if order == "decode_first" else "acb")]
    pos = torch.cat([torch.arange(s.start, s.start + s.n) for s in batch]).to(dev)
    ref, fast = BatchKV(ref_pool, batch, paged=False), BatchKV(pool, batch, paged=True)
    for layer in range(2):
        q = torch.randn(8, 4, 16, generator=g).to(dev)
        k, v = torch.randn(8, 2, 16, generator=g).to(dev), torch.randn(8, 2, 16, generator=g).to(dev)
        want = ref.attention(layer, q, k, v, pos, window, 0.25)
        got = fast.attention(layer, q, k, v, pos, window, 0.25)
        assert fast.paged  # the kernel ran (no fallback to torch)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(pool.k.nan_to_num(), ref_pool.k.nan_to_num())
    assert torch.equal(pool.v.nan_to_num(), ref_pool.v.nan_to_num())


def test_paged_path_falls_back_to_torch_without_kernel(monkeypatch):
    """Where no kernel runs (no Triton, OUZEL_NO_TRITON=1) the paged view attends per segment."""
    from ouzel.kernels import cuda
    monkeypatch.setattr(cuda, "paged_decode_attention", lambda *a, **kw: None)
    torch.manual_seed(2)
    pools = [BlockPool(1, 8, 4, 2, 8), BlockPool(1, 8, 4, 2, 8)]
    pools[1].k.copy_(pools[0].k.normal_())
    pools[1].v.copy_(pools[0].v.normal_())
    segs = [Segment([5, 1], 6, 1), Segment([2, 0], 0, 3)]
    q, k, v = torch.randn(4, 4, 8), torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    pos = torch.tensor([6, 0, 1, 2])
    kv = BatchKV(pools[1], segs, paged=True)
    got = kv.attention(0, q, k, v, pos, None, 0.3)
    assert not kv.paged
    assert torch.equal(got, BatchKV(pools[0], segs).attention(0, q, k, v, pos, None, 0.3))


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
