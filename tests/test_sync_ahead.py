"""Block sync keeps the node executing while it writes: while a block is written, the next
one is decoded and executed on top of it (``Executor.execute_ahead``), whether it is the
next item of the same answer or, after an answer's last block, the first item of the next
answer, once that has arrived. (That the execution ahead is the right one, and serves only
its own block, is tests/test_execute_ahead.py's.)"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from ehrnode.p2p import sync


class _Driver:
    """Applies a certified block as the driver does, in two steps: executed (the future
    set), then written (the head moved), with the write held until the test lets it go."""

    def __init__(self, chain: Any) -> None:
        self.chain = chain
        self.listeners: list[Any] = []
        self.ahead: list[tuple[int, int]] = []  # (block, parent) heights executed ahead
        self.executor = SimpleNamespace(execute_ahead=self._execute_ahead)

    def _execute_ahead(self, block: Any, parent: Any) -> None:
        self.ahead.append((block.header.height, parent.header.height))

    async def apply_certified(self, block: Any, cert: Any, executed: Any) -> None:
        executed.set_result(None)
        await asyncio.sleep(0)  # the write, on a worker thread: others run meanwhile
        self.chain.head.height = block.header.height


def _item(height: int) -> list[Any]:
    return [f"block {height}", f"cert {height}"]


@pytest.fixture
def node(monkeypatch: pytest.MonkeyPatch) -> tuple[sync.BlockSync, _Driver, list[int]]:
    """A BlockSync over stub blocks (items decode to objects with a height and an id)
    that records which heights were decoded."""
    decoded: list[int] = []

    def decode_item(item: Any, max_block: int) -> tuple[Any, Any]:
        height = int(item[0].split()[1])
        decoded.append(height)
        block = SimpleNamespace(header=SimpleNamespace(height=height), id=b"%d" % height)
        cert = SimpleNamespace(block=block.id, height=height, verify=lambda *a: None)
        return block, cert

    monkeypatch.setattr(sync, "_decode_item", decode_item)
    monkeypatch.setattr(sync, "state", SimpleNamespace(validators=lambda s: {}))
    chain = SimpleNamespace(
        head=SimpleNamespace(height=0, id=b"\x00" * 32),
        genesis=SimpleNamespace(params=SimpleNamespace(max_block_bytes=1 << 20), chain_id="c"),
        state=None,
    )
    switch = SimpleNamespace(handlers={}, on_connect=[], on_disconnect=[], peers={})
    driver = _Driver(chain)
    return sync.BlockSync(switch, chain, driver, 1 << 20), driver, decoded  # type: ignore[arg-type]


def _request(items: list[Any] | None) -> Any:
    future = asyncio.get_running_loop().create_future()
    if items is not None:
        future.set_result(items)
    return sync._Request(None, 0, future)  # type: ignore[arg-type]


async def test_the_next_answers_first_block_runs_ahead_while_the_last_one_is_written(
    node: tuple[sync.BlockSync, _Driver, list[int]],
) -> None:
    blocks, driver, decoded = node
    second = [_item(3), _item(4)]
    await blocks._apply([_item(1), _item(2)], _request(second))
    await blocks._apply(second, None)
    assert driver.chain.head.height == 4
    assert driver.ahead == [(2, 1), (3, 2), (4, 3)]  # every block after the first
    assert decoded == [1, 2, 3, 4]  # the carried block is not decoded again


async def test_an_answer_not_arrived_yet_is_decoded_and_run_in_its_own_turn(
    node: tuple[sync.BlockSync, _Driver, list[int]],
) -> None:
    """And a carried block serves only the answer it came from: an answer that does not
    begin with it (the request was asked again) is decoded afresh."""
    blocks, driver, decoded = node
    await blocks._apply([_item(1), _item(2)], _request(None))
    await blocks._apply([_item(3), _item(4)], None)
    assert driver.ahead == [(2, 1), (4, 3)]
    assert decoded == [1, 2, 3, 4]

    decoded.clear()
    await blocks._apply([_item(5)], _request([_item(6)]))
    await blocks._apply([_item(6), _item(7)], None)  # the same height, another answer
    assert decoded == [5, 6, 6, 7]
    assert driver.chain.head.height == 7
