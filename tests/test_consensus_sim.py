"""The consensus engine under the seeded simulator, plus focused tests of the engine alone.

Each simulated seed is its own test id (``test_simulation[equivocate-17]``); a failure
prints the seed and the command that replays it with a trace. ``EHR_SIM_SEEDS=N`` runs N
seeds of every scenario instead of the defaults below.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from collections.abc import Callable
from typing import TypeVar

import pytest

from ehrnode.consensus import engine as eng, sim
from ehrnode.consensus.sim_faults import SCENARIOS, Scenario
from ehrnode.consensus.sim_node import CHAIN, SigningMemory, SimNode
from ehrnode.consensus.validators import ValidatorSet
from ehrnode.core.block import (
    PRECOMMIT,
    PREVOTE,
    Block,
    Certificate,
    Proposal,
    Vote,
    sign_proposal,
    sign_vote,
)
from ehrnode.core.crypto import Identity

A = TypeVar("A", bound=eng.Action)
DEFAULT_SEEDS = {"lossy": 300, "partition-crash": 300, "equivocate": 250, "faulty7": 150}


def _seeds(name: str) -> int:
    wanted = os.environ.get("EHR_SIM_SEEDS")
    return int(wanted) if wanted else DEFAULT_SEEDS[name]


# --- the simulation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scenario", "seed"),
    [
        pytest.param(name, seed, id=f"{name}-{seed}")
        for name in DEFAULT_SEEDS
        for seed in range(_seeds(name))
    ],
)
def test_simulation(scenario: str, seed: int) -> None:
    # run() itself raises on a broken agreement, validity, signing or liveness check.
    result = sim.run(seed, scenario)
    assert result.targets.keys() == set(result.honest)
    for node in result.honest:
        assert result.decided[node] >= result.targets[node]
    assert len(result.honest) >= 2 * SCENARIOS[scenario].validators // 3 + 1


def test_every_scenario_is_covered_by_enough_seeds() -> None:
    assert set(DEFAULT_SEEDS) == set(SCENARIOS)
    assert sum(DEFAULT_SEEDS.values()) >= 500
    assert {SCENARIOS[name].validators for name in DEFAULT_SEEDS} == {4, 7}


def test_a_seed_replays_exactly() -> None:
    first = sim.run(11, "faulty7", trace=True)
    again = sim.run(11, "faulty7", trace=True)
    other = sim.run(12, "faulty7", trace=True)
    assert first.trace == again.trace
    assert (first.decided, first.time, first.events) == (again.decided, again.time, again.events)
    assert first.trace != other.trace


def test_the_equivocator_is_caught_and_only_it() -> None:
    results = [sim.run(seed, "equivocate") for seed in range(6)]
    # The simulator fails the run if evidence ever names an honest validator.
    assert sum(r.evidence for r in results) > 0


def test_a_run_that_cannot_be_live_fails_with_its_replay_command() -> None:
    two_dead = Scenario("two-dead", 4, dead=2, gst=2.0, liveness_bound=10.0)
    with pytest.raises(AssertionError) as failure:
        sim.Simulation(5, two_dead).run()
    message = str(failure.value)
    assert "liveness" in message
    assert "seed=5" in message
    assert "python -m ehrnode.consensus.sim --seed 5 --validators 4 --scenario two-dead" in message


def test_an_engine_that_decides_on_a_third_of_the_votes_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ValidatorSet, "is_quorum", ValidatorSet.is_one_third)
    with pytest.raises(AssertionError, match=r"seed=3 .*\n.*replay: python -m"):
        sim.run(3, "lossy")


def test_conflicting_signatures_and_decisions_are_reported() -> None:
    simulation = sim.Simulation(0, SCENARIOS["lossy"])
    node = simulation.nodes[0]
    one = sign_vote(node.identity, CHAIN, PREVOTE, 1, 0, b"\x01" * 32)
    two = sign_vote(node.identity, CHAIN, PREVOTE, 1, 0, None)
    checks = simulation.checks
    checks.sent(0, node.key, one, honest=True)
    checks.sent(0, node.key, one, honest=True)  # sending the same message again is fine
    with pytest.raises(AssertionError, match=r"signed two different messages.*\n.*seed=0"):
        checks.sent(0, node.key, two, honest=True)
    block = node.build(random.Random(0), 0.0, simulation.vals)
    with pytest.raises(AssertionError, match="validity"):
        checks.decision(0, 1, block, _certificate_stub(block))
    checks.sent(0, node.key, sign_proposal(node.identity, CHAIN, 0, -1, block), honest=True)
    with pytest.raises(AssertionError, match="does not verify"):
        checks.decision(0, 1, block, _certificate_stub(block))
    other = node.build(random.Random(1), 0.0, simulation.vals)
    with pytest.raises(AssertionError, match="agreement"):
        checks.decision(1, 1, other, _certificate_stub(other))


def test_the_replay_command_prints_a_trace() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ehrnode.consensus.sim", "--seed", "4", "--scenario", "lossy"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"n\d sends proposal h1 r0 [0-9a-f]{8} pol -1", done.stdout)
    assert "decides h1" in done.stdout
    assert done.stdout.rstrip().splitlines()[-1].startswith("ok: seed 4 lossy")


def test_signing_memory_behaves_like_the_driver_record() -> None:
    me = Identity(b"\x09" * 32)
    memory = SigningMemory()
    vote = sign_vote(me, CHAIN, PREVOTE, 3, 1, b"\x01" * 32)
    assert memory.check(3, 1, PREVOTE, b"\x01" * 32) is True
    memory.save(vote, None)
    assert memory.check(3, 1, PREVOTE, b"\x01" * 32) == vote  # the same again: resend it
    assert memory.check(3, 1, PREVOTE, None) is False
    assert memory.check(3, 0, PRECOMMIT, None) is False
    assert memory.check(3, 1, PRECOMMIT, None) is True
    assert memory.restored(4) is None
    restored = memory.restored(3)
    assert restored is not None
    assert (restored.round, restored.step, restored.messages) == (1, PREVOTE, (vote,))


# --- the engine alone -------------------------------------------------------------------

KEYS = sorted((Identity(bytes([i]) * 32) for i in range(1, 5)), key=lambda i: i.public_key)
VALS = ValidatorSet({identity.public_key: 1 for identity in KEYS})


def _proposer(height: int, round_: int) -> Identity:
    return next(i for i in KEYS if i.public_key == VALS.proposer(height, round_))


def _others(me: Identity) -> list[Identity]:
    return [i for i in KEYS if i != me]


def _block(tag: int, proposer: Identity | None = None) -> Block:
    return SimNode(0, proposer or KEYS[0]).build(random.Random(tag), 0.0, VALS)


def _certificate_stub(block: Block) -> Certificate:
    return Certificate(block.header.height, 0, block.id, ())


class Driver:
    """Plays the driver for one engine: signs what it asks and hands the result back."""

    def __init__(self, me: Identity, vals: ValidatorSet = VALS) -> None:
        self.me = me
        self.engine = eng.Engine(me.public_key, lambda block: True)
        self.vals = vals

    def do(self, actions: list[eng.Action]) -> list[eng.Action]:
        """Every action, in order, including those its signed messages led to."""
        seen: list[eng.Action] = []
        pending = list(actions)
        while pending:
            action = pending.pop(0)
            seen.append(action)
            if isinstance(action, eng.SignProposal):
                proposal = sign_proposal(
                    self.me, CHAIN, action.round, action.pol_round, action.block
                )
                pending += self.engine.on_proposal(proposal)
            elif isinstance(action, eng.SignVote):
                vote = sign_vote(
                    self.me, CHAIN, action.type, action.height, action.round, action.block_id
                )
                pending += self.engine.on_vote(vote)
        return seen

    def start(self, height: int = 1, *, has_txs: bool = True) -> list[eng.Action]:
        return self.do(self.engine.start_height(height, self.vals, has_txs=has_txs))

    def votes(
        self, vote_type: int, round_: int, block_id: bytes | None, voters: list[Identity]
    ) -> list[eng.Action]:
        out: list[eng.Action] = []
        for voter in voters:
            vote = sign_vote(voter, CHAIN, vote_type, 1, round_, block_id)
            out += self.do(self.engine.on_vote(vote))
        return out

    def proposal(self, round_: int, block: Block, pol_round: int = -1) -> list[eng.Action]:
        signed = sign_proposal(_proposer(1, round_), CHAIN, round_, pol_round, block)
        return self.do(self.engine.on_proposal(signed))

    def timeout(self, kind: str, round_: int) -> list[eng.Action]:
        return self.do(self.engine.on_timeout(kind, 1, round_))


def _votes_cast(actions: list[eng.Action], vote_type: int) -> list[eng.SignVote]:
    return [a for a in _of(actions, eng.SignVote) if a.type == vote_type]


def _of(actions: list[eng.Action], kind: type[A]) -> list[A]:
    return [a for a in actions if isinstance(a, kind)]


def _bystander(*rounds: int) -> Identity:
    """A validator that proposes in none of ``rounds`` at height 1."""
    return next(i for i in KEYS if all(i != _proposer(1, r) for r in rounds))


def _next_round(driver: Driver, round_: int) -> None:
    """Round ``round_`` ends: we time out, two others precommit nil, the precommit timer."""
    driver.timeout("prevote", round_)
    driver.votes(PRECOMMIT, round_, None, _others(driver.me)[:2])
    driver.timeout("precommit", round_)
    assert driver.engine.round == round_ + 1


def test_a_single_validator_decides_in_one_round() -> None:
    me = Identity(b"\x07" * 32)
    alone = ValidatorSet({me.public_key: 1})
    driver = Driver(me, alone)
    actions = driver.start()
    requests = _of(actions, eng.RequestBlock)
    assert requests == [eng.RequestBlock(1, 0)]
    block = SimNode(0, me).build(random.Random(1), 0.0, alone)
    actions = driver.do(driver.engine.on_block(1, 0, block))
    decided = _of(actions, eng.Decide)
    assert len(decided) == 1
    decision = decided[0]
    assert isinstance(decision, eng.Decide)
    assert (decision.height, decision.block, decision.certificate.round) == (1, block, 0)
    decision.certificate.verify(CHAIN, alone.powers)
    assert [a.type for a in _of(actions, eng.SignVote)] == [PREVOTE, PRECOMMIT]


def test_a_locked_validator_prevotes_only_its_lock_until_a_newer_polka() -> None:
    me = _bystander(0, 1, 2)
    driver = Driver(me)
    driver.start()
    v, x, w = _block(1, _proposer(1, 0)), _block(2, _proposer(1, 1)), _block(3)
    driver.proposal(0, v)
    actions = driver.votes(PREVOTE, 0, v.id, _others(me)[:2])
    locks = [a for a in _votes_cast(actions, PRECOMMIT) if a.lock is not None]
    assert [(a.block_id, a.lock, a.lock_round) for a in locks] == [(v.id, v, 0)]
    assert len(locks[0].pol) == 3  # the polka travels with the lock
    _next_round(driver, 0)
    # Round 1: a fresh proposal of another block. Locked on v, we prevote nil.
    actions = driver.proposal(1, x)
    assert [a.block_id for a in _votes_cast(actions, PREVOTE)] == [None]
    # The others prevote w in round 1 (we never saw it proposed): a polka newer than our lock.
    driver.votes(PREVOTE, 1, w.id, _others(me))
    _next_round(driver, 1)
    assert driver.engine.locked_value == v
    # Round 2 proposes w naming that polka: now we may prevote it.
    actions = driver.proposal(2, w, pol_round=1)
    assert [a.block_id for a in _votes_cast(actions, PREVOTE)] == [w.id]


def test_a_reproposal_naming_a_polka_we_never_saw_gets_no_prevote() -> None:
    me = _bystander(0, 1, 2)
    driver = Driver(me)
    driver.start()
    v, w = _block(1), _block(2)
    driver.proposal(0, v)
    driver.votes(PREVOTE, 0, v.id, _others(me)[:2])
    assert driver.engine.locked_round == 0
    _next_round(driver, 0)
    _next_round(driver, 1)
    actions = driver.proposal(2, w, pol_round=1)
    assert _votes_cast(actions, PREVOTE) == []  # waits for that polka, then times out
    actions = driver.timeout("propose", 2)
    assert [a.block_id for a in _votes_cast(actions, PREVOTE)] == [None]


def test_a_lock_outranks_an_older_polka_for_another_block() -> None:
    me = _bystander(0, 1, 2)
    driver = Driver(me)
    driver.start()
    v, w = _block(1), _block(2)
    driver.votes(PREVOTE, 0, w.id, _others(me))  # a polka for w in round 0 (we saw no proposal)
    driver.timeout("propose", 0)
    _next_round(driver, 0)
    driver.proposal(1, v)
    driver.votes(PREVOTE, 1, v.id, _others(me)[:2])
    assert (driver.engine.locked_value, driver.engine.locked_round) == (v, 1)
    _next_round(driver, 1)
    # w with its (real) round-0 polka: older than our round-1 lock, so nil.
    actions = driver.proposal(2, w, pol_round=0)
    assert [a.block_id for a in _votes_cast(actions, PREVOTE)] == [None]


def test_a_proposer_with_a_valid_value_proposes_it_again() -> None:
    me = _proposer(1, 1)
    driver = Driver(me)
    driver.start()
    v = _block(1, _proposer(1, 0))
    driver.proposal(0, v)
    driver.votes(PREVOTE, 0, v.id, _others(me)[:2])
    assert driver.engine.valid_value == v
    driver.votes(PRECOMMIT, 0, None, _others(me)[:2])
    actions = driver.timeout("precommit", 0)
    assert _of(actions, eng.RequestBlock) == []
    proposals = _of(actions, eng.SignProposal)
    assert proposals == [eng.SignProposal(1, 1, 0, v)]


def test_f_plus_one_messages_of_a_later_round_make_a_node_skip_to_it() -> None:
    me = KEYS[0]
    driver = Driver(me)
    driver.start()
    first, second = _others(me)[:2]
    driver.votes(PREVOTE, 5, None, [first])
    assert driver.engine.round == 0  # one validator is not f+1
    actions = driver.votes(PRECOMMIT, 5, None, [second])
    assert driver.engine.round == 5
    assert eng.ScheduleTimeout("rebroadcast", 1, 5, 1.0) in actions
    defaults = eng.Timeouts()
    assert (
        eng.ScheduleTimeout("propose", 1, 5, defaults.propose + 5 * defaults.propose_delta)
        in actions
    )


def test_two_conflicting_votes_of_one_validator_are_evidence() -> None:
    driver = Driver(KEYS[0])
    driver.start()
    cheat = KEYS[1]
    first = sign_vote(cheat, CHAIN, PREVOTE, 1, 0, b"\x01" * 32)
    second = sign_vote(cheat, CHAIN, PREVOTE, 1, 0, b"\x02" * 32)
    assert _of(driver.do(driver.engine.on_vote(first)), eng.Evidence) == []
    assert _of(driver.do(driver.engine.on_vote(first)), eng.Evidence) == []  # a duplicate
    evidence = _of(driver.do(driver.engine.on_vote(second)), eng.Evidence)
    assert evidence == [eng.Evidence(first, second)]


def test_an_equivocators_second_vote_still_counts_for_its_value() -> None:
    # The cheat prevotes w to us first and v to the others; v's polka must still show.
    me = _bystander(0)
    driver = Driver(me)
    driver.start()
    v, w = _block(1), _block(2)
    cheat, *honest = _others(me)
    driver.votes(PREVOTE, 0, w.id, [cheat])
    driver.proposal(0, v)
    actions = driver.votes(PREVOTE, 0, v.id, [honest[0], cheat])
    assert [a.block_id for a in _votes_cast(actions, PRECOMMIT)] == [v.id]


def _wake_with_txs(driver: Driver) -> list[eng.Action]:
    return driver.do(driver.engine.on_txs_available())


def _wake_with_proposal(driver: Driver) -> list[eng.Action]:
    return driver.proposal(0, _block(3, _proposer(1, 0)))


def _wake_with_vote(driver: Driver) -> list[eng.Action]:
    return driver.votes(PREVOTE, 0, None, [_bystander(0)])


def _proposes(actions: list[eng.Action]) -> bool:
    return _of(actions, eng.RequestBlock) == [eng.RequestBlock(1, 0)]


def _waits_for_proposal(actions: list[eng.Action]) -> bool:
    return [a.kind for a in _of(actions, eng.ScheduleTimeout)] == ["propose"]


def _prevotes_it(actions: list[eng.Action]) -> bool:
    return [a.block_id for a in _votes_cast(actions, PREVOTE)] == [_block(3, _proposer(1, 0)).id]


@pytest.mark.parametrize(
    ("is_proposer", "wake", "woken"),
    [
        (True, _wake_with_txs, _proposes),
        (True, _wake_with_vote, _proposes),
        (False, _wake_with_txs, _waits_for_proposal),
        (False, _wake_with_proposal, _prevotes_it),
    ],
    ids=["proposer-txs", "proposer-vote", "other-txs", "other-proposal"],
)
def test_an_idle_height_waits_for_transactions_or_a_proposal(
    is_proposer: bool,
    wake: Callable[[Driver], list[eng.Action]],
    woken: Callable[[list[eng.Action]], bool],
) -> None:
    me = _proposer(1, 0) if is_proposer else _bystander(0)
    driver = Driver(me)
    actions = driver.start(has_txs=False)
    assert _of(actions, eng.RequestBlock) == []
    assert [a.kind for a in _of(actions, eng.ScheduleTimeout)] == ["rebroadcast"]
    later = driver.timeout("rebroadcast", 0)
    assert [type(a) for a in later] == [eng.Rebroadcast, eng.ScheduleTimeout]
    assert driver.engine.idle
    assert woken(wake(driver))
    assert not driver.engine.idle


def test_a_restarted_validator_counts_its_own_vote_and_does_not_propose_again() -> None:
    me = _proposer(1, 0)
    v = _block(1, me)
    mine = sign_vote(me, CHAIN, PRECOMMIT, 1, 0, v.id)
    pol = tuple(sign_vote(i, CHAIN, PREVOTE, 1, 0, v.id) for i in KEYS[:3])
    restored = eng.Restored(
        round=0, step=PRECOMMIT, locked_round=0, locked_block=v, messages=(mine, *pol)
    )
    driver = Driver(me)
    actions = driver.do(driver.engine.start_height(1, VALS, has_txs=True, restored=restored))
    assert _of(actions, eng.RequestBlock) == _of(actions, eng.SignProposal) == []
    assert driver.engine.locked_value == v
    # Its own precommit counts: two more and the proposal decide.
    driver.proposal(0, v)
    actions = driver.votes(PRECOMMIT, 0, v.id, _others(me)[:2])
    assert [a.block for a in _of(actions, eng.Decide)] == [v]


def test_rebroadcast_relays_the_round_and_the_polka_behind_the_valid_value() -> None:
    me = _proposer(1, 1)
    driver = Driver(me)
    driver.start()
    v = _block(1, _proposer(1, 0))
    driver.proposal(0, v)
    driver.votes(PREVOTE, 0, v.id, _others(me)[:2])
    driver.votes(PRECOMMIT, 0, None, _others(me)[:2])
    driver.timeout("precommit", 0)
    actions = driver.timeout("rebroadcast", 1)
    rebroadcasts = _of(actions, eng.Rebroadcast)
    assert len(rebroadcasts) == 1
    relay = rebroadcasts[0].relay
    polka = {
        m.validator for m in relay if isinstance(m, Vote) and m.round == 0 and m.type == PREVOTE
    }
    assert len(polka) == 3
    previous_precommits = [
        m for m in relay if isinstance(m, Vote) and m.round == 0 and m.type == PRECOMMIT
    ]
    assert len(previous_precommits) == 3
    assert any(isinstance(m, Proposal) and m.round == 1 and m.block == v for m in relay)


def test_rebroadcast_names_the_validators_that_voted_for_the_proposals_block() -> None:
    """They hold the block (a validator votes only for a block it has), so the driver need
    not send them the proposal, megabytes, again; nil voters and other rounds' do not."""
    me = _bystander(0)
    driver = Driver(me)
    driver.start()
    v = _block(1, _proposer(1, 0))
    driver.proposal(0, v)  # and we prevote it
    prevoter, nil_voter, *_ = (i for i in _others(me) if i != _proposer(1, 0))
    driver.votes(PREVOTE, 0, v.id, [prevoter])
    driver.votes(PREVOTE, 0, None, [nil_voter])
    (rebroadcast,) = _of(driver.timeout("rebroadcast", 0), eng.Rebroadcast)
    assert rebroadcast.holders == {me.public_key, prevoter.public_key}
    driver.votes(PRECOMMIT, 0, v.id, [nil_voter])  # changed its mind: it has it after all
    (rebroadcast,) = _of(driver.timeout("rebroadcast", 0), eng.Rebroadcast)
    assert rebroadcast.holders == {me.public_key, prevoter.public_key, nil_voter.public_key}
