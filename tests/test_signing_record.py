"""The validator's signing record on disk (``consensus.signing``): what it signed and the
block it is locked on survive a restart, and a signed proposal (its block) is stored once."""

from __future__ import annotations

import random
from pathlib import Path

from ehrnode.consensus.signing import K_LOCK, K_SIGN, STEP_PROPOSAL, SigningRecord
from ehrnode.consensus.sim_node import CHAIN, SimNode
from ehrnode.consensus.validators import ValidatorSet
from ehrnode.core import codec
from ehrnode.core.block import PRECOMMIT, PREVOTE, Block, sign_proposal, sign_vote
from ehrnode.core.crypto import Identity
from ehrnode.store.db import LevelKV

ME = Identity(b"\x07" * 32)
VALS = ValidatorSet({ME.public_key: 1})
MAX = 1 << 30


def _block(tag: int) -> Block:
    return SimNode(0, ME).build(random.Random(tag), 0.0, VALS)


def _open(tmp_path: Path) -> tuple[LevelKV, SigningRecord]:
    kv = LevelKV(tmp_path / "data")
    return kv, SigningRecord(kv)


def _precommit(record: SigningRecord, block: Block, round_: int) -> bytes:
    height = block.header.height
    vote = sign_vote(ME, CHAIN, PRECOMMIT, height, round_, block.id)
    msg = codec.encode(vote.to_wire())
    record.save(height, round_, PRECOMMIT, block.id, msg, block, ())
    return msg


def test_a_lock_survives_a_restart(tmp_path: Path) -> None:
    block = _block(1)
    height = block.header.height
    kv, record = _open(tmp_path)
    msg = _precommit(record, block, 2)
    kv.close()

    kv, again = _open(tmp_path)
    assert again.check(height, 2, PRECOMMIT) == msg  # the same vote, sent again
    assert again.check(height, 2, PREVOTE) is False
    restored = again.restored(height, MAX)
    assert restored is not None
    assert (restored.locked_round, restored.locked_block) == (2, block)
    kv.close()


def test_a_proposal_is_stored_once_and_sent_again_the_same_after_a_restart(
    tmp_path: Path,
) -> None:
    block = _block(2)
    height = block.header.height
    kv, record = _open(tmp_path)
    proposal = sign_proposal(ME, CHAIN, 0, -1, block)
    msg = codec.encode(proposal.to_wire())
    record.save(height, 0, STEP_PROPOSAL, block.id, msg, None)
    assert len(kv.get(K_SIGN) or b"") < 200 < len(msg)  # not a second copy of the block
    kv.close()

    kv, again = _open(tmp_path)
    assert again.check(height, 0, STEP_PROPOSAL) == msg
    assert again.check(height, 0, PREVOTE) is True
    kv.close()


def test_a_record_whose_message_was_pruned_never_signs_that_step_again(
    tmp_path: Path,
) -> None:
    block = _block(3)
    height = block.header.height
    kv, record = _open(tmp_path)
    _precommit(record, block, 0)
    record.prune(height + 1)  # the height is committed: its messages go
    again = SigningRecord(kv)
    assert again.check(height, 0, PRECOMMIT) is False
    assert again.check(height + 1, 0, PREVOTE) is True
    kv.close()


def test_a_record_written_by_an_earlier_build_is_read(tmp_path: Path) -> None:
    """Earlier builds kept a copy of the message in ``Vsign``."""
    block = _block(6)
    height = block.header.height
    vote = sign_vote(ME, CHAIN, PRECOMMIT, height, 1, block.id)
    msg = codec.encode(vote.to_wire())
    kv = LevelKV(tmp_path / "data")
    kv.write(
        {
            K_SIGN: codec.encode(
                {"height": height, "round": 1, "step": PRECOMMIT, "block": block.id, "msg": msg}
            ),
            K_LOCK: codec.encode({"height": height, "round": 1, "block": block.raw, "pol": []}),
        },
        sync=True,
    )
    record = SigningRecord(kv)
    assert record.check(height, 1, PRECOMMIT) == msg
    restored = record.restored(height, MAX)
    assert restored is not None and restored.locked_block == block
    kv.close()
