"""The LevelDB store: a clean close writes the memtable out, so the next start has no
log to replay (and nothing to compact while its first requests come in)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ehrnode.store.db import LevelKV, MemoryKV


def log_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".log")


def test_a_clean_close_leaves_no_log_to_replay_and_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "data"
    kv = LevelKV(path)
    entries = {b"S" + os.urandom(16): os.urandom(200) for _ in range(5000)}
    kv.write(entries, sync=True)
    kv.write({next(iter(entries)): None}, sync=True)  # a delete goes out too
    assert log_bytes(path) > 1_000_000  # the writes are in the log until the close
    kv.close()

    assert log_bytes(path) == 0
    again = LevelKV(path)
    try:
        first, *rest = entries
        assert again.get(first) is None
        assert all(again.get(key) == entries[key] for key in rest)
    finally:
        again.close()


@pytest.mark.parametrize("kind", ["leveldb", "memory"])
async def test_a_batch_written_from_the_event_loop_lands_whole(tmp_path: Path, kind: str) -> None:
    """``write_from_loop`` (a block's commit): the batch is built on the loop's thread and
    written on a worker thread; its puts and deletes land together and outlive a reopen."""
    path = tmp_path / "data"
    kv: LevelKV | MemoryKV = LevelKV(path) if kind == "leveldb" else MemoryKV()
    kv.write({b"old": b"1", b"keep": b"2"}, sync=True)
    entries: dict[bytes, bytes | None] = {b"n%05d" % i: os.urandom(100) for i in range(20_000)}
    entries[b"old"] = None
    seen_after: list[bytes | None] = []
    await kv.write_from_loop(entries, sync=True, then=lambda: seen_after.append(kv.get(b"n00007")))
    assert seen_after == [entries[b"n00007"]]  # ``then`` ran once, after the write
    if isinstance(kv, LevelKV):
        kv.close()
        kv = LevelKV(path)
    try:
        assert kv.get(b"old") is None and kv.get(b"keep") == b"2"
        assert [k for k, _ in kv.scan(b"n")] == sorted(k for k in entries if k != b"old")
        assert all(kv.get(k) == v for k, v in entries.items() if v is not None)
    finally:
        kv.close()
