"""Content-addressed ciphertext: the node stores bytes it cannot read, named by their SHA-256.

Where the bytes live (documented beside the tables of the node's LevelDB):

    b"O" + hash(32)   {"size", "inline": bool, "stored": ms, "seg"?, "at"?}   one entry per
                      blob held; "inline": a small blob (at most ``INLINE_MAX``), whose
                      bytes are at offset "at" of segment "seg" (``blobs.segments``), or in
                      b"P" when the entry has no "seg" (as earlier builds stored them)
    b"P" + hash(32)   the bytes of a small blob stored by an earlier build
    b"X" + hash(32)   b"": a tombstone; this blob was erased and is never stored again
    b"G" + BE4(n)     BE8: how far segment n is committed (written with the entries)
    <home>/blobs/segments/<8 digits>.seg   small blobs' bytes, appended
    <home>/blobs/<first 2 hex>/<64 hex>   the bytes of a larger blob, one file each

Small blobs (a FHIR resource's ciphertext is a few KB) are appended to a segment file,
many at a time, made durable, and then their entries go to LevelDB in one synced batch.
Large ones (imaging, PDFs, up to ``max_blob_bytes``) are streamed to a temporary file while
being hashed (around the page cache where the file system allows: ``blobs.bigfile``),
fsynced, then renamed into place and the directory fsynced: memory stays flat whatever the
size and a crash leaves either the whole blob or none of it. The
metadata entry is written last, so a blob is "held" only once its bytes are durable.

Deleting a blob (erasure) overwrites a small blob's bytes with zeros in its segment (or
compacts the b"P" key range of an earlier build's, so LevelDB drops the bytes from its files
too) or removes a large blob's file, then removes the entries.

"Do we hold it?" and "was it erased?" are asked several times for every blob a node
stores (on upload, push, announcement, admission, quorum wait and commit), so the answers
are kept in memory where that is exact: the metadata of the blobs stored most recently,
and the sizes of a longer run of them (each added when the blob's entry is written, dropped
when the blob is deleted, both under the store's lock), and the set of tombstones (all of
them, read at start, while there are at most ``MAX_TOMBSTONES_IN_MEMORY``; beyond that
LevelDB answers). The sizes answer "held?" and admission's size check: a record commits
long after its ciphertext was stored when clients upload ahead or commits fall behind
(the benchmark uploads 70,000 blobs before its first transaction), and a LevelDB look-up
for each of those cost a validator about 5% of its CPU (docs/benchmarks.md, note 50).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

from ehrnode.blobs.bigfile import BigFile
from ehrnode.blobs.segments import Segments, fsync_dir, recorded_ends
from ehrnode.core import codec
from ehrnode.core.errors import Conflict, InvalidEncoding, LimitExceeded, NotFound
from ehrnode.store.db import KV

log = logging.getLogger(__name__)

T_META = b"O"
T_INLINE = b"P"
T_TOMBSTONE = b"X"
T_SEGMENT_END = b"G"
INLINE_MAX = 64 * 1024
DEFAULT_MAX_BLOB_BYTES = 8 * 1024**3
HELD_IN_MEMORY = 32_768  # metadata of the most recently stored blobs (about 11 MB)
SIZES_IN_MEMORY = 131_072  # sizes of the most recently stored blobs (about 19 MB)
MAX_TOMBSTONES_IN_MEMORY = 100_000


@dataclass(frozen=True, slots=True)
class BlobInfo:
    hash: bytes
    size: int
    inline: bool
    stored: int
    segment: int | None = None  # where a small blob's bytes are: segment and offset
    offset: int = 0


class BlobStore:
    def __init__(self, root: Path, kv: KV, *, max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES) -> None:
        self.root = root
        self.kv = kv
        self.max_blob_bytes = max_blob_bytes
        # Storing and erasing one blob exclude each other (uploads finish on worker threads).
        self._lock = threading.Lock()
        self._tmp = root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        for stale in self._tmp.iterdir():  # half-written uploads from before a crash
            stale.unlink(missing_ok=True)
        self._segments = Segments(root, recorded_ends(kv.scan(T_SEGMENT_END), T_SEGMENT_END))
        self._held: OrderedDict[bytes, BlobInfo] = OrderedDict()
        # A dict and the order its keys came in: two thirds of an OrderedDict's memory.
        self._sizes: dict[bytes, int] = {}
        self._sizes_order: deque[bytes] = deque()
        self._tombstones = self._read_tombstones()

    def _read_tombstones(self) -> set[bytes] | None:
        """Every tombstone, or None when there are too many to keep in memory."""
        found = {
            key[len(T_TOMBSTONE) :]
            for key, _ in self.kv.scan(T_TOMBSTONE, limit=MAX_TOMBSTONES_IN_MEMORY + 1)
        }
        return found if len(found) <= MAX_TOMBSTONES_IN_MEMORY else None

    def _remember(self, infos: Iterable[BlobInfo]) -> None:
        """Metadata just written (the caller holds the lock)."""
        held, sizes, order = self._held, self._sizes, self._sizes_order
        for info in infos:
            held[info.hash] = info
            if info.hash not in sizes:
                order.append(info.hash)
            sizes[info.hash] = info.size
        while len(held) > HELD_IN_MEMORY:
            held.popitem(last=False)  # O(1); a dict's first key is found by skipping holes
        while len(order) > SIZES_IN_MEMORY:
            sizes.pop(order.popleft(), None)  # None: deleted since

    def path(self, blob_hash: bytes) -> Path:
        """Where a large blob's file lives (small blobs live in segments)."""
        return self._path(blob_hash)

    def _path(self, blob_hash: bytes) -> Path:
        text = blob_hash.hex()
        return self.root / text[:2] / text

    def info(self, blob_hash: bytes) -> BlobInfo | None:
        known = self._held.get(blob_hash)
        if known is not None:
            return known
        raw = self.kv.get(T_META + blob_hash)
        if raw is None:
            return None
        meta = codec.decode(raw)
        return BlobInfo(
            blob_hash,
            meta["size"],
            meta["inline"],
            meta["stored"],
            meta.get("seg"),
            meta.get("at", 0),
        )

    def has(self, blob_hash: bytes) -> bool:
        return blob_hash in self._sizes or self.kv.get(T_META + blob_hash) is not None

    def size_of(self, blob_hash: bytes) -> int | None:
        """The size of a blob held here; None when it is not."""
        size = self._sizes.get(blob_hash)
        if size is not None:
            return size
        info = self.info(blob_hash)
        return None if info is None else info.size

    def erased(self, blob_hash: bytes) -> bool:
        tombstones = self._tombstones
        if tombstones is not None:
            return blob_hash in tombstones
        return self.kv.get(T_TOMBSTONE + blob_hash) is not None

    def _refuse_erased(self, blob_hash: bytes) -> None:
        if self.erased(blob_hash):
            raise Conflict(
                "this ciphertext belonged to an erased record and cannot be stored again",
                code="blob_erased",
            )

    # --- writing --------------------------------------------------------------------------

    def put_many(self, blobs: Iterable[bytes]) -> list[bytes]:
        """Store small blobs, durably, with their entries in one synced batch; return their
        hashes. A blob of an erased record is refused (``Conflict``)."""
        hashes = []
        new: dict[bytes, bytes] = {}
        for data in blobs:
            _check_small(data)
            blob_hash = hashlib.sha256(data).digest()
            self._refuse_erased(blob_hash)
            hashes.append(blob_hash)
            new.setdefault(blob_hash, data)
        self._store(new)
        return hashes

    def put_pushed(self, blobs: list[bytes], hashes: list[bytes]) -> list[bytes]:
        """Store small blobs a peer pushed, whose SHA-256 this node computed on arrival
        (``hashes``); those held or erased already are left out. Return the hashes of the
        blobs stored now."""
        new: dict[bytes, bytes] = {}
        for data, blob_hash in zip(blobs, hashes, strict=True):
            _check_small(data)
            new.setdefault(blob_hash, data)
        return self._store(new)

    def _store(self, new: dict[bytes, bytes]) -> list[bytes]:
        """Write ``new`` (hash: bytes) but for the blobs held or erased already, checked
        under the lock (another writer may have stored one a moment ago: a client's upload
        and a peer's push); return the hashes written."""
        if not new:
            return []
        with self._lock:
            for blob_hash in [h for h in new if self.has(h) or self.erased(h)]:
                del new[blob_hash]
            if not new:
                return []
            with self._segments.appending(list(new.values()), T_SEGMENT_END) as (places, ends):
                now = int(time.time() * 1000)
                infos = [
                    BlobInfo(h, len(data), True, now, segment, offset)
                    for (h, data), (segment, offset) in zip(new.items(), places, strict=True)
                ]
                batch: dict[bytes, bytes | None] = {T_META + i.hash: _meta(i) for i in infos}
                batch.update(ends)
                self.kv.write(batch, sync=True)
            self._remember(infos)
        return list(new)

    async def put_stream(
        self,
        chunks: AsyncIterator[bytes],
        expected: bytes | None = None,
        declared_size: int | None = None,
    ) -> BlobInfo:
        """Stream a blob in; its hash must equal ``expected`` when given."""
        if declared_size is not None and declared_size > self.max_blob_bytes:
            raise LimitExceeded(
                f"blob of {declared_size} bytes exceeds this node's limit of {self.max_blob_bytes}"
            )
        if expected is not None:
            self._refuse_erased(expected)
            found = self.info(expected)
            if found is not None:
                async for _ in chunks:  # drain the body so the connection stays usable
                    pass
                return found
        digest = hashlib.sha256()
        size = 0
        head = bytearray()
        tmp_path = self._tmp / secrets.token_hex(16)
        file = None
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > self.max_blob_bytes:
                    raise LimitExceeded(
                        f"blob exceeds this node's limit of {self.max_blob_bytes} bytes"
                    )
                digest.update(chunk)
                if file is None and len(head) + len(chunk) <= INLINE_MAX:
                    head.extend(chunk)
                    continue
                if file is None:
                    file = BigFile(tmp_path)
                    await file.write(head)
                    head.clear()
                await file.write(chunk)
            blob_hash = digest.digest()
            if expected is not None and blob_hash != expected:
                raise Conflict(
                    "uploaded bytes do not hash to the blob id in the URL", code="hash_mismatch"
                )
            self._refuse_erased(blob_hash)
            if file is None:
                self.put_many([bytes(head)])
            else:
                await file.finish()
                await self.kv.run(self._place_file, tmp_path, blob_hash, size)
        finally:
            if file is not None:
                await file.close()
            tmp_path.unlink(missing_ok=True)
        info = self.info(blob_hash)
        if info is None:  # erased while it arrived
            self._refuse_erased(blob_hash)
            raise NotFound("the blob was removed while it was being stored")
        return info

    def _place_file(self, tmp_path: Path, blob_hash: bytes, size: int) -> None:
        """Move a finished (durable) file into place and write its entry, unless the blob
        was erased meanwhile."""
        final = self._path(blob_hash)
        final.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:  # an erasure between our check and this write must win
            if self.erased(blob_hash):
                tmp_path.unlink(missing_ok=True)
                return
            os.replace(tmp_path, final)
            fsync_dir(final.parent)
            meta = {"size": size, "inline": False, "stored": int(time.time() * 1000)}
            self.kv.write({T_META + blob_hash: codec.encode(meta)}, sync=True)
            self._remember([BlobInfo(blob_hash, size, False, meta["stored"])])

    # --- reading --------------------------------------------------------------------------

    def read_small(self, blob_hash: bytes) -> bytes:
        info = self.info(blob_hash)
        if info is None:
            raise NotFound("this node does not hold that blob")
        if info.segment is not None:
            return self._read_segment(info)
        if info.inline:
            data = self.kv.get(T_INLINE + blob_hash)
            if data is None:
                raise NotFound("this node does not hold that blob")
            return data
        return self._path(blob_hash).read_bytes()

    def _read_segment(self, info: BlobInfo) -> bytes:
        """A small blob's bytes, checked against its hash (a damaged or missing segment
        is a blob this node cannot serve, not a crash)."""
        assert info.segment is not None
        try:
            data = self._segments.read(info.segment, info.offset, info.size)
        except OSError as err:
            log.error("blob %s cannot be read: %s", info.hash.hex()[:16], err)
            raise _unreadable() from err
        if hashlib.sha256(data).digest() != info.hash:
            log.error("blob %s: its bytes in the segment are damaged", info.hash.hex()[:16])
            raise _unreadable()
        return data

    # --- erasure --------------------------------------------------------------------------

    def delete(self, blob_hash: bytes, *, tombstone: bool = True) -> bool:
        """Remove a blob's bytes (and, for an erasure, refuse it from now on)."""
        batch: dict[bytes, bytes | None] = {T_META + blob_hash: None, T_INLINE + blob_hash: None}
        if tombstone:
            batch[T_TOMBSTONE + blob_hash] = b""
        with self._lock:
            info = self.info(blob_hash)
            if info is not None and info.segment is not None:
                self._segments.shred(info.segment, info.offset, info.size)
            self.kv.write(batch, sync=True)
            self._held.pop(blob_hash, None)
            self._sizes.pop(blob_hash, None)
            if tombstone and self._tombstones is not None:
                self._tombstones.add(blob_hash)
                if len(self._tombstones) > MAX_TOMBSTONES_IN_MEMORY:
                    self._tombstones = None
            if info is not None and not info.inline:
                self._path(blob_hash).unlink(missing_ok=True)
        if info is None:
            return False
        compact = getattr(self.kv, "compact", None)
        if compact is not None and info.inline and info.segment is None:
            compact(T_INLINE + blob_hash, T_INLINE + blob_hash + b"\xff")
        return True

    def close(self) -> None:
        self._segments.close()


def _check_small(data: bytes) -> None:
    if len(data) > INLINE_MAX:
        raise LimitExceeded(
            f"a blob of {len(data)} bytes is too large for a batch upload "
            f"(limit {INLINE_MAX}); upload it on its own"
        )


def _unreadable() -> NotFound:
    return NotFound("this node's copy of that blob cannot be read", code="blob_missing")


def _meta(info: BlobInfo) -> bytes:
    meta: dict[str, int | bool] = {"size": info.size, "inline": info.inline, "stored": info.stored}
    if info.segment is not None:
        meta.update(seg=info.segment, at=info.offset)
    return codec.encode_trusted(meta)  # ints and bools this node made: no walk over types


def parse_hash(text: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError as err:
        raise InvalidEncoding("a blob id is 64 hex characters") from err
    if len(raw) != 32:
        raise InvalidEncoding("a blob id is 64 hex characters")
    return raw
