"""One simulated validator: its durable state, its signing guard and the blocks it builds.

``SigningMemory`` is ``signing.SigningRecord`` held in memory: the same check (sign only
after the last recorded (height, round, step), or resend exactly what was recorded), the
same lock record, the same ``restored``. What a ``SimNode`` keeps across a crash is what a
real node keeps on disk: the signing record, the lock and its decided blocks. Pure.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ehrnode.consensus import engine as eng
from ehrnode.consensus.validators import ValidatorSet
from ehrnode.core import merkle
from ehrnode.core.block import (
    PRECOMMIT,
    ZERO_HASH,
    Block,
    Certificate,
    Header,
    Proposal,
    Vote,
)
from ehrnode.core.crypto import Identity, sha256
from ehrnode.core.errors import InvalidBlock

CHAIN = "sim"
STEP_PROPOSAL = 0

Message = Proposal | Vote


def step_of(message: Message) -> int:
    return STEP_PROPOSAL if isinstance(message, Proposal) else message.type


def block_of(message: Message) -> bytes | None:
    return message.block.id if isinstance(message, Proposal) else message.block


@dataclass
class SigningMemory:
    """``signing.SigningRecord`` without the disk: survives a simulated crash. Like the
    driver's ``Vmsg`` keys it keeps every message signed at the latest height, so that a
    restarted node can send them again and count them again: a vote only its signer knew
    of, lost with a crash, can leave everyone waiting for it."""

    last: tuple[int, int, int, bytes | None] | None = None
    msg: Message | None = None
    lock: tuple[int, int, Block, tuple[Vote, ...]] | None = None  # with its POL prevotes
    height_messages: list[Message] = field(default_factory=list)

    def check(self, height: int, round_: int, step: int, block_id: bytes | None) -> Message | bool:
        """True: may sign. A message: already signed exactly this, resend it. False: refuse."""
        if self.last is None or (height, round_, step) > self.last[:3]:
            return True
        if (height, round_, step) == self.last[:3] and self.last[3] == block_id:
            assert self.msg is not None
            return self.msg
        return False

    def save(self, message: Message, lock: Block | None, pol: tuple[Vote, ...] = ()) -> None:
        if self.last is not None and self.last[0] != message.height:
            self.height_messages = []
        self.last = (message.height, message.round, step_of(message), block_of(message))
        self.msg = message
        self.height_messages.append(message)
        if lock is not None:
            self.lock = (message.height, message.round, lock, pol)

    def restored(self, height: int) -> eng.Restored | None:
        if self.last is None or self.last[0] != height:
            return None
        restored = eng.Restored(
            round=self.last[1], step=self.last[2], messages=tuple(self.height_messages)
        )
        if self.lock is not None and self.lock[0] == height:
            _, restored.locked_round, restored.locked_block, pol = self.lock
            restored.messages += pol
        return restored


@dataclass
class SimNode:
    index: int
    identity: Identity
    byzantine: bool = False
    engine: eng.Engine | None = None  # None while crashed
    incarnation: int = 0  # timers set before a crash must not fire after it
    # durable
    signing: SigningMemory = field(default_factory=SigningMemory)
    chain: dict[int, tuple[Block, Certificate]] = field(default_factory=dict)
    # volatile
    sent: dict[tuple[int, int], list[Message]] = field(default_factory=dict)
    syncing: bool = False

    def __post_init__(self) -> None:
        self.key = self.identity.public_key

    @property
    def height(self) -> int:
        """The height this node works on: one above its last decided block."""
        return len(self.chain) + 1

    def last_id(self) -> bytes:
        return self.chain[len(self.chain)][0].id if self.chain else ZERO_HASH

    def validate(self, block: Block) -> bool:
        """What ``Executor.is_valid`` checks that matters here: form and the link back."""
        try:
            block.check_form()
        except InvalidBlock:
            return False
        return block.header.height == self.height and block.header.prev == self.last_id()

    def build(self, rng: random.Random, now: float, vals: ValidatorSet) -> Block:
        """A block on top of our last decided one, holding a few random dummy transactions."""
        txs = [rng.randbytes(rng.randint(8, 24)) for _ in range(rng.randint(1, 3))]
        last_commit = self.chain[len(self.chain)][1] if self.chain else None
        header = Header(
            chain=CHAIN,
            height=self.height,
            time=int(now * 1000),
            proposer=self.key,
            prev=self.last_id(),
            txs=merkle.root([sha256(t) for t in txs]),
            ntx=len(txs),
            vals=vals.hash,
            next_vals=vals.hash,
            state=ZERO_HASH,
            last_commit=ZERO_HASH if last_commit is None else last_commit.hash(),
        )
        return Block.build(header, txs, last_commit)


def lock_of(action: eng.SignVote) -> Block | None:
    return action.lock if action.type == PRECOMMIT else None


def describe_restored(restored: eng.Restored | None) -> str:
    if restored is None:
        return "nothing"
    lock = "none" if restored.locked_block is None else restored.locked_block.id.hex()[:8]
    return (
        f"round {restored.round} step {restored.step} lock {lock} (round {restored.locked_round})"
    )


def describe(message: Message) -> str:
    block = block_of(message)
    what = "nil" if block is None else block.hex()[:8]
    kind = {0: "proposal", 1: "prevote", 2: "precommit"}[step_of(message)]
    pol = f" pol {message.pol_round}" if isinstance(message, Proposal) else ""
    return f"{kind} h{message.height} r{message.round} {what}{pol}"
