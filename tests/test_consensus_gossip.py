"""Which consensus messages reach the driver: one of the engine's height once however often
peers relay it, one of the next height every time, one of another height not at all and
not remembered, so that a node that was behind (a validator voted in while it synced the
chain) takes the round's messages when they are relayed again. And which peers a proposal
(a whole block) is sent to again."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest

from ehrnode.consensus.sim_node import SimNode
from ehrnode.consensus.validators import ValidatorSet
from ehrnode.core import crypto
from ehrnode.core.block import PREVOTE, Proposal, Vote, sign_proposal, sign_vote
from ehrnode.core.errors import PeerError
from ehrnode.p2p.gossip import ConsensusGossip


class _Driver:
    def __init__(self, height: int) -> None:
        self.engine = SimpleNamespace(height=height, vals=ValidatorSet({VALIDATOR.public_key: 1}))
        self.chain = SimpleNamespace(genesis=SimpleNamespace(chain_id="ehr-g"))
        self.votes: list[Vote] = []
        self.proposals: list[Proposal] = []

    def submit_vote(self, vote: Vote) -> None:
        self.votes.append(vote)

    def submit_proposal(self, proposal: Proposal) -> None:
        self.proposals.append(proposal)


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


class _Link:
    """A peer's link: a new one after a reconnection."""

    def __init__(self, key: bytes, height: int) -> None:
        self.key = key
        self.height = height


class _Switch:
    """Linked peers, and what each broadcast would skip."""

    def __init__(self, heights: dict[bytes, int]) -> None:
        self.handlers: dict[str, Any] = {}
        self.peers = {key: _Link(key, h) for key, h in heights.items()}
        self.sent_to: list[set[bytes]] = []

    def broadcast(self, kind: str, *, exclude: Any = (), **fields: Any) -> None:
        assert kind == "proposal"
        self.sent_to.append({key for key in self.peers if key not in exclude})


def _proposal(round_: int) -> Any:
    vals = ValidatorSet({VALIDATOR.public_key: 1})
    block = SimNode(0, VALIDATOR).build(random.Random(round_), 0.0, vals)
    return sign_proposal(VALIDATOR, "ehr-g", round_, -1, block)


def test_a_proposal_goes_over_a_link_once_unless_its_peer_was_too_far_behind_to_take_it() -> None:
    a, b, behind, author = b"a" * 32, b"b" * 32, b"c" * 32, b"d" * 32
    switch = _Switch({a: 0, b: 0, behind: 0, author: 0})
    gossip = ConsensusGossip(switch, 1 << 20)  # type: ignore[arg-type]
    proposal = _proposal(0)
    height = proposal.height
    switch.peers[a].height = switch.peers[b].height = height - 1  # at the proposal's height
    switch.peers[behind].height = height - 2  # its engine drops it: a block behind
    gossip.broadcast_proposal(proposal, exclude={author})
    assert switch.sent_to == [{a, b, behind}]

    switch.peers[b] = _Link(b, height - 1)  # b's link broke: a new one
    gossip.broadcast_proposal(proposal, exclude={author})  # the rebroadcast timer
    assert switch.sent_to[1] == {b, behind}

    switch.peers[behind].height = height - 1  # caught up: this copy is taken
    gossip.broadcast_proposal(proposal, exclude={author})
    gossip.broadcast_proposal(proposal, exclude={author})
    assert switch.sent_to[2:] == [{behind}, set()]

    gossip.broadcast_proposal(_proposal(1), exclude={author})  # another round's
    assert switch.sent_to[4] == {a, b, behind}


def test_a_proposal_of_the_engines_height_reaches_the_driver_once_however_often_relayed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proposal = _proposal(0)
    gossip, driver = _gossip(height=proposal.height)
    relayed = gossip.switch.handlers["proposal"]
    decoded: list[bytes] = []
    from_wire = Proposal.from_wire

    def counting(obj: Any, *, max_block_bytes: int) -> Proposal:
        decoded.append(obj["sig"])
        return from_wire(obj, max_block_bytes=max_block_bytes)

    monkeypatch.setattr(Proposal, "from_wire", counting)
    for _ in range(3):
        relayed(None, {"proposal": proposal.to_wire()})
    assert driver.proposals == [proposal]
    assert decoded == [proposal.sig]  # the copies were dropped before their block was decoded
    other = _proposal(1)  # another round's: taken too
    relayed(None, {"proposal": other.to_wire()})
    assert driver.proposals == [proposal, other]


def test_a_copy_that_reuses_a_proposals_signature_over_another_block_does_not_stop_it() -> None:
    genuine, other = _proposal(0), _proposal(1)
    gossip, driver = _gossip(height=genuine.height)
    relayed = gossip.switch.handlers["proposal"]
    forged = {**other.to_wire(), "round": 0, "sig": genuine.sig}
    with pytest.raises(PeerError, match="signature"):  # first, and its sender is cut off
        relayed(None, {"proposal": forged})
    relayed(None, {"proposal": genuine.to_wire()})
    relayed(None, {"proposal": genuine.to_wire()})
    assert driver.proposals == [genuine]


def test_only_the_first_proposal_of_a_round_from_its_proposer_is_decoded() -> None:
    first, second = _proposal(0), _proposal(1)
    again = sign_proposal(VALIDATOR, "ehr-g", 0, -1, second.block)  # round 0, another block
    gossip, driver = _gossip(height=first.height)
    relayed = gossip.switch.handlers["proposal"]
    relayed(None, {"proposal": first.to_wire()})
    relayed(None, {"proposal": again.to_wire()})  # the engine keeps a round's first only
    assert driver.proposals == [first]
    stranger = crypto.Identity.generate()
    for round_ in (0, 2, 2):  # round 2's proposer sent none yet: the driver drops these
        relayed(
            None, {"proposal": sign_proposal(stranger, "ehr-g", round_, -1, second.block).to_wire()}
        )
    assert [(p.round, p.proposer) for p in driver.proposals[1:]] == [(2, stranger.public_key)] * 2
    relayed(None, {"proposal": sign_proposal(VALIDATOR, "ehr-g", 2, -1, second.block).to_wire()})
    assert driver.proposals[-1].proposer == VALIDATOR.public_key


def test_a_proposal_of_the_next_height_reaches_the_driver_each_time_and_an_old_one_never() -> None:
    proposal = _proposal(0)
    gossip, driver = _gossip(height=proposal.height - 1)
    relayed = gossip.switch.handlers["proposal"]
    relayed(None, {"proposal": proposal.to_wire()})
    relayed(None, {"proposal": proposal.to_wire()})
    assert driver.proposals == [proposal, proposal]
    driver.engine.height = proposal.height + 1
    relayed(None, {"proposal": proposal.to_wire()})
    assert len(driver.proposals) == 2
    driver.engine.height = proposal.height  # remembered from before? no: taken once now
    relayed(None, {"proposal": proposal.to_wire()})
    relayed(None, {"proposal": proposal.to_wire()})
    assert len(driver.proposals) == 3
