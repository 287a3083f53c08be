"""Builders shared by the core tests: deterministic identities, a genesis, an in-memory state,
hand-made (possibly malformed) transaction bytes, and ``World``, which signs transactions with
the right nonces and applies them through ``state.Overlay`` the way a block would."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pytest

from ehrnode.core import codec, crypto, state, tx
from ehrnode.core.errors import InvalidTransaction
from ehrnode.core.genesis import Genesis, ValidatorInfo

CHAIN = "ehr-test"
WRAPPED = crypto.WRAPPED_KEY_BYTES


def identity(n: int) -> crypto.Identity:
    """The same identity for the same ``n`` in every run."""
    return crypto.Identity(hashlib.sha256(b"ehrnode test identity %d" % n).digest())


def make_genesis(
    validators: Sequence[crypto.Identity],
    *,
    chain: str = CHAIN,
    powers: Sequence[int] | None = None,
) -> Genesis:
    infos = tuple(
        ValidatorInfo(v.public_key, 1 if powers is None else powers[i], f"validator {i}")
        for i, v in enumerate(validators)
    )
    return Genesis(chain, 1_700_000_000_000, infos)


class MemState:
    """A committed state held in a dict (what the LevelDB store is to the node)."""

    def __init__(self, entries: Mapping[bytes, bytes | None] | None = None) -> None:
        self.entries: dict[bytes, bytes] = {}
        if entries:
            self.apply(entries)

    def get(self, key: bytes) -> bytes | None:
        return self.entries.get(key)

    def apply(self, changes: Mapping[bytes, bytes | None]) -> None:
        for key, value in changes.items():
            if value is None:
                self.entries.pop(key, None)
            else:
                self.entries[key] = value

    def digest(self) -> int:
        return state.state_digest(self.entries.items())


def raw_tx(
    signer: crypto.Identity,
    *,
    chain: Any = CHAIN,
    kind: Any = "register",
    nonce: Any = 1,
    body: Any = None,
    version: Any = tx.TX_VERSION,
    sig: Any = None,
    extra: Mapping[str, Any] | None = None,
    drop: Iterable[str] = (),
) -> bytes:
    """Signed transaction bytes built by hand, skipping every check ``tx.make`` does.

    The signature covers exactly the fields sent (so only the intended fault is present).
    """
    unsigned: dict[str, Any] = {
        "v": version,
        "chain": chain,
        "kind": kind,
        "signer": signer.public_key,
        "nonce": nonce,
        "body": {"role": "patient"} if body is None else body,
    }
    wire = dict(unsigned)
    wire["sig"] = signer.sign(crypto.DOMAIN_TX, codec.encode(unsigned)) if sig is None else sig
    wire.update(extra or {})
    for name in drop:
        del wire[name]
    return codec.encode(wire)


def wrapped_keys(data_key: bytes, readers: Iterable[bytes]) -> list[list[bytes]]:
    """A record's ``keys``: the data key sealed to each reader, sorted by reader id."""
    return [[r, crypto.wrap_key(data_key, r)] for r in sorted(set(readers))]


def fake_keys(readers: Iterable[bytes]) -> list[list[bytes]]:
    """Well-formed ``keys`` whose wrapped keys are filler (for stateless checks)."""
    return [[r, bytes(WRAPPED)] for r in sorted(set(readers))]


def record_body(**changes: Any) -> dict[str, Any]:
    """A well-formed record body for identity(2), with keys for it and identity(1) (the
    signer of the transaction tests), with ``changes``; a change to None drops the field."""
    body: dict[str, Any] = {
        "patient": identity(2).public_key,
        "blob": crypto.sha256(b"ciphertext"),
        "size": 10,
        "type": "Observation",
        "keys": fake_keys([identity(2).public_key, identity(1).public_key]),
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


class World:
    """A chain in memory: genesis state, an overlay to apply into and a block context."""

    def __init__(self, n_validators: int = 4, *, height: int = 2, time: int = 1_000_000) -> None:
        self.validators = [identity(1000 + i) for i in range(n_validators)]
        self.genesis = make_genesis(self.validators)
        self.base = MemState(state.genesis_changes(self.genesis))
        self.overlay = state.Overlay(self.base)
        self.height = height
        self.time = time
        self.extra_validators: dict[bytes, int] = {}
        self.txs: dict[bytes, tx.Tx] = {}  # applied, by id: where records' keys are

    @property
    def ctx(self) -> state.BlockContext:
        return state.BlockContext(
            CHAIN, self.height, self.time, {**self.genesis.powers, **self.extra_validators}
        )

    def load(self, key: bytes) -> Any:
        return state.load(self.overlay, key)

    def account(self, who: crypto.Identity | bytes) -> Any:
        key = who.public_key if isinstance(who, crypto.Identity) else who
        return self.load(state.P_ACCT + key)

    def next_nonce(self, who: crypto.Identity) -> int:
        account = self.account(who)
        return 1 if account is None else int(account["nonce"]) + 1

    def sign(
        self,
        who: crypto.Identity,
        kind: str,
        body: dict[str, Any],
        *,
        nonce: int | None = None,
        chain: str = CHAIN,
    ) -> tx.Tx:
        return tx.make(who, chain, kind, self.next_nonce(who) if nonce is None else nonce, body)

    def apply(self, t: tx.Tx) -> tx.Tx:
        state.apply_tx(self.overlay, self.ctx, t)
        self.txs[t.id] = t
        return t

    def tx_body(self, tx_id: bytes) -> dict[str, Any]:
        """An applied transaction's body (as a chain gives a committed one's)."""
        return self.txs[tx_id].body

    def wrapped_key(self, record_id: bytes, who: bytes) -> bytes | None:
        record = self.load(state.P_REC + record_id)
        if record is None:
            return None
        return state.wrapped_key(self.overlay, record_id, record, who, self.tx_body)

    def do(self, who: crypto.Identity, kind: str, body: dict[str, Any]) -> tx.Tx:
        return self.apply(self.sign(who, kind, body))

    def rejects(self, t: tx.Tx) -> str:
        """Apply ``t``, expect a rejection that changes nothing, and return its code."""
        before = dict(self.overlay.changes)
        with pytest.raises(InvalidTransaction) as info:
            state.apply_tx(self.overlay, self.ctx, t)
        assert self.overlay.changes == before
        return info.value.code

    def commit(self) -> None:
        """Move what was applied into the base state (as a committed block would), and
        check that its index entries are exactly those its other entries imply."""
        self.base.apply(self.overlay.changes)
        entries = self.base.entries
        stored = sorted((k, v) for k, v in entries.items() if not state.in_state_hash(k))
        implied = sorted(
            pair
            for k, v in entries.items()
            if state.in_state_hash(k)
            for pair in state.implied_index(k, v)
        )
        assert stored == implied, "index entries differ from those the state implies"
        self.overlay = state.Overlay(self.base)
        self.height += 1

    # --- people -----------------------------------------------------------------------

    def patient(self, n: int, name: str | None = None) -> crypto.Identity:
        who = identity(n)
        body: dict[str, Any] = {"role": "patient"}
        if name is not None:
            body["name"] = name
        self.do(who, "register", body)
        return who

    def institution(self, n: int, endorser: crypto.Identity | None = None) -> crypto.Identity:
        who = identity(n)
        by = self.validators[0] if endorser is None else endorser
        body = {
            "role": "institution",
            "endorsement": tx.endorse(by, CHAIN, "institution", who.public_key),
        }
        self.do(who, "register", body)
        return who

    def provider(self, n: int, institution: crypto.Identity | None = None) -> crypto.Identity:
        who = identity(n)
        by = self.validators[0] if institution is None else institution
        body = {
            "role": "provider",
            "endorsement": tx.endorse(by, CHAIN, "provider", who.public_key),
        }
        self.do(who, "register", body)
        return who

    # --- records and grants ------------------------------------------------------------

    def record_body(
        self,
        author: crypto.Identity,
        patient: crypto.Identity,
        *,
        type_: str = "Observation",
        readers: Iterable[bytes] = (),
        amends: bytes | None = None,
        data_key: bytes | None = None,
        with_author: bool = True,
    ) -> dict[str, Any]:
        key = crypto.new_data_key() if data_key is None else data_key
        holders = {patient.public_key, *readers}
        if with_author:
            holders.add(author.public_key)
        body: dict[str, Any] = {
            "patient": patient.public_key,
            "blob": crypto.sha256(key),
            "size": 1234,
            "type": type_,
            "keys": wrapped_keys(key, holders),
        }
        if amends is not None:
            body["amends"] = amends
        return body

    def record(self, author: crypto.Identity, patient: crypto.Identity, **kw: Any) -> tx.Tx:
        return self.do(author, "record", self.record_body(author, patient, **kw))

    def standing(
        self,
        patient: crypto.Identity,
        grantee: crypto.Identity,
        *,
        types: list[str] | None = None,
        expires: int | None = None,
    ) -> tx.Tx:
        body: dict[str, Any] = {"grantee": grantee.public_key, "scope": "standing"}
        if types is not None:
            body["types"] = types
        if expires is not None:
            body["expires"] = expires
        return self.do(patient, "grant", body)

    def listed(
        self,
        patient: crypto.Identity,
        grantee: crypto.Identity,
        records: Iterable[bytes],
        *,
        expires: int | None = None,
    ) -> tx.Tx:
        body: dict[str, Any] = {
            "grantee": grantee.public_key,
            "scope": "records",
            "records": fake_keys(records),
        }
        if expires is not None:
            body["expires"] = expires
        return self.do(patient, "grant", body)

    def may_read(self, record: tx.Tx | bytes, who: crypto.Identity, now: int | None = None) -> bool:
        record_id = record.id if isinstance(record, tx.Tx) else record
        return state.may_read(
            self.overlay, record_id, who.public_key, self.time if now is None else now
        )
