"""The signing record: what this validator last signed, kept durable so that after a crash
at any instant it never signs two different things for one (height, round, step).

Table ``b"V"`` in the node's LevelDB:

    b"Vsign"  {"height", "round", "step" (0 proposal, 1 prevote, 2 precommit),
               "block" (id or nil)}; the signed message itself is the b"Vmsg" entry of
               that (height, round, step) (earlier builds kept a copy here, as "msg")
    b"Vlock"  {"height", "round", "block_id", "pol" [vote, ...] (the prevotes that
               justified the lock)}; the locked block's bytes are the file
               ``<lock_dir>/<height, 16 digits>-<block id hex>.block`` (without a
               ``lock_dir``, and in earlier builds, the entry holds them as "block")
    b"Vmsg" + height(8) + round(4) + step(1)   every message we signed at the current
              height (older heights are pruned after each commit)

A message is signed only if its (height, round, step) is after the recorded one. For the
recorded (height, round, step) itself the recorded message is sent again, never a new one
(after a restart the engine may pick another block or nil; what was signed stands).
The record, the message, and the lock a precommit sets, are written in one synced batch
before the message leaves the process; a locked block's file is written and made durable
before that batch. A block is megabytes: kept out of LevelDB, it is not copied again by
its log, its flushes and its compactions (7-19% of a validator's CPU a transaction under
load, when the lock and the proposal's record each held a copy: docs/benchmarks.md,
note 38).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

from ehrnode.blobs.segments import fsync_dir
from ehrnode.consensus import engine as eng
from ehrnode.core import codec
from ehrnode.core.block import Block, Proposal, Vote
from ehrnode.core.errors import ConfigError, EhrError
from ehrnode.store.db import KV

K_SIGN = b"Vsign"
K_LOCK = b"Vlock"
K_MESSAGE = b"Vmsg"
STEP_PROPOSAL = 0


class SigningRecord:
    """The last thing this validator signed, kept durable in ``kv`` (and a locked block's
    bytes in ``lock_dir``, when given)."""

    def __init__(self, kv: KV, lock_dir: Path | None = None) -> None:
        self.kv = kv
        self.lock_dir = lock_dir
        raw = kv.get(K_SIGN)
        self.last: dict[str, Any] | None = (
            None if raw is None else codec.decode(raw, max_bytes=1 << 30)
        )
        if self.last is not None and "msg" not in self.last:
            last = self.last
            # None once pruned: the record is then below every height still to be signed.
            last["msg"] = kv.get(_message_key(last["height"], last["round"], last["step"]))

    def check(self, height: int, round_: int, step: int) -> bytes | bool:
        """True: may sign. False: refuse (we signed a later step). bytes: we already signed
        for this very (height, round, step); those recorded bytes are what we send again,
        whatever we would choose now (after a restart the new choice may differ)."""
        last = self.last
        if last is None:
            return True
        new, old = (height, round_, step), (last["height"], last["round"], last["step"])
        if new > old:
            return True
        if new == old:
            msg: bytes | None = last["msg"]
            return False if msg is None else msg  # gone with its height: never sign again
        return False

    def save(
        self,
        height: int,
        round_: int,
        step: int,
        block_id: bytes | None,
        msg: bytes,
        lock: Block | None,
        pol: tuple[Vote, ...] = (),
    ) -> None:
        record = {"height": height, "round": round_, "step": step, "block": block_id}
        batch: dict[bytes, bytes | None] = {
            K_SIGN: codec.encode(record),
            _message_key(height, round_, step): msg,
        }
        if lock is not None:
            entry: dict[str, Any] = {
                "height": height,
                "round": round_,
                "pol": [vote.to_wire() for vote in pol],
            }
            if self.lock_dir is None:
                entry["block"] = lock.raw
            else:
                self._write_lock_file(height, lock)
                entry["block_id"] = lock.id
            batch[K_LOCK] = codec.encode(entry)
        self.kv.write(batch, sync=True)
        self.last = {**record, "msg": msg}

    def _lock_file(self, height: int, block_id: bytes) -> Path:
        assert self.lock_dir is not None
        return self.lock_dir / f"{height:016d}-{block_id.hex()}.block"

    def _write_lock_file(self, height: int, block: Block) -> None:
        """The block's bytes, durable (file and directory entry) before the entry naming
        them is written; a crash in between leaves a file no entry names, which the next
        prune removes."""
        assert self.lock_dir is not None
        path = self._lock_file(height, block.id)
        if path.exists():
            return  # locked on this block at an earlier round: the file was made durable then
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".part")
        with open(partial, "wb") as handle:
            handle.write(block.raw)
            handle.flush()
            os.fdatasync(handle.fileno())
        os.replace(partial, path)
        fsync_dir(self.lock_dir)

    def _locked_block(self, lock: dict[str, Any], max_block_bytes: int) -> Block:
        if "block" in lock:
            return Block.decode(lock["block"], max_bytes=max_block_bytes)
        path = self._lock_file(lock["height"], lock["block_id"])
        try:
            block = Block.decode(path.read_bytes(), max_bytes=max_block_bytes)
        except (OSError, EhrError) as err:
            block = None
            reason = str(err)
        else:
            reason = "it holds another block"
        if block is None or block.id != lock["block_id"]:
            raise ConfigError(
                f"the signing record is locked on block {lock['block_id'].hex()[:16]} at "
                f"height {lock['height']}, but its file {path} cannot be used ({reason}); "
                "restore the file, or the node could vote against its own lock"
            )
        return block

    def restored(self, height: int, max_block_bytes: int) -> eng.Restored | None:
        last = self.last
        if last is None or last["height"] != height:
            return None
        messages: list[Proposal | Vote] = []
        for wire in self.messages(height):
            if "pol_round" in wire:
                messages.append(Proposal.from_wire(wire, max_block_bytes=max_block_bytes))
            else:
                messages.append(Vote.from_wire(wire))
        restored = eng.Restored(round=last["round"], step=last["step"])
        raw_lock = self.kv.get(K_LOCK)
        if raw_lock is not None:
            lock = codec.decode(raw_lock, max_bytes=1 << 30)
            if lock["height"] == height:
                restored.locked_round = lock["round"]
                restored.locked_block = self._locked_block(lock, max_block_bytes)
                messages.extend(Vote.from_wire(wire) for wire in lock.get("pol", []))
        restored.messages = tuple(messages)
        return restored

    def messages(self, height: int) -> list[Any]:
        """Everything we signed at ``height``, in (round, step) order, decoded."""
        prefix = K_MESSAGE + struct.pack(">Q", height)
        return [codec.decode(msg, max_bytes=1 << 30) for _key, msg in self.kv.scan(prefix)]

    def prune(self, below_height: int) -> None:
        stale = {
            key: None
            for key, _ in self.kv.scan(K_MESSAGE)
            if struct.unpack(">Q", key[len(K_MESSAGE) : len(K_MESSAGE) + 8])[0] < below_height
        }
        if stale:
            self.kv.write(stale, sync=False)
        if self.lock_dir is not None and self.lock_dir.is_dir():
            for path in self.lock_dir.iterdir():
                height = path.name.split("-", 1)[0]
                if not height.isdigit() or int(height) < below_height:
                    path.unlink(missing_ok=True)


def _message_key(height: int, round_: int, step: int) -> bytes:
    return K_MESSAGE + struct.pack(">QIB", height, round_, step)
