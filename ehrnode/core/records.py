"""The rules for writing records (``record`` and ``records`` transactions) and who a new
record must be wrapped to. Part of the state machine (``core.state`` dispatches here).

Pure: no I/O, no clock.
"""

from __future__ import annotations

from typing import Any

from ehrnode.core import tx as txmod
from ehrnode.core.errors import InvalidTransaction
from ehrnode.core.layout import P_ACCT, P_BLOB, P_PREC, P_REC, P_STD, P_VER
from ehrnode.core.statekv import BlockContext, Overlay, StateReader, load, save, save_new, seq_key
from ehrnode.core.tx import Tx


def _reject(code: str, message: str) -> InvalidTransaction:
    return InvalidTransaction(message, code=code)


def root_of(record_id: bytes, record: dict[str, Any]) -> bytes:
    """The id of a record's first version (a first version's entry has no "root")."""
    root: bytes = record.get("root", record_id)
    return root


def head_of(root_id: bytes, root: dict[str, Any]) -> bytes:
    """The id of a record's latest version, from its first version's entry (no "head"
    until the first amendment)."""
    head: bytes = root.get("head", root_id)
    return head


def standing_grants(reader: StateReader, patient: bytes) -> list[list[Any]]:
    return list(load(reader, P_STD + patient) or [])


def grant_in_force(
    types: list[str] | None, expires: int | None, resource_type: str, now: int
) -> bool:
    return (types is None or resource_type in types) and (expires is None or now < expires)


def required_readers(
    reader: StateReader, patient: bytes, resource_type: str, now: int
) -> set[bytes]:
    """Who a new record of this type must be wrapped to: the patient and standing grantees."""
    required = {patient}
    for grantee, _grant, types, expires in standing_grants(reader, patient):
        if grant_in_force(types, expires, resource_type, now):
            required.add(grantee)
    return required


def record(scratch: Overlay, ctx: BlockContext, tx: Tx, account: dict[str, Any]) -> None:
    patients = _Patients(scratch, ctx)
    _write_record(scratch, ctx, tx, account, patients, tx.id, tx.body)
    patients.save()


def records(scratch: Overlay, ctx: BlockContext, tx: Tx, account: dict[str, Any]) -> None:
    """Every record of the transaction, or none (the caller's scratch is dropped)."""
    patients = _Patients(scratch, ctx)
    for index, body in enumerate(tx.body["items"]):
        try:
            rid = txmod.record_id(tx.id, index)
            _write_record(scratch, ctx, tx, account, patients, rid, body, index)
        except InvalidTransaction as err:
            raise _reject(err.code, f"record {index}: {err.message}") from err
    patients.save()


class _Patients:
    """The patients one transaction writes records for. Each account is read once and saved
    once, after the last record; each (patient, type)'s required readers are looked up once.
    Neither can change while the transaction applies: it writes records only.

    Each account written to keeps the height of its latest record write (``last``, any
    version): a standing grant that names the height its records were listed at is refused
    if ``last`` is above it, so no record written in between misses the grantee's key."""

    def __init__(self, scratch: Overlay, ctx: BlockContext) -> None:
        self.scratch = scratch
        self.now = ctx.time
        self.height = ctx.height
        self.accounts: dict[bytes, dict[str, Any]] = {}
        self.readers: dict[tuple[bytes, str], set[bytes]] = {}

    def account(self, patient: bytes) -> dict[str, Any]:
        account = self.accounts.get(patient)
        if account is None:
            account = load(self.scratch, P_ACCT + patient)
            if account is None or account["role"] != "patient":
                raise _reject(
                    "unknown_patient", f"{patient.hex()[:16]}… is not a registered patient"
                )
            account["last"] = self.height
            self.accounts[patient] = account
        return account

    def required(self, patient: bytes, resource_type: str) -> set[bytes]:
        key = (patient, resource_type)
        required = self.readers.get(key)
        if required is None:
            required = self.readers[key] = required_readers(
                self.scratch, patient, resource_type, self.now
            )
        return required

    def next_seq(self, patient: bytes) -> int:
        """The place of the patient's next new record in their record list."""
        account = self.accounts[patient]
        seq: int = account["nrec"]
        account["nrec"] = seq + 1
        return seq

    def save(self) -> None:
        for patient, account in self.accounts.items():  # in the order first met
            save(self.scratch, P_ACCT + patient, account)


def _write_record(
    scratch: Overlay,
    ctx: BlockContext,
    tx: Tx,
    account: dict[str, Any],
    patients: _Patients,
    rid: bytes,
    body: dict[str, Any],
    index: int | None = None,
) -> None:
    """One record ``rid``; ``index``: its place in a ``records`` transaction."""
    patient = body["patient"]
    if account["role"] != "provider" and tx.signer != patient:
        raise _reject("not_provider", "only a provider or the patient may write a record")
    patients.account(patient)  # registered as a patient
    holders = {key for key, _ in body["keys"]}
    required = patients.required(patient, body["type"])
    # Compared without building the differences, which are needed only to name them.
    if not required <= holders:
        raise _reject(
            "missing_grantee_key",
            f"the record must wrap its data key for every standing grantee; missing "
            f"{', '.join(sorted(k.hex()[:16] + '…' for k in required - holders))}",
        )
    signer = tx.signer
    for holder in holders:
        if holder != signer and holder not in required:
            raise _reject(
                "unexpected_key_holder",
                "a record may wrap its key only for the patient, its author and standing grantees",
            )
    # One blob, one record: otherwise erasing one record (whose owner may have named
    # someone else's public blob hash) would delete the ciphertext of another. The claim
    # is an index entry, outside the state hash but a function of the record entries in
    # it (``core.layout``): a node whose claims drifted from its records would decide a
    # later record differently from the others and stop at that block; ``ehrnode check``
    # compares them.
    if scratch.get(P_BLOB + body["blob"]) is not None:
        raise _reject("blob_in_use", "that ciphertext already belongs to another record")
    scratch.put(P_BLOB + body["blob"], rid)
    entry: dict[str, Any] = {
        "patient": patient,
        "author": tx.signer,
        "blob": body["blob"],
        "size": body["size"],
        "type": body["type"],
        "height": ctx.height,
        "erased": False,
    }
    if index is not None:
        entry["tx"] = tx.id  # items, not update(**): no keyword dict built for the call
        entry["item"] = index
    amends = body.get("amends")
    if amends is None:
        # A first version is its own root and, until amended, its own head: neither is
        # written while it is the record's own id (``root_of``, ``head_of``).
        seq = patients.next_seq(patient)
        entry["ver"] = 1
        entry["nver"] = 1
        entry["seq"] = seq
        scratch.put_new(seq_key(P_PREC, patient, seq), rid)
    else:
        previous = load(scratch, P_REC + amends)
        if previous is None or previous["patient"] != patient:
            raise _reject("unknown_record", "the amended record does not exist for this patient")
        root_id = root_of(amends, previous)
        root = load(scratch, P_REC + root_id)
        head = head_of(root_id, root)
        if head != amends:
            raise _reject(
                "not_head_version",
                f"only the latest version {head.hex()[:16]}… can be amended",
            )
        if previous["erased"]:
            raise _reject("record_erased", "an erased record cannot be amended")
        if previous["type"] != body["type"]:
            raise _reject("type_mismatch", f"a new version must keep the type {previous['type']}")
        version = root["nver"] + 1
        entry.update(root=root_id, ver=version, amends=amends)
        root.update(head=rid, nver=version)
        if root_id == rid:  # pragma: no cover - ids are unique
            raise _reject("unknown_record", "a record cannot amend itself")
        save(scratch, P_REC + root_id, root)
        scratch.put_new(seq_key(P_VER, root_id, version - 1), rid)
    save_new(scratch, P_REC + rid, entry)
    # The data key as wrapped for each first reader stays in the transaction, on chain in
    # its block: a copy in the state would cost every record a state-hash term and about
    # a third of the bytes LevelDB writes and rewrites for it, and no rule reads it
    # (``state.wrapped_key`` finds it there); a grant adds a ``P_KEY`` entry per grantee.
