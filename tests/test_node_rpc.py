"""The node's HTTP API against bad input: every malformed request gets a 4xx JSON error with
its own code, and leaves the chain, the state and the mempool as they were."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest

from ehrnode.client.sdk import Client
from ehrnode.core import codec, crypto, request, tx
from ehrnode.core.block import InclusionProof
from ehrnode.node import Node
from ehrnode.testing import local_node, validator_identity, wait_for

MSGPACK = {"Content-Type": "application/msgpack"}


@pytest.fixture
async def http(node: Node) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=node.rpc_url) as session:
        yield session


def snapshot(node: Node) -> tuple[int, bytes, int]:
    return node.chain.head.height, node.chain.head.state_hash, len(node.mempool)


async def submit(
    http: aiohttp.ClientSession, raw: bytes, mode: str = "commit"
) -> tuple[int, dict[str, Any]]:
    async with http.post(f"/v1/txs?mode={mode}", data=raw, headers=MSGPACK) as response:
        return response.status, await response.json()


async def register(
    http: aiohttp.ClientSession, node: Node, identity: crypto.Identity, role: str, **body: Any
) -> None:
    chain = node.genesis.chain_id
    t = tx.make(identity, chain, "register", 1, {"role": role, **body})
    status, reply = await submit(http, t.raw)
    assert status == 200, reply
    assert reply["status"] == "committed"


async def test_committed_transaction_is_in_a_block_with_a_verifiable_proof(
    node: Node, http: aiohttp.ClientSession
) -> None:
    patient = crypto.Identity.generate()
    t = tx.make(patient, node.genesis.chain_id, "register", 1, {"role": "patient"})
    status, reply = await submit(http, t.raw)
    assert status == 200 and reply["status"] == "committed"
    async with http.get(f"/v1/txs/{t.id.hex()}") as response:
        body = await response.json()
    assert body["status"] == "committed" and body["tx"]["kind"] == "register"
    async with http.get(f"/v1/blocks/{reply['height']}") as response:
        block = await response.json()
    assert t.id.hex() in block["txs"]
    async with http.get(f"/v1/txs/{t.id.hex()}/proof?format=msgpack") as response:
        proof = InclusionProof.from_wire(codec.decode(await response.read()))
    proof.verify(node.genesis.chain_id, node.genesis.powers)
    assert proof.tx == t.raw


async def test_sync_mode_admits_to_mempool_and_commit_follows(
    node: Node, http: aiohttp.ClientSession
) -> None:
    patient = crypto.Identity.generate()
    t = tx.make(patient, node.genesis.chain_id, "register", 1, {"role": "patient"})
    status, reply = await submit(http, t.raw, mode="sync")
    assert status == 202 and reply["status"] == "pending"
    location = await node.admission.wait_committed(t.id, timeout=10)
    assert location is not None


async def test_async_mode_reports_a_rejection_through_status(
    node: Node, http: aiohttp.ClientSession
) -> None:
    stranger = crypto.Identity.generate()  # not registered: its grant must be rejected
    t = tx.make(
        stranger,
        node.genesis.chain_id,
        "revoke",
        1,
        {"grant": bytes(32)},
    )
    status, reply = await submit(http, t.raw, mode="async")
    assert status == 202 and reply["status"] == "received"

    async def rejected() -> bool:
        async with http.get(f"/v1/txs/{t.id.hex()}") as response:
            return (await response.json()).get("status") == "rejected"

    await wait_for(rejected, timeout=10, what="the async submission to be rejected")
    async with http.get(f"/v1/txs/{t.id.hex()}") as response:
        assert (await response.json())["code"] == "unregistered_signer"


def _bad_transactions(node: Node) -> list[tuple[str, bytes, int, str]]:
    chain = node.genesis.chain_id
    someone = crypto.Identity.generate()
    good = tx.make(someone, chain, "register", 1, {"role": "patient"})
    wire = codec.decode(good.raw)
    tampered = dict(wire, nonce=2)  # signature no longer matches
    unknown_kind = dict(wire, kind="mint")
    unknown_field = dict(wire, body={"role": "patient", "extra": 1})
    wrong_chain = tx.make(someone, "other-chain", "register", 1, {"role": "patient"})
    unsorted = msgpack.packb({"v": 1, **{k: wire[k] for k in sorted(wire) if k != "v"}})
    unregistered = tx.make(someone, chain, "revoke", 1, {"grant": bytes(32)})
    provider_unendorsed = tx.make(someone, chain, "register", 1, {"role": "provider"})
    bad_endorsement = tx.make(
        someone,
        chain,
        "register",
        1,
        {
            "role": "provider",
            "endorsement": {
                "by": validator_identity(node.config.home).public_key,
                "sig": bytes(64),
            },
        },
    )
    named = tx.make(someone, chain, "register", 1, {"role": "patient", "name": "x" * 200}).raw
    oversized = codec.encode(dict(wire, body={"role": "patient", "name": "x" * 300_000}))
    return [
        ("garbage", b"\xc1\xff\x00", 400, "malformed"),
        ("not a map", codec.encode([1, 2, 3]), 400, "malformed"),
        ("bad signature", codec.encode(tampered), 400, "bad_signature"),
        ("unknown kind", codec.encode(unknown_kind), 400, "unknown_kind"),
        ("unknown body field", codec.encode(unknown_field), 400, "malformed_body"),
        ("wrong chain", wrong_chain.raw, 400, "wrong_chain"),
        ("non-canonical key order", unsorted, 400, "malformed"),
        ("unregistered signer", unregistered.raw, 400, "unregistered_signer"),
        ("provider not endorsed", provider_unendorsed.raw, 400, "not_endorsed"),
        ("bad endorsement", bad_endorsement.raw, 400, "bad_endorsement"),
        ("oversized", oversized, 400, "tx_too_large"),
        ("empty", b"", 400, "malformed"),
        ("truncated", named[:-3], 400, "malformed"),
    ]


async def test_each_bad_transaction_has_its_own_error_and_changes_nothing(
    node: Node, http: aiohttp.ClientSession
) -> None:
    await register(http, node, crypto.Identity.generate(), "patient")
    before = snapshot(node)
    for name, raw, status, code in _bad_transactions(node):
        got_status, reply = await submit(http, raw)
        assert (got_status, reply["error"]["code"]) == (status, code), name
        assert reply["error"]["message"], name
        assert snapshot(node) == before, name


async def test_replay_and_stale_nonce_are_refused(node: Node, http: aiohttp.ClientSession) -> None:
    chain = node.genesis.chain_id
    patient = crypto.Identity.generate()
    first = tx.make(patient, chain, "register", 1, {"role": "patient"})
    assert (await submit(http, first.raw))[0] == 200
    before = snapshot(node)
    status, reply = await submit(http, first.raw)
    assert (status, reply["error"]["code"]) == (409, "duplicate")
    stale = tx.make(patient, chain, "register", 1, {"role": "patient", "name": "again"})
    status, reply = await submit(http, stale.raw)
    assert (status, reply["error"]["code"]) == (400, "stale_nonce")
    assert snapshot(node) == before


async def test_record_needs_its_blob_on_the_node(node: Node, http: aiohttp.ClientSession) -> None:
    chain = node.genesis.chain_id
    patient = crypto.Identity.generate()
    await register(http, node, patient, "patient")
    ciphertext = b"\x01" + crypto.seal(crypto.new_data_key(), b"{}")
    body = {
        "patient": patient.public_key,
        "blob": hashlib.sha256(ciphertext).digest(),
        "size": len(ciphertext),
        "type": "Observation",
        "keys": [[patient.public_key, crypto.wrap_key(crypto.new_data_key(), patient.public_key)]],
    }
    record = tx.make(patient, chain, "record", 2, body)
    before = snapshot(node)
    status, reply = await submit(http, record.raw)
    assert (status, reply["error"]["code"]) == (409, "blob_missing")
    assert snapshot(node) == before


def _auth(
    identity: crypto.Identity, chain: str, method: str, path: str, body: bytes | None = None
) -> dict[str, str]:
    header = request.authorization(identity, chain, method, path, int(time.time() * 1000), body)
    return {"Authorization": header}


async def test_blob_upload_requires_a_registered_signer_and_matching_hash(
    node: Node, http: aiohttp.ClientSession
) -> None:
    chain = node.genesis.chain_id
    data = b"ciphertext bytes"
    blob = hashlib.sha256(data).hexdigest()
    path = f"/v1/blobs/{blob}"
    async with http.put(path, data=data) as response:
        assert response.status == 403
        assert (await response.json())["error"]["code"] == "signature_required"
    stranger = crypto.Identity.generate()
    async with http.put(path, data=data, headers=_auth(stranger, chain, "PUT", path)) as response:
        assert (await response.json())["error"]["code"] == "unregistered_signer"
    patient = crypto.Identity.generate()
    await register(http, node, patient, "patient")
    wrong = f"/v1/blobs/{hashlib.sha256(b'other').hexdigest()}"
    async with http.put(wrong, data=data, headers=_auth(patient, chain, "PUT", wrong)) as response:
        assert response.status == 409
        assert (await response.json())["error"]["code"] == "hash_mismatch"
    assert not node.blobs.has(hashlib.sha256(b"other").digest())
    headers = _auth(patient, chain, "PUT", path)
    async with http.put(path, data=data, headers=headers) as response:
        assert response.status == 201
    async with http.put(path, data=data, headers=headers) as response:
        assert (await response.json())["error"]["code"] == "replayed_request"
    async with http.head(path) as response:
        assert response.status == 200


async def test_signed_request_from_another_path_or_clock_is_refused(
    node: Node, http: aiohttp.ClientSession
) -> None:
    chain = node.genesis.chain_id
    patient = crypto.Identity.generate()
    await register(http, node, patient, "patient")
    path = f"/v1/patients/{patient.public_id}/access-log"
    other = _auth(patient, chain, "GET", "/v1/patients/other/access-log")
    async with http.get(path, headers=other) as response:
        assert (await response.json())["error"]["code"] == "bad_request_signature"
    old = request.authorization(patient, chain, "GET", path, int(time.time() * 1000) - 600_000)
    async with http.get(path, headers={"Authorization": old}) as response:
        assert (await response.json())["error"]["code"] == "stale_request"
    async with http.get(path, headers={"Authorization": "EHR nonsense"}) as response:
        assert (await response.json())["error"]["code"] == "bad_request_signature"
    stranger = crypto.Identity.generate()  # not even registered: turned away first
    async with http.get(path, headers=_auth(stranger, chain, "GET", path)) as response:
        assert response.status == 403
        assert (await response.json())["error"]["code"] == "unregistered_signer"
    other = crypto.Identity.generate()
    await register(http, node, other, "patient")
    async with http.get(path, headers=_auth(other, chain, "GET", path)) as response:
        assert response.status == 403
        assert (await response.json())["error"]["code"] == "not_patient"
    async with http.get(path, headers=_auth(patient, chain, "GET", path)) as response:
        assert response.status == 200
        assert (await response.json())["entries"] == []


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v1/txs/zz", 400, "invalid_encoding"),
        ("GET", "/v1/txs/" + "ab" * 32, 404, "unknown_tx"),
        ("GET", "/v1/blocks/0", 400, "invalid_encoding"),
        ("GET", "/v1/blocks/abc", 400, "invalid_encoding"),
        ("GET", "/v1/blocks/99", 404, "not_found"),
        ("GET", "/v1/accounts/123", 400, "invalid_encoding"),
        ("GET", "/v1/patients/" + "ab" * 32 + "/records?limit=0", 400, "invalid_encoding"),
        ("GET", "/v1/patients/" + "ab" * 32 + "/records?limit=x", 400, "invalid_encoding"),
        ("GET", "/v1/records/" + "ab" * 32, 404, "unknown_record"),
        ("GET", "/v1/nowhere", 404, "not_found"),
        ("DELETE", "/v1/status", 405, "method_not_allowed"),
        ("POST", "/v1/txs?mode=eventually", 400, "invalid_encoding"),
    ],
)
async def test_bad_requests_get_json_errors(
    http: aiohttp.ClientSession, method: str, path: str, status: int, code: str
) -> None:
    async with http.request(method, path, data=b"x", headers=MSGPACK) as response:
        assert response.status == status
        assert response.content_type == "application/json"
        assert (await response.json())["error"]["code"] == code


async def test_body_and_batch_limits(tmp_path: Path) -> None:
    async with local_node(tmp_path / "small", max_body_bytes=4096, max_batch_txs=3) as small:
        async with aiohttp.ClientSession(base_url=small.rpc_url) as http:
            async with http.post("/v1/txs", data=b"\x00" * 5000, headers=MSGPACK) as response:
                assert response.status == 413
                assert (await response.json())["error"]["code"] == "body_too_large"
            batch = msgpack.packb([b"a", b"b", b"c", b"d"])
            async with http.post("/v1/txs/batch", data=batch, headers=MSGPACK) as response:
                assert response.status == 400
                assert "at most 3" in (await response.json())["error"]["message"]


async def test_batch_reports_each_transaction(node: Node, http: aiohttp.ClientSession) -> None:
    chain = node.genesis.chain_id
    patients = [crypto.Identity.generate() for _ in range(3)]
    raws = [tx.make(p, chain, "register", 1, {"role": "patient"}).raw for p in patients]
    raws.insert(1, b"\xc1")
    async with http.post(
        "/v1/txs/batch?mode=commit", data=msgpack.packb(raws), headers=MSGPACK
    ) as response:
        results = (await response.json())["results"]
    assert [r["status"] for r in results] == ["committed", "rejected", "committed", "committed"]
    assert results[1]["code"] == "malformed"


async def test_a_transaction_waiting_for_an_earlier_nonce_is_reported_pending(
    node: Node, http: aiohttp.ClientSession
) -> None:
    chain = node.genesis.chain_id
    patient = crypto.Identity.generate()
    await register(http, node, patient, "patient")
    early = tx.make(patient, chain, "revoke", 3, {"grant": bytes(32)})  # nonce 2 not yet sent
    status, reply = await submit(http, early.raw, mode="sync")
    assert (status, reply["status"]) == (202, "pending")
    async with http.get(f"/v1/txs/{early.id.hex()}") as response:
        body = await response.json()
    assert body["status"] == "pending" and "earlier nonces" in body["waiting"]
    # A signer not registered yet may park only a few transactions ahead of its register.
    stranger = crypto.Identity.generate()
    ahead = tx.make(stranger, chain, "register", 9, {"role": "patient"})
    status, reply = await submit(http, ahead.raw, mode="sync")
    assert (status, reply["error"]["code"]) == (400, "nonce_gap")


async def test_wait_reports_each_transaction_committed_rejected_or_unknown(
    node: Node, http: aiohttp.ClientSession
) -> None:
    chain = node.genesis.chain_id
    good = tx.make(crypto.Identity.generate(), chain, "register", 1, {"role": "patient"})
    bad = tx.make(crypto.Identity.generate(), chain, "revoke", 1, {"grant": bytes(32)})
    assert (await submit(http, good.raw, mode="sync"))[0] == 202
    assert (await submit(http, bad.raw, mode="sync"))[1]["error"]["code"] == "unregistered_signer"
    ids = msgpack.packb([good.id, bad.id, bytes(32)])
    async with http.post("/v1/txs/wait?timeout=1", data=ids, headers=MSGPACK) as response:
        results = (await response.json())["results"]
    assert [r["status"] for r in results] == ["committed", "rejected", "unknown"]
    assert results[1]["code"] == "unregistered_signer"
    async with http.post("/v1/txs/wait", data=msgpack.packb([b"short"]), headers=MSGPACK) as r:
        assert r.status == 400


async def test_concurrent_reads_keep_the_access_log_chain_intact(
    node: Node, http: aiohttp.ClientSession
) -> None:
    """Many signed reads of one patient's record at once: every one is logged, in one chain."""
    patient = crypto.Identity.generate()
    async with Client(node.rpc_url, patient) as me:
        await me.register("patient")
        written = await me.put(
            patient.public_key,
            {"resourceType": "Observation", "status": "final", "code": {"text": "x"}},
        )
        await asyncio.gather(*(me.read(written.id) for _ in range(24)))
        entries = await me.audit()  # raises if the chain does not link
    assert len(entries) == 24


async def test_the_key_endpoint_gives_a_reader_its_wrapped_key_and_logs_no_read(
    node: Node, http: aiohttp.ClientSession
) -> None:
    chain = node.genesis.chain_id
    patient, other = crypto.Identity.generate(), crypto.Identity.generate()
    async with Client(node.rpc_url, patient) as me:
        await me.register("patient")
        await me.as_identity(other).register("patient")
        written = await me.put(
            patient.public_key,
            {"resourceType": "Observation", "status": "final", "code": {"text": "k"}},
        )
        path = f"/v1/records/{written.id}/key"
        async with http.get(path, headers=_auth(patient, chain, "GET", path)) as response:
            wrapped = bytes.fromhex((await response.json())["wrapped_key"])
        assert len(patient.unwrap_key(wrapped)) == 32
        async with http.get(path, headers=_auth(other, chain, "GET", path)) as response:
            assert (response.status, (await response.json())["error"]["code"]) == (
                403,
                "not_granted",
            )
        assert await me.audit() == []  # fetching a key reads no ciphertext
        await me.erase(written.id)
        async with http.get(path, headers=_auth(patient, chain, "GET", path)) as response:
            assert (response.status, (await response.json())["error"]["code"]) == (
                410,
                "record_erased",
            )
