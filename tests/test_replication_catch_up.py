"""A validator back from downtime catches up on the chain first and fetches the ciphertext
of the records it missed after, even when it is stopped in between; the sweep that looks
for it leaves the event loop to other work between slices."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ehrnode import config as cfg
from ehrnode.blobs import sweep as sweep_module
from ehrnode.blobs.replication import Replication
from ehrnode.blobs.sweep import DEFER_BEHIND, K_UNCHECKED, Sweep
from ehrnode.client.sdk import Client
from ehrnode.core import crypto
from ehrnode.core.errors import Unavailable
from ehrnode.node import Node
from ehrnode.store.db import MemoryKV
from ehrnode.testing import cluster, validator_identity, wait_for

OBSERVATION = {
    "resourceType": "Observation",
    "status": "final",
    "code": {"text": "Heart rate"},
    "valueQuantity": {"value": 72, "unit": "beats/minute"},
}
RECORDS = 6  # one block each


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[list[Node]]:
    async with cluster(tmp_path, n=4) as running:
        yield running


async def write_while_down(nodes: list[Node]) -> tuple[Path, list[bytes]]:
    """Stop validator 3, write records through validator 0; its home and the records'
    blobs."""
    institution = validator_identity(nodes[0].config.home)
    provider, patient = crypto.Identity.generate(), crypto.Identity.generate()
    home = nodes[3].config.home
    await nodes[3].stop()
    blobs = []
    async with Client(nodes[0].rpc_url, institution) as c:
        endorsement = c.endorse(provider.public_key, "provider")
        await c.as_identity(provider).register("provider", "Dr A", endorsement)
        await c.as_identity(patient).register("patient")
        for n in range(RECORDS):
            observation = {**OBSERVATION, "valueQuantity": {"value": 60 + n, "unit": "/min"}}
            written = await c.as_identity(provider).put(patient.public_key, observation)
            blobs.append(nodes[0].chain.load_state(b"rec" + bytes.fromhex(written.id))["blob"])
    return home, blobs


async def restart(nodes: list[Node], home: Path) -> Node:
    node = Node(cfg.load(home))
    nodes[3] = node  # so that the fixture stops it
    await node.start()
    return node


async def test_the_missed_ciphertext_is_looked_for_once_the_catch_up_is_over(
    nodes: list[Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    home, blobs = await write_while_down(nodes)
    looked_up: list[bool] = []  # for each blob looked up: was a catch-up running?
    lacks = Replication._lacks

    def spy(self: Replication, blob: bytes) -> bool:
        node = nodes[3]  # the restarted node, once restart() made it
        if node.replication is self and node.sync is not None and blob in blobs:
            looked_up.append(node.sync.syncing)
        return lacks(self, blob)

    monkeypatch.setattr(Replication, "_lacks", spy)
    node = await restart(nodes, home)
    final = nodes[0].chain.head.height
    await wait_for(lambda: node.chain.head.height >= final, 20, "the catch-up")
    # A pushed batch is held once a worker thread has stored it, and off the missing list
    # once the event loop takes the result in: wait for both.
    await wait_for(
        lambda: all(node.blobs.has(b) for b in blobs) and not node.replication.missing,
        20,
        "the missed blobs, held and off the missing list",
    )
    assert looked_up and not any(looked_up), looked_up  # all after the catch-up
    assert node.replication.kv.get(K_UNCHECKED) is None  # the sweep is over


async def test_a_node_stopped_before_its_sweep_resumes_it_at_start(
    nodes: list[Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    home, blobs = await write_while_down(nodes)

    async def stalled(self: Sweep) -> None:
        await asyncio.Event().wait()  # until the node stops

    monkeypatch.setattr(Sweep, "_sweep", stalled)
    node = await restart(nodes, home)
    final = nodes[0].chain.head.height
    await wait_for(lambda: node.chain.head.height >= final, 20, "the catch-up")
    marked = node.replication.kv.get(K_UNCHECKED)
    assert marked is not None and sweep_module._height(marked) <= final - RECORDS + 1
    assert not any(node.blobs.has(b) for b in blobs) and not node.replication.missing
    await node.stop()

    monkeypatch.undo()
    node = await restart(nodes, home)
    await wait_for(lambda: all(node.blobs.has(b) for b in blobs), 20, "the missed blobs")
    await wait_for(lambda: node.replication.kv.get(K_UNCHECKED) is None, 10, "the sweep to end")


class FakeChain:
    """Blocks 1 to ``heights``, each one ``records`` transaction of ``per_block`` blobs."""

    def __init__(self, heights: int, per_block: int) -> None:
        self.head = SimpleNamespace(height=heights)
        self.blobs = {
            h: [crypto.sha256(f"{h}/{i}".encode()) for i in range(per_block)]
            for h in range(1, heights + 1)
        }

    def stored_txs(self, height: int, kinds: Any) -> list[dict[str, Any]]:
        items = [{"blob": blob} for blob in self.blobs[height]]
        return [{"kind": "records", "body": {"items": items}}]


class FakeCatchUp:
    def __init__(self, behind: int) -> None:
        self.behind = behind
        self.syncing = True
        self.over = asyncio.Event()

    def blocks_behind(self) -> int:
        return self.behind

    async def idle(self) -> None:
        await self.over.wait()


def sweep_over(kv: MemoryKV, chain: Any, missing: list[bytes]) -> Sweep:
    def note_missing(blobs: list[bytes], changes: dict[bytes, bytes | None]) -> None:
        missing.extend(blobs)  # here every blob is lacking
        if changes:
            kv.write(changes)

    sweep = Sweep(kv, note_missing, lambda: None)
    sweep.chain = chain
    return sweep


async def test_the_sweep_looks_in_slices_and_moves_its_mark_a_block_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sweep_module, "SWEEP_SLICE", 10)
    kv = MemoryKV()
    kv.write({K_UNCHECKED: struct.pack(">Q", 2)})  # blocks 2 and 3 left to look at
    chain = FakeChain(heights=3, per_block=25)
    missing: list[bytes] = []
    sweep = sweep_over(kv, chain, missing)
    turns: list[tuple[int, bytes | None]] = []  # between the sweep's slices: missing, mark
    watching = True

    async def watch() -> None:
        while watching:
            turns.append((len(missing), kv.get(K_UNCHECKED)))
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    sweep.start()
    assert sweep._task is not None
    await asyncio.wait_for(sweep._task, 10)
    watching = False
    await watcher
    assert missing == chain.blobs[2] + chain.blobs[3]
    assert kv.get(K_UNCHECKED) is None and sweep.unchecked is None
    seen = [turn for turn in dict.fromkeys(turns) if turn[1] is not None]  # in order
    # 25 blobs a block in slices of 10; the mark moves on with a block's last slice.
    assert seen == [
        (0, struct.pack(">Q", 2)),
        (10, struct.pack(">Q", 2)),
        (20, struct.pack(">Q", 2)),
        (25, struct.pack(">Q", 3)),
        (35, struct.pack(">Q", 3)),
        (45, struct.pack(">Q", 3)),
        (50, struct.pack(">Q", 4)),
    ], seen


async def test_only_a_long_catch_up_leaves_the_look_ups_to_the_sweep() -> None:
    kv = MemoryKV()
    chain = FakeChain(heights=3, per_block=2)
    sweep = sweep_over(kv, chain, [])
    sweep.catch_up = catch_up = FakeCatchUp(behind=DEFER_BEHIND - 1)
    assert not sweep.covers(3) and kv.get(K_UNCHECKED) is None  # a block or two behind
    catch_up.behind = DEFER_BEHIND
    assert sweep.covers(3) and sweep.covers(4)  # the one mark covers what follows
    assert kv.get(K_UNCHECKED) == struct.pack(">Q", 3) and sweep.running
    await sweep.stop()


async def test_a_failed_sweep_hands_the_look_ups_back_to_the_commits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Damaged(FakeChain):
        def stored_txs(self, height: int, kinds: Any) -> list[dict[str, Any]]:
            raise Unavailable(f"block {height} is missing from block segment 0")

    kv = MemoryKV()
    kv.write({K_UNCHECKED: struct.pack(">Q", 2)})
    missing: list[bytes] = []
    sweep = sweep_over(kv, Damaged(heights=3, per_block=2), missing)
    sweep.start()
    assert sweep._task is not None
    await asyncio.wait_for(sweep._task, 10)
    assert "block 2 is missing" in caplog.text
    assert not sweep.covers(4)  # the commit looks for itself
    assert kv.get(K_UNCHECKED) == struct.pack(">Q", 2)  # for the next start
