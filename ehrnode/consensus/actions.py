"""The consensus engine's vocabulary: the actions it asks for, its timeouts, and what a
restart restores. Pure data (imports only ``core``); part of the engine, kept apart so
that the driver and the simulator can name them without the state machine itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from ehrnode.core.block import Block, Certificate, Proposal, Vote

PROPOSE, PREVOTE_STEP, PRECOMMIT_STEP = 0, 1, 2
STEP_NAMES = {PROPOSE: "propose", PREVOTE_STEP: "prevote", PRECOMMIT_STEP: "precommit"}


# --- actions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestBlock:
    """We propose: build a block for (height, round) and hand it to ``on_block``."""

    height: int
    round: int


@dataclass(frozen=True)
class SignProposal:
    height: int
    round: int
    pol_round: int
    block: Block


@dataclass(frozen=True)
class SignVote:
    """Sign and send a vote. A precommit for a block also sets our lock to ``lock``; ``pol``
    holds the prevotes that justify it, to be kept with the lock (see ``Restored``)."""

    type: int
    height: int
    round: int
    block_id: bytes | None
    lock: Block | None = None
    lock_round: int = -1
    pol: tuple[Vote, ...] = ()


@dataclass(frozen=True)
class ScheduleTimeout:
    kind: str  # "propose" | "prevote" | "precommit" | "rebroadcast"
    height: int
    round: int
    delay: float


@dataclass(frozen=True)
class Decide:
    height: int
    block: Block
    certificate: Certificate


@dataclass(frozen=True)
class Evidence:
    first: Vote
    second: Vote


@dataclass(frozen=True)
class Rebroadcast:
    """Resend our own messages of (height, round), and ``relay``: what a peer may have missed
    (the paper assumes gossip delivers to every correct process whatever one of them
    received): this round's proposal and votes, ours and others'; the previous round's
    precommits, which let a node still in that round time out and follow us; and the
    prevotes that justify our valid value, which a later proposal of it names as pol_round.
    Ours are in ``relay`` too, because after a restart the driver no longer holds them.
    ``holders``: the validators whose votes of this round name its proposal's block, so
    hold it (a validator votes only for a block it has); the proposal, megabytes, need not
    go to them again."""

    height: int
    round: int
    relay: tuple[Proposal | Vote, ...] = ()
    holders: frozenset[bytes] = frozenset()


Action = RequestBlock | SignProposal | SignVote | ScheduleTimeout | Decide | Evidence | Rebroadcast


@dataclass(frozen=True)
class Timeouts:
    """Seconds; each grows linearly with the round so that a slow network eventually fits."""

    propose: float = 3.0
    propose_delta: float = 0.5
    prevote: float = 0.5
    prevote_delta: float = 0.5
    precommit: float = 0.5
    precommit_delta: float = 0.5
    rebroadcast: float = 1.0

    def delay(self, kind: str, round_: int) -> float:
        if kind == "rebroadcast":
            return self.rebroadcast
        base = {"propose": self.propose, "prevote": self.prevote, "precommit": self.precommit}
        delta = {
            "propose": self.propose_delta,
            "prevote": self.prevote_delta,
            "precommit": self.precommit_delta,
        }
        return base[kind] + delta[kind] * round_


@dataclass
class Restored:
    """What the signing record says after a restart, for the height being resumed.

    ``messages``: the last message we signed and the prevotes kept with our lock (its POL).
    The engine counts them again: our own vote, or the polka behind our lock, may be known
    to no one else, and without it the others can wait for us forever or never accept our
    locked block when we re-propose it."""

    round: int = 0
    step: int = PROPOSE
    locked_round: int = -1
    locked_block: Block | None = None
    messages: tuple[Proposal | Vote, ...] = ()
