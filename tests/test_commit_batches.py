"""A commit's entries and write batch (``store.batches``, compiled with the transaction
path): every state change under its table, every blob claim written into the claim filter
before the write, every transaction's place; the batch in key order, deletes included."""

from __future__ import annotations

import os
from typing import Any

import pytest

from ehrnode.core.layout import P_ACCT, P_BLOB
from ehrnode.store.batches import TX_PLACE, commit_entries, fill
from ehrnode.store.claims import ClaimFilter


class RecordingBatch:
    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes, bytes | None]] = []

    def put(self, key: bytes, value: bytes) -> None:
        self.calls.append(("put", key, value))

    def delete(self, key: bytes) -> None:
        self.calls.append(("delete", key, None))


def test_the_batch_goes_in_key_order_with_its_deletes() -> None:
    changes: dict[bytes, bytes | None] = {os.urandom(12): os.urandom(8) for _ in range(500)}
    gone = [os.urandom(12) for _ in range(50)]
    changes.update(dict.fromkeys(gone))
    batch = RecordingBatch()
    fill(batch, changes)
    assert [key for _, key, _ in batch.calls] == sorted(changes)
    assert all((op == "delete") == (value is None) for op, _, value in batch.calls)
    assert {key: value for _, key, value in batch.calls} == changes


def test_a_commits_entries_hold_its_changes_claims_and_transaction_places() -> None:
    claimed, released = P_BLOB + os.urandom(32), P_BLOB + os.urandom(32)
    account = P_ACCT + os.urandom(32)
    changes: dict[bytes, bytes | None] = {claimed: b"rid", released: None, account: b"acct"}
    ids = [os.urandom(32) for _ in range(3)]
    spans = [(10, 5), (17, 300), (320, 70_000)]
    claims = ClaimFilter()
    batch: dict[bytes, bytes | None] = {}
    commit_entries(batch, changes, b"S", claims, b"T", 9, ids, spans)
    assert {key: batch[b"S" + key] for key in changes} == changes
    assert [TX_PLACE.unpack(batch[b"T" + tx_id]) for tx_id in ids] == [  # type: ignore[arg-type]
        (9, index, offset, size) for index, (offset, size) in enumerate(spans)
    ]
    assert len(batch) == len(changes) + len(ids)
    claims.ready = True
    assert claims.may_hold(claimed) and claims.count == 1  # a deleted claim is not added
    assert claims.rules_out(P_BLOB + os.urandom(32))


def test_every_transaction_needs_its_place() -> None:
    batch: dict[bytes, Any] = {}
    with pytest.raises(ValueError, match="place"):
        commit_entries(batch, {}, b"S", ClaimFilter(), b"T", 1, [os.urandom(32)], [])
