"""The blob store (a large blob's file: tests/test_bigfile.py); what it holds and what was
erased is answered right whether the answer is kept in memory or read from LevelDB."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from ehrnode.blobs import segments, store
from ehrnode.blobs.segments import Segments
from ehrnode.blobs.store import BlobStore
from ehrnode.core import codec, crypto
from ehrnode.core.errors import Conflict, NotFound
from ehrnode.store.db import MemoryKV


def small_blobs(count: int, seed: int = 2) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(100 + i) for i in range(count)]


def test_an_erased_blob_stays_refused_after_a_restart(tmp_path: Path) -> None:
    kv = MemoryKV()
    blobs = BlobStore(tmp_path / "blobs", kv)
    kept, erased = small_blobs(2)
    kept_hash, erased_hash = blobs.put_many([kept, erased])
    assert blobs.has(erased_hash) and blobs.info(erased_hash) is not None

    assert blobs.delete(erased_hash)
    assert not blobs.has(erased_hash) and blobs.info(erased_hash) is None
    assert blobs.erased(erased_hash) and not blobs.erased(kept_hash)
    with pytest.raises(Conflict) as caught:
        blobs.put_many([erased])
    assert caught.value.code == "blob_erased"

    again = BlobStore(tmp_path / "blobs", kv)
    assert again.erased(erased_hash) and not again.erased(kept_hash)
    assert again.has(kept_hash) and not again.has(erased_hash)
    with pytest.raises(Conflict):
        again.put_many([erased])


def store_with_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: str
) -> tuple[MemoryKV, BlobStore]:
    """A store whose in-memory ``limit`` is 2, to see what happens beyond it."""
    monkeypatch.setattr(store, limit, 2)
    kv = MemoryKV()
    return kv, BlobStore(tmp_path / "blobs", kv)


def test_more_tombstones_than_memory_holds_are_still_all_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kv, blobs = store_with_limit(tmp_path, monkeypatch, "MAX_TOMBSTONES_IN_MEMORY")
    data = small_blobs(5)
    hashes = blobs.put_many(data)
    for blob_hash in hashes[:4]:
        blobs.delete(blob_hash)
    for store_ in (blobs, BlobStore(tmp_path / "blobs", kv)):
        assert [store_.erased(h) for h in hashes] == [True, True, True, True, False]
        assert store_.has(hashes[4])
        with pytest.raises(Conflict):
            store_.put_many([data[0]])


def test_every_stored_blob_is_known_beyond_the_most_recent_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kv, blobs = store_with_limit(tmp_path, monkeypatch, "HELD_IN_MEMORY")
    data = small_blobs(5)
    hashes = blobs.put_many(data[:3]) + blobs.put_many(data[3:])
    for store_ in (blobs, BlobStore(tmp_path / "blobs", kv)):
        for blob, blob_hash in zip(data, hashes, strict=True):
            info = store_.info(blob_hash)
            assert store_.has(blob_hash) and info is not None
            assert (info.size, info.inline) == (len(blob), True)
            assert store_.read_small(blob_hash) == blob
    blobs.delete(hashes[4])  # one of the remembered ones
    assert not blobs.has(hashes[4]) and blobs.info(hashes[4]) is None


def test_sizes_are_known_beyond_the_ones_in_memory_and_forgotten_on_deletion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Admission asks a blob's size for every record: from memory for the blobs stored
    most recently, from the database for older ones; an erased blob has none."""
    monkeypatch.setattr(store, "HELD_IN_MEMORY", 1)
    kv, blobs = store_with_limit(tmp_path, monkeypatch, "SIZES_IN_MEMORY")
    data = small_blobs(5)
    hashes = blobs.put_many(data[:3]) + blobs.put_many(data[3:])
    for store_ in (blobs, BlobStore(tmp_path / "blobs", kv)):
        assert [store_.size_of(h) for h in hashes] == [len(b) for b in data]
        assert all(store_.has(h) for h in hashes)
    for gone in (hashes[0], hashes[4]):  # one only in the database, one in memory too
        blobs.delete(gone)
        assert blobs.size_of(gone) is None and not blobs.has(gone)
    assert blobs.size_of(crypto.sha256(b"never stored")) is None
    assert [blobs.size_of(h) for h in hashes[1:4]] == [len(b) for b in data[1:4]]


def segment_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted((root / "segments").glob("*.seg")))


def test_small_blobs_go_to_segments_not_leveldb_and_read_back_after_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(segments, "SEGMENT_BYTES", 1000)  # several segments
    kv = MemoryKV()
    blobs = BlobStore(tmp_path / "blobs", kv)
    data = small_blobs(30)
    hashes = blobs.put_many(data[:20]) + blobs.put_many(data[20:] + data[:3])  # 3 again
    assert len(list((tmp_path / "blobs" / "segments").glob("*.seg"))) > 3
    assert not list(kv.scan(store.T_INLINE))  # no blob bytes in LevelDB
    assert len(segment_bytes(tmp_path / "blobs")) == sum(map(len, data))  # stored once
    blobs.close()
    again = BlobStore(tmp_path / "blobs", kv)
    assert [again.read_small(h) for h in hashes] == data + data[:3]
    more = small_blobs(3, seed=9)
    assert [again.read_small(h) for h in again.put_many(more)] == more


def test_bytes_a_crash_left_unnamed_are_cut_off_at_start(tmp_path: Path) -> None:
    """Bytes appended but never named by an entry would be a copy of a ciphertext that no
    erasure can find: the next start cuts them off, and later blobs read back right."""
    kv = MemoryKV()
    blobs = BlobStore(tmp_path / "blobs", kv)
    [first_hash] = blobs.put_many([b"first blob"])
    blobs.close()
    # A crash after an append was made durable but before its entries were written.
    ends = {
        int.from_bytes(key[1:], "big"): int.from_bytes(value, "big")
        for key, value in kv.scan(store.T_SEGMENT_END)
    }
    assert ends == {0: len(b"first blob")}
    Segments(tmp_path / "blobs", ends).append([b"orphaned ciphertext"])
    assert b"orphaned ciphertext" in segment_bytes(tmp_path / "blobs")
    again = BlobStore(tmp_path / "blobs", kv)
    assert b"orphaned ciphertext" not in segment_bytes(tmp_path / "blobs")
    assert not again.has(hashlib.sha256(b"orphaned ciphertext").digest())
    [later_hash] = again.put_many([b"a later blob"])
    assert again.read_small(first_hash) == b"first blob"
    assert again.read_small(later_hash) == b"a later blob"


def test_a_new_node_s_first_append_a_crash_left_unnamed_is_cut_off(tmp_path: Path) -> None:
    Segments(tmp_path / "blobs", {}).append([b"orphaned ciphertext"])
    blobs = BlobStore(tmp_path / "blobs", MemoryKV())
    assert segment_bytes(tmp_path / "blobs") == b""
    [blob_hash] = blobs.put_many([b"a first blob"])
    assert blobs.read_small(blob_hash) == b"a first blob"
    assert segment_bytes(tmp_path / "blobs") == b"a first blob"


def test_bytes_whose_entries_could_not_be_written_are_cut_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The entries' batch fails (say the disk filled while LevelDB wrote its log): the
    appended bytes go at once, and the next blob lands at the committed end."""
    kv = MemoryKV()
    blobs = BlobStore(tmp_path / "blobs", kv)
    [kept_hash] = blobs.put_many([b"A" * 10])
    real = kv.write

    def full(changes: Any, *, sync: bool = True) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(kv, "write", full)
    with pytest.raises(OSError):
        blobs.put_many([b"B" * 10])
    assert segment_bytes(tmp_path / "blobs") == b"A" * 10
    monkeypatch.setattr(kv, "write", real)
    [later_hash] = blobs.put_many([b"C" * 10])
    assert blobs.read_small(later_hash) == b"C" * 10
    assert blobs.read_small(kept_hash) == b"A" * 10
    assert segment_bytes(tmp_path / "blobs") == b"A" * 10 + b"C" * 10


def test_a_failed_append_leaves_nothing_and_the_next_one_lands_right(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blobs = BlobStore(tmp_path / "blobs", MemoryKV())
    [kept_hash] = blobs.put_many([b"A" * 10])
    real = os.pwritev

    def disk_full(fd: int, buffers: Any, offset: int) -> int:
        os.pwrite(fd, bytes(buffers[0])[:4], offset)  # part of it reached the file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(segments.os, "pwritev", disk_full)
    with pytest.raises(OSError):
        blobs.put_many([b"B" * 10, b"D" * 10])
    monkeypatch.setattr(segments.os, "pwritev", real)
    assert not blobs.has(hashlib.sha256(b"B" * 10).digest())
    assert segment_bytes(tmp_path / "blobs") == b"A" * 10  # no part of it stays
    [later_hash] = blobs.put_many([b"C" * 10])
    assert blobs.read_small(later_hash) == b"C" * 10
    assert blobs.read_small(kept_hash) == b"A" * 10
    assert segment_bytes(tmp_path / "blobs") == b"A" * 10 + b"C" * 10


def test_short_writes_continue_where_they_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel may write less than asked (a signal, a full pipe of dirty pages): each
    blob's bytes still land whole and in place, across segments too."""
    monkeypatch.setattr(segments, "SEGMENT_BYTES", 100)
    monkeypatch.setattr(segments, "_IOV_MAX", 3)  # several calls for one segment's run
    real = os.pwritev
    calls = []

    def short(fd: int, buffers: Any, offset: int) -> int:
        calls.append(len(buffers))
        return real(fd, [bytes(b"".join(bytes(b) for b in buffers)[:7])], offset)

    monkeypatch.setattr(segments.os, "pwritev", short)
    blobs = BlobStore(tmp_path / "blobs", MemoryKV())
    data = small_blobs(12)
    hashes = blobs.put_many(data)
    assert len(calls) > len(data)  # the writes really were cut short
    assert [blobs.read_small(h) for h in hashes] == data
    assert len(segment_bytes(tmp_path / "blobs")) == sum(map(len, data))


def test_a_write_that_makes_no_progress_fails_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blobs = BlobStore(tmp_path / "blobs", MemoryKV())
    [kept_hash] = blobs.put_many([b"A" * 10])
    monkeypatch.setattr(segments.os, "pwritev", lambda fd, buffers, offset: 0)
    with pytest.raises(OSError):
        blobs.put_many([b"B" * 10])
    monkeypatch.undo()
    assert segment_bytes(tmp_path / "blobs") == b"A" * 10
    assert blobs.read_small(kept_hash) == b"A" * 10


@pytest.mark.parametrize(("limit", "expected"), [(-1, 1024), (0, 1024), (8, 8), (4096, 1024)])
def test_the_buffers_per_write_follow_the_system_limit(
    monkeypatch: pytest.MonkeyPatch, limit: int, expected: int
) -> None:
    monkeypatch.setattr(segments.os, "sysconf", lambda name: limit)
    assert segments._iov_max() == expected


def test_the_same_blob_stored_by_many_writers_at_once_is_kept_once(tmp_path: Path) -> None:
    """A client's upload and peers' pushes of one blob can arrive together: a second copy
    in a segment would be one that an erasure does not reach."""
    blobs = BlobStore(tmp_path / "blobs", MemoryKV())
    data = b"the same ciphertext, many times"
    blob_hash = hashlib.sha256(data).digest()
    start = threading.Barrier(8)

    def store_it() -> list[bytes]:
        start.wait(timeout=10)
        return blobs.put_many([data, data])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: store_it(), range(8)))
    assert results == [[blob_hash, blob_hash]] * 8
    assert blobs.put_many([data]) == [blob_hash]
    assert segment_bytes(tmp_path / "blobs").count(data) == 1
    assert blobs.delete(blob_hash)
    assert data not in segment_bytes(tmp_path / "blobs")


def test_a_missing_segment_is_a_blob_not_held_not_a_crash(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs", MemoryKV())
    [blob_hash] = blobs.put_many([b"ciphertext"])
    blobs.close()
    for path in (tmp_path / "blobs" / "segments").glob("*.seg"):
        path.unlink()
    with pytest.raises(NotFound) as caught:
        blobs.read_small(blob_hash)
    assert caught.value.code == "blob_missing"
    assert blobs.delete(blob_hash)  # the erasure still completes
    assert blobs.erased(blob_hash) and not blobs.has(blob_hash)


def test_damaged_bytes_are_never_served(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs", MemoryKV())
    [blob_hash] = blobs.put_many([b"ciphertext"])
    [segment] = (tmp_path / "blobs" / "segments").glob("*.seg")
    segment.write_bytes(b"Ciphertext")
    with pytest.raises(NotFound):
        blobs.read_small(blob_hash)


def test_reading_many_segments_keeps_few_files_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(segments, "SEGMENT_BYTES", 100)
    monkeypatch.setattr(segments, "OPEN_READERS", 2)
    blobs = BlobStore(tmp_path / "blobs", MemoryKV())
    data = small_blobs(12)
    hashes = blobs.put_many(data)
    assert len(list((tmp_path / "blobs" / "segments").glob("*.seg"))) == 12
    before = len(os.listdir("/proc/self/fd"))
    assert [blobs.read_small(h) for h in hashes] == data
    assert len(os.listdir("/proc/self/fd")) <= before + 2


def test_erasing_a_small_blob_overwrites_its_bytes_on_disk(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs", MemoryKV())
    secret, other = b"ciphertext to shred " * 10, b"ciphertext to keep " * 10
    secret_hash, other_hash = blobs.put_many([secret, other])
    assert secret in segment_bytes(tmp_path / "blobs")
    assert blobs.delete(secret_hash)
    on_disk = segment_bytes(tmp_path / "blobs")
    assert secret not in on_disk and other in on_disk
    assert blobs.read_small(other_hash) == other
    with pytest.raises(NotFound):
        blobs.read_small(secret_hash)


def test_a_small_blob_an_earlier_build_kept_in_leveldb_is_read_and_erased(
    tmp_path: Path,
) -> None:
    kv = MemoryKV()
    data = b"stored in LevelDB by an earlier build"
    blob_hash = hashlib.sha256(data).digest()
    meta = codec.encode({"size": len(data), "inline": True, "stored": 1})
    kv.write({store.T_META + blob_hash: meta, store.T_INLINE + blob_hash: data})
    blobs = BlobStore(tmp_path / "blobs", kv)
    assert blobs.read_small(blob_hash) == data
    assert blobs.delete(blob_hash)
    assert kv.get(store.T_INLINE + blob_hash) is None and blobs.erased(blob_hash)


def test_an_append_that_fails_after_rolling_over_leaves_both_segments_as_they_were(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(segments, "SEGMENT_BYTES", 20)
    kv = MemoryKV()
    blobs = BlobStore(tmp_path / "blobs", kv)
    first = blobs.put_many([b"a" * 10])
    real, calls = os.pwritev, 0

    def fails_second(fd: int, buffers: Any, offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 2:  # segment 1's write, after segment 0's went down
            raise OSError(errno.EIO, "I/O error")
        return real(fd, buffers, offset)

    monkeypatch.setattr(segments.os, "pwritev", fails_second)
    with pytest.raises(OSError):
        blobs.put_many([b"b" * 10, b"c" * 10, b"d" * 10])  # b fills segment 0, c starts 1
    monkeypatch.setattr(segments.os, "pwritev", real)
    assert calls == 2
    assert segment_bytes(tmp_path / "blobs") == b"a" * 10
    later = blobs.put_many([b"e" * 10, b"f" * 10])
    again = BlobStore(tmp_path / "blobs", kv)
    assert [again.read_small(h) for h in first + later] == [b"a" * 10, b"e" * 10, b"f" * 10]
    assert segment_bytes(tmp_path / "blobs") == b"a" * 10 + b"e" * 10 + b"f" * 10


def test_a_cut_that_failed_is_made_before_the_next_append(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kv = MemoryKV()
    blobs = BlobStore(tmp_path / "blobs", kv)
    [kept_hash] = blobs.put_many([b"A" * 10])
    real_write, real_truncate = kv.write, os.truncate

    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(kv, "write", fail)
    monkeypatch.setattr(segments.os, "truncate", fail)
    with pytest.raises(OSError):
        blobs.put_many([b"B" * 10])
    assert segment_bytes(tmp_path / "blobs") == b"A" * 10 + b"B" * 10  # not cut yet
    monkeypatch.setattr(kv, "write", real_write)
    monkeypatch.setattr(segments.os, "truncate", real_truncate)
    [later_hash] = blobs.put_many([b"C" * 10])
    assert segment_bytes(tmp_path / "blobs") == b"A" * 10 + b"C" * 10
    assert [blobs.read_small(h) for h in (kept_hash, later_hash)] == [b"A" * 10, b"C" * 10]
