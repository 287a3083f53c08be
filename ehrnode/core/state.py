"""The state machine: ``apply_tx(state, ctx, tx)`` and nothing else decides what is allowed.

State is a key-value map; ``apply_tx`` reads it through ``StateReader`` and writes into an
``Overlay``, so a rejected transaction leaves nothing behind and a block's changes can be
committed in one batch. Every key and value layout is below. Values are canonical msgpack,
except where the table says raw bytes.

    key                                    value
    b"vals", b"vfrom"…, b"vvote"…,         validator sets, set-change votes and evidence:
    b"vpend", b"evid"…                     see core.authority
    b"acct" + key(32)                      {"role", "nonce", "since", "name"?, "by"?, "nrec"}
    b"rec"  + record id(32)                {"patient", "author", "blob", "size", "type",
                                            "height", "root", "ver", "erased", "amends"?,
                                            "erased_at"?, on a root only: "head", "nver";
                                            from a ``records`` transaction: "tx", "item"}
    b"prec" + patient(32) + seq(8, BE)     raw root record id: the patient's records, in order
    b"ver"  + root id(32) + seq(8, BE)     raw id of version seq + 1 of a record, from seq 1
                                            (the root is version 1 and has no entry)
    b"wkey" + record id(32)                [[reader, wrapped data key]...]: as its writer
                                            wrapped it (the record body's "keys")
    b"key"  + record id(32) + reader(32)   raw: the data key a grant wrapped for that reader
                                            (wins over the writer's, see ``wrapped_key``)
    b"grant"+ grant id(32)                 {"patient", "grantee", "scope", "height",
                                            "types"?, "expires"?, "records"?, "revoked"?}
    b"pgr"  + patient(32) + grant id(32)   raw b"": the patient's grants
    b"std"  + patient(32)                  [[grantee, grant id, types | nil, expires | nil]...]
                                            the standing grants in force (not revoked)
    b"blob" + blob hash(32)                raw record id: the one record a ciphertext belongs to
    b"lgr"  + record id(32) + grantee(32)  [grant id, ...]: the listed grants not revoked that
                                            name that record for that grantee, in order

The state hash is defined in ``core.statekv``.

Pure: no I/O, no clock (time comes from the block header in ``BlockContext``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ehrnode.core import authority, crypto, tx as txmod
from ehrnode.core.errors import InvalidTransaction
from ehrnode.core.genesis import Genesis
from ehrnode.core.statekv import (
    BlockContext as BlockContext,
    Overlay as Overlay,
    StateReader as StateReader,
    digest_moved as digest_moved,
    digest_of as digest_of,
    entry_digest as entry_digest,
    load as load,
    save as save,
    save_new as save_new,
    seq_key as seq_key,
    state_hash as state_hash,
    update_digest as update_digest,
)
from ehrnode.core.tx import Tx, endorsement_bytes

K_VALS = authority.K_VALS
P_ACCT = b"acct"
P_REC = b"rec"
P_PREC = b"prec"
P_VER = b"ver"
P_KEY = b"key"
P_WKEY = b"wkey"
P_GRANT = b"grant"
P_PGR = b"pgr"
P_STD = b"std"
P_LGR = b"lgr"
P_BLOB = b"blob"


# --- genesis ------------------------------------------------------------------------------


def genesis_changes(genesis: Genesis) -> dict[bytes, bytes | None]:
    """The state before block 1: the validator set, each validator an institution."""
    overlay = Overlay(_Empty())
    authority.genesis_entries(overlay, genesis.powers)
    for v in genesis.validators:
        account: dict[str, Any] = {"role": "institution", "nonce": 0, "since": 0, "nrec": 0}
        if v.name:
            account["name"] = v.name
        save(overlay, P_ACCT + v.key, account)
    return overlay.changes


class _Empty:
    def get(self, key: bytes) -> bytes | None:
        return None


def validators(reader: StateReader) -> dict[bytes, int]:
    """The set that votes on the next block."""
    return authority.validators(reader)


# --- apply ----------------------------------------------------------------------------------


def _reject(code: str, message: str) -> InvalidTransaction:
    return InvalidTransaction(message, code=code)


def check_nonce(reader: StateReader, tx: Tx) -> None:
    account = load(reader, P_ACCT + tx.signer)
    expected = 1 if account is None else account["nonce"] + 1
    if tx.nonce < expected:
        raise _reject(
            "stale_nonce",
            f"nonce {tx.nonce} was already used by this signer; the next nonce is {expected}",
        )
    if tx.nonce > expected:
        raise _reject("nonce_gap", f"nonce {tx.nonce} skips ahead; the next nonce is {expected}")


def apply_tx(overlay: Overlay, ctx: BlockContext, tx: Tx) -> None:
    """Apply ``tx`` into ``overlay`` or raise InvalidTransaction leaving it unchanged."""
    if tx.chain != ctx.chain:
        raise _reject(
            "wrong_chain", f"transaction is for chain '{tx.chain}', this is '{ctx.chain}'"
        )
    check_nonce(overlay, tx)
    scratch = overlay.child()
    account = load(scratch, P_ACCT + tx.signer)
    if tx.kind == "register":
        account = _register(scratch, ctx, tx, account)
    else:
        if account is None:
            raise _reject(
                "unregistered_signer",
                f"signer {tx.signer.hex()[:16]}… is not registered; "
                "send a register transaction first",
            )
        _APPLY[tx.kind](scratch, ctx, tx, account)
        account = load(scratch, P_ACCT + tx.signer)  # a record may have bumped "nrec"
    account["nonce"] = tx.nonce
    save(scratch, P_ACCT + tx.signer, account)
    overlay.merge(scratch)


def _register(scratch: Overlay, ctx: BlockContext, tx: Tx, account: Any) -> dict[str, Any]:
    if account is not None:
        raise _reject("already_registered", f"this key is already registered as {account['role']}")
    role = tx.body["role"]
    endorsement = tx.body.get("endorsement")
    new: dict[str, Any] = {"role": role, "nonce": 0, "since": ctx.height, "nrec": 0}
    if "name" in tx.body:
        new["name"] = tx.body["name"]
    if role == "patient":
        if endorsement is not None:
            raise _reject("malformed_body", "a patient registers without an endorsement")
        return new
    if role == "institution" and tx.signer in ctx.validators and endorsement is None:
        return new
    if endorsement is None:
        who = "a validator" if role == "institution" else "a registered institution"
        raise _reject("not_endorsed", f"a {role} must carry an endorsement signed by {who}")
    endorser = endorsement["by"]
    if role == "institution":
        if endorser not in ctx.validators:
            raise _reject("not_endorsed", "an institution must be endorsed by a current validator")
    else:
        by = load(scratch, P_ACCT + endorser)
        if by is None or by["role"] != "institution":
            raise _reject("not_endorsed", "a provider must be endorsed by a registered institution")
    if not crypto.verify(
        endorser, b"", endorsement_bytes(ctx.chain, role, tx.signer), endorsement["sig"]
    ):
        raise _reject("bad_endorsement", "the endorsement signature does not verify")
    new["by"] = endorser
    return new


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


def _record(scratch: Overlay, ctx: BlockContext, tx: Tx, account: dict[str, Any]) -> None:
    patients = _Patients(scratch, ctx.time)
    _write_record(scratch, ctx, tx, account, patients, tx.id, tx.body)
    patients.save()


def _records(scratch: Overlay, ctx: BlockContext, tx: Tx, account: dict[str, Any]) -> None:
    """Every record of the transaction, or none (the caller's scratch is dropped)."""
    patients = _Patients(scratch, ctx.time)
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
    Neither can change while the transaction applies: it writes records only."""

    def __init__(self, scratch: Overlay, now: int) -> None:
        self.scratch = scratch
        self.now = now
        self.accounts: dict[bytes, dict[str, Any]] = {}
        self.readers: dict[tuple[bytes, str], set[bytes]] = {}
        self.counted: set[bytes] = set()  # patients whose record count moved

    def account(self, patient: bytes) -> dict[str, Any]:
        account = self.accounts.get(patient)
        if account is None:
            account = load(self.scratch, P_ACCT + patient)
            if account is None or account["role"] != "patient":
                raise _reject(
                    "unknown_patient", f"{patient.hex()[:16]}… is not a registered patient"
                )
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
        self.counted.add(patient)
        return seq

    def save(self) -> None:
        for patient in self.counted:
            save(self.scratch, P_ACCT + patient, self.accounts[patient])


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
    missing = required - holders
    if missing:
        raise _reject(
            "missing_grantee_key",
            f"the record must wrap its data key for every standing grantee; missing "
            f"{', '.join(sorted(k.hex()[:16] + '…' for k in missing))}",
        )
    extra = holders - required - {tx.signer}
    if extra:
        raise _reject(
            "unexpected_key_holder",
            "a record may wrap its key only for the patient, its author and standing grantees",
        )
    # One blob, one record: otherwise erasing one record (whose owner may have named
    # someone else's public blob hash) would delete the ciphertext of another.
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
        entry.update(tx=tx.id, item=index)
    amends = body.get("amends")
    if amends is None:
        entry.update(root=rid, ver=1, head=rid, nver=1)
        scratch.put_new(seq_key(P_PREC, patient, patients.next_seq(patient)), rid)
    else:
        previous = load(scratch, P_REC + amends)
        if previous is None or previous["patient"] != patient:
            raise _reject("unknown_record", "the amended record does not exist for this patient")
        root = load(scratch, P_REC + previous["root"])
        if root["head"] != amends:
            raise _reject(
                "not_head_version",
                f"only the latest version {root['head'].hex()[:16]}… can be amended",
            )
        if previous["erased"]:
            raise _reject("record_erased", "an erased record cannot be amended")
        if previous["type"] != body["type"]:
            raise _reject("type_mismatch", f"a new version must keep the type {previous['type']}")
        version = root["nver"] + 1
        entry.update(root=previous["root"], ver=version, amends=amends)
        root.update(head=rid, nver=version)
        if previous["root"] == rid:  # pragma: no cover - ids are unique
            raise _reject("unknown_record", "a record cannot amend itself")
        save(scratch, P_REC + previous["root"], root)
        scratch.put_new(seq_key(P_VER, previous["root"], version - 1), rid)
    save_new(scratch, P_REC + rid, entry)
    # The data key as wrapped for each first reader, all in one entry (a state entry costs
    # a state-hash term and a LevelDB key); a grant adds a ``P_KEY`` entry per grantee. Not
    # in the record's entry, which every record list reads.
    save_new(scratch, P_WKEY + rid, body["keys"])


def _grant(scratch: Overlay, ctx: BlockContext, tx: Tx, account: dict[str, Any]) -> None:
    body = tx.body
    if account["role"] != "patient":
        raise _reject("not_patient", "only a patient can grant access to their records")
    grantee = body["grantee"]
    if grantee == tx.signer:
        raise _reject("malformed_body", "a patient cannot grant access to themselves")
    if load(scratch, P_ACCT + grantee) is None:
        raise _reject("unknown_grantee", f"grantee {grantee.hex()[:16]}… is not registered")
    expires = body.get("expires")
    if expires is not None and expires <= ctx.time:
        raise _reject("already_expired", "the grant's expiry time has already passed")
    entry: dict[str, Any] = {
        "patient": tx.signer,
        "grantee": grantee,
        "scope": body["scope"],
        "height": ctx.height,
    }
    if expires is not None:
        entry["expires"] = expires
    listed = [record_id for record_id, _ in body.get("records", [])]
    for record_id, wrapped in body.get("records", []):
        record = load(scratch, P_REC + record_id)
        if record is None or record["patient"] != tx.signer:
            raise _reject("unknown_record", f"record {record_id.hex()[:16]}… is not this patient's")
        if record["erased"]:
            raise _reject("record_erased", f"record {record_id.hex()[:16]}… was erased")
        types = body.get("types")
        if types is not None and record["type"] not in types:
            raise _reject(
                "type_mismatch",
                f"record {record_id.hex()[:16]}… is a {record['type']}, outside the grant's types",
            )
        scratch.put(P_KEY + record_id + grantee, wrapped)
        if body["scope"] == "records":
            # A list, not one id: an earlier grant of the same record (say, without expiry)
            # stays in force when a later one expires or is revoked.
            in_force = load(scratch, P_LGR + record_id + grantee) or []
            save(scratch, P_LGR + record_id + grantee, [*in_force, tx.id])
    if body["scope"] == "records":
        entry["records"] = listed
    else:
        types = body.get("types")
        if types is not None:
            entry["types"] = sorted(types)
        standing = standing_grants(scratch, tx.signer)
        standing.append([grantee, tx.id, entry.get("types"), expires])
        save(scratch, P_STD + tx.signer, standing)
    save_new(scratch, P_GRANT + tx.id, entry)
    scratch.put_new(P_PGR + tx.signer + tx.id, b"")


def _revoke(scratch: Overlay, ctx: BlockContext, tx: Tx, account: dict[str, Any]) -> None:
    grant_id = tx.body["grant"]
    grant = load(scratch, P_GRANT + grant_id)
    if grant is None or grant["patient"] != tx.signer:
        raise _reject("unknown_grant", "no grant of this patient has that id")
    if "revoked" in grant:
        raise _reject(
            "already_revoked", f"the grant was already revoked at height {grant['revoked']}"
        )
    grant["revoked"] = ctx.height
    save(scratch, P_GRANT + grant_id, grant)
    if grant["scope"] == "standing":
        standing = [s for s in standing_grants(scratch, tx.signer) if s[1] != grant_id]
        if standing:
            save(scratch, P_STD + tx.signer, standing)
        else:
            scratch.put(P_STD + tx.signer, None)
    else:
        for record_id in grant["records"]:
            key = P_LGR + record_id + grant["grantee"]
            in_force = [g for g in load(scratch, key) or [] if g != grant_id]
            if in_force:
                save(scratch, key, in_force)
            else:
                scratch.put(key, None)


def _erase(scratch: Overlay, ctx: BlockContext, tx: Tx, account: dict[str, Any]) -> None:
    for record_id in tx.body["records"]:
        record = load(scratch, P_REC + record_id)
        if record is None or record["patient"] != tx.signer:
            raise _reject("unknown_record", f"record {record_id.hex()[:16]}… is not this patient's")
        if record["erased"]:
            raise _reject("record_erased", f"record {record_id.hex()[:16]}… was already erased")
        record["erased"] = True
        record["erased_at"] = ctx.height
        save(scratch, P_REC + record_id, record)


def _validator(scratch: Overlay, ctx: BlockContext, tx: Tx, account: dict[str, Any]) -> None:
    authority.apply_validator(scratch, ctx, tx)


def _evidence(scratch: Overlay, ctx: BlockContext, tx: Tx, account: dict[str, Any]) -> None:
    authority.apply_evidence(scratch, ctx, tx)


_APPLY = {
    "record": _record,
    "records": _records,
    "grant": _grant,
    "revoke": _revoke,
    "erase": _erase,
    "validator": _validator,
    "evidence": _evidence,
}


# --- reading rules (used by the node to serve ciphertext; not consensus) ---------------------


def wrapped_key(reader: StateReader, record_id: bytes, who: bytes) -> bytes | None:
    """The record's data key as wrapped for ``who``: by the patient's latest grant
    (``P_KEY``), which wins, else by the record's writer (``P_WKEY``); None if neither
    wrapped it for them. (Nothing on chain proves a wrap opens: a patient whose writer
    wrapped a bad key for someone fixes it with a listed grant.)"""
    granted = reader.get(P_KEY + record_id + who)
    if granted is not None:
        return granted
    for holder, wrapped in load(reader, P_WKEY + record_id) or ():
        if holder == who:
            return wrapped  # type: ignore[no-any-return]
    return None


def may_read(reader: StateReader, record_id: bytes, who: bytes, now: int) -> bool:
    """Whether ``who`` may fetch this record's ciphertext at time ``now`` (ms)."""
    record = load(reader, P_REC + record_id)
    if record is None or record["erased"]:
        return False
    patient = record["patient"]
    if who in (patient, record["author"]):
        return True
    for grant_id in load(reader, P_LGR + record_id + who) or []:
        grant = load(reader, P_GRANT + grant_id)
        if grant is not None and "revoked" not in grant:
            expires = grant.get("expires")
            if expires is None or now < expires:
                return True
    for grantee, _grant, types, expires in standing_grants(reader, patient):
        if grantee == who and grant_in_force(types, expires, record["type"], now):
            return True
    return False


# --- blocks -----------------------------------------------------------------------------------


@dataclass
class Execution:
    """What a block does to the state: the changed entries and the state digest after."""

    changes: dict[bytes, bytes | None]
    digest: int

    @property
    def state_hash(self) -> bytes:
        return state_hash(self.digest)


def execute_block(
    reader: StateReader, ctx: BlockContext, txs: Iterable[Tx], digest: int
) -> Execution:
    """Apply every transaction in order; InvalidTransaction from the first one that fails."""
    overlay = Overlay(reader, cache_reads=True)
    for tx in txs:
        apply_tx(overlay, ctx, tx)
    finish_block(overlay, ctx)
    return Execution(overlay.changes, digest_after(overlay, overlay.changes, digest))


def finish_block(overlay: Overlay, ctx: BlockContext) -> None:
    """What happens at the end of every block, after its transactions."""
    authority.finish_block(overlay, ctx)


def digest_after(
    reader: StateReader | Overlay, changes: Mapping[bytes, bytes | None], digest: int
) -> int:
    """The digest after ``changes``; ``reader`` gives each key's value before them (an
    Overlay gives its base's value, from its read cache)."""
    old_value = reader.original if isinstance(reader, Overlay) else reader.get
    added: list[tuple[bytes, bytes]] = []
    removed: list[tuple[bytes, bytes]] = []
    for key, new in changes.items():
        old = old_value(key)
        if old == new:
            continue  # rewritten unchanged: no effect on the multiset
        if old is not None:
            removed.append((key, old))
        if new is not None:
            added.append((key, new))
    return digest_moved(digest, added, removed)
