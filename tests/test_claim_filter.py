"""The blob-claim filter (``store.claims``): once filled, a record's claim check that finds
no claim is answered from memory; a claim committed before the start, during the fill or
after it is always read from the database."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ehrnode.consensus.execution import block_context, make_block
from ehrnode.core import crypto, state
from ehrnode.core.block import PRECOMMIT, Certificate, sign_vote
from ehrnode.core.genesis import Genesis, ValidatorInfo
from ehrnode.core.layout import P_ACCT, P_BLOB
from ehrnode.node import Node
from ehrnode.store.chain import Chain
from ehrnode.store.claims import ClaimFilter
from ehrnode.store.db import LevelKV
from ehrnode.testing import wait_for

ME = crypto.Identity(b"\x07" * 32)
GENESIS = Genesis("claims", 1_700_000_000_000, (ValidatorInfo(ME.public_key, 1, "me"),))


class CountingKV:
    """A LevelKV that notes the keys read one at a time."""

    def __init__(self, path: Path) -> None:
        self.inner = LevelKV(path)
        self.read: list[bytes] = []

    def get(self, key: bytes) -> bytes | None:
        self.read.append(key)
        return self.inner.get(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Home:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.kv = CountingKV(root / "data")
        self.chain = Chain(self.kv, GENESIS)  # type: ignore[arg-type]

    def restart(self) -> None:
        self.kv.close()
        self.__init__(self.root)  # type: ignore[misc]

    def claim(self, *blobs: bytes) -> None:
        """Commit a block whose execution claims ``blobs`` (each for a made-up record)."""
        chain = self.chain
        head = chain.head
        ctx = block_context(chain, head.height + 1, GENESIS.genesis_time + head.height + 1)
        last = None if head.height == 0 else chain.certificate(head.height)
        block = make_block(chain, ctx, ME.public_key, [], chain.validators(), last)
        changes: dict[bytes, bytes | None] = {P_BLOB + b: b"record:" + b[:8] for b in blobs}
        execution = state.Execution(changes, state.digest_after(chain.state, changes, head.digest))
        vote = sign_vote(ME, GENESIS.chain_id, PRECOMMIT, ctx.height, 0, block.id)
        chain.commit(
            block, Certificate(ctx.height, 0, block.id, ((vote.validator, vote.sig),)), execution
        )


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    opened = Home(tmp_path)
    yield opened
    opened.kv.close()


def blob() -> bytes:
    return os.urandom(32)


def test_a_filled_filter_answers_a_missing_claim_without_the_database(home: Home) -> None:
    claimed = [blob() for _ in range(3)]
    home.claim(*claimed)
    home.restart()
    view, free = home.chain.state, blob()

    assert view.get(P_BLOB + free) is None  # not filled yet: asked of the database
    assert home.kv.read[-1].endswith(P_BLOB + free)
    filled = list(view.fill_claims(chunk=2))
    assert view.claims.ready and filled[-1] == 3

    home.kv.read.clear()
    assert [view.get(P_BLOB + b) for b in claimed] == [b"record:" + b[:8] for b in claimed]
    assert view.get(P_BLOB + free) is None
    assert view.get(P_ACCT + free) is None  # not a claim: always the database's to say
    assert len(home.kv.read) == 4 and not any(
        k.endswith(free) and P_BLOB in k for k in home.kv.read
    )


def test_a_claim_committed_while_the_filter_fills_or_after_is_found(home: Home) -> None:
    before = [blob() for _ in range(5)]
    home.claim(*before)
    home.restart()
    view = home.chain.state
    filling = view.fill_claims(chunk=1)
    next(filling)  # the scan has begun: its snapshot holds only ``before``
    during = blob()
    home.claim(during)
    assert not view.claims.ready
    for _ in filling:
        pass
    after = blob()
    home.claim(after)
    assert view.claims.ready
    for b in [*before, during, after]:
        assert view.get(P_BLOB + b) == b"record:" + b[:8]


def test_the_filter_holds_every_key_added_and_rules_out_almost_all_others() -> None:
    claims = ClaimFilter()
    added = [P_BLOB + blob() for _ in range(100_000)]
    for key in added:
        claims.add(key)
    assert all(claims.may_hold(key) for key in added) and claims.count == len(added)
    # At 100,000 claims about one lookup in a million is a false positive.
    others = sum(claims.may_hold(P_BLOB + blob()) for _ in range(20_000))
    assert others <= 5


def test_only_a_filled_filter_rules_out_and_only_blob_claims() -> None:
    claims = ClaimFilter()
    claims.add(P_BLOB + b"held")
    unclaimed = P_BLOB + blob()
    assert not claims.rules_out(unclaimed)  # not filled yet: every claim is read
    claims.ready = True
    assert claims.rules_out(unclaimed)
    assert not claims.rules_out(P_BLOB + b"held")
    assert not claims.rules_out(P_ACCT + blob())  # not a claim: the filter has no say


async def test_a_node_fills_its_filter_after_it_starts_serving(node: Node) -> None:
    await wait_for(lambda: node.chain.state.claims.ready, timeout=10.0)


async def test_block_sync_has_the_filter_filled_first_in_long_slices(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A catch-up waits for the filter (its records' claim checks then come from memory),
    and from then on the filling takes long slices between the event loop's turns, not
    one half-millisecond slice a turn, which during a catch-up lasted the whole of it."""
    await wait_for(lambda: node.chain.state.claims.ready, timeout=10.0)  # the start's own
    slices = 0

    def slow_fill(chunk: int = 256) -> Iterator[int]:
        nonlocal slices
        for _ in range(1000):
            time.sleep(0.0002)  # a slice's work
            slices += 1
            yield slices

    monkeypatch.setattr(node.chain.state, "fill_claims", slow_fill)
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    counting = asyncio.create_task(count_turns())
    try:
        node._filling = asyncio.create_task(node._fill_claims())
        await wait_for(lambda: slices >= 50, 5.0, "the filling under way")
        assert turns >= slices - 5  # a slice a turn so far
        turns_then, slices_then = turns, slices
        await node._claims_filled()
        assert node._filling.done() and slices == 1000
        assert turns - turns_then < (1000 - slices_then) / 10
    finally:
        counting.cancel()
