"""The SDK's transport: one aiohttp session to one node, signed requests, error mapping,
and the per-identity nonce book. It knows the RPC's paths and bodies, not the rules.

- JSON answers are decoded; every non-2xx answer becomes the ``client.errors`` class for
  its status and code; a failure to get any answer becomes ``NodeUnreachable``.
- Signed requests (``core.request``) sign the request target exactly as sent.
- Nonces: the next nonce of an identity is asked of the node once, then counted here.
  Submissions of one identity hold its lock from choosing the nonce until the node has
  answered, so they reach the node in nonce order; any failure forgets the count, and
  the next submission asks the node again (the node counts its mempool too).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any, BinaryIO

import aiohttp
import msgpack
from yarl import URL

from ehrnode.client.errors import InvalidEncoding, NodeUnreachable, from_body
from ehrnode.core import crypto, request
from ehrnode.core.crypto import Identity
from ehrnode.core.errors import EhrError
from ehrnode.core.genesis import Genesis

MSGPACK = "application/msgpack"
_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=120)


def now_ms() -> int:
    return int(time.time() * 1000)


class NonceBook:
    """Next nonce per signer, counted locally after one question to the node."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._next: dict[bytes, int] = {}
        self._locks: dict[bytes, asyncio.Lock] = {}

    def forget(self, key: bytes) -> None:
        self._next.pop(key, None)

    @contextlib.asynccontextmanager
    async def reserve(self, counts: dict[bytes, int]) -> AsyncIterator[dict[bytes, int]]:
        """Lock each signer and yield its first nonce; ``counts`` nonces each are used
        when the block exits cleanly, none (and the count is forgotten) otherwise."""
        async with contextlib.AsyncExitStack() as stack:
            for key in sorted(counts):  # one order for every caller: no deadlock
                await stack.enter_async_context(self._locks.setdefault(key, asyncio.Lock()))
            first: dict[bytes, int] = {}
            for key in counts:
                if key not in self._next:
                    account = await self._transport.get_json(f"/v1/accounts/{key.hex()}")
                    self._next[key] = int(account["next_nonce"])
                first[key] = self._next[key]
            try:
                yield first
            except BaseException:
                for key in counts:
                    self.forget(key)
                raise
            for key, count in counts.items():
                self._next[key] = first[key] + count


class Transport:
    """An open connection to one node. ``open()`` learns the chain; ``close()`` ends it."""

    def __init__(self, node_url: str, *, genesis: Genesis | None = None) -> None:
        self.base = node_url.rstrip("/")
        self._pinned = genesis
        self._session: aiohttp.ClientSession | None = None
        self.genesis: Genesis
        self.chain_id = ""
        self.node_key = b""
        self.nonces = NonceBook(self)

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(timeout=_TIMEOUT)
        try:
            status = await self.get_json("/v1/status")
            genesis = Genesis.from_json(await self.get_text("/v1/genesis"))
        except BaseException:
            await self.close()
            raise
        if self._pinned is not None and self._pinned.hash() != genesis.hash():
            await self.close()
            raise EhrError(
                f"the node at {self.base} serves another network (genesis "
                f"{genesis.hash().hex()[:16]}…, expected {self._pinned.hash().hex()[:16]}…)",
                code="wrong_network",
            )
        if status.get("chain_id") != genesis.chain_id:
            await self.close()
            raise EhrError("the node's status and genesis name different chains", code="bad_node")
        self.genesis = genesis
        self.chain_id = genesis.chain_id
        self.node_key = crypto.from_hex(str(status.get("node", "")), what="node id")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise EhrError("the client is not open; use 'async with Client(...)'", code="closed")
        return self._session

    def _url(self, path_qs: str) -> URL:
        return URL(self.base + path_qs, encoded=True)

    # --- requests ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def request(
        self,
        method: str,
        path_qs: str,
        *,
        signer: Identity | None = None,
        body: Any = None,
        sign_body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A response with a 2xx status (its body unread), or the mapped error.

        ``signer`` signs the request; ``sign_body`` is the body bytes it covers, if any.
        """
        all_headers = dict(headers or {})
        if signer is not None:
            all_headers["Authorization"] = request.authorization(
                signer, self.chain_id, method, path_qs, now_ms(), sign_body
            )
        try:
            async with self.session.request(
                method, self._url(path_qs), data=body, headers=all_headers
            ) as response:
                if response.status >= 300:
                    raise await _error(response)
                yield response
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as err:
            raise NodeUnreachable(
                f"no answer from the node at {self.base} ({method} {path_qs.partition('?')[0]}): "
                f"{err or type(err).__name__}"
            ) from err

    async def get_json(self, path_qs: str, *, signer: Identity | None = None) -> Any:
        async with self.request("GET", path_qs, signer=signer) as response:
            return await _json(response)

    async def height(self) -> int:
        return int((await self.get_json("/v1/status"))["height"])

    async def wait_height(self, height: int, timeout: float) -> None:
        """Return once the node has committed ``height`` (watching its events websocket),
        or once ``timeout`` passes or the websocket fails: the caller looks again."""
        assert self._session is not None, "open() first"
        url = self.base.replace("http", "ws", 1) + "/v1/events"
        failures = (TimeoutError, aiohttp.ClientError, EhrError, ValueError, KeyError, TypeError)
        with contextlib.suppress(*failures):
            async with asyncio.timeout(timeout), self._session.ws_connect(url) as ws:
                head = await self.height()  # after subscribing: no block falls in between
                while head < height:
                    message = await ws.receive()
                    if message.type != aiohttp.WSMsgType.TEXT:
                        return
                    head = max(head, int(json.loads(message.data)["height"]))

    async def get_text(self, path_qs: str) -> str:
        async with self.request("GET", path_qs) as response:
            return await response.text()

    async def get_bytes(self, path_qs: str) -> bytes:
        async with self.request("GET", path_qs) as response:
            return await response.read()

    # --- transactions -----------------------------------------------------------------------

    async def post_tx(self, raw: bytes, *, wait: bool) -> dict[str, Any]:
        mode = "commit" if wait else "sync"
        async with self.request(
            "POST", f"/v1/txs?mode={mode}", body=raw, headers={"Content-Type": MSGPACK}
        ) as response:
            reply: dict[str, Any] = await _json(response)
            return reply

    async def post_batch(self, raws: list[bytes], *, wait: bool) -> list[dict[str, Any]]:
        mode = "commit" if wait else "sync"
        body = msgpack.packb(raws, use_bin_type=True)
        async with self.request(
            "POST", f"/v1/txs/batch?mode={mode}", body=body, headers={"Content-Type": MSGPACK}
        ) as response:
            results: list[dict[str, Any]] = (await _json(response))["results"]
            return results

    # --- blobs ------------------------------------------------------------------------------

    async def put_blob(self, signer: Identity, blob_hash: bytes, data: bytes | BinaryIO) -> None:
        """Upload one blob; a file object is streamed from where it stands."""
        async with self.request(
            "PUT",
            f"/v1/blobs/{blob_hash.hex()}",
            signer=signer,
            body=data,
            headers={"Content-Type": "application/octet-stream"},
        ) as response:
            reply = await _json(response)
        if reply.get("hash") != blob_hash.hex():
            raise InvalidEncoding("the node stored the blob under another hash", code="bad_node")

    async def wait_txs(self, ids: list[bytes], timeout: float = 60.0) -> list[dict[str, Any]]:
        """Each transaction's status once committed or rejected (or still pending after
        ``timeout``), in order."""
        body = msgpack.packb(ids, use_bin_type=True)
        async with self.request(
            "POST",
            f"/v1/txs/wait?timeout={int(timeout)}",
            body=body,
            headers={"Content-Type": "application/msgpack"},
        ) as response:
            reply = await _json(response)
        results: list[dict[str, Any]] = reply["results"]
        return results

    async def stream_blob(self, signer: Identity, body: AsyncIterator[bytes]) -> bytes:
        """Stream a blob whose hash is not known yet; the node's hash of it."""
        async with self.request(
            "POST",
            "/v1/blobs/stream",
            signer=signer,
            body=body,
            headers={"Content-Type": "application/octet-stream"},
        ) as response:
            reply = await _json(response)
        try:
            return bytes.fromhex(reply["hash"])
        except (KeyError, TypeError, ValueError) as err:
            raise InvalidEncoding("the node's reply names no blob hash", code="bad_node") from err

    async def post_blobs(self, signer: Identity, blobs: list[bytes]) -> None:
        body = msgpack.packb(blobs, use_bin_type=True)
        async with self.request(
            "POST",
            "/v1/blobs",
            signer=signer,
            body=body,
            sign_body=body,
            headers={"Content-Type": MSGPACK},
        ) as response:
            reply = await _json(response)
        expected = [crypto.sha256(b).hex() for b in blobs]
        if reply.get("hashes") != expected:
            raise InvalidEncoding("the node stored the blobs under other hashes", code="bad_node")


async def _json(response: aiohttp.ClientResponse) -> Any:
    try:
        return await response.json(content_type=None)
    except ValueError as err:
        raise InvalidEncoding(
            f"the node answered {response.status} with a body that is not JSON", code="bad_node"
        ) from err


async def _error(response: aiohttp.ClientResponse) -> EhrError:
    try:
        body = await response.json(content_type=None)
    except (ValueError, aiohttp.ClientError):
        body = None
    return from_body(response.status, body)
