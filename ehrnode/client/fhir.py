"""FHIR R4 validation and the plaintext byte form of a resource, before anything is encrypted.

Validation is ``fhirkit``'s, against FHIR R4 (4.0.1), the release Synthea and most
deployed servers write: every resource and data type generated from the official
specification, in compiled code (about 40 us a Synthea resource, a tenth to a
fifteenth of the pydantic models of ``fhir.resources``, and no per-type model to build
in each process). It checks element names, JSON types, cardinality, choice types
(``value[x]``), the lexical form of primitives (not whether a date exists on the
calendar) and nulls, inside contained and bundled resources too; it does not check
terminology bindings. Error messages name the element by its path and leave out the
value found there: it is health data, and a message ends up in terminals and logs.

The plaintext written is the resource exactly as given, as canonical JSON (sorted keys,
no spaces, UTF-8), not a re-serialisation: a reader gets back the same document the
writer validated. It is those bytes that are validated, which is what a reader will parse.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import fhirkit
import orjson

from ehrnode.client.errors import InvalidResource

_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{0,63}$")
_RESOURCE_TYPES = frozenset(fhirkit.RESOURCE_TYPES)
_MAX_REPORTED = 5
_MAX_TEXT = 200  # characters of one problem's path or message
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_NUMBER = re.compile(r"[-+0-9.eE]+")


def resource_type(resource: Any) -> str:
    """The ``resourceType`` of a would-be resource, or InvalidResource."""
    if not isinstance(resource, dict):
        raise InvalidResource(f"a FHIR resource is a JSON object, not {type(resource).__name__}")
    kind = resource.get("resourceType")
    if kind is None:
        raise InvalidResource("the resource has no resourceType")
    if not isinstance(kind, str) or not _RESOURCE_TYPE.match(kind):
        raise InvalidResource(f"resourceType {kind!r} is not a FHIR resource type name")
    if kind not in _RESOURCE_TYPES:
        raise InvalidResource(f"'{kind}' is not a FHIR R4 resource type")
    return kind


def _redacted(message: str) -> str:
    """fhirkit's message without the value it quotes (``"1974-13-25" is not a valid
    date``, ``1.5 is not a FHIR integer``), on one line, of bounded length."""
    message = _QUOTED.sub("the value", " ".join(message.split()))
    head, found, tail = message.partition(" is not ")
    if found and _NUMBER.fullmatch(head):
        message = f"the value is not {tail}"
    return message[:_MAX_TEXT]


def _describe(errors: list[fhirkit.Issue]) -> str:
    problems = [
        f"{' '.join(e.path.split())[:_MAX_TEXT]}: {_redacted(e.message)}"
        for e in errors[:_MAX_REPORTED]
    ]
    if len(errors) > _MAX_REPORTED:
        problems.append(f"and {len(errors) - _MAX_REPORTED} more")
    return "; ".join(problems)


@dataclass(frozen=True)
class Prepared:
    """A resource ready to encrypt: its type and its canonical JSON bytes."""

    kind: str
    plaintext: bytes


def prepare(resource: Any) -> Prepared:
    """The canonical bytes of ``resource``, checked against FHIR R4."""
    kind = resource_type(resource)
    return validated(kind, encode(resource))


def validated(kind: str, plaintext: bytes) -> Prepared:
    """Check canonical JSON bytes (from ``encode``) against FHIR R4; ``kind`` is the
    resourceType they hold (checked): what a worker process is given instead of the
    resource."""
    try:
        parsed = fhirkit.parse(plaintext)
    except ValueError as err:  # fhirkit.ParseError: not JSON, or nested too deeply
        raise InvalidResource(f"{kind} is not valid FHIR R4: {_redacted(str(err))}") from err
    errors = [issue for issue in parsed.issues if issue.severity == "error"]
    if errors:
        raise InvalidResource(f"{kind} is not valid FHIR R4: {_describe(errors)}")
    if parsed.resource_type != kind:
        raise InvalidResource(f"the resourceType is {parsed.resource_type}, not {kind}")
    return Prepared(kind, plaintext)


def validate(resource: Any) -> str:
    """Check ``resource`` against FHIR R4; return its type."""
    return prepare(resource).kind


def encode(resource: dict[str, Any]) -> bytes:
    """Canonical JSON bytes of a resource (what gets encrypted)."""
    try:
        text = json.dumps(
            resource, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        return text.encode()  # a lone surrogate (from a "\ud800" escape) is not UTF-8
    except (TypeError, ValueError, RecursionError) as err:
        raise InvalidResource(f"the resource cannot be written as JSON: {err}") from err


def encode_parsed(resource: dict[str, Any]) -> bytes:
    """``encode`` of a resource parsed from JSON text (only dicts, lists, str, int, float,
    bool, None: orjson would also write a datetime or a UUID, which ``encode`` refuses),
    through orjson: the same bytes in about half the CPU (``ehr import`` encodes
    every resource of every bundle)."""
    if not _ORJSON_AGREES:
        return encode(resource)
    try:
        data = orjson.dumps(resource, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # orjson.JSONEncodeError: an int above 64 bits, a lone surrogate...
        return encode(resource)  # ...which names what is wrong, or writes it
    return encode(resource) if _may_differ(data) else data


def _orjson_agrees() -> bool:
    """Whether this orjson writes numbers as ``json.dumps`` does, but for the forms
    ``_may_differ`` catches (orjson before 3.11.7 wrote ``1e16`` for ``1e+16``): checked
    once, so that another version falls back to ``encode`` instead of writing other bytes."""
    probe = [1e16, 1.2345678901234568e17, 1e300, -1.5e22, 0.0001, 123.456, -0.0, 2**63 - 1]
    return orjson.dumps({"probe": probe}) == encode({"probe": probe})


# Where orjson's bytes can differ from ``json.dumps``'s: numbers below 1e-4 (``0.00001`` and
# ``1e-7`` where Python writes ``1e-05`` and ``1e-07``), and NaN or Infinity (``null``, where
# ``allow_nan=False`` refuses them). A value starts after ``:``, ``,`` or ``[``.
_SMALL_OR_NULL = re.compile(rb"[:,\[](?:-?0\.0000|null)")
_DIGITS = frozenset(b"0123456789.")


def _may_differ(data: bytes) -> bool:
    """True if ``data`` holds such a token, or text that looks like one (then ``encode``
    writes the resource again: a false alarm costs time, never other bytes)."""
    if (b"null" in data or b"0.0000" in data) and _SMALL_OR_NULL.search(data):
        return True
    # A negative exponent: ``e-`` after a number token. Most ``e-`` are inside UUIDs.
    at = data.find(b"e-")
    while at > 0:
        start = at
        while start > 0 and data[start - 1] in _DIGITS:
            start -= 1
        if start < at and data[start - 1 : start] == b"-":
            start -= 1
        if start < at and data[start - 1 : start] in (b":", b",", b"["):
            return True
        at = data.find(b"e-", at + 2)
    return False


_ORJSON_AGREES = _orjson_agrees()


def decode(plaintext: bytes) -> dict[str, Any]:
    """Parse a decrypted resource; InvalidResource if it is not a JSON object."""
    try:
        value = json.loads(plaintext)
    except (ValueError, RecursionError) as err:  # RecursionError: nested too deeply
        raise InvalidResource(f"the decrypted record is not JSON: {err}") from err
    if not isinstance(value, dict):
        raise InvalidResource("the decrypted record is not a JSON object")
    return value
