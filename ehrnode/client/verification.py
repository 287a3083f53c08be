"""What a client checks for itself instead of trusting a node: a transaction's inclusion
proof against the validator set it holds, and a patient's access log as one signed,
unbroken hash chain. Pure: bytes and JSON in, a verdict out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ehrnode.client.errors import AuditLogBroken
from ehrnode.core import codec, crypto
from ehrnode.core.access import ZERO, entry_hash, verify_chain
from ehrnode.core.block import Block, Certificate, InclusionProof, validator_set_hash
from ehrnode.core.errors import InvalidBlock, InvalidEncoding

MAX_PROOF_BYTES = 4 * 1024 * 1024
_BYTES_FIELDS = ("reader", "record", "node", "request", "prev", "sig")


def verify_proof(raw: bytes, tx_id: bytes, chain: str, powers: Mapping[bytes, int]) -> int:
    """Check a msgpack inclusion proof of ``tx_id``; return the height it was final at.

    Raises InvalidBlock when the proof is malformed, names another transaction, or does
    not lead to a header signed by more than 2/3 of ``powers``.
    """
    try:
        proof = InclusionProof.from_wire(codec.decode(raw, max_bytes=MAX_PROOF_BYTES))
    except InvalidEncoding as err:
        raise InvalidBlock(f"the proof is malformed: {err}", code="bad_proof") from err
    if crypto.sha256(proof.tx) != tx_id:
        raise InvalidBlock("the proof is for another transaction", code="bad_proof")
    proof.verify(chain, powers)
    return proof.header.height


def proof_header(raw: bytes) -> InclusionProof:
    try:
        return InclusionProof.from_wire(codec.decode(raw, max_bytes=MAX_PROOF_BYTES))
    except InvalidEncoding as err:
        raise InvalidBlock(f"the proof is malformed: {err}", code="bad_proof") from err


def decode_block_and_certificate(raw: bytes) -> tuple[bytes, bytes]:
    """``GET /v1/blocks/{h}?format=msgpack``: {"block": bytes, "certificate": bytes}."""
    try:
        pair = codec.decode(raw, max_bytes=MAX_PROOF_BYTES * 64)
        return pair["block"], pair["certificate"]
    except (InvalidEncoding, KeyError, TypeError) as err:
        raise InvalidBlock("the node sent a malformed block", code="bad_proof") from err


def next_set(
    chain: str,
    trusted: Mapping[bytes, int],
    block_raw: bytes,
    cert_raw: bytes,
    new: dict[bytes, int],
) -> dict[bytes, int]:
    """Trust ``new`` as the set after a block: the block must be final under ``trusted``
    and its header must name ``new`` as the next validator set."""
    try:
        block = Block.decode(block_raw, max_bytes=MAX_PROOF_BYTES * 64)
        cert = Certificate.from_wire(codec.decode(cert_raw, max_bytes=MAX_PROOF_BYTES))
    except InvalidEncoding as err:
        raise InvalidBlock(f"a block on the way is malformed: {err}", code="bad_proof") from err
    if cert.block != block.id:
        raise InvalidBlock("a certificate on the way is for another block", code="bad_proof")
    cert.verify(chain, trusted)
    if block.header.next_vals != validator_set_hash(new):
        raise InvalidBlock(
            f"block {block.header.height} does not name the validator set the node claims "
            "comes next",
            code="bad_proof",
        )
    return new


def decode_entry(view: Any) -> dict[str, Any]:
    """An access-log entry from its JSON view (bytes written as hex) back to its values."""
    try:
        entry = dict(view)
        for name in _BYTES_FIELDS:
            entry[name] = bytes.fromhex(entry[name])
        if not isinstance(entry["seq"], int) or not isinstance(entry["time"], int):
            raise TypeError("seq and time must be integers")
    except (KeyError, TypeError, ValueError) as err:
        raise AuditLogBroken(f"an access-log entry is malformed: {err}") from err
    return entry


class AccessLogChecker:
    """Checks pages of one patient's access log in order, carrying the chain across pages."""

    def __init__(self, node: bytes) -> None:
        self.node = node
        self.previous = ZERO
        self.next_seq = 0

    def check(self, entries: list[dict[str, Any]]) -> None:
        for entry in entries:
            where = f"access-log entry {entry['seq']}"
            if entry["seq"] != self.next_seq:
                raise AuditLogBroken(f"{where} is out of order: expected {self.next_seq}")
            if entry["node"] != self.node:
                raise AuditLogBroken(f"{where} was signed by another node than the one asked")
            if not verify_chain([entry], self.previous):
                raise AuditLogBroken(
                    f"{where} does not link to the entry before it or its signature is bad"
                )
            self.previous = entry_hash(entry)
            self.next_seq += 1
