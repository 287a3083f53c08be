"""The validator's signing record on disk (``consensus.signing``): what it signed and the
block it is locked on survive a restart, and a block it proposes or locks on is written
once: in the chain's place for that height, where its commit finds it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ehrnode.consensus.execution import block_context, make_block
from ehrnode.consensus.signing import K_LOCK, K_MESSAGE, K_SIGN, STEP_PROPOSAL, SigningRecord
from ehrnode.core import codec, crypto, state
from ehrnode.core.block import (
    PRECOMMIT,
    PREVOTE,
    Block,
    Certificate,
    sign_proposal,
    sign_vote,
)
from ehrnode.core.errors import ConfigError, NotFound
from ehrnode.core.genesis import Genesis, ValidatorInfo
from ehrnode.store.chain import Chain, pending_block_key
from ehrnode.store.check import check_chain
from ehrnode.store.db import LevelKV

ME = crypto.Identity(b"\x07" * 32)
GENESIS = Genesis("sign-test", 1_700_000_000_000, (ValidatorInfo(ME.public_key, 1, "me"),))
CHAIN = GENESIS.chain_id
MAX = 1 << 30


class Home:
    """A validator's data directory, opened and reopened as a restarted node would."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "data"
        self.kv = LevelKV(self.path)
        self.chain = Chain(self.kv, GENESIS, tmp_path / "blocks")
        self.record = SigningRecord(self.chain)

    def restart(self) -> None:
        self.chain.close()
        self.kv.close()
        self.__init__(self.path.parent)  # type: ignore[misc]

    def block(self, tag: int) -> Block:
        """A block for the next height (empty; ``tag`` makes blocks of one height differ)."""
        head = self.chain.head
        ctx = block_context(self.chain, head.height + 1, GENESIS.genesis_time + 1000 * tag)
        last = None if head.height == 0 else self.chain.certificate(head.height)
        return make_block(self.chain, ctx, ME.public_key, [], self.chain.validators(), last)

    def precommit(self, block: Block, round_: int) -> bytes:
        vote = sign_vote(ME, CHAIN, PRECOMMIT, block.header.height, round_, block.id)
        self.record.save(vote, block)
        return codec.encode(vote.to_wire())

    def commit(self, block: Block) -> None:
        height = block.header.height
        ctx = block_context(self.chain, height, block.header.time)
        execution = state.execute_block(self.chain.state, ctx, [], self.chain.head.digest)
        vote = sign_vote(ME, CHAIN, PRECOMMIT, height, 0, block.id)
        certificate = Certificate(height, 0, block.id, ((vote.validator, vote.sig),))
        stored = self.record.holds(height, block.id)
        self.chain.commit(block, certificate, execution, stored=stored)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    opened = Home(tmp_path)
    yield opened
    opened.chain.close()
    opened.kv.close()


def test_a_lock_survives_a_restart_and_names_its_block_without_a_copy(home: Home) -> None:
    block = home.block(1)
    msg = home.precommit(block, 2)
    assert block.raw not in (home.kv.get(K_LOCK) or b"")  # it names the block
    assert home.chain.stored_block(1) == block.raw
    home.restart()

    assert home.record.check(1, 2, PRECOMMIT) == msg  # the same vote, sent again
    assert home.record.check(1, 2, PREVOTE) is False
    restored = home.record.restored(1, MAX)
    assert restored is not None
    assert (restored.locked_round, restored.locked_block) == (2, block)


def test_a_proposal_is_stored_once_and_sent_again_byte_for_byte_after_a_restart(
    home: Home,
) -> None:
    block = home.block(2)
    proposal = sign_proposal(ME, CHAIN, 0, -1, block)
    home.record.save(proposal)
    assert not [key for key, value in home.kv.scan(b"V") if block.raw in value]
    assert home.chain.stored_block(1) == block.raw  # in the chain's place only
    home.restart()

    assert home.record.check(1, 0, STEP_PROPOSAL) == codec.encode(proposal.to_wire())
    assert home.record.check(1, 0, PREVOTE) is True
    restored = home.record.restored(1, MAX)
    assert restored is not None and list(restored.messages) == [proposal]


def test_the_committed_block_is_the_one_locked_and_is_served_only_once_committed(
    home: Home,
) -> None:
    block = home.block(3)
    home.precommit(block, 0)
    with pytest.raises(NotFound):  # written, but not committed: not a block of the chain
        home.chain.block(1)
    home.restart()
    assert home.record.holds(1, block.id)
    home.commit(block)
    home.restart()

    assert home.chain.block(1) == block
    assert check_chain(home.chain).ok


def test_another_block_at_the_same_height_is_kept_whole_and_the_commit_overwrites(
    home: Home,
) -> None:
    proposed, locked, committed = home.block(4), home.block(5), home.block(6)
    proposal = sign_proposal(ME, CHAIN, 0, -1, proposed)
    home.record.save(proposal)
    home.precommit(locked, 1)  # a later round's block: the place holds the proposal's
    home.restart()

    restored = home.record.restored(1, MAX)
    assert restored is not None and restored.locked_block == locked
    assert proposal in restored.messages
    assert not home.record.holds(1, locked.id)
    home.commit(committed)  # a quorum decided a third block (this node saw it certified)
    home.restart()
    assert home.chain.block(1) == committed
    assert check_chain(home.chain).ok


def test_a_record_whose_message_was_pruned_never_signs_that_step_again(home: Home) -> None:
    block = home.block(7)
    home.precommit(block, 0)
    home.commit(block)
    home.record.prune(2)  # the height is committed: its messages go
    home.restart()
    assert home.record.check(1, 0, PRECOMMIT) is False
    assert home.record.check(2, 0, PREVOTE) is True
    assert not list(home.kv.scan(K_MESSAGE))


def test_a_prune_is_asked_for_only_while_a_message_below_its_height_is_kept(
    home: Home,
) -> None:
    assert home.record.needs_pruning(1)  # after a start: not known until a prune has looked
    home.record.prune(1)
    assert not home.record.needs_pruning(1) and not home.record.needs_pruning(5)
    block = home.block(9)
    home.precommit(block, 0)  # a message at height 1
    assert not home.record.needs_pruning(1)
    assert home.record.needs_pruning(2)
    home.commit(block)
    home.record.prune(2)
    assert not home.record.needs_pruning(2) and not list(home.kv.scan(K_MESSAGE))
    following = home.block(10)
    home.precommit(following, 0)  # height 2, kept by a prune below it
    home.record.prune(2)
    assert home.record.needs_pruning(3) and list(home.kv.scan(K_MESSAGE))


def test_a_lock_whose_block_is_missing_stops_the_start_with_a_clear_error(home: Home) -> None:
    block = home.block(8)
    home.precommit(block, 0)
    home.kv.write({pending_block_key(1): None}, sync=True)  # damaged by hand
    home.restart()
    with pytest.raises(ConfigError, match="lock at height 1 names a block that is not stored"):
        home.record.restored(1, MAX)


def test_a_record_written_by_an_earlier_build_is_read(home: Home) -> None:
    """Earlier builds kept a copy of the message in ``Vsign`` and the block in ``Vlock``."""
    block = home.block(9)
    vote = sign_vote(ME, CHAIN, PRECOMMIT, 1, 1, block.id)
    msg = codec.encode(vote.to_wire())
    old = {"height": 1, "round": 1, "step": PRECOMMIT, "block": block.id, "msg": msg}
    home.kv.write(
        {
            K_SIGN: codec.encode(old),
            K_LOCK: codec.encode({"height": 1, "round": 1, "block": block.raw, "pol": []}),
        },
        sync=True,
    )
    home.restart()
    assert home.record.check(1, 1, PRECOMMIT) == msg
    restored = home.record.restored(1, MAX)
    assert restored is not None and restored.locked_block == block
    assert not home.record.holds(1, block.id)  # its commit writes the block
