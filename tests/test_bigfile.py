"""A large blob's file (``blobs.bigfile``): written in buffers as it arrives, around the
page cache where the file system allows, through it where not; a failed, cancelled or
disk-full upload leaves no file, no open descriptor and nothing stored."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import itertools
import os
import random
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ehrnode.blobs import bigfile
from ehrnode.blobs.store import BlobStore
from ehrnode.core.errors import LimitExceeded
from ehrnode.store.db import MemoryKV
from ehrnode.testing import wait_for


async def pieces(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def direct_io_works(where: Path) -> bool:
    try:
        fd = os.open(where / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    (where / "probe").unlink()
    return True


@pytest.fixture
def small_buffers(monkeypatch: pytest.MonkeyPatch) -> int:
    """Buffers of 64 KiB, so that a blob of a few hundred KiB fills many of them."""
    monkeypatch.setattr(bigfile, "BUFFER_BYTES", 64 * 1024)
    return 64 * 1024


def spy_writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(offset, length) of each write a BigFile makes, in order."""
    writes: list[tuple[int, int]] = []
    real = os.pwrite

    def spy(fd: int, data: Any, offset: int) -> int:
        writes.append((offset, len(data)))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", spy)
    return writes


async def test_a_large_blob_goes_to_disk_in_buffers_while_it_streams_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_buffers: int
) -> None:
    """The bytes reach the file a buffer at a time as they arrive (not all at the end),
    and the file holds exactly the blob: no padding of the last block left behind."""
    writes = spy_writes(monkeypatch)
    blobs = BlobStore(tmp_path / "blobs", MemoryKV())
    data = random.Random(1).randbytes(7 * small_buffers + 12345)  # not a multiple of 4096
    progress: list[tuple[int, int]] = []  # (bytes arrived, writes made) at each piece
    arrived = 0

    async def counted() -> AsyncIterator[bytes]:
        nonlocal arrived
        async for piece in pieces(data, 10_000):
            arrived += len(piece)
            progress.append((arrived, len(writes)))
            yield piece

    info = await blobs.put_stream(counted(), hashlib.sha256(data).digest())

    assert info.size == len(data) and not info.inline
    assert blobs.path(info.hash).read_bytes() == data
    assert any(made >= 2 for got, made in progress if got < len(data) // 2)
    assert writes[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(writes))
    assert all(n == small_buffers for _, n in writes[:-1])
    assert list(os.scandir(tmp_path / "blobs" / "tmp")) == []


async def test_a_large_blob_bypasses_the_page_cache_where_the_file_system_allows(
    tmp_path: Path, small_buffers: int
) -> None:
    if not direct_io_works(tmp_path):
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
    data = random.Random(3).randbytes(3 * small_buffers + 1)

    file = bigfile.BigFile(tmp_path / "f")
    try:
        assert file.direct
        assert os.O_DIRECT & fcntl.fcntl(file._fd, fcntl.F_GETFL)
        await file.write(data)
        assert await file.finish() == len(data)
    finally:
        await file.close()
    assert (tmp_path / "f").read_bytes() == data


async def test_where_direct_io_is_refused_the_blob_goes_through_the_cache_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_buffers: int
) -> None:
    """A file system that refuses O_DIRECT at open (tmpfs) or only at the first write:
    the same buffers are written through the page cache, with write-back after each."""
    real_open = os.open

    def refusing_open(path: Any, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT and "refuse-open" in str(path):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    real_pwrite = os.pwrite
    refused: list[int] = []

    def refusing_pwrite(fd: int, data: Any, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    advised: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "open", refusing_open)
    monkeypatch.setattr(os, "pwrite", refusing_pwrite)
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, at, n, advice: advised.append((at, n)))
    data = random.Random(4).randbytes(5 * small_buffers + 777)

    for name in ("refuse-open", "refuse-write"):
        advised.clear()
        root = tmp_path / name
        blobs = BlobStore(root, MemoryKV())
        info = await blobs.put_stream(pieces(data, 50_000), hashlib.sha256(data).digest())
        assert blobs.path(info.hash).read_bytes() == data, name
        assert [at for at, _ in advised] == [k * small_buffers for k in range(6)], name
    if direct_io_works(tmp_path):  # the open was allowed, the first write refused
        assert refused == [0]


async def test_a_failed_large_upload_leaves_no_file_and_no_open_descriptor(
    tmp_path: Path, small_buffers: int
) -> None:
    blobs = BlobStore(tmp_path / "blobs", MemoryKV(), max_blob_bytes=4 * small_buffers)
    data = random.Random(5).randbytes(6 * small_buffers)
    before = open_fds()

    async def broken() -> AsyncIterator[bytes]:
        async for piece in pieces(data[: 3 * small_buffers], 30_000):
            yield piece
        raise ConnectionResetError("the client went away")

    with pytest.raises(ConnectionResetError):
        await blobs.put_stream(broken())
    with pytest.raises(LimitExceeded):
        await blobs.put_stream(pieces(data, 30_000))

    assert open_fds() == before
    assert list(os.scandir(tmp_path / "blobs" / "tmp")) == []
    assert not blobs.has(hashlib.sha256(data).digest())


async def test_a_cancelled_upload_closes_its_file_only_once_the_disk_write_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_buffers: int
) -> None:
    """Cancelling the upload (a peer link stopping) does not stop a write already on a
    thread: closing the descriptor under it would let the number be reused by another
    file (LevelDB's log, a segment) and the blob's bytes land there."""
    events: list[tuple[str, int]] = []
    blocked, release = threading.Event(), threading.Event()
    real_pwrite, real_close = os.pwrite, os.close

    def slow_pwrite(fd: int, data: Any, offset: int) -> int:
        if offset == small_buffers:  # the second buffer's write waits for the test
            blocked.set()
            release.wait(10)
        done = real_pwrite(fd, data, offset)
        events.append(("written", fd))
        return done

    def spy_close(fd: int) -> None:
        events.append(("close", fd))
        real_close(fd)

    real_bigfile_close = bigfile.BigFile.close

    async def spy_bigfile_close(self: bigfile.BigFile) -> None:
        events.append(("closing", self._fd))
        await real_bigfile_close(self)

    monkeypatch.setattr(os, "pwrite", slow_pwrite)
    monkeypatch.setattr(os, "close", spy_close)
    monkeypatch.setattr(bigfile.BigFile, "close", spy_bigfile_close)
    blobs = BlobStore(tmp_path / "blobs", MemoryKV())
    data = random.Random(6).randbytes(6 * small_buffers)
    before = open_fds()

    events.clear()  # descriptors the store opened and closed for itself

    task = asyncio.create_task(blobs.put_stream(pieces(data, 16_384)))
    try:
        await wait_for(blocked.is_set, what="the second buffer's write to start")
        task.cancel()
        await wait_for(lambda: any(kind == "closing" for kind, _ in events), what="close")
        fd = next(fd for kind, fd in events if kind == "closing")
        assert ("close", fd) not in events  # the write is still on its thread
    finally:
        release.set()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert events.index(("close", fd)) > max(
        i for i, event in enumerate(events) if event == ("written", fd)
    )
    assert open_fds() == before
    assert list(os.scandir(tmp_path / "blobs" / "tmp")) == []


async def test_a_disk_error_fails_the_upload_and_stores_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_buffers: int
) -> None:
    real_pwrite = os.pwrite

    def full_disk(fd: int, data: Any, offset: int) -> int:
        if offset >= 2 * small_buffers:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_disk)
    blobs = BlobStore(tmp_path / "blobs", MemoryKV())
    data = random.Random(7).randbytes(5 * small_buffers)
    before = open_fds()

    with pytest.raises(OSError) as caught:
        await blobs.put_stream(pieces(data, 50_000))

    assert caught.value.errno == errno.ENOSPC
    assert not blobs.has(hashlib.sha256(data).digest())
    assert open_fds() == before
    assert list(os.scandir(tmp_path / "blobs" / "tmp")) == []
