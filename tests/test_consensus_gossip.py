"""Which consensus messages reach the driver: one of the engine's height once however often
peers relay it, one of the next height every time, one of another height not at all and
not remembered, so that a node that was behind (a validator voted in while it synced the
chain) takes the round's messages when they are relayed again."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from ehrnode.core import crypto
from ehrnode.core.block import PREVOTE, Vote, sign_vote
from ehrnode.core.errors import PeerError
from ehrnode.p2p.gossip import ConsensusGossip


class _Driver:
    def __init__(self, height: int) -> None:
        self.engine = SimpleNamespace(height=height)
        self.votes: list[Vote] = []

    def submit_vote(self, vote: Vote) -> None:
        self.votes.append(vote)


def _gossip(height: int) -> tuple[ConsensusGossip, _Driver]:
    switch = SimpleNamespace(handlers={})
    gossip = ConsensusGossip(switch, 1 << 20)  # type: ignore[arg-type]
    driver = _Driver(height)
    gossip.driver = driver  # type: ignore[assignment]
    return gossip, driver


VALIDATOR = crypto.Identity.generate()


def vote_at(height: int) -> dict[str, Any]:
    return {"vote": sign_vote(VALIDATOR, "ehr-g", PREVOTE, height, 0, b"\x01" * 32).to_wire()}


def test_a_vote_of_a_later_height_reaches_the_driver_once_the_engine_is_there() -> None:
    gossip, driver = _gossip(height=1)  # still syncing the blocks before height 5
    relayed = gossip.switch.handlers["vote"]
    ahead = vote_at(5)
    relayed(None, ahead)
    assert driver.votes == []
    driver.engine.height = 5
    relayed(None, ahead)
    relayed(None, ahead)  # relayed once more: its signature is checked once
    assert [v.to_wire() for v in driver.votes] == [ahead["vote"]]


def test_a_vote_of_the_next_height_reaches_the_driver_each_time_and_an_old_one_never() -> None:
    gossip, driver = _gossip(height=7)
    relayed = gossip.switch.handlers["vote"]
    relayed(None, vote_at(8))
    relayed(None, vote_at(8))  # the engine keeps a few of these; a dropped copy needs this
    relayed(None, vote_at(6))
    assert [v.height for v in driver.votes] == [8, 8]


def test_a_malformed_vote_disconnects_its_peer_whatever_its_height() -> None:
    gossip, driver = _gossip(height=7)
    bad = vote_at(100)
    bad["vote"]["type"] = 9
    with pytest.raises(PeerError, match="malformed vote"):
        gossip.switch.handlers["vote"](None, bad)
    assert driver.votes == []
