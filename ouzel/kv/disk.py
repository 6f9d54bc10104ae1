"""Disk tier for KV blocks: one file per full block, named by its prefix key (docs/kv-disk-format.md).

Content addressing makes sharing free: a prefix used by many conversations is one set of files,
and a continued conversation writes only its new blocks. The tier is bounded by a byte budget,
least-recently-used files go first. Every file is validated before use (magic, version, model
fingerprint, shape, key chain, checksum); a file that fails is deleted and logged once, and the
caller falls back to prefill. Writes go to a temporary name and are renamed into place, so a
crash (even SIGKILL) leaves either the whole file or none.

`write` only copies the block's bytes; a writer thread hashes and stores them, so decode steps
never wait for the disk. Until stored, a block is served from that copy.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import os
import queue
import struct
import threading
from pathlib import Path

import torch

from .prefix import KEY_BYTES, block_key

log = logging.getLogger(__name__)

MAGIC = b"OUZKVBLK"
VERSION = 1
HEADER_BYTES = 128
SUFFIX = ".kvb"
# magic, version, header size, fingerprint, key, parent key, tokens, layers, kv heads, head dim,
# dtype code, reserved, payload bytes, checksum, reserved
_HEADER = struct.Struct("<8sII16s16s16sIIIIIIQ16s16s")
assert _HEADER.size == HEADER_BYTES
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
DTYPE_OF = {v: k for k, v in DTYPES.items()}


class DiskTier:
    suffix = SUFFIX  # a subclass storing another record kind (kv/snapshots.py) uses its own

    def __init__(self, directory: str | os.PathLike, budget_bytes: int, fingerprint: bytes):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.budget, self.fingerprint = int(budget_bytes), fingerprint
        self.files: collections.OrderedDict[bytes, int] = collections.OrderedDict()  # key -> size, LRU
        self.bytes_written = self.files_written = self.hits = self.discarded = 0
        self._used = 0  # sum of self.files' sizes
        self._lock = threading.Lock()
        self._pending: dict[bytes, tuple] = {}  # key -> (parent, tokens, k bytes, v bytes): not on disk yet
        self._queue: queue.Queue = queue.Queue()
        self._scan()
        threading.Thread(target=self._writer, name="ouzel-kv-disk", daemon=True).start()

    def _scan(self) -> None:
        found = []
        for p in self.dir.iterdir():
            if p.name.startswith(".tmp-"):  # a write cut short by a crash
                p.unlink(missing_ok=True)
                continue
            if p.suffix != self.suffix or len(p.stem) != 2 * KEY_BYTES:
                continue
            try:
                st = p.stat()
                found.append((st.st_mtime, bytes.fromhex(p.stem), st.st_size))
            except (OSError, ValueError):
                continue
        for _, key, size in sorted(found):
            self.files[key] = size
            self._used += size
        self._enforce_budget()

    # --- queries ---
    def __contains__(self, key: bytes) -> bool:
        return key in self.files or key in self._pending

    def used_bytes(self) -> int:
        return self._used

    def path(self, key: bytes) -> Path:
        return self.dir / (key.hex() + self.suffix)

    # --- write ---
    def write(self, key: bytes, parent: bytes, tokens: list[int], k: torch.Tensor, v: torch.Tensor) -> bool:
        """Queue one block (k, v: [layers, tokens, kv_heads, head_dim]) for storing; False if
        already stored or queued. The tensors are copied now: the caller may reuse them at once."""
        with self._lock:
            if key in self.files:
                self.files.move_to_end(key)
                return False
            if key in self._pending:
                return False
            item = (parent, list(tokens), _tensor_bytes(k), _tensor_bytes(v), tuple(k.shape), k.dtype)
            self._pending[key] = item
        self._queue.put(key)
        return True

    def flush(self) -> None:
        """Wait until every queued block is on disk."""
        self._queue.join()

    def _writer(self) -> None:
        while True:
            key = self._queue.get()
            try:
                with self._lock:
                    item = self._pending.get(key)
                if item is not None:
                    self._store(key, *item)
            except Exception:  # a failed write must not stop later ones
                log.exception("kv disk: writing %s failed", key.hex())
            finally:
                with self._lock:
                    self._pending.pop(key, None)
                self._queue.task_done()

    def _store(self, key: bytes, parent: bytes, tokens: list[int], kb: bytes, vb: bytes, shape, dtype) -> bool:
        payload = kb + vb
        body = struct.pack(f"<{len(tokens)}I", *tokens) + payload
        layers, n, heads, dim = shape
        header = _HEADER.pack(MAGIC, VERSION, HEADER_BYTES, self.fingerprint, key, parent, n, layers, heads, dim,
                              DTYPES[dtype], 0, len(payload), _checksum(body), bytes(16))
        return self._store_bytes(key, header + body)

    def _store_bytes(self, key: bytes, data: bytes) -> bool:
        """Write one whole file under a temporary name, rename it into place, account for it."""
        tmp = self.dir / f".tmp-{os.getpid()}-{key.hex()}{self.suffix}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path(key))
        except OSError as e:
            tmp.unlink(missing_ok=True)
            log.warning("kv disk: cannot write %s: %s", self.path(key), e)
            return False
        size = len(data)
        with self._lock:
            self.files[key] = size
            self._used += size
            self.bytes_written += size
            self.files_written += 1
            self._enforce_budget()
        return True

    def _enforce_budget(self) -> None:
        while self.files and self.used_bytes() > self.budget:
            key, size = self.files.popitem(last=False)
            self._used -= size
            self.path(key).unlink(missing_ok=True)

    # --- read ---
    def read(self, key: bytes, parent: bytes, shape: tuple[int, int, int, int],
             dtype: torch.dtype) -> tuple[list[int], torch.Tensor, torch.Tensor] | None:
        """tokens, K, V of a block, or None (missing, or invalid: then deleted and logged)."""
        with self._lock:
            item = self._pending.get(key)
            if item is None and key not in self.files:
                return None
        if item is not None:  # queued, not written yet: serve the copy
            iparent, tokens, kb, vb, ishape, idtype = item
            if iparent != parent or tuple(ishape) != tuple(shape) or idtype != dtype:
                return None
            self.hits += 1
            return (tokens, torch.frombuffer(bytearray(kb), dtype=dtype).view(shape),
                    torch.frombuffer(bytearray(vb), dtype=dtype).view(shape))
        p = self.path(key)
        try:
            data = p.read_bytes()
        except OSError as e:
            return self._discard(key, f"unreadable ({e})")
        problem = self._check(data, key, parent, shape, dtype)
        if problem:
            return self._discard(key, problem)
        layers, n, heads, dim = shape
        tokens = list(struct.unpack_from(f"<{n}I", data, HEADER_BYTES))
        start = HEADER_BYTES + 4 * n
        half = (len(data) - start) // 2
        k = torch.frombuffer(bytearray(data[start:start + half]), dtype=dtype).view(shape)
        v = torch.frombuffer(bytearray(data[start + half:]), dtype=dtype).view(shape)
        self.touch(key)
        return tokens, k, v

    def touch(self, key: bytes) -> None:
        """A file was used: most recently used now, in memory and (through its mtime) on disk."""
        with self._lock:
            if key in self.files:
                self.files.move_to_end(key)
        try:
            os.utime(self.path(key))  # the LRU order survives a restart through mtimes
        except OSError:
            pass
        self.hits += 1

    def _check(self, data: bytes, key: bytes, parent: bytes, shape, dtype) -> str | None:
        if len(data) < HEADER_BYTES:
            return f"truncated ({len(data)} bytes, header alone is {HEADER_BYTES})"
        (magic, version, hbytes, fp, fkey, fparent, n, layers, heads, dim, dcode, _, nbytes, checksum,
         _) = _HEADER.unpack_from(data)
        layers_, n_, heads_, dim_ = shape
        elt = torch.empty((), dtype=dtype).element_size()
        expected_payload = 2 * layers_ * n_ * heads_ * dim_ * elt
        checks = [
            (magic == MAGIC, f"bad magic {magic!r}"),
            (version == VERSION, f"format version {version}, this build reads {VERSION}"),
            (hbytes == HEADER_BYTES, f"header size {hbytes}"),
            (fp == self.fingerprint, "written for another model (fingerprint differs)"),
            (fkey == key, "key in header differs from file name"),
            (fparent == parent, "parent key differs (another prefix)"),
            ((layers, n, heads, dim) == (layers_, n_, heads_, dim_), f"shape {(layers, n, heads, dim)} != {shape}"),
            (DTYPE_OF.get(dcode) == dtype, f"dtype code {dcode}"),
            (nbytes == expected_payload, f"payload {nbytes} bytes, expected {expected_payload}"),
            (len(data) == HEADER_BYTES + 4 * n + nbytes, f"size {len(data)} != {HEADER_BYTES + 4 * n + nbytes}"),
        ]
        for ok, why in checks:
            if not ok:
                return why
        body = data[HEADER_BYTES:]
        if _checksum(body) != checksum:
            return "checksum mismatch"
        tokens = list(struct.unpack_from(f"<{n}I", data, HEADER_BYTES))
        if block_key(parent, tokens) != key:
            return "tokens do not hash to the key"
        return None

    def _discard(self, key: bytes, why: str) -> None:
        log.warning("kv disk: discarding %s: %s", self.path(key).name, why)
        with self._lock:
            self._used -= self.files.pop(key, 0)
            self.path(key).unlink(missing_ok=True)
            self.discarded += 1
        return None


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def _checksum(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=16).digest()


def model_fingerprint(path: str | os.PathLike, *extra: str) -> bytes:
    """16 bytes naming the exact weights (size and head/tail bytes of the file) plus KV settings."""
    h = hashlib.blake2b(digest_size=16)
    p = Path(path)
    for part in extra:
        h.update(part.encode() + b"\0")
    files = sorted(p.iterdir()) if p.is_dir() else [p]
    for f in files:
        if not f.is_file():
            continue
        size = f.stat().st_size
        h.update(f.name.encode() + struct.pack("<Q", size))
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                h.update(fh.read())
    return h.digest()
