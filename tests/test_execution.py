"""Block checks: those that depend on this node's clock are not remembered against the
block, and a certified block's transactions are still checked field by field."""

from __future__ import annotations

import time

from helpers_core import raw_tx

from ehrnode.consensus.execution import block_context, make_block
from ehrnode.core import crypto, state, tx
from ehrnode.node import Node


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
