"""Transaction bodies: each kind's fields, their limits and the stateless checks of them.

A spec maps a body key to (required, check); a body may hold no key its kind's spec does
not name. ``check_body`` is what ``core.tx`` runs on every transaction it makes or
decodes; the byte form, signing and ids are ``core.tx``'s. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from ehrnode.core import crypto
from ehrnode.core.errors import InvalidTransaction

MAX_NAME_CHARS = 200
MAX_KEYS_PER_RECORD = 64
MAX_RECORDS_PER_GRANT = 2000
MAX_RECORDS_PER_ERASE = 256
MAX_RECORDS_PER_TX = 256
MAX_TYPES_PER_GRANT = 64
MAX_BLOB_BYTES = 1 << 40  # 1 TiB: far above any attachment, far below int overflow
MAX_NONCE = (1 << 63) - 1  # also the largest time and height a body names

ROLES = ("patient", "provider", "institution")
KINDS = ("register", "record", "records", "grant", "revoke", "erase", "validator", "evidence")
_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{0,63}$")


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
