"""JSON views of chain objects for the RPC. Bytes become lowercase hex; nothing else changes.

Reading the state for queries (records, grants) also lives here: it reads the committed
state through ``core.layout``'s layouts and never writes.
"""

from __future__ import annotations

import struct
from typing import Any

from ehrnode.core import records, state
from ehrnode.core.block import Block, Certificate, Header, InclusionProof
from ehrnode.core.errors import NotFound
from ehrnode.core.tx import Tx
from ehrnode.store.chain import Chain

MAX_PAGE = 1000


def hexify(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: hexify(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [hexify(v) for v in value]
    return value


def tx_view(tx: Tx) -> dict[str, Any]:
    return {
        "id": tx.id.hex(),
        "chain": tx.chain,
        "kind": tx.kind,
        "signer": tx.signer.hex(),
        "nonce": tx.nonce,
        "body": hexify(tx.body),
    }


def header_view(header: Header) -> dict[str, Any]:
    return {"id": header.id().hex(), **hexify(header.to_wire())}


def certificate_view(cert: Certificate) -> dict[str, Any]:
    return hexify(cert.to_wire())  # type: ignore[no-any-return]


def block_view(block: Block, certificate: Certificate | None) -> dict[str, Any]:
    return {
        "id": block.id.hex(),
        "header": header_view(block.header),
        "txs": [tx_id.hex() for tx_id in block.tx_ids],
        "last_commit": None if block.last_commit is None else certificate_view(block.last_commit),
        "certificate": None if certificate is None else certificate_view(certificate),
    }


def proof_view(proof: InclusionProof) -> dict[str, Any]:
    view: dict[str, Any] = hexify(proof.to_wire())
    view["header"] = header_view(proof.header)
    return view


def account_view(key: bytes, account: dict[str, Any] | None) -> dict[str, Any]:
    if account is None:
        return {"key": key.hex(), "registered": False, "nonce": 0}
    view = {
        "key": key.hex(),
        "registered": True,
        "role": account["role"],
        "nonce": account["nonce"],
        "since": account["since"],
        "name": account.get("name"),
        "endorsed_by": account["by"].hex() if "by" in account else None,
    }
    if account["role"] == "patient":
        view["records"] = account["nrec"]
    return view


def record_view(record_id: bytes, record: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": record_id.hex(),
        "root": records.root_of(record_id, record).hex(),
        "version": record["ver"],
        "patient": record["patient"].hex(),
        "author": record["author"].hex(),
        "type": record["type"],
        "blob": record["blob"].hex(),
        "size": record["size"],
        "height": record["height"],
        "amends": record["amends"].hex() if "amends" in record else None,
        "erased": record["erased"],
        "erased_at": record.get("erased_at"),
        "tx": record.get("tx", record_id).hex(),
        "item": record.get("item"),
    }


def committed_record(chain: Chain, record_id: bytes) -> dict[str, Any]:
    record = chain.load_state(state.P_REC + record_id)
    if record is None:
        raise NotFound("no committed record has that id", code="unknown_record")
    return record  # type: ignore[no-any-return]


def patient_records(
    chain: Chain, patient: bytes, *, after: int, limit: int, resource_type: str | None
) -> tuple[list[dict[str, Any]], int | None]:
    """The latest version of each of a patient's records, in the order first written.

    Returns a page and the cursor for the next page (None at the end).
    """
    start = state.seq_key(state.P_PREC, patient, after + 1)
    out: list[dict[str, Any]] = []
    prefix_len = len(state.P_PREC) + 32
    for key, root_id in chain.state.scan(state.P_PREC + patient, start=start):
        seq = struct.unpack(">Q", key[prefix_len:])[0]
        if len(out) >= limit:
            return out, out[-1]["seq"]  # a record follows the page: there is a next one
        root = chain.load_state(state.P_REC + root_id)
        head_id = records.head_of(root_id, root)
        head = root if head_id == root_id else chain.load_state(state.P_REC + head_id)
        if resource_type is None or head["type"] == resource_type:
            view = record_view(head_id, head)
            view["seq"] = seq
            out.append(view)
    return out, None


def record_versions(chain: Chain, root_id: bytes) -> list[dict[str, Any]]:
    """The root (version 1), then each amendment from its ``ver`` entry (seq 1 on)."""
    amendments = chain.state.scan(state.P_VER + root_id, limit=MAX_PAGE - 1)
    version_ids = [root_id, *(version_id for _key, version_id in amendments)]
    return [record_view(v, chain.load_state(state.P_REC + v)) for v in version_ids]


def patient_grants(chain: Chain, patient: bytes, now_ms: int) -> list[dict[str, Any]]:
    out = []
    for key, _ in chain.state.scan(state.P_PGR + patient, limit=MAX_PAGE):
        grant_id = key[len(state.P_PGR) + 32 :]
        grant = chain.load_state(state.P_GRANT + grant_id)
        expires = grant.get("expires")
        view = {
            "id": grant_id.hex(),
            "patient": grant["patient"].hex(),
            "grantee": grant["grantee"].hex(),
            "scope": grant["scope"],
            "types": grant.get("types"),
            "records": [r.hex() for r in grant.get("records", [])],
            "expires": expires,
            "height": grant["height"],
            "revoked": grant.get("revoked"),
            "in_force": "revoked" not in grant and (expires is None or now_ms < expires),
        }
        out.append(view)
    return out
