"""Authenticated peer links over aiohttp websockets, and the switch that owns them.

A link: both ends send ``hello`` at once (chain id, genesis hash, node key, a fresh nonce,
their advertised listen address), then ``auth``: a signature over the *other* end's nonce
(``messages.auth_bytes``). A link is used only after both signatures verify and both ends
agree on the chain id and the genesis hash; a dialer also insists the other end holds the
key written in its peer list (``<key hex>@host:port``). If two links join the same pair,
both ends keep the one dialed by the smaller key.

Every frame after that is rate limited, size limited (aiohttp's ``max_msg_size``) and
parsed by ``messages.decode``; a peer that sends a malformed frame is disconnected with the
reason logged. Outgoing frames go through a bounded per-peer queue, so a slow peer cannot
stall the node: when its queue is full it is dropped. Dialers reconnect with exponential
backoff and jitter; websocket heartbeats detect dead links.

Consensus first: the frames that carry bulk (relayed transactions, blobs, synced blocks:
``BULK``) wait in the queue behind every other frame, and a link's socket buffers are
capped (``LINK_BUFFER_BYTES``), so that bulk piles up in the sender's queue, where a
proposal or vote overtakes it, and not in the kernel, where the receiver would have to
read megabytes of transactions, seconds of signature checks under load, before it.

Peers also fetch blobs from each other over HTTP on the same port (``/p2p/blobs/{hash}``),
signed with the node key; only connected peers are served.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import secrets
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import aiohttp
from aiohttp import web

from ehrnode.config import P2pConfig, split_address
from ehrnode.core import crypto, request
from ehrnode.core.errors import ConfigError, EhrError, InvalidEncoding, NotAuthorised, PeerError
from ehrnode.core.genesis import Genesis
from ehrnode.p2p import messages
from ehrnode.rpc.limits import RateLimiter, ReplayCache

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 5.0
MAX_PEERS = 64
_LISTEN = re.compile(r"^[A-Za-z0-9.\-]{1,253}:[0-9]{1,5}$|^\[[0-9A-Fa-f:.]{2,45}\]:[0-9]{1,5}$")
HEARTBEAT = 5.0
MAX_QUEUED_BYTES = 256 * 1024 * 1024
BULK = frozenset({"txs", "blob_data", "blob_have", "blob_want", "blocks"})
LINK_BUFFER_BYTES = 256 * 1024  # per direction; Linux doubles it for its own bookkeeping
BACKOFF_MIN, BACKOFF_MAX = 0.2, 10.0
# A link that ends this soon after its handshake was refused or dropped by the other end
# (we are not a validator there yet, say): it is redialed after a backoff, as a failed
# dial is, but one capped at RELINK_MAX, so a node voted into the set links within seconds.
SHORT_LINK_S, RELINK_MAX = 5.0, 2.0

Handler = Callable[["Peer", dict[str, Any]], Awaitable[None] | None]


def parse_peer(text: str) -> tuple[bytes, str]:
    """``<64 hex>@host:port`` -> (key, address)."""
    key_hex, sep, address = text.partition("@")
    if not sep:
        raise ConfigError(f"peer '{text}' must be <public id>@host:port")
    try:
        key = crypto.from_hex(key_hex, what="peer public id")
    except InvalidEncoding as err:
        raise ConfigError(str(err)) from err
    split_address(address, f"peer '{text}'")
    return key, address


class Peer:
    def __init__(self, key: bytes, address: str, ws: Any, dialer_key: bytes) -> None:
        self.key = key
        self.address = address  # where its p2p server listens (from its hello)
        self.ws = ws
        self.dialer_key = dialer_key
        self.height = 0
        self._first: deque[bytes] = deque()
        self._bulk: deque[bytes] = deque()
        self._wake = asyncio.Event()
        self._queued_bytes = 0
        self._writer: asyncio.Task[None] | None = None
        self.closed = False

    @property
    def short(self) -> str:
        return self.key.hex()[:12]

    def start_writer(self) -> None:
        self._writer = asyncio.create_task(self._write(), name=f"peer-writer-{self.short}")

    def send(self, frame: bytes, *, bulk: bool = False) -> bool:
        """Queue ``frame``; a ``bulk`` one goes out after every frame that is not."""
        if self.closed:
            return False
        if self._queued_bytes + len(frame) > MAX_QUEUED_BYTES:
            log.warning("peer %s is too slow (send queue full); disconnecting", self.short)
            self.close()
            return False
        self._queued_bytes += len(frame)
        (self._bulk if bulk else self._first).append(frame)
        self._wake.set()
        return True

    async def _write(self) -> None:
        try:
            while not self.closed:
                if not self._first and not self._bulk:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                frame = (self._first or self._bulk).popleft()
                self._queued_bytes -= len(frame)
                await self.ws.send_bytes(frame)
        except (ConnectionError, RuntimeError, aiohttp.ClientError):
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._wake.set()
            asyncio.get_running_loop().create_task(self.ws.close())


class Switch:
    def __init__(self, identity: crypto.Identity, genesis: Genesis, config: P2pConfig) -> None:
        self.identity = identity
        self.genesis = genesis
        self.genesis_hash = genesis.hash()
        self.config = config
        self.me = identity.public_key
        self.peers: dict[bytes, Peer] = {}
        self.handlers: dict[str, Handler] = {}
        self.on_connect: list[Callable[[Peer], None]] = []
        self.on_disconnect: list[Callable[[Peer], None]] = []  # every link that ends
        self.routes: list[web.RouteDef] = []
        self.height: Callable[[], int] = lambda: 0
        self.listen_address = config.listen
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._inbound: set[web.WebSocketResponse] = set()
        self._replay = ReplayCache(request.MAX_SKEW_MS * 2)
        self._stopping = False
        self.configured = [parse_peer(p) for p in config.peers]
        self.configured_keys = {key for key, _ in self.configured}
        # Whether a key may link even if not configured: the node wires "is a validator".
        self.allowed: Callable[[bytes], bool] = lambda key: False

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=1024 * 1024)
        app.router.add_get("/p2p", self._accept)
        app.router.add_routes(self.routes)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=2.0
        )
        await self._runner.setup()
        host, port = split_address(self.config.listen, "p2p.listen")
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        if sockets:
            self.listen_address = f"{host}:{sockets[0].getsockname()[1]}"
        self._session = aiohttp.ClientSession()
        for key, address in self.configured:
            if key != self.me:
                self._spawn(self._dial_forever(key, address), f"dial-{key.hex()[:12]}")

    async def stop(self) -> None:
        self._stopping = True
        for peer in list(self.peers.values()):
            peer.close()
        for ws in list(self._inbound):  # links still in their handshake
            await ws.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None
        return self._session

    def authenticate(self, req: web.Request) -> request.SignedRequest:
        """A peer's signed HTTP request (blob fetches and relays on the p2p port): the key
        must be a connected peer's, and each signed request is taken once."""
        signed = request.verify(
            req.headers.get("Authorization"),
            self.genesis.chain_id,
            req.method,
            req.path_qs,
            int(time.time() * 1000),
        )
        if signed.key not in self.peers:
            raise NotAuthorised("only connected peers may use this")
        if not self._replay.add(signed.nonce, signed.ts):
            raise NotAuthorised("this signed request was already used")
        return signed

    # --- sending --------------------------------------------------------------------------

    def broadcast(self, kind: str, *, exclude: Collection[bytes] = (), **fields: Any) -> None:
        """One frame to every linked peer but those whose keys are in ``exclude``."""
        peers = [peer for key, peer in self.peers.items() if key not in exclude]
        if not peers:
            return
        frame = messages.encode(kind, **fields)
        for peer in peers:
            peer.send(frame, bulk=kind in BULK)

    def send(self, peer: Peer, kind: str, **fields: Any) -> None:
        peer.send(messages.encode(kind, **fields), bulk=kind in BULK)

    # --- links ----------------------------------------------------------------------------

    async def _dial_forever(self, key: bytes, address: str) -> None:
        backoff = BACKOFF_MIN
        url = f"http://{address}/p2p"
        while not self._stopping:
            if key in self.peers:
                await asyncio.sleep(BACKOFF_MAX * random.uniform(0.5, 1.0))
                continue
            try:
                ws = await self.session.ws_connect(
                    url, max_msg_size=self.config.max_message_bytes, heartbeat=HEARTBEAT
                )
            except (aiohttp.ClientError, OSError, TimeoutError):
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(BACKOFF_MAX, backoff * 2)
                continue
            linked = time.monotonic()
            await self._run_link(ws, expected=key, dialer=True)
            if time.monotonic() - linked >= SHORT_LINK_S:
                backoff = BACKOFF_MIN
            elif not self._stopping:
                relink = min(backoff, RELINK_MAX)
                await asyncio.sleep(relink * random.uniform(0.5, 1.0))
                backoff = min(RELINK_MAX, relink * 2)

    async def _accept(self, request: web.Request) -> web.StreamResponse:
        if self._stopping:
            return web.Response(status=503, text="node is stopping")
        ws = web.WebSocketResponse(max_msg_size=self.config.max_message_bytes, heartbeat=HEARTBEAT)
        await ws.prepare(request)
        self._inbound.add(ws)
        try:
            await self._run_link(ws, expected=None, dialer=False)
        finally:
            self._inbound.discard(ws)
        return ws

    async def _run_link(self, ws: Any, *, expected: bytes | None, dialer: bool) -> None:
        remote = "?"
        _cap_buffers(ws)
        try:
            peer = await self._handshake(ws, expected, dialer)
            remote = peer.short
        except PeerError as err:
            log_refusal = log.debug if "duplicate link" in str(err) else log.warning
            log_refusal("refused a peer link (%s)", err)
            await ws.close(
                code=aiohttp.WSCloseCode.POLICY_VIOLATION, message=str(err)[:100].encode()
            )
            return
        except (TimeoutError, ConnectionError, aiohttp.ClientError) as err:
            log.info("peer handshake failed: %s", err or type(err).__name__)
            await ws.close()
            return
        try:
            await self._read(peer, ws)
        except PeerError as err:
            log.warning("disconnecting peer %s: %s", remote, err)
        finally:
            peer.close()
            if self.peers.get(peer.key) is peer:
                del self.peers[peer.key]
                log.info("peer %s disconnected", remote)
            for callback in self.on_disconnect:
                callback(peer)

    async def _receive(self, ws: Any) -> tuple[str, dict[str, Any]]:
        message = await asyncio.wait_for(ws.receive(), HANDSHAKE_TIMEOUT)
        if message.type != aiohttp.WSMsgType.BINARY:
            raise PeerError(
                f"expected a binary frame during the handshake, got {message.type.name}"
            )
        return messages.decode(message.data, self.config.max_message_bytes)

    async def _handshake(self, ws: Any, expected: bytes | None, dialer: bool) -> Peer:
        nonce = secrets.token_bytes(32)
        chain = self.genesis.chain_id
        await ws.send_bytes(
            messages.encode(
                "hello",
                chain=chain,
                genesis=self.genesis_hash,
                node=self.me,
                nonce=nonce,
                height=self.height(),
                version=messages.PROTOCOL_VERSION,
                listen=self.listen_address,
            )
        )
        kind, hello = await self._receive(ws)
        if kind != "hello":
            raise PeerError(f"expected hello, got {kind}")
        if hello["chain"] != chain:
            raise PeerError(f"peer is on chain '{hello['chain']}', we are on '{chain}'")
        if hello["genesis"] != self.genesis_hash:
            raise PeerError("peer's genesis differs from ours")
        if hello["version"] != messages.PROTOCOL_VERSION:
            raise PeerError(f"peer speaks protocol version {hello['version']}")
        them = hello["node"]
        if them == self.me:
            raise PeerError("connected to ourselves")
        if not _LISTEN.match(hello["listen"]):
            raise PeerError("hello 'listen' must be a plain host:port")
        if expected is not None and them != expected:
            raise PeerError(f"expected node {expected.hex()[:12]}, peer is {them.hex()[:12]}")
        sig = self.identity.sign(
            b"", messages.auth_bytes(chain, self.genesis_hash, self.me, them, hello["nonce"])
        )
        await ws.send_bytes(messages.encode("auth", sig=sig))
        kind, auth = await self._receive(ws)
        if kind != "auth":
            raise PeerError(f"expected auth, got {kind}")
        if not crypto.verify(
            them,
            b"",
            messages.auth_bytes(chain, self.genesis_hash, them, self.me, nonce),
            auth["sig"],
        ):
            raise PeerError(
                f"peer {them.hex()[:12]} failed to prove its key (bad handshake signature)"
            )
        # Only validators and the peers this node's operator listed may link: a link reads
        # blobs and relays transactions, so it is not for anyone holding the genesis file.
        if not (self.allowed(them) or them in self.configured_keys):
            raise PeerError(f"node {them.hex()[:12]} is neither a validator nor a configured peer")
        if them not in self.peers and len(self.peers) >= MAX_PEERS:
            raise PeerError(f"this node already has {MAX_PEERS} peers")
        peer = Peer(them, hello["listen"], ws, self.me if dialer else them)
        peer.height = hello["height"]
        existing = self.peers.get(them)
        if existing is not None and not existing.closed:
            # Keep the link dialed by the smaller key, so both ends make the same choice; a
            # redial by the same dialer replaces its old link (which it knows is dead).
            if peer.dialer_key > existing.dialer_key:
                raise PeerError("duplicate link to a connected peer")
            existing.close()
        self.peers[them] = peer
        peer.start_writer()
        log.info("peer %s connected (%s)", peer.short, "outbound" if dialer else "inbound")
        for callback in self.on_connect:
            callback(peer)
        return peer

    async def _read(self, peer: Peer, ws: Any) -> None:
        limiter = RateLimiter(self.config.rate_per_s, burst=self.config.rate_per_s * 2)
        async for message in ws:
            if message.type != aiohttp.WSMsgType.BINARY:
                if message.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE):
                    return
                raise PeerError(f"unexpected {message.type.name} frame")
            if not limiter.allow("peer"):
                raise PeerError("message rate limit exceeded")
            kind, fields = messages.decode(message.data, self.config.max_message_bytes)
            handler = self.handlers.get(kind)
            if handler is None:
                raise PeerError(f"unexpected '{kind}' after the handshake")
            try:
                result = handler(peer, fields)
                if result is not None:
                    await result
            except PeerError:
                raise
            except EhrError as err:
                raise PeerError(f"invalid '{kind}': {err}") from err


def _cap_buffers(ws: Any) -> None:
    """Cap a link's kernel buffers (``LINK_BUFFER_BYTES``): left to autotuning, a loopback
    receive buffer grows to tens of megabytes, and a vote sent after them waits for them."""
    sock = ws.get_extra_info("socket")
    if sock is None:
        return
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, LINK_BUFFER_BYTES)
        except OSError as err:  # not a TCP socket here; the link works as before
            log.debug("could not cap a peer link's socket buffer: %s", err)
