"""Backpressure on clients: while the mempool holds more than ``mempool.high_water``
transactions, a client's submission waits for a block, and gives up with 503
``mempool_busy`` (admitting nothing) when none comes in time."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import aiohttp
import msgpack
import pytest

from ehrnode import config as cfg
from ehrnode.core import crypto, tx
from ehrnode.core.errors import Unavailable
from ehrnode.node import Node
from ehrnode.rpc.limits import Backlog
from ehrnode.testing import cluster_homes, wait_for

MSGPACK = {"Content-Type": "application/msgpack"}


async def settle() -> None:
    """Let every task that is ready run (event-loop turns, not time)."""
    for _ in range(20):
        await asyncio.sleep(0)


class Pool:
    """Stands in for the mempool's count."""

    def __init__(self, pending: int) -> None:
        self.pending = pending

    def __len__(self) -> int:
        return self.pending


async def test_below_the_mark_a_request_goes_straight_in_and_counts_while_it_admits() -> None:
    pool = Pool(5)
    backlog = Backlog(lambda: len(pool), high_water=10)
    async with backlog.room(5, timeout=1.0):
        assert backlog.admitting == 5
        assert backlog.full() is False  # 5 pending + 5 on their way in: at the mark
        async with backlog.room(1, timeout=0.05):  # at the mark, not above it
            assert backlog.full() is True
    assert backlog.admitting == 0 and backlog.waiting == 0


async def test_above_the_mark_a_request_waits_for_a_block_that_takes_the_backlog_down() -> None:
    pool = Pool(12)
    backlog = Backlog(lambda: len(pool), high_water=10)
    entered = asyncio.Event()

    async def client() -> None:
        async with backlog.room(3, timeout=10.0):
            entered.set()

    task = asyncio.create_task(client())
    await wait_for(lambda: backlog.waiting == 1, what="the request to be held")
    backlog.on_commit(None)  # a block, but the backlog is still above the mark
    await settle()
    assert not entered.is_set() and backlog.waiting == 1
    pool.pending = 4
    backlog.on_commit(None)
    await asyncio.wait_for(task, 5)
    assert entered.is_set() and backlog.waiting == 0 and backlog.admitting == 0


async def test_held_requests_go_in_in_the_order_they_came_while_there_is_room() -> None:
    pool = Pool(20)
    backlog = Backlog(lambda: len(pool), high_water=10)
    order: list[int] = []
    release = asyncio.Event()

    async def client(k: int) -> None:
        async with backlog.room(8, timeout=10.0):
            order.append(k)
            await release.wait()  # still admitting: counts against the mark

    tasks = [asyncio.create_task(client(k)) for k in range(3)]
    await wait_for(lambda: backlog.waiting == 3, what="three held requests")
    pool.pending = 5
    backlog.on_commit(None)
    await wait_for(lambda: order == [0], what="the first request to go in")
    await settle()
    # 5 pending + 8 on their way in is above the mark: the others wait for another block.
    assert order == [0] and backlog.waiting == 2
    release.set()

    def block_and_check() -> bool:
        backlog.on_commit(None)
        return all(t.done() for t in tasks)

    await wait_for(block_and_check, what="the held requests to go in")
    assert order == [0, 1, 2]
    await asyncio.gather(*tasks)


async def test_no_block_in_time_is_503_mempool_busy() -> None:
    backlog = Backlog(lambda: 11, high_water=10)
    with pytest.raises(Unavailable) as caught:
        async with backlog.room(1, timeout=0.05):
            pytest.fail("entered above the mark")
    assert caught.value.code == "mempool_busy" and caught.value.http_status == 503
    assert backlog.waiting == 0 and backlog.admitting == 0


async def test_a_mark_of_zero_never_holds_a_request() -> None:
    backlog = Backlog(lambda: 10**9, high_water=0)
    async with backlog.room(100, timeout=0.0):
        assert backlog.admitting == 100


def test_the_mark_is_a_setting_with_a_default() -> None:
    home = Path("/nonexistent")
    assert cfg.parse("", home).mempool.high_water == cfg.MempoolConfig().high_water > 0
    assert cfg.parse("[mempool]\nhigh_water = 0\n", home).mempool.high_water == 0
    with pytest.raises(cfg.ConfigError, match="high_water"):
        cfg.parse('[mempool]\nhigh_water = "lots"\n', home)


async def test_a_node_that_cannot_commit_holds_clients_then_refuses_and_admits_nothing(
    tmp_path: Path,
) -> None:
    # One validator of four: no quorum, so no block ever takes its backlog down.
    home = cluster_homes(tmp_path, 4)[0]
    config = cfg.load(home)
    config = replace(
        config,
        mempool=replace(config.mempool, high_water=2),
        rpc=replace(config.rpc, commit_timeout_s=0.5),
    )
    node = Node(config)
    await node.start()
    try:
        chain = node.genesis.chain_id
        people = [crypto.Identity.generate() for _ in range(5)]
        raws = [tx.make(p, chain, "register", 1, {"role": "patient"}).raw for p in people]
        async with aiohttp.ClientSession(base_url=node.rpc_url) as http:
            async with http.post(
                "/v1/txs/batch?mode=sync", data=msgpack.packb(raws[:3]), headers=MSGPACK
            ) as response:
                assert response.status == 200
                body = await response.json()
            assert [r["status"] for r in body["results"]] == ["pending"] * 3
            assert len(node.mempool) == 3  # above the mark now

            async def status() -> dict[str, int]:
                async with http.get("/v1/status") as response:
                    result: dict[str, int] = await response.json()
                    return result

            held = asyncio.create_task(
                http.post("/v1/txs/batch?mode=sync", data=msgpack.packb(raws[3:]), headers=MSGPACK)
            )
            await wait_for(
                lambda: node.api.backlog.waiting == 1, what="the second batch to be held"
            )
            assert (await status())["clients_waiting"] == 1
            async with await held as response:
                assert response.status == 503
                error = (await response.json())["error"]
            assert error["code"] == "mempool_busy"
            async with http.post("/v1/txs?mode=sync", data=raws[4], headers=MSGPACK) as response:
                assert response.status == 503
            assert len(node.mempool) == 3
            assert all(tx.decode(r, verify_sig=False).id not in node.mempool for r in raws[3:])
            assert (await status())["clients_waiting"] == 0
    finally:
        await node.stop()
