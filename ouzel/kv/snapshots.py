"""Prefix reuse for models whose decode state is not paged K/V (DeepSeek V4's `CompressedKV`).

Such a state can't be shared block by block: its compressed rows pool several tokens and its
sliding window and compressor frontier hold the recent tokens' projections. Instead the whole
state is snapshotted at block boundaries and named by the chain key of the block ending there
(`ouzel.kv.prefix.block_key`, the key the paged prefix index and the block disk tier use), so a
request whose prompt starts with that prefix restores the snapshot and prefills only the rest.

Snapshots are full (not deltas): restoring one is a single read with nothing to chain. Their
size is `CompressedKV.nbytes()` at the boundary, which grows with its length (compressed rows);
the scheduler therefore snapshots only every `every` blocks and at the last block boundary of a
finished sequence (where a continued conversation resumes). Resident snapshots are bounded by a
byte budget, least recently used first out; with a disk directory each snapshot is also written
as one file (record kind 2 of docs/kv-disk-format.md) by a background thread, validated on read
like the block files, and found again after a restart.
"""
from __future__ import annotations

import collections
import json
import logging
import struct
from dataclasses import dataclass

import torch

from .disk import DTYPE_OF, DTYPES, DiskTier, _checksum
from .prefix import block_key

log = logging.getLogger(__name__)

SNAP_MAGIC = b"OUZKVSNP"
SNAP_VERSION = 1
SNAP_SUFFIX = ".kvs"
# magic, version, header size, fingerprint, key, parent key, n_tokens (prefix length), block tokens,
# meta bytes, tensor count, payload bytes, checksum, reserved
_HEADER = struct.Struct("<8sII16s16s16sIIIIQ16s24s")
HEADER_BYTES = 128
assert _HEADER.size == HEADER_BYTES


@dataclass
class Snapshot:
    parent: bytes  # chain key of the block before the last one (the fingerprint for block 0)
    tokens: list[int]  # the last block's token ids (they and `parent` hash to the key)
    n_tokens: int  # prefix length the state covers
    state: dict[str, torch.Tensor]
    meta: dict[str, str]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values())


class SnapshotStore:
    """key -> Snapshot, resident (LRU, byte budget) and optionally on disk."""

    def __init__(self, budget_bytes: int, fingerprint: bytes, block_size: int, every: int = 64,
                 disk: "SnapshotDisk | None" = None):
        self.budget, self.root, self.block_size, self.every = int(budget_bytes), fingerprint, block_size, every
        self.disk = disk
        self.mem: collections.OrderedDict[bytes, Snapshot] = collections.OrderedDict()
        self.used = 0
        self.hit_tokens = self.disk_hit_tokens = self.taken = 0

    def __contains__(self, key: bytes) -> bool:
        return key in self.mem or (self.disk is not None and key in self.disk)

    def put(self, key: bytes, parent: bytes, tokens: list[int], state) -> None:
        """Snapshot a live state (CompressedKV at exactly the prefix named by key). Copies: the
        state may be trimmed or extended afterwards (views of its tensors would pin whole bases)."""
        if key in self.mem:
            self.mem.move_to_end(key)
            return
        snap = Snapshot(parent, list(tokens), state.length, {k: v.clone() for k, v in state.state().items()},
                        state.meta())
        size = snap.nbytes()
        if size > self.budget:
            return
        self.mem[key] = snap
        self.used += size
        self.taken += 1
        while self.used > self.budget:
            _, old = self.mem.popitem(last=False)
            self.used -= old.nbytes()
        if self.disk is not None:  # write-through: a SIGKILL loses nothing already snapshotted
            self.disk.write(key, snap)

    def restore(self, keys: list[bytes], tokens: list[int], state) -> int:
        """Load into `state` the snapshot of the longest prefix among keys (the chain keys of the
        request's tokens[:-1]); returns the tokens it covers (0: nothing usable, state untouched)."""
        bs = self.block_size
        for i in range(len(keys) - 1, -1, -1):
            key = keys[i]
            parent = keys[i - 1] if i else self.root
            snap, from_disk = self.mem.get(key), False
            if snap is not None:
                self.mem.move_to_end(key)
            elif self.disk is not None and key in self.disk:
                snap = self.disk.read(key, parent, (i + 1) * bs, tokens[i * bs:(i + 1) * bs], bs)
                from_disk = snap is not None
            if snap is None:
                continue
            try:
                state.load_state(snap.state, snap.meta)
            except (KeyError, ValueError, RuntimeError) as e:  # another layout: not this model's state
                if from_disk:
                    self.disk.discard(key, f"state does not load ({e})")
                else:
                    self.used -= self.mem.pop(key).nbytes()
                state.trim(-1)  # back to empty before trying a shorter prefix
                continue
            if state.length != (i + 1) * bs:
                state.trim(-1)
                continue
            if from_disk:  # keep it resident: the conversation will likely continue
                self.mem[key] = snap
                self.used += snap.nbytes()
                self.disk_hit_tokens += state.length
            self.hit_tokens += state.length
            return state.length
        return 0


class SnapshotDisk(DiskTier):
    """The disk tier's directory, budget, LRU and writer thread, holding snapshot records."""

    suffix = SNAP_SUFFIX

    def write(self, key: bytes, snap: Snapshot) -> bool:  # type: ignore[override]
        with self._lock:
            if key in self.files or key in self._pending:
                return False
            self._pending[key] = (_encode(self.fingerprint, key, snap),)
        self._queue.put(key)
        return True

    def _store(self, key: bytes, data: bytes) -> bool:  # type: ignore[override]
        return self._store_bytes(key, data)

    def read(self, key: bytes, parent: bytes, n_tokens: int, tokens: list[int],  # type: ignore[override]
             block_size: int) -> Snapshot | None:
        with self._lock:
            item = self._pending.get(key)
            if item is None and key not in self.files:
                return None
        if item is not None:
            data = item[0]
        else:
            try:
                data = self.path(key).read_bytes()
            except OSError as e:
                return self.discard(key, f"unreadable ({e})")
        snap, problem = _decode(data, self.fingerprint, key, parent, n_tokens, block_size)
        if problem is None and snap.tokens != tokens:
            problem = "tokens differ from the request's"
        if problem:
            return self.discard(key, problem)
        self.touch(key)
        return snap

    def discard(self, key: bytes, why: str) -> None:
        with self._lock:
            self._pending.pop(key, None)
        return self._discard(key, why)


def _encode(fingerprint: bytes, key: bytes, snap: Snapshot) -> bytes:
    """Header, last block's tokens, meta JSON (state meta + tensor directory), tensor bytes."""
    directory, payload = [], []
    for name, t in snap.state.items():
        b = t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
        directory.append([name, DTYPES[t.dtype], list(t.shape), len(b)])
        payload.append(b)
    meta = json.dumps({"meta": snap.meta, "tensors": directory}, separators=(",", ":")).encode()
    payload_b = b"".join(payload)
    body = struct.pack(f"<{len(snap.tokens)}I", *snap.tokens) + meta + payload_b
    header = _HEADER.pack(SNAP_MAGIC, SNAP_VERSION, HEADER_BYTES, fingerprint, key, snap.parent, snap.n_tokens,
                          len(snap.tokens), len(meta), len(directory), len(payload_b), _checksum(body), bytes(24))
    return header + body


def _decode(data: bytes, fingerprint: bytes, key: bytes, parent: bytes, n_tokens: int,
            block_size: int) -> tuple[Snapshot | None, str | None]:
    if len(data) < HEADER_BYTES:
        return None, f"truncated ({len(data)} bytes, header alone is {HEADER_BYTES})"
    magic, version, hbytes, fp, fkey, fparent, n, nb, nmeta, ntensors, npay, checksum, _ = _HEADER.unpack_from(data)
    checks = [
        (magic == SNAP_MAGIC, f"bad magic {magic!r}"),
        (version == SNAP_VERSION, f"snapshot version {version}, this build reads {SNAP_VERSION}"),
        (hbytes == HEADER_BYTES, f"header size {hbytes}"),
        (fp == fingerprint, "written for another model (fingerprint differs)"),
        (fkey == key, "key in header differs from file name"),
        (fparent == parent, "parent key differs (another prefix)"),
        (n == n_tokens and nb == block_size, f"covers {n} tokens in blocks of {nb}, expected {n_tokens}/{block_size}"),
        (len(data) == HEADER_BYTES + 4 * nb + nmeta + npay, f"size {len(data)} != header + tokens + meta + payload"),
    ]
    for ok, why in checks:
        if not ok:
            return None, why
    body = data[HEADER_BYTES:]
    if _checksum(body) != checksum:
        return None, "checksum mismatch"
    tokens = list(struct.unpack_from(f"<{nb}I", body))
    if block_key(parent, tokens) != key:
        return None, "tokens do not hash to the key"
    try:
        info = json.loads(body[4 * nb:4 * nb + nmeta])
        state, off = {}, 4 * nb + nmeta
        for name, code, shape, size in info["tensors"]:
            t = torch.frombuffer(bytearray(body[off:off + size]), dtype=DTYPE_OF[code])
            state[name] = t.view(shape) if size else t.new_empty(shape)
            off += size
        if off != len(body) or len(state) != ntensors:
            return None, "tensor directory does not match the payload"
        meta = {str(k): str(v) for k, v in info["meta"].items()}
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        return None, f"bad tensor directory ({e})"
    return Snapshot(parent, tokens, n, state, meta), None

