"""Transactions: building, decoding, every malformed envelope with its code, one byte form
each (malformed bodies: test_tx_bodies.py)."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from helpers_core import CHAIN, fake_keys, identity, raw_tx, record_body
from hypothesis import given, settings, strategies as st

from ehrnode import compiled
from ehrnode.core import codec, crypto, tx
from ehrnode.core.errors import InvalidTransaction

SETTINGS = settings(max_examples=100, deadline=None)

SIGNER = identity(1)
PATIENT = identity(2).public_key
OTHER = identity(3).public_key
ID = crypto.sha256(b"some record")
ID2 = crypto.sha256(b"another record")


VALID_BODIES: dict[str, tuple[str, dict[str, Any]]] = {
    "register patient": ("register", {"role": "patient"}),
    "register named": ("register", {"role": "patient", "name": "Ana"}),
    "register endorsed": (
        "register",
        {
            "role": "provider",
            "endorsement": tx.endorse(identity(9), CHAIN, "provider", SIGNER.public_key),
        },
    ),
    "record": ("record", record_body()),
    "record amends": ("record", record_body(amends=ID)),
    "record largest blob": ("record", record_body(size=tx.MAX_BLOB_BYTES)),
    "grant listed": (
        "grant",
        {"grantee": OTHER, "scope": "records", "records": fake_keys([ID, ID2])},
    ),
    "grant standing": ("grant", {"grantee": OTHER, "scope": "standing"}),
    "grant standing typed, expiring": (
        "grant",
        {"grantee": OTHER, "scope": "standing", "types": ["Observation"], "expires": 5},
    ),
    "grant standing with keys of existing records": (
        "grant",
        {"grantee": OTHER, "scope": "standing", "records": fake_keys([ID])},
    ),
    "grant standing listed through a height": (
        "grant",
        {"grantee": OTHER, "scope": "standing", "records": fake_keys([ID]), "through": 7},
    ),
    "revoke": ("revoke", {"grant": ID}),
    "erase": ("erase", {"records": [ID, ID2]}),
}


@pytest.mark.parametrize(("kind", "body"), VALID_BODIES.values(), ids=VALID_BODIES.keys())
def test_make_and_decode_round_trip(kind: str, body: dict[str, Any]) -> None:
    made = tx.make(SIGNER, CHAIN, kind, 7, body)
    assert made.id == crypto.sha256(made.raw)
    assert made.size == len(made.raw)
    decoded = tx.decode(made.raw)
    assert decoded == made
    assert tx.decode(made.raw, certified=True) == made  # a certified block's path
    assert (decoded.chain, decoded.kind, decoded.signer, decoded.nonce) == (
        CHAIN,
        kind,
        SIGNER.public_key,
        7,
    )
    assert decoded.body == codec.decode(codec.encode(body))
    assert crypto.verify(SIGNER.public_key, b"", decoded.signing_bytes(), decoded.sig)
    # What a client sends: the same bytes and id, without the decoded body.
    assert tx.sign(SIGNER, CHAIN, kind, 7, body) == (made.raw, made.id)


def test_a_transaction_is_a_value_that_cannot_be_changed() -> None:
    made = tx.make(SIGNER, CHAIN, "record", 7, record_body())
    fields = [made.chain, made.kind, made.signer, made.nonce, made.body, made.sig]
    assert made == tx.Tx(*fields, made.raw, made.id)
    others: list[Any] = ["other", "grant", b"s" * 32, 8, {}, b"g" * 64, b"raw", b"i" * 32]
    for at, other in enumerate(others):
        changed = [*fields, made.raw, made.id]
        changed[at] = other
        assert made != tx.Tx(*changed), at  # every field counts
    with pytest.raises(TypeError):
        hash(made)  # its body is a dict
    shown = repr(made)
    assert shown.startswith("Tx(chain=") and "nonce=7" in shown
    assert repr(made.raw) not in shown  # the bytes again, already in the fields shown
    if compiled.active():  # the sources are typed Final, which only mypy checks there
        with pytest.raises(AttributeError):
            made.nonce = 8  # type: ignore[misc]


@pytest.mark.parametrize(("kind", "body"), VALID_BODIES.values(), ids=VALID_BODIES.keys())
def test_one_byte_form_per_transaction(kind: str, body: dict[str, Any]) -> None:
    made = tx.make(SIGNER, CHAIN, kind, 3, body)
    backwards = dict(reversed(list(body.items())))
    again = tx.make(SIGNER, CHAIN, kind, 3, backwards)
    assert again.raw == made.raw
    assert again.id == made.id
    decoded = tx.decode(made.raw)
    rebuilt = codec.encode(
        {
            "v": tx.TX_VERSION,
            "chain": decoded.chain,
            "kind": decoded.kind,
            "signer": decoded.signer,
            "nonce": decoded.nonce,
            "body": decoded.body,
            "sig": decoded.sig,
        }
    )
    assert rebuilt == made.raw
    assert crypto.sha256(rebuilt) == decoded.id


def test_signing_bytes_carry_the_tx_domain() -> None:
    made = tx.make(SIGNER, CHAIN, "register", 1, {"role": "patient"})
    assert made.signing_bytes().startswith(crypto.DOMAIN_TX)
    # A signature over the same content under another domain is not a transaction signature.
    other = SIGNER.sign(crypto.DOMAIN_VOTE, made.signing_bytes()[len(crypto.DOMAIN_TX) :])
    raw = raw_tx(SIGNER, sig=other)
    with pytest.raises(InvalidTransaction) as info:
        tx.decode(raw)
    assert info.value.code == "bad_signature"


@SETTINGS
@given(
    nonce=st.integers(1, tx.MAX_NONCE),
    size=st.integers(0, tx.MAX_BLOB_BYTES),
    type_=st.from_regex(r"\A[A-Z][A-Za-z]{0,63}\Z"),
    readers=st.lists(st.binary(min_size=32, max_size=32), max_size=5),
    amends=st.none() | st.binary(min_size=32, max_size=32),
)
def test_record_round_trip_property(
    nonce: int, size: int, type_: str, readers: list[bytes], amends: bytes | None
) -> None:
    body = record_body(size=size, type=type_, keys=fake_keys([PATIENT, *readers]), amends=amends)
    made = tx.make(SIGNER, CHAIN, "record", nonce, body)
    decoded = tx.decode(made.raw)
    assert decoded == made
    assert decoded.body["keys"] == fake_keys([PATIENT, *readers])


def test_record_keys_may_be_sealed_boxes_or_batch_wraps() -> None:
    batch = crypto.KeyWrapper()
    key = crypto.new_data_key()
    keys = sorted([[PATIENT, batch.wrap(key, PATIENT)], [OTHER, crypto.wrap_key(key, OTHER)]])
    made = tx.make(SIGNER, CHAIN, "record", 1, record_body(keys=keys))
    assert tx.decode(made.raw).body["keys"] == keys


def test_a_grant_takes_sealed_boxes_only() -> None:
    """2,000 batch wraps would not fit a transaction: a grant carries sealed boxes."""
    key = crypto.new_data_key()
    record = crypto.sha256(b"a record")
    body = {"grantee": OTHER, "scope": "records"}
    sealed = [[record, crypto.wrap_key(key, OTHER)]]
    assert tx.decode(tx.make(SIGNER, CHAIN, "grant", 1, {**body, "records": sealed}).raw)
    batch = [[record, crypto.KeyWrapper().wrap(key, OTHER)]]
    with pytest.raises(InvalidTransaction) as info:
        tx.make(SIGNER, CHAIN, "grant", 1, {**body, "records": batch})
    assert "80-byte key" in info.value.message


# --- malformed envelopes -----------------------------------------------------------------

MALFORMED: dict[str, bytes] = {
    "garbage": b"\xc1\x00\x01",
    "empty": b"",
    "not a map": codec.encode([1, 2, 3]),
    "missing sig": raw_tx(SIGNER, drop=["sig"]),
    "missing nonce": raw_tx(SIGNER, drop=["nonce"]),
    "extra field": raw_tx(SIGNER, extra={"fee": 1}),
    "version 2": raw_tx(SIGNER, version=2),
    "version 0": raw_tx(SIGNER, version=0),
    "version true": raw_tx(SIGNER, version=True),
    "version as text": raw_tx(SIGNER, version="1"),
    "chain not text": raw_tx(SIGNER, chain=b"ehr-test"),
    "kind not text": raw_tx(SIGNER, kind=1),
    "nonce zero": raw_tx(SIGNER, nonce=0),
    "nonce negative": raw_tx(SIGNER, nonce=-1),
    "nonce too big": raw_tx(SIGNER, nonce=tx.MAX_NONCE + 1),
    "nonce bool": raw_tx(SIGNER, nonce=True),
    "nonce text": raw_tx(SIGNER, nonce="1"),
    "short signer": raw_tx(SIGNER, extra={"signer": SIGNER.public_key[:31]}),
    "signer text": raw_tx(SIGNER, extra={"signer": SIGNER.public_id}),
    "short sig": raw_tx(SIGNER, sig=bytes(63)),
    "sig text": raw_tx(SIGNER, sig="00" * 64),
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_decode_refuses_malformed_envelope(raw: bytes) -> None:
    for certified in (False, True):
        with pytest.raises(InvalidTransaction) as info:
            tx.decode(raw, certified=certified)
        assert info.value.code == "malformed"


def test_version_true_is_not_another_form_of_version_1() -> None:
    """msgpack ``true`` compares equal to 1 in Python; accepting it would give one signed
    transaction a second byte form and a second id."""
    made = tx.make(SIGNER, CHAIN, "register", 1, {"role": "patient"})
    wire = codec.decode(made.raw)
    wire["v"] = True
    with pytest.raises(InvalidTransaction) as info:
        tx.decode(codec.encode(wire))
    assert info.value.code == "malformed"


def test_non_canonical_bytes_are_malformed() -> None:
    made = tx.make(SIGNER, CHAIN, "register", 1, {"role": "patient"})
    # The same map with its keys in another order: msgpack parses it, decode must not.
    wire = codec.decode(made.raw)
    shuffled = msgpack.packb(dict(reversed(list(wire.items()))), use_bin_type=True)
    assert shuffled != made.raw
    with pytest.raises(InvalidTransaction) as info:
        tx.decode(shuffled)
    assert info.value.code == "malformed"


def test_in_a_certified_block_only_the_signature_and_the_byte_form_go_unchecked() -> None:
    """More than two thirds of the validators checked both before they certified the
    block; block sync does not do it again."""
    made = tx.make(SIGNER, CHAIN, "register", 1, {"role": "patient"})
    wire = codec.decode(made.raw)
    shuffled = msgpack.packb(dict(reversed(list(wire.items()))), use_bin_type=True)
    forged = codec.encode({**wire, "sig": bytes(64)})
    for raw in (shuffled, forged):
        with pytest.raises(InvalidTransaction):
            tx.decode(raw)
        certified = tx.decode(raw, certified=True)
        assert (certified.kind, certified.body, certified.raw) == ("register", wire["body"], raw)
    with pytest.raises(InvalidTransaction, match="nonce"):
        tx.decode(codec.encode({**wire, "nonce": 0}), certified=True)


# --- signatures and tampering --------------------------------------------------------------


def test_signature_by_another_key() -> None:
    made = tx.make(identity(5), CHAIN, "register", 1, {"role": "patient"})
    raw = raw_tx(SIGNER, sig=made.sig)
    with pytest.raises(InvalidTransaction) as info:
        tx.decode(raw)
    assert info.value.code == "bad_signature"


@pytest.mark.parametrize(
    "change",
    [
        {"chain": "ehr-other"},
        {"nonce": 2},
        {"kind": "register", "body": {"role": "provider"}},
        {"signer": identity(5).public_key},
    ],
)
def test_changing_a_signed_field_breaks_the_signature(change: dict[str, Any]) -> None:
    made = tx.make(SIGNER, CHAIN, "register", 1, {"role": "patient"})
    wire = {**codec.decode(made.raw), **change}
    with pytest.raises(InvalidTransaction) as info:
        tx.decode(codec.encode(wire))
    assert info.value.code == "bad_signature"
    # Checking structure only (a node that trusts the source) lets it through.
    assert tx.decode(codec.encode(wire), verify_sig=False).nonce == wire["nonce"]


@SETTINGS
@given(st.sampled_from(sorted(VALID_BODIES)), st.data())
def test_any_changed_byte_is_rejected(name: str, data: st.DataObject) -> None:
    kind, body = VALID_BODIES[name]
    made = tx.make(SIGNER, CHAIN, kind, 1, body)
    i = data.draw(st.integers(0, len(made.raw) - 1), label="position")
    flip = data.draw(st.integers(1, 255), label="xor")
    tampered = made.raw[:i] + bytes([made.raw[i] ^ flip]) + made.raw[i + 1 :]
    with pytest.raises(InvalidTransaction):
        tx.decode(tampered)


def test_version_byte_flipped_to_true_is_rejected() -> None:
    made = tx.make(SIGNER, CHAIN, "register", 1, {"role": "patient"})
    at = made.raw.index(b"\xa1v\x01") + 2
    tampered = made.raw[:at] + b"\xc3" + made.raw[at + 1 :]
    with pytest.raises(InvalidTransaction):
        tx.decode(tampered)


def test_truncated_and_extended_bytes_are_malformed() -> None:
    made = tx.make(SIGNER, CHAIN, "register", 1, {"role": "patient"})
    for raw in (made.raw[:-1], made.raw + b"\x00", made.raw[: len(made.raw) // 2]):
        with pytest.raises(InvalidTransaction) as info:
            tx.decode(raw)
        assert info.value.code == "malformed"


# --- size ----------------------------------------------------------------------------------


def test_too_large() -> None:
    made = tx.make(SIGNER, CHAIN, "register", 1, {"role": "patient"})
    assert tx.decode(made.raw, max_bytes=made.size) == made
    with pytest.raises(InvalidTransaction) as info:
        tx.decode(made.raw, max_bytes=made.size - 1)
    assert info.value.code == "tx_too_large"
    with pytest.raises(InvalidTransaction) as info:
        tx.decode(b"\xc1" * (tx.DEFAULT_MAX_TX_BYTES + 1))
    assert info.value.code == "tx_too_large"


def test_largest_grant_fits_the_default_limit() -> None:
    records = fake_keys(
        crypto.sha256(i.to_bytes(2, "big")) for i in range(tx.MAX_RECORDS_PER_GRANT)
    )
    made = tx.make(
        SIGNER, CHAIN, "grant", 1, {"grantee": OTHER, "scope": "records", "records": records}
    )
    assert made.size <= tx.DEFAULT_MAX_TX_BYTES
    assert tx.decode(made.raw) == made


# --- endorsements ----------------------------------------------------------------------------


def test_endorsement_signs_chain_role_and_subject() -> None:
    institution = identity(9)
    endorsement = tx.endorse(institution, CHAIN, "provider", SIGNER.public_key)
    assert endorsement["by"] == institution.public_key
    message = tx.endorsement_bytes(CHAIN, "provider", SIGNER.public_key)
    assert message.startswith(crypto.DOMAIN_ENDORSE)
    assert crypto.verify(institution.public_key, b"", message, endorsement["sig"])
    for other in (
        tx.endorsement_bytes("ehr-other", "provider", SIGNER.public_key),
        tx.endorsement_bytes(CHAIN, "institution", SIGNER.public_key),
        tx.endorsement_bytes(CHAIN, "provider", OTHER),
    ):
        assert not crypto.verify(institution.public_key, b"", other, endorsement["sig"])


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("ehr-test", True),
        ("a", True),
        ("a.b_c-1", True),
        ("", False),
        ("Ehr", False),
        ("-ehr", False),
        ("a" * 64, True),
        ("a" * 65, False),
        ("ehr test", False),
    ],
)
def test_chain_ids(text: str, ok: bool) -> None:
    assert tx.is_chain_id(text) is ok
