"""FHIR R4 validation and the plaintext byte form of a resource, before anything is encrypted.

Validation uses the ``fhir.resources`` models of R4B (the R4-compatible set in that
package). The plaintext written is the resource exactly as given, as canonical JSON
(sorted keys, no spaces, UTF-8), not the model's re-serialisation: a reader gets back
the same document the writer validated. It is those bytes that are validated (pydantic's
JSON mode), which is what a reader will parse, and about an eighth faster than
validating the Python objects they came from.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ehrnode.client.errors import InvalidResource

if TYPE_CHECKING:
    from fhir.resources.R4B.resource import Resource

_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{0,63}$")
_MAX_REPORTED = 5


def resource_type(resource: Any) -> str:
    """The ``resourceType`` of a would-be resource, or InvalidResource."""
    if not isinstance(resource, dict):
        raise InvalidResource(f"a FHIR resource is a JSON object, not {type(resource).__name__}")
    kind = resource.get("resourceType")
    if kind is None:
        raise InvalidResource("the resource has no resourceType")
    if not isinstance(kind, str) or not _RESOURCE_TYPE.match(kind):
        raise InvalidResource(f"resourceType {kind!r} is not a FHIR resource type name")
    return kind


@cache
def _models() -> tuple[Any, type[Resource]]:
    """The FHIR model package, loaded on first use: it takes a third of a second, which
    commands that validate nothing (``ehr records``, ``ehrnode run``) should not pay."""
    from fhir.resources.R4B import get_fhir_model_class  # noqa: PLC0415
    from fhir.resources.R4B.resource import Resource  # noqa: PLC0415

    return get_fhir_model_class, Resource


def _model(kind: str) -> type[Resource]:
    get_fhir_model_class, resource_class = _models()
    try:
        model = get_fhir_model_class(kind)
    except (ValueError, KeyError) as err:
        raise InvalidResource(f"'{kind}' is not a FHIR R4 resource type") from err
    if not isinstance(model, type) or not issubclass(model, resource_class):
        raise InvalidResource(f"'{kind}' is a FHIR data type, not a resource")
    return model


def _describe(err: ValidationError) -> str:
    problems = []
    for item in err.errors()[:_MAX_REPORTED]:
        where = ".".join(str(part) for part in item.get("loc", ())) or "(resource)"
        message = " ".join(str(item.get("msg", "invalid")).split())
        problems.append(f"{where}: {message}")
    more = err.error_count() - len(problems)
    if more > 0:
        problems.append(f"and {more} more")
    return "; ".join(problems)


@dataclass(frozen=True)
class Prepared:
    """A resource ready to encrypt: its type and its canonical JSON bytes."""

    kind: str
    plaintext: bytes


def prepare(resource: Any) -> Prepared:
    """The canonical bytes of ``resource``, checked against the FHIR R4 model of its type."""
    kind = resource_type(resource)
    return validated(kind, encode(resource))


def validated(kind: str, plaintext: bytes) -> Prepared:
    """Check canonical JSON bytes (from ``encode``) against the FHIR R4 model of ``kind``,
    the resourceType they hold: what a worker process is given instead of the resource."""
    model = _model(kind)
    try:
        model.model_validate_json(plaintext)
    except ValidationError as err:
        raise InvalidResource(f"{kind} is not valid FHIR R4: {_describe(err)}") from err
    except (ValueError, TypeError) as err:
        raise InvalidResource(f"{kind} is not valid FHIR R4: {err}") from err
    return Prepared(kind, plaintext)


def validate(resource: Any) -> str:
    """Check ``resource`` against the FHIR R4 model of its type; return the type."""
    return prepare(resource).kind


def encode(resource: dict[str, Any]) -> bytes:
    """Canonical JSON bytes of a resource (what gets encrypted)."""
    try:
        text = json.dumps(
            resource, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as err:
        raise InvalidResource(f"the resource cannot be written as JSON: {err}") from err
    return text.encode()


def decode(plaintext: bytes) -> dict[str, Any]:
    """Parse a decrypted resource; InvalidResource if it is not a JSON object."""
    try:
        value = json.loads(plaintext)
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidResource(f"the decrypted record is not JSON: {err}") from err
    if not isinstance(value, dict):
        raise InvalidResource("the decrypted record is not a JSON object")
    return value
