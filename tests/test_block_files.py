"""Blocks' bytes in append-only files beside LevelDB (``store.blockfiles``): written once,
named by their place, never left half-written by a failed or interrupted commit; and each
committed transaction's bytes read alone from their place within their block's."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ehrnode.consensus.execution import block_context, make_block
from ehrnode.consensus.signing import SigningRecord
from ehrnode.core import codec, crypto, state, tx
from ehrnode.core.block import PRECOMMIT, Block, Certificate, sign_proposal, sign_vote
from ehrnode.core.errors import NotFound, Unavailable
from ehrnode.core.genesis import Genesis, ValidatorInfo
from ehrnode.core.tx import Tx
from ehrnode.store.blockfiles import PLACE
from ehrnode.store.chain import K_HEAD, STATE_LAYOUT, T_BLOCK, Chain, height_key
from ehrnode.store.check import check_chain
from ehrnode.store.db import LevelKV, MemoryKV

ME = crypto.Identity(b"\x09" * 32)
GENESIS = Genesis("block-files", 1_700_000_000_000, (ValidatorInfo(ME.public_key, 1, "me"),))


class Home:
    def __init__(self, root: Path, *, files: bool = True) -> None:
        self.root = root
        self.kv = LevelKV(root / "data")
        self.chain = Chain(self.kv, GENESIS, root / "blocks" if files else None)

    def reopen(self, *, files: bool = True) -> None:
        self.close()
        self.__init__(self.root, files=files)  # type: ignore[misc]

    def close(self) -> None:
        self.chain.close()
        self.kv.close()

    def next_block(self, txs: Sequence[Tx] = ()) -> Block:
        """The next block, holding ``txs`` (executed as if they changed nothing)."""
        head = self.chain.head
        ctx = block_context(self.chain, head.height + 1, GENESIS.genesis_time + head.height + 1)
        last = None if head.height == 0 else self.chain.certificate(head.height)
        return make_block(self.chain, ctx, ME.public_key, list(txs), self.chain.validators(), last)

    def commit(self, block: Block) -> None:
        self.chain.commit(block, *self._decided(block))

    async def commit_from_loop(self, block: Block) -> None:
        await self.chain.commit_from_loop(block, *self._decided(block))

    def _decided(self, block: Block) -> tuple[Certificate, state.Execution]:
        height = block.header.height
        ctx = block_context(self.chain, height, block.header.time)
        execution = state.execute_block(self.chain.state, ctx, [], self.chain.head.digest)
        vote = sign_vote(ME, GENESIS.chain_id, PRECOMMIT, height, 0, block.id)
        return Certificate(height, 0, block.id, ((vote.validator, vote.sig),)), execution

    def segment_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.root / "blocks").rglob("*.seg"))


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    opened = Home(tmp_path)
    yield opened
    opened.close()


def test_a_committed_block_is_in_a_block_file_and_leveldb_holds_only_its_place(
    home: Home,
) -> None:
    blocks = []
    for _ in range(3):
        blocks.append(home.next_block())
        home.commit(blocks[-1])
    assert home.segment_bytes() == sum(len(b.raw) for b in blocks)
    for block in blocks:
        place = home.kv.get(height_key(T_BLOCK, block.header.height))
        assert place is not None and len(place) == PLACE.size
        assert not [key for key, value in home.kv.scan(b"") if block.raw in value]

    home.reopen()
    assert [home.chain.block_raw(b.header.height) for b in blocks] == [b.raw for b in blocks]
    assert check_chain(home.chain).ok
    assert codec.decode(home.kv.get(K_HEAD))["layout"] == STATE_LAYOUT


def test_a_commit_whose_batch_fails_leaves_no_bytes_and_the_next_one_lands(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    home.commit(home.next_block())
    before, head = home.segment_bytes(), home.chain.head

    def broken(changes: object, *, sync: bool = True) -> None:
        raise OSError("disk full")

    block = home.next_block()
    monkeypatch.setattr(home.kv, "write", broken)
    with pytest.raises(OSError, match="disk full"):
        home.commit(block)
    monkeypatch.undo()
    assert home.segment_bytes() == before
    assert home.chain.head == head

    home.commit(block)
    home.reopen()
    assert home.chain.block_raw(2) == block.raw
    assert check_chain(home.chain).ok


async def test_a_commit_from_the_event_loop_appends_on_the_writing_thread(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    block = home.next_block()
    await home.commit_from_loop(block)
    assert home.chain.head.height == 1
    assert len(home.kv.get(height_key(T_BLOCK, 1)) or b"") == PLACE.size
    size = home.segment_bytes()

    failing = home.next_block()
    monkeypatch.setattr(home.kv, "_batch", _failing_batch)
    with pytest.raises(OSError, match="disk full"):
        await home.commit_from_loop(failing)
    monkeypatch.undo()
    assert (home.chain.head.height, home.segment_bytes()) == (1, size)
    home.reopen()
    assert home.chain.block_raw(1) == block.raw
    assert check_chain(home.chain).ok


class _FailingBatch:
    def put(self, key: bytes, value: bytes) -> None:
        pass

    def delete(self, key: bytes) -> None:
        pass

    def write(self) -> None:
        raise OSError("disk full")


def _failing_batch(changes: object, sync: bool) -> _FailingBatch:
    return _FailingBatch()


def test_bytes_a_crash_left_past_the_committed_end_are_cut_at_start(home: Home) -> None:
    home.commit(home.next_block())
    committed = home.segment_bytes()
    [segment] = (home.root / "blocks").rglob("*.seg")
    with segment.open("ab") as f:  # a block appended, the crash before its batch
        f.write(b"\x8f" * 5000)
    home.reopen()
    assert home.segment_bytes() == committed

    block = home.next_block()
    home.commit(block)
    home.reopen()
    assert home.chain.block_raw(2) == block.raw
    assert check_chain(home.chain).ok


def test_a_missing_block_file_is_a_clear_error(home: Home) -> None:
    home.commit(home.next_block())
    home.reopen()
    for segment in (home.root / "blocks").rglob("*.seg"):
        segment.unlink()
    with pytest.raises(Unavailable, match=r"missing from block segment 0.*damaged"):
        home.chain.block_raw(1)


def _txs_of_each_bin_form() -> list[Tx]:
    """Transactions whose bytes take each of msgpack's bin forms within a block's array."""

    def item() -> dict[str, Any]:
        keys = sorted([os.urandom(32), os.urandom(80)] for _ in range(4))
        patient = keys[0][0]  # wrapped for
        blob = os.urandom(32)
        return {"patient": patient, "blob": blob, "size": 1, "type": "Note", "keys": keys}

    chain = GENESIS.chain_id
    txs = [
        tx.make(ME, chain, "register", 1, {"role": "patient"}),
        tx.make(ME, chain, "register", 2, {"role": "patient", "name": "n" * 200}),
        tx.make(ME, chain, "records", 3, {"items": [item() for _ in range(200)]}),
    ]
    assert len(txs[0].raw) < 0x100 <= len(txs[1].raw) < 0x10000 <= len(txs[2].raw)
    return txs


@pytest.mark.parametrize("files", [True, False], ids=["block files", "in its entry"])
def test_a_committed_transaction_is_read_alone_from_its_place_in_its_block(
    tmp_path: Path, files: bool
) -> None:
    """The transaction index places each transaction's bytes within its block's, so one is
    read without the rest of the block (a record's wrapped keys are read so)."""
    home = Home(tmp_path, files=files)
    try:
        txs = _txs_of_each_bin_form()
        home.commit(home.next_block([txs[1]]))
        home.commit(home.next_block([txs[0], txs[2]]))
        home.reopen(files=files)
        places = [(2, 0), (1, 0), (2, 1)]
        for t, (height, index) in zip(txs, places, strict=True):
            raw, location = home.chain.tx_raw(t.id)
            assert raw == t.raw
            assert (location.height, location.index) == (height, index)
            assert home.chain.tx_location(t.id) == location
            assert home.chain.tx_body(t.id) == t.body
        with pytest.raises(NotFound):
            home.chain.tx_raw(b"\x00" * 32)
    finally:
        home.close()


def test_without_block_files_a_proposed_block_is_kept_in_its_entry() -> None:
    """An in-memory chain (no block files): the signing record's slot holds the block."""
    chain = Chain(MemoryKV(), GENESIS)
    home = SimpleNamespace(chain=chain)
    block = Home.next_block(home)  # type: ignore[arg-type]
    SigningRecord(chain).save(sign_proposal(ME, GENESIS.chain_id, 0, -1, block))
    assert chain.kv.get(height_key(T_BLOCK, 1)) == block.raw
    assert chain.stored_block(1) == block.raw
    assert SigningRecord(chain).holds(1, block.id)
