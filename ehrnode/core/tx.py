"""Transactions: kinds, byte form, signing bytes, ids and the stateless checks.

Byte form (canonical msgpack, see ``core.codec``), a map with exactly these keys::

    {"body": map, "chain": str, "kind": str, "nonce": uint, "sig": bin(64),
     "signer": bin(32), "v": 1}

- signing bytes = ``DOMAIN_TX || encode(the same map without "sig")``
- id            = ``sha256(the transaction's bytes)``; it is the permanent identity of a
  record, a grant, and so on. A ``records`` transaction writes several records at once
  (a FHIR transaction Bundle's worth, all or none); its i-th record's id is
  ``record_id(tx id, i)``, as a Bitcoin output is named by its transaction and index.

Each kind's body is described by ``BODY_SPECS`` below and in docs/protocol.md. A body may
hold no key the spec does not name. What needs the chain's state (nonces, roles, grants)
is checked in ``core.state``; everything here needs only the bytes. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ehrnode.core import codec, crypto
from ehrnode.core.errors import InvalidEncoding, InvalidTransaction

TX_VERSION = 1
DEFAULT_MAX_TX_BYTES = 256 * 1024
MAX_NAME_CHARS = 200
MAX_KEYS_PER_RECORD = 64
MAX_RECORDS_PER_GRANT = 2000
MAX_RECORDS_PER_ERASE = 256
MAX_RECORDS_PER_TX = 256
MAX_TYPES_PER_GRANT = 64
MAX_BLOB_BYTES = 1 << 40  # 1 TiB: far above any attachment, far below int overflow
MAX_NONCE = (1 << 63) - 1

ROLES = ("patient", "provider", "institution")
KINDS = ("register", "record", "records", "grant", "revoke", "erase", "validator", "evidence")
_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{0,63}$")
_CHAIN_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def is_chain_id(text: str) -> bool:
    return bool(_CHAIN_ID.match(text))


# --- field checks -------------------------------------------------------------------------
# A spec maps a body key to (required, check). A check raises InvalidTransaction naming
# the field; ``_reason`` turns a bad field into the sentence a client sees.

Check = Callable[[str, Any], None]


def _fail(name: str, what: str) -> InvalidTransaction:
    return InvalidTransaction(f"body field '{name}' {what}", code="malformed_body")


def _bin(size: int) -> Check:
    def check(name: str, value: Any) -> None:
        if not isinstance(value, bytes) or len(value) != size:
            raise _fail(name, f"must be {size} bytes")

    return check


def _text(max_chars: int, pattern: re.Pattern[str] | None = None) -> Check:
    def check(name: str, value: Any) -> None:
        if not isinstance(value, str) or not value or len(value) > max_chars:
            raise _fail(name, f"must be a string of 1 to {max_chars} characters")
        if pattern is not None and not pattern.match(value):
            raise _fail(name, f"is not of the form {pattern.pattern}")

    return check


def _uint(maximum: int) -> Check:
    def check(name: str, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
            raise _fail(name, f"must be an integer from 0 to {maximum}")

    return check


def _one_of(*choices: str) -> Check:
    def check(name: str, value: Any) -> None:
        if value not in choices:
            raise _fail(name, f"must be one of {', '.join(choices)}")

    return check


def _pairs(max_items: int, sizes: tuple[int, ...]) -> Check:
    """[[bin32 key, wrapped key of ``sizes`` bytes], ...], sorted by key, keys unique."""
    described = " or ".join(str(size) for size in sizes)

    def check(name: str, value: Any) -> None:
        if not isinstance(value, list) or not 1 <= len(value) <= max_items:
            raise _fail(name, f"must be a list of 1 to {max_items} pairs")
        previous = b""
        for item in value:
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not isinstance(item[0], bytes)
                or len(item[0]) != 32
                or not isinstance(item[1], bytes)
                or len(item[1]) not in sizes
            ):
                raise _fail(name, f"must hold [32-byte id, {described}-byte key] pairs")
            if item[0] <= previous:
                raise _fail(name, "must be sorted by id with no id twice")
            previous = item[0]

    return check


def _ids(max_items: int) -> Check:
    def check(name: str, value: Any) -> None:
        if not isinstance(value, list) or not 1 <= len(value) <= max_items:
            raise _fail(name, f"must be a list of 1 to {max_items} ids")
        for item in value:
            if not isinstance(item, bytes) or len(item) != 32:
                raise _fail(name, "must hold 32-byte ids")
        if len(set(value)) != len(value):
            raise _fail(name, "must not name an id twice")

    return check


def _types(name: str, value: Any) -> None:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_TYPES_PER_GRANT:
        raise _fail(name, f"must be a list of 1 to {MAX_TYPES_PER_GRANT} resource types")
    for item in value:
        _text(64, _RESOURCE_TYPE)(name, item)
    if len(set(value)) != len(value):
        raise _fail(name, "must not name a type twice")


def _endorsement(name: str, value: Any) -> None:
    if not isinstance(value, dict) or set(value) != {"by", "sig"}:
        raise _fail(name, "must be a map with exactly 'by' and 'sig'")
    _bin(32)(name + ".by", value["by"])
    _bin(64)(name + ".sig", value["sig"])


def _power(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1000:
        raise _fail(name, "must be an integer from 1 to 1000")


def _vote(name: str, value: Any) -> None:
    # The full check (and the signature) is in core.authority; here only the shape.
    if not isinstance(value, dict) or len(value) != 6:
        raise _fail(name, "must be a vote: a map of type, height, round, block, validator, sig")


Spec = Mapping[str, tuple[bool, Check]]


def _record_items(name: str, value: Any) -> None:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_RECORDS_PER_TX:
        raise _fail(name, f"must be a list of 1 to {MAX_RECORDS_PER_TX} record bodies")
    for index, item in enumerate(value):
        try:
            check_body("record", item)
        except InvalidTransaction as err:
            raise InvalidTransaction(f"{name}[{index}]: {err.message}", code=err.code) from err


_RECORD_FIELDS = frozenset({"patient", "blob", "size", "type", "keys"})
_AMENDING_FIELDS = _RECORD_FIELDS | {"amends"}


def _plain_record(body: Any) -> bool:
    """True if ``check_body("record", body)`` passes, decided in one pass: every record
    of every ``record`` and ``records`` transaction is checked at every node, and the spec
    walk's calls cost two to three times this in the network. False (the spec walk then
    names what is wrong) for anything it does not recognise as well formed; never True
    where the spec walk would refuse (tests/test_tx_types.py compares the two)."""
    if type(body) is not dict:
        return False
    fields = body.keys()
    if fields == _AMENDING_FIELDS:
        amends = body["amends"]
        if type(amends) is not bytes or len(amends) != 32:
            return False
    elif fields != _RECORD_FIELDS:
        return False
    patient, blob, size, kind, keys = (
        body["patient"],
        body["blob"],
        body["size"],
        body["type"],
        body["keys"],
    )
    if (
        type(patient) is not bytes
        or len(patient) != 32
        or type(blob) is not bytes
        or len(blob) != 32
        or type(size) is not int
        or not 0 <= size <= MAX_BLOB_BYTES
        or type(kind) is not str
        or len(kind) > 64  # the pattern's "$" would let a 65th character, "\n", through
        or not _RESOURCE_TYPE.match(kind)
        or type(keys) is not list
        or not 1 <= len(keys) <= MAX_KEYS_PER_RECORD
    ):
        return False
    previous = b""
    has_patient = False
    for pair in keys:
        if type(pair) is not list or len(pair) != 2:
            return False
        holder, wrapped = pair
        if (
            type(holder) is not bytes
            or len(holder) != 32
            or holder <= previous
            or type(wrapped) is not bytes
            or len(wrapped) not in crypto.WRAPPED_KEY_SIZES
        ):
            return False
        previous = holder
        has_patient = has_patient or holder == patient
    return has_patient


BODY_SPECS: dict[str, Spec] = {
    "register": {
        "role": (True, _one_of(*ROLES)),
        "name": (False, _text(MAX_NAME_CHARS)),
        "endorsement": (False, _endorsement),
    },
    "record": {  # also decided in one pass by _plain_record: change both together
        "patient": (True, _bin(32)),
        "blob": (True, _bin(32)),
        "size": (True, _uint(MAX_BLOB_BYTES)),
        "type": (True, _text(64, _RESOURCE_TYPE)),
        "keys": (True, _pairs(MAX_KEYS_PER_RECORD, crypto.WRAPPED_KEY_SIZES)),
        "amends": (False, _bin(32)),
    },
    "records": {
        "items": (True, _record_items),
    },
    "grant": {
        "grantee": (True, _bin(32)),
        "scope": (True, _one_of("records", "standing")),
        # Sealed boxes only: 2,000 pairs of batch wraps would not fit max_tx_bytes.
        "records": (False, _pairs(MAX_RECORDS_PER_GRANT, (crypto.WRAPPED_KEY_BYTES,))),
        "types": (False, _types),
        "expires": (False, _uint(MAX_NONCE)),
        "through": (False, _uint(MAX_NONCE)),
    },
    "revoke": {
        "grant": (True, _bin(32)),
    },
    "erase": {
        "records": (True, _ids(MAX_RECORDS_PER_ERASE)),
    },
    "validator": {
        "action": (True, _one_of("add", "remove")),
        "key": (True, _bin(32)),
        "power": (False, _power),
    },
    "evidence": {
        "a": (True, _vote),
        "b": (True, _vote),
    },
}


# _plain_record knows the record spec's fields: a field added there must be added to it.
assert set(BODY_SPECS["record"]) == _AMENDING_FIELDS, "update _plain_record with the spec"


def check_body(kind: str, body: Any) -> None:
    """Stateless checks of a body: known keys only, each well formed."""
    if kind == "record" and _plain_record(body):
        return
    check_spec(kind, body)


def check_spec(kind: str, body: Any) -> None:
    """``check_body`` by walking the kind's spec (what names the first problem found)."""
    spec = BODY_SPECS.get(kind)
    if spec is None:
        raise InvalidTransaction(
            f"unknown transaction kind '{kind}' (known: {', '.join(KINDS)})", code="unknown_kind"
        )
    if not isinstance(body, dict):
        raise InvalidTransaction("body must be a map", code="malformed_body")
    unknown = set(body) - set(spec)
    if unknown:
        raise InvalidTransaction(
            f"{kind} body has unknown field(s): {', '.join(sorted(unknown))}",
            code="malformed_body",
        )
    for name, (required, check) in spec.items():
        if name in body:
            check(name, body[name])
        elif required:
            raise _fail(name, "is required")
    if kind == "grant" and body["scope"] == "records":
        if "records" not in body:
            raise _fail("records", "is required when scope is 'records'")
        for name in sorted({"through", "types"} & body.keys()):
            raise _fail(name, "applies only to standing grants")
    if kind == "record" and body["patient"] not in {k for k, _ in body["keys"]}:
        raise InvalidTransaction(
            "a record must wrap its data key for the patient", code="missing_patient_key"
        )


# --- the transaction ----------------------------------------------------------------------


@dataclass(frozen=True)
class Tx:
    chain: str
    kind: str
    signer: bytes
    nonce: int
    body: dict[str, Any]
    sig: bytes
    raw: bytes = field(repr=False)
    id: bytes = field(repr=False)

    @property
    def size(self) -> int:
        return len(self.raw)

    def signing_bytes(self) -> bytes:
        return signing_bytes(self.chain, self.kind, self.signer, self.nonce, self.body)


def signing_bytes(chain: str, kind: str, signer: bytes, nonce: int, body: dict[str, Any]) -> bytes:
    return crypto.DOMAIN_TX + codec.encode(_unsigned(chain, kind, signer, nonce, body))


def _unsigned(
    chain: str, kind: str, signer: bytes, nonce: int, body: dict[str, Any]
) -> dict[str, Any]:
    return {
        "v": TX_VERSION,
        "chain": chain,
        "kind": kind,
        "signer": signer,
        "nonce": nonce,
        "body": body,
    }


# Kinds whose body spec checks only the shape of some values (the evidence's votes are
# checked in full by core.authority): their bodies get the codec's walk over types.
# Every other spec checks the type of every value it admits (tests/test_tx_types.py).
_SHAPE_ONLY = {"evidence"}


def make(identity: crypto.Identity, chain: str, kind: str, nonce: int, body: Any) -> Tx:
    """Build and sign a transaction (what a client does); any ``body`` gets check_body's checks."""
    raw, tx_id = sign(identity, chain, kind, nonce, body)
    signed = codec.decode_trusted(raw)  # the canonical body: keys sorted, lists
    return Tx(chain, kind, identity.public_key, nonce, signed["body"], signed["sig"], raw, tx_id)


def sign(
    identity: crypto.Identity, chain: str, kind: str, nonce: int, body: Any
) -> tuple[bytes, bytes]:
    """``make``'s bytes and id only, for a client that sends them (the decoded canonical
    body's round trip was a tenth of ``ehr import``'s main thread)."""
    check_body(kind, body)
    unsigned = _unsigned(chain, kind, identity.public_key, nonce, body)
    # The body spec checked the type of every value (but for the shape-only kinds), and
    # the other fields are ours: the codec's walk over types is needed only for those.
    if kind in _SHAPE_ONLY or type(chain) is not str or type(nonce) is not int:
        codec.check_types(unsigned)
    message = crypto.DOMAIN_TX + codec.encode_trusted(unsigned)
    raw = codec.encode_trusted({**unsigned, "sig": identity.sign(b"", message)})
    return raw, crypto.sha256(raw)


_TOP_KEYS = {"v", "chain", "kind", "signer", "nonce", "body", "sig"}


def decode(
    raw: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_TX_BYTES,
    verify_sig: bool = True,
    tx_id: bytes | None = None,
    certified: bool = False,
) -> Tx:
    """Parse and check a transaction's bytes: form, fields, body and signature.

    ``tx_id``: the SHA-256 of ``raw`` when the caller has computed it already.
    ``certified``: ``raw`` is in a block a quorum certified, so more than two thirds of the
    validators checked its signature and that its bytes are canonical; neither is checked
    again (every field and the body still are).

    The chain id is checked against the node's in ``core.state`` so that the error can
    name the right one.
    """
    if len(raw) > max_bytes:
        raise InvalidTransaction(
            f"transaction of {len(raw)} bytes exceeds the limit of {max_bytes}",
            code="tx_too_large",
        )
    try:
        # Every field and body value is type-checked below (a float, a bool for an int or
        # a nesting too deep is refused there), so the codec's own walk is left out.
        if certified:
            obj = codec.decode_certified(raw, max_bytes=max_bytes)
        else:
            obj = codec.decode(raw, max_bytes=max_bytes, typed=False)
    except InvalidEncoding as err:
        raise InvalidTransaction(
            f"transaction is not canonical msgpack: {err}", code="malformed"
        ) from err
    if not isinstance(obj, dict) or set(obj) != _TOP_KEYS:
        raise InvalidTransaction(
            f"a transaction is a map with exactly the keys {', '.join(sorted(_TOP_KEYS))}",
            code="malformed",
        )
    # ``True == 1`` in Python, and msgpack's true is another byte form of the same signed
    # content: without the type check one signature would fit two transaction ids.
    if type(obj["v"]) is not int or obj["v"] != TX_VERSION:
        raise InvalidTransaction(f"unsupported transaction version {obj['v']!r}", code="malformed")
    chain, kind, signer, nonce, body, sig = (
        obj["chain"],
        obj["kind"],
        obj["signer"],
        obj["nonce"],
        obj["body"],
        obj["sig"],
    )
    if not isinstance(chain, str) or not isinstance(kind, str):
        raise InvalidTransaction("'chain' and 'kind' must be strings", code="malformed")
    if not isinstance(signer, bytes) or len(signer) != crypto.PUBLIC_KEY_BYTES:
        raise InvalidTransaction("'signer' must be a 32-byte public key", code="malformed")
    if not isinstance(nonce, int) or isinstance(nonce, bool) or not 1 <= nonce <= MAX_NONCE:
        raise InvalidTransaction("'nonce' must be an integer from 1 to 2^63-1", code="malformed")
    if not isinstance(sig, bytes) or len(sig) != crypto.SIGNATURE_BYTES:
        raise InvalidTransaction("'sig' must be a 64-byte signature", code="malformed")
    check_body(kind, body)
    if kind in _SHAPE_ONLY:
        try:
            codec.check_types(body)
        except InvalidEncoding as err:
            raise InvalidTransaction(f"{kind} body: {err}", code="malformed_body") from err
    checked = verify_sig and not certified
    if checked and not crypto.verify(signer, b"", _signing_bytes_of(bytes(raw), sig), sig):
        raise InvalidTransaction(
            "signature does not verify for this signer and content", code="bad_signature"
        )
    if tx_id is None:
        tx_id = crypto.sha256(raw)
    return Tx(chain, kind, signer, nonce, body, sig, bytes(raw), tx_id)


def _signing_bytes_of(raw: bytes, sig: bytes) -> bytes:
    """The signing bytes of canonical transaction bytes, cut out of them rather than
    encoded again: the same 7-key map without its "sig" entry, as a 6-key map.

    The top-level "sig" entry is the last occurrence of its 70 bytes: only the 32-byte
    "signer" and "v" follow it, too short to hold another.
    """
    entry = b"\xa3sig\xc4\x40" + sig
    at = raw.rindex(entry)
    assert raw[0] == 0x87, "a canonical transaction is a 7-entry fixmap"
    return crypto.DOMAIN_TX + b"\x86" + raw[1:at] + raw[at + len(entry) :]


def record_id(tx_id: bytes, index: int) -> bytes:
    """The id of the ``index``-th record of a ``records`` transaction."""
    return crypto.sha256(crypto.DOMAIN_RECORD + tx_id + index.to_bytes(4, "big"))


def record_bodies(kind: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The record bodies a transaction writes (of a decoded or stored body): its body for
    ``record``, its items for ``records`` (record i is ``record_id(tx id, i)``), none for
    other kinds."""
    if kind == "record":
        return [body]
    if kind == "records":
        items: list[dict[str, Any]] = body["items"]
        return items
    return []


def blobs_of(kind: str, body: dict[str, Any]) -> list[bytes]:
    """The ciphertext blobs a transaction's records name."""
    return [record["blob"] for record in record_bodies(kind, body)]


def endorsement_bytes(chain: str, role: str, subject: bytes) -> bytes:
    """What an institution (or validator) signs to endorse ``subject`` in ``role``."""
    return crypto.DOMAIN_ENDORSE + codec.encode({"chain": chain, "role": role, "subject": subject})


def endorse(endorser: crypto.Identity, chain: str, role: str, subject: bytes) -> dict[str, bytes]:
    return {
        "by": endorser.public_key,
        "sig": endorser.sign(b"", endorsement_bytes(chain, role, subject)),
    }
