"""The state hash: incremental updates equal a full recompute, block by block."""

from __future__ import annotations

from typing import Any

import pytest
from helpers_core import CHAIN, MemState, World, identity, wrapped_keys
from hypothesis import given, settings, strategies as st

from ehrnode.core import crypto, state, tx
from ehrnode.core.errors import InvalidTransaction
from ehrnode.core.state import P_STD


@pytest.fixture
def w() -> World:
    return World()


def people(w: World) -> tuple[Any, Any, Any]:
    """A patient, a provider and a second provider, all registered."""
    return w.patient(1), w.provider(2), w.provider(3)


# --- the state hash --------------------------------------------------------------------------

KEYS = st.sampled_from([b"a", b"b", b"acct" + bytes(32), b"rec" + bytes(32), b"", b"\x00"])
OPS = st.lists(st.tuples(KEYS, st.none() | st.binary(max_size=16)), max_size=40)


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_incremental_digest_equals_full_recompute(ops: list[tuple[bytes, bytes | None]]) -> None:
    entries: dict[bytes, bytes] = {}
    digest = state.digest_of([])
    assert digest == 0
    for key, new in ops:
        digest = state.update_digest(digest, key, entries.get(key), new)
        if new is None:
            entries.pop(key, None)
        else:
            entries[key] = new
        assert digest == state.digest_of(entries.items())
        assert digest == state.digest_of(reversed(list(entries.items())))


def test_digest_separates_key_from_value() -> None:
    assert state.entry_digest(b"ab", b"c") != state.entry_digest(b"a", b"bc")
    assert state.digest_of([(b"k", b"1")]) != state.digest_of([(b"k", b"2")])
    # A multiset hash: the same entry twice is not the same as once.
    assert state.digest_of([(b"k", b"v")] * 2) != state.digest_of([(b"k", b"v")])


def test_state_hash_is_32_bytes_and_differs_per_digest() -> None:
    assert len(state.state_hash(0)) == 32
    assert state.state_hash(0) != state.state_hash(1)


def test_execute_block_digest_equals_full_recompute(w: World) -> None:
    # Block 1: people, records, a standing grant.
    patient, provider, gp = identity(1), identity(2), identity(3)
    endorsement = tx.endorse(w.validators[0], CHAIN, "provider", provider.public_key)
    g_endorsement = tx.endorse(w.validators[0], CHAIN, "provider", gp.public_key)
    block1 = [
        tx.make(patient, CHAIN, "register", 1, {"role": "patient"}),
        tx.make(provider, CHAIN, "register", 1, {"role": "provider", "endorsement": endorsement}),
        tx.make(gp, CHAIN, "register", 1, {"role": "provider", "endorsement": g_endorsement}),
        tx.make(patient, CHAIN, "grant", 2, {"grantee": gp.public_key, "scope": "standing"}),
    ]
    base = w.base
    digest = base.digest()
    execution = state.execute_block(base, w.ctx, block1, digest)
    base.apply(execution.changes)
    assert execution.digest == base.digest()
    assert execution.state_hash == state.state_hash(base.digest())
    # Block 2 overwrites accounts and deletes an entry block 1 made (the standing list).
    w.overlay = state.Overlay(base)
    grant_id = block1[3].id
    record = tx.make(
        provider,
        CHAIN,
        "record",
        2,
        w.record_body(provider, patient, readers=[gp.public_key]),
    )
    block2 = [
        record,
        tx.make(patient, CHAIN, "revoke", 3, {"grant": grant_id}),
        tx.make(patient, CHAIN, "erase", 4, {"records": [record.id]}),
    ]
    execution = state.execute_block(base, w.ctx, block2, base.digest())
    assert execution.changes[P_STD + patient.public_key] is None
    assert base.get(P_STD + patient.public_key) is not None
    base.apply(execution.changes)
    assert execution.digest == base.digest()


def test_execute_block_stops_at_the_first_invalid_tx(w: World) -> None:
    patient = identity(1)
    good = tx.make(patient, CHAIN, "register", 1, {"role": "patient"})
    with pytest.raises(InvalidTransaction) as info:
        state.execute_block(w.base, w.ctx, [good, good], w.base.digest())
    assert info.value.code == "stale_nonce"


def test_execute_block_with_nothing_changes_nothing(w: World) -> None:
    execution = state.execute_block(w.base, w.ctx, [], w.base.digest())
    assert execution.changes == {}
    assert execution.digest == w.base.digest()


ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["register", "record", "grant", "revoke", "erase", "amend", "commit"]),
        st.integers(0, 3),
        st.integers(0, 3),
    ),
    max_size=25,
)


@settings(max_examples=40, deadline=None)
@given(ACTIONS)
def test_block_digests_track_the_full_state(actions: list[tuple[str, int, int]]) -> None:
    """Random transactions, some of them rejected, cut into blocks: after every block the
    carried digest equals a recompute over the whole state."""
    w = World()
    patients = [identity(10 + i) for i in range(4)]
    providers = [identity(20 + i) for i in range(4)]
    nonces: dict[bytes, int] = {}
    grants: list[tuple[Any, bytes]] = []
    records: list[tuple[Any, bytes, str]] = []
    pending: list[tx.Tx] = []
    overlay = state.Overlay(w.base)
    digest = w.base.digest()

    def sign(who: Any, kind: str, body: dict[str, Any]) -> None:
        nonce = nonces.get(who.public_key, 0) + 1
        t = tx.make(who, CHAIN, kind, nonce, body)
        try:
            state.apply_tx(overlay.child(), w.ctx, t)
        except InvalidTransaction:
            return
        state.apply_tx(overlay, w.ctx, t)
        nonces[who.public_key] = nonce
        pending.append(t)
        if kind == "grant":
            grants.append((who, t.id))
        if kind == "record":
            records.append((body["patient"], t.id, body["type"]))

    def readers(patient: bytes, type_: str) -> set[bytes]:
        return state.required_readers(overlay, patient, type_, w.time)

    def commit() -> None:
        nonlocal digest, overlay
        execution = state.execute_block(w.base, w.ctx, pending, digest)
        assert execution.changes == overlay.changes
        w.base.apply(execution.changes)
        digest = execution.digest
        assert digest == w.base.digest()
        pending.clear()
        overlay = state.Overlay(w.base)
        w.height += 1
        w.time += 1000

    for action, a, b in actions:
        patient, provider = patients[a], providers[b]
        type_ = ["Observation", "Condition"][b % 2]
        if action == "register":
            if a % 2:
                sign(patient, "register", {"role": "patient"})
            else:
                e = tx.endorse(w.validators[b], CHAIN, "provider", provider.public_key)
                sign(provider, "register", {"role": "provider", "endorsement": e})
        elif action == "record":
            key = crypto.new_data_key()
            body = {
                "patient": patient.public_key,
                "blob": crypto.sha256(key),
                "size": 1,
                "type": type_,
                "keys": wrapped_keys(key, readers(patient.public_key, type_)),
            }
            sign(provider, "record", body)
        elif action == "grant":
            body = {"grantee": provider.public_key, "scope": "standing"}
            if b % 2:
                body["types"] = ["Observation"]
            sign(patient, "grant", body)
        elif action == "revoke" and grants:
            who, grant_id = grants[b % len(grants)]
            sign(who, "revoke", {"grant": grant_id})
        elif action == "erase" and records:
            owner, record_id, _ = records[b % len(records)]
            sign(
                next(p for p in patients if p.public_key == owner),
                "erase",
                {"records": [record_id]},
            )
        elif action == "amend" and records:
            owner, record_id, rtype = records[b % len(records)]
            key = crypto.new_data_key()
            body = {
                "patient": owner,
                "blob": crypto.sha256(key),
                "size": 2,
                "type": rtype,
                "keys": wrapped_keys(key, readers(owner, rtype)),
                "amends": record_id,
            }
            sign(provider, "record", body)
        elif action == "commit":
            commit()
    commit()


# --- index entries -----------------------------------------------------------------------


def index_world() -> World:
    """Records (one amended twice), a records transaction, listed and standing grants."""
    w = World()
    patient, provider, other = w.patient(1), w.provider(2), w.provider(3)
    first = w.record(provider, patient)
    w.record(provider, patient, type_="Condition")
    w.commit()
    second = w.do(provider, "record", w.record_body(provider, patient, amends=first.id))
    w.commit()
    w.do(provider, "record", w.record_body(provider, patient, amends=second.id))
    items = [w.record_body(provider, patient) for _ in range(3)]
    w.do(provider, "records", {"items": items})
    w.listed(patient, other, [first.id])
    w.standing(patient, other, types=["Observation"])
    w.commit()
    return w


def test_index_entries_are_exactly_those_the_hashed_entries_imply() -> None:
    entries = index_world().base.entries
    stored = sorted((k, v) for k, v in entries.items() if not state.in_state_hash(k))
    hashed = [(k, v) for k, v in entries.items() if state.in_state_hash(k)]
    implied = sorted(pair for k, v in hashed for pair in state.implied_index(k, v))
    assert stored == implied  # as lists: no two entries imply the same index entry
    prefixes = {p for k, _ in stored for p in state.INDEX_PREFIXES if k.startswith(p)}
    assert prefixes == set(state.INDEX_PREFIXES)  # each kind of index entry was made


def test_index_entries_are_outside_the_state_hash_and_everything_else_is_in() -> None:
    entries = dict(index_world().base.entries)
    digest = state.state_digest(entries.items())
    for key in list(entries):
        changed = {**entries, key: entries[key] + b"\x00"}
        if state.in_state_hash(key):
            assert state.state_digest(changed.items()) != digest, key
        else:
            assert state.state_digest(changed.items()) == digest, key
            without = {k: v for k, v in entries.items() if k != key}
            assert state.state_digest(without.items()) == digest, key


# Keys of every kind the state holds, index entries among them (``prec``, ``blob``, ...).
BLOCK_KEYS = st.sampled_from(
    [
        p + bytes([n])
        for p in (b"acct", b"rec", b"prec", b"blob", b"ver", b"pgr", b"grant")
        for n in (1, 2)
    ]
)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(BLOCK_KEYS, st.binary(max_size=8), max_size=10),
    st.dictionaries(BLOCK_KEYS, st.none() | st.binary(max_size=8), max_size=10),
    st.sampled_from(["committed state", "block overlay", "block overlay, keys read first"]),
)
def test_a_blocks_digest_is_the_full_recompute_of_the_state_it_leaves(
    before: dict[bytes, bytes], changes: dict[bytes, bytes | None], reader_kind: str
) -> None:
    """``digest_after``: each changed key's old value taken out and its new one put in,
    unchanged rewrites and deletions of absent keys counting for nothing, index entries
    for nothing at all; the old values read from the committed state, or from a block's
    overlay holding the changes (its base's values, from its read cache when read)."""
    base = MemState(before)
    after = MemState(before)
    after.apply(changes)
    if reader_kind == "committed state":
        assert state.digest_after(base, changes, base.digest()) == after.digest()
        return
    overlay = state.Overlay(base, cache_reads=True)
    if reader_kind.endswith("read first"):
        for key in changes:
            overlay.get(key)
    for key, value in changes.items():
        if value is not None and key not in before:
            overlay.put_new(key, value)  # as the rules write a key they know is new
        else:
            overlay.put(key, value)
    assert overlay.changes == changes
    assert state.digest_after(overlay, overlay.changes, base.digest()) == after.digest()
