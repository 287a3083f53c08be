"""Small blobs' bytes, appended to numbered segment files instead of LevelDB.

    <home>/blobs/segments/<8-digit number>.seg   blobs one after another, no framing

LevelDB's metadata entry of a blob names its segment and offset (``blobs.store``); the
segment holds nothing else about it. Kept in LevelDB, the bytes of every small ciphertext
were copied again by each compaction of the tables around them: for the import of the
sample bundles that was a fifth of each validator's CPU.

Appends go to the newest segment until it reaches ``SEGMENT_BYTES``, and are made
durable (``fdatasync``) before the caller writes the metadata, so a blob is "held" only
once its bytes are on disk; what a crash cuts off after the last durable append is bytes
no entry names, and later appends go after them. Erasing a blob overwrites its bytes with
zeros in place, durably, before its entry goes. Reads are ``pread`` on a descriptor kept
open per segment, safe from any thread. The caller serialises appends and erasures.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

SEGMENT_BYTES = 64 * 1024 * 1024
_SUFFIX = ".seg"


class Segments:
    def __init__(self, root: Path) -> None:
        self.dir = root / "segments"
        if not self.dir.is_dir():
            self.dir.mkdir(parents=True)
            fsync_dir(root)
        numbers = [int(p.stem) for p in self.dir.glob(f"*{_SUFFIX}") if p.stem.isdigit()]
        self._current = max(numbers, default=0)
        self._append_fd: int | None = None
        self._end = 0
        self._readers: dict[int, int] = {}
        self._opening = threading.Lock()

    def _path(self, number: int) -> Path:
        return self.dir / f"{number:08d}{_SUFFIX}"

    def _open_for_append(self) -> int:
        if self._append_fd is None:
            path = self._path(self._current)
            created = not path.exists()
            self._append_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._end = os.fstat(self._append_fd).st_size
            if created:
                fsync_dir(self.dir)
        return self._append_fd

    def _roll_over(self) -> None:
        fd = self._open_for_append()
        os.fdatasync(fd)
        os.close(fd)
        self._append_fd = None
        self._current += 1

    def append(self, blobs: list[bytes]) -> list[tuple[int, int]]:
        """Write ``blobs`` durably; where each one is, as (segment, offset)."""
        places = []
        fd = self._open_for_append()
        for data in blobs:
            if self._end >= SEGMENT_BYTES:
                self._roll_over()
                fd = self._open_for_append()
            places.append((self._current, self._end))
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            self._end += len(data)
        os.fdatasync(fd)
        return places

    def read(self, number: int, offset: int, size: int) -> bytes:
        fd = self._readers.get(number)
        if fd is None:
            with self._opening:
                fd = self._readers.get(number)
                if fd is None:
                    fd = self._readers[number] = os.open(self._path(number), os.O_RDONLY)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"segment {number} ends before the blob at {offset} ({size} bytes)")
        return data

    def shred(self, number: int, offset: int, size: int) -> None:
        """Overwrite a blob's bytes with zeros, durably."""
        fd = os.open(self._path(number), os.O_WRONLY)
        try:
            os.pwrite(fd, bytes(size), offset)
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        for fd in [self._append_fd, *self._readers.values()]:
            if fd is not None:
                os.close(fd)
        self._append_fd = None
        self._readers.clear()


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (files created or renamed in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
