"""The one exception tree of ehrnode.

Every error a caller can act on is an ``EhrError``; each carries a stable ``code`` (a
machine-readable slug that RPC clients switch on) and a sentence a person can act on.

    EhrError
    ├── InvalidEncoding        bytes that are not canonical msgpack, or exceed a limit
    ├── InvalidTransaction     a transaction the rules reject (each with its own code)
    ├── InvalidBlock           a block or certificate that does not verify
    ├── NotAuthorised          a signed request whose signer may not do this
    ├── NotFound               no such transaction, block, record, blob or account
    ├── Gone                   it existed and was erased
    ├── Conflict               the request contradicts what is already there
    ├── LimitExceeded          a size, count or rate limit
    ├── Unavailable            the node cannot serve this now (shutting down, syncing)
    ├── PeerError              a peer broke the peer protocol
    └── ConfigError            a config, genesis or key file that cannot be used

This module is pure: no I/O, imports nothing of the project.
"""

from __future__ import annotations


class EhrError(Exception):
    """Root of every error ehrnode raises on purpose."""

    code = "error"
    http_status = 500

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class InvalidEncoding(EhrError):
    code = "invalid_encoding"
    http_status = 400


class InvalidTransaction(EhrError):
    code = "invalid_transaction"
    http_status = 400


class InvalidBlock(EhrError):
    code = "invalid_block"
    http_status = 400


class NotAuthorised(EhrError):
    code = "not_authorised"
    http_status = 403


class NotFound(EhrError):
    code = "not_found"
    http_status = 404


class Gone(EhrError):
    code = "gone"
    http_status = 410


class Conflict(EhrError):
    code = "conflict"
    http_status = 409


class LimitExceeded(EhrError):
    code = "limit_exceeded"
    http_status = 413


class Unavailable(EhrError):
    code = "unavailable"
    http_status = 503


class PeerError(EhrError):
    code = "peer_error"
    http_status = 400


class ConfigError(EhrError):
    code = "config_error"
    http_status = 400
