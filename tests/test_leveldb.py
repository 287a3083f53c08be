"""The LevelDB store: a clean close writes the memtable out, so the next start has no
log to replay (and nothing to compact while its first requests come in)."""

from __future__ import annotations

import os
from pathlib import Path

from ehrnode.store.db import LevelKV


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
