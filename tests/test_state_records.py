"""``records``: many records in one transaction, each with its own id, all or none."""

from __future__ import annotations

from typing import Any

import pytest
from helpers_core import World, fake_keys, identity, raw_tx

from ehrnode.client import fhir
from ehrnode.client.sealing import batch_bodies, seal_record
from ehrnode.core import crypto, state, tx
from ehrnode.core.errors import InvalidTransaction
from ehrnode.core.state import P_PREC, P_REC, P_VER
from ehrnode.mempool import Mempool


@pytest.fixture
def w() -> World:
    return World()


def test_each_record_gets_its_own_id_in_order(w: World) -> None:
    patient, provider = w.patient(1), w.provider(2)
    w.record(provider, patient)  # an earlier single record keeps its place
    keys = [crypto.new_data_key() for _ in range(3)]
    items = [
        w.record_body(provider, patient, type_=kind, data_key=key)
        for kind, key in zip(("Condition", "Observation", "Encounter"), keys, strict=True)
    ]
    t = w.do(provider, "records", {"items": items})

    ids = [tx.record_id(t.id, i) for i in range(3)]
    assert len(set(ids)) == 3 and t.id not in ids
    assert tx.record_bodies(t.kind, t.body) == items
    for index, (rid, item, key) in enumerate(zip(ids, items, keys, strict=True)):
        entry = w.load(P_REC + rid)
        assert entry["blob"] == item["blob"] and entry["type"] == item["type"]
        assert entry["author"] == provider.public_key
        assert "root" not in entry and "head" not in entry and entry["ver"] == 1
        assert (entry["tx"], entry["item"]) == (t.id, index)
        assert w.overlay.get(state.seq_key(P_PREC, patient.public_key, index + 1)) == rid
        assert w.overlay.get(state.seq_key(P_VER, rid, 0)) is None  # the root is version 1
        assert patient.unwrap_key(w.wrapped_key(rid, patient.public_key)) == key
        assert w.overlay.get(state.P_BLOB + item["blob"]) == rid
    assert w.account(patient)["nrec"] == 4
    assert w.account(provider)["nonce"] == t.nonce  # one transaction, one nonce


def _bad_items(w: World, fault: str) -> tuple[Any, Any, list[dict[str, Any]]]:
    patient, provider, stranger = w.patient(1), w.provider(2), w.provider(3)
    items = [w.record_body(provider, patient) for _ in range(3)]
    if fault == "unknown patient":
        items[2] = w.record_body(provider, identity(44))
    elif fault == "stranger's key":
        items[1] = w.record_body(provider, patient, readers=[stranger.public_key])
    elif fault == "blob used twice":
        items[2]["blob"] = items[0]["blob"]
    elif fault == "standing grantee missing":
        w.standing(patient, stranger, types=["Observation"])
    return patient, provider, items


@pytest.mark.parametrize(
    ("fault", "code", "index"),
    [
        ("unknown patient", "unknown_patient", 2),
        ("stranger's key", "unexpected_key_holder", 1),
        ("blob used twice", "blob_in_use", 2),
        ("standing grantee missing", "missing_grantee_key", 0),
    ],
)
def test_one_bad_record_refuses_them_all(w: World, fault: str, code: str, index: int) -> None:
    patient, provider, items = _bad_items(w, fault)
    before = w.account(patient)["nrec"]
    t = w.sign(provider, "records", {"items": items})
    with pytest.raises(InvalidTransaction) as info:
        state.apply_tx(w.overlay.child(), w.ctx, t)
    assert info.value.code == code
    assert info.value.message.startswith(f"record {index}: ")
    assert w.rejects(t) == code  # and nothing of the good records stays behind
    for place in range(len(items)):
        assert w.load(P_REC + tx.record_id(t.id, place)) is None
    assert w.account(patient)["nrec"] == before


def test_batched_records_are_amended_granted_erased_and_read_like_any(w: World) -> None:
    patient, provider, gp = w.patient(1), w.provider(2), w.provider(3)
    t = w.do(provider, "records", {"items": [w.record_body(provider, patient) for _ in range(2)]})
    first, second = tx.record_id(t.id, 0), tx.record_id(t.id, 1)
    # an amendment (itself in a records transaction) of the first
    again = w.do(provider, "records", {"items": [w.record_body(provider, patient, amends=first)]})
    newer = tx.record_id(again.id, 0)
    assert w.load(P_REC + first)["head"] == newer
    assert w.load(P_REC + newer)["ver"] == 2
    # a listed grant of the second, then its erasure
    assert not w.may_read(second, gp)
    w.listed(patient, gp, [second])
    assert w.may_read(second, gp)
    w.do(patient, "erase", {"records": [second]})
    assert w.load(P_REC + second)["erased"]
    assert not w.may_read(second, gp)


def test_one_transaction_writes_for_several_patients_each_by_their_own_rules(w: World) -> None:
    """Two patients' records interleaved in one transaction: each patient's list grows in
    order, and each record needs the standing grantees of its own patient and type."""
    ann, bob, provider, lab = w.patient(1), w.patient(4), w.provider(2), w.provider(3)
    w.record(provider, bob)  # bob's list already holds one record
    w.standing(ann, lab, types=["Observation"])
    items = [
        w.record_body(provider, ann, readers=[lab.public_key]),  # ann's Observation: lab too
        w.record_body(provider, bob),
        w.record_body(provider, ann, type_="Condition"),  # outside the grant's types
        w.record_body(provider, bob, type_="Condition"),
    ]
    t = w.do(provider, "records", {"items": items})

    ids = [tx.record_id(t.id, i) for i in range(4)]
    assert w.account(ann)["nrec"] == 2 and w.account(bob)["nrec"] == 3
    ann_list = [w.overlay.get(state.seq_key(P_PREC, ann.public_key, i)) for i in range(2)]
    bob_list = [w.overlay.get(state.seq_key(P_PREC, bob.public_key, i)) for i in (1, 2)]
    assert ann_list == [ids[0], ids[2]] and bob_list == [ids[1], ids[3]]
    # the grant binds ann's Observations only: bob's and ann's Condition went without lab
    lacking = w.record_body(provider, ann)
    refused = w.sign(provider, "records", {"items": [items[3] | {"blob": bytes(32)}, lacking]})
    assert w.rejects(refused) == "missing_grantee_key"


def test_a_patient_writes_their_own_records_and_the_count_and_nonce_both_hold(w: World) -> None:
    patient = w.patient(1)
    before = w.account(patient)
    items = [w.record_body(patient, patient) for _ in range(3)]
    t = w.do(patient, "records", {"items": items})
    after = w.account(patient)
    assert after["nrec"] == before["nrec"] + 3 and after["nonce"] == t.nonce
    assert w.load(P_REC + tx.record_id(t.id, 2))["author"] == patient.public_key


def _records_body(items: Any) -> dict[str, Any]:
    return {"items": items}


def _item(**changes: Any) -> dict[str, Any]:
    patient = identity(1).public_key
    body = {
        "patient": patient,
        "blob": bytes(32),
        "size": 1,
        "type": "Observation",
        "keys": fake_keys([patient]),
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


@pytest.mark.parametrize(
    ("items", "says"),
    [
        ([], "list of 1 to 256"),
        ([_item()] * 257, "list of 1 to 256"),
        ("not a list", "list of 1 to 256"),
        ([_item(), _item(size=-1)], "items[1]: body field 'size'"),
        ([_item(keys=fake_keys([identity(2).public_key]))], "items[0]: a record must wrap"),
        ([_item(extra=1)], "items[0]: record body has unknown field(s): extra"),
        ([_item(blob=None)], "items[0]: body field 'blob' is required"),
    ],
)
def test_malformed_items_are_refused_naming_the_item(items: Any, says: str) -> None:
    raw = raw_tx(identity(2), kind="records", nonce=2, body=_records_body(items))
    with pytest.raises(InvalidTransaction) as info:
        tx.decode(raw)
    assert says in info.value.message


def test_record_ids_depend_on_transaction_and_place() -> None:
    a, b = crypto.sha256(b"a"), crypto.sha256(b"b")
    assert tx.record_id(a, 0) != tx.record_id(a, 1)
    assert tx.record_id(a, 0) != tx.record_id(b, 0)
    expected = crypto.sha256(b"ehrnode/record/v1\x00" + a + (1).to_bytes(4, "big"))
    assert tx.record_id(a, 1) == expected


def test_a_refused_records_transaction_leaves_nothing_pending(w: World) -> None:
    """The mempool applies a transaction on a scratch overlay too: none of the good items
    of a refused ``records`` transaction become part of what later ones are checked on."""
    patient, provider = w.patient(1), w.provider(2)
    w.commit()
    mempool = Mempool(w.base, lambda: w.ctx)
    good = w.record_body(provider, patient)
    bad = w.record_body(provider, identity(44))  # not a registered patient
    t = w.sign(provider, "records", {"items": [good, bad]})
    with pytest.raises(InvalidTransaction) as info:
        mempool.add(t)
    assert info.value.code == "unknown_patient"
    assert len(mempool) == 0 and t.id not in mempool
    assert mempool.check_state.get(state.P_BLOB + good["blob"]) is None
    assert mempool.check_state.get(P_REC + tx.record_id(t.id, 0)) is None
    # and the same good item goes in on its own afterwards, with the same nonce
    again = w.sign(provider, "records", {"items": [good]}, nonce=t.nonce)
    assert mempool.add(again) == [again]


@pytest.mark.parametrize("max_tx_bytes", [tx.DEFAULT_MAX_TX_BYTES, 16 * 1024])
@pytest.mark.parametrize("readers", [2, 3, 64])
def test_batches_fit_the_chain_transaction_limit(max_tx_bytes: int, readers: int) -> None:
    """The SDK splits records into transactions by an estimate of their size: every real
    transaction it makes must stay under the chain's limit."""
    patient = identity(1).public_key
    others = [identity(200 + i).public_key for i in range(readers - 1)]
    wrapper = crypto.KeyWrapper()
    resource = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}
    bodies = [
        seal_record(patient, fhir.prepare(resource), {patient, *others}, wrapper=wrapper).body
        for _ in range(300)
    ]
    batches = batch_bodies(bodies, max_tx_bytes)
    assert sum(count for _, _, count in batches) == 300
    assert all(count <= tx.MAX_RECORDS_PER_TX for _, _, count in batches)
    writer = identity(2)
    for nonce, (kind, body, _) in enumerate(batches, start=1):
        made = tx.make(writer, "ehr-test", kind, nonce, body)
        assert made.size <= max_tx_bytes
        assert tx.decode(made.raw, max_bytes=max_tx_bytes) == made
    if readers == 2 and max_tx_bytes == tx.DEFAULT_MAX_TX_BYTES:
        assert len(batches) == 2  # 256 and 44: the limit on records, not on bytes
