"""The driver's rebroadcast (``consensus.driver``): a message is not sent back to its
signer, and a proposal, the whole block, not to the validators that voted for it, nor
another validator's before the round's second tick."""

from __future__ import annotations

import random
from collections.abc import Collection
from types import SimpleNamespace

from ehrnode.consensus import engine as eng
from ehrnode.consensus.driver import Driver
from ehrnode.consensus.sim_node import CHAIN, SimNode
from ehrnode.consensus.validators import ValidatorSet
from ehrnode.core.block import PREVOTE, Proposal, Vote, sign_proposal, sign_vote
from ehrnode.core.crypto import Identity
from ehrnode.store.db import MemoryKV


class Recorder:
    """The driver's network: who each message would go to, by exclusion."""

    def __init__(self) -> None:
        self.sent: list[tuple[Proposal | Vote, frozenset[bytes]]] = []

    def broadcast_proposal(self, proposal: Proposal, exclude: Collection[bytes] = ()) -> None:
        self.sent.append((proposal, frozenset(exclude)))

    def broadcast_vote(self, vote: Vote, exclude: Collection[bytes] = ()) -> None:
        self.sent.append((vote, frozenset(exclude)))

    def broadcast_evidence(self, first: Vote, second: Vote) -> None:
        raise AssertionError("no evidence here")


async def test_the_driver_resends_a_proposal_only_to_those_not_known_to_hold_it() -> None:
    me, proposer, prevoter = (Identity(bytes([n]) * 32) for n in (1, 2, 3))
    vals = ValidatorSet({i.public_key: 1 for i in (me, proposer, prevoter)})
    v = SimNode(0, proposer).build(random.Random(1), 0.0, vals)
    proposal = sign_proposal(proposer, CHAIN, 0, -1, v)
    vote = sign_vote(prevoter, CHAIN, PREVOTE, 1, 0, v.id)
    mine = sign_vote(me, CHAIN, PREVOTE, 1, 0, v.id)
    network = Recorder()
    chain = SimpleNamespace(kv=MemoryKV())
    executor = SimpleNamespace(chain=chain, mempool=None, is_valid=lambda block: True)
    driver = Driver(me, executor, network)  # type: ignore[arg-type]
    driver._sent[(1, 0)] = [mine]
    holders = frozenset({me.public_key, prevoter.public_key})
    await driver._do(eng.Rebroadcast(1, 0, (proposal, vote, mine), holders))
    # The first tick: its proposer sent the proposal to every peer already.
    assert {message.sig: exclude for message, exclude in network.sent} == {
        vote.sig: {prevoter.public_key},
        mine.sig: frozenset(),
    }
    network.sent.clear()
    await driver._do(eng.Rebroadcast(1, 0, (proposal, vote, mine), holders))

    assert {message.sig: exclude for message, exclude in network.sent} == {
        proposal.sig: {proposer.public_key, prevoter.public_key},  # nor to its author
        vote.sig: {prevoter.public_key},
        mine.sig: frozenset(),
    }
    assert len(network.sent) == 3


async def test_the_driver_resends_its_own_proposal_from_the_first_tick() -> None:
    me, other = Identity(bytes([1]) * 32), Identity(bytes([2]) * 32)
    vals = ValidatorSet({i.public_key: 1 for i in (me, other)})
    v = SimNode(0, me).build(random.Random(1), 0.0, vals)
    proposal = sign_proposal(me, CHAIN, 0, -1, v)  # relayed: held from before a restart
    network = Recorder()
    chain = SimpleNamespace(kv=MemoryKV())
    executor = SimpleNamespace(chain=chain, mempool=None, is_valid=lambda block: True)
    driver = Driver(me, executor, network)  # type: ignore[arg-type]
    await driver._do(eng.Rebroadcast(1, 0, (proposal,), frozenset({me.public_key})))
    assert network.sent == [(proposal, frozenset())]
