"""What the engine keeps for the next height is bounded: only validators' messages, and a
few per validator (a proposal carries a whole block an outsider could otherwise pile up)."""

from __future__ import annotations

from ehrnode.consensus import engine as eng
from ehrnode.consensus.validators import ValidatorSet
from ehrnode.core.block import PREVOTE, sign_vote
from ehrnode.core.crypto import Identity

CHAIN = "ehr-test"


def started_engine() -> tuple[eng.Engine, list[Identity]]:
    validators = [Identity(bytes([k]) * 32) for k in range(1, 5)]
    engine = eng.Engine(validators[0].public_key, lambda block: True)
    engine.start_height(1, ValidatorSet({v.public_key: 1 for v in validators}), has_txs=False)
    engine.height = 2  # as after committing block 1 (so height 3 is "next")
    return engine, validators


def test_next_height_votes_of_outsiders_are_not_kept() -> None:
    engine, _ = started_engine()
    outsider = Identity(bytes([99]) * 32)
    for round_ in range(50):
        engine.on_vote(sign_vote(outsider, CHAIN, PREVOTE, 3, round_, None))
    assert engine._future == []


def test_next_height_votes_are_kept_a_few_per_validator() -> None:
    engine, validators = started_engine()
    for round_ in range(100):
        engine.on_vote(sign_vote(validators[1], CHAIN, PREVOTE, 3, round_, None))
    assert len(engine._future) == eng.MAX_FUTURE_VOTES
