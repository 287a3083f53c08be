"""The LevelDB store: a clean close writes the memtable out, so the next start has no
log to replay (and nothing to compact while its first requests come in); LevelDB's own
background work runs below the node's threads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ehrnode.bench.bigchain import settle
from ehrnode.store.db import BACKGROUND_NICE, LevelKV, MemoryKV


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


def tables_per_level(kv: LevelKV) -> dict[int, int]:
    """Level -> table count, from LevelDB's statistics (levels with tables only)."""
    counts = {}
    for line in kv.stats().splitlines():
        fields = line.split()
        if len(fields) == 6 and fields[0].isdigit():
            counts[int(fields[0])] = int(fields[1])
    return {level: n for level, n in counts.items() if n}


def test_settling_a_bulk_load_leaves_one_level_and_nothing_for_reads_to_compact(
    tmp_path: Path,
) -> None:
    """The query benchmark's offline build compacts what it loaded (bench.bigchain.settle):
    a level-0 table left on top would be charged with seeks by the first reads and compacted
    beside them."""
    kv = LevelKV(tmp_path / "data")
    try:
        loaded: dict[bytes, bytes] = {}
        for _ in range(3):  # three tables on levels 0-2: below any trigger of LevelDB's own
            batch = {b"S" + os.urandom(16): os.urandom(300) for _ in range(2000)}
            kv.write(batch, sync=False)
            kv.flush()
            loaded.update(batch)
        kv.write({b"B" + os.urandom(8): os.urandom(300)}, sync=False)  # left in the memtable
        assert 0 in tables_per_level(kv) and len(tables_per_level(kv)) >= 2

        settle(kv)

        levels = tables_per_level(kv)
        assert 0 not in levels and len(levels) == 1, levels
        assert all(kv.get(key) == value for key, value in loaded.items())
    finally:
        kv.close()


PRIORITY_PROBE = """
import os, pathlib, sys, threading
from ehrnode.store.db import LevelKV

kv = LevelKV(pathlib.Path(sys.argv[1]))
for _ in range(64):  # 64 MB: two memtables' worth, written out by LevelDB's own thread
    kv.write({os.urandom(16): os.urandom(100_000) for _ in range(10)}, sync=False)
kv.close()  # waits for the node's worker threads; LevelDB's thread lives on
python = {t.native_id for t in threading.enumerate()}
for tid in os.listdir("/proc/self/task"):
    fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
    print(int(tid) in python, fields[16], int(fields[11]) + int(fields[12]))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc")
def test_leveldb_writes_out_and_compacts_below_the_node_s_own_threads(tmp_path: Path) -> None:
    """LevelDB's background thread (memtable flushes, compactions) runs at a lower
    priority than the node's threads, which stay at the default: on a busy machine a burst
    of compactions takes the CPU consensus leaves, not the CPU it needs. (Each line of the
    probe: a thread Python started or not, its nice value, its CPU ticks.)"""
    result = subprocess.run(
        [sys.executable, "-c", PRIORITY_PROBE, str(tmp_path / "data")],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    threads = [line.split() for line in result.stdout.splitlines()]
    python = [(int(nice), int(ticks)) for is_python, nice, ticks in threads if is_python == "True"]
    native = [(int(nice), int(ticks)) for is_python, nice, ticks in threads if is_python != "True"]
    base = python[0][0]  # the process's own (0 unless the tests run under nice)
    assert all(nice == base for nice, _ in python), threads
    lowered = [ticks for nice, ticks in native if nice == min(19, base + BACKGROUND_NICE)]
    assert len(lowered) == 1, threads  # LevelDB's one background thread
    assert lowered[0] > 0, threads  # and it wrote the memtables out
