"""Signed client requests: how a reader proves who is asking for ciphertext or an audit log.

A signed request carries one header::

    Authorization: EHR key=<64 hex>,ts=<ms since epoch>,nonce=<32 hex>,sig=<128 hex>

where ``sig`` is the ed25519 signature by ``key`` of::

    DOMAIN_REQUEST || encode({"chain": chain id, "method": "GET", "path": "/v1/...?...",
                              "ts": ts, "nonce": nonce bytes, "body": sha256(body) | nil})

``path`` is the request target exactly as sent (path and query string). The node accepts a
request within ``MAX_SKEW_MS`` of its clock and each nonce once. Pure: the caller supplies
the clock and keeps the replay cache.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from ehrnode.core import codec, crypto
from ehrnode.core.errors import NotAuthorised

SCHEME = "EHR"
MAX_SKEW_MS = 60_000
_HEADER = re.compile(
    r"^EHR key=(?P<key>[0-9a-f]{64}),ts=(?P<ts>[0-9]{1,16}),"
    r"nonce=(?P<nonce>[0-9a-f]{32}),sig=(?P<sig>[0-9a-f]{128})$"
)


def signing_bytes(
    chain: str, method: str, path: str, ts: int, nonce: bytes, body_hash: bytes | None
) -> bytes:
    return crypto.DOMAIN_REQUEST + codec.encode(
        {
            "chain": chain,
            "method": method.upper(),
            "path": path,
            "ts": ts,
            "nonce": nonce,
            "body": body_hash,
        }
    )


def authorization(
    identity: crypto.Identity,
    chain: str,
    method: str,
    path: str,
    now_ms: int,
    body: bytes | None = None,
) -> str:
    """The Authorization header value for a request (what a client sends)."""
    nonce = secrets.token_bytes(16)
    body_hash = None if body is None else crypto.sha256(body)
    sig = identity.sign(b"", signing_bytes(chain, method, path, now_ms, nonce, body_hash))
    return f"{SCHEME} key={identity.public_id},ts={now_ms},nonce={nonce.hex()},sig={sig.hex()}"


@dataclass(frozen=True)
class SignedRequest:
    key: bytes
    ts: int
    nonce: bytes
    sig: bytes


def verify(
    header: str | None,
    chain: str,
    method: str,
    path: str,
    now_ms: int,
    body: bytes | None = None,
) -> SignedRequest:
    """Check a request's Authorization header; NotAuthorised naming what is wrong."""
    if not header:
        raise NotAuthorised(
            "this request must be signed: send an 'Authorization: EHR key=…,ts=…,nonce=…,sig=…' "
            "header",
            code="signature_required",
        )
    match = _HEADER.match(header.strip())
    if match is None:
        raise NotAuthorised(
            "malformed Authorization header; expected "
            "'EHR key=<hex>,ts=<ms>,nonce=<hex>,sig=<hex>'",
            code="bad_request_signature",
        )
    ts = int(match["ts"])
    if abs(now_ms - ts) > MAX_SKEW_MS:
        raise NotAuthorised(
            "request timestamp is more than 60 s from the node's clock; check your clock",
            code="stale_request",
        )
    signed = SignedRequest(
        bytes.fromhex(match["key"]), ts, bytes.fromhex(match["nonce"]), bytes.fromhex(match["sig"])
    )
    body_hash = None if body is None else crypto.sha256(body)
    message = signing_bytes(chain, method, path, ts, signed.nonce, body_hash)
    if not crypto.verify(signed.key, b"", message, signed.sig):
        raise NotAuthorised(
            "request signature does not verify for this key, method and path",
            code="bad_request_signature",
        )
    return signed
