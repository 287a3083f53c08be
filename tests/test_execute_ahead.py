"""Block sync executes a certified block on top of the block before it while that one is
written (``Executor.execute_ahead``). The result must be the very execution the block has
on the committed chain, and it must serve only that block, once its parent is the head."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from helpers_core import fake_keys, make_genesis

from ehrnode.consensus.execution import Executor, block_context, make_block, next_context
from ehrnode.core import crypto, state, tx
from ehrnode.core.block import PRECOMMIT, Block, Certificate, make_certificate, sign_vote
from ehrnode.core.genesis import Genesis
from ehrnode.mempool import Mempool
from ehrnode.store.chain import Chain
from ehrnode.store.db import MemoryKV

VALIDATOR = crypto.Identity.generate()
GENESIS = make_genesis([VALIDATOR])
CID = GENESIS.chain_id


class _Node:
    """A chain with its mempool and executor, on a clock the test moves."""

    def __init__(self, genesis: Genesis) -> None:
        self.now = genesis.genesis_time
        self.chain = Chain(MemoryKV(), genesis)
        self.pool = Mempool(self.chain.state, lambda: next_context(self.chain, self.now))
        self.executor = Executor(self.chain, self.pool, lambda: self.now)

    def commit(self, block: Block, cert: Certificate) -> None:
        execution, _ = self.executor.execution(block)
        self.chain.commit(block, cert, execution)
        self.executor.forget()
        self.pool.update(block.tx_ids)  # as the driver does after a commit


def _certify(block: Block) -> Certificate:
    vote = sign_vote(VALIDATOR, CID, PRECOMMIT, block.header.height, 0, block.id)
    return make_certificate([vote])


def _two_blocks() -> tuple[_Node, list[tuple[Block, Certificate]], list[tx.Tx]]:
    """Block 1 registers a patient and a provider; block 2 holds the provider's record for
    that patient, which applies only on top of block 1. Returns the source node too."""
    source = _Node(GENESIS)
    patient, provider = crypto.Identity.generate(), crypto.Identity.generate()
    endorsement = tx.endorse(VALIDATOR, CID, "provider", provider.public_key)
    source.pool.add_relayed(tx.make(patient, CID, "register", 1, {"role": "patient"}))
    source.pool.add_relayed(
        tx.make(provider, CID, "register", 1, {"role": "provider", "endorsement": endorsement})
    )
    source.now += 1000
    first = source.executor.build(VALIDATOR.public_key, None)
    first_cert = _certify(first)
    source.commit(first, first_cert)
    item = {
        "patient": patient.public_key,
        "blob": crypto.sha256(os.urandom(32)),
        "size": 10,
        "type": "Observation",
        "keys": fake_keys([patient.public_key, provider.public_key]),
    }
    source.pool.add_relayed(tx.make(provider, CID, "records", 2, {"items": [item]}))
    source.now += 1000
    second = source.executor.build(VALIDATOR.public_key, first_cert)
    assert len(second.txs) == 1
    second_cert = _certify(second)
    source.commit(second, second_cert)
    # Registering the patient again, on top of block 1, is refused (its nonce is used).
    stale = tx.make(patient, CID, "register", 1, {"role": "patient"})
    return source, [(first, first_cert), (second, second_cert)], [stale]


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    execute: Callable[..., Any] = state.execute_block

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return execute(*args, **kwargs)

    monkeypatch.setattr(state, "execute_block", counted)
    return calls


def test_a_block_executed_ahead_commits_the_state_its_network_committed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Executed while block 1 is still being written (its changes not in the store yet),
    block 2's execution is taken by its check once block 1 is the head: no second
    execution, and the chain ends with the source's state hash."""
    source, [(first, first_cert), (second, second_cert)], _ = _two_blocks()
    node = _Node(GENESIS)
    assert node.executor.check(first, certified=True) is None
    node.executor.execute_ahead(second, first)  # block 1 is not written yet
    node.commit(first, first_cert)

    calls = _counting(monkeypatch)
    assert node.executor.check(second, certified=True) is None
    assert calls == []
    node.commit(second, second_cert)
    assert node.chain.head == source.chain.head  # height, id, time and state digest


def test_a_block_executed_ahead_serves_only_a_certified_check_on_its_parent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without its parent's execution at hand (written and forgotten already) the block is
    executed by its check as before; a live proposal's check never takes the result (its
    signatures were not checked); and on another parent the check refuses the block."""
    _, [(first, first_cert), (second, _)], _ = _two_blocks()

    node = _Node(GENESIS)
    assert node.executor.check(first, certified=True) is None
    node.commit(first, first_cert)
    node.executor.execute_ahead(second, first)  # the parent's execution is forgotten
    calls = _counting(monkeypatch)
    assert node.executor.check(second, certified=True) is None
    assert calls == [1]

    node = _Node(GENESIS)
    assert node.executor.check(first, certified=True) is None
    node.executor.execute_ahead(second, first)
    node.commit(first, first_cert)
    node.now = second.header.time
    calls.clear()
    assert node.executor.check(second) is None  # a proposal: executed and checked afresh
    assert calls == [1]

    node = _Node(GENESIS)
    assert node.executor.check(first, certified=True) is None
    node.executor.execute_ahead(second, first)
    node.now += 500
    other = node.executor.build(VALIDATOR.public_key, None)  # another block 1
    node.commit(other, _certify(other))
    verdict = node.executor.check(second, certified=True)
    assert verdict is not None and "does not extend our head" in verdict


def test_a_block_that_does_not_apply_on_its_parent_is_refused_by_its_check() -> None:
    """Executing ahead a block that does not apply leaves nothing behind: the check, once
    the parent is the head, refuses it with the reason, and the head stays."""
    _, [(first, first_cert), _], [stale] = _two_blocks()
    source_one = _Node(GENESIS)
    source_one.commit(first, first_cert)
    ctx = block_context(source_one.chain, 2, first.header.time + 1)
    bad = make_block(
        source_one.chain,
        ctx,
        VALIDATOR.public_key,
        [stale],
        source_one.chain.validators(),
        first_cert,
    )

    node = _Node(GENESIS)
    assert node.executor.check(first, certified=True) is None
    node.executor.execute_ahead(bad, first)
    node.commit(first, first_cert)
    verdict = node.executor.check(bad, certified=True)
    assert verdict is not None and "nonce" in verdict
    assert node.chain.head.height == 1
