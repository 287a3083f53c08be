"""The signing record: what this validator last signed, kept durable so that after a crash
at any instant it never signs two different things for one (height, round, step).

Table ``b"V"`` in the node's LevelDB:

    b"Vsign"  {"height", "round", "step" (0 proposal, 1 prevote, 2 precommit),
               "block" (id or nil), "slot" (id or nil: the block held in the chain's slot
               for that height, below)}; the signed message itself is the b"Vmsg" entry of
               that (height, round, step) (earlier builds kept a second copy here, as "msg")
    b"Vlock"  {"height", "round", "block_id" (the locked block, held in the slot),
               "pol" [vote, ...] (the prevotes that justified the lock)}; earlier builds
               kept the block's bytes here, as "block", still read
    b"Vmsg" + height(8) + round(4) + step(1)   every message we signed at the current
              height (older heights are pruned after each commit); a proposal whose block
              is in the slot is kept with "block_id" in place of "block"

The slot: the first block this validator proposes or locks at a height above its head is
written where the chain keeps that height's block (``store.chain.pending_block_key``, its
bytes in the block files, ``Chain.write_with_block``), so
that a block is written once: the commit of that same block does not write it again
(``holds``), and a lock or proposal only names it. A second, different block at that
height (a later round's) is kept whole in its own entries, as are all blocks of earlier
builds; the commit of another block overwrites the slot.

A message is signed only if its (height, round, step) is after the recorded one. For the
recorded (height, round, step) itself the recorded message is sent again, never a new one
(after a restart the engine may pick another block or nil; what was signed stands).
The record, the message, the slot, and the lock a precommit sets, are written in one
synced batch before the message leaves the process.
"""

from __future__ import annotations

import struct
from typing import Any

from ehrnode.consensus import engine as eng
from ehrnode.core import codec
from ehrnode.core.block import Block, Proposal, Vote
from ehrnode.core.errors import ConfigError
from ehrnode.store.chain import Chain

K_SIGN = b"Vsign"
K_LOCK = b"Vlock"
K_MESSAGE = b"Vmsg"
STEP_PROPOSAL = 0
MAX_RECORD = 1 << 30


class SigningRecord:
    """The last thing this validator signed, kept durable in ``kv``."""

    def __init__(self, chain: Chain) -> None:
        self.chain = chain
        self.kv = kv = chain.kv
        raw = kv.get(K_SIGN)
        self.last: dict[str, Any] | None = (
            None if raw is None else codec.decode(raw, max_bytes=MAX_RECORD)
        )
        # (height, block id) of the block in the chain's slot for that height.
        self.slot: tuple[int, bytes] | None = None
        if self.last is not None and self.last.get("slot") is not None:
            self.slot = (self.last["height"], self.last["slot"])
        # The heights of the messages kept (``prune``); None until the first prune has
        # scanned them.
        self._kept: set[int] | None = None

    def holds(self, height: int, block_id: bytes) -> bool:
        """Whether the chain's slot for ``height`` holds this block already (written with
        a proposal or lock), so that committing it need not write it again."""
        return self.slot == (height, block_id)

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
            msg = self._recorded_message(last)
            return False if msg is None else msg  # gone with its height: never sign again
        return False

    def _recorded_message(self, last: dict[str, Any]) -> bytes | None:
        if "msg" in last:  # an earlier build's record
            msg: bytes | None = last["msg"]
            return msg
        height = last["height"]
        stored = self.kv.get(_message_key(height, last["round"], last["step"]))
        if stored is None or last["step"] != STEP_PROPOSAL:
            return stored  # None once pruned: below every height still to be signed
        wire = self._whole(height, codec.decode(stored, max_bytes=MAX_RECORD))
        return None if wire is None else codec.encode(wire)

    def _whole(self, height: int, wire: dict[str, Any]) -> dict[str, Any] | None:
        """A stored proposal with its block: read from the slot when it was kept there;
        None when the slot has since been given to the committed block."""
        if "block_id" not in wire:
            return wire
        block_id = wire.pop("block_id")
        raw = self._slot_block(height, block_id)
        if raw is None:
            return None
        wire["block"] = raw
        return wire

    def _slot_block(self, height: int, block_id: bytes) -> bytes | None:
        if not self.holds(height, block_id):
            return None
        return self.chain.stored_block(height)

    def save(
        self, message: Proposal | Vote, lock: Block | None = None, pol: tuple[Vote, ...] = ()
    ) -> None:
        """Record ``message`` as signed (with the block a precommit locks on) in one synced
        batch; call before the message leaves the process."""
        height = message.height
        batch: dict[bytes, bytes | None] = {}
        block = message.block if isinstance(message, Proposal) else lock
        slot = self.slot if self.slot is not None and self.slot[0] == height else None
        to_slot = None
        if slot is None and block is not None:  # the slot is free: the block goes there
            to_slot, slot = block, (height, block.id)
        in_slot = block is not None and slot == (height, block.id)
        wire = message.to_wire()
        step, block_id = STEP_PROPOSAL, None
        if isinstance(message, Proposal):
            block_id = message.block.id
            if in_slot:
                del wire["block"]
                wire["block_id"] = block_id
        else:
            step, block_id = message.type, message.block
        record = {
            "height": height,
            "round": message.round,
            "step": step,
            "block": block_id,
            "slot": None if slot is None else slot[1],
        }
        batch[K_SIGN] = codec.encode(record)
        batch[_message_key(height, message.round, step)] = codec.encode(wire)
        if lock is not None:
            entry: dict[str, Any] = {
                "height": height,
                "round": message.round,
                "pol": [vote.to_wire() for vote in pol],
            }
            if in_slot:
                entry["block_id"] = lock.id
            else:
                entry["block"] = lock.raw
            batch[K_LOCK] = codec.encode(entry)
        self.chain.write_with_block(batch, to_slot)
        self.last, self.slot = record, slot
        if self._kept is not None:
            self._kept.add(height)

    def restored(self, height: int, max_block_bytes: int) -> eng.Restored | None:
        last = self.last
        if last is None or last["height"] != height:
            return None
        messages: list[Proposal | Vote] = []
        for wire in self.messages(height):
            if "pol_round" not in wire:
                messages.append(Vote.from_wire(wire))
                continue
            whole = self._whole(height, wire)
            if whole is not None:  # a proposal whose block the slot no longer holds: past
                messages.append(Proposal.from_wire(whole, max_block_bytes=max_block_bytes))
        restored = eng.Restored(round=last["round"], step=last["step"])
        raw_lock = self.kv.get(K_LOCK)
        if raw_lock is not None:
            lock = codec.decode(raw_lock, max_bytes=MAX_RECORD)
            if lock["height"] == height:
                raw = lock.get("block") or self._slot_block(height, lock["block_id"])
                if raw is None:
                    raise ConfigError(
                        f"the signing record's lock at height {height} names a block that "
                        "is not stored: the data directory is damaged"
                    )
                restored.locked_round = lock["round"]
                restored.locked_block = Block.decode(raw, max_bytes=max_block_bytes)
                messages.extend(Vote.from_wire(wire) for wire in lock.get("pol", []))
        restored.messages = tuple(messages)
        return restored

    def messages(self, height: int) -> list[Any]:
        """Everything we signed at ``height``, in (round, step) order, decoded."""
        prefix = K_MESSAGE + struct.pack(">Q", height)
        return [codec.decode(msg, max_bytes=MAX_RECORD) for _key, msg in self.kv.scan(prefix)]

    def needs_pruning(self, below_height: int) -> bool:
        """Whether ``prune(below_height)`` has anything to delete (True until a first prune
        has found what is kept). A node catching up by block sync signs nothing: its
        commits then skip the prune's trip to a worker thread."""
        return self._kept is None or min(self._kept, default=below_height) < below_height

    def prune(self, below_height: int) -> None:
        """Delete the messages signed below ``below_height`` (their heights are committed)."""
        stale: dict[bytes, bytes | None] = {}
        kept: set[int] = set()
        for key, _ in self.kv.scan(K_MESSAGE):
            height = struct.unpack(">Q", key[len(K_MESSAGE) : len(K_MESSAGE) + 8])[0]
            if height < below_height:
                stale[key] = None
            else:
                kept.add(height)
        if stale:
            self.kv.write(stale, sync=False)
        self._kept = kept


def _message_key(height: int, round_: int, step: int) -> bytes:
    return K_MESSAGE + struct.pack(">QIB", height, round_, step)
