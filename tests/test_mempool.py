"""The mempool: admission on top of what is pending, parking of early nonces, limits, reaping,
and the re-check after each block."""

from __future__ import annotations

from typing import Any

import pytest
from helpers_core import CHAIN, World, identity

from ehrnode import mempool as mempool_module
from ehrnode.core import crypto, state, tx
from ehrnode.core.errors import Conflict, InvalidTransaction, LimitExceeded
from ehrnode.core.state import P_STD
from ehrnode.mempool import (
    MAX_AHEAD_UNREGISTERED,
    MAX_NONCE_AHEAD,
    MAX_PARKED_PER_SIGNER,
    Limits,
    Mempool,
)


@pytest.fixture
def w() -> World:
    return World()


def pool(w: World, limits: Limits | None = None) -> Mempool:
    return Mempool(w.base, lambda: w.ctx, limits)


PATIENT = identity(1)
GP = identity(3)


def register(who: Any = PATIENT, nonce: int = 1, name: str | None = None) -> tx.Tx:
    body: dict[str, Any] = {"role": "patient"}
    if name is not None:
        body["name"] = name
    return tx.make(who, CHAIN, "register", nonce, body)


def standing(w: World, nonce: int, who: Any = PATIENT, grantee: Any = None) -> tx.Tx:
    to = w.validators[nonce % 4] if grantee is None else grantee
    return tx.make(who, CHAIN, "grant", nonce, {"grantee": to.public_key, "scope": "standing"})


def commit(w: World, mempool: Mempool, txs: list[tx.Tx]) -> list[tuple[tx.Tx, InvalidTransaction]]:
    """Execute ``txs`` as the next block on the committed state, then tell the mempool."""
    execution = state.execute_block(w.base, w.ctx, txs, w.base.digest())
    w.base.apply(execution.changes)
    w.height += 1
    w.time += 1000
    return mempool.update([t.id for t in txs])


# --- admission -------------------------------------------------------------------------------


def test_admits_in_order_on_top_of_pending(w: World) -> None:
    mempool = pool(w)
    first = register()
    second = standing(w, 2)  # needs the pending register
    assert mempool.add(first) == [first]
    assert mempool.add(second) == [second]
    assert len(mempool) == 2
    assert mempool.size_bytes == first.size + second.size
    assert first.id in mempool
    assert mempool.get(second.id) is second
    assert mempool.reap(1 << 20, 100) == [first, second]
    # Nothing is committed until a block says so.
    assert w.base.get(state.P_ACCT + PATIENT.public_key) is None


def test_duplicate(w: World) -> None:
    mempool = pool(w)
    t = register()
    mempool.add(t)
    with pytest.raises(Conflict) as info:
        mempool.add(t)
    assert info.value.code == "duplicate"
    assert len(mempool) == 1


def test_tx_that_does_not_apply_is_refused_and_changes_nothing(w: World) -> None:
    mempool = pool(w)
    mempool.add(register())
    for bad, code in [
        (register(nonce=1, name="again"), "stale_nonce"),
        (tx.make(GP, "ehr-other", "register", 1, {"role": "patient"}), "wrong_chain"),
        (standing(w, 1, who=GP, grantee=PATIENT), "unregistered_signer"),
        (tx.make(PATIENT, CHAIN, "revoke", 2, {"grant": bytes(32)}), "unknown_grant"),
    ]:
        with pytest.raises(InvalidTransaction) as info:
            mempool.add(bad)
        assert info.value.code == code
        assert bad.id not in mempool
    assert len(mempool) == 1
    # The refused revoke did not use nonce 2: a good tx with nonce 2 still gets in.
    mempool.add(standing(w, 2))


def test_a_rejected_tx_does_not_block_the_next_one(w: World) -> None:
    mempool = pool(w)
    mempool.add(register())
    with pytest.raises(InvalidTransaction):
        mempool.add(tx.make(PATIENT, CHAIN, "revoke", 2, {"grant": bytes(32)}))
    good = standing(w, 2)
    assert mempool.add(good) == [good]


# --- parking ---------------------------------------------------------------------------------


def test_future_nonces_wait_until_the_gap_fills(w: World) -> None:
    mempool = pool(w)
    third, second, first = standing(w, 3), standing(w, 2), register()
    assert mempool.add(third) == []
    assert mempool.add(second) == []
    assert len(mempool) == 0
    assert third.id in mempool and second.id in mempool
    assert mempool.get(third.id) is None  # parked, not pending
    assert mempool.reap(1 << 20, 100) == []
    with pytest.raises(Conflict) as info:
        mempool.add(third)
    assert info.value.code == "duplicate"
    assert mempool.add(first) == [first, second, third]
    assert mempool.reap(1 << 20, 100) == [first, second, third]


def test_another_tx_for_a_parked_nonce_is_a_conflict(w: World) -> None:
    mempool = pool(w)
    mempool.add(standing(w, 2))
    with pytest.raises(Conflict) as info:
        mempool.add(standing(w, 2, grantee=w.validators[3]))
    assert info.value.code == "duplicate"


def test_unparking_stops_at_a_gap(w: World) -> None:
    mempool = pool(w)
    mempool.add(standing(w, 2))
    mempool.add(standing(w, 4))
    assert [t.nonce for t in mempool.add(register())] == [1, 2]
    assert [t.nonce for t in mempool.add(standing(w, 3))] == [3, 4]


def registered(w: World, *who: crypto.Identity) -> None:
    """Commit the registration of ``who`` (as patients) to the world's state."""
    for identity_ in who:
        w.do(identity_, "register", {"role": "patient"})
    w.commit()


def test_nonce_too_far_ahead(w: World) -> None:
    registered(w, PATIENT)  # next nonce 2
    mempool = pool(w)
    assert mempool.add(standing(w, 2 + MAX_NONCE_AHEAD)) == []
    with pytest.raises(InvalidTransaction) as info:
        mempool.add(standing(w, 3 + MAX_NONCE_AHEAD))
    assert info.value.code == "nonce_gap"


def test_an_unregistered_signer_parks_only_just_ahead_of_its_register(w: World) -> None:
    mempool = pool(w)
    assert mempool.add(standing(w, 1 + MAX_AHEAD_UNREGISTERED)) == []
    with pytest.raises(InvalidTransaction) as info:
        mempool.add(standing(w, 2 + MAX_AHEAD_UNREGISTERED))
    assert info.value.code == "nonce_gap"


def test_parking_is_limited_per_signer_and_in_all(w: World) -> None:
    registered(w, PATIENT, GP)  # both at next nonce 2: nonce 3 and up park
    mempool = pool(w)
    for nonce in range(3, 3 + MAX_PARKED_PER_SIGNER):
        mempool.add(standing(w, nonce))
    with pytest.raises(LimitExceeded):
        mempool.add(standing(w, 3 + MAX_PARKED_PER_SIGNER))
    # Another signer still has room.
    assert mempool.add(standing(w, 3, who=GP)) == []


def test_parking_is_limited_in_all(w: World) -> None:
    small = pool(w, Limits(max_parked=2))
    small.add(standing(w, 3))
    small.add(standing(w, 3, who=GP))
    with pytest.raises(LimitExceeded) as info:
        small.add(standing(w, 3, who=identity(4)))
    assert info.value.code == "mempool_full"
    # Admitting what was parked frees the room.
    small.add(register())
    small.add(standing(w, 2))
    small.add(standing(w, 3, who=identity(4)))


# --- limits and reaping ----------------------------------------------------------------------


def test_count_limit(w: World) -> None:
    mempool = pool(w, Limits(max_txs=2))
    mempool.add(register(identity(11)))
    mempool.add(register(identity(12)))
    with pytest.raises(LimitExceeded) as info:
        mempool.add(register(identity(13)))
    assert info.value.code == "mempool_full"
    assert len(mempool) == 2


def test_byte_limit(w: World) -> None:
    a, b = register(identity(11)), register(identity(12))
    mempool = pool(w, Limits(max_bytes=a.size + b.size - 1))
    mempool.add(a)
    with pytest.raises(LimitExceeded):
        mempool.add(b)
    exact = pool(w, Limits(max_bytes=a.size + b.size))
    exact.add(a)
    exact.add(b)
    assert exact.size_bytes == a.size + b.size


def test_reap_in_arrival_order_within_limits(w: World) -> None:
    mempool = pool(w)
    txs = [register(identity(20 + i), name="x" * n) for i, n in enumerate([1, 90, 1, 1, 1])]
    for t in txs:
        mempool.add(t)
    assert mempool.reap(1 << 20, 100) == txs
    assert mempool.reap(1 << 20, 3) == txs[:3]
    assert mempool.reap(1 << 20, 0) == []
    two = txs[0].size + txs[1].size
    assert mempool.reap(two, 100) == txs[:2]
    assert mempool.reap(two - 1, 100) == txs[:1]
    # Reaping stops at the first tx that does not fit rather than skipping it, so a
    # signer's later nonce never overtakes an earlier one.
    assert txs[2].size < txs[1].size
    assert mempool.reap(txs[0].size + txs[2].size, 100) == txs[:1]
    assert len(mempool) == 5  # reaping removes nothing


# --- after a block ---------------------------------------------------------------------------


def test_update_drops_committed(w: World) -> None:
    mempool = pool(w)
    first, second = register(), standing(w, 2)
    mempool.add(first)
    mempool.add(second)
    assert commit(w, mempool, [first]) == []
    assert first.id not in mempool
    assert mempool.reap(1 << 20, 100) == [second]
    assert mempool.size_bytes == second.size
    assert commit(w, mempool, [second]) == []
    assert len(mempool) == 0
    assert mempool.size_bytes == 0


def test_after_a_block_of_the_oldest_the_rest_stand_in_arrival_order(w: World) -> None:
    """Checked and relayed transactions interleaved, the checked ones all of one signer and
    writing the same entries: after a block took the oldest two, the check state holds the
    later ones' writes in their order (the last nonce, every standing grant)."""
    registered(w, PATIENT)
    mempool = pool(w)
    checked = [standing(w, n) for n in (2, 3, 4)]
    relayed = [register(GP), register(identity(4))]
    mempool.add(checked[0])
    mempool.add_relayed(relayed[0])
    mempool.add(checked[1])
    mempool.add_relayed(relayed[1])
    mempool.add(checked[2])
    assert commit(w, mempool, [checked[0], relayed[0]]) == []
    pending = mempool.check_state
    assert state.load(pending, state.P_ACCT + PATIENT.public_key)["nonce"] == 4
    assert len(state.load(pending, P_STD + PATIENT.public_key)) == 3
    assert mempool.add(standing(w, 5))  # the next nonce, checked on top of all of them
    assert [t.nonce for t in mempool.reap(1 << 20, 10)] == [3, 1, 4, 5]


def test_update_drops_a_tx_whose_nonce_a_committed_tx_used(w: World) -> None:
    mempool = pool(w)
    mine = register(name="from this node")
    later = standing(w, 2)
    mempool.add(mine)
    mempool.add(later)
    elsewhere = register(name="from another node")  # same signer and nonce, other content
    dropped = commit(w, mempool, [elsewhere])
    assert [(t, err.code) for t, err in dropped] == [(mine, "stale_nonce")]
    assert mine.id not in mempool
    assert mempool.reap(1 << 20, 100) == [later]  # still applies on the new state
    assert mempool.size_bytes == later.size


def test_update_drops_what_the_block_made_invalid(w: World) -> None:
    mempool = pool(w)
    mempool.add(register())
    grant = standing(w, 2, grantee=GP)  # GP is not registered yet...
    with pytest.raises(InvalidTransaction):
        mempool.add(grant)
    gp_register = register(GP)
    mempool.add(gp_register)
    mempool.add(grant)
    revoke = tx.make(PATIENT, CHAIN, "revoke", 3, {"grant": grant.id})
    mempool.add(revoke)
    # Another node's block registers the patient with a grant of different content at nonce 2:
    # our grant is now stale, and the revoke names a grant that will never exist.
    other_grant = standing(w, 2)
    dropped = commit(w, mempool, [register(), other_grant])
    assert {(t.id, err.code) for t, err in dropped} == {
        (grant.id, "stale_nonce"),
        (revoke.id, "unknown_grant"),
    }
    assert mempool.reap(1 << 20, 100) == [gp_register]


def test_update_unparks_what_the_block_made_next(w: World) -> None:
    mempool = pool(w)
    third = standing(w, 3)
    assert mempool.add(third) == []
    dropped = commit(w, mempool, [register(), standing(w, 2)])
    assert dropped == []
    assert mempool.reap(1 << 20, 100) == [third]


def test_update_drops_parked_txs_whose_nonce_was_used(w: World) -> None:
    mempool = pool(w)
    parked = standing(w, 2, grantee=w.validators[0])
    fourth = standing(w, 4)
    mempool.add(parked)
    mempool.add(fourth)
    other_second = standing(w, 2, grantee=w.validators[1])
    dropped = commit(w, mempool, [register(), other_second])
    assert [(t, err.code) for t, err in dropped] == [(parked, "stale_nonce")]
    assert parked.id not in mempool
    assert fourth.id in mempool and mempool.get(fourth.id) is None  # still waiting for 3
    assert mempool.add(standing(w, 3))[1] == fourth


def test_parked_tx_committed_by_another_node_is_not_reported_dropped(w: World) -> None:
    mempool = pool(w)
    second = standing(w, 2)
    mempool.add(second)
    dropped = commit(w, mempool, [register(), second])
    assert dropped == []
    assert second.id not in mempool
    assert len(mempool) == 0


def test_update_after_an_empty_block_keeps_everything(w: World) -> None:
    mempool = pool(w)
    txs = [register(), standing(w, 2), register(GP)]
    for t in txs:
        mempool.add(t)
    assert commit(w, mempool, []) == []
    assert mempool.reap(1 << 20, 100) == txs


def test_pending_txs_apply_as_a_block_in_reap_order(w: World) -> None:
    mempool = pool(w)
    provider = identity(2)
    endorsement = tx.endorse(w.validators[0], CHAIN, "provider", provider.public_key)
    data_key = crypto.new_data_key()
    wanted = [
        register(),
        tx.make(provider, CHAIN, "register", 1, {"role": "provider", "endorsement": endorsement}),
        tx.make(
            provider,
            CHAIN,
            "record",
            2,
            {
                "patient": PATIENT.public_key,
                "blob": crypto.sha256(data_key),
                "size": 3,
                "type": "Observation",
                "keys": [[PATIENT.public_key, crypto.wrap_key(data_key, PATIENT.public_key)]],
            },
        ),
    ]
    for t in wanted:
        mempool.add(t)
    reaped = mempool.reap(1 << 20, 100)
    execution = state.execute_block(w.base, w.ctx, reaped, w.base.digest())
    assert execution.changes[state.P_REC + wanted[2].id] is not None


def test_relayed_transactions_must_follow_a_known_nonce(w: World) -> None:
    """A peer's transaction that cannot be next is refused: kept, it would hold a place at
    the head of every block's reap for ever."""
    registered(w, PATIENT)  # committed nonce 1
    mempool = pool(w)
    with pytest.raises(InvalidTransaction) as info:
        mempool.add_relayed(standing(w, 3))
    assert info.value.code == "nonce_gap"
    with pytest.raises(InvalidTransaction) as info:
        mempool.add_relayed(standing(w, 1))
    assert info.value.code == "stale_nonce"
    mempool.add_relayed(standing(w, 2))
    mempool.add_relayed(standing(w, 3))
    with pytest.raises(Conflict):
        mempool.add_relayed(standing(w, 3, grantee=w.validators[0]))  # another tx, same nonce
    assert [t.nonce for t in mempool.reap(1 << 20, 10)] == [2, 3]


def test_a_state_read_cached_before_a_block_is_not_used_after_it(w: World) -> None:
    """Reads of the committed state are cached between blocks; a block that changes what
    was read (here another node's block registers the grantee) is seen at once."""
    mempool = pool(w)
    mempool.add(register())
    grant = standing(w, 2, grantee=GP)
    with pytest.raises(InvalidTransaction) as refused:
        mempool.add(grant)  # GP's account was read (and cached) as absent
    assert refused.value.code == "unknown_grantee"
    assert commit(w, mempool, [register(GP)]) == []  # never pending here
    mempool.add(grant)
    assert grant.id in mempool


def test_the_most_recently_committed_ids_are_remembered_up_to_a_bound(
    w: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At least the last RECENTLY_COMMITTED ids, at most twice as many."""
    monkeypatch.setattr(mempool_module, "RECENTLY_COMMITTED", 3)
    mempool = pool(w)
    committed = [register()]
    commit(w, mempool, committed)
    for nonces in ([2], [3, 4], [5], [6, 7], [8], [9, 10], [11]):
        block = [standing(w, nonce) for nonce in nonces]
        assert commit(w, mempool, block) == []
        committed += block
        remembered = [mempool.committed_recently(t.id) for t in committed]
        assert all(remembered[-3:]), remembered
        assert sum(remembered) <= 2 * 3, remembered
    assert not mempool.committed_recently(committed[0].id)  # forgotten: long ago
    assert not mempool.committed_recently(standing(w, 20).id)  # never committed


def test_reads_cached_between_blocks_are_bounded(w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Account look-ups (the RPC's too) go through the mempool's overlay, and an idle
    chain makes no blocks to clear its cache: past the bound it reads through."""
    monkeypatch.setattr(mempool_module, "MAX_CACHED_READS", 10)
    mempool = pool(w)
    overlay = mempool.check_state  # what the RPC reads accounts through
    for i in range(50):
        assert state.load(overlay, state.P_ACCT + bytes([i]) * 32) is None
    assert isinstance(overlay, state.Overlay)
    assert overlay.reads is not None and len(overlay.reads) == 10
    mempool.add(register())  # still admits, reading through
    assert register().id in mempool
