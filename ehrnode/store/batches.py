"""A commit's LevelDB entries and its write batch, built by compiled code.

Compiled with the transaction path (``ehrnode.compiled``): a block of 4,350 records
commits about 17,600 entries, and as Python the two loops here took about 4.8 us of the
event loop's thread a record, a fifth of a catching-up node's work (benchmarks note 58).
The tables and layouts are ``store.chain``'s; this module only moves entries.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

from ehrnode.core.layout import P_BLOB
from ehrnode.store.claims import ClaimFilter

# b"T" + tx id -> height(8) + index(4) + offset(4) + size(4) (``store.chain``).
TX_PLACE = struct.Struct(">QIII")


def commit_entries(
    batch: dict[bytes, bytes | None],
    changes: Mapping[bytes, bytes | None],
    state_table: bytes,
    claims: ClaimFilter,
    tx_table: bytes,
    height: int,
    tx_ids: Sequence[bytes],
    spans: Sequence[tuple[int, int]],
) -> None:
    """Put a block's state ``changes`` (under ``state_table``) and its transactions'
    places (under ``tx_table``) in ``batch``; add every blob claim written to ``claims``
    (before the write: a read may never miss a written claim)."""
    for key, value in changes.items():
        batch[state_table + key] = value
        if value is not None and key.startswith(P_BLOB):
            claims.add(key)
    if len(tx_ids) != len(spans):
        raise ValueError("a place for every transaction")
    pack = TX_PLACE.pack
    for index in range(len(tx_ids)):
        offset, size = spans[index]
        batch[tx_table + tx_ids[index]] = pack(height, index, offset, size)


def fill(batch: Any, changes: Mapping[bytes, bytes | None]) -> None:
    """Put ``changes`` in a plyvel write batch in key order (``LevelKV._batch``); None
    deletes."""
    put, delete = batch.put, batch.delete
    for key in sorted(changes):
        value = changes[key]
        if value is None:
            delete(key)
        else:
            put(key, value)
