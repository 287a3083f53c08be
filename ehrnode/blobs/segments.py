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
at once when the append fails, at start after a crash. So no copy of a ciphertext is
ever left where no entry names it, out of reach of an erasure. Erasing a blob
overwrites its bytes with zeros in place, durably, before its entry goes. The caller
serialises appends and erasures; reads may come from any thread.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

SEGMENT_BYTES = 64 * 1024 * 1024
OPEN_READERS = 32  # descriptors kept open for reading, the most recently used segments
_SUFFIX = ".seg"


class Segments:
    def __init__(self, root: Path, ends: Mapping[int, int]) -> None:
        """``ends``: each segment's committed end, as recorded with the entries."""
        self.dir = root / "segments"
        if not self.dir.is_dir():
            self.dir.mkdir(parents=True)
            fsync_dir(root)
        numbers = [int(p.stem) for p in self.dir.glob(f"*{_SUFFIX}") if p.stem.isdigit()]
        self._current = max(numbers, default=0)
        if ends:
            # Only the last committed segment and any begun after it can hold bytes no
            # entry names (an append that rolled over writes to both).
            for number in numbers:
                if number >= max(ends):
                    self._cut(number, ends.get(number, 0))
        self._append_fd: int | None = None
        self._end = 0
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
        if self._append_fd is None:
            path = self._path(self._current)
            created = not path.exists()
            self._append_fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            self._end = os.fstat(self._append_fd).st_size
            if created:
                fsync_dir(self.dir)
        return self._append_fd

    def _close_append(self) -> None:
        if self._append_fd is not None:
            os.close(self._append_fd)
            self._append_fd = None

    def append(self, blobs: list[bytes]) -> tuple[list[tuple[int, int]], dict[int, int]]:
        """Write ``blobs`` durably: where each one is, as (segment, offset), and the end of
        each segment written to, for the caller to record with the entries. On any error
        nothing stays written."""
        places: list[tuple[int, int]] = []
        ends: dict[int, int] = {}
        start: tuple[int, int | None] = (self._current, None)
        try:
            fd = self._open_for_append()
            start = (self._current, self._end)
            for data in blobs:
                if self._end >= SEGMENT_BYTES:
                    os.fdatasync(fd)
                    self._close_append()
                    self._current += 1
                    fd = self._open_for_append()
                places.append((self._current, self._end))
                view = memoryview(data)
                while view:
                    written = os.pwrite(fd, view, self._end)
                    view = view[written:]
                    self._end += written
                ends[self._current] = self._end
            os.fdatasync(fd)
        except OSError:
            self._undo(start)
            raise
        return places, ends

    def _undo(self, start: tuple[int, int | None]) -> None:
        """After a failed append: back to where it began; the next append reopens."""
        self._close_append()
        number, end = start
        begun = list(range(number + 1, self._current + 1))
        for later in begun:
            self._path(later).unlink(missing_ok=True)
        self._current = number
        if end is not None:
            try:
                self._cut(number, end)
            except OSError as err:  # the disk is failing; the next start cuts it
                log.error("segment %d: could not cut a failed append: %s", number, err)
        if begun:
            log.warning("removed segments %s begun by a failed append", begun)

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


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (files created or renamed in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
