"""The blob store's streamed path: a large blob reaches the disk as it arrives."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ehrnode.blobs import store
from ehrnode.blobs.store import BlobStore
from ehrnode.store.db import MemoryKV


async def pieces(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def test_a_large_blob_is_written_back_while_it_streams_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without write-back the whole blob waits in the page cache for the final fsync, and
    every replica of a relayed upload flushes at the same moment."""
    monkeypatch.setattr(store, "WRITE_BACK_BYTES", 1 << 20)
    ranges: list[tuple[int, int]] = []
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        ranges.append((offset, length))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    blobs = BlobStore(tmp_path / "blobs", MemoryKV())
    data = random.Random(1).randbytes(5 * (1 << 20) + 12345)
    info = await blobs.put_stream(pieces(data, 256 * 1024), hashlib.sha256(data).digest())

    assert info.size == len(data) and not info.inline
    assert blobs.path(info.hash).read_bytes() == data
    # Asked in order, each range starting where the last ended, well before the end.
    assert len(ranges) >= 4
    assert ranges[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(ranges))
    assert ranges[-1][0] + ranges[-1][1] <= len(data)
