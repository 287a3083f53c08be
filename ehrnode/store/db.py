"""Ordered key-value stores: LevelDB through plyvel, and an in-memory twin for tests.

Both give point reads, ordered prefix scans and atomic batches. A batch written with
``sync=True`` is on disk when ``write`` returns (LevelDB fsyncs its log), so a crash finds
either all of it or none of it. Table prefixes are defined by the modules that own them
(``store.chain``, ``store.access``, ``blobs.store``, ``consensus.driver``); this module
knows nothing of them.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import plyvel

from ehrnode.core.errors import ConfigError, Unavailable
from ehrnode.store import batches

T = TypeVar("T")


log = logging.getLogger(__name__)

# LevelDB writes memtables out and compacts its tables on one background thread per
# process. It runs 5 steps of nice below the node's own threads (about a quarter of a core
# against one busy thread), so that a burst of compactions takes the CPU the node leaves,
# not the CPU consensus needs; RocksDB offers the same (``LowerThreadPoolCPUPriority``).
# Four validators writing the same blocks flush and compact at the same moment, and on two
# cores that stalled commits for 1-2 s (docs/benchmarks.md, note 40).
BACKGROUND_NICE = 5
_background = {"lowered": False}


class KV(Protocol):
    def get(self, key: bytes) -> bytes | None: ...

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking work on this database off the event loop (``close`` waits for it)."""
        ...

    def write(self, changes: Mapping[bytes, bytes | None], *, sync: bool = True) -> None: ...

    async def write_from_loop(
        self,
        changes: Mapping[bytes, bytes | None],
        *,
        sync: bool = True,
        around: AbstractContextManager[Mapping[bytes, bytes]] | None = None,
        then: Callable[[], None] | None = None,
    ) -> None:
        """``write`` a large batch from the event loop's thread (see ``LevelKV``'s).
        ``around``, entered on the thread that writes, gives more entries for the batch
        and is left with the write's outcome (``store.blockfiles``' append); ``then`` runs
        right after the write, on that thread."""
        ...

    def scan(
        self,
        prefix: bytes,
        *,
        start: bytes | None = None,
        reverse: bool = False,
        limit: int | None = None,
    ) -> Iterator[tuple[bytes, bytes]]: ...

    def close(self) -> None: ...


class LevelKV:
    """One LevelDB database in ``path``.

    Blocking work (synced batches) runs on this database's own worker threads via ``run``;
    ``close`` waits for that work to finish first, so no thread ever touches a closed DB.
    """

    def __init__(self, path: Path, *, cache_mb: int = 64) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self._workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="leveldb")
        threads_before = None if _background["lowered"] else _native_threads()
        try:
            self._db = plyvel.DB(
                str(path),
                create_if_missing=True,
                lru_cache_size=cache_mb * 1024 * 1024,
                # A larger memtable absorbs the per-block rewrites of the same accounts and
                # flushes (then compacts) less often: 64 MiB took 13-15% less validator CPU
                # per record under load than 16. But each flush sets off a burst of
                # compactions (a level-0 table several times level 1's 10 MiB pushed on
                # into level 2) that, on all validators at once, stalled commits for 2-3 s:
                # at 64 MiB the commit latency's p99 went to 1.3-2.5 s whenever a flush fell
                # in its window, at 32 MiB it stayed under 1 s, for about 4% more CPU a
                # transaction (docs/benchmarks.md, note 31). A crash replays up to this much
                # log at start (memory is taken as the memtable fills, not up front).
                write_buffer_size=32 * 1024 * 1024,
                # What a node stores is ciphertext, hashes, keys and signatures: Snappy
                # cannot shrink them, and compressing every table LevelDB writes and
                # rewrites cost a validator a fifth of its CPU under load.
                compression=None,
                bloom_filter_bits=10,
            )
        except plyvel.IOError as err:
            raise Unavailable(
                f"cannot open the database in {path}: {err} (is another node running there?)"
            ) from err
        except plyvel.CorruptionError as err:
            raise ConfigError(f"the database in {path} is corrupt: {err}") from err
        if threads_before is not None:
            self._lower_background_priority(threads_before)

    def _lower_background_priority(self, threads_before: set[int]) -> None:
        """Find LevelDB's background thread, the native thread that appeared since before
        the open, and lower its priority. The open starts it when it leaves work behind;
        otherwise a flush does (of an empty memtable, with no work to wait behind)."""
        started = (_native_threads() or set()) - threads_before
        if not started:
            self.flush()
            started = (_native_threads() or set()) - threads_before
        _lower_priority(started)

    def get(self, key: bytes) -> bytes | None:
        value: bytes | None = self._db.get(key)
        return value

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._workers, fn, *args)

    def write(self, changes: Mapping[bytes, bytes | None], *, sync: bool = True) -> None:
        self._batch(changes, sync).write()

    async def write_from_loop(
        self,
        changes: Mapping[bytes, bytes | None],
        *,
        sync: bool = True,
        around: AbstractContextManager[Mapping[bytes, bytes]] | None = None,
        then: Callable[[], None] | None = None,
    ) -> None:
        """``write``, with the batch built on this (the event loop's) thread and only the
        write itself (and ``around``) on a worker thread. plyvel lets go of the GIL around
        every put, so a worker thread building a batch of tens of thousands of entries
        waits for the busy event loop's thread at each one: a 35,000-entry batch (a block
        of 5,000 records) took 4.3 s instead of 0.09 while the loop's thread computed.
        ``then`` runs on the worker right after the write, even if the awaiting task is
        cancelled meanwhile."""
        batch = self._batch(changes, sync)

        def write() -> None:
            if around is None:
                batch.write()
            else:
                with around as more:
                    for key, value in more.items():
                        batch.put(key, value)
                    batch.write()
            if then is not None:
                then()

        await self.run(write)

    def _batch(self, changes: Mapping[bytes, bytes | None], sync: bool) -> Any:
        """The write batch of ``changes``, in key order: LevelDB puts each entry into its
        memtable (a skip list) in batch order, and in key order each insert walks the
        nodes the last one warmed. A commit's keys (hashes, mostly) come in no order, and
        the entries of 5,000 records took three times as long to write that way
        (benchmarks note 57); sorting the keys costs less than the difference. One key
        appears once in a mapping, so the order changes nothing in what is written."""
        batch = self._db.write_batch(sync=sync)
        batches.fill(batch, changes)
        return batch

    def scan(
        self,
        prefix: bytes,
        *,
        start: bytes | None = None,
        reverse: bool = False,
        limit: int | None = None,
    ) -> Iterator[tuple[bytes, bytes]]:
        if start is None:
            iterator = self._db.iterator(prefix=prefix, reverse=reverse)
        elif reverse:
            iterator = self._db.iterator(start=prefix, stop=start, reverse=True)
        else:
            iterator = self._db.iterator(start=start, stop=_prefix_end(prefix))
        with iterator:
            for count, (key, value) in enumerate(iterator):
                if limit is not None and count >= limit:
                    return
                yield key, value

    def stats(self) -> str:
        """LevelDB's table count, size and compaction totals per level ("leveldb.stats")."""
        text: bytes = self._db.get_property(b"leveldb.stats")
        return text.decode()

    def compact(self, start: bytes, stop: bytes) -> None:
        """Rewrite that key range into LevelDB's lower levels (the memtable first), so
        deleted values leave its files and no compaction of it is left owed."""
        self._db.compact_range(start=start, stop=stop)

    def close(self) -> None:
        """Finish the worker threads' writes, write the memtable out, close.

        Without the flush the next start replays up to a write buffer's worth of log
        (32 MiB) and LevelDB compacts what it replayed while the first requests come in: a
        node started on a million-record chain took 1.2-2.0 s instead of about 0.6 and
        served its first record lists 2-4 times slower. A crash still leaves the log to
        replay, as before."""
        self._workers.shutdown(wait=True)
        try:
            self.flush()
        except (plyvel.Error, RuntimeError) as err:  # closing matters more: the log has it
            log.warning("could not write the memtable out before closing: %s", err)
        self._db.close()

    def flush(self) -> None:
        """Write the memtable out to a table (LevelDB does that before compacting a range;
        this range holds no key, so that is all it does)."""
        self._db.compact_range(start=b"\x00", stop=b"\x00")


def _native_threads() -> set[int] | None:
    """This process's threads that Python did not start; None where there is no
    ``/proc/self/task`` to list them (not Linux), so nothing is looked for."""
    try:
        tasks = {int(name) for name in os.listdir("/proc/self/task")}
    except OSError:
        return None
    return tasks - {t.native_id for t in threading.enumerate() if t.native_id is not None}


def _lower_priority(threads: set[int]) -> None:
    """Lower the new native threads' priority (LevelDB's background thread), once."""
    for tid in threads:
        try:
            nice = os.getpriority(os.PRIO_PROCESS, tid)
            os.setpriority(os.PRIO_PROCESS, tid, min(19, nice + BACKGROUND_NICE))
        except OSError:  # gone, or not allowed: LevelDB runs as before
            continue
        _background["lowered"] = True


def _prefix_end(prefix: bytes) -> bytes | None:
    """The first key after every key that starts with ``prefix``."""
    raw = bytearray(prefix)
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return None
    raw[-1] += 1
    return bytes(raw)


class MemoryKV:
    """A dict with sorted keys; the same semantics as ``LevelKV``, nothing on disk."""

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._keys: list[bytes] = []

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return fn(*args)

    async def write_from_loop(
        self,
        changes: Mapping[bytes, bytes | None],
        *,
        sync: bool = True,
        around: AbstractContextManager[Mapping[bytes, bytes]] | None = None,
        then: Callable[[], None] | None = None,
    ) -> None:
        if around is None:
            self.write(changes, sync=sync)
        else:
            with around as more:
                self.write({**changes, **more}, sync=sync)
        if then is not None:
            then()

    def write(self, changes: Mapping[bytes, bytes | None], *, sync: bool = True) -> None:
        for key, value in changes.items():
            if value is None:
                if key in self._data:
                    del self._data[key]
                    self._keys.pop(bisect.bisect_left(self._keys, key))
            else:
                if key not in self._data:
                    bisect.insort(self._keys, key)
                self._data[key] = value

    def scan(
        self,
        prefix: bytes,
        *,
        start: bytes | None = None,
        reverse: bool = False,
        limit: int | None = None,
    ) -> Iterator[tuple[bytes, bytes]]:
        end = _prefix_end(prefix)
        lo = bisect.bisect_left(self._keys, prefix)
        hi = len(self._keys) if end is None else bisect.bisect_left(self._keys, end)
        if start is not None:
            if reverse:
                hi = min(hi, bisect.bisect_left(self._keys, start))
            else:
                lo = max(lo, bisect.bisect_left(self._keys, start))
        keys = self._keys[lo:hi]
        if reverse:
            keys = keys[::-1]
        if limit is not None:
            keys = keys[:limit]
        for key in keys:
            yield key, self._data[key]

    def close(self) -> None:
        pass
