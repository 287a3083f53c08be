"""A patient's side of consent, and checking what the node says: grants, revocation,
erasure, the audit trail and inclusion proofs. ``Client`` exposes each as a method.

A grant gives the grantee the data keys it needs, never the patient's key: for each
record the patient fetches its own wrapped key (a signed, logged read), unwraps it here
and wraps it again for the grantee. A standing grant also wraps the keys of the
patient's existing records of the granted types (every version, not only the latest);
records written later carry the grantee's key because writers must add it, and one
written between the listing and the grant makes the chain refuse the grant, which is then
made again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ehrnode.client.errors import (
    InvalidEncoding,
    InvalidTransaction,
    LimitExceeded,
    NotFound,
    RecordErased,
)
from ehrnode.client.values import KeyLike, Submitted, key_bytes, to_ms
from ehrnode.client.verification import (
    AccessLogChecker,
    decode_block_and_certificate,
    decode_entry,
    next_set,
    proof_header,
    verify_proof,
)
from ehrnode.core import crypto, tx
from ehrnode.core.block import validator_set_hash
from ehrnode.core.errors import EhrError

if TYPE_CHECKING:
    from ehrnode.client.sdk import Client

PARALLEL_READS = 16
LOG_PAGE = 1000
# A standing grant listed again when records were written while it was made, each time
# once the node has committed a block after the last listing (or this long has passed).
STANDING_ATTEMPTS = 5
NEXT_BLOCK_WAIT_S = 10.0


async def rewrap(client: Client, record_ids: list[bytes], grantee: bytes) -> list[list[bytes]]:
    """[[record id, data key wrapped for grantee], ...] sorted by record id."""
    gate = asyncio.Semaphore(PARALLEL_READS)

    async def one(record_id: bytes) -> list[bytes]:
        async with gate:
            data_key = await client.data_key(record_id)
        return [record_id, crypto.wrap_key(data_key, grantee)]

    pairs = await asyncio.gather(*(one(r) for r in sorted(set(record_ids))))
    return list(pairs)


async def readable_versions(client: Client, types: set[str] | None) -> list[bytes]:
    """Ids of every version, not erased, of the patient's records of ``types``."""
    ids: list[bytes] = []
    for head in await client.records():
        if types is not None and head["type"] not in types:
            continue
        if head["version"] == 1:
            versions = [head]
        else:
            versions = await client.versions(head["id"])
        ids.extend(bytes.fromhex(v["id"]) for v in versions if not v["erased"])
    return ids


async def grant(
    client: Client,
    grantee: KeyLike,
    records: Iterable[KeyLike] | None,
    *,
    standing: bool,
    types: Iterable[str] | None,
    expires: datetime | int | None,
    wait: bool,
) -> Submitted:
    if standing == (records is not None):
        raise EhrError(
            "a grant is either of listed records or standing, not both or neither",
            code="usage",
        )
    grantee_key = key_bytes(grantee, "grantee id")
    body: dict[str, Any] = {"grantee": grantee_key, "scope": "standing" if standing else "records"}
    expires_ms = to_ms(expires)
    if expires_ms is not None:
        body["expires"] = expires_ms
    if not standing:
        if types is not None:
            raise EhrError("types apply only to standing grants", code="usage")
        ids = [key_bytes(r, "record id") for r in records or []]
        if not ids:
            raise EhrError("name at least one record to grant", code="usage")
        await _wrap_for(client, body, ids, grantee_key)
        return await client.submit("grant", body, wait=wait)
    wanted = None if types is None else sorted(set(types))
    if wanted is not None:
        body["types"] = wanted
    for _ in range(STANDING_ATTEMPTS - 1):
        try:
            return await _standing(client, body, wanted, grantee_key, wait)
        except InvalidTransaction as err:
            if err.code != "records_changed":
                raise
        # The write that refused it may still be pending: list once a block is past.
        await client.transport.wait_height(body["through"] + 1, NEXT_BLOCK_WAIT_S)
    return await _standing(client, body, wanted, grantee_key, wait)


async def _standing(
    client: Client, body: dict[str, Any], types: list[str] | None, grantee: bytes, wait: bool
) -> Submitted:
    """Submit a standing grant with the keys of the patient's records listed now. The
    listing is at or after ``through``: a record written later makes the rules refuse the
    grant (``records_changed``), since its key would be missing."""
    body["through"] = await client.transport.height()
    ids = await readable_versions(client, None if types is None else set(types))
    body.pop("records", None)
    await _wrap_for(client, body, ids, grantee)
    return await client.submit("grant", body, wait=wait)


async def _wrap_for(client: Client, body: dict[str, Any], ids: list[bytes], grantee: bytes) -> None:
    """Put the keys of ``ids``, wrapped for ``grantee``, in the grant's ``body``."""
    if len(set(ids)) > tx.MAX_RECORDS_PER_GRANT:
        raise LimitExceeded(
            f"a grant can carry keys of at most {tx.MAX_RECORDS_PER_GRANT} records; "
            f"this one needs {len(set(ids))}"
        )
    if ids:
        body["records"] = await rewrap(client, ids, grantee)


async def erase(client: Client, record_id: KeyLike, *, wait: bool) -> list[Submitted]:
    """Erase every version of a record (one transaction per MAX_RECORDS_PER_ERASE)."""
    versions = await client.versions(record_id)
    ids = [bytes.fromhex(v["id"]) for v in versions if not v["erased"]]
    if not ids:
        raise RecordErased("every version of this record is already erased")
    step = tx.MAX_RECORDS_PER_ERASE
    return [
        await client.submit("erase", {"records": ids[i : i + step]}, wait=wait)
        for i in range(0, len(ids), step)
    ]


async def audit(client: Client) -> list[dict[str, Any]]:
    """The patient's access log on this node, every entry checked (signed by the node,
    each linked to the one before): who read which record, when. JSON views, hex ids."""
    checker = AccessLogChecker(client.transport.node_key)
    out: list[dict[str, Any]] = []
    after = -1
    while True:
        page = await client.transport.get_json(
            f"/v1/patients/{client.public_id}/access-log?after={after}&limit={LOG_PAGE}",
            signer=client.identity,
        )
        views = page["entries"]
        checker.check([decode_entry(view) for view in views])
        out.extend(views)
        if len(views) < LOG_PAGE:
            return out
        after = views[-1]["seq"]


async def verify(client: Client, tx_id: KeyLike) -> int:
    """Check a transaction's inclusion proof; return the height it is final at.

    The proof is checked here, not by the node: a Merkle path to a header that more than
    2/3 of the voting power of that height's validators signed. The set is trusted from
    genesis on: when it has changed since, each change is followed through the header
    before it (final under the set trusted so far), which names the next set's hash.

    A record written by a ``records`` transaction is proved through that transaction: its
    id must be ``record_id(tx id, item)`` and that item must name the record's blob.
    """
    tid = key_bytes(tx_id, "transaction or record id")
    try:
        raw = await client.transport.get_bytes(f"/v1/txs/{tid.hex()}/proof?format=msgpack")
    except NotFound:
        record = await client.transport.get_json(f"/v1/records/{tid.hex()}")
        if record.get("item") is None:
            raise
        return await _verify_batched(client, tid, record)
    return await _verify_raw(client, tid, raw)


async def _verify_batched(client: Client, rid: bytes, record: dict[str, Any]) -> int:
    named, item = record.get("tx"), record.get("item")
    try:
        tid = bytes.fromhex(named) if isinstance(named, str) else b""
    except ValueError:
        tid = b""
    if len(tid) != 32 or type(item) is not int or not 0 <= item < tx.MAX_RECORDS_PER_TX:
        raise InvalidEncoding("the node's record names no transaction and place", code="bad_proof")
    if tx.record_id(tid, item) != rid:
        raise InvalidEncoding(
            "the node names a transaction that did not write this record", code="bad_proof"
        )
    raw = await client.transport.get_bytes(f"/v1/txs/{tid.hex()}/proof?format=msgpack")
    height = await _verify_raw(client, tid, raw)
    # The proof checked out, so these are the bytes of the transaction with that id.
    proven = tx.decode(proof_header(raw).tx, verify_sig=False)
    items = proven.body.get("items") or []
    if item >= len(items) or items[item]["blob"].hex() != record.get("blob"):
        raise InvalidEncoding(
            "the proven transaction does not hold this record's ciphertext", code="bad_proof"
        )
    return height


async def _verify_raw(client: Client, tid: bytes, raw: bytes) -> int:
    if not raw:
        raise InvalidEncoding("the node sent an empty proof", code="bad_proof")
    header = proof_header(raw).header
    height = header.height
    powers: dict[bytes, int] = dict(client.genesis.powers)
    if header.vals != validator_set_hash(powers):
        reply = await client.transport.get_json("/v1/validators/changes")
        for change in sorted(reply["changes"], key=lambda c: c["height"]):
            if not 1 < change["height"] <= height:
                continue
            new = {bytes.fromhex(v["key"]): int(v["power"]) for v in change["validators"]}
            pair = await client.transport.get_bytes(
                f"/v1/blocks/{change['height'] - 1}?format=msgpack"
            )
            both = decode_block_and_certificate(pair)
            powers = next_set(client.chain_id, powers, both[0], both[1], new)
    return verify_proof(raw, tid, client.chain_id, powers)
