"""Block checks: those that depend on this node's clock are not remembered against the
block, and a certified block's transactions are still checked field by field."""

from __future__ import annotations

import os
import time

import pytest
from helpers_core import fake_keys, make_genesis, raw_tx

from ehrnode.consensus.execution import Executor, block_context, make_block, next_context
from ehrnode.core import crypto, state, tx
from ehrnode.core.block import Block
from ehrnode.mempool import Mempool
from ehrnode.node import Node
from ehrnode.store.chain import Chain
from ehrnode.store.db import MemoryKV


async def test_a_block_from_too_far_ahead_is_refused_now_but_accepted_once_certified(
    node: Node,
) -> None:
    chain = node.chain
    register = tx.make(
        crypto.Identity.generate(), chain.genesis.chain_id, "register", 1, {"role": "patient"}
    )
    ahead = int(time.time() * 1000) + 60_000  # a minute in our future: a proposer's clock
    ctx = block_context(chain, chain.head.height + 1, ahead)
    overlay = state.Overlay(chain.state)
    state.apply_tx(overlay, ctx, register)
    block = make_block(chain, ctx, node.identity.public_key, [register], chain.validators(), None)
    assert "future" in (node.executor.check(block) or "")
    # Block sync brings the same block with a quorum's certificate: our clock is no reason
    # to refuse it, and the earlier refusal must not stick.
    assert node.executor.check(block, certified=True) is None


async def test_a_certified_block_is_still_refused_for_a_malformed_transaction(
    node: Node,
) -> None:
    """A certified block skips its transactions' signature checks (a quorum made them),
    not the checks of their form and fields: a malformed one is refused, and the node
    goes on."""
    chain = node.chain
    signer = crypto.Identity.generate()
    raw = raw_tx(signer, chain=chain.genesis.chain_id, body={"role": 5})
    fake = tx.Tx(
        chain.genesis.chain_id, "register", signer.public_key, 1, {}, b"", raw, crypto.sha256(raw)
    )
    ctx = block_context(chain, chain.head.height + 1, int(time.time() * 1000))
    block = make_block(chain, ctx, node.identity.public_key, [fake], chain.validators(), None)
    verdict = node.executor.check(block, certified=True)
    assert verdict is not None and "role" in verdict
    good = tx.make(signer, chain.genesis.chain_id, "register", 1, {"role": "patient"})
    again = make_block(chain, ctx, node.identity.public_key, [good], chain.validators(), None)
    assert node.executor.check(again, certified=True) is None


def _registrations(chain: Chain, n: int, *, bad_sig_at: int | None = None) -> list[tx.Tx]:
    out = []
    for i in range(n):
        sig = bytes(64) if i == bad_sig_at else None
        raw = raw_tx(crypto.Identity.generate(), chain=chain.genesis.chain_id, sig=sig)
        out.append(tx.decode(raw, verify_sig=sig is None))
    return out


def _block(node: Node, txs: list[tx.Tx]) -> Block:
    chain = node.chain
    ctx = block_context(chain, chain.head.height + 1, int(time.time() * 1000))
    return make_block(chain, ctx, node.identity.public_key, txs, chain.validators(), None)


async def test_transactions_decoded_ahead_serve_only_their_certified_block(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Block sync decodes the next block's transactions while the one before is written
    (``execute_ahead``, without signature checks: a quorum certified the block). What it
    decoded serves that block's certified check only: never a live proposal's checks,
    even of the same block, and never another block."""
    executor = node.executor
    forged = _block(node, _registrations(node.chain, 3, bad_sig_at=1))
    executor.execute_ahead(forged)
    verdict = executor.check(forged)  # a proposal: every signature is checked
    assert verdict is not None and "signature" in verdict

    decoded: list[bytes] = []
    decode = executor._decode
    monkeypatch.setattr(
        executor, "_decode", lambda raw, *a, **k: decoded.append(raw) or decode(raw, *a, **k)
    )
    block, other = (
        _block(node, _registrations(node.chain, 4)),
        _block(node, _registrations(node.chain, 2)),
    )
    executor.execute_ahead(block)
    assert len(decoded) == 4
    assert executor.check(other, certified=True) is None
    assert decoded[4:] == list(other.txs)  # another block: decoded afresh
    executor.execute_ahead(block)
    assert executor.check(block, certified=True) is None
    assert len(decoded) == 4 + 2 + 4  # its own: nothing decoded again by the check


def test_a_transaction_the_builder_drops_leaves_none_of_its_writes() -> None:
    """The proposer applies pending transactions one by one into the block's state and
    drops one that no longer applies (a relayed one was never applied here). A ``records``
    transaction refused at its second record leaves nothing of its first behind."""
    validator = crypto.Identity.generate()
    genesis = make_genesis([validator])
    chain = Chain(MemoryKV(), genesis)
    cid = genesis.chain_id
    now = genesis.genesis_time + 1000
    pool = Mempool(chain.state, lambda: next_context(chain, now))
    executor = Executor(chain, pool, lambda: now)
    patient, provider, stranger = (crypto.Identity.generate() for _ in range(3))

    def item(who: crypto.Identity) -> dict[str, object]:
        readers = [who.public_key, provider.public_key]
        return {
            "patient": who.public_key,
            "blob": crypto.sha256(os.urandom(32)),
            "size": 10,
            "type": "Observation",
            "keys": fake_keys(readers),
        }

    good, bad = item(patient), item(stranger)  # the stranger never registered
    registrations = [
        tx.make(patient, cid, "register", 1, {"role": "patient"}),
        tx.make(
            provider,
            cid,
            "register",
            1,
            {
                "role": "provider",
                "endorsement": tx.endorse(validator, cid, "provider", provider.public_key),
            },
        ),
    ]
    refused = tx.make(provider, cid, "records", 2, {"items": [good, bad]})
    for t in [*registrations, refused]:
        pool.add_relayed(t)

    block = executor.build(validator.public_key, None)

    execution, chosen = executor.execution(block)
    assert chosen == registrations
    assert [(t, err.code) for t, err in executor.dropped] == [(refused, "unknown_patient")]
    assert state.P_BLOB + good["blob"] not in execution.changes
    assert state.P_REC + tx.record_id(refused.id, 0) not in execution.changes
    overlay = state.Overlay(chain.state)
    overlay.changes.update(execution.changes)
    assert state.load(overlay, state.P_ACCT + patient.public_key)["nrec"] == 0
    assert state.load(overlay, state.P_ACCT + provider.public_key)["nonce"] == 1


def test_a_proposer_stops_taking_transactions_when_its_build_budget_is_spent() -> None:
    """Under load a 5,000-transaction block took seconds to build, longer than the others
    wait for a proposal; the builder takes no more once its budget is spent."""
    validator = crypto.Identity.generate()
    genesis = make_genesis([validator])
    chain = Chain(MemoryKV(), genesis)
    now = genesis.genesis_time + 1000
    pool = Mempool(chain.state, lambda: next_context(chain, now))
    executor = Executor(chain, pool, lambda: now)
    for _ in range(5):
        patient = crypto.Identity.generate()
        pool.add_relayed(tx.make(patient, genesis.chain_id, "register", 1, {"role": "patient"}))

    assert len(executor.build(validator.public_key, None, budget_s=0.0).txs) == 1
    assert len(executor.build(validator.public_key, None, budget_s=60.0).txs) == 5
    assert len(executor.build(validator.public_key, None).txs) == 5
