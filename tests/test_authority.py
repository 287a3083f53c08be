"""Validator-set changes and double-vote evidence (core.authority), through the state
machine as a block applies them."""

from __future__ import annotations

import struct

from helpers_core import CHAIN, World, identity

from ehrnode.core import authority, state
from ehrnode.core.block import PRECOMMIT, PREVOTE, sign_vote


def vals(world: World) -> dict[bytes, int]:
    return state.validators(world.overlay)


def finish(world: World) -> None:
    """End the current block the way execute_block does, then commit it."""
    state.finish_block(world.overlay, world.ctx)
    world.commit()


def test_a_change_needs_more_than_two_thirds_and_applies_two_blocks_later() -> None:
    world = World(4)
    newcomer = identity(77)
    v = world.validators
    body = {"action": "add", "key": newcomer.public_key, "power": 1}
    world.do(v[0], "validator", body)
    world.do(v[1], "validator", body)
    assert newcomer.public_key not in vals(world)  # 2 of 4 is not a quorum
    world.do(v[2], "validator", body)  # 3 of 4: quorum reached in block H
    quorum_height = world.height
    finish(world)  # end of H: the set voting on H+1 was already fixed
    assert newcomer.public_key not in vals(world)
    assert world.height == quorum_height + 1
    finish(world)  # end of H+1: the new set votes from H+2 on
    assert vals(world)[newcomer.public_key] == 1
    history = state.load(world.overlay, authority.P_FROM + struct.pack(">Q", quorum_height + 2))
    assert authority.decode_set(history) == vals(world)


def test_only_validators_vote_and_only_once() -> None:
    world = World(4)
    outsider = world.patient(5)
    body = {"action": "remove", "key": world.validators[3].public_key}
    assert world.rejects(world.sign(outsider, "validator", body)) == "not_validator"
    world.do(world.validators[0], "validator", body)
    assert world.rejects(world.sign(world.validators[0], "validator", body)) == "already_voted"


def test_removal_rules() -> None:
    world = World(1)
    only = world.validators[0]
    body = {"action": "remove", "key": only.public_key}
    assert world.rejects(world.sign(only, "validator", body)) == "last_validator"
    stranger = {"action": "remove", "key": identity(9).public_key}
    assert world.rejects(world.sign(only, "validator", stranger)) == "not_validator"
    add_without_power = {"action": "add", "key": identity(9).public_key}
    assert world.rejects(world.sign(only, "validator", add_without_power)) == "malformed_body"


def test_a_removed_validator_leaves_the_set() -> None:
    world = World(4)
    gone = world.validators[3].public_key
    for voter in world.validators[:3]:
        world.do(voter, "validator", {"action": "remove", "key": gone})
    finish(world)
    finish(world)
    assert gone not in vals(world) and len(vals(world)) == 3


def _double_vote(world: World, who: int = 3, vote_type: int = PREVOTE) -> dict[str, object]:
    cheat = world.validators[who]
    a = sign_vote(cheat, CHAIN, vote_type, 1, 0, b"\x01" * 32)
    b = sign_vote(cheat, CHAIN, vote_type, 1, 0, b"\x02" * 32)
    return {"a": a.to_wire(), "b": b.to_wire()}


def test_evidence_of_a_double_vote_is_recorded_once() -> None:
    world = World(4)
    reporter = world.validators[0]
    body = _double_vote(world)
    world.do(reporter, "evidence", body)
    key = authority.P_EVIDENCE + world.validators[3].public_key + struct.pack(">QIB", 1, 0, PREVOTE)
    assert state.load(world.overlay, key)["reporter"] == reporter.public_key
    assert world.rejects(world.sign(world.validators[1], "evidence", body)) == "duplicate"


def test_evidence_that_proves_nothing_is_refused() -> None:
    world = World(4)
    reporter = world.validators[0]
    cheat = world.validators[3]
    same = sign_vote(cheat, CHAIN, PREVOTE, 1, 0, b"\x01" * 32)
    body = {"a": same.to_wire(), "b": same.to_wire()}
    assert world.rejects(world.sign(reporter, "evidence", body)) == "not_evidence"
    other_type = sign_vote(cheat, CHAIN, PRECOMMIT, 1, 0, b"\x02" * 32)
    body = {"a": same.to_wire(), "b": other_type.to_wire()}
    assert world.rejects(world.sign(reporter, "evidence", body)) == "not_evidence"
    forged = _double_vote(world)
    forged_b = dict(forged["b"])  # type: ignore[call-overload]
    forged_b["sig"] = bytes(64)
    assert (
        world.rejects(world.sign(reporter, "evidence", {"a": forged["a"], "b": forged_b}))
        == "bad_signature"
    )
    outsider = identity(55)
    a = sign_vote(outsider, CHAIN, PREVOTE, 1, 0, b"\x01" * 32)
    b = sign_vote(outsider, CHAIN, PREVOTE, 1, 0, b"\x02" * 32)
    body = {"a": a.to_wire(), "b": b.to_wire()}
    assert world.rejects(world.sign(reporter, "evidence", body)) == "not_validator"
