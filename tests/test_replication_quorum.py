"""The write quorum: a batch of blobs waits until enough validators hold each of them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from ehrnode.blobs import replication as replication_module, store as store_module
from ehrnode.blobs.replication import Replication
from ehrnode.blobs.store import BlobStore
from ehrnode.core import crypto
from ehrnode.store.db import MemoryKV

ME, P1, P2, P3 = (bytes([n]) * 32 for n in range(4))


def replication(tmp_path: Path, quorum: int) -> Replication:
    switch = SimpleNamespace(me=ME, handlers={}, routes=[], on_connect=[], peers={})
    kv = MemoryKV()
    return Replication(
        switch,  # type: ignore[arg-type]
        BlobStore(tmp_path / "blobs", kv),
        kv,
        quorum=lambda: quorum,
        replicate=False,
    )


def announce(r: Replication, peer: bytes, *blobs: bytes) -> None:
    r._on_have(SimpleNamespace(key=peer), {"hashes": list(blobs)})  # type: ignore[arg-type]


async def test_a_batch_waits_for_the_quorum_of_every_blob(tmp_path: Path) -> None:
    r = replication(tmp_path, quorum=3)
    [a] = r.blobs.put_many([b"held here"])
    b = crypto.sha256(b"held elsewhere")
    waiting = asyncio.create_task(r.wait_quorum([a, b], 30))
    announce(r, P1, a, b)
    announce(r, P2, a)
    await asyncio.sleep(0)
    assert not waiting.done()  # a has 3 holders (this node, P1, P2), b only P1
    announce(r, P2, b)
    announce(r, P3, b)
    assert await asyncio.wait_for(waiting, 5) == [3, 3]
    assert r._waiters == {}  # nothing left registered


async def test_a_batch_short_of_the_quorum_returns_the_counts_at_the_timeout(
    tmp_path: Path,
) -> None:
    r = replication(tmp_path, quorum=2)
    [a] = r.blobs.put_many([b"only here"])
    [c] = r.blobs.put_many([b"also with a peer"])
    announce(r, P1, c)
    assert await r.wait_quorum([a, c], 0.05) == [1, 2]
    assert r._waiters == {}
    # a holder that is not a validator does not count
    r.is_validator = lambda key: key != P2
    announce(r, P2, a)
    assert await r.wait_quorum([a], 0.05) == [1]


async def test_the_count_is_the_number_of_replicas_listed(tmp_path: Path) -> None:
    r = replication(tmp_path, quorum=3)
    [held] = r.blobs.put_many([b"held"])
    unheld = crypto.sha256(b"not held")
    r.is_validator = lambda key: key != P3
    for blob in (held, unheld):
        assert r.count(blob) == len(r.replicas(blob))
        announce(r, P1, blob)
        announce(r, P3, blob)  # not a validator: listed nowhere, counted nowhere
        announce(r, ME, blob)  # this node named by a peer's news counts once
        assert r.count(blob) == len(r.replicas(blob))
    assert r.replicas(held) == sorted([ME, P1]) and r.count(held) == 2
    assert r.replicas(unheld) == sorted([ME, P1]) and r.count(unheld) == 2


async def test_news_of_one_blob_does_not_release_a_batch_another_is_short_in(
    tmp_path: Path,
) -> None:
    r = replication(tmp_path, quorum=2)
    blobs = r.blobs.put_many([b"first", b"second", b"third"])
    waiting = asyncio.create_task(r.wait_quorum(blobs, 30))
    await asyncio.sleep(0)
    announce(r, P1, blobs[0], blobs[2])
    await asyncio.sleep(0)
    assert not waiting.done()
    announce(r, P2, blobs[1])
    assert await asyncio.wait_for(waiting, 5) == [2, 2, 2]
    assert r._waiters == {}


async def test_pushed_blobs_are_stored_once_and_an_erased_one_is_left_out(tmp_path: Path) -> None:
    r = replication(tmp_path, quorum=2)
    held, new, erased = b"held already", b"new here", b"erased here"
    [held_hash, erased_hash] = r.blobs.put_many([held, erased])
    assert r.blobs.delete(erased_hash)
    announced: list[bytes] = []
    r.stored = announced.extend  # type: ignore[method-assign]
    pushed = [held, new, erased, new]
    r._on_data(SimpleNamespace(key=P1), {"blobs": pushed})  # type: ignore[arg-type]
    await asyncio.wait_for(asyncio.gather(*r._tasks), 5)
    new_hash = crypto.sha256(new)
    assert r.blobs.has(new_hash) and r.blobs.read_small(new_hash) == new
    assert not r.blobs.has(erased_hash) and r.blobs.erased(erased_hash)
    assert announced == [new_hash]  # neither the blob held already nor the erased one
    assert r.count(new_hash) == 2 and r.count(held_hash) == 2  # this node and the pusher
    assert r._incoming == set()
    # The store took the new blob once: pushing it again changes nothing.
    before = r.blobs.info(new_hash)
    r._on_data(SimpleNamespace(key=P2), {"blobs": [new]})  # type: ignore[arg-type]
    await asyncio.wait_for(asyncio.gather(*r._tasks), 5)
    assert r.blobs.info(new_hash) == before and r.count(new_hash) == 3


async def test_a_missing_blob_erased_since_is_no_longer_asked_for(tmp_path: Path) -> None:
    r = replication(tmp_path, quorum=2)
    erased, wanted = b"erased meanwhile", b"still wanted"
    [erased_hash] = r.blobs.put_many([erased])
    assert r.blobs.delete(erased_hash)
    wanted_hash = crypto.sha256(wanted)
    r.missing.update([erased_hash, wanted_hash])
    r.kv.write({b"Q" + erased_hash: b"", b"Q" + wanted_hash: b""})  # as a commit lists them
    asked: list[list[bytes]] = []
    r.switch.send = lambda peer, kind, hashes: asked.append(hashes)  # type: ignore[attr-defined]
    r.switch.peers = {P1: SimpleNamespace(key=P1)}  # type: ignore[attr-defined]
    # A peer pushing the erased blob's bytes neither stores them nor sets off a request.
    r._on_data(SimpleNamespace(key=P1), {"blobs": [erased]})  # type: ignore[arg-type]
    await asyncio.wait_for(asyncio.gather(*r._tasks), 5)
    assert asked == [] and not r.blobs.has(erased_hash)
    r._ask_for_missing()
    assert asked == [[wanted_hash]]
    assert r.missing == {wanted_hash}
    assert [k for k, _ in r.kv.scan(b"Q")] == [b"Q" + wanted_hash]  # kept across restarts


async def test_news_of_a_blob_fetches_only_what_is_wanted_and_lacking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replicating node fetches an announced blob it lacks, once; not one it holds (in
    the recent-blob memory or only on disk), nor one on its way in, nor an erased one. A
    node that does not replicate fetches only blobs of committed records it lacks."""
    monkeypatch.setattr(store_module, "HELD_IN_MEMORY", 1)
    monkeypatch.setattr(store_module, "SIZES_IN_MEMORY", 1)
    r = replication(tmp_path, quorum=2)
    [erased] = r.blobs.put_many([b"erased"])
    assert r.blobs.delete(erased)
    # Only the newest stays in memory: the other is found in the database.
    [on_disk, recent] = r.blobs.put_many([b"stored a while ago", b"stored just now"])
    incoming, lacking, missing = (crypto.sha256(d) for d in (b"in", b"lacking", b"missing"))
    r._incoming.add(incoming)
    r.missing.add(missing)
    fetches: list[tuple[bytes, bytes]] = []
    r._schedule_fetch = lambda peer, blob: fetches.append((peer.key, blob))  # type: ignore[method-assign]
    everything = (on_disk, recent, erased, incoming, lacking, missing)
    announce(r, P1, *everything)
    assert fetches == [(P1, missing)]  # not replicating: only the committed record's blob
    r.replicate = True
    announce(r, P2, *everything)
    assert fetches == [(P1, missing), (P2, lacking), (P2, missing)]
    assert all(r.holders[blob] == {P1, P2} for blob in everything)


async def test_the_table_of_holders_stays_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replication_module, "MAX_TRACKED", 3)
    r = replication(tmp_path, quorum=2)
    blobs = [crypto.sha256(bytes([n])) for n in range(5)]
    announce(r, P1, *blobs)
    assert list(r.holders) == blobs[2:]  # the oldest news is forgotten first
    announce(r, P2, blobs[0])
    assert list(r.holders) == [*blobs[3:], blobs[0]] and r.holders[blobs[0]] == {P2}
