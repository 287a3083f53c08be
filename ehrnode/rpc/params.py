"""Parsing what a request carries: ids in the path, query integers, bodies, signatures."""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web

from ehrnode.core import crypto, request
from ehrnode.core.errors import InvalidEncoding, NotAuthorised
from ehrnode.rpc.limits import ReplayCache

MSGPACK = "application/msgpack"


def error_response(status: int, code: str, message: str) -> web.Response:
    """Every error's body: ``{"error": {"code", "message"}}``."""
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def now_ms() -> int:
    return int(time.time() * 1000)


def key(req: web.Request, name: str = "key") -> bytes:
    return crypto.from_hex(req.match_info[name], what=name)


def tx_id(req: web.Request, name: str = "id") -> bytes:
    return crypto.from_hex(req.match_info[name], what=f"{name} (a 64-hex transaction id)")


def int_query(req: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = req.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError as err:
        raise InvalidEncoding(f"query parameter {name} must be an integer") from err
    if not lo <= value <= hi:
        raise InvalidEncoding(f"query parameter {name} must be from {lo} to {hi}")
    return value


async def raw_body(req: web.Request) -> bytes:
    if req.content_type not in (MSGPACK, "application/octet-stream"):
        raise InvalidEncoding(f"send the body as {MSGPACK}")
    return await req.read()


class RequestAuth:
    """Checks signed requests (``core.request``) and refuses a nonce seen before.

    Only registered keys get as far as the replay cache: a key costs nothing to make, so a
    stranger's requests must not be able to fill it and lock everyone else out."""

    def __init__(self, chain_id: str, known: Callable[[bytes], bool] | None = None) -> None:
        self.chain_id = chain_id
        self.known = known or (lambda key: True)
        self.replay = ReplayCache(request.MAX_SKEW_MS * 2)

    def verify(self, req: web.Request, body: bytes | None = None) -> request.SignedRequest:
        signed = request.verify(
            req.headers.get("Authorization"),
            self.chain_id,
            req.method,
            req.path_qs,
            now_ms(),
            body,
        )
        if not self.known(signed.key):
            raise NotAuthorised(
                "this key is not registered on the chain", code="unregistered_signer"
            )
        if not self.replay.add(signed.nonce, signed.ts):
            raise NotAuthorised("this signed request was already used", code="replayed_request")
        return signed
