"""The asyncio shell around the consensus engine: timers, signing, persistence, wiring.

One task consumes an event queue (messages from peers, timeouts, "transactions waiting"),
hands each event to the engine and carries out the actions it returns, one at a time, so
the engine is never re-entered. Before anything signed leaves the node, the signing record
(``consensus.signing``) is made durable; after a restart the engine gets back what was
signed at the current height, so it never signs anything conflicting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol

from ehrnode.consensus import engine as eng
from ehrnode.consensus.execution import Executor
from ehrnode.consensus.signing import STEP_PROPOSAL, SigningRecord
from ehrnode.core import codec
from ehrnode.core.block import (
    PRECOMMIT,
    Block,
    Certificate,
    Proposal,
    Vote,
    sign_proposal,
    sign_vote,
)
from ehrnode.core.crypto import Identity
from ehrnode.core.errors import InvalidBlock, InvalidTransaction
from ehrnode.core.tx import Tx

log = logging.getLogger(__name__)
MAX_EVIDENCE = 1000
# A proposer takes transactions into its block for at most this share of the propose
# timeout: the block must be built, recorded and sent before the others stop waiting.
BUILD_SHARE_OF_PROPOSE_TIMEOUT = 0.25
# Another validator's proposal is relayed from this rebroadcast tick of a round on.
RELAY_PROPOSALS_FROM_TICK = 2


class Network(Protocol):
    """Where the driver's signed messages go (the p2p layer, or nowhere for one node)."""

    def broadcast_proposal(self, proposal: Proposal, exclude: Collection[bytes] = ()) -> None:
        """To every peer but the validators in ``exclude``."""

    def broadcast_vote(self, vote: Vote, exclude: Collection[bytes] = ()) -> None:
        """To every peer but the validators in ``exclude``."""

    def broadcast_evidence(self, first: Vote, second: Vote) -> None: ...


class NullNetwork:
    """A network of one: nothing to send to."""

    def broadcast_proposal(self, proposal: Proposal, exclude: Collection[bytes] = ()) -> None:
        pass

    def broadcast_vote(self, vote: Vote, exclude: Collection[bytes] = ()) -> None:
        pass

    def broadcast_evidence(self, first: Vote, second: Vote) -> None:
        pass


@dataclass(frozen=True)
class Committed:
    block: Block
    txs: list[Tx]
    certificate: Certificate
    dropped: list[tuple[Tx, InvalidTransaction]]


class Driver:
    def __init__(
        self,
        identity: Identity | None,
        executor: Executor,
        network: Network,
        timeouts: eng.Timeouts | None = None,
    ) -> None:
        self.identity = identity
        self.executor = executor
        self.chain = executor.chain
        self.mempool = executor.mempool
        self.network = network
        self.me = None if identity is None else identity.public_key
        self.engine = eng.Engine(self.me, executor.is_valid, timeouts)
        self.signing = SigningRecord(executor.chain)
        self.listeners: list[Callable[[Committed], None]] = []
        self.evidence: list[tuple[Vote, Vote]] = []
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._sent: dict[tuple[int, int], list[Proposal | Vote]] = {}
        self._ticks: dict[tuple[int, int], int] = {}  # rebroadcast ticks of each round
        self._last_certificate: Certificate | None = None
        self._stopping = False
        self.committed = asyncio.Event()
        self.evidence_listeners: list[Callable[[Vote, Vote], None]] = []
        self._evidence_seen: set[tuple[bytes, int, int, int]] = set()
        self._certified_waiters: dict[int, asyncio.Future[None]] = {}

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        head = self.chain.head
        if head.height > 0:
            self._last_certificate = self.chain.certificate(head.height)
        params = self.chain.genesis.params
        restored = self.signing.restored(head.height + 1, params.max_block_bytes)
        actions = self.engine.start_height(
            head.height + 1,
            self.executor.validators(),
            has_txs=self._work_waiting(),
            restored=restored,
        )
        if restored is not None:  # what we signed before the restart, for peers that missed it
            for message in restored.messages:
                self._send(message)
        self._task = asyncio.create_task(self._run(actions), name="consensus")

    async def stop(self) -> None:
        self._stopping = True
        for timer in self._timers:
            timer.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # --- inputs (called by the p2p layer, the RPC and the mempool) ---------------------------

    def submit_proposal(self, proposal: Proposal) -> None:
        self._queue.put_nowait(("proposal", proposal))

    def submit_vote(self, vote: Vote) -> None:
        self._queue.put_nowait(("vote", vote))

    async def apply_certified(
        self,
        block: Block,
        certificate: Certificate,
        executed: asyncio.Future[None] | None = None,
    ) -> None:
        """Commit a block whose certificate the caller verified (block sync); returns once
        it is committed or known already, raises InvalidBlock if it does not apply here.
        ``executed`` is set once the block has applied and only its write is left."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(("certified", (block, certificate, future, executed)))
        await future

    def submit_evidence(self, first: Vote, second: Vote) -> None:
        self._queue.put_nowait(("evidence", (first, second)))

    def txs_available(self) -> None:
        if not self.engine.has_txs:
            self._queue.put_nowait(("txs", None))

    # --- the loop -------------------------------------------------------------------------

    async def _run(self, initial: list[eng.Action]) -> None:
        await self._perform(initial)
        while True:
            kind, payload = await self._queue.get()
            try:
                actions = self._dispatch(kind, payload)
                await self._perform(actions)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop consensus silently: log it and go on
                log.exception("consensus event %s failed", kind)

    def _dispatch(self, kind: str, payload: Any) -> list[eng.Action]:
        chain_id = self.chain.genesis.chain_id
        if kind == "proposal":
            # Membership first (cheap), then the signature: an outsider's messages cost
            # no signature checks.
            if payload.proposer not in self.engine.vals:
                return []
            if not payload.verify(chain_id):
                log.warning("dropping a proposal with a bad signature")
                return []
            return self.engine.on_proposal(payload)
        if kind == "vote":
            if payload.validator not in self.engine.vals:
                return []
            if not payload.verify(chain_id):
                log.warning("dropping a vote with a bad signature")
                return []
            return self.engine.on_vote(payload)
        if kind == "timeout":
            return self.engine.on_timeout(*payload)
        if kind == "txs":
            return self.engine.on_txs_available()
        if kind == "certified":
            return self._certified(*payload)
        if kind == "evidence":
            self._evidence(*payload)
            return []
        raise ValueError(kind)

    def _certified(
        self,
        block: Block,
        certificate: Certificate,
        future: asyncio.Future[None],
        executed: asyncio.Future[None] | None,
    ) -> list[eng.Action]:
        height = block.header.height
        if height != self.engine.height or self.engine.decided is not None:
            if not future.done():
                if height <= self.chain.head.height:
                    future.set_result(None)
                else:
                    future.set_exception(InvalidBlock(f"block {height} is not the next one"))
            return []
        verdict = self.executor.check(block, certified=True)
        if verdict is not None:
            log.error(
                "block %d is certified by a quorum but does not apply here (%s): "
                "this node's state or rules diverge from the network's",
                height,
                verdict,
            )
            future.set_exception(InvalidBlock(verdict))
            return []
        self._certified_waiters[height] = future
        if executed is not None and not executed.done():
            executed.set_result(None)
        return self.engine.on_certified_block(block, certificate)

    def _evidence(self, first: Vote, second: Vote) -> None:
        chain_id = self.chain.genesis.chain_id
        same_slot = (first.validator, first.height, first.round, first.type) == (
            second.validator,
            second.height,
            second.round,
            second.type,
        )
        if not same_slot or first.block == second.block:
            return
        if first.validator not in self.engine.vals:
            return  # only a validator's double vote is evidence of anything
        if not (first.verify(chain_id) and second.verify(chain_id)):
            return
        key = (first.validator, first.height, first.round, first.type)
        if key in self._evidence_seen:
            return
        self._evidence_seen.add(key)
        if len(self._evidence_seen) > MAX_EVIDENCE:
            self._evidence_seen.clear()  # duplicates then fail on chain, still bounded
        self.evidence.append((first, second))
        del self.evidence[:-MAX_EVIDENCE]
        for callback in self.evidence_listeners:
            callback(first, second)

    async def _perform(self, actions: list[eng.Action]) -> None:
        pending = list(actions)
        while pending:
            action = pending.pop(0)
            pending.extend(await self._do(action))

    async def _do(self, action: eng.Action) -> list[eng.Action]:
        if isinstance(action, eng.ScheduleTimeout):
            loop = asyncio.get_running_loop()
            event = ("timeout", (action.kind, action.height, action.round))
            self._timers = [t for t in self._timers if not t.cancelled() and t.when() > loop.time()]
            self._timers.append(loop.call_later(action.delay, self._queue.put_nowait, event))
            return []
        if isinstance(action, eng.RequestBlock):
            assert self.me is not None
            budget = self.engine.timeouts.propose * BUILD_SHARE_OF_PROPOSE_TIMEOUT
            block = self.executor.build(self.me, self._last_certificate, budget_s=budget)
            return self.engine.on_block(action.height, action.round, block)
        if isinstance(action, eng.SignProposal):
            proposal = await self._sign_proposal(action)
            if proposal is None:
                return []
            self.network.broadcast_proposal(proposal)
            return self.engine.on_proposal(proposal)
        if isinstance(action, eng.SignVote):
            vote = await self._sign_vote(action)
            if vote is None:
                return []
            self.network.broadcast_vote(vote)
            return self.engine.on_vote(vote)
        if isinstance(action, eng.Decide):
            await self._commit(action)
            return self._next_height()
        if isinstance(action, eng.Evidence):
            log.warning(
                "validator %s signed two different votes at height %d round %d",
                action.first.validator.hex()[:16],
                action.first.height,
                action.first.round,
            )
            key = (
                action.first.validator,
                action.first.height,
                action.first.round,
                action.first.type,
            )
            if key not in self._evidence_seen:
                self.network.broadcast_evidence(action.first, action.second)
            self._evidence(action.first, action.second)
            return []
        if isinstance(action, eng.Rebroadcast):
            # Our own messages of the round, and what a peer may have missed (``relay``),
            # not to their signer, and a proposal not to those who voted for its block.
            # Another validator's proposal waits for the round's second tick: its proposer
            # sent it to every peer, and under load a block takes longer to execute than a
            # tick, so relaying it on the first only sent the peers another copy.
            round_key = (action.height, action.round)
            tick = self._ticks[round_key] = self._ticks.get(round_key, 0) + 1
            sent = self._sent.get(round_key, [])
            for message in {id(m): m for m in (*sent, *action.relay)}.values():
                if isinstance(message, Proposal):
                    if message.proposer != self.me and tick < RELAY_PROPOSALS_FROM_TICK:
                        continue
                    self.network.broadcast_proposal(
                        message, {message.proposer, *action.holders} - {self.me}
                    )
                else:
                    self.network.broadcast_vote(message, {message.validator} - {self.me})
            return []
        raise TypeError(action)

    def _send(self, message: Proposal | Vote) -> None:
        if isinstance(message, Proposal):
            self.network.broadcast_proposal(message)
        else:
            self.network.broadcast_vote(message)

    # --- signing --------------------------------------------------------------------------

    async def _sign_proposal(self, action: eng.SignProposal) -> Proposal | None:
        assert self.identity is not None
        verdict = self.signing.check(action.height, action.round, STEP_PROPOSAL)
        if verdict is False:
            log.warning(
                "refusing to sign a second proposal for height %d round %d",
                action.height,
                action.round,
            )
            return None
        if isinstance(verdict, bytes):
            return Proposal.from_wire(
                codec.decode(verdict, max_bytes=1 << 30), max_block_bytes=1 << 30
            )
        chain_id = self.chain.genesis.chain_id
        proposal = sign_proposal(
            self.identity, chain_id, action.round, action.pol_round, action.block
        )
        # Persist before the signature leaves the process (it only leaves after this).
        await self.signing.kv.run(self.signing.save, proposal)
        self._sent.setdefault((action.height, action.round), []).append(proposal)
        return proposal

    async def _sign_vote(self, action: eng.SignVote) -> Vote | None:
        assert self.identity is not None
        verdict = self.signing.check(action.height, action.round, action.type)
        if verdict is False:
            log.warning(
                "refusing to sign a conflicting vote at height %d round %d",
                action.height,
                action.round,
            )
            return None
        if isinstance(verdict, bytes):
            return Vote.from_wire(codec.decode(verdict))
        chain_id = self.chain.genesis.chain_id
        vote = sign_vote(
            self.identity, chain_id, action.type, action.height, action.round, action.block_id
        )
        lock = action.lock if action.type == PRECOMMIT else None
        await self.signing.kv.run(
            self.signing.save, vote, lock, action.pol if lock is not None else ()
        )
        self._sent.setdefault((action.height, action.round), []).append(vote)
        return vote

    # --- committing -----------------------------------------------------------------------

    async def _commit(self, decide: eng.Decide) -> None:
        started = time.perf_counter()
        block = decide.block
        execution, txs = self.executor.execution(block)
        stored = self.signing.holds(block.header.height, block.id)
        await self.chain.commit_from_loop(block, decide.certificate, execution, stored=stored)
        self._last_certificate = decide.certificate
        self.executor.forget()
        # The mempool's view of the committed state changes with the block, before any
        # other await lets an admission read what it cached before it.
        dropped = self.mempool.update(block.tx_ids) + self.executor.dropped
        dropped += self.mempool.drain_evicted()
        self.executor.dropped = []
        if self.identity is not None and self.signing.needs_pruning(block.header.height + 1):
            await self.signing.kv.run(self.signing.prune, block.header.height + 1)
        for tx, err in dropped:
            log.info(
                "dropped pending %s after block %d: %s", tx.id.hex()[:16], block.header.height, err
            )
        self._sent = {k: v for k, v in self._sent.items() if k[0] > block.header.height}
        self._ticks = {k: n for k, n in self._ticks.items() if k[0] > block.header.height}
        committed = Committed(block, txs, decide.certificate, dropped)
        for listener in self.listeners:
            try:
                listener(committed)
            except Exception:
                log.exception("commit listener failed")
        waiter = self._certified_waiters.pop(block.header.height, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self.committed.set()
        self.committed.clear()
        log.debug(
            "committed block %d with %d txs in %.1f ms",
            block.header.height,
            len(block.txs),
            (time.perf_counter() - started) * 1000,
        )

    def _work_waiting(self) -> bool:
        """Transactions to commit, or a validator-set change that needs blocks to take
        effect (it installs two blocks after its quorum)."""
        return len(self.mempool) > 0 or self.executor.set_change_pending()

    def _next_height(self) -> list[eng.Action]:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        head = self.chain.head
        return self.engine.start_height(
            head.height + 1, self.executor.validators(), has_txs=self._work_waiting()
        )
