"""The Tendermint consensus algorithm as a sans-I/O state machine.

Buchman, Kwon, Milosevic, "The latest gossip on BFT consensus" (arXiv:1807.04938),
Algorithm 1, line for line; the comments name the lines. Events go in (``start_height``,
``on_proposal``, ``on_vote``, ``on_timeout``, ``on_block``, ``on_txs_available``,
``on_certified_block``) and a list of actions comes out. The engine never signs, sends,
sleeps, reads a clock or touches a disk: the driver (``consensus.driver``) or the simulator
(``consensus.sim``) does that and feeds the results back in. Its vocabulary (actions,
timeouts, what a restart restores) is in ``consensus.actions``; it imports nothing else of
the project but ``core`` and ``consensus.validators``.

What the driver must guarantee:
- every Proposal and Vote handed in has a good signature (the engine checks who sent it
  and whether they may, not the cryptography);
- a ``SignVote``/``SignProposal`` is signed only after the signing record is durable, and
  the signed message is handed back in like any other (so our own votes count);
- ``Decide`` is persisted before ``start_height`` of the next height is called.

Beyond the paper: (1) at round 0 a height waits for transactions before it proposes or
starts its propose timer (no empty blocks when idle); (2) a ``rebroadcast`` timer asks
the driver to resend our messages for the current round and to relay what peers may have
missed (the round's messages, the previous round's precommits, the polka behind our valid
value): the paper's gossip assumption, which gives liveness over lossy links once they
heal; (3) a validator's two different votes for one (height, round, type) come out as
``Evidence``, and each counts for its own value, as the paper counts messages; (4) after a
restart, ``Restored`` hands back our last signed message and the polka kept with our lock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ehrnode.consensus.actions import (
    PRECOMMIT_STEP,
    PREVOTE_STEP,
    PROPOSE,
    STEP_NAMES,
    Action,
    Decide,
    Evidence,
    Rebroadcast,
    RequestBlock,
    Restored,
    ScheduleTimeout,
    SignProposal,
    SignVote,
    Timeouts,
)
from ehrnode.consensus.validators import ValidatorSet
from ehrnode.core.block import (
    PRECOMMIT,
    PREVOTE,
    Block,
    Certificate,
    Proposal,
    Vote,
    make_certificate,
)

__all__ = [
    "PRECOMMIT_STEP",
    "PREVOTE_STEP",
    "PROPOSE",
    "STEP_NAMES",
    "Action",
    "Decide",
    "Engine",
    "Evidence",
    "Rebroadcast",
    "RequestBlock",
    "Restored",
    "ScheduleTimeout",
    "SignProposal",
    "SignVote",
    "Timeouts",
]

MAX_FUTURE_MESSAGES = 10_000
MAX_ROUND_AHEAD = 1_000
MAX_FUTURE_PROPOSALS = 2  # per validator, for the next height
MAX_FUTURE_VOTES = 16  # per validator, for the next height
MAX_VALUES_PER_VOTER = 4  # distinct values one validator's votes of one (round, type) count for


@dataclass
class _Tally:
    """Votes of one (round, type): who voted what, power per value, and the power of the
    distinct voters. An equivocator's conflicting votes each count for their own value, as
    the paper counts messages: that is no more than it could get by sending each peer a
    different vote, and without it a polka that needs its vote may never be seen by a node
    that heard the other vote first."""

    votes: dict[bytes, dict[bytes | None, Vote]] = field(default_factory=dict)
    power: dict[bytes | None, int] = field(default_factory=dict)
    total: int = 0

    def for_value(self, block_id: bytes | None) -> list[Vote]:
        return [by[block_id] for by in self.votes.values() if block_id in by]


class Engine:
    def __init__(
        self,
        me: bytes | None,
        validate: Callable[[Block], bool],
        timeouts: Timeouts | None = None,
    ) -> None:
        self.me = me
        self._validate = validate
        self.timeouts = timeouts or Timeouts()
        self.height = 0
        self.round = 0
        self.step = PROPOSE
        self.vals = ValidatorSet({b"\x00" * 32: 1})
        self._out: list[Action] = []
        self._reset_height()

    # --- height lifecycle -------------------------------------------------------------------

    def _reset_height(self) -> None:
        self.locked_value: Block | None = None
        self.locked_round = -1
        self.valid_value: Block | None = None
        self.valid_round = -1
        self.decided: Block | None = None
        self.idle = False
        self.has_txs = False
        self._proposals: dict[int, Proposal] = {}
        self._tallies: dict[tuple[int, int], _Tally] = {}
        self._valid_cache: dict[bytes, bool] = {}
        self._senders: dict[int, dict[bytes, int]] = {}  # round -> sender -> power (line 55)
        self._done: set[tuple[str, int]] = set()  # "for the first time" guards
        self._future: list[Proposal | Vote] = []
        self._future_count: dict[bytes, int] = {}  # next-height votes kept, per validator

    def start_height(
        self,
        height: int,
        vals: ValidatorSet,
        *,
        has_txs: bool,
        restored: Restored | None = None,
    ) -> list[Action]:
        future = [m for m in self._future if m.height == height]
        self._reset_height()
        self.height = height
        self.vals = vals
        self.has_txs = has_txs
        if restored is not None and restored.locked_block is not None:
            self.locked_value = restored.locked_block
            self.locked_round = restored.locked_round
            self.valid_value = restored.locked_block
            self.valid_round = restored.locked_round
        start_round = 0 if restored is None else restored.round
        mine = () if restored is None else restored.messages
        for message in mine:
            if isinstance(message, Proposal) and message.height == height:
                self._proposals.setdefault(message.round, message)  # do not propose again
        self._start_round(start_round, PROPOSE if restored is None else restored.step)
        for message in (*mine, *future):
            self._receive(message)
        return self._flush()

    def _start_round(self, round_: int, step: int = PROPOSE) -> None:  # StartRound, 11-21
        """``step`` > PROPOSE: resuming a round in which we voted before a restart, so we
        neither propose (we may have proposed something else) nor wait for a proposal."""
        self.round = round_
        self.step = step
        self.idle = (
            round_ == 0 and not self.has_txs and step == PROPOSE and round_ not in self._proposals
        )
        self._out.append(
            ScheduleTimeout(
                "rebroadcast", self.height, round_, self.timeouts.delay("rebroadcast", round_)
            )
        )
        if not self.idle and step == PROPOSE:
            self._begin_propose()

    def _begin_propose(self) -> None:
        self.idle = False
        if self.vals.proposer(self.height, self.round) == self.me:
            if self.round in self._proposals:
                pass  # we signed it before a restart; it is counted already
            elif self.valid_value is not None:
                self._out.append(
                    SignProposal(self.height, self.round, self.valid_round, self.valid_value)
                )
            else:
                self._out.append(RequestBlock(self.height, self.round))
        else:
            self._schedule("propose")

    def _schedule(self, kind: str) -> None:
        delay = self.timeouts.delay(kind, self.round)
        self._out.append(ScheduleTimeout(kind, self.height, self.round, delay))

    # --- events ---------------------------------------------------------------------------

    def on_txs_available(self) -> list[Action]:
        self.has_txs = True
        if self.idle and self.decided is None:
            self._begin_propose()
            self._apply_rules()
        return self._flush()

    def on_block(self, height: int, round_: int, block: Block) -> list[Action]:
        """The driver's answer to RequestBlock."""
        if (
            height == self.height
            and round_ == self.round
            and self.step == PROPOSE
            and self.decided is None
        ):
            self._out.append(SignProposal(height, round_, -1, block))
        return self._flush()

    def on_proposal(self, proposal: Proposal) -> list[Action]:
        self._receive(proposal)
        return self._flush()

    def on_vote(self, vote: Vote) -> list[Action]:
        self._receive(vote)
        return self._flush()

    def on_certified_block(self, block: Block, certificate: Certificate) -> list[Action]:
        """A block with a verified certificate for our height (block sync caught us up)."""
        if (
            self.decided is None
            and block.header.height == self.height
            and certificate.block == block.id
        ):
            self.decided = block
            self._out.append(Decide(self.height, block, certificate))
        return self._flush()

    def on_timeout(self, kind: str, height: int, round_: int) -> list[Action]:
        if height != self.height or self.decided is not None:
            return []
        if kind == "propose" and round_ == self.round and self.step == PROPOSE:  # lines 57-60
            self._vote(PREVOTE, None)
            self.step = PREVOTE_STEP
        elif kind == "prevote" and round_ == self.round and self.step == PREVOTE_STEP:  # 61-64
            self._vote(PRECOMMIT, None)
            self.step = PRECOMMIT_STEP
        elif kind == "precommit" and round_ == self.round:  # lines 65-67
            self._start_round(self.round + 1)
        elif kind == "rebroadcast" and round_ == self.round:
            self._out.append(Rebroadcast(height, round_, self._relay(), self._holders()))
            self._out.append(
                ScheduleTimeout(
                    "rebroadcast", height, round_, self.timeouts.delay("rebroadcast", round_)
                )
            )
        self._apply_rules()
        return self._flush()

    def _relay(self) -> tuple[Proposal | Vote, ...]:
        r = self.round
        out: list[Proposal | Vote] = []
        proposal = self._proposals.get(r)
        if proposal is not None:
            out.append(proposal)
        for key in ((r, PREVOTE), (r, PRECOMMIT), (r - 1, PRECOMMIT)):
            for by_value in self._tallies.get(key, _Tally()).votes.values():
                out.extend(by_value.values())
        if self.valid_value is not None and 0 <= self.valid_round < r:
            pol = self._tallies.get((self.valid_round, PREVOTE), _Tally())
            out.extend(pol.for_value(self.valid_value.id))
        return tuple(out)

    def _holders(self) -> frozenset[bytes]:
        """Validators whose votes of this round name its proposal's block."""
        proposal = self._proposals.get(self.round)
        if proposal is None:
            return frozenset()
        block_id = proposal.block.id
        return frozenset(
            validator
            for step in (PREVOTE, PRECOMMIT)
            for validator, by_value in self._tallies.get((self.round, step), _Tally()).votes.items()
            if block_id in by_value
        )

    def _flush(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    # --- receiving ------------------------------------------------------------------------

    def _receive(self, message: Proposal | Vote) -> None:
        if self.decided is not None and message.height == self.height:
            return
        if message.height == self.height + 1 and self.height > 0:
            self._keep_for_next_height(message)
            return
        if message.height != self.height or message.round > self.round + MAX_ROUND_AHEAD:
            return
        if isinstance(message, Proposal):
            self._receive_proposal(message)
        else:
            self._receive_vote(message)
        self._apply_rules()

    def _keep_for_next_height(self, message: Proposal | Vote) -> None:
        """Buffer a message of the next height, from validators of this one only and a
        few per sender (a proposal carries a whole block: memory an outsider could fill)."""
        sender = message.proposer if isinstance(message, Proposal) else message.validator
        if sender not in self.vals or len(self._future) >= MAX_FUTURE_MESSAGES:
            return
        count = self._future_count.get(sender, 0)
        limit = MAX_FUTURE_PROPOSALS if isinstance(message, Proposal) else MAX_FUTURE_VOTES
        if isinstance(message, Proposal):
            count = sum(1 for m in self._future if isinstance(m, Proposal) and m.proposer == sender)
        if count >= limit:
            return
        if not isinstance(message, Proposal):
            self._future_count[sender] = count + 1
        self._future.append(message)

    def _receive_proposal(self, proposal: Proposal) -> None:
        if proposal.proposer != self.vals.proposer(proposal.height, proposal.round):
            return
        if proposal.round in self._proposals:
            return  # the first proposal of a round counts; a second one is ignored
        self._proposals[proposal.round] = proposal
        self._count_sender(proposal.round, proposal.proposer)
        if self.idle and proposal.round == 0:
            self.has_txs = True
            self._begin_propose()

    def _receive_vote(self, vote: Vote) -> None:
        if vote.validator not in self.vals:
            return
        tally = self._tallies.setdefault((vote.round, vote.type), _Tally())
        by_value = tally.votes.setdefault(vote.validator, {})
        if vote.block in by_value:
            return  # a duplicate
        power = self.vals.power(vote.validator)
        if by_value:
            if len(by_value) >= MAX_VALUES_PER_VOTER:
                return  # reported already; a flood of values must not cost us memory
            self._out.append(Evidence(next(iter(by_value.values())), vote))
        else:
            tally.total += power
            self._count_sender(vote.round, vote.validator)
        by_value[vote.block] = vote
        tally.power[vote.block] = tally.power.get(vote.block, 0) + power
        if self.idle and vote.round == 0:
            self.has_txs = True
            self._begin_propose()

    def _count_sender(self, round_: int, sender: bytes) -> None:
        self._senders.setdefault(round_, {})[sender] = self.vals.power(sender)

    # --- the rules of Algorithm 1 -------------------------------------------------------------

    def _valid(self, block: Block) -> bool:
        cached = self._valid_cache.get(block.id)
        if cached is None:
            cached = block.header.height == self.height and self._validate(block)
            self._valid_cache[block.id] = cached
        return cached

    def _power(self, round_: int, vote_type: int, block_id: bytes | None) -> int:
        tally = self._tallies.get((round_, vote_type))
        return 0 if tally is None else tally.power.get(block_id, 0)

    def _total(self, round_: int, vote_type: int) -> int:
        tally = self._tallies.get((round_, vote_type))
        return 0 if tally is None else tally.total

    def _vote(self, vote_type: int, block_id: bytes | None, lock: Block | None = None) -> None:
        if self.me in self.vals:
            pol: tuple[Vote, ...] = ()
            if lock is not None:
                pol = tuple(self._tallies[(self.round, PREVOTE)].for_value(lock.id))
            lock_round = -1 if lock is None else self.round
            self._out.append(
                SignVote(vote_type, self.height, self.round, block_id, lock, lock_round, pol)
            )

    def _first(self, name: str, round_: int) -> bool:
        if (name, round_) in self._done:
            return False
        self._done.add((name, round_))
        return True

    def _apply_rules(self) -> None:
        # Each pass applies every rule whose condition holds; repeat until nothing changes
        # (a rule's effect, such as a new round, can enable another).
        while self.decided is None and self._apply_once():
            pass

    def _apply_once(self) -> bool:
        h, r = self.height, self.round
        proposal = self._proposals.get(r)

        # lines 49-54: a proposal of any round with 2f+1 precommits for it decides.
        for round_, p in self._proposals.items():
            if self.vals.is_quorum(self._power(round_, PRECOMMIT, p.block.id)) and self._valid(
                p.block
            ):
                votes = self._tallies[(round_, PRECOMMIT)].for_value(p.block.id)
                self.decided = p.block
                self._out.append(Decide(h, p.block, make_certificate(votes)))
                return False

        if proposal is not None and self.step == PROPOSE and not self.idle:
            v = proposal.block
            vr = proposal.pol_round
            if vr == -1:  # lines 22-27
                ok = self._valid(v) and (self.locked_round == -1 or self.locked_value_id == v.id)
                self._vote(PREVOTE, v.id if ok else None)
                self.step = PREVOTE_STEP
                return True
            if 0 <= vr < r and self.vals.is_quorum(self._power(vr, PREVOTE, v.id)):  # lines 28-33
                ok = self._valid(v) and (self.locked_round <= vr or self.locked_value_id == v.id)
                self._vote(PREVOTE, v.id if ok else None)
                self.step = PREVOTE_STEP
                return True

        # lines 34-35
        if (
            self.step == PREVOTE_STEP
            and self.vals.is_quorum(self._total(r, PREVOTE))
            and self._first("prevote_timeout", r)
        ):
            self._schedule("prevote")
            return True

        # lines 36-43
        if (
            proposal is not None
            and self.step >= PREVOTE_STEP
            and self.vals.is_quorum(self._power(r, PREVOTE, proposal.block.id))
            and self._valid(proposal.block)
            and self._first("polka", r)
        ):
            v = proposal.block
            if self.step == PREVOTE_STEP:
                self.locked_value = v
                self.locked_round = r
                self._vote(PRECOMMIT, v.id, lock=v)
                self.step = PRECOMMIT_STEP
            self.valid_value = v
            self.valid_round = r
            return True

        # lines 44-46
        if self.step == PREVOTE_STEP and self.vals.is_quorum(self._power(r, PREVOTE, None)):
            self._vote(PRECOMMIT, None)
            self.step = PRECOMMIT_STEP
            return True

        # lines 47-48
        if self.vals.is_quorum(self._total(r, PRECOMMIT)) and self._first("precommit_timeout", r):
            self._schedule("precommit")
            return True

        # lines 55-56: f+1 of the power is already in a later round: skip to it.
        for round_ in sorted(self._senders):
            if round_ > r and self.vals.is_one_third(sum(self._senders[round_].values())):
                self._start_round(round_)
                return True
        return False

    @property
    def locked_value_id(self) -> bytes | None:
        return None if self.locked_value is None else self.locked_value.id
