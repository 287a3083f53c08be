"""The Python SDK: ``async with Client(node_url, identity) as c: ...``.

A ``Client`` acts as one identity against one node. Writes validate FHIR, encrypt with
a fresh data key, upload the ciphertext and submit a signed transaction; reads fetch
ciphertext with a signed request and decrypt here. Plaintext and data keys never leave
the process. ``client.as_identity(other)`` acts as another identity over the same
connection (the importer writes as many providers at once).

Consent (grant, revoke, erase), the audit trail and proofs live in ``client.consent``;
this class exposes them as methods. Sealing a record and shaping its transaction, which
need no node, live in ``client.sealing``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from ehrnode.client import consent, envelope, fhir, files
from ehrnode.client.errors import (
    InvalidEncoding,
    InvalidTransaction,
    NodeUnreachable,
    NotAuthorised,
    error_for,
)
from ehrnode.client.http import Transport
from ehrnode.client.sealing import (
    SealedRecord,
    batch_bodies,
    record_body,
    record_ids,
    seal_record,
    standing_readers,
)
from ehrnode.client.values import KeyLike, Submitted, key_bytes
from ehrnode.core import crypto, tx
from ehrnode.core.crypto import Identity
from ehrnode.core.errors import Conflict, EhrError
from ehrnode.core.genesis import Genesis

Source = str | os.PathLike[str] | BinaryIO
PAGE = 1000
BATCH_BLOB_MAX = 64 * 1024  # the node takes blobs up to this size in a batch upload
_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{0,63}$")


class Client:
    def __init__(
        self,
        node_url: str,
        identity: Identity,
        *,
        genesis: Genesis | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.identity = identity
        self._owns_transport = transport is None
        self.transport = transport or Transport(node_url, genesis=genesis)

    async def __aenter__(self) -> Client:
        if self._owns_transport:
            await self.transport.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._owns_transport:
            await self.transport.close()

    def as_identity(self, identity: Identity) -> Client:
        """A client for ``identity`` sharing this one's connection (closed with this one)."""
        return Client(self.transport.base, identity, transport=self.transport)

    @property
    def public_key(self) -> bytes:
        return self.identity.public_key

    @property
    def public_id(self) -> str:
        return self.identity.public_id

    @property
    def chain_id(self) -> str:
        return self.transport.chain_id

    @property
    def genesis(self) -> Genesis:
        return self.transport.genesis

    # --- accounts ---------------------------------------------------------------------------

    async def account(self, key: KeyLike | None = None) -> dict[str, Any]:
        target = self.public_key if key is None else key_bytes(key)
        account: dict[str, Any] = await self.transport.get_json(f"/v1/accounts/{target.hex()}")
        return account

    def endorse(self, subject_public_key: KeyLike, role: str) -> dict[str, bytes]:
        """This identity's endorsement of ``subject`` in ``role`` (for its register)."""
        return tx.endorse(self.identity, self.chain_id, role, key_bytes(subject_public_key))

    async def register(
        self,
        role: str,
        name: str | None = None,
        endorsement: dict[str, bytes] | None = None,
        *,
        wait: bool = True,
    ) -> Submitted:
        body: dict[str, Any] = {"role": role}
        if name is not None:
            body["name"] = name
        if endorsement is not None:
            body["endorsement"] = endorsement
        return await self.submit("register", body, wait=wait)

    async def ensure_registered(
        self, role: str, name: str | None = None, endorsement: dict[str, bytes] | None = None
    ) -> bool:
        """Register unless already registered in ``role``; True when it registered now."""
        account = await self.account()
        if account["registered"]:
            if account["role"] != role:
                raise Conflict(
                    f"{self.public_id[:16]}… is already registered as {account['role']}, "
                    f"not {role}",
                    code="already_registered",
                )
            return False
        await self.register(role, name, endorsement)
        return True

    # --- transactions -----------------------------------------------------------------------

    async def submit(self, kind: str, body: dict[str, Any], *, wait: bool = True) -> Submitted:
        """Sign and submit one transaction as this identity; wait for commit if ``wait``."""
        nonces = self.transport.nonces
        async with nonces.reserve({self.public_key: 1}) as first:
            raw, tx_id = tx.sign(self.identity, self.chain_id, kind, first[self.public_key], body)
            reply = await self.transport.post_tx(raw, wait=wait)
        if reply.get("id") != tx_id.hex():
            raise InvalidEncoding("the node answered for another transaction", code="bad_node")
        return Submitted(tx_id.hex(), str(reply["status"]), reply.get("height"))

    async def submit_many(
        self, items: list[tuple[Identity, str, dict[str, Any]]], *, wait: bool = True
    ) -> list[Submitted]:
        """Sign and submit many transactions (of any signers) in one batch, in order."""
        keys = [signer.public_key for signer, _kind, _body in items]  # derived once each
        counts: dict[bytes, int] = {}
        for key in keys:
            counts[key] = counts.get(key, 0) + 1
        async with self.transport.nonces.reserve(counts) as first:
            used = dict.fromkeys(counts, 0)
            signed = []
            for key, (signer, kind, body) in zip(keys, items, strict=True):
                signed.append(tx.sign(signer, self.chain_id, kind, first[key] + used[key], body))
                used[key] += 1
            results = await self.transport.post_batch([raw for raw, _ in signed], wait=wait)
            out = []
            for index, ((_, tx_id), result) in enumerate(zip(signed, results, strict=True)):
                if result.get("status") == "rejected":
                    raise error_for(
                        400,
                        str(result.get("code", "rejected")),
                        f"transaction {index + 1} of {len(signed)} in the batch was rejected: "
                        f"{result.get('message', '')}",
                    )
                if result.get("id") != tx_id.hex():
                    raise InvalidEncoding("the node answered for another transaction")
                out.append(Submitted(tx_id.hex(), str(result["status"]), result.get("height")))
        return out

    async def wait_committed(self, ids: list[str], timeout: float = 60.0) -> list[Submitted]:
        """Wait until these transactions are committed; raise the first rejection."""
        out: list[Submitted] = []
        for start in range(0, len(ids), 5000):
            chunk = [bytes.fromhex(i) for i in ids[start : start + 5000]]
            for result in await self.transport.wait_txs(chunk, timeout):
                if result["status"] == "rejected":
                    raise error_for(
                        400,
                        str(result.get("code")),
                        f"transaction {result['id'][:16]}… was "
                        f"rejected: {result.get('message', '')}",
                    )
                if result["status"] != "committed":
                    raise NodeUnreachable(
                        f"transaction {result['id'][:16]}… was not committed within {timeout} s"
                    )
                out.append(Submitted(result["id"], "committed", result.get("height")))
        return out

    # --- writing ----------------------------------------------------------------------------

    async def readers_for(self, patient: bytes, kind: str) -> set[bytes]:
        """Who a new record must be wrapped to: patient, this writer, standing grantees."""
        grants = await self.grants(patient)
        return {patient, self.public_key} | standing_readers(grants, kind)

    async def put(
        self,
        patient_public_key: KeyLike,
        resource: dict[str, Any],
        amends: KeyLike | None = None,
        *,
        wait: bool = True,
    ) -> Submitted:
        """Validate, encrypt and write ``resource`` for the patient; the id is the record's."""
        patient = key_bytes(patient_public_key)
        prepared = fhir.prepare(resource)
        readers = await self.readers_for(patient, prepared.kind)
        amended = None if amends is None else key_bytes(amends, "record id")
        sealed = seal_record(patient, prepared, readers, amended)
        await self.upload(sealed.blob)
        return await self.submit("record", sealed.body, wait=wait)

    async def put_many(
        self, patient_public_key: KeyLike, resources: list[dict[str, Any]], *, wait: bool = True
    ) -> list[str]:
        """Validate, encrypt and write many resources for the patient, in as few ``records``
        transactions as the limits allow (each all or none); return the records' ids."""
        patient = key_bytes(patient_public_key)
        prepared = [fhir.prepare(resource) for resource in resources]
        grants = await self.grants(patient)
        mine, wrapper = {patient, self.public_key}, crypto.KeyWrapper()
        sealed = [
            seal_record(patient, p, mine | standing_readers(grants, p.kind), wrapper=wrapper)
            for p in prepared
        ]
        await self.upload_many([s.blob for s in sealed])
        ids, _ = await self.submit_records([(self.identity, s.body) for s in sealed], wait=wait)
        return ids

    async def submit_records(
        self, writes: list[tuple[Identity, dict[str, Any]]], *, wait: bool = True
    ) -> tuple[list[str], list[Submitted]]:
        """Submit record bodies of any writers in one batch, each writer's as few ``records``
        transactions as the limits allow (each all or none). Returns the records' ids in
        the order given, and the transactions."""
        by_writer: dict[bytes, list[int]] = {}
        for position, (writer, _) in enumerate(writes):
            by_writer.setdefault(writer.public_key, []).append(position)
        txs: list[tuple[Identity, str, dict[str, Any]]] = []
        owners: list[tuple[list[int], str]] = []
        for positions in by_writer.values():
            start = 0
            group = [writes[p][1] for p in positions]
            for kind, body, count in batch_bodies(group, self.genesis.params.max_tx_bytes):
                txs.append((writes[positions[0]][0], kind, body))
                owners.append((positions[start : start + count], kind))
                start += count
        submitted = await self.submit_many(txs, wait=wait)
        ids = [""] * len(writes)
        for (positions, kind), done in zip(owners, submitted, strict=True):
            for position, rid in zip(
                positions, record_ids(kind, done.id, len(positions)), strict=True
            ):
                ids[position] = rid
        return ids, submitted

    async def upload(self, blob: bytes) -> None:
        await self.transport.put_blob(self.identity, crypto.sha256(blob), blob)

    async def upload_many(self, blobs: list[bytes], max_bytes: int = 4 * 1024 * 1024) -> None:
        """Upload small blobs in batches (large ones one by one)."""
        batch: list[bytes] = []
        size = 0
        for blob in blobs:
            if len(blob) > BATCH_BLOB_MAX:
                await self.upload(blob)
                continue
            if batch and (size + len(blob) > max_bytes or len(batch) >= PAGE):
                await self.transport.post_blobs(self.identity, batch)
                batch, size = [], 0
            batch.append(blob)
            size += len(blob)
        if batch:
            await self.transport.post_blobs(self.identity, batch)

    async def put_attachment(
        self,
        patient_public_key: KeyLike,
        source: Source,
        content_type: str,
        *,
        wait: bool = True,
    ) -> Submitted:
        """Write a large file as a ``Binary`` record, streamed (format 0x02).

        The file is encrypted as it is uploaded, in one pass and with no temporary copy:
        the node hashes what it receives and names the blob by that hash, which must
        equal the hash computed here as the ciphertext went out. Memory stays flat.
        """
        patient = key_bytes(patient_public_key)
        meta = {"resourceType": "Binary", "contentType": content_type}
        fhir.validate(meta)
        readers = await self.readers_for(patient, "Binary")
        data_key = crypto.new_data_key()
        digest = hashlib.sha256()
        size = 0
        handle = open(source, "rb") if isinstance(source, str | os.PathLike) else source  # noqa: SIM115
        try:
            pieces = envelope.seal_chunks(data_key, fhir.encode(meta), handle)

            async def body() -> AsyncIterator[bytes]:
                nonlocal size
                while True:
                    piece = await asyncio.to_thread(next, pieces, None)
                    if piece is None:
                        return
                    digest.update(piece)
                    size += len(piece)
                    yield piece

            stored = await self.transport.stream_blob(self.identity, body())
        finally:
            if handle is not source:
                handle.close()
        if stored != digest.digest():
            raise InvalidEncoding(
                "the node stored the attachment under another hash", code="bad_node"
            )
        body_fields = record_body(patient, stored, size, "Binary", data_key, readers)
        return await self.submit("record", body_fields, wait=wait)

    # --- reading ----------------------------------------------------------------------------

    async def read(
        self, record_id: KeyLike, out: str | os.PathLike[str] | None = None
    ) -> dict[str, Any]:
        """Fetch and decrypt a record: the resource, or for an attachment its ``Binary``
        description after writing the bytes to ``out``. With ``out``, a resource's JSON
        is written there too."""
        rid = key_bytes(record_id, "record id")
        path = f"/v1/records/{rid.hex()}/content"
        async with self.transport.request("GET", path, signer=self.identity) as response:
            data_key = self._unwrap(response.headers.get("Ehr-Wrapped-Key", ""), rid)
            first = await response.content.read(1)
            if envelope.blob_format(first) == envelope.FORMAT_BOX:
                blob = first + await response.content.read()
                resource = fhir.decode(envelope.open_resource(data_key, blob))
                if out is not None:
                    text = json.dumps(resource, indent=2, ensure_ascii=False) + "\n"
                    await asyncio.to_thread(files.write_atomically, Path(out), text.encode())
                return resource
            if out is None:
                raise EhrError(
                    "this record is a streamed attachment; give a file to write it to (out=)",
                    code="output_required",
                )
            return await files.stream_to_file(response, first, data_key, Path(out))

    def _unwrap(self, header: str, record_id: bytes) -> bytes:
        if not header:
            raise NotAuthorised(
                f"record {record_id.hex()[:16]}… has no data key wrapped for "
                f"{self.public_id[:16]}…",
                code="no_key",
            )
        try:
            wrapped = bytes.fromhex(header)
        except ValueError as err:
            raise InvalidEncoding("the node sent a malformed wrapped key") from err
        return self.identity.unwrap_key(wrapped)

    async def data_key(self, record_id: bytes) -> bytes:
        """The record's data key, unwrapped with this identity (a signed request for the
        wrapped key alone: no ciphertext moves)."""
        reply = await self.transport.get_json(
            f"/v1/records/{record_id.hex()}/key", signer=self.identity
        )
        return self._unwrap(str(reply.get("wrapped_key", "")), record_id)

    async def records(self, patient: KeyLike | None = None, type: str | None = None) -> list[Any]:
        """The latest version of each of a patient's records (all pages)."""
        target = self.public_key if patient is None else key_bytes(patient)
        if type is not None and not _RESOURCE_TYPE.match(type):
            raise InvalidEncoding(f"{type!r} is not a FHIR resource type name")
        query = f"limit={PAGE}" + ("" if type is None else f"&type={type}")
        out: list[Any] = []
        cursor = None
        while True:
            after = "" if cursor is None else f"&after={cursor}"
            page = await self.transport.get_json(
                f"/v1/patients/{target.hex()}/records?{query}{after}"
            )
            out.extend(page["records"])
            cursor = page.get("next")
            if cursor is None:
                return out

    async def versions(self, record_id: KeyLike) -> list[Any]:
        rid = key_bytes(record_id, "record id")
        reply = await self.transport.get_json(f"/v1/records/{rid.hex()}/versions")
        return list(reply["versions"])

    async def record(self, record_id: KeyLike) -> dict[str, Any]:
        rid = key_bytes(record_id, "record id")
        reply: dict[str, Any] = await self.transport.get_json(f"/v1/records/{rid.hex()}")
        return reply

    async def grants(self, patient: KeyLike | None = None) -> list[Any]:
        target = self.public_key if patient is None else key_bytes(patient)
        reply = await self.transport.get_json(f"/v1/patients/{target.hex()}/grants")
        return list(reply["grants"])

    # --- consent, audit, proofs (client.consent) ----------------------------------------------

    async def grant(
        self,
        grantee: KeyLike,
        records: Iterable[KeyLike] | None = None,
        *,
        standing: bool = False,
        types: Iterable[str] | None = None,
        expires: datetime | int | None = None,
        wait: bool = True,
    ) -> Submitted:
        return await consent.grant(
            self, grantee, records, standing=standing, types=types, expires=expires, wait=wait
        )

    async def revoke(self, grant_id: KeyLike, *, wait: bool = True) -> Submitted:
        return await self.submit("revoke", {"grant": key_bytes(grant_id, "grant id")}, wait=wait)

    async def erase(self, record_id: KeyLike, *, wait: bool = True) -> list[Submitted]:
        return await consent.erase(self, record_id, wait=wait)

    async def audit(self) -> list[dict[str, Any]]:
        return await consent.audit(self)

    async def verify(self, tx_id: KeyLike) -> int:
        """Check the inclusion proof of a transaction, or of the one that wrote a record."""
        return await consent.verify(self, tx_id)


__all__ = [
    "Client",
    "InvalidTransaction",
    "SealedRecord",
    "Submitted",
    "key_bytes",
    "record_body",
    "seal_record",
    "standing_readers",
]
