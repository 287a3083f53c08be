"""The state machine's consent rules: standing and listed grants, expiry, revocation."""

from __future__ import annotations

from typing import Any

import pytest
from helpers_core import World, fake_keys, identity

from ehrnode.core import crypto, state
from ehrnode.core.errors import InvalidTransaction
from ehrnode.core.state import P_GRANT, P_KEY, P_LGR, P_STD


@pytest.fixture
def w() -> World:
    return World()


def people(w: World) -> tuple[Any, Any, Any]:
    """A patient, a provider and a second provider, all registered."""
    return w.patient(1), w.provider(2), w.provider(3)


# --- standing grants -------------------------------------------------------------------------


def test_standing_grant_binds_new_records(w: World) -> None:
    patient, provider, gp = people(w)
    grant = w.standing(patient, gp)
    assert w.load(P_GRANT + grant.id) == {
        "patient": patient.public_key,
        "grantee": gp.public_key,
        "scope": "standing",
        "height": w.height,
    }
    assert w.overlay.get(state.P_PGR + patient.public_key + grant.id) == b""
    assert w.load(P_STD + patient.public_key) == [[gp.public_key, grant.id, None, None]]
    missing = w.sign(provider, "record", w.record_body(provider, patient))
    with pytest.raises(InvalidTransaction, match=gp.public_id[:16]):
        w.apply(missing)
    assert w.rejects(missing) == "missing_grantee_key"
    t = w.record(provider, patient, readers=[gp.public_key])
    assert w.wrapped_key(t.id, gp.public_key) is not None


def test_standing_grant_by_type_binds_only_that_type(w: World) -> None:
    patient, provider, gp = people(w)
    w.standing(patient, gp, types=["Observation", "Condition"])
    assert w.load(P_STD + patient.public_key)[0][2] == ["Condition", "Observation"]
    other_type = w.sign(provider, "record", w.record_body(provider, patient, type_="Immunization"))
    w.apply(other_type)
    extra = w.record_body(provider, patient, type_="Immunization", readers=[gp.public_key])
    assert w.rejects(w.sign(provider, "record", extra)) == "unexpected_key_holder"
    for type_ in ("Observation", "Condition"):
        t = w.sign(provider, "record", w.record_body(provider, patient, type_=type_))
        assert w.rejects(t) == "missing_grantee_key"
        w.record(provider, patient, type_=type_, readers=[gp.public_key])


def test_standing_grant_expires(w: World) -> None:
    patient, provider, gp = people(w)
    expires = w.time + 10_000
    w.standing(patient, gp, expires=expires)
    earlier = w.record(provider, patient, readers=[gp.public_key])
    assert w.may_read(earlier, gp)
    w.time = expires - 1
    assert w.rejects(w.sign(provider, "record", w.record_body(provider, patient))) == (
        "missing_grantee_key"
    )
    assert w.may_read(earlier, gp)
    w.time = expires
    assert not w.may_read(earlier, gp)
    late = w.sign(provider, "record", w.record_body(provider, patient, readers=[gp.public_key]))
    assert w.rejects(late) == "unexpected_key_holder"
    w.record(provider, patient)


# --- a standing grant names the height its records were listed at ----------------------------


def standing_through(w: World, patient: Any, gp: Any, through: int) -> Any:
    body = {"grantee": gp.public_key, "scope": "standing", "through": through}
    return w.sign(patient, "grant", body)


def test_a_standing_grant_is_refused_if_a_record_was_written_after_its_listing(
    w: World,
) -> None:
    patient, provider, gp = people(w)
    w.commit()
    listed_at = w.height - 1  # the head the patient's records were listed at
    w.record(provider, patient)  # the next block: not in that listing
    w.commit()
    late = standing_through(w, patient, gp, listed_at)
    assert w.rejects(late) == "records_changed"
    with pytest.raises(InvalidTransaction, match=f"height {listed_at}"):
        w.apply(late)
    w.apply(standing_through(w, patient, gp, w.height - 1))  # listed again: in force
    assert w.load(P_STD + patient.public_key)[0][0] == gp.public_key


def test_a_new_version_also_counts_as_a_write_after_the_listing(w: World) -> None:
    patient, provider, gp = people(w)
    first = w.record(provider, patient)
    w.commit()
    listed_at = w.height - 1
    assert w.account(patient)["last"] == listed_at
    w.record(provider, patient, amends=first.id)
    w.commit()
    assert w.account(patient)["last"] == listed_at + 1
    assert w.rejects(standing_through(w, patient, gp, listed_at)) == "records_changed"


def test_records_of_other_patients_do_not_refuse_a_standing_grant(w: World) -> None:
    patient, provider, gp = people(w)
    other = w.patient(4)
    w.record(provider, patient)
    w.commit()
    listed_at = w.height - 1
    w.record(provider, other)
    w.commit()
    w.apply(standing_through(w, patient, gp, listed_at))
    assert "last" not in w.account(gp)  # only a patient written to keeps it


def test_grant_that_has_already_expired(w: World) -> None:
    patient, _, gp = people(w)
    for expires in (w.time, w.time - 1, 0):
        t = w.sign(
            patient, "grant", {"grantee": gp.public_key, "scope": "standing", "expires": expires}
        )
        assert w.rejects(t) == "already_expired"


def test_revoking_a_standing_grant_removes_the_obligation(w: World) -> None:
    patient, provider, gp = people(w)
    grant = w.standing(patient, gp)
    before = w.record(provider, patient, readers=[gp.public_key])
    assert w.may_read(before, gp)
    w.do(patient, "revoke", {"grant": grant.id})
    assert w.load(P_GRANT + grant.id)["revoked"] == w.height
    assert w.overlay.get(P_STD + patient.public_key) is None
    assert not w.may_read(before, gp)
    w.record(provider, patient)
    extra = w.sign(provider, "record", w.record_body(provider, patient, readers=[gp.public_key]))
    assert w.rejects(extra) == "unexpected_key_holder"
    assert w.rejects(w.sign(patient, "revoke", {"grant": grant.id})) == "already_revoked"


def test_revoking_one_of_two_standing_grants_keeps_the_other(w: World) -> None:
    patient, provider, gp = people(w)
    specialist = w.provider(4)
    first = w.standing(patient, gp)
    w.standing(patient, specialist, types=["Observation"])
    w.do(patient, "revoke", {"grant": first.id})
    std = w.load(P_STD + patient.public_key)
    assert [s[0] for s in std] == [specialist.public_key]
    t = w.sign(provider, "record", w.record_body(provider, patient))
    assert w.rejects(t) == "missing_grantee_key"
    w.record(provider, patient, readers=[specialist.public_key])


def test_revoke_only_own_known_grants(w: World) -> None:
    patient, _, gp = people(w)
    other = w.patient(4)
    grant = w.standing(patient, gp)
    assert w.rejects(w.sign(other, "revoke", {"grant": grant.id})) == "unknown_grant"
    assert w.rejects(w.sign(patient, "revoke", {"grant": crypto.sha256(b"no")})) == "unknown_grant"


def test_who_may_grant_and_to_whom(w: World) -> None:
    patient, provider, gp = people(w)
    body = {"grantee": gp.public_key, "scope": "standing"}
    assert w.rejects(w.sign(provider, "grant", body)) == "not_patient"
    assert w.rejects(w.sign(w.validators[0], "grant", body)) == "not_patient"
    to_self = {"grantee": patient.public_key, "scope": "standing"}
    assert w.rejects(w.sign(patient, "grant", to_self)) == "malformed_body"
    unknown = {"grantee": identity(77).public_key, "scope": "standing"}
    assert w.rejects(w.sign(patient, "grant", unknown)) == "unknown_grantee"


# --- listed grants ---------------------------------------------------------------------------


def test_listed_grant(w: World) -> None:
    patient, provider, gp = people(w)
    r1 = w.record(provider, patient)
    r2 = w.record(provider, patient)
    data_key = crypto.new_data_key()
    body = {
        "grantee": gp.public_key,
        "scope": "records",
        "records": [[r1.id, crypto.wrap_key(data_key, gp.public_key)]],
    }
    grant = w.do(patient, "grant", body)
    assert w.load(P_GRANT + grant.id)["records"] == [r1.id]
    assert gp.unwrap_key(w.overlay.get(P_KEY + r1.id + gp.public_key)) == data_key
    assert w.wrapped_key(r1.id, gp.public_key) == w.overlay.get(P_KEY + r1.id + gp.public_key)
    assert w.load(P_LGR + r1.id + gp.public_key) == [grant.id]
    assert w.may_read(r1, gp)
    assert not w.may_read(r2, gp)
    # A listed grant puts no duty on new records.
    w.record(provider, patient)
    w.do(patient, "revoke", {"grant": grant.id})
    assert w.overlay.get(P_LGR + r1.id + gp.public_key) is None
    assert not w.may_read(r1, gp)


def test_a_listed_grant_replaces_the_writers_wrap_for_that_reader(w: World) -> None:
    """Nothing on chain proves that a writer's wrap opens; the patient's grant wins."""
    patient, provider, gp = people(w)
    w.standing(patient, gp)
    record = w.record(provider, patient, readers=[gp.public_key])
    written = dict(record.body["keys"])
    assert w.wrapped_key(record.id, gp.public_key) == written[gp.public_key]
    data_key = crypto.new_data_key()
    wrap = crypto.wrap_key(data_key, gp.public_key)
    body = {"grantee": gp.public_key, "scope": "records", "records": [[record.id, wrap]]}
    w.do(patient, "grant", body)
    assert gp.unwrap_key(w.wrapped_key(record.id, gp.public_key)) == data_key
    # Everyone else still gets the writer's wrap.
    assert w.wrapped_key(record.id, patient.public_key) == written[patient.public_key]


def test_listed_grant_of_someone_elses_or_unknown_record(w: World) -> None:
    patient, provider, gp = people(w)
    other = w.patient(4)
    theirs = w.record(provider, other)
    for record_id in (theirs.id, crypto.sha256(b"nothing")):
        body = {"grantee": gp.public_key, "scope": "records", "records": fake_keys([record_id])}
        assert w.rejects(w.sign(patient, "grant", body)) == "unknown_record"


def test_listed_grant_with_expiry(w: World) -> None:
    patient, provider, gp = people(w)
    r = w.record(provider, patient)
    w.listed(patient, gp, [r.id], expires=w.time + 5)
    assert w.may_read(r, gp, now=w.time + 4)
    assert not w.may_read(r, gp, now=w.time + 5)


def test_revoking_a_newer_listed_grant_leaves_an_older_one_for_another_record(w: World) -> None:
    patient, provider, gp = people(w)
    r1, r2 = w.record(provider, patient), w.record(provider, patient)
    w.listed(patient, gp, [r1.id])
    newer = w.listed(patient, gp, [r2.id])
    w.do(patient, "revoke", {"grant": newer.id})
    assert w.may_read(r1, gp)
    assert not w.may_read(r2, gp)


def test_overlapping_listed_grants_each_stay_in_force(w: World) -> None:
    """Two listed grants of the same record to the same grantee: each counts on its own, so
    one expiring or being revoked does not end the other."""
    patient, provider, gp = people(w)
    record = w.record(provider, patient)
    lasting = w.listed(patient, gp, [record.id])
    short = w.listed(patient, gp, [record.id], expires=w.time + 100)
    assert w.may_read(record, gp, now=w.time + 100)  # the short one expired, not the other
    w.do(patient, "revoke", {"grant": short.id})
    assert w.may_read(record, gp)
    w.do(patient, "revoke", {"grant": lasting.id})
    assert not w.may_read(record, gp)
    assert w.overlay.get(P_LGR + record.id + gp.public_key) is None


def test_revoking_the_older_of_two_listed_grants_keeps_the_newer(w: World) -> None:
    patient, provider, gp = people(w)
    record = w.record(provider, patient)
    older = w.listed(patient, gp, [record.id])
    w.listed(patient, gp, [record.id])
    w.do(patient, "revoke", {"grant": older.id})
    assert w.may_read(record, gp)


def test_a_standing_grant_by_type_cannot_carry_keys_of_other_types() -> None:
    world = World()
    patient = world.patient(1)
    doctor = world.provider(2)
    grantee = world.provider(3)
    note = world.record(doctor, patient, type_="Observation")
    claim = world.record(doctor, patient, type_="Claim")
    body = {
        "grantee": grantee.public_key,
        "scope": "standing",
        "types": ["Observation"],
        "records": fake_keys([note.id, claim.id]),
    }
    assert world.rejects(world.sign(patient, "grant", body)) == "type_mismatch"
    body["records"] = fake_keys([note.id])
    world.do(patient, "grant", body)
    assert world.may_read(note, grantee) and not world.may_read(claim, grantee)
