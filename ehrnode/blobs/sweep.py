"""The blobs of what a catch-up committed, looked for once it is over.

Replication looks up, at each commit, whether this node holds the blob of every record the
block names; a node back from downtime holds none of them, and during its catch-up those
look-ups (a LevelDB miss each) and the missing list's writes took a tenth of its time.
So while block sync runs ``DEFER_BEHIND`` blocks or more behind, a commit only writes
down the height of the first such block (``K_UNCHECKED``), if none is written yet. Once
the catch-up is over, the sweep reads the blocks from that height to the head back,
``SWEEP_SLICE`` records' blobs an event-loop turn, hands them to replication's missing
list, and moves the mark on with each block's last slice, in the same write; at the head
it removes the mark, and the commits look for themselves again.

A node stopped before the sweep ends resumes it at start. A sweep that fails (an
unreadable block) is logged, and the commits look for themselves again; its mark waits
for the next start.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import struct
from collections.abc import Callable
from typing import Protocol

from ehrnode.core import tx as txmod
from ehrnode.core.errors import EhrError
from ehrnode.store.chain import Chain
from ehrnode.store.db import KV

log = logging.getLogger(__name__)

# BE8: the records of the blocks from this height on have not had their blobs looked up.
K_UNCHECKED = b"Runchecked"
RECORD_KINDS = ("record", "records")
SWEEP_SLICE = 512  # blobs looked up in one event-loop turn
DEFER_BEHIND = 4  # blocks behind its peers from which a syncing node leaves it to the sweep


class CatchUp(Protocol):
    """Block sync, as the sweep sees it (``p2p.sync.BlockSync``)."""

    @property
    def syncing(self) -> bool: ...

    def blocks_behind(self) -> int:
        """How far the highest peer's chain is ahead of ours."""
        ...

    async def idle(self) -> None:
        """Return once no catch-up runs."""
        ...


class Sweep:
    def __init__(
        self,
        kv: KV,
        note_missing: Callable[[list[bytes], dict[bytes, bytes | None]], None],
        done: Callable[[], None],
    ) -> None:
        """``note_missing(blobs, changes)`` puts the blobs this node lacks on the missing
        list, in one write with ``changes``; ``done`` runs when a sweep reaches the head."""
        self.kv = kv
        self._note_missing = note_missing
        self._done = done
        self.catch_up: CatchUp | None = None  # set by the node
        self.chain: Chain | None = None  # set by replication's recover
        mark = kv.get(K_UNCHECKED)
        self.unchecked: int | None = None if mark is None else _height(mark)
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def covers(self, height: int) -> bool:
        """Whether the sweep will look at the block just committed at ``height``: one is
        running (it goes up to the head), or a long catch-up starts one here."""
        if self.unchecked is not None:
            return self.running  # else a sweep failed: the commit looks for itself
        catch_up = self.catch_up
        if catch_up is None or self.chain is None or not catch_up.syncing:
            return False
        if catch_up.blocks_behind() < DEFER_BEHIND:
            return False
        self.kv.write({K_UNCHECKED: struct.pack(">Q", height)}, sync=False)
        self.unchecked = height
        self.start()
        return True

    def start(self) -> None:
        """Run the sweep if a mark is set (at start, one a stop left) and none runs."""
        if self.unchecked is not None and not self.running:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sweep")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        try:
            await self._sweep()
        except asyncio.CancelledError:
            raise
        except EhrError as err:
            log.error(
                "the blobs of the blocks from %s on are not looked for: %s", self.unchecked, err
            )
        except Exception:  # a bug must not leave the commits waiting for a dead sweep
            log.exception("the sweep of the blocks from %s on failed", self.unchecked)

    async def _sweep(self) -> None:
        chain = self.chain
        if chain is None:
            raise EhrError("no chain to read the blocks from")
        while self.unchecked is not None:
            if self.catch_up is not None and self.catch_up.syncing:
                await self.catch_up.idle()
                continue
            height = self.unchecked
            if height > chain.head.height:
                # Nothing awaited since the head was read: the next commit looks for itself.
                self.kv.write({K_UNCHECKED: None}, sync=False)
                self.unchecked = None
                break
            named = (
                blob
                for stored in chain.stored_txs(height, RECORD_KINDS)
                for blob in txmod.blobs_of(stored["kind"], stored["body"])
            )
            while True:
                blobs = list(itertools.islice(named, SWEEP_SLICE))
                mark: dict[bytes, bytes | None] = {}
                if len(blobs) < SWEEP_SLICE:  # the block's last slice
                    mark[K_UNCHECKED] = struct.pack(">Q", height + 1)
                self._note_missing(blobs, mark)
                if mark:
                    break
                await asyncio.sleep(0)  # RPC requests and consensus between slices
            self.unchecked = height + 1
            await asyncio.sleep(0)
        self._done()


def _height(value: bytes) -> int:
    height: int = struct.unpack(">Q", value)[0]
    return height
