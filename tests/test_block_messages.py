"""Votes and proposals: their wire forms, signatures and checks."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from helpers_block import (
    BLOCK_ID,
    MAX,
    VALIDATORS,
    chain_of_two,
    header,
)
from helpers_core import CHAIN

from ehrnode.core import codec, crypto
from ehrnode.core.block import (
    PRECOMMIT,
    PREVOTE,
    Block,
    Proposal,
    Vote,
    sign_proposal,
    sign_vote,
)
from ehrnode.core.errors import InvalidBlock, InvalidEncoding

# --- votes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("block_id", [BLOCK_ID, None])
@pytest.mark.parametrize("vote_type", [PREVOTE, PRECOMMIT])
def test_vote_wire_round_trip(vote_type: int, block_id: bytes | None) -> None:
    vote = sign_vote(VALIDATORS[1], CHAIN, vote_type, 9, 2, block_id)
    assert vote.verify(CHAIN)
    again = Vote.from_wire(codec.decode(codec.encode(vote.to_wire())))
    assert again == vote
    assert again.verify(CHAIN)


def test_vote_signature_covers_every_field() -> None:
    vote = sign_vote(VALIDATORS[1], CHAIN, PREVOTE, 9, 2, BLOCK_ID)
    assert not vote.verify("ehr-other")
    for change in (
        {"type": PRECOMMIT},
        {"height": 10},
        {"round": 3},
        {"block": None},
        {"block": crypto.sha256(b"x")},
        {"validator": VALIDATORS[2].public_key},
    ):
        assert not dataclasses.replace(vote, **change).verify(CHAIN), change


def test_vote_signature_is_not_a_proposal_signature() -> None:
    vote = sign_vote(VALIDATORS[1], CHAIN, PREVOTE, 9, 2, BLOCK_ID)
    message = codec.encode(
        {"chain": CHAIN, "height": 9, "round": 2, "pol_round": -1, "block": BLOCK_ID}
    )
    assert not crypto.verify(vote.validator, crypto.DOMAIN_PROPOSAL, message, vote.sig)


@pytest.mark.parametrize(
    "change",
    [
        {"type": 3},
        {"type": 0},
        {"type": True},  # msgpack true == 1 in Python, but is another byte form
        {"height": 0},
        {"round": -1},
        {"round": 1 << 63},
        {"block": b"short"},
        {"validator": b"short"},
        {"sig": bytes(63)},
        {"sig": "x" * 64},
        {"extra": 1},
    ],
)
def test_vote_from_wire_refuses(change: dict[str, Any]) -> None:
    wire = {**sign_vote(VALIDATORS[1], CHAIN, PREVOTE, 9, 2, BLOCK_ID).to_wire(), **change}
    with pytest.raises(InvalidEncoding):
        Vote.from_wire(wire)


def test_vote_from_wire_needs_every_field() -> None:
    wire = sign_vote(VALIDATORS[1], CHAIN, PREVOTE, 9, 2, BLOCK_ID).to_wire()
    del wire["block"]
    with pytest.raises(InvalidEncoding):
        Vote.from_wire(wire)
    with pytest.raises(InvalidEncoding):
        Vote.from_wire([1, 2])


# --- proposals -------------------------------------------------------------------------------


@pytest.mark.parametrize("pol_round", [-1, 0, 2])
def test_proposal_wire_round_trip(pol_round: int) -> None:
    _, _, second = chain_of_two()
    proposal = sign_proposal(VALIDATORS[2], CHAIN, 3, pol_round, second)
    assert proposal.height == 2
    assert proposal.verify(CHAIN)
    again = Proposal.from_wire(codec.decode(codec.encode(proposal.to_wire())), max_block_bytes=MAX)
    assert again == proposal
    assert again.block.raw == second.raw
    assert again.verify(CHAIN)


def test_proposal_signature_covers_every_field() -> None:
    _, _, second = chain_of_two()
    proposal = sign_proposal(VALIDATORS[2], CHAIN, 3, -1, second)
    first = Block.build(header(1, []), [], None)
    assert not proposal.verify("ehr-other")
    for change in (
        {"round": 4},
        {"pol_round": 0},
        {"height": 3},
        {"block": first},
        {"proposer": VALIDATORS[1].public_key},
    ):
        assert not dataclasses.replace(proposal, **change).verify(CHAIN), change


def _proposal_wire(**change: Any) -> dict[str, Any]:
    _, _, second = chain_of_two()
    return {**sign_proposal(VALIDATORS[2], CHAIN, 3, -1, second).to_wire(), **change}


@pytest.mark.parametrize(
    "change",
    [
        {"pol_round": 3},
        {"pol_round": -2},
        {"pol_round": True},
        {"height": 3},
        {"height": 0},
        {"round": -1},
        {"proposer": b"x"},
        {"sig": bytes(10)},
        {"block": "text"},
        {"extra": 1},
    ],
)
def test_proposal_from_wire_refuses(change: dict[str, Any]) -> None:
    with pytest.raises(InvalidEncoding):
        Proposal.from_wire(_proposal_wire(**change), max_block_bytes=MAX)


def test_proposal_with_a_bad_block_is_an_invalid_block() -> None:
    _, _, second = chain_of_two()
    with pytest.raises(InvalidBlock):
        Proposal.from_wire(_proposal_wire(block=b"\xc1"), max_block_bytes=MAX)
    with pytest.raises(InvalidBlock):
        Proposal.from_wire(_proposal_wire(), max_block_bytes=len(second.raw) - 1)
