"""The state machine: ``apply_tx(state, ctx, tx)`` and nothing else decides what is allowed.

State is a key-value map; ``apply_tx`` reads it through ``StateReader`` and writes into an
``Overlay``, so a rejected transaction leaves nothing behind (unless its caller passes
``atomic=False`` and drops the overlay) and a block's changes can be committed in one
batch. Every key and value layout is in ``core.layout``; the rules for
writing records are in ``core.records``.

The state hash is defined in ``core.statekv``; the entries it leaves out, in ``core.layout``.

Pure: no I/O, no clock (time comes from the block header in ``BlockContext``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ehrnode.core import authority, codec, crypto, records
from ehrnode.core.errors import InvalidTransaction
from ehrnode.core.genesis import Genesis
from ehrnode.core.layout import (
    INDEX_PREFIXES as INDEX_PREFIXES,
    K_VALS as K_VALS,
    P_ACCT as P_ACCT,
    P_BLOB as P_BLOB,
    P_GRANT as P_GRANT,
    P_KEY as P_KEY,
    P_LGR as P_LGR,
    P_PGR as P_PGR,
    P_PREC as P_PREC,
    P_REC as P_REC,
    P_STD as P_STD,
    P_VER as P_VER,
    in_state_hash as in_state_hash,
)
from ehrnode.core.records import (
    grant_in_force as grant_in_force,
    required_readers as required_readers,
    standing_grants as standing_grants,
)
from ehrnode.core.statekv import (
    BlockContext as BlockContext,
    Overlay as Overlay,
    StateReader as StateReader,
    digest_changed as digest_changed,
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


def next_nonce(account: dict[str, Any] | None) -> int:
    """The nonce a signer's next transaction must carry (1 for a key with no account)."""
    return 1 if account is None else int(account["nonce"]) + 1


def _check_nonce(account: dict[str, Any] | None, tx: Tx) -> None:
    expected = next_nonce(account)
    if tx.nonce < expected:
        raise _reject(
            "stale_nonce",
            f"nonce {tx.nonce} was already used by this signer; the next nonce is {expected}",
        )
    if tx.nonce > expected:
        raise _reject("nonce_gap", f"nonce {tx.nonce} skips ahead; the next nonce is {expected}")


def apply_tx(overlay: Overlay, ctx: BlockContext, tx: Tx, *, atomic: bool = True) -> None:
    """Apply ``tx`` into ``overlay`` or raise InvalidTransaction.

    ``atomic``: a rejected transaction leaves ``overlay`` unchanged (its writes go to a
    child first). A caller that drops the overlay when a transaction is rejected (a
    block's execution, the mempool's scratch for one transaction) passes False and saves
    the child.
    """
    if tx.chain != ctx.chain:
        raise _reject(
            "wrong_chain", f"transaction is for chain '{tx.chain}', this is '{ctx.chain}'"
        )
    key = P_ACCT + tx.signer
    raw = overlay.get(key)  # read once: the rules get this copy, and none changes it
    account = None if raw is None else codec.decode_trusted(raw)
    _check_nonce(account, tx)
    target = overlay.child() if atomic else overlay
    if tx.kind == "register":
        account = _register(target, ctx, tx, account)
    else:
        if account is None:
            raise _reject(
                "unregistered_signer",
                f"signer {tx.signer.hex()[:16]}… is not registered; "
                "send a register transaction first",
            )
        _APPLY[tx.kind](target, ctx, tx, account)
        after = target.get(key)
        if after != raw:  # a patient writing their own record: "nrec" moved
            assert after is not None, "no rule deletes its signer's account"
            account = codec.decode_trusted(after)
    account["nonce"] = tx.nonce
    save(target, key, account)
    if atomic:
        overlay.merge(target)


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
    through = body.get("through")
    if through is not None and account.get("last", 0) > through:
        raise _reject(
            "records_changed",
            f"the patient's records changed at height {account['last']}, after the listing "
            f"at height {through} this grant wraps keys from; list them again",
        )
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


# The rules of each kind but ``register``: (overlay, ctx, tx, the signer's account). A rule
# reads the account it is given and never changes that dict; one that writes the signer's
# account entry (``records``, for a patient's own record) writes it to the overlay.
_APPLY = {
    "record": records.record,
    "records": records.records,
    "grant": _grant,
    "revoke": _revoke,
    "erase": _erase,
    "validator": _validator,
    "evidence": _evidence,
}


# --- reading rules (used by the node to serve ciphertext; not consensus) ---------------------


def wrapped_key(
    reader: StateReader,
    record_id: bytes,
    record: dict[str, Any],
    who: bytes,
    tx_body: Callable[[bytes], dict[str, Any]],
) -> bytes | None:
    """The record's data key as wrapped for ``who``: by the patient's latest grant
    (``P_KEY``), which wins, else by the record's writer, in the ``keys`` of the record's
    body in its committed transaction (``record``: its ``P_REC`` entry; ``tx_body``: a
    committed transaction's body by id); None if neither wrapped it for them. (Nothing on
    chain proves a wrap opens: a patient whose writer wrapped a bad key for someone fixes
    it with a listed grant.)"""
    granted = reader.get(P_KEY + record_id + who)
    if granted is not None:
        return granted
    # A ``record`` transaction's record has the transaction's id; one of a ``records``
    # transaction names the transaction and its item.
    body = tx_body(record.get("tx", record_id))
    if "item" in record:
        body = body["items"][record["item"]]
    for holder, wrapped in body["keys"]:
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
        apply_tx(overlay, ctx, tx, atomic=False)  # one rejected: the block is, whole
    finish_block(overlay, ctx)
    return Execution(overlay.changes, digest_after(overlay, overlay.changes, digest))


def finish_block(overlay: Overlay, ctx: BlockContext) -> None:
    """What happens at the end of every block, after its transactions."""
    authority.finish_block(overlay, ctx)


def state_digest(entries: Iterable[tuple[bytes, bytes]]) -> int:
    """The digest of a whole state (every entry but the index entries, ``core.layout``)."""
    return digest_of((key, value) for key, value in entries if in_state_hash(key))


def implied_index(key: bytes, value: bytes) -> list[tuple[bytes, bytes]]:
    """The index entries an entry implies (``core.layout``): a record's blob claim and its
    place in its patient's list (a root) or among its root's versions; a grant's place
    among its patient's grants. What ``ehrnode check`` derives to compare with the stored
    ones."""
    if key.startswith(P_REC):
        rid, record = key[len(P_REC) :], codec.decode_trusted(value)
        if record["ver"] == 1:
            place = seq_key(P_PREC, record["patient"], record["seq"])
        else:
            place = seq_key(P_VER, records.root_of(rid, record), record["ver"] - 1)
        return [(P_BLOB + record["blob"], rid), (place, rid)]
    if key.startswith(P_GRANT):
        patient = codec.decode_trusted(value)["patient"]
        return [(P_PGR + patient + key[len(P_GRANT) :], b"")]
    return []


def digest_after(
    reader: StateReader | Overlay, changes: Mapping[bytes, bytes | None], digest: int
) -> int:
    """The digest after ``changes``; ``reader`` gives each key's value before them (an
    Overlay gives its base's value, from its read cache). Index entries do not count."""
    return digest_changed(reader, changes, digest, INDEX_PREFIXES)
