"""Relaying a large upload to the replicas while it is still arriving.

Without this, a replica starts copying an attachment only once the receiving node holds
all of it: for a 1 GiB scan the upload and the copies take turns. With it, the blob flows
down a chain while it arrives: the receiving node tees each piece to the first of its
peers (``POST /p2p/blobs/relay``, signed with its node key, served to connected peers
only), naming the rest of the chain in an ``Ehr-Relay-Route`` header (public ids, comma
separated); that peer stores the stream exactly as an upload while teeing it to the next,
and so on. Each node sends one copy and receives one, so no node carries the fan-out, and
each announces the blob when it is whole. A peer that falls behind slows the upload down
(each hop holds at most a few pieces); if a hop fails, the nodes after it pull the blob
later like any missing one. If the upload itself fails, the relays are cut off and the
peers discard what they received.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from ehrnode.blobs.store import INLINE_MAX, BlobStore
from ehrnode.core import request
from ehrnode.core.errors import EhrError
from ehrnode.p2p.switch import Peer, Switch

log = logging.getLogger(__name__)

PIECES_IN_FLIGHT = 8
RELAY_PATH = "/p2p/blobs/relay"
ROUTE_HEADER = "Ehr-Relay-Route"


def now_ms() -> int:
    return int(time.time() * 1000)


class _Leg:
    """The next peer's copy of a relayed upload, and the chain after it."""

    def __init__(self, relay: BlobRelay, peer: Peer, rest: list[Peer]) -> None:
        self.peer = peer
        self.rest = rest
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(PIECES_IN_FLIGHT)
        self.failed = False
        self.task = asyncio.get_running_loop().create_task(relay.send(self))

    async def pieces(self) -> AsyncIterator[bytes]:
        while True:
            piece = await self.queue.get()
            if piece is None:
                return
            yield piece


class BlobRelay:
    def __init__(self, switch: Switch, blobs: BlobStore, stored: Any, replicate: bool) -> None:
        self.switch = switch
        self.blobs = blobs
        self.stored = stored  # Replication.stored: announce what we now hold
        self.replicate = replicate
        self._legs: set[asyncio.Task[None]] = set()
        self._receiving = 0
        self._idle = asyncio.Event()
        self._idle.set()
        switch.routes.append(web.post(RELAY_PATH, self._receive))

    async def settled(self, timeout: float = 60.0) -> None:
        """Wait until no relayed blob is arriving here (a replica about to fetch a blob
        first lets a relay of it finish, rather than download it twice)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)

    def _track(self, task: asyncio.Task[None]) -> None:
        self._legs.add(task)
        task.add_done_callback(self._legs.discard)

    # --- the receiving node's side ----------------------------------------------------------

    async def tee(
        self,
        chunks: AsyncIterator[bytes],
        declared_size: int | None,
        route: list[Peer] | None = None,
    ) -> AsyncIterator[bytes]:
        """``chunks`` unchanged, copied as they pass down ``route`` (default: every
        connected peer, in key order)."""
        if route is None:
            route = (
                sorted(self.switch.peers.values(), key=lambda p: p.key) if self.replicate else []
            )
        if not route or (declared_size is not None and declared_size <= INLINE_MAX):
            async for chunk in chunks:
                yield chunk
            return
        legs = [_Leg(self, route[0], route[1:])]
        for leg in legs:
            self._track(leg.task)
        finished = False
        try:
            async for chunk in chunks:
                for leg in legs:
                    if not leg.failed:
                        await leg.queue.put(chunk)
                yield chunk
            finished = True
        finally:
            for leg in legs:
                if finished and not leg.failed:
                    await leg.queue.put(None)
                else:
                    leg.task.cancel()  # cut the peer's request: it discards the partial blob

    async def send(self, leg: _Leg) -> None:
        auth = request.authorization(
            self.switch.identity, self.switch.genesis.chain_id, "POST", RELAY_PATH, now_ms()
        )
        url = f"http://{leg.peer.address}{RELAY_PATH}"
        headers = {"Authorization": auth, ROUTE_HEADER: ",".join(p.key.hex() for p in leg.rest)}
        try:
            async with self.switch.session.post(
                url, data=leg.pieces(), headers=headers
            ) as response:
                if response.status != 201:
                    raise aiohttp.ClientError(f"status {response.status}")
        except (aiohttp.ClientError, OSError, TimeoutError) as err:
            log.info("relaying a blob to %s failed (it will pull it): %s", leg.peer.short, err)
        except Exception:
            log.exception("relaying a blob to %s failed", leg.peer.short)
        finally:
            leg.failed = True
            while not leg.queue.empty():  # unblock the upload if it waits on this leg
                leg.queue.get_nowait()

    def _route(self, header: str) -> list[Peer]:
        """The rest of the chain, as far as we are connected to it (at most the peers we
        have: a route cannot make us send more copies than that)."""
        route: list[Peer] = []
        for text in header.split(",")[: len(self.switch.peers)]:
            try:
                key = bytes.fromhex(text.strip())
            except ValueError:
                continue
            peer = self.switch.peers.get(key)
            if peer is not None and peer not in route and key != self.switch.me:
                route.append(peer)
        return route

    # --- a peer's side --------------------------------------------------------------------

    async def _receive(self, req: web.Request) -> web.Response:
        self._receiving += 1
        self._idle.clear()
        try:
            return await self._receive_one(req)
        finally:
            self._receiving -= 1
            if not self._receiving:
                self._idle.set()

    async def _receive_one(self, req: web.Request) -> web.Response:
        try:
            self.switch.authenticate(req)
            route = self._route(req.headers.get(ROUTE_HEADER, ""))
            chunks = self.tee(req.content.iter_chunked(256 * 1024), None, route)
            info = await self.blobs.put_stream(chunks)
        except EhrError as err:
            return web.json_response(
                {"error": {"code": err.code, "message": err.message}}, status=err.http_status
            )
        except (ConnectionError, aiohttp.ClientPayloadError):
            return web.json_response({"error": {"code": "aborted"}}, status=400)
        with contextlib.suppress(RuntimeError):
            self.stored([info.hash])
        return web.json_response({"hash": info.hash.hex(), "size": info.size}, status=201)
