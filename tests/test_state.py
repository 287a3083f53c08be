"""The state machine: who may register, write, grant, revoke, erase and read; the state hash."""

from __future__ import annotations

from typing import Any

import pytest
from helpers_core import CHAIN, MemState, World, fake_keys, identity, raw_tx

from ehrnode.core import codec, crypto, records, state, tx
from ehrnode.core.errors import InvalidTransaction
from ehrnode.core.state import P_PREC, P_REC, P_VER


@pytest.fixture
def w() -> World:
    return World()


def people(w: World) -> tuple[Any, Any, Any]:
    """A patient, a provider and a second provider, all registered."""
    return w.patient(1), w.provider(2), w.provider(3)


# --- genesis ---------------------------------------------------------------------------------


def test_genesis_validators_are_registered_institutions(w: World) -> None:
    assert state.validators(w.overlay) == {v.public_key: 1 for v in w.validators}
    for i, v in enumerate(w.validators):
        account = w.account(v)
        assert account["role"] == "institution"
        assert account["nonce"] == 0
        assert account["name"] == f"validator {i}"
    # The validator set entry is sorted by key, so every node writes the same bytes.
    vals = state.load(w.overlay, state.K_VALS)
    assert [k for k, _ in vals] == sorted(v.public_key for v in w.validators)


def test_genesis_validator_cannot_register_again(w: World) -> None:
    again = w.sign(w.validators[0], "register", {"role": "institution"})
    assert w.rejects(again) == "already_registered"


# --- registration ----------------------------------------------------------------------------


def test_register_patient(w: World) -> None:
    patient = w.patient(1, name="Ana")
    account = w.account(patient)
    assert account == {"role": "patient", "nonce": 1, "since": w.height, "nrec": 0, "name": "Ana"}


def test_patient_registers_without_endorsement(w: World) -> None:
    who = identity(1)
    endorsement = tx.endorse(w.validators[0], CHAIN, "patient", who.public_key)
    t = w.sign(who, "register", {"role": "patient", "endorsement": endorsement})
    assert w.rejects(t) == "malformed_body"


def test_register_twice(w: World) -> None:
    patient = w.patient(1)
    assert w.rejects(w.sign(patient, "register", {"role": "patient"})) == "already_registered"
    assert w.rejects(w.sign(patient, "register", {"role": "provider"})) == "already_registered"


def test_provider_endorsed_by_a_genesis_institution(w: World) -> None:
    provider = w.provider(2, institution=w.validators[1])
    account = w.account(provider)
    assert account["role"] == "provider"
    assert account["by"] == w.validators[1].public_key


def test_provider_endorsed_by_a_registered_institution(w: World) -> None:
    hospital = w.institution(5, endorser=w.validators[2])
    assert w.account(hospital)["by"] == w.validators[2].public_key
    provider = w.provider(6, institution=hospital)
    assert w.account(provider)["by"] == hospital.public_key


def test_unregistered_validator_registers_as_institution_without_endorsement(w: World) -> None:
    newcomer = identity(50)
    w.extra_validators[newcomer.public_key] = 1
    w.do(newcomer, "register", {"role": "institution"})
    assert w.account(newcomer)["role"] == "institution"
    assert "by" not in w.account(newcomer)


def _endorsed(
    w: World, who: Any, role: str, endorser: Any, *, chain: str = CHAIN, for_role: str = ""
) -> tx.Tx:
    endorsement = tx.endorse(endorser, chain, for_role or role, who.public_key)
    return w.sign(who, "register", {"role": role, "endorsement": endorsement})


def test_provider_without_endorsement(w: World) -> None:
    t = w.sign(identity(2), "register", {"role": "provider"})
    assert w.rejects(t) == "not_endorsed"


def test_provider_endorsed_by_a_non_institution(w: World) -> None:
    patient, provider, _ = people(w)
    assert w.rejects(_endorsed(w, identity(7), "provider", patient)) == "not_endorsed"
    assert w.rejects(_endorsed(w, identity(7), "provider", provider)) == "not_endorsed"
    assert w.rejects(_endorsed(w, identity(7), "provider", identity(99))) == "not_endorsed"


def test_institution_needs_a_validator(w: World) -> None:
    assert w.rejects(w.sign(identity(5), "register", {"role": "institution"})) == "not_endorsed"
    hospital = w.institution(5)
    # A registered institution that is not a validator cannot endorse another institution.
    assert w.rejects(_endorsed(w, identity(6), "institution", hospital)) == "not_endorsed"


@pytest.mark.parametrize(
    "fault", ["signed by another", "other role", "other subject", "other chain"]
)
def test_bad_endorsement(w: World, fault: str) -> None:
    who = identity(7)
    by = w.validators[0]
    if fault == "signed by another":
        forged = tx.endorse(w.validators[1], CHAIN, "provider", who.public_key)
        endorsement = {"by": by.public_key, "sig": forged["sig"]}
    elif fault == "other role":
        endorsement = tx.endorse(by, CHAIN, "institution", who.public_key)
    elif fault == "other subject":
        endorsement = tx.endorse(by, CHAIN, "provider", identity(8).public_key)
    else:
        endorsement = tx.endorse(by, "ehr-other", "provider", who.public_key)
    t = w.sign(who, "register", {"role": "provider", "endorsement": endorsement})
    assert w.rejects(t) == "bad_endorsement"


def test_endorsement_for_a_provider_does_not_make_an_institution(w: World) -> None:
    who = identity(7)
    t = _endorsed(w, who, "institution", w.validators[0], for_role="provider")
    assert w.rejects(t) == "bad_endorsement"


# --- nonces and chain ------------------------------------------------------------------------


def test_replay_is_a_stale_nonce(w: World) -> None:
    patient = identity(1)
    first = w.do(patient, "register", {"role": "patient"})
    assert w.rejects(first) == "stale_nonce"
    w.do(patient, "grant", {"grantee": w.validators[0].public_key, "scope": "standing"})
    assert w.account(patient)["nonce"] == 2
    older = w.sign(patient, "revoke", {"grant": bytes(32)}, nonce=1)
    assert w.rejects(older) == "stale_nonce"
    replayed_after_commit = first
    w.commit()
    assert w.rejects(replayed_after_commit) == "stale_nonce"


def test_nonce_gap(w: World) -> None:
    assert w.rejects(w.sign(identity(1), "register", {"role": "patient"}, nonce=2)) == "nonce_gap"
    patient = w.patient(1)
    t = w.sign(
        patient, "grant", {"grantee": w.validators[0].public_key, "scope": "standing"}, nonce=3
    )
    assert w.rejects(t) == "nonce_gap"


def test_wrong_chain(w: World) -> None:
    t = w.sign(identity(1), "register", {"role": "patient"}, chain="ehr-other")
    with pytest.raises(InvalidTransaction, match=r"ehr-other.*ehr-test") as info:
        w.apply(t)
    assert info.value.code == "wrong_chain"
    assert w.overlay.changes == {}


def test_unregistered_signer(w: World) -> None:
    stranger = identity(40)
    patient = w.patient(1)
    for kind, body in [
        ("grant", {"grantee": patient.public_key, "scope": "standing"}),
        ("revoke", {"grant": bytes(32)}),
        ("erase", {"records": [bytes(32)]}),
        ("record", w.record_body(stranger, patient)),
    ]:
        assert w.rejects(w.sign(stranger, kind, body)) == "unregistered_signer"


def test_nonce_counts_each_applied_tx(w: World) -> None:
    patient, provider, _ = people(w)
    for expected in (2, 3, 4):
        w.record(provider, patient)
        assert w.account(provider)["nonce"] == expected
    assert w.account(patient)["nonce"] == 1


# --- records ---------------------------------------------------------------------------------


def test_record_by_provider_for_patient(w: World) -> None:
    patient, provider, _ = people(w)
    data_key = crypto.new_data_key()
    body = w.record_body(provider, patient, type_="Condition", data_key=data_key)
    t = w.do(provider, "record", body)
    entry = w.load(P_REC + t.id)
    assert entry == {
        "patient": patient.public_key,
        "author": provider.public_key,
        "blob": body["blob"],
        "size": 1234,
        "type": "Condition",
        "height": w.height,
        "erased": False,
        "ver": 1,
        "nver": 1,
        "seq": 0,
    }
    # A first version is its own root and, until amended, its own head: neither is written.
    assert (records.root_of(t.id, entry), records.head_of(t.id, entry)) == (t.id, t.id)
    # Its only entry named by its id: the wrapped keys stay in the transaction.
    assert [k for k in w.overlay.changes if t.id in k] == [P_REC + t.id]
    assert w.overlay.get(state.seq_key(P_PREC, patient.public_key, 0)) == t.id
    # The first version is the root itself: no version entry until an amendment.
    assert w.overlay.get(state.seq_key(P_VER, t.id, 0)) is None
    assert w.account(patient)["nrec"] == 1
    # A wrapped key per reader, and each opens for that reader only.
    for reader in (patient, provider):
        wrapped = w.wrapped_key(t.id, reader.public_key)
        assert wrapped is not None
        assert reader.unwrap_key(wrapped) == data_key
    assert w.wrapped_key(t.id, identity(3).public_key) is None


def test_patient_records_are_listed_in_order(w: World) -> None:
    patient, provider, other = people(w)
    ids = [
        w.record(provider, patient).id,
        w.record(other, patient).id,
        w.record(provider, patient).id,
    ]
    listed = [w.overlay.get(state.seq_key(P_PREC, patient.public_key, i)) for i in range(4)]
    assert listed == [*ids, None]
    assert w.account(patient)["nrec"] == 3


def test_patient_may_write_their_own_record(w: World) -> None:
    patient = w.patient(1)
    t = w.record(patient, patient)
    assert w.load(P_REC + t.id)["author"] == patient.public_key
    account = w.account(patient)
    assert account == {
        "role": "patient",
        "nonce": 2,
        "since": w.height,
        "nrec": 1,
        "last": w.height,  # the height of the patient's latest record write
    }


def test_who_may_not_write(w: World) -> None:
    patient, provider, _ = people(w)
    other_patient = w.patient(4)
    hospital = w.validators[0]
    assert w.rejects(w.sign(hospital, "record", w.record_body(hospital, patient))) == "not_provider"
    t = w.sign(other_patient, "record", w.record_body(other_patient, patient))
    assert w.rejects(t) == "not_provider"
    # A record must be about a registered patient.
    for subject in (identity(41), provider, hospital):
        t = w.sign(provider, "record", w.record_body(provider, subject))
        assert w.rejects(t) == "unknown_patient"


def test_record_missing_the_patient_key_is_refused_before_state() -> None:
    patient, provider = identity(1), identity(2)
    body = {
        "patient": patient.public_key,
        "blob": bytes(32),
        "size": 1,
        "type": "Observation",
        "keys": fake_keys([provider.public_key]),
    }
    with pytest.raises(InvalidTransaction) as info:
        tx.make(provider, CHAIN, "record", 2, body)
    assert info.value.code == "missing_patient_key"
    with pytest.raises(InvalidTransaction) as info:
        tx.decode(raw_tx(provider, kind="record", nonce=2, body=body))
    assert info.value.code == "missing_patient_key"


def test_record_may_not_wrap_for_strangers(w: World) -> None:
    patient, provider, other = people(w)
    body = w.record_body(provider, patient, readers=[other.public_key])
    assert w.rejects(w.sign(provider, "record", body)) == "unexpected_key_holder"


def test_record_need_not_wrap_for_its_author(w: World) -> None:
    patient, provider, _ = people(w)
    t = w.record(provider, patient, with_author=False)
    assert w.wrapped_key(t.id, provider.public_key) is None


# --- reading -------------------------------------------------------------------------------


def test_may_read(w: World) -> None:
    patient, provider, gp = people(w)
    specialist, stranger = w.provider(4), w.provider(5)
    record = w.record(provider, patient, type_="Condition")
    assert w.may_read(record, patient)
    assert w.may_read(record, provider)
    assert not w.may_read(record, stranger)
    assert not w.may_read(record, w.validators[0])
    w.listed(patient, gp, [record.id])
    assert w.may_read(record, gp)
    observation_only = w.standing(patient, specialist, types=["Observation"])
    assert not w.may_read(record, specialist)
    w.do(patient, "revoke", {"grant": observation_only.id})
    w.standing(patient, specialist, types=["Condition"])
    assert w.may_read(record, specialist)
    assert not w.may_read(crypto.sha256(b"no such record"), patient)


def test_erase(w: World) -> None:
    patient, provider, gp = people(w)
    record = w.record(provider, patient)
    kept = w.record(provider, patient)
    w.standing(patient, gp)
    w.do(patient, "erase", {"records": [record.id]})
    entry = w.load(P_REC + record.id)
    assert entry["erased"] is True
    assert entry["erased_at"] == w.height
    assert entry["blob"]  # the chain keeps the hash
    for who in (patient, provider, gp):
        assert not w.may_read(record, who)
    assert w.may_read(kept, patient)
    assert w.rejects(w.sign(patient, "erase", {"records": [record.id]})) == "record_erased"
    amend = w.record_body(provider, patient, amends=record.id, readers=[gp.public_key])
    assert w.rejects(w.sign(provider, "record", amend)) == "record_erased"
    listed = {"grantee": gp.public_key, "scope": "records", "records": fake_keys([record.id])}
    assert w.rejects(w.sign(patient, "grant", listed)) == "record_erased"


def test_only_the_patient_erases(w: World) -> None:
    patient, provider, _ = people(w)
    other = w.patient(4)
    record = w.record(provider, patient)
    assert w.rejects(w.sign(provider, "erase", {"records": [record.id]})) == "unknown_record"
    assert w.rejects(w.sign(other, "erase", {"records": [record.id]})) == "unknown_record"
    assert w.may_read(record, patient)


def test_failed_tx_undoes_its_own_earlier_writes(w: World) -> None:
    """A tx that fails after writing part of its effect into the scratch overlay must leave
    nothing behind: here the second record of each list is the faulty one."""
    patient, provider, gp = people(w)
    good = w.record(provider, patient)
    erased = w.record(provider, patient)
    w.do(patient, "erase", {"records": [erased.id]})
    ids = sorted([good.id, erased.id])
    grant = {"grantee": gp.public_key, "scope": "records", "records": fake_keys(ids)}
    assert w.rejects(w.sign(patient, "grant", grant)) == "record_erased"
    assert w.wrapped_key(good.id, gp.public_key) is None
    assert not w.may_read(good, gp)
    unknown = crypto.sha256(b"missing")
    erase = {"records": [good.id, unknown]}
    assert w.rejects(w.sign(patient, "erase", erase)) == "unknown_record"
    assert w.load(P_REC + good.id)["erased"] is False


# --- amendments ------------------------------------------------------------------------------


def test_amend_chain_versions(w: World) -> None:
    patient, provider, other = people(w)
    v1 = w.record(provider, patient)
    v2 = w.record(other, patient, amends=v1.id)
    v3 = w.record(provider, patient, amends=v2.id)
    root = w.load(P_REC + v1.id)
    assert (root["head"], root["nver"], root["ver"]) == (v3.id, 3, 1)
    second = w.load(P_REC + v2.id)
    assert (second["root"], second["ver"], second["amends"]) == (v1.id, 2, v1.id)
    assert "head" not in second
    assert w.load(P_REC + v3.id)["ver"] == 3
    versions = [w.overlay.get(state.seq_key(P_VER, v1.id, i)) for i in range(4)]
    assert versions == [None, v2.id, v3.id, None]  # seq 0, the first version, is the root
    # Versions do not count as new records of the patient.
    assert w.account(patient)["nrec"] == 1
    assert w.overlay.get(state.seq_key(P_PREC, patient.public_key, 1)) is None


def test_only_the_head_can_be_amended(w: World) -> None:
    patient, provider, _ = people(w)
    v1 = w.record(provider, patient)
    w.record(provider, patient, amends=v1.id)
    stale = w.sign(provider, "record", w.record_body(provider, patient, amends=v1.id))
    assert w.rejects(stale) == "not_head_version"


def test_amend_keeps_the_type(w: World) -> None:
    patient, provider, _ = people(w)
    v1 = w.record(provider, patient, type_="Observation")
    t = w.sign(
        provider, "record", w.record_body(provider, patient, type_="Condition", amends=v1.id)
    )
    assert w.rejects(t) == "type_mismatch"


def test_amend_unknown_or_other_patients_record(w: World) -> None:
    patient, provider, _ = people(w)
    other = w.patient(4)
    theirs = w.record(provider, other)
    for amends in (theirs.id, crypto.sha256(b"nothing")):
        t = w.sign(provider, "record", w.record_body(provider, patient, amends=amends))
        assert w.rejects(t) == "unknown_record"


def test_amendment_must_follow_current_standing_grants(w: World) -> None:
    patient, provider, gp = people(w)
    v1 = w.record(provider, patient)
    w.standing(patient, gp)
    t = w.sign(provider, "record", w.record_body(provider, patient, amends=v1.id))
    assert w.rejects(t) == "missing_grantee_key"
    w.record(provider, patient, amends=v1.id, readers=[gp.public_key])


def test_load_returns_decoded_values_and_none() -> None:
    reader = MemState({b"x": codec.encode({"a": [1]})})
    assert state.load(reader, b"x") == {"a": [1]}
    assert state.load(reader, b"y") is None


def test_a_record_cannot_name_a_blob_another_record_uses() -> None:
    """Else a patient could write a record naming a victim's public blob hash and erase it,
    deleting the victim's ciphertext on every node."""
    world = World()
    victim, attacker = world.patient(1), world.patient(2)
    doctor = world.provider(3)
    original = world.record_body(doctor, victim)
    world.do(doctor, "record", original)
    copied = world.record_body(attacker, attacker, with_author=False)
    copied["blob"], copied["size"] = original["blob"], original["size"]
    assert world.rejects(world.sign(attacker, "record", copied)) == "blob_in_use"
