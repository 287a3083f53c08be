"""The signing record: what this validator last signed, kept durable so that after a crash
at any instant it never signs two different things for one (height, round, step).

Table ``b"V"`` in the node's LevelDB:

    b"Vsign"  {"height", "round", "step" (0 proposal, 1 prevote, 2 precommit),
               "block" (id or nil)}; the signed message itself is the b"Vmsg" entry of
               that (height, round, step) (earlier builds kept a second copy here, as
               "msg": a proposal holds its block, megabytes)
    b"Vlock"  {"height", "round", "block" (the locked block's bytes),
               "pol" [vote, ...] (the prevotes that justified the lock)}
    b"Vmsg" + height(8) + round(4) + step(1)   every message we signed at the current
              height (older heights are pruned after each commit)

A message is signed only if its (height, round, step) is after the recorded one. For the
recorded (height, round, step) itself the recorded message is sent again, never a new one
(after a restart the engine may pick another block or nil; what was signed stands).
The record, the message, and the lock a precommit sets, are written in one synced batch
before the message leaves the process.
"""

from __future__ import annotations

import struct
from typing import Any

from ehrnode.consensus import engine as eng
from ehrnode.core import codec
from ehrnode.core.block import Block, Proposal, Vote
from ehrnode.store.db import KV

K_SIGN = b"Vsign"
K_LOCK = b"Vlock"
K_MESSAGE = b"Vmsg"
STEP_PROPOSAL = 0


class SigningRecord:
    """The last thing this validator signed, kept durable in ``kv``."""

    def __init__(self, kv: KV) -> None:
        self.kv = kv
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
            batch[K_LOCK] = codec.encode(
                {
                    "height": height,
                    "round": round_,
                    "block": lock.raw,
                    "pol": [vote.to_wire() for vote in pol],
                }
            )
        self.kv.write(batch, sync=True)
        self.last = {**record, "msg": msg}

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
                restored.locked_block = Block.decode(lock["block"], max_bytes=max_block_bytes)
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


def _message_key(height: int, round_: int, step: int) -> bytes:
    return K_MESSAGE + struct.pack(">QIB", height, round_, step)
