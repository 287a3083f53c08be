"""What a writer puts on chain for a record, before any I/O: the resource encrypted under a
fresh data key (``seal_record``), the body of its transaction with the key wrapped for each
reader (``record_body``), those bodies grouped into ``record``/``records`` transactions
within the chain's size limit (``batch_bodies``) and the record ids they get
(``record_ids``). Used by the SDK, the importer's worker processes and the bench.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ehrnode.client import envelope, fhir
from ehrnode.core import crypto, tx


@dataclass(frozen=True)
class SealedRecord:
    """A resource encrypted for its readers: the blob to upload and the record's body."""

    blob: bytes
    body: dict[str, Any]


def seal_record(
    patient: bytes,
    resource: fhir.Prepared,
    readers: Iterable[bytes],
    amends: bytes | None = None,
    *,
    wrapper: crypto.KeyWrapper | None = None,
) -> SealedRecord:
    """Encrypt a prepared (validated) resource with a fresh data key and wrap that key for
    each reader (with ``wrapper`` when sealing many records at once)."""
    data_key = crypto.new_data_key()
    blob = envelope.seal_resource(data_key, resource.plaintext)
    body = record_body(
        patient, crypto.sha256(blob), len(blob), resource.kind, data_key, readers, amends, wrapper
    )
    return SealedRecord(blob, body)


def record_body(
    patient: bytes,
    blob_hash: bytes,
    size: int,
    kind: str,
    data_key: bytes,
    readers: Iterable[bytes],
    amends: bytes | None = None,
    wrapper: crypto.KeyWrapper | None = None,
) -> dict[str, Any]:
    """A record transaction's body: the data key wrapped for each reader, sorted by id (a
    sealed box each, or a box from ``wrapper``'s ephemeral key)."""
    wrap = crypto.wrap_key if wrapper is None else wrapper.wrap
    keys = [[reader, wrap(data_key, reader)] for reader in sorted(set(readers))]
    body: dict[str, Any] = {
        "patient": patient,
        "blob": blob_hash,
        "size": size,
        "type": kind,
        "keys": keys,
    }
    if amends is not None:
        body["amends"] = amends
    return body


def batch_bodies(
    bodies: list[dict[str, Any]], max_tx_bytes: int
) -> list[tuple[str, dict[str, Any], int]]:
    """Record bodies as few transactions as the limits allow, in order: (kind, body,
    records). One record is a ``record``; more are ``records``, written all or none.

    A record's share of the chain's transaction limit is estimated from its wrapped keys
    (a pair of a batch wrap takes 141 bytes, the rest of a record about 130), with room to
    spare for the signature and the envelope."""
    budget = max_tx_bytes * 5 // 8
    groups: list[list[dict[str, Any]]] = []
    size = 0
    for body in bodies:
        estimate = 160 + 145 * len(body["keys"])
        if not groups or len(groups[-1]) >= tx.MAX_RECORDS_PER_TX or size + estimate > budget:
            groups.append([])
            size = 0
        groups[-1].append(body)
        size += estimate
    return [
        ("record", group[0], 1) if len(group) == 1 else ("records", {"items": group}, len(group))
        for group in groups
    ]


def record_ids(kind: str, tx_id: str, count: int) -> list[str]:
    """The ids of the records a ``record`` or ``records`` transaction wrote."""
    if kind == "record":
        return [tx_id]
    tid = bytes.fromhex(tx_id)
    return [tx.record_id(tid, i).hex() for i in range(count)]


def standing_readers(grants: list[dict[str, Any]], kind: str) -> set[bytes]:
    """Grantees a new record of ``kind`` must be wrapped to (the standing-grant rule)."""
    return {
        bytes.fromhex(g["grantee"])
        for g in grants
        if g["scope"] == "standing" and g["in_force"] and (g["types"] is None or kind in g["types"])
    }
