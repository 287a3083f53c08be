"""Consensus and transaction gossip over the switch.

Validators are fully meshed, so every message goes straight from its author to every peer
and nobody forwards: a validator's own proposals and votes (sent again by the engine's
rebroadcast timer until the round moves on), and the transactions a node admitted from its
clients (batched into one ``txs`` frame per event-loop turn). Duplicates are harmless: the
engine ignores a vote it has, the mempool a transaction it holds.

A proposal carries its whole block (megabytes under load), so it goes over a link at most
once while the peer can take it: a link is a TCP stream, which delivers it or breaks (and
a new link starts with nothing sent). A peer whose head is more than one block behind the
proposal's height drops it, so it gets it again when relayed. Under load a block takes
longer to execute than the rebroadcast period: a validator received each proposal 2.7
times on average, 2.2 with this rule, and 1.6 since the driver relays another
validator's proposal only from a round's second tick.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Collection
from typing import Any
from weakref import WeakKeyDictionary

from ehrnode.admission import Admission
from ehrnode.consensus.driver import Driver
from ehrnode.core import codec, crypto
from ehrnode.core.block import Proposal, Vote
from ehrnode.core.errors import EhrError, InvalidEncoding, PeerError
from ehrnode.core.tx import Tx
from ehrnode.p2p.switch import Peer, Switch

log = logging.getLogger(__name__)
SEEN_MAX = 50_000
PROPOSALS_MAX = 1_000  # rounds whose proposal arrived, remembered
DELIVERED_MAX = 64  # proposals remembered as sent, per link


class ConsensusGossip:
    """The driver's ``Network``: signed consensus messages to and from the peers."""

    def __init__(self, switch: Switch, max_block_bytes: int) -> None:
        self.switch = switch
        self.max_block_bytes = max_block_bytes
        self.driver: Driver | None = None
        # Votes of the engine's height already passed on: peers relay each other's
        # messages, so most arrive more than once; checking a signature once is enough.
        # Keyed by a hash of the whole vote, not its signature alone: a forged copy that
        # reuses a genuine signature must not make the genuine vote look seen (a vote is
        # small; proposals are told apart by round, ``_on_proposal``).
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        # The (height, round) of each proposal of the engine's height that arrived from its
        # round's proposer with its signature checked (``_on_proposal``).
        self._proposals: OrderedDict[tuple[int, int], None] = OrderedDict()
        # Per link (a Peer is one connection), the signatures of the proposals sent over
        # it while its peer could take them.
        self._delivered: WeakKeyDictionary[Peer, OrderedDict[bytes, None]] = WeakKeyDictionary()
        switch.handlers["proposal"] = self._on_proposal
        switch.handlers["vote"] = self._on_vote
        switch.handlers["evidence"] = self._on_evidence

    def broadcast_proposal(self, proposal: Proposal, exclude: Collection[bytes] = ()) -> None:
        """To every peer but ``exclude`` and those whose link carried it already (the
        module's docstring says when that is enough)."""
        skip = set(exclude)
        for key, peer in self.switch.peers.items():
            if key in skip:
                continue
            sent = self._delivered.setdefault(peer, OrderedDict())
            if proposal.sig in sent:
                skip.add(key)
            elif peer.height >= proposal.height - 1:  # its engine is at that height or past
                sent[proposal.sig] = None
                if len(sent) > DELIVERED_MAX:
                    sent.popitem(last=False)
        self.switch.broadcast("proposal", exclude=skip, proposal=proposal.to_wire())

    def broadcast_vote(self, vote: Vote, exclude: Collection[bytes] = ()) -> None:
        self.switch.broadcast("vote", exclude=exclude, vote=vote.to_wire())

    def broadcast_evidence(self, first: Vote, second: Vote) -> None:
        self.switch.broadcast("evidence", a=first.to_wire(), b=second.to_wire())

    def _wanted(self, height: object, wire: dict[str, Any]) -> bool:
        """Whether to hand a vote (its wire map) to the driver, which checks its
        signature: one of the engine's height once; one of the next height every time (the
        engine keeps a few a validator, and a copy it did not keep needs another chance);
        none of another height, and it is not remembered either. A node behind, syncing
        blocks, takes a round's messages when they are relayed again once it has reached
        their height; remembered from before, they were dropped for ever, and a validator
        voted in while behind never voted at its first height: the others waited for it."""
        if self.driver is None or type(height) is not int:
            return True  # from_wire names what is wrong with it
        current = self.driver.engine.height
        if height == current:
            return self._first_time(crypto.sha256(codec.encode(wire)))
        return height == current + 1

    def _first_time(self, key: bytes) -> bool:
        if key in self._seen:
            return False
        _remember(self._seen, key, SEEN_MAX)
        return True

    def _on_proposal(self, peer: Peer, fields: dict[str, Any]) -> None:
        """Which proposals reach the driver is as ``_wanted`` says for votes, but those of
        the engine's height are told apart by round, not by a hash of the whole message
        (encoding and hashing a block of megabytes at every copy, about 2.5 ms for 2.6 MB
        with each proposal received 1.6 times under load, cost about 1.5% of a validator's
        CPU; benchmarks note 62). The engine keeps the first proposal of a round, from that
        round's proposer; once one has arrived here with its signature checked, any other
        of that round is dropped before its block is decoded. One whose signature does not
        check out is never remembered (so it cannot stand in for the genuine one) and
        disconnects the peer that sent it: a peer relays only proposals it checked."""
        wire = fields["proposal"]
        driver = self.driver
        # Its height and round read before its block is decoded: a copy not wanted costs
        # nothing more.
        height, round_ = wire.get("height"), wire.get("round")
        current = driver is not None and type(height) is int and height == driver.engine.height
        if current:
            if type(round_) is int and (height, round_) in self._proposals:
                return  # that round's proposal arrived already
        elif driver is not None and type(height) is int and height != driver.engine.height + 1:
            return  # of another height: not remembered either
        try:
            proposal = Proposal.from_wire(wire, max_block_bytes=self.max_block_bytes)
        except (InvalidEncoding, EhrError) as err:
            raise PeerError(f"malformed proposal: {err}") from err
        if driver is None:
            return
        vals = driver.engine.vals
        if current and proposal.proposer == vals.proposer(proposal.height, proposal.round):
            if not proposal.verify(driver.chain.genesis.chain_id):
                raise PeerError("a proposal's signature does not check out")
            _remember(self._proposals, (proposal.height, proposal.round), PROPOSALS_MAX)
        # The driver checks its signature again (one check, beside the block's decode and
        # hashes), and drops a proposal from anyone but the round's proposer.
        driver.submit_proposal(proposal)

    def _on_vote(self, peer: Peer, fields: dict[str, Any]) -> None:
        try:
            vote = Vote.from_wire(fields["vote"])
        except InvalidEncoding as err:
            raise PeerError(f"malformed vote: {err}") from err
        if self.driver is not None and self._wanted(vote.height, fields["vote"]):
            self.driver.submit_vote(vote)

    def _on_evidence(self, peer: Peer, fields: dict[str, Any]) -> None:
        try:
            first, second = Vote.from_wire(fields["a"]), Vote.from_wire(fields["b"])
        except InvalidEncoding as err:
            raise PeerError(f"malformed evidence: {err}") from err
        if self.driver is not None:
            self.driver.submit_evidence(first, second)


def _remember(seen: OrderedDict[Any, None], key: Any, most: int) -> None:
    seen[key] = None
    if len(seen) > most:
        seen.popitem(last=False)


class TxGossip:
    """Relays transactions admitted from clients; admits transactions peers relay."""

    def __init__(self, switch: Switch, admission: Admission) -> None:
        self.switch = switch
        self.admission = admission
        self._pending: list[bytes] = []
        switch.handlers["txs"] = self._on_txs
        admission.relays.append(self.relay)

    def relay(self, txs: list[Tx]) -> None:
        if not self.switch.peers:
            return
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.extend(tx.raw for tx in txs)

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            self.switch.broadcast("txs", txs=batch)

    async def _on_txs(self, peer: Peer, fields: dict[str, Any]) -> None:
        """Admit a peer's transactions in order (the link's next frame waits for these)."""
        rejected = await self.admission.admit_relayed(fields["txs"])
        if rejected:
            log.debug(
                "%d of %d relayed txs from %s not admitted",
                rejected,
                len(fields["txs"]),
                peer.short,
            )
