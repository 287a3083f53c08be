"""Building, checking and executing blocks against the committed chain.

- ``build`` (we propose): the pending transactions in arrival order, each applied on top of
  the ones before it; one that no longer applies is left out.
- ``validate`` (someone proposed): the header must follow our head, the certificate of the
  previous block must verify, and every transaction must apply in order.
- Executions are cached by block id, so a block we built or validated is not executed
  again when it is decided; signatures already checked by the mempool are not re-checked.
- Block sync decodes a certified block's transactions and executes them on top of the block
  before it (``execute_ahead``) while that block is written.

Reads the chain and the mempool; writes nothing (the driver commits).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ehrnode.consensus.validators import ValidatorSet
from ehrnode.core import authority, merkle, state, tx as txmod
from ehrnode.core.block import ZERO_HASH, Block, Certificate, Header
from ehrnode.core.errors import InvalidBlock, InvalidTransaction
from ehrnode.core.tx import Tx
from ehrnode.mempool import Mempool
from ehrnode.store.chain import Chain

log = logging.getLogger(__name__)

MAX_CLOCK_DRIFT_MS = 10_000


class _TooEarly(InvalidBlock):
    """A block from too far in this node's future (its clock, not the block, decides)."""


_CACHE_BLOCKS = 16


@dataclass(frozen=True)
class _Ahead:
    """A certified block decoded (and, with a ``parent``, executed on top of that block's
    execution) before its check: ``execute_ahead``."""

    block: bytes
    parent: bytes  # empty when not executed
    execution: state.Execution | None
    txs: list[Tx]


class Executor:
    def __init__(self, chain: Chain, mempool: Mempool, now_ms: Callable[[], int]) -> None:
        self.chain = chain
        self.mempool = mempool
        self.now_ms = now_ms
        self._executions: OrderedDict[bytes, tuple[state.Execution, list[Tx]]] = OrderedDict()
        self._verdicts: OrderedDict[bytes, str | None] = OrderedDict()
        # Pending transactions the builder found no longer apply, reported with the next
        # commit (so their senders learn why).
        self.dropped: list[tuple[Tx, InvalidTransaction]] = []
        # A certified block's transactions, decoded before it is checked (without their
        # signatures: used for that block id, with certified=True, only), and executed on
        # top of its parent's when that was at hand (``execute_ahead``).
        self._ahead: _Ahead | None = None

    def validators(self) -> ValidatorSet:
        return ValidatorSet(self.chain.validators())

    def set_change_pending(self) -> bool:
        return self.chain.state.get(authority.K_PENDING) is not None

    def context(self, height: int, time_ms: int) -> state.BlockContext:
        return block_context(self.chain, height, time_ms)

    # --- proposing ------------------------------------------------------------------------

    def build(
        self, proposer: bytes, last_commit: Certificate | None, *, budget_s: float | None = None
    ) -> Block:
        """The next block from the mempool's transactions. ``budget_s``: stop taking more
        after that many seconds, so that a loaded proposer's block reaches the others
        before their propose timeout (under load, 2.6 s passed between a proposer's asking
        for a 5,000-transaction block and its proposal leaving, and every round failed
        until the timeout had grown past that)."""
        deadline = None if budget_s is None else time.perf_counter() + budget_s
        head = self.chain.head
        height = head.height + 1
        time_ms = max(self.now_ms(), head.time + 1)
        ctx = self.context(height, time_ms)
        params = self.chain.genesis.params
        overlay = state.Overlay(self.chain.state, cache_reads=True)
        chosen: list[Tx] = []
        size = 0
        skipped: set[bytes] = set()
        for tx in self.mempool.reap(params.max_block_bytes, params.max_block_txs):
            if tx.signer in skipped:
                continue
            if size + tx.size > params.max_block_bytes - 64 * 1024:
                break
            try:
                state.apply_tx(overlay, ctx, tx)  # atomic: a rejection leaves no write
            except InvalidTransaction as err:
                skipped.add(tx.signer)  # its later nonces cannot apply either
                log.info("dropping %s, which no longer applies: %s", tx.id.hex()[:16], err)
                self.mempool.remove(tx.id)
                self.dropped.append((tx, err))
                continue
            chosen.append(tx)
            size += tx.size
            if deadline is not None and time.perf_counter() > deadline:
                break
        state.finish_block(overlay, ctx)
        next_vals = state.validators(overlay)
        block = make_block(self.chain, ctx, proposer, chosen, next_vals, last_commit)
        digest = state.digest_after(overlay, overlay.changes, head.digest)
        self._remember(block.id, state.Execution(overlay.changes, digest), chosen)
        self._verdicts[block.id] = None
        return block

    # --- checking -------------------------------------------------------------------------

    def is_valid(self, block: Block) -> bool:
        return self.check(block) is None

    def check(self, block: Block, *, certified: bool = False) -> str | None:
        """None if ``block`` may follow our head, else the reason it may not.

        ``certified``: a quorum already finalised this block (block sync brought it with a
        certificate we verified), so its transactions' signatures and canonical form were
        checked by more than two thirds of the validators and are not checked again here;
        everything else is.
        """
        if block.id in self._verdicts:
            cached = self._verdicts[block.id]
            if cached is None or not certified:
                return cached  # a rejection is checked again once a quorum certified it
        try:
            self._check(block, certified)
            verdict = None
        except _TooEarly as err:
            # Judged by our clock, not by the block: a later look (or a quorum's
            # certificate) may find it fine, so this is not remembered.
            log.warning("rejecting block at height %d for now: %s", block.header.height, err)
            return str(err)
        except (InvalidBlock, InvalidTransaction) as err:
            verdict = str(err)
            log.warning(
                "rejecting block %s at height %d: %s", block.id.hex()[:16], block.header.height, err
            )
        self._verdicts[block.id] = verdict
        while len(self._verdicts) > _CACHE_BLOCKS * 4:
            self._verdicts.popitem(last=False)
        return verdict

    def _check(self, block: Block, certified: bool = False) -> None:
        head = self.chain.head
        h = block.header
        genesis = self.chain.genesis
        vals = self.validators()
        if h.chain != genesis.chain_id:
            raise InvalidBlock(f"block is for chain '{h.chain}'")
        if h.height != head.height + 1:
            raise InvalidBlock(f"block height {h.height} does not follow our head {head.height}")
        if h.prev != head.id:
            raise InvalidBlock("block does not extend our head")
        if h.time <= head.time:
            raise InvalidBlock("block time is not after the previous block's")
        if not certified and h.time > self.now_ms() + MAX_CLOCK_DRIFT_MS:
            raise _TooEarly("block time is too far in the future")
        if h.proposer not in vals:
            raise InvalidBlock("block proposer is not a validator")
        if h.vals != vals.hash:
            raise InvalidBlock("block names the wrong validator set")
        if h.state != head.state_hash:
            raise InvalidBlock("block's state hash differs from ours: our rules diverge")
        if len(block.raw) > genesis.params.max_block_bytes or h.ntx > genesis.params.max_block_txs:
            raise InvalidBlock("block exceeds the size limits")
        # Its form (transaction count and root, no duplicates, the previous certificate's
        # hash) was checked by Block.decode, the only way a block arrives; ours we built.
        if block.last_commit is not None:
            previous = self.chain.validators_at(h.height - 1)
            block.last_commit.verify(genesis.chain_id, previous)
        ahead, self._ahead = self._ahead, None
        if not (certified and ahead is not None and ahead.block == block.id):
            ahead = None
        if ahead is not None and ahead.execution is not None and ahead.parent == head.id:
            txs, execution = ahead.txs, ahead.execution  # executed while its parent was written
        else:
            txs = ahead.txs if ahead is not None else self._decode_all(block, certified)
            ctx = self.context(h.height, h.time)
            execution = state.execute_block(self.chain.state, ctx, txs, head.digest)
        after = state.Overlay(self.chain.state)
        after.changes = execution.changes
        if h.next_vals != ValidatorSet(state.validators(after)).hash:
            raise InvalidBlock("block names the wrong next validator set")
        self._remember(block.id, execution, txs)

    def execute_ahead(self, block: Block, parent: Block | None = None) -> None:
        """Decode a certified block's transactions and execute them on top of ``parent``'s
        execution, ahead of ``check(block, certified=True)``, while ``parent`` (checked,
        decided, its execution cached) is written. Block sync calls it then, so that the
        node executes one block while the one before it is written.

        The execution reads ``parent``'s changes, and under them the committed state; the
        keys ``parent`` does not change read the same before and after its write, so the
        write may land at any moment meanwhile. The check takes the result only once
        ``parent`` is the head, and still checks the header against that head. A block that
        does not decode or apply is left for the check to report."""
        self._ahead = None
        try:
            txs = self._decode_all(block, certified=True)
        except InvalidTransaction:
            return
        self._ahead = _Ahead(block.id, b"", None, txs)
        found = None if parent is None else self._executions.get(parent.id)
        if parent is None or found is None or block.header.prev != parent.id:
            return  # written already (or not its parent): checked on the head as usual
        after = state.Overlay(self.chain.state)
        after.changes = found[0].changes
        ctx = state.BlockContext(
            self.chain.genesis.chain_id,
            block.header.height,
            block.header.time,
            state.validators(after),
        )
        try:
            execution = state.execute_block(after, ctx, txs, found[0].digest)
        except (InvalidBlock, InvalidTransaction):
            return
        self._ahead = _Ahead(block.id, parent.id, execution, txs)

    def _decode_all(self, block: Block, certified: bool) -> list[Tx]:
        return [
            self._decode(raw, tx_id, certified=certified)
            for raw, tx_id in zip(block.txs, block.tx_ids, strict=True)
        ]

    def _decode(self, raw: bytes, tx_id: bytes, *, certified: bool = False) -> Tx:
        known = self.mempool.get(tx_id)
        if known is not None and known.raw == raw:
            return known
        return txmod.decode(
            raw,
            max_bytes=self.chain.genesis.params.max_tx_bytes,
            certified=certified,
            tx_id=tx_id,  # the block hashed its transactions for its Merkle root already
        )

    def _remember(self, block_id: bytes, execution: state.Execution, txs: list[Tx]) -> None:
        self._executions[block_id] = (execution, txs)
        while len(self._executions) > _CACHE_BLOCKS:
            self._executions.popitem(last=False)

    def execution(self, block: Block) -> tuple[state.Execution, list[Tx]]:
        """The execution of a block decided at our head's next height."""
        found = self._executions.get(block.id)
        if found is None:
            # Decided by a quorum but not executed here (we missed the proposal, or block
            # sync brought it): its certificate is the authority, so execute it now.
            txs = self._decode_all(block, certified=False)
            ctx = self.context(block.header.height, block.header.time)
            found = (state.execute_block(self.chain.state, ctx, txs, self.chain.head.digest), txs)
        return found

    def forget(self) -> None:
        """After a commit: cached verdicts were relative to the old head."""
        self._executions.clear()
        self._verdicts.clear()


def make_block(
    chain: Chain,
    ctx: state.BlockContext,
    proposer: bytes,
    txs: list[Tx],
    next_vals: dict[bytes, int],
    last_commit: Certificate | None,
) -> Block:
    """The block of ``txs`` on top of the chain's head (their execution already known)."""
    head = chain.head
    ids = [tx.id for tx in txs]  # hashed when each transaction was decoded
    header = Header(
        chain=ctx.chain,
        height=ctx.height,
        time=ctx.time,
        proposer=proposer,
        prev=head.id,
        txs=merkle.root(ids),
        ntx=len(txs),
        vals=ValidatorSet(ctx.validators).hash,
        next_vals=ValidatorSet(next_vals).hash,
        state=head.state_hash,
        last_commit=ZERO_HASH if last_commit is None else last_commit.hash(),
    )
    return Block.build(header, [tx.raw for tx in txs], last_commit, ids)


def block_context(chain: Chain, height: int, time_ms: int) -> state.BlockContext:
    # Blocks are only ever built or checked on top of the head: the set voting on them
    # is the one the head's state names.
    return state.BlockContext(chain.genesis.chain_id, height, time_ms, chain.validators())


def next_context(chain: Chain, now_ms: int) -> state.BlockContext:
    """The context the mempool checks against: the next block, now."""
    head = chain.head
    return block_context(chain, head.height + 1, max(now_ms, head.time + 1))
