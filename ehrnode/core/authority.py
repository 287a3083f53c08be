"""Proof-of-authority rules: changing the validator set, and recording evidence of a
validator that signed two different votes.

State entries (canonical msgpack values):

    b"vals"                            [[key, power], ...]: the set that votes on the next block
    b"vfrom" + height(8, BE)           the set in force from that height on (history, for
                                       checking old certificates); written when a set changes
    b"vvote" + change id(32)           {"change": {...}, "voters": [key, ...]} votes so far
    b"vpend"                           [[height, [[key, power], ...]], ...] sets to install
    b"evid" + key(32) + height(8) + round(4) + type(1)   {"height", "reporter"}

A ``validator`` transaction is one current validator's vote for a change
``{"action": "add" | "remove", "key", "power"}`` (power only for add). When the voters hold
more than 2/3 of the current power, the change is scheduled: the set after it votes on
blocks from height H+2, where H is the block in which the quorum was reached. (Block H+1
was already being agreed under the old set, whose header promised it as ``next_vals``.)

An ``evidence`` transaction carries two votes of one validator for one (height, round,
type) with different blocks, both signed; it is recorded once and stays on chain for
the institutions to act on (a ``remove`` vote, for one). Pure: no I/O.
"""

from __future__ import annotations

import struct
from typing import Any

from ehrnode.core import codec, crypto
from ehrnode.core.block import Vote, has_quorum
from ehrnode.core.errors import InvalidEncoding, InvalidTransaction
from ehrnode.core.statekv import BlockContext, Overlay, StateReader, load, save
from ehrnode.core.tx import Tx

K_VALS: bytes = b"vals"
K_PENDING = b"vpend"
P_FROM = b"vfrom"
P_VOTE = b"vvote"
P_EVIDENCE = b"evid"
MAX_VALIDATORS = 100


def _reject(code: str, message: str) -> InvalidTransaction:
    return InvalidTransaction(message, code=code)


def encode_set(powers: dict[bytes, int]) -> list[list[Any]]:
    return [[key, powers[key]] for key in sorted(powers)]


def decode_set(value: Any) -> dict[bytes, int]:
    return {key: power for key, power in value or []}


def validators(reader: StateReader) -> dict[bytes, int]:
    return decode_set(load(reader, K_VALS))


def genesis_entries(overlay: Overlay, powers: dict[bytes, int]) -> None:
    save(overlay, K_VALS, encode_set(powers))
    save(overlay, P_FROM + struct.pack(">Q", 1), encode_set(powers))


def _latest_set(overlay: Overlay, current: dict[bytes, int]) -> dict[bytes, int]:
    """The set after every change already scheduled (what a new change builds on)."""
    pending = load(overlay, K_PENDING) or []
    return decode_set(pending[-1][1]) if pending else dict(current)


def apply_validator(overlay: Overlay, ctx: BlockContext, tx: Tx) -> None:
    if tx.signer not in ctx.validators:
        raise _reject("not_validator", "only a current validator may vote on the validator set")
    body = tx.body
    change: dict[str, Any] = {"action": body["action"], "key": body["key"]}
    if body["action"] == "add":
        if "power" not in body:
            raise _reject("malformed_body", "adding a validator needs its power")
        change["power"] = body["power"]
    elif "power" in body:
        raise _reject("malformed_body", "removing a validator takes no power")
    target = _latest_set(overlay, dict(ctx.validators))
    if change["action"] == "remove":
        if change["key"] not in target:
            raise _reject("not_validator", "that key is not a validator")
        if len(target) == 1:
            raise _reject("last_validator", "the last validator cannot be removed")
    elif len(target) >= MAX_VALIDATORS and change["key"] not in target:
        raise _reject("too_many_validators", f"a network has at most {MAX_VALIDATORS} validators")
    change_id = crypto.sha256(codec.encode(change))
    entry = load(overlay, P_VOTE + change_id) or {"change": change, "voters": []}
    if tx.signer in entry["voters"]:
        raise _reject("already_voted", "this validator already voted for this change")
    entry["voters"] = sorted([*entry["voters"], tx.signer])
    power = sum(ctx.validators.get(v, 0) for v in entry["voters"])
    if not has_quorum(power, sum(ctx.validators.values())):
        save(overlay, P_VOTE + change_id, entry)
        return
    overlay.put(P_VOTE + change_id, None)
    if change["action"] == "add":
        target[change["key"]] = change["power"]
    else:
        del target[change["key"]]
    pending = load(overlay, K_PENDING) or []
    pending.append([ctx.height + 2, encode_set(target)])
    save(overlay, K_PENDING, pending)


def finish_block(overlay: Overlay, ctx: BlockContext) -> None:
    """End of block ``ctx.height``: install the set that votes from the next height on."""
    pending = load(overlay, K_PENDING) or []
    due = [entry for entry in pending if entry[0] == ctx.height + 1]
    if not due:
        return
    new_set = due[-1][1]
    save(overlay, K_VALS, new_set)
    save(overlay, P_FROM + struct.pack(">Q", ctx.height + 1), new_set)
    rest = [entry for entry in pending if entry[0] > ctx.height + 1]
    if rest:
        save(overlay, K_PENDING, rest)
    else:
        overlay.put(K_PENDING, None)


def apply_evidence(overlay: Overlay, ctx: BlockContext, tx: Tx) -> None:
    try:
        first, second = Vote.from_wire(tx.body["a"]), Vote.from_wire(tx.body["b"])
    except InvalidEncoding as err:
        raise _reject("malformed_body", f"evidence must hold two votes: {err}") from err
    slot = (first.validator, first.height, first.round, first.type)
    if slot != (second.validator, second.height, second.round, second.type):
        raise _reject(
            "not_evidence", "the two votes are not for one validator, height, round and type"
        )
    if first.block == second.block:
        raise _reject("not_evidence", "the two votes are for the same block")
    if first.validator not in ctx.validators:
        raise _reject("not_validator", "the votes' signer is not a current validator")
    if first.height > ctx.height:
        raise _reject("not_evidence", "the votes are for a height not reached yet")
    if not (first.verify(ctx.chain) and second.verify(ctx.chain)):
        raise _reject("bad_signature", "a vote in the evidence does not verify")
    key = P_EVIDENCE + first.validator + struct.pack(">QIB", first.height, first.round, first.type)
    if overlay.get(key) is not None:
        raise _reject("duplicate", "this double vote is already on chain")
    save(overlay, key, {"height": ctx.height, "reporter": tx.signer})
