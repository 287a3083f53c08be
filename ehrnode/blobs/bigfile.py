"""Writing a large blob's file: around the page cache, while the next bytes arrive.

A large blob used to go through ``write`` into the page cache: the kernel copied every
byte into freshly allocated page-cache pages, and with four nodes of one machine each
writing its replica of a 1 GiB upload at once, that copy was half of every node's CPU
(1.4-3.2 s of system time per GiB per writer, against 0.1 s with direct I/O, measured
with four concurrent writers). Nobody reads a blob back right after it arrives, so the
cache gains nothing.

``BigFile`` opens the file with ``O_DIRECT`` and collects the arriving bytes in two
page-aligned buffers of ``BUFFER_BYTES`` (the second made when the first is full): while
one is written to disk on a worker thread (asyncio's default executor, not the database's
threads, which consensus commits wait for), the event loop fills the other. The last,
partial block is written padded with zeros and the file truncated to its size; ``finish``
then fsyncs it (direct I/O bypasses the cache, not the disk's own write cache, and the
size is metadata).

Where the file system refuses direct I/O (tmpfs, some network file systems), the same
buffers go through the page cache, with write-back started after each one
(``POSIX_FADV_DONTNEED``), so that the final fsync does not find the whole blob dirty.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import mmap
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

BUFFER_BYTES = 4 * 1024 * 1024
ALIGN = 4096  # the alignment direct I/O needs, of memory, offsets and lengths (<= a page)
_DIRECT = getattr(os, "O_DIRECT", 0)
_REFUSED = (errno.EINVAL, errno.EOPNOTSUPP)  # how a file system says "no direct I/O"


class BigFile:
    """A new file of ``path``. ``write`` and ``finish`` are awaited one at a time, from one
    task; ``close`` (always, in a ``finally``) releases what is left, once no thread uses
    the file any more, even when that task is cancelled."""

    def __init__(self, path: Path) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        self.direct = bool(_DIRECT)  # until the file system refuses it
        fd = -1
        if self.direct:
            try:
                fd = os.open(path, flags | _DIRECT, 0o644)
            except OSError as err:
                if err.errno not in _REFUSED:
                    raise
                self.direct = False
        if fd < 0:
            fd = os.open(path, flags, 0o644)
        try:
            self._buffers = [mmap.mmap(-1, BUFFER_BYTES)]
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._fill = 0  # bytes in the buffer being filled (self._buffers[0])
        self._written = 0  # bytes handed to the disk so far
        # What a worker thread is doing with the file (a buffer's write, the final fsync),
        # until it has finished: a cancelled await of it leaves it here for ``close``.
        self._pending: asyncio.Future[None] | None = None

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            buffer = self._buffers[0]
            n = min(len(view), BUFFER_BYTES - self._fill)
            buffer[self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill == BUFFER_BYTES:
                await self._hand_over(BUFFER_BYTES)

    async def _hand_over(self, length: int) -> None:
        """Start writing the full buffer; fill the other once its own write is done."""
        await self._settled()
        if len(self._buffers) == 1:
            self._buffers.append(mmap.mmap(-1, BUFFER_BYTES))
        full = self._buffers[0]
        self._buffers.reverse()
        offset, self._written, self._fill = self._written, self._written + length, 0
        self._start(self._write_at, full, length, offset)

    def _start(self, fn: Callable[..., None], *args: Any) -> None:
        self._pending = asyncio.ensure_future(asyncio.to_thread(fn, *args))

    async def _settled(self) -> None:
        """Wait for the thread's work on the file (raising its error). ``shield``: a
        cancelled caller does not cancel the record of a thread that keeps running."""
        if self._pending is not None:
            await asyncio.shield(self._pending)
            self._pending = None

    def _write_at(self, buffer: mmap.mmap, length: int, offset: int) -> None:
        """On a worker thread: ``length`` bytes of ``buffer`` at ``offset`` of the file."""
        view = memoryview(buffer)[:length]
        try:
            while view:
                try:
                    done = os.pwrite(self._fd, view, offset)
                except OSError as err:
                    if err.errno not in _REFUSED or not self.direct:
                        raise
                    self._stop_direct()  # the file system took the open, not the I/O
                    continue
                if done <= 0:
                    raise OSError(errno.EIO, "the disk took no bytes")
                view, offset = view[done:], offset + done
        finally:
            view.release()
        if not self.direct:
            with contextlib.suppress(OSError, AttributeError):
                os.posix_fadvise(self._fd, offset - length, length, os.POSIX_FADV_DONTNEED)

    def _stop_direct(self) -> None:
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~_DIRECT)
        self.direct = False

    async def finish(self) -> int:
        """Write what is buffered, make the file durable at its exact size; its size."""
        size = self._written + self._fill
        tail = self._fill
        if tail:
            padded = -(-tail // ALIGN) * ALIGN if self.direct else tail
            self._buffers[0][tail:padded] = bytes(padded - tail)
            await self._hand_over(padded)
        await self._settled()
        self._start(self._settle, size)
        await self._settled()
        return size

    def _settle(self, size: int) -> None:
        if self._written != size:
            os.ftruncate(self._fd, size)  # the zeros that padded the last block
        os.fsync(self._fd)

    async def close(self) -> None:
        """Close the file and free the buffers once no thread uses them; the caller
        deletes the file when the blob was not finished. A failed write's error was the
        caller's to see in ``write`` or ``finish``."""
        pending, self._pending = self._pending, None
        if pending is None or pending.done():
            self._release(pending)
            return
        pending.add_done_callback(self._release)
        await asyncio.wait([pending])

    def _release(self, pending: asyncio.Future[None] | None = None) -> None:
        if pending is not None and not pending.cancelled():
            pending.exception()  # seen, so asyncio does not log it as never retrieved
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        for buffer in self._buffers:
            with contextlib.suppress(BufferError):
                buffer.close()
