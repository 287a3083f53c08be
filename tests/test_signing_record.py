"""The validator's signing record on disk (``consensus.signing``): what it signed and the
block it is locked on survive a restart, and a block is stored once, outside LevelDB."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from ehrnode.consensus.signing import K_LOCK, K_SIGN, STEP_PROPOSAL, SigningRecord
from ehrnode.consensus.sim_node import CHAIN, SimNode
from ehrnode.consensus.validators import ValidatorSet
from ehrnode.core import codec
from ehrnode.core.block import PRECOMMIT, PREVOTE, Block, sign_proposal, sign_vote
from ehrnode.core.crypto import Identity
from ehrnode.core.errors import ConfigError
from ehrnode.store.db import LevelKV

ME = Identity(b"\x07" * 32)
VALS = ValidatorSet({ME.public_key: 1})
MAX = 1 << 30


def _block(tag: int) -> Block:
    return SimNode(0, ME).build(random.Random(tag), 0.0, VALS)


def _precommit(record: SigningRecord, block: Block, round_: int) -> bytes:
    height = block.header.height
    vote = sign_vote(ME, CHAIN, PRECOMMIT, height, round_, block.id)
    msg = codec.encode(vote.to_wire())
    record.save(height, round_, PRECOMMIT, block.id, msg, block, ())
    return msg


def test_a_lock_survives_a_restart_with_its_block_in_a_file_not_in_leveldb(
    tmp_path: Path,
) -> None:
    block = _block(1)
    height = block.header.height
    kv = LevelKV(tmp_path / "data")
    record = SigningRecord(kv, tmp_path / "locks")
    msg = _precommit(record, block, 2)
    # LevelDB holds the lock's names, not the block's bytes.
    assert len(kv.get(K_LOCK) or b"") < 200 < len(block.raw)
    [file] = (tmp_path / "locks").iterdir()
    assert file.read_bytes() == block.raw
    kv.close()

    kv = LevelKV(tmp_path / "data")
    again = SigningRecord(kv, tmp_path / "locks")
    assert again.check(height, 2, PRECOMMIT) == msg  # the same vote, sent again
    restored = again.restored(height, MAX)
    assert restored is not None
    assert (restored.locked_round, restored.locked_block) == (2, block)
    kv.close()


def test_a_proposal_is_stored_once_and_sent_again_the_same_after_a_restart(
    tmp_path: Path,
) -> None:
    block = _block(2)
    height = block.header.height
    kv = LevelKV(tmp_path / "data")
    record = SigningRecord(kv, tmp_path / "locks")
    proposal = sign_proposal(ME, CHAIN, 0, -1, block)
    msg = codec.encode(proposal.to_wire())
    record.save(height, 0, STEP_PROPOSAL, block.id, msg, None)
    assert len(kv.get(K_SIGN) or b"") < 200 < len(msg)  # not a second copy of the block
    kv.close()

    kv = LevelKV(tmp_path / "data")
    again = SigningRecord(kv, tmp_path / "locks")
    assert again.check(height, 0, STEP_PROPOSAL) == msg
    assert again.check(height, 0, PREVOTE) is True
    kv.close()


def test_a_lock_whose_file_is_gone_or_damaged_stops_the_start_with_a_clear_error(
    tmp_path: Path,
) -> None:
    block = _block(3)
    kv = LevelKV(tmp_path / "data")
    _precommit(SigningRecord(kv, tmp_path / "locks"), block, 0)
    [file] = (tmp_path / "locks").iterdir()
    file.write_bytes(_block(4).raw)
    with pytest.raises(ConfigError, match=r"locked on block .* holds another block"):
        SigningRecord(kv, tmp_path / "locks").restored(block.header.height, MAX)
    file.unlink()
    with pytest.raises(ConfigError, match=re.escape(str(file))):
        SigningRecord(kv, tmp_path / "locks").restored(block.header.height, MAX)
    kv.close()


def test_prune_removes_the_lock_files_of_committed_heights_and_orphans(tmp_path: Path) -> None:
    block = _block(5)
    height = block.header.height
    locks = tmp_path / "locks"
    kv = LevelKV(tmp_path / "data")
    record = SigningRecord(kv, locks)
    _precommit(record, block, 0)
    # What a crash between a file and its entry leaves behind.
    (locks / f"{height:016d}-{'ab' * 32}.part").write_bytes(b"half")
    record.prune(height)  # nothing at this height is committed yet
    assert len(list(locks.iterdir())) == 2
    record.prune(height + 1)
    assert list(locks.iterdir()) == []
    kv.close()


def test_a_record_written_by_an_earlier_build_is_read(tmp_path: Path) -> None:
    """Earlier builds kept the message in ``Vsign`` and the locked block in ``Vlock``."""
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
    record = SigningRecord(kv, tmp_path / "locks")
    assert record.check(height, 1, PRECOMMIT) == msg
    restored = record.restored(height, MAX)
    assert restored is not None and restored.locked_block == block
    kv.close()
