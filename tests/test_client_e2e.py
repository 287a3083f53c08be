"""The SDK against a running node: a doctor writes, the patient reads, consent decides who
else can, erasure shreds, and the audit trail and proofs check out on the client."""

from __future__ import annotations

import asyncio
import copy
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ehrnode.client import Client, RecordErased, consent, fhir
from ehrnode.client.errors import (
    AuditLogBroken,
    InvalidBlock,
    InvalidResource,
    InvalidTransaction,
    NotAuthorised,
    NotFound,
)
from ehrnode.client.sdk import seal_record
from ehrnode.client.verification import AccessLogChecker, decode_entry, verify_proof
from ehrnode.core import codec, crypto
from ehrnode.core.crypto import Identity
from ehrnode.core.errors import EhrError
from ehrnode.core.genesis import Genesis, ValidatorInfo
from ehrnode.node import Node


def observation(text: str, value: float = 72.0) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": text},
        "valueQuantity": {"value": value, "unit": "/min"},
    }


CONDITION = {
    "resourceType": "Condition",
    "code": {"text": "Asthma"},
    "subject": {"reference": "Patient/1"},
}


@dataclass
class Cast:
    validator: Client
    doctor: Client
    patient: Client
    other: Client  # a second provider: a stranger to the patient until granted


@pytest.fixture
async def cast(node: Node) -> AsyncIterator[Cast]:
    async with Client(node.rpc_url, node.identity) as validator:
        doctor = validator.as_identity(Identity.generate())
        patient = validator.as_identity(Identity.generate())
        other = validator.as_identity(Identity.generate())
        await patient.register("patient")
        for provider, name in ((doctor, "Dr Who"), (other, "Dr No")):
            await provider.register(
                "provider", name, validator.endorse(provider.public_key, "provider")
            )
        yield Cast(validator, doctor, patient, other)


async def key_holders(client: Client, record_id: str) -> set[str]:
    reply = await client.transport.get_json(f"/v1/txs/{record_id}")
    return {pair[0] for pair in reply["tx"]["body"]["keys"]}


async def test_doctor_writes_patient_reads_and_a_stranger_cannot(cast: Cast) -> None:
    resource = observation("Heart rate")
    written = await cast.doctor.put(cast.patient.public_id, resource)
    assert written.status == "committed" and written.height is not None

    assert await cast.patient.read(written.id) == resource
    assert await cast.doctor.read(written.id) == resource  # the author keeps a key
    record = await cast.patient.record(written.id)
    assert record["author"] == cast.doctor.public_id and record["type"] == "Observation"

    with pytest.raises(NotAuthorised) as caught:
        await cast.other.read(written.id)
    assert caught.value.code == "not_granted"

    # Even with the ciphertext and every wrapped key, the stranger opens nothing.
    reply = await cast.other.transport.get_json(f"/v1/txs/{written.id}")
    pairs = reply["tx"]["body"]["keys"]
    assert {p[0] for p in pairs} == {cast.patient.public_id, cast.doctor.public_id}
    for _holder, wrapped in pairs:
        with pytest.raises(NotAuthorised):
            cast.other.identity.unwrap_key(bytes.fromhex(wrapped))


async def test_listed_grant_lets_the_grantee_read_until_revoked(cast: Cast) -> None:
    shared = await cast.doctor.put(cast.patient.public_id, observation("Shared"))
    private = await cast.doctor.put(cast.patient.public_id, observation("Private"))

    grant = await cast.patient.grant(cast.other.public_id, [shared.id])
    assert await cast.other.read(shared.id) == observation("Shared")
    with pytest.raises(NotAuthorised):
        await cast.other.read(private.id)
    [view] = await cast.patient.grants()
    assert view["id"] == grant.id and view["scope"] == "records" and view["in_force"]

    await cast.patient.revoke(grant.id)
    with pytest.raises(NotAuthorised) as caught:
        await cast.other.read(shared.id)
    assert caught.value.code == "not_granted" and caught.value.http_status == 403


async def test_standing_grant_wraps_new_records_and_revoke_ends_it(cast: Cast) -> None:
    patient, grantee = cast.patient, cast.other
    before = await cast.doctor.put(patient.public_id, observation("Before the grant"))
    grant = await patient.grant(grantee.public_id, standing=True, types=["Observation"])

    # Existing records of the granted type were re-wrapped in the grant itself.
    assert await grantee.read(before.id) == observation("Before the grant")
    # A new record is wrapped to the standing grantee by the writer, automatically.
    after = await cast.doctor.put(patient.public_id, observation("After the grant"))
    assert grantee.public_id in await key_holders(cast.doctor, after.id)
    assert await grantee.read(after.id) == observation("After the grant")
    # Other types are not covered.
    condition = await cast.doctor.put(patient.public_id, CONDITION)
    assert grantee.public_id not in await key_holders(cast.doctor, condition.id)
    with pytest.raises(NotAuthorised):
        await grantee.read(condition.id)

    await patient.revoke(grant.id)
    with pytest.raises(NotAuthorised) as caught:
        await grantee.read(after.id)
    assert caught.value.code == "not_granted"
    late = await cast.doctor.put(patient.public_id, observation("After the revoke"))
    assert await key_holders(cast.doctor, late.id) == {patient.public_id, cast.doctor.public_id}
    with pytest.raises(NotAuthorised):
        await grantee.read(late.id)


@pytest.mark.parametrize("committed", [True, False], ids=["committed", "pending"])
async def test_a_record_written_while_a_standing_grant_is_made_gets_the_grantees_key(
    cast: Cast, monkeypatch: pytest.MonkeyPatch, committed: bool
) -> None:
    """The doctor writes a record after the patient's SDK listed the records to re-wrap and
    before the grant arrives (committed, or admitted but not yet in a block): the chain
    refuses the grant (it lists at an older height), the SDK lists again once a block is
    past, and the grantee can read the record."""
    patient, grantee = cast.patient, cast.other
    before = await cast.doctor.put(patient.public_id, observation("Before the grant"))
    listings: list[int] = []
    written: list[str] = []
    listed = consent.readable_versions

    async def list_then_write(client: Client, types: set[str] | None) -> list[bytes]:
        ids = await listed(client, types)
        listings.append(len(ids))
        if not written:
            gap = await cast.doctor.put(patient.public_id, observation("Gap"), wait=committed)
            assert gap.status == ("committed" if committed else "pending")
            written.append(gap.id)
        return ids

    monkeypatch.setattr(consent, "readable_versions", list_then_write)
    grant = await patient.grant(grantee.public_id, standing=True)
    assert grant.status == "committed"
    assert listings == [1, 2]  # refused once with the first listing, then listed again
    [gap] = await cast.doctor.wait_committed(written)
    assert gap.status == "committed"
    assert await grantee.read(before.id) == observation("Before the grant")
    assert await grantee.read(written[0]) == observation("Gap")


async def test_wait_height_returns_once_the_node_has_committed_that_height(cast: Cast) -> None:
    transport = cast.patient.transport
    head = await transport.height()
    await asyncio.wait_for(transport.wait_height(head, 30), 5)  # there already
    waiter = asyncio.create_task(transport.wait_height(head + 1, 30))
    done, _ = await asyncio.wait({waiter}, timeout=0.3)
    assert not done  # an idle chain makes no blocks
    await cast.doctor.put(cast.patient.public_id, observation("The next block"))
    await asyncio.wait_for(waiter, 30)
    assert await transport.height() == head + 1
    # A height that does not come: back after the timeout, without an error.
    await asyncio.wait_for(transport.wait_height(head + 100, 0.2), 5)


async def test_a_standing_grant_gives_up_if_records_keep_changing(
    cast: Cast, monkeypatch: pytest.MonkeyPatch
) -> None:
    patient = cast.patient
    listed = consent.readable_versions

    async def list_then_write(client: Client, types: set[str] | None) -> list[bytes]:
        ids = await listed(client, types)
        await cast.doctor.put(patient.public_id, observation("Again"))
        return ids

    monkeypatch.setattr(consent, "readable_versions", list_then_write)
    with pytest.raises(InvalidTransaction) as caught:
        await patient.grant(cast.other.public_id, standing=True)
    assert caught.value.code == "records_changed"
    assert await patient.grants() == []
    assert len(await patient.records()) == consent.STANDING_ATTEMPTS


async def test_a_writer_that_skips_a_standing_grantee_is_rejected(cast: Cast) -> None:
    """The rule the SDK follows is enforced by the chain: leave a grantee out, lose."""
    await cast.patient.grant(cast.other.public_id, standing=True)
    sealed = seal_record(
        cast.patient.public_key,
        fhir.prepare(observation("x")),
        {cast.patient.public_key, cast.doctor.public_key},
    )
    await cast.doctor.upload(sealed.blob)
    with pytest.raises(InvalidTransaction) as caught:
        await cast.doctor.submit("record", sealed.body)
    assert caught.value.code == "missing_grantee_key"
    # The failed submission did not wedge the doctor's nonce count.
    assert (await cast.doctor.put(cast.patient.public_id, observation("y"))).status == "committed"


async def test_erase_shreds_every_version(cast: Cast, node: Node) -> None:
    first = await cast.doctor.put(cast.patient.public_id, observation("v1", 1.0))
    second = await cast.doctor.put(cast.patient.public_id, observation("v2", 2.0), first.id)
    versions = await cast.patient.versions(first.id)
    assert [v["id"] for v in versions] == [first.id, second.id]
    assert await cast.patient.read(second.id) == observation("v2", 2.0)

    [erased] = await cast.patient.erase(second.id)
    assert erased.status == "committed"
    for record_id in (first.id, second.id):
        with pytest.raises(RecordErased) as caught:
            await cast.patient.read(record_id)
        assert caught.value.code == "record_erased" and isinstance(caught.value, NotFound)
    assert all(v["erased"] for v in await cast.patient.versions(first.id))
    for version in versions:
        assert not node.blobs.has(bytes.fromhex(version["blob"]))
    with pytest.raises(RecordErased):
        await cast.patient.erase(first.id)


async def test_verify_checks_the_proof_and_a_tampered_proof_fails(cast: Cast, node: Node) -> None:
    written = await cast.doctor.put(cast.patient.public_id, observation("Proven"))
    assert await cast.patient.verify(written.id) == written.height

    tx_id = bytes.fromhex(written.id)
    raw = await cast.patient.transport.get_bytes(f"/v1/txs/{written.id}/proof?format=msgpack")
    chain, powers = node.genesis.chain_id, node.genesis.powers
    assert verify_proof(raw, tx_id, chain, powers) == written.height
    proof = codec.decode(raw)

    def tampered(change: Any) -> bytes:
        wire = copy.deepcopy(proof)
        change(wire)
        return codec.encode(wire)

    def flip_tx(w: Any) -> None:
        w["tx"] = w["tx"][:-1] + bytes([w["tx"][-1] ^ 1])

    def flip_root(w: Any) -> None:
        w["header"]["txs"] = bytes(32)

    def forge_sig(w: Any) -> None:
        key, _sig = w["certificate"]["sigs"][0]
        w["certificate"]["sigs"][0] = [key, bytes(64)]

    def drop_sigs(w: Any) -> None:
        w["certificate"]["sigs"] = []

    def other_height(w: Any) -> None:
        w["header"]["height"] += 1

    for change in (flip_tx, flip_root, forge_sig, drop_sigs, other_height):
        with pytest.raises(InvalidBlock):
            verify_proof(tampered(change), tx_id, chain, powers)
    with pytest.raises(InvalidBlock):  # another network's validators
        verify_proof(raw, tx_id, chain, {Identity.generate().public_key: 1})
    with pytest.raises(InvalidBlock):  # the proof of another transaction
        verify_proof(raw, bytes(32), chain, powers)
    with pytest.raises(InvalidBlock):
        verify_proof(b"\x00garbage", tx_id, chain, powers)


async def test_audit_shows_every_read_in_a_verified_chain(cast: Cast, node: Node) -> None:
    written = await cast.doctor.put(cast.patient.public_id, observation("Audited"))
    await cast.patient.grant(cast.other.public_id, [written.id])
    await cast.doctor.read(written.id)
    await cast.other.read(written.id)

    entries = await cast.patient.audit()
    readers = [e["reader"] for e in entries]
    # Re-wrapping the key for the grant fetched the key alone: not a read of ciphertext.
    assert readers == [cast.doctor.public_id, cast.other.public_id]
    assert {e["record"] for e in entries} == {written.id}
    assert {e["node"] for e in entries} == {node.identity.public_id}
    assert [e["seq"] for e in entries] == [0, 1]

    decoded = [decode_entry(e) for e in entries]
    AccessLogChecker(node.identity.public_key).check(decoded)
    for index, field in ((1, "reader"), (1, "time"), (0, "prev")):
        broken = copy.deepcopy(decoded)
        value = broken[index][field]
        broken[index][field] = value + 1 if isinstance(value, int) else b"\x01" * len(value)
        with pytest.raises(AuditLogBroken):
            AccessLogChecker(node.identity.public_key).check(broken)
    with pytest.raises(AuditLogBroken):  # the first entry dropped
        AccessLogChecker(node.identity.public_key).check([decoded[1]])
    with pytest.raises(AuditLogBroken):  # signed by a node other than the one asked
        AccessLogChecker(Identity.generate().public_key).check(decoded)

    with pytest.raises(NotAuthorised):  # only the patient reads their log
        await cast.doctor.transport.get_json(
            f"/v1/patients/{cast.patient.public_id}/access-log", signer=cast.doctor.identity
        )


async def test_attachment_streams_in_and_out(cast: Cast, tmp_path: Path) -> None:
    source = tmp_path / "scan.dcm"
    data = random.Random(5).randbytes(5 * 64 * 1024 + 777)
    source.write_bytes(data)
    written = await cast.doctor.put_attachment(cast.patient.public_id, source, "application/dicom")
    record = await cast.patient.record(written.id)
    assert record["type"] == "Binary" and record["size"] > len(data)

    out = tmp_path / "copy.dcm"
    meta = await cast.patient.read(written.id, out)
    assert meta == {"resourceType": "Binary", "contentType": "application/dicom"}
    assert out.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []
    with pytest.raises(EhrError) as caught:
        await cast.patient.read(written.id)
    assert caught.value.code == "output_required"


async def test_invalid_resources_never_leave_the_client(cast: Cast) -> None:
    with pytest.raises(InvalidResource, match=r"Observation\.code: required element missing"):
        await cast.doctor.put(cast.patient.public_id, {"resourceType": "Observation"})
    with pytest.raises(InvalidResource, match="no resourceType"):
        await cast.doctor.put(cast.patient.public_id, {"status": "final"})
    assert await cast.patient.records() == []


async def test_concurrent_writes_of_one_writer_all_commit_in_nonce_order(cast: Cast) -> None:
    results = await asyncio.gather(
        *(cast.doctor.put(cast.patient.public_id, observation(f"n{i}", i)) for i in range(8))
    )
    assert all(r.status == "committed" for r in results)
    records = await cast.patient.records(type="Observation")
    assert {r["id"] for r in records} == {r.id for r in results}
    account = await cast.doctor.account()
    assert account["nonce"] == 9  # register + 8 records


async def test_node_errors_map_to_the_exception_tree(cast: Cast) -> None:
    with pytest.raises(NotFound) as caught:
        await cast.patient.read(bytes(32).hex())
    assert caught.value.code == "unknown_record"
    with pytest.raises(InvalidTransaction) as rejected:  # not a registered patient
        await cast.doctor.put(cast.other.public_id, observation("x"))
    assert rejected.value.code == "unknown_patient"
    with pytest.raises(EhrError):
        await cast.doctor.read("not-hex")


async def test_a_pinned_genesis_refuses_another_network(node: Node) -> None:
    other = Genesis(
        chain_id=node.genesis.chain_id,
        genesis_time=node.genesis.genesis_time,
        validators=(ValidatorInfo(Identity.generate().public_key, 1, "elsewhere"),),
    )
    with pytest.raises(EhrError) as caught:
        async with Client(node.rpc_url, Identity.generate(), genesis=other):
            pass
    assert caught.value.code == "wrong_network"
    async with Client(node.rpc_url, Identity.generate(), genesis=node.genesis) as client:
        assert client.chain_id == node.genesis.chain_id


async def test_put_without_waiting_returns_pending_then_commits(cast: Cast, node: Node) -> None:
    written = await cast.doctor.put(cast.patient.public_id, observation("async"), wait=False)
    assert written.status == "pending" and written.height is None
    assert await node.admission.wait_committed(bytes.fromhex(written.id), timeout=10) is not None
    assert await cast.patient.read(written.id) == observation("async")


async def test_put_many_writes_records_all_or_none_each_readable_and_provable(
    cast: Cast, node: Node
) -> None:
    """A bundle's worth of resources in one ``records`` transaction: each record has its own
    id, reads and proves like any other, and a standing grantee gets a key for each."""
    await cast.patient.grant(cast.other.public_id, standing=True, types=["Condition"])
    resources = [observation(f"Reading {i}", float(i)) for i in range(5)] + [CONDITION]
    ids = await cast.doctor.put_many(cast.patient.public_id, resources)
    assert len(set(ids)) == 6

    listed = [r["id"] for r in await cast.patient.records()]
    assert listed[-6:] == ids
    txs = {(await cast.patient.record(rid))["tx"] for rid in ids}
    assert len(txs) == 1 and txs.isdisjoint(ids)  # one transaction wrote them all
    # Its keys are wrapped from one ephemeral key made for this call, not one per key.
    body = (await cast.patient.transport.get_json(f"/v1/txs/{next(iter(txs))}"))["tx"]["body"]
    wraps = [bytes.fromhex(w) for item in body["items"] for _, w in item["keys"]]
    assert {len(w) for w in wraps} == {crypto.BATCH_WRAPPED_KEY_BYTES}
    assert len({w[:32] for w in wraps}) == 1 and len(wraps) == 6 * 2 + 1
    for rid, resource in zip(ids, resources, strict=True):
        assert await cast.patient.read(rid) == resource
        assert await cast.doctor.read(rid) == resource
    assert await cast.other.read(ids[-1]) == CONDITION
    with pytest.raises(NotAuthorised):
        await cast.other.read(ids[0])
    height = await cast.patient.verify(ids[2])
    assert height == await cast.patient.verify(txs.pop())

    # One record a rule refuses (its ciphertext names another record's blob) refuses all.
    before = len(await cast.patient.records())
    first = seal_record(
        cast.patient.public_key, fhir.prepare(observation("a")), {cast.patient.public_key}
    )
    taken = await cast.patient.record(ids[0])
    reused = dict(first.body, blob=bytes.fromhex(taken["blob"]), size=taken["size"])
    await cast.doctor.upload(first.blob)
    with pytest.raises(InvalidTransaction) as caught:
        await cast.doctor.submit("records", {"items": [first.body, reused]})
    assert caught.value.code == "blob_in_use" and "record 1" in caught.value.message
    assert len(await cast.patient.records()) == before


async def test_a_records_transaction_needs_every_blob_uploaded_first(cast: Cast) -> None:
    readers = {cast.patient.public_key}
    uploaded = seal_record(cast.patient.public_key, fhir.prepare(observation("up")), readers)
    missing = seal_record(cast.patient.public_key, fhir.prepare(observation("not up")), readers)
    await cast.doctor.upload(uploaded.blob)
    with pytest.raises(EhrError) as caught:
        await cast.doctor.submit("records", {"items": [uploaded.body, missing.body]})
    assert caught.value.code == "blob_missing"
    assert missing.body["blob"].hex()[:16] in caught.value.message


@pytest.mark.parametrize(
    "lie",
    [
        {"item": 1},  # the other record of the transaction
        {"item": -1},
        {"item": 2**40},
        {"item": "0"},
        {"tx": "zz" * 32},
        {"tx": None},
        {"blob": "00" * 32},  # the right transaction and place, another ciphertext
    ],
)
async def test_verify_refuses_what_a_lying_node_says_about_a_batched_record(
    cast: Cast, monkeypatch: pytest.MonkeyPatch, lie: dict[str, Any]
) -> None:
    ids = await cast.doctor.put_many(cast.patient.public_id, [observation("a"), observation("b")])
    real = cast.patient.transport.get_json

    async def lying(path: str, **kw: Any) -> Any:
        reply = await real(path, **kw)
        if path == f"/v1/records/{ids[0]}":
            reply = dict(reply, **lie)
        return reply

    monkeypatch.setattr(cast.patient.transport, "get_json", lying)
    with pytest.raises(EhrError) as caught:
        await cast.patient.verify(ids[0])
    assert caught.value.code == "bad_proof"


async def test_metrics_count_transactions_by_kind_and_records_one_by_one(
    cast: Cast, node: Node
) -> None:
    async def metric(name: str) -> float:
        text = (await cast.patient.transport.get_bytes("/metrics")).decode()
        found = [line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")]
        return float(found[0]) if found else 0.0

    records = await metric("ehr_records_written_total")
    batches = await metric('ehr_txs_committed_total{kind="records"}')
    singles = await metric('ehr_txs_committed_total{kind="record"}')
    await cast.doctor.put_many(cast.patient.public_id, [observation("a"), observation("b")])
    await cast.doctor.put(cast.patient.public_id, observation("c"))
    assert await metric("ehr_records_written_total") == records + 3
    assert await metric('ehr_txs_committed_total{kind="records"}') == batches + 1
    assert await metric('ehr_txs_committed_total{kind="record"}') == singles + 1
    assert await metric("ehr_chain_height") == node.chain.head.height
