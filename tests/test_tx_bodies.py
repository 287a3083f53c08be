"""Transactions whose body is malformed: ``tx.make``, ``tx.sign`` and ``tx.decode`` refuse
each one with its code and name the field (valid bodies, envelopes and byte forms are in
test_tx.py)."""

from __future__ import annotations

from typing import Any

import pytest
from helpers_core import CHAIN, WRAPPED, fake_keys, identity, raw_tx, record_body

from ehrnode.core import crypto, tx
from ehrnode.core.errors import InvalidTransaction

SIGNER = identity(1)
PATIENT = identity(2).public_key
OTHER = identity(3).public_key
ID = crypto.sha256(b"some record")

MALFORMED_BODIES: dict[str, tuple[str, Any]] = {
    "body not a map": ("register", ["role", "patient"]),
    "register unknown field": ("register", {"role": "patient", "age": 3}),
    "register no role": ("register", {}),
    "register unknown role": ("register", {"role": "admin"}),
    "register empty name": ("register", {"role": "patient", "name": ""}),
    "register long name": ("register", {"role": "patient", "name": "x" * 201}),
    "register name not text": ("register", {"role": "patient", "name": b"Ana"}),
    "endorsement not a map": ("register", {"role": "provider", "endorsement": b"x"}),
    "endorsement extra key": (
        "register",
        {"role": "provider", "endorsement": {"by": OTHER, "sig": bytes(64), "x": 1}},
    ),
    "endorsement short sig": (
        "register",
        {"role": "provider", "endorsement": {"by": OTHER, "sig": bytes(63)}},
    ),
    "endorsement short by": (
        "register",
        {"role": "provider", "endorsement": {"by": OTHER[:31], "sig": bytes(64)}},
    ),
    "record missing blob": ("record", record_body(blob=None)),
    "record short patient": ("record", record_body(patient=PATIENT[:31])),
    "record blob as text": ("record", record_body(blob=ID.hex())),
    "record negative size": ("record", record_body(size=-1)),
    "record size too big": ("record", record_body(size=tx.MAX_BLOB_BYTES + 1)),
    "record size bool": ("record", record_body(size=True)),
    "record lower-case type": ("record", record_body(type="observation")),
    "record type with digits": ("record", record_body(type="Obs3rvation")),
    "record type too long": ("record", record_body(type="A" * 65)),
    "record keys empty": ("record", record_body(keys=[])),
    "record keys unsorted": ("record", record_body(keys=fake_keys([PATIENT, OTHER])[::-1])),
    "record keys duplicate": (
        "record",
        record_body(keys=[[PATIENT, bytes(WRAPPED)], [PATIENT, bytes(WRAPPED)]]),
    ),
    "record key wrong length": ("record", record_body(keys=[[PATIENT, bytes(WRAPPED - 1)]])),
    "record key between the two forms": (
        "record",
        record_body(keys=[[PATIENT, bytes(crypto.BATCH_WRAPPED_KEY_BYTES - 1)]]),
    ),
    "record key pair of three": (
        "record",
        record_body(keys=[[PATIENT, bytes(WRAPPED), b""]]),
    ),
    "record too many keys": (
        "record",
        record_body(keys=fake_keys([PATIENT, *(crypto.sha256(bytes([i])) for i in range(64))])),
    ),
    "record amends short": ("record", record_body(amends=ID[:16])),
    "record unknown field": ("record", record_body(note="hi")),
    "grant no scope": ("grant", {"grantee": OTHER}),
    "grant bad scope": ("grant", {"grantee": OTHER, "scope": "all"}),
    "grant listed without records": ("grant", {"grantee": OTHER, "scope": "records"}),
    "grant listed with types": (
        "grant",
        {"grantee": OTHER, "scope": "records", "records": fake_keys([ID]), "types": ["A"]},
    ),
    "grant listed with a listing height": (
        "grant",
        {"grantee": OTHER, "scope": "records", "records": fake_keys([ID]), "through": 7},
    ),
    "grant negative listing height": (
        "grant",
        {"grantee": OTHER, "scope": "standing", "through": -1},
    ),
    "grant listing height not an integer": (
        "grant",
        {"grantee": OTHER, "scope": "standing", "through": "7"},
    ),
    "grant types empty": ("grant", {"grantee": OTHER, "scope": "standing", "types": []}),
    "grant types repeated": (
        "grant",
        {"grantee": OTHER, "scope": "standing", "types": ["Observation", "Observation"]},
    ),
    "grant types bad": ("grant", {"grantee": OTHER, "scope": "standing", "types": ["x"]}),
    "grant types not a list": (
        "grant",
        {"grantee": OTHER, "scope": "standing", "types": "Observation"},
    ),
    "grant negative expiry": ("grant", {"grantee": OTHER, "scope": "standing", "expires": -1}),
    "grant expiry too big": (
        "grant",
        {"grantee": OTHER, "scope": "standing", "expires": tx.MAX_NONCE + 1},
    ),
    "grant short grantee": ("grant", {"grantee": OTHER[:5], "scope": "standing"}),
    "revoke no grant": ("revoke", {}),
    "revoke short id": ("revoke", {"grant": ID[:31]}),
    "erase empty": ("erase", {"records": []}),
    "erase repeated id": ("erase", {"records": [ID, ID]}),
    "erase short id": ("erase", {"records": [ID[:31]]}),
    "erase too many": (
        "erase",
        {"records": [crypto.sha256(i.to_bytes(2, "big")) for i in range(257)]},
    ),
}


@pytest.mark.parametrize(("kind", "body"), MALFORMED_BODIES.values(), ids=MALFORMED_BODIES.keys())
def test_make_refuses_malformed_body(kind: str, body: Any) -> None:
    for build in (tx.make, tx.sign):
        with pytest.raises(InvalidTransaction) as info:
            build(SIGNER, CHAIN, kind, 1, body)
        assert info.value.code == "malformed_body"


@pytest.mark.parametrize(("kind", "body"), MALFORMED_BODIES.values(), ids=MALFORMED_BODIES.keys())
def test_decode_refuses_malformed_body(kind: str, body: Any) -> None:
    raw = raw_tx(SIGNER, kind=kind, body=body)
    for certified in (False, True):  # a certified block's body is checked all the same
        with pytest.raises(InvalidTransaction) as info:
            tx.decode(raw, certified=certified)
        assert info.value.code == "malformed_body"


def test_errors_name_the_field() -> None:
    with pytest.raises(InvalidTransaction, match="'size'"):
        tx.make(SIGNER, CHAIN, "record", 1, record_body(size=-1))
    with pytest.raises(InvalidTransaction, match="age"):
        tx.make(SIGNER, CHAIN, "register", 1, {"role": "patient", "age": 3})


def test_record_without_the_patient_key() -> None:
    body = record_body(keys=fake_keys([OTHER]))
    with pytest.raises(InvalidTransaction) as info:
        tx.make(SIGNER, CHAIN, "record", 1, body)
    assert info.value.code == "missing_patient_key"
    with pytest.raises(InvalidTransaction) as info:
        tx.decode(raw_tx(SIGNER, kind="record", body=body))
    assert info.value.code == "missing_patient_key"


@pytest.mark.parametrize("kind", ["transfer", "slash", "", "Register"])
def test_unknown_kind(kind: str) -> None:
    with pytest.raises(InvalidTransaction) as info:
        tx.make(SIGNER, CHAIN, kind, 1, {})
    assert info.value.code == "unknown_kind"
    with pytest.raises(InvalidTransaction) as info:
        tx.decode(raw_tx(SIGNER, kind=kind, body={}))
    assert info.value.code == "unknown_kind"
