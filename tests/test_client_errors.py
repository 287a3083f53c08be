"""The node's JSON errors map onto one exception tree, keeping the node's code."""

from __future__ import annotations

import pytest

from ehrnode.client.errors import (
    AuditLogBroken,
    InvalidResource,
    NodeUnreachable,
    RecordErased,
    error_for,
    from_body,
)
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


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "nonce_gap", InvalidTransaction),
        (400, "missing_grantee_key", InvalidTransaction),
        (400, "invalid_encoding", InvalidEncoding),
        (400, "bad_request", InvalidEncoding),
        (403, "not_granted", NotAuthorised),
        (403, "replayed_request", NotAuthorised),
        (404, "unknown_record", NotFound),
        (409, "duplicate", Conflict),
        (409, "blob_missing", Conflict),
        (410, "record_erased", RecordErased),
        (413, "body_too_large", LimitExceeded),
        (429, "rate_limited", LimitExceeded),
        (500, "internal_error", Unavailable),
        (503, "unavailable", Unavailable),
        (502, "bad_gateway", Unavailable),
    ],
)
def test_status_and_code_pick_the_class_and_keep_the_code(
    status: int, code: str, cls: type[EhrError]
) -> None:
    err = error_for(status, code, "a sentence")
    assert type(err) is cls
    assert err.code == code and str(err) == "a sentence"


def test_a_body_that_is_not_an_error_document_still_maps() -> None:
    err = from_body(502, "<html>bad gateway</html>")
    assert isinstance(err, Unavailable) and err.code == "http_502"
    err = from_body(404, {"error": {"code": "unknown_tx", "message": "no such tx"}})
    assert isinstance(err, NotFound) and err.code == "unknown_tx" and str(err) == "no such tx"


def test_client_errors_sit_in_the_tree() -> None:
    assert issubclass(RecordErased, NotFound) and RecordErased.http_status == 410
    assert issubclass(InvalidResource, InvalidEncoding)
    assert issubclass(AuditLogBroken, InvalidBlock)
    assert issubclass(NodeUnreachable, Unavailable)
    for cls in (RecordErased, InvalidResource, AuditLogBroken, NodeUnreachable):
        assert issubclass(cls, EhrError)
