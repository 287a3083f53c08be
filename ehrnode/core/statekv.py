"""The state as the rules see it: a key-value reader, an overlay of pending writes, the
block context, and the state hash.

The state hash is an additive multiset hash (AdHash, Bellare & Micciancio 1997) of the
entries: the sum, mod 2**2048, of SHAKE-256(len(key) || key || value) read as 256-byte
integers, then hashed with SHA-256. Adding or removing an entry updates it in O(1), and
anyone can recompute it from a full scan of the state. Which entries count (all but the
index entries of ``core.layout``) is ``core.state``'s to say: ``digest_of`` sums what it
is given, ``state.state_digest`` a whole state.

Pure: no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ehrnode.core import codec, crypto

_DIGEST_BYTES = 256
_MODULUS = 1 << (8 * _DIGEST_BYTES)


class StateReader(Protocol):
    def get(self, key: bytes) -> bytes | None: ...


@dataclass(frozen=True)
class BlockContext:
    chain: str
    height: int
    time: int  # ms since the epoch, from the block header
    validators: Mapping[bytes, int]


class Overlay:
    """Writes pending over a reader; ``changes`` maps key -> new value (None = deleted).

    ``cache_reads``: remember what was read from the base (a block's execution reads the
    same accounts many times, and the state hash needs each changed key's old value), up
    to ``max_reads`` keys when given.
    ``fresh``: keys written with ``put_new``, which the rules know are not in the base (they
    embed a transaction id or a counter never used before), so the state hash needs no
    read to learn their old value.
    """

    def __init__(
        self, base: StateReader, *, cache_reads: bool = False, max_reads: int | None = None
    ) -> None:
        self.base = base
        self.changes: dict[bytes, bytes | None] = {}
        self.reads: dict[bytes, bytes | None] | None = {} if cache_reads else None
        self.max_reads = max_reads  # past this many cached reads, read through uncached
        self.fresh: set[bytes] = set()

    def get(self, key: bytes) -> bytes | None:
        if key in self.changes:
            return self.changes[key]
        reads = self.reads
        if reads is None:
            return self.base.get(key)
        if key in reads:
            return reads[key]
        value = self.base.get(key)
        if self.max_reads is None or len(reads) < self.max_reads:
            reads[key] = value
        return value

    def original(self, key: bytes) -> bytes | None:
        """The base's value of ``key``, from the read cache when it was read before."""
        if key in self.fresh:
            return None
        if self.reads is not None and key in self.reads:
            return self.reads[key]
        return self.base.get(key)

    def put(self, key: bytes, value: bytes | None) -> None:
        self.changes[key] = value

    def put_new(self, key: bytes, value: bytes) -> None:
        """Write a key the rules guarantee is absent from the base."""
        self.changes[key] = value
        self.fresh.add(key)

    def child(self) -> Overlay:
        return Overlay(self)

    def merge(self, child: Overlay) -> None:
        self.changes.update(child.changes)
        self.fresh.update(child.fresh)


def seq_key(prefix: bytes, owner: bytes, seq: int) -> bytes:
    return prefix + owner + seq.to_bytes(8, "big")  # compiled, a C helper; struct.pack a call


def load(reader: StateReader, key: bytes) -> Any:
    raw = reader.get(key)
    # Entries are written by this node's own state machine, in canonical form.
    return None if raw is None else codec.decode_trusted(raw)


def save(overlay: Overlay, key: bytes, value: Any) -> None:
    overlay.put(key, codec.encode_trusted(value))


def save_new(overlay: Overlay, key: bytes, value: Any) -> None:
    overlay.put_new(key, codec.encode_trusted(value))


# --- state hash ---------------------------------------------------------------------------


def entry_digest(key: bytes, value: bytes) -> int:
    h = hashlib.shake_256(len(key).to_bytes(4, "big") + key + value).digest(_DIGEST_BYTES)
    return int.from_bytes(h, "big")


def update_digest(digest: int, key: bytes, old: bytes | None, new: bytes | None) -> int:
    if old is not None:
        digest -= entry_digest(key, old)
    if new is not None:
        digest += entry_digest(key, new)
    return digest % _MODULUS


def digest_moved(
    digest: int, added: Iterable[tuple[bytes, bytes]], removed: Iterable[tuple[bytes, bytes]]
) -> int:
    """``digest`` with ``added`` entries in and ``removed`` ones out, one reduction at the
    end (the same value as updating entry by entry)."""
    # entry_digest inlined: ``ehrnode check`` runs this loop over every entry of the state.
    shake, from_bytes, size = hashlib.shake_256, int.from_bytes, _DIGEST_BYTES
    total = digest
    for key, value in added:
        total += from_bytes(shake(len(key).to_bytes(4, "big") + key + value).digest(size), "big")
    for key, value in removed:
        total -= from_bytes(shake(len(key).to_bytes(4, "big") + key + value).digest(size), "big")
    return total % _MODULUS


def digest_changed(
    base: Overlay | StateReader,
    changes: Mapping[bytes, bytes | None],
    digest: int,
    skip: tuple[bytes, ...],
) -> int:
    """``digest`` after ``changes``, but for the keys that start with one of ``skip``;
    ``base`` gives each key's value before them (an Overlay its base's, from its read
    cache). The same value as ``digest_moved`` of the entries added and removed, without
    listing them first (a tuple an entry) or calling an Overlay's method by name."""
    overlay = base if isinstance(base, Overlay) else None
    shake, from_bytes, size = hashlib.shake_256, int.from_bytes, _DIGEST_BYTES
    total = digest
    for key, new in changes.items():
        skipped = False
        for start in skip:  # compiled, one prefix at a time is a C helper, a tuple a call
            if key.startswith(start):
                skipped = True
                break
        if skipped:
            continue
        old = overlay.original(key) if overlay is not None else base.get(key)
        if old == new:
            continue  # rewritten unchanged: no effect on the multiset
        prefix = len(key).to_bytes(4, "big") + key
        if old is not None:
            total -= from_bytes(shake(prefix + old).digest(size), "big")
        if new is not None:
            total += from_bytes(shake(prefix + new).digest(size), "big")
    return total % _MODULUS


def digest_of(entries: Iterable[tuple[bytes, bytes]]) -> int:
    total = 0
    for key, value in entries:
        total += entry_digest(key, value)
    return total % _MODULUS


def state_hash(digest: int) -> bytes:
    return crypto.sha256(b"ehrnode/state/v1\x00" + digest.to_bytes(_DIGEST_BYTES, "big"))
