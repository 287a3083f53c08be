"""Small blobs' bytes, appended to numbered segment files instead of LevelDB.

    <home>/blobs/segments/<8-digit number>.seg   blobs one after another, no framing

LevelDB's metadata entry of a blob names its segment and offset (``blobs.store``), and
the same batch records how far each segment it wrote to is committed (``ends``); the
segment holds nothing else. Kept in LevelDB, the bytes of every small ciphertext were
copied again by each compaction of the tables around them: for the import of the sample
bundles that was a fifth of each validator's CPU.

Appends go to the newest segment, at its committed end, until it reaches
``SEGMENT_BYTES``, and are made durable (``fdatasync``) before the caller writes the
entries, so a blob is "held" only once its bytes are on disk. Bytes past the committed
end (an append whose entries a crash or an error kept from being written) are cut off:
at once when the append or the entries' batch fails, again before the segment is next
appended to (should that cut have failed too), and at start after a crash. So no copy
of a ciphertext is ever left where no entry names it, out of reach of an erasure. Erasing a blob
overwrites its bytes with zeros in place, durably, before its entry goes. The caller
serialises appends and erasures; reads may come from any thread.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

SEGMENT_BYTES = 64 * 1024 * 1024
OPEN_READERS = 32  # descriptors kept open for reading, the most recently used segments
_SUFFIX = ".seg"


def _iov_max() -> int:
    """Buffers one ``pwritev`` may take: the system's limit (-1 is "none"), at most 1024."""
    try:
        limit = os.sysconf("SC_IOV_MAX")
    except (ValueError, OSError, AttributeError):
        return 16  # POSIX's minimum
    return 1024 if limit < 1 else min(limit, 1024)


_IOV_MAX = _iov_max()


class Segments:
    def __init__(self, root: Path, ends: Mapping[int, int]) -> None:
        """``ends``: each segment's committed end, as recorded with the entries."""
        self.dir = root / "segments"
        self.dir.mkdir(parents=True, exist_ok=True)
        fsync_dir(root)  # cheap, and a crash may have cut in after an earlier mkdir
        numbers = [int(p.stem) for p in self.dir.glob(f"*{_SUFFIX}") if p.stem.isdigit()]
        self._committed = dict(ends)
        # Only the last committed segment and any begun after it can hold bytes no entry
        # names (an append that rolled over writes to both); with none committed, all.
        floor = max(ends, default=0)
        for number in numbers:
            if number >= floor:
                self._cut(number, ends.get(number, 0))
        self._current = max([floor, *numbers])
        self._append_fd: int | None = None
        self._end = 0
        self._dirty: set[int] = set()  # segments written to since the last commit
        self._readers: OrderedDict[int, int] = OrderedDict()
        self._reading = threading.Lock()

    def _path(self, number: int) -> Path:
        return self.dir / f"{number:08d}{_SUFFIX}"

    def _cut(self, number: int, end: int) -> None:
        """Drop what lies past ``end`` in a segment (what no committed entry names)."""
        path = self._path(number)
        if path.exists() and path.stat().st_size > end:
            log.warning("segment %d: cutting uncommitted bytes after offset %d", number, end)
            os.truncate(path, end)
            fd = os.open(path, os.O_WRONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _open_for_append(self) -> int:
        """The current segment, opened at its committed end: anything after it (an append
        whose entries were never written) is cut first."""
        if self._append_fd is None:
            self._cut(self._current, self._committed.get(self._current, 0))
            self._append_fd = os.open(self._path(self._current), os.O_WRONLY | os.O_CREAT, 0o600)
            self._end = os.fstat(self._append_fd).st_size
            if self._end == 0:
                fsync_dir(self.dir)  # a new file (or one a failure left empty)
        return self._append_fd

    def _close_append(self) -> None:
        if self._append_fd is not None:
            fd, self._append_fd = self._append_fd, None
            os.close(fd)

    def append(self, blobs: list[bytes]) -> tuple[list[tuple[int, int]], dict[int, int]]:
        """Write ``blobs`` durably: where each one is, as (segment, offset), and the end of
        each segment written to, which the caller records with the entries and then passes
        to ``committed`` (or, if that fails, calls ``abandon``). On an error here nothing
        stays written.

        The blobs bound for one segment go down in as few ``pwritev`` calls as the kernel
        allows (a call per blob was a fifth of a batch's CPU)."""
        places: list[tuple[int, int]] = []
        ends: dict[int, int] = {}
        try:
            fd = self._open_for_append()
            run: list[bytes] = []  # the blobs not yet written to the current segment
            for data in blobs:
                if self._end >= SEGMENT_BYTES:
                    self._write_run(fd, run)
                    run = []
                    os.fdatasync(fd)
                    self._close_append()
                    self._current += 1
                    fd = self._open_for_append()
                self._dirty.add(self._current)
                places.append((self._current, self._end))
                run.append(data)
                self._end += len(data)
                ends[self._current] = self._end
            self._write_run(fd, run)
            os.fdatasync(fd)
        except OSError:
            self.abandon()
            raise
        return places, ends

    @contextmanager
    def appending(
        self, items: list[bytes], end_prefix: bytes
    ) -> Iterator[tuple[list[tuple[int, int]], dict[bytes, bytes]]]:
        """``append``, then give the places and the entries that record each segment's
        new end (``end_prefix`` + BE4 number: BE8 end) for the caller to write, inside the
        ``with``, with its entries naming the places. If that raises, the appended bytes
        are cut off again (``abandon``); otherwise they stay (``committed``)."""
        places, ends = self.append(items)
        entries = {end_prefix + n.to_bytes(4, "big"): e.to_bytes(8, "big") for n, e in ends.items()}
        try:
            yield places, entries
        except BaseException:
            self.abandon()  # no entry names those bytes: they go
            raise
        self.committed(ends)

    def _write_run(self, fd: int, run: list[bytes]) -> None:
        """Write ``run`` so that it ends at ``self._end`` (which already counts it)."""
        at = self._end - sum(len(data) for data in run)
        views = [memoryview(data) for data in run if data]
        first = 0
        while first < len(views):
            written = os.pwritev(fd, views[first : first + _IOV_MAX], at)
            if written <= 0:
                raise OSError(errno.EIO, "a segment write made no progress")
            at += written
            while first < len(views) and written >= len(views[first]):
                written -= len(views[first])
                first += 1
            if written:  # a short write ended inside this blob: its rest goes next
                views[first] = views[first][written:]

    def committed(self, ends: Mapping[int, int]) -> None:
        """The entries naming the last append are written: its bytes stay."""
        self._committed.update(ends)
        self._dirty.clear()

    def abandon(self) -> None:
        """The last append will not be named (it failed, or its entries could not be
        written): cut what it wrote, back to each segment's committed end. A cut that
        fails now is made when that segment is next opened for appending, or at start."""
        self._close_append()
        for number in sorted(self._dirty):
            try:
                self._cut(number, self._committed.get(number, 0))
            except OSError as err:
                log.error("segment %d: could not cut an abandoned append: %s", number, err)
        if self._dirty:
            self._current = min(self._dirty)
        self._dirty.clear()

    def read(self, number: int, offset: int, size: int) -> bytes:
        """The bytes at ``offset``; OSError when the segment is missing or too short."""
        with self._reading:
            fd = self._readers.get(number)
            if fd is None:
                fd = os.open(self._path(number), os.O_RDONLY)
                self._readers[number] = fd
                while len(self._readers) > OPEN_READERS:
                    os.close(self._readers.popitem(last=False)[1])
            self._readers.move_to_end(number)
            data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"segment {number} ends before the blob at {offset} ({size} bytes)")
        return data

    def shred(self, number: int, offset: int, size: int) -> None:
        """Overwrite a blob's bytes with zeros, durably (never past the segment's end)."""
        try:
            fd = os.open(self._path(number), os.O_WRONLY)
        except FileNotFoundError:
            log.error("segment %d is missing: blob at %d has no bytes to erase", number, offset)
            return
        try:
            length = max(0, min(size, os.fstat(fd).st_size - offset))
            if length:
                os.pwrite(fd, bytes(length), offset)
                os.fdatasync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._close_append()
        with self._reading:
            for fd in self._readers.values():
                os.close(fd)
            self._readers.clear()


def recorded_ends(entries: Iterable[tuple[bytes, bytes]], end_prefix: bytes) -> dict[int, int]:
    """Each segment's committed end, from the entries ``appending`` gave (a prefix scan)."""
    cut = len(end_prefix)
    return {
        int.from_bytes(key[cut:], "big"): int.from_bytes(value, "big") for key, value in entries
    }


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (files created or renamed in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
