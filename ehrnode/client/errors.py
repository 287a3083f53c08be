"""What the SDK raises: the node's errors mapped back onto ``core.errors``, plus the few
that only a client meets. Every one is an ``EhrError`` and keeps the node's ``code``.

    EhrError
    ├── InvalidEncoding          the node could not parse the request (bad id, bad body)
    │   └── InvalidResource      a FHIR resource failed validation here, before encryption
    ├── InvalidTransaction       the rules rejected a transaction (code says which rule)
    ├── InvalidBlock             a proof or certificate that does not verify
    │   └── AuditLogBroken       an access log whose hash chain or signatures do not hold
    ├── NotAuthorised            not granted, not signed right, or no key for this reader
    ├── NotFound                 no such record, transaction, account or blob
    │   └── RecordErased         the patient erased the record (HTTP 410)
    ├── Conflict                 e.g. the same transaction twice, a blob not uploaded
    ├── LimitExceeded            a size, count or rate limit (429 keeps code rate_limited)
    └── Unavailable              the node is down, unreachable, or failed internally
        └── NodeUnreachable      no HTTP answer at all (connection refused, timeout)
"""

from __future__ import annotations

from typing import Any

from ehrnode.core.errors import (
    Conflict,
    EhrError,
    InvalidBlock,
    InvalidEncoding,
    InvalidTransaction,
    LimitExceeded,
    NotAuthorised,
    NotFound,
    Unavailable,
)


class InvalidResource(InvalidEncoding):
    code = "invalid_resource"


class RecordErased(NotFound):
    code = "record_erased"
    http_status = 410


class AuditLogBroken(InvalidBlock):
    code = "access_log_broken"


class NodeUnreachable(Unavailable):
    code = "node_unreachable"


# Codes the node answers with HTTP 400 that are about the request's form, not the rules.
_ENCODING_CODES = {"invalid_encoding", "bad_request", "invalid_resource"}

_BY_STATUS: dict[int, type[EhrError]] = {
    403: NotAuthorised,
    401: NotAuthorised,
    404: NotFound,
    405: InvalidEncoding,
    409: Conflict,
    410: RecordErased,
    413: LimitExceeded,
    429: LimitExceeded,
    503: Unavailable,
}


def error_for(status: int, code: str, message: str) -> EhrError:
    """The exception for a node's error answer, keeping the node's ``code``."""
    cls: type[EhrError]
    if code == "record_erased":
        cls = RecordErased
    elif status == 400:
        cls = InvalidEncoding if code in _ENCODING_CODES else InvalidTransaction
    else:
        cls = _BY_STATUS.get(status, Unavailable)
    return cls(message, code=code)


def from_body(status: int, body: Any) -> EhrError:
    """Map a decoded error body ``{"error": {"code", "message"}}`` (or anything else)."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        message = error.get("message")
        return error_for(status, error["code"], str(message) if message else error["code"])
    return error_for(status, f"http_{status}", f"the node answered HTTP {status}")


__all__ = [
    "AuditLogBroken",
    "Conflict",
    "EhrError",
    "InvalidBlock",
    "InvalidEncoding",
    "InvalidResource",
    "InvalidTransaction",
    "LimitExceeded",
    "NodeUnreachable",
    "NotAuthorised",
    "NotFound",
    "RecordErased",
    "Unavailable",
    "error_for",
    "from_body",
]
