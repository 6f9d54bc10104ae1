"""Prefix reuse for models whose decode state is not paged K/V (DeepSeek V4's `CompressedKV`).

Such a state can't be shared block by block: its compressed rows pool several tokens and its
sliding window and compressor frontier hold the recent tokens' projections. Instead the whole
state is snapshotted at block boundaries and named by the chain key of the block ending there
(`ouzel.kv.prefix.block_key`, the key the paged prefix index and the block disk tier use), so a
request whose prompt starts with that prefix restores the snapshot and prefills only the rest.

Compressed rows are append-only, so a snapshot taken on top of an earlier one of the same
sequence (its `base`) stores only the rows emitted since. The sliding window's raw rows and the
compressor frontier hold one row per recent token, ending at the state's length: a snapshot
stores only the rows of tokens after its base, and takes the older ones (its `spans` say how
many rows the whole tensor has) from the end of the base's. Restoring walks the base chain and
concatenates. A snapshot therefore costs (rows since its base) + (window and frontier rows of
the tokens since its base, at most the window's), not the whole state. Chains are capped: every
`full_every`-th snapshot of a chain is stored whole (no base), so a restore reads at most
`full_every` records. The scheduler snapshots every `every` blocks, at the prompt's last block
boundary (as soon as the prefill reaches it: a crash mid-reply keeps it) and at the last block
boundary of a finished sequence (where a continued conversation resumes).

Resident snapshots are bounded by a byte budget, least recently used first out (a snapshot and
its bases are touched child first, so a base outlives its children); a chain with a missing link
is simply not used. With a disk directory each snapshot is also written as one file (record kind
2 of docs/kv-disk-format.md) by a background thread, validated on read like the block files, and
found again after a restart.
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
SNAP_VERSION = 2  # 2: window and frontier tensors may continue the base's (`spans`)
SNAP_SUFFIX = ".kvs"
FULL_EVERY = 16  # a chain's every 16th snapshot is a full record: restores read at most 16 records
# magic, version, header size, fingerprint, key, parent key, n_tokens (prefix length), block tokens,
# meta bytes, tensor count, payload bytes, checksum, base key, base n_tokens, reserved
_HEADER = struct.Struct("<8sII16s16s16sIIIIQ16s16sI4s")
HEADER_BYTES = 128
assert _HEADER.size == HEADER_BYTES


@dataclass
class Snapshot:
    parent: bytes  # chain key of the block before the last one (the fingerprint for block 0)
    tokens: list[int]  # the last block's token ids (they and `parent` hash to the key)
    n_tokens: int  # prefix length the state covers
    state: dict[str, torch.Tensor]  # with a base, the "*.rows" tensors hold only the rows after the base's
    meta: dict[str, str]
    # rows of each per-token tensor (window, frontier) in the whole state; with a base, the tensor
    # in `state` holds only the last ones, the first (span - held) being the end of the base's
    spans: dict[str, int]
    base: bytes | None = None  # key of the snapshot of an earlier boundary of the same prefix
    base_tokens: int = 0
    depth: int = 1  # records a restore reads for it: itself and its bases

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values())


class SnapshotStore:
    """key -> Snapshot, resident (LRU, byte budget) and optionally on disk."""

    def __init__(self, budget_bytes: int, fingerprint: bytes, block_size: int, every: int = 64,
                 disk: "SnapshotDisk | None" = None, full_every: int = FULL_EVERY):
        self.budget, self.root, self.block_size, self.every = int(budget_bytes), fingerprint, block_size, every
        self.disk, self.full_every = disk, full_every
        self.mem: collections.OrderedDict[bytes, Snapshot] = collections.OrderedDict()
        self.used = 0
        self.hit_tokens = self.disk_hit_tokens = self.taken = 0
        self.records_read = 0  # snapshot records (resident or on disk) that restores looked at

    def __contains__(self, key: bytes) -> bool:
        return key in self.mem or (self.disk is not None and key in self.disk)

    def put(self, key: bytes, parent: bytes, tokens: list[int], state,
            base: tuple[bytes, int] | None = None) -> bool:
        """Snapshot a live state (CompressedKV at exactly the prefix named by key), as rows since
        `base` (key, tokens: an earlier snapshot of this prefix) when given. Copies: the state may
        be trimmed or extended afterwards (views of its tensors would pin whole bases).
        False if it was not kept (larger than the whole budget)."""
        if key in self:
            if key in self.mem:
                self.mem.move_to_end(key)
            return True
        meta, full = state.meta(), state.state()
        # a base must be resident (its depth is known) and its chain shorter than the cap;
        # otherwise this record is stored whole and starts a new chain
        below = self.mem.get(base[0]) if base is not None else None
        if below is None or below.depth >= self.full_every:
            base, below = None, None
        out, spans = {}, {}
        for name, t in full.items():
            if name.endswith(".rows"):
                t = t[base[1] // _ratio(meta, name):] if base is not None else t
            else:  # one row per recent token up to state.length: those up to the base's are the base's
                spans[name] = t.shape[0]
                shared = t.shape[0] - (state.length - base[1]) if base is not None else 0
                t = t[shared:] if 0 < shared <= below.spans.get(name, 0) else t
            out[name] = t.clone()
        snap = Snapshot(parent, list(tokens), state.length, out, meta, spans, *(base or (None, 0)),
                        depth=below.depth + 1 if below else 1)
        size = snap.nbytes()
        if size > self.budget:
            return False
        self.mem[key] = snap
        self.used += size
        self.taken += 1
        self._touch_chain(key)
        while self.used > self.budget:
            _, old = self.mem.popitem(last=False)
            self.used -= old.nbytes()
        if self.disk is not None:  # write-through: a SIGKILL loses nothing already snapshotted
            self.disk.write(key, snap)
        return True

    def _touch_chain(self, key: bytes | None) -> None:
        # child first, bases last: under LRU a base is evicted only after its children
        while key is not None:
            snap = self.mem.get(key)
            if snap is not None:
                self.mem.move_to_end(key)
            elif self.disk is not None:
                self.disk.touch_key(key)
            key = snap.base if snap is not None else (self.disk.bases.get(key) if self.disk else None)

    def restore(self, keys: list[bytes], tokens: list[int], state) -> int:
        """Load into `state` the snapshot of the longest prefix among keys (the chain keys of the
        request's tokens[:-1]); returns the tokens it covers (0: nothing usable, state untouched)."""
        seen: dict[int, Snapshot | None] = {}  # boundary index -> snapshot, read once per request
        for i in range(len(keys) - 1, -1, -1):
            chain = self._chain(i, keys, tokens, seen)
            if chain is None:
                continue
            full = _compose(chain)
            problem = None if full is not None else "rows of the chain do not add up"
            if problem is None:
                try:
                    state.load_state(full, chain[0].meta)
                except (KeyError, ValueError, RuntimeError) as e:  # another layout: not this model's state
                    problem = f"state does not load ({e})"
            if problem or state.length != chain[0].n_tokens:
                log.warning("kv snapshot: not using %s: %s", keys[i].hex(), problem or "length differs")
                self._drop(keys[i], problem or "length differs")
                seen[i] = None
                state.trim(-1)  # back to empty before trying a shorter prefix
                continue
            for d, (snap, key) in enumerate(zip(chain, self._chain_keys(i, keys, chain))):
                snap.depth = len(chain) - d
                if key not in self.mem:  # read from disk: keep it resident, the conversation goes on
                    self.mem[key] = snap
                    self.used += snap.nbytes()
                    self.disk_hit_tokens += 0 if snap is not chain[0] else state.length
            self._touch_chain(keys[i])
            while self.used > self.budget and len(self.mem) > 1:
                _, old = self.mem.popitem(last=False)
                self.used -= old.nbytes()
            self.hit_tokens += state.length
            return state.length
        return 0

    def _get(self, i: int, keys: list[bytes], tokens: list[int], seen: dict) -> Snapshot | None:
        if i not in seen:
            bs, key = self.block_size, keys[i]
            snap = self.mem.get(key)
            if snap is None and self.disk is not None and key in self.disk:
                snap = self.disk.read(key, keys[i - 1] if i else self.root, (i + 1) * bs,
                                      tokens[i * bs:(i + 1) * bs], bs)
            seen[i] = snap
            self.records_read += snap is not None
        return seen[i]

    def _chain(self, i: int, keys: list[bytes], tokens: list[int], seen: dict) -> list[Snapshot] | None:
        """The snapshot at boundary i and its bases, newest first; None if a link is missing or
        the chain is longer than the cap (not written by this policy: not read further)."""
        chain = []
        while True:
            snap = self._get(i, keys, tokens, seen)
            if snap is None:
                return None
            chain.append(snap)
            if snap.base is None:
                return chain
            if len(chain) >= self.full_every:
                return None
            j = snap.base_tokens // self.block_size - 1
            if not (0 <= j < i and snap.base_tokens % self.block_size == 0 and keys[j] == snap.base):
                self._drop(keys[i], f"base {snap.base.hex()} at {snap.base_tokens} tokens is not an earlier "
                                    "boundary of this prefix")
                seen[i] = None
                return None
            i = j

    def _chain_keys(self, i: int, keys: list[bytes], chain: list[Snapshot]) -> list[bytes]:
        out = [keys[i]]
        for snap in chain[:-1]:
            out.append(keys[snap.base_tokens // self.block_size - 1])
        return out

    def _drop(self, key: bytes, why: str) -> None:
        snap = self.mem.pop(key, None)
        if snap is not None:
            self.used -= snap.nbytes()
        if self.disk is not None and key in self.disk:
            self.disk.discard(key, why)


def _ratio(meta: dict[str, str], name: str) -> int:
    layer, series, _ = name.split(".")
    return int(meta[f"{layer}.{series}"].split(",")[0])


def _compose(chain: list[Snapshot]) -> dict[str, torch.Tensor] | None:
    """The full state of chain[0]: its own tensors, each "*.rows" preceded by its bases' rows, each
    per-token tensor by the last (span - held) rows of its base's."""
    top = chain[0]
    out = dict(top.state)
    for name in [n for n in out if n.endswith(".rows")]:
        parts = [s.state.get(name) for s in reversed(chain)]
        if any(p is None for p in parts):
            return None
        rows = torch.cat(parts) if len(parts) > 1 else parts[0]
        if rows.shape[0] != top.n_tokens // _ratio(top.meta, name):
            return None
        out[name] = rows
    for name in [n for n in out if not n.endswith(".rows")]:
        t = _window(chain, name)
        if t is None:
            return None
        out[name] = t
    return out


def _window(chain: list[Snapshot], name: str) -> torch.Tensor | None:
    """chain[0]'s whole per-token tensor `name`: the last (span - held) rows of its base's, then its own."""
    own, span = chain[0].state.get(name), chain[0].spans.get(name)
    if own is None or span is None:
        return None
    shared = span - own.shape[0]
    if shared == 0:
        return own
    below = _window(chain[1:], name) if shared > 0 and len(chain) > 1 else None
    if below is None or below.shape[0] < shared:
        return None
    return torch.cat([below[below.shape[0] - shared:], own])


class SnapshotDisk(DiskTier):
    """The disk tier's directory, budget, LRU and writer thread, holding snapshot records."""

    suffix = SNAP_SUFFIX

    def __init__(self, *args, **kw):
        self.bases: dict[bytes, bytes] = {}  # snapshot key -> its base's key, as far as seen
        super().__init__(*args, **kw)

    def touch_key(self, key: bytes) -> None:
        with self._lock:
            if key in self.files:
                self.files.move_to_end(key)

    def write(self, key: bytes, snap: Snapshot) -> bool:  # type: ignore[override]
        with self._lock:
            if key in self.files or key in self._pending:
                return False
            self._pending[key] = (_encode(self.fingerprint, key, snap),)
            if snap.base is not None:
                self.bases[key] = snap.base
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
        if snap.base is not None:
            self.bases[key] = snap.base
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
    meta = json.dumps({"meta": snap.meta, "tensors": directory, "spans": snap.spans}, separators=(",", ":")).encode()
    payload_b = b"".join(payload)
    body = struct.pack(f"<{len(snap.tokens)}I", *snap.tokens) + meta + payload_b
    header = _HEADER.pack(SNAP_MAGIC, SNAP_VERSION, HEADER_BYTES, fingerprint, key, snap.parent, snap.n_tokens,
                          len(snap.tokens), len(meta), len(directory), len(payload_b), _checksum(body),
                          snap.base or bytes(16), snap.base_tokens, bytes(4))
    return header + body


def _decode(data: bytes, fingerprint: bytes, key: bytes, parent: bytes, n_tokens: int,
            block_size: int) -> tuple[Snapshot | None, str | None]:
    if len(data) < HEADER_BYTES:
        return None, f"truncated ({len(data)} bytes, header alone is {HEADER_BYTES})"
    (magic, version, hbytes, fp, fkey, fparent, n, nb, nmeta, ntensors, npay, checksum, base, base_n,
     _) = _HEADER.unpack_from(data)
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
        spans = {str(k): int(v) for k, v in info["spans"].items()}
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        return None, f"bad tensor directory ({e})"
    if base_n >= n:
        return None, f"base at {base_n} tokens is not before {n}"
    return Snapshot(parent, tokens, n, state, meta, spans, base if base_n else None, base_n), None

