"""Block checks that depend on this node's clock are not remembered against the block."""

from __future__ import annotations

import time

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
