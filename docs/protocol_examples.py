"""Regenerate the example bytes quoted in docs/protocol.md.

    .venv/bin/python docs/protocol_examples.py

Every value below is computed by the project's own code (ehrnode.core, ehrnode.client,
ehrnode.p2p) from fixed seeds, so the output is the same on every run. ed25519 signatures
are deterministic; the only random inputs of the real protocol (SealedBox ephemeral keys,
SecretBox nonces, secretstream headers, request nonces) are fixed here or shown by size
only, and each such example is checked by opening it with the project's code.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct

import nacl.bindings as sodium
import nacl.secret

from ehrnode.client import envelope
from ehrnode.core import access, block, codec, crypto, merkle, request, state, tx
from ehrnode.core.genesis import Genesis
from ehrnode.p2p import messages

CHAIN = "ehr-test"
PATIENT = crypto.Identity(bytes([0x01]) * 32)
VALIDATOR = crypto.Identity(bytes([0x02]) * 32)
PROVIDER = crypto.Identity(bytes([0x03]) * 32)
TS = 1764000000000
GENESIS_JSON = json.dumps(
    {
        "chain_id": CHAIN,
        "genesis_time": TS,
        "validators": [{"key": VALIDATOR.public_id, "power": 1, "name": "St Mary's"}],
    }
)


def show(label: str, value: object) -> None:
    if isinstance(value, bytes):
        value = value.hex()
    print(f"{label}: {value}")


def section(title: str) -> None:
    print(f"\n== {title} ==")


def identities() -> None:
    section("identities")
    for name, who in (("patient", PATIENT), ("validator", VALIDATOR), ("provider", PROVIDER)):
        show(f"{name} seed", who.seed)
        show(f"{name} public id", who.public_id)
    sk = PATIENT._signing_key
    show("patient X25519 public key", bytes(sk.verify_key.to_curve25519_public_key()))
    show("patient X25519 private key", bytes(sk.to_curve25519_private_key()))
    show("WRAPPED_KEY_BYTES", crypto.WRAPPED_KEY_BYTES)
    wrapped = crypto.wrap_key(bytes(32), PATIENT.public_key)
    assert len(wrapped) == crypto.WRAPPED_KEY_BYTES
    assert PATIENT.unwrap_key(wrapped) == bytes(32)
    for name in ("TX", "VOTE", "PROPOSAL", "ENDORSE", "REQUEST", "ACCESS", "PEER"):
        show(f"DOMAIN_{name}", getattr(crypto, f"DOMAIN_{name}"))


def register_example() -> None:
    section("register transaction (patient, seed 01*32, nonce 1)")
    t = tx.make(PATIENT, CHAIN, "register", 1, {"role": "patient"})
    show("signing bytes", t.signing_bytes())
    show("signature", t.sig)
    show("wire bytes", t.raw)
    show("wire length", len(t.raw))
    show("id", t.id)
    again = tx.decode(t.raw)
    assert again.id == t.id and again.sig == t.sig


def endorsement_example() -> None:
    section("endorsement (validator 02*32 endorses provider 03*32)")
    message = tx.endorsement_bytes(CHAIN, "provider", PROVIDER.public_key)
    show("endorsement bytes", message)
    e = tx.endorse(VALIDATOR, CHAIN, "provider", PROVIDER.public_key)
    show("endorsement sig", e["sig"])
    assert crypto.verify(VALIDATOR.public_key, b"", message, e["sig"])


def request_example() -> None:
    section("signed request")
    nonce = bytes(range(16))
    path = f"/v1/patients/{PATIENT.public_id}/access-log?limit=10"
    message = request.signing_bytes(CHAIN, "GET", path, TS, nonce, None)
    sig = PATIENT.sign(b"", message)
    header = f"EHR key={PATIENT.public_id},ts={TS},nonce={nonce.hex()},sig={sig.hex()}"
    show("path", path)
    show("signing bytes", message)
    show("Authorization", header)
    signed = request.verify(header, CHAIN, "GET", path, TS + 1000)
    assert signed.key == PATIENT.public_key
    body = codec.encode([b"\x01hello"])
    message = request.signing_bytes(CHAIN, "POST", "/v1/blobs", TS, nonce, crypto.sha256(body))
    show("POST /v1/blobs body", body)
    show("POST /v1/blobs signing bytes", message)


def genesis_example() -> Genesis:
    section("genesis")
    genesis = Genesis.from_json(GENESIS_JSON)
    obj = genesis.to_json_obj()
    obj["validators"] = [{"key": VALIDATOR.public_key, "power": 1, "name": "St Mary's"}]
    show("genesis hashed bytes", codec.encode(obj))
    show("genesis hash", genesis.hash())
    changes = state.genesis_changes(genesis)
    for key in sorted(changes):
        show(f"state key {key.hex()}", changes[key])
    digest = state.digest_after(_Empty(), changes, 0)
    show("state hash at height 0", state.state_hash(digest))
    show("validator set hash", block.validator_set_hash(genesis.powers))
    return genesis


class _Empty:
    def get(self, key: bytes) -> bytes | None:
        return None


def vote_example() -> None:
    section("vote and certificate")
    block_id = bytes(range(32))
    message = block.vote_signing_bytes(CHAIN, block.PRECOMMIT, 1, 0, block_id)
    vote = block.sign_vote(VALIDATOR, CHAIN, block.PRECOMMIT, 1, 0, block_id)
    show("precommit signing bytes", message)
    show("precommit sig", vote.sig)
    show("vote wire", codec.encode(vote.to_wire()))
    cert = block.make_certificate([vote])
    show("certificate bytes", cert.encode())
    show("certificate hash", cert.hash())
    cert.verify(CHAIN, {VALIDATOR.public_key: 1})


def merkle_example() -> None:
    section("merkle")
    leaves = [bytes([i]) * 32 for i in range(1, 6)]
    for n in (0, 1, 2, 3, 5):
        root = merkle.root(leaves[:n])
        assert root == _rfc6962_root(leaves[:n])
        show(f"root of the first {n} leaves", root)
    path = merkle.proof(leaves, 2)
    for i, p in enumerate(path):
        show(f"proof of leaf 2 of 5, path[{i}]", p)
    assert merkle.verify(leaves[2], 2, 5, path, merkle.root(leaves))
    for n in range(1, 40):  # the iterative tree equals RFC 6962's recursive definition
        items = [bytes([i]) * 32 for i in range(n)]
        assert merkle.root(items) == _rfc6962_root(items)
        for i in range(n):
            assert merkle.verify(items[i], i, n, merkle.proof(items, i), merkle.root(items))


def _rfc6962_root(items: list[bytes]) -> bytes:
    n = len(items)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + items[0]).digest()
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + _rfc6962_root(items[:k]) + _rfc6962_root(items[k:])).digest()


def peer_example(genesis: Genesis) -> None:
    section("peer handshake")
    nonce = bytes([0x07]) * 32
    message = messages.auth_bytes(
        CHAIN, genesis.hash(), VALIDATOR.public_key, PROVIDER.public_key, nonce
    )
    show("auth bytes (from validator, to provider, provider's nonce 07*32)", message)
    show("auth sig", VALIDATOR.sign(b"", message))
    show("auth frame", messages.encode("auth", sig=VALIDATOR.sign(b"", message)))
    show("status frame", messages.encode("status", height=3, head=bytes(32)))


def access_example() -> None:
    section("access log entry")
    entry = {
        "seq": 0,
        "time": TS,
        "reader": PROVIDER.public_key,
        "record": bytes([0x09]) * 32,
        "node": VALIDATOR.public_key,
        "request": bytes(64),
        "prev": access.ZERO,
    }
    message = access.entry_signing_bytes(entry)
    entry["sig"] = VALIDATOR.sign(b"", message)
    show("entry signing bytes", message)
    show("entry sig", entry["sig"])
    show("entry hash", access.entry_hash(entry))
    assert access.verify_chain([entry])


def envelope_example() -> None:
    section("ciphertext formats")
    key = bytes([0x05]) * 32
    nonce = bytes([0x06]) * 24
    plaintext = b'{"resourceType":"Patient"}'
    boxed = bytes(nacl.secret.SecretBox(key).encrypt(plaintext, nonce))
    blob = bytes([envelope.FORMAT_BOX]) + boxed
    show("0x01 key", key)
    show("0x01 plaintext", plaintext)
    show("0x01 blob (nonce 06*24)", blob)
    show("0x01 blob length", len(blob))
    assert envelope.open_resource(key, blob) == plaintext
    header = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES
    abytes = sodium.crypto_secretstream_xchacha20poly1305_ABYTES
    show("secretstream HEADERBYTES", header)
    show("secretstream ABYTES", abytes)
    meta = b'{"contentType":"application/pdf","resourceType":"Binary"}'
    for size in (0, 1, envelope.CHUNK - 1, envelope.CHUNK, 3 * envelope.CHUNK + 5):
        sink = io.BytesIO()
        out_size, _digest, plain = envelope.seal_stream(key, meta, io.BytesIO(b"x" * size), sink)
        assert plain == size
        full, rest = divmod(size, envelope.CHUNK)
        expected = 1 + header + 4 + len(meta) + abytes + full * (envelope.CHUNK + abytes) + rest
        expected += abytes
        assert out_size == expected == len(sink.getvalue()), (size, out_size, expected)
        data = sink.getvalue()
        (meta_len,) = struct.unpack(">I", data[1 + header : 1 + header + 4])
        assert meta_len == len(meta) + abytes
        opener = envelope.StreamOpener(key)
        got = opener.feed(data) + opener.close()
        assert got == b"x" * size and opener.metadata == meta
        show(f"0x02 blob size for {size} plaintext bytes and {len(meta)} metadata bytes", out_size)


def state_hash_example() -> None:
    section("state hash of one entry")
    key, value = (
        b"acct" + PATIENT.public_key,
        codec.encode({"nonce": 1, "nrec": 0, "role": "patient", "since": 1}),
    )
    show("key", key)
    show("value", value)
    digest = state.digest_of([(key, value)])
    show("entry digest (256 bytes)", digest.to_bytes(256, "big"))
    show("state hash of a state holding only this entry", state.state_hash(digest))


def main() -> None:
    identities()
    register_example()
    endorsement_example()
    request_example()
    genesis = genesis_example()
    vote_example()
    merkle_example()
    peer_example(genesis)
    access_example()
    envelope_example()
    state_hash_example()


if __name__ == "__main__":
    main()
