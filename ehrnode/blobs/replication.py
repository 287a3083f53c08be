"""Blob replication: every validator keeps a full replica of every record's ciphertext, and a
write is acknowledged only once a write quorum of nodes hold it.

- A node that receives small blobs from a client pushes their bytes to its peers at once
  (``blob_data``, many per frame); peers check and store them in one batch.
- A node that stores a blob announces it (``blob_have``). Peers that lack it fetch it from
  the announcer over HTTP (``GET /p2p/blobs/{hash}``, signed with the fetcher's node key,
  served only to connected peers), check its hash while streaming it to disk, and announce
  it in turn. So each node learns who holds what (``holders``).
- ``wait_quorum`` lets the RPC hold a client's write until ``quorum`` nodes (ourselves
  included) hold the blob: default f+1, so losing any f nodes loses no acknowledged record.
- A committed record whose blob this node lacks (it was down, or the writer's node is
  slow) is put on the missing list (table ``b"Q" + hash``, so it survives restarts) and
  asked for (``blob_want``) until some peer delivers it.
- While block sync catches the node up, the blobs of what it commits are looked for
  once the catch-up is over (``blobs.sweep``).
- Erased blobs are tombstoned by the blob store and never fetched or accepted again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
from aiohttp import web

from ehrnode.blobs.http import blob_response
from ehrnode.blobs.relay import BlobRelay
from ehrnode.blobs.store import INLINE_MAX, BlobStore, parse_hash
from ehrnode.blobs.sweep import RECORD_KINDS, Sweep
from ehrnode.consensus.driver import Committed
from ehrnode.core import crypto, request, tx as txmod
from ehrnode.core.errors import EhrError, InvalidEncoding, LimitExceeded, NotAuthorised, NotFound
from ehrnode.p2p.switch import Peer, Switch
from ehrnode.store.chain import Chain
from ehrnode.store.db import KV

log = logging.getLogger(__name__)

T_MISSING = b"Q"
MAX_TRACKED = 200_000
FETCH_CONCURRENCY = 4
PUSH_FRAME_BYTES = 4 * 1024 * 1024
ASK_AGAIN_S = 2.0
MAX_QUEUED_FETCHES = 10_000
RETRY_MISSING_S = 5.0


def now_ms() -> int:
    return int(time.time() * 1000)


class Replication:
    def __init__(
        self,
        switch: Switch,
        blobs: BlobStore,
        kv: KV,
        *,
        quorum: Callable[[], int],
        replicate: bool,
    ) -> None:
        self.switch = switch
        self.blobs = blobs
        self.kv = kv
        self._quorum = quorum
        self.is_validator: Callable[[bytes], bool] = lambda key: True
        self.replicate = replicate
        self.me = switch.me
        self.holders: OrderedDict[bytes, set[bytes]] = OrderedDict()
        self.missing: set[bytes] = {k[len(T_MISSING) :] for k, _ in kv.scan(T_MISSING)}
        self._waiters: dict[bytes, list[asyncio.Event]] = {}
        self._fetching: set[bytes] = set()
        self._fetch_queue: asyncio.Queue[tuple[Peer, bytes]] = asyncio.Queue()
        self._asked_at = 0.0
        self._announce: list[bytes] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._retry: asyncio.Task[None] | None = None
        switch.handlers["blob_have"] = self._on_have
        switch.handlers["blob_want"] = self._on_want
        switch.handlers["blob_data"] = self._on_data
        self._incoming: set[bytes] = set()
        self.relay: BlobRelay | None = None
        # While block sync catches up, committed records are looked at after (above); the
        # node sets its ``catch_up``.
        self.sweep = Sweep(kv, self._note_missing, self._ask_for_missing)
        switch.routes.append(web.get("/p2p/blobs/{hash}", self._serve))
        switch.on_connect.append(self._on_connect)

    def recover(self, chain: Chain, last_blocks: int = 2) -> int:
        """At start: the missing list is written just after a commit, before the next block
        starts, so a crash in between can lose entries of the last block; look at its
        records again (two blocks for margin). A sweep left unfinished resumes in
        ``start``."""
        self.sweep.chain = chain
        found: list[bytes] = []
        for stored in chain.recent_txs(RECORD_KINDS, last_blocks):
            blobs = txmod.blobs_of(stored["kind"], stored["body"])
            found.extend(b for b in blobs if b not in self.missing and self._lacks(b))
        if found:
            self.missing.update(found)
            self.kv.write({T_MISSING + b: b"" for b in found}, sync=True)
        return len(found)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._retry = loop.create_task(self._retry_missing())
        for _ in range(FETCH_CONCURRENCY):
            task = loop.create_task(self._fetch_worker())
            self._tasks.add(task)
        self.sweep.start()

    async def stop(self) -> None:
        tasks = [*self._tasks, *([self._retry] if self._retry else [])]
        await self.sweep.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def quorum(self) -> int:
        """Nodes that must hold a blob before a record using it is accepted (it follows
        validator-set changes)."""
        return self._quorum()

    # --- who holds what ---------------------------------------------------------------------

    def _holders(self, blob: bytes) -> set[bytes]:
        holders = self.holders.get(blob)
        if holders is None:
            holders = self.holders[blob] = set()
            while len(self.holders) > MAX_TRACKED:
                self.holders.popitem(last=False)
        return holders

    def replicas(self, blob: bytes) -> list[bytes]:
        """The nodes known to hold ``blob`` that count for the write quorum: this node and
        current validators (a configured full node's copy is welcome but not counted)."""
        validators = self.is_validator
        found = {key for key in self.holders.get(blob, ()) if validators(key)}
        if self.blobs.has(blob):
            found.add(self.me)
        return sorted(found)

    def count(self, blob: bytes) -> int:
        """``len(self.replicas(blob))``, without building the list: asked for every blob of
        every upload and submission, and again each time news of the batch arrives."""
        validators = self.is_validator
        held = self.blobs.has(blob)
        n = int(held)
        for key in self.holders.get(blob, ()):
            if (not held or key != self.me) and validators(key):
                n += 1
        return n

    async def wait_quorum(self, blobs: list[bytes], timeout: float) -> list[int]:
        """Wait until ``quorum`` nodes hold each of ``blobs`` (or ``timeout``); return how
        many hold each. One waiter for the whole batch, woken by news of any of its blobs
        (a task per blob cost a batch upload's node a tenth of its CPU)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        short = self._short(set(blobs))
        if short:
            event = asyncio.Event()
            waited = short
            for blob in waited:
                self._waiters.setdefault(blob, []).append(event)
            try:
                while short and (remaining := deadline - loop.time()) > 0:
                    try:
                        await asyncio.wait_for(event.wait(), remaining)
                    except TimeoutError:
                        break
                    event.clear()
                    short = self._short(short)
            finally:
                for blob in waited:
                    waiters = self._waiters.get(blob)
                    if waiters is not None and event in waiters:
                        waiters.remove(event)
                        if not waiters:
                            del self._waiters[blob]
        return [self.count(blob) for blob in blobs]

    def _short(self, blobs: Iterable[bytes]) -> list[bytes]:
        quorum, count = self.quorum, self.count
        return [blob for blob in blobs if count(blob) < quorum]

    def _wake(self, blob: bytes) -> None:
        for event in self._waiters.get(blob, ()):
            event.set()

    # --- announcing -------------------------------------------------------------------------

    def stored(self, hashes: list[bytes]) -> None:
        """We now hold these blobs: tell the peers (batched per event-loop turn)."""
        found: dict[bytes, bytes | None] = {}
        for blob in hashes:
            self._wake(blob)
            if blob in self.missing:
                self.missing.discard(blob)
                found[T_MISSING + blob] = None
        if found:
            self.kv.write(found, sync=False)
        if not self._announce:
            asyncio.get_running_loop().call_soon(self._flush)
        self._announce.extend(hashes)

    def push(self, blobs: list[bytes]) -> None:
        """Send small blobs' bytes to every peer (replicas store them without a fetch)."""
        if not self.replicate or not self.switch.peers:
            return
        frame: list[bytes] = []
        size = 0
        for blob in blobs:
            if len(blob) > INLINE_MAX:
                continue
            if frame and size + len(blob) > PUSH_FRAME_BYTES:
                self.switch.broadcast("blob_data", blobs=frame)
                frame, size = [], 0
            frame.append(blob)
            size += len(blob)
        if frame:
            self.switch.broadcast("blob_data", blobs=frame)

    def _on_data(self, peer: Peer, fields: dict[str, Any]) -> None:
        """Store pushed blobs. Those held or erased already are left out by the store,
        under its lock: checking here first cost a LevelDB look-up per blob, a miss for
        every new one (and the store checks again all the same)."""
        wanted = []
        incoming = []
        for data in fields["blobs"]:
            blob = crypto.sha256(data)
            self._holders(blob).add(peer.key)
            if blob not in self._incoming:
                wanted.append(data)
                incoming.append(blob)
                self._incoming.add(blob)
        if wanted:
            task = asyncio.get_running_loop().create_task(self._store_pushed(wanted, incoming))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _store_pushed(self, blobs: list[bytes], incoming: list[bytes]) -> None:
        try:
            hashes = await self.kv.run(self.blobs.put_pushed, blobs, incoming)
            was_missing = any(h in self.missing for h in hashes)
            self.stored(hashes)
            if was_missing:
                self._ask_for_missing()  # the answer to our last want came: the next batch
        except EhrError as err:
            log.info("could not store pushed blobs: %s", err)
        finally:
            self._incoming.difference_update(incoming)

    def _flush(self) -> None:
        batch, self._announce = self._announce, []
        for start in range(0, len(batch), 4096):
            self.switch.broadcast("blob_have", hashes=batch[start : start + 4096])

    def _on_connect(self, peer: Peer) -> None:
        wanted = self._wanted()
        if wanted:
            self.switch.send(peer, "blob_want", hashes=wanted)
            self._asked_at = time.monotonic()

    def _ask_for_missing(self) -> None:
        """Ask one peer (a different one each time, at random) for missing blobs; it sends
        the small ones' bytes and announces the large ones. Asked again as soon as its
        answer is stored, so a node back from downtime catches up batch after batch."""
        peers = list(self.switch.peers.values())
        wanted = self._wanted() if peers else []
        if not wanted:
            return
        self.switch.send(random.choice(peers), "blob_want", hashes=wanted)
        self._asked_at = time.monotonic()

    def _wanted(self) -> list[bytes]:
        """The next missing blobs to ask for (at most 4096). One whose record was erased
        since will never come (it is refused if it does): it leaves the list instead."""
        wanted = list(itertools.islice(self.missing, 4096))  # sorting 100,000 took 50 ms
        gone = {blob for blob in wanted if self.erased(blob)}
        if gone:
            self.missing.difference_update(gone)
            self.kv.write({T_MISSING + blob: None for blob in gone}, sync=False)
            wanted = [blob for blob in wanted if blob not in gone]
        return wanted

    def on_commit(self, committed: Committed) -> None:
        """A committed record whose blob we lack goes on the missing list; during a long
        catch-up, once it is over (``Sweep``)."""
        if self.sweep.covers(committed.block.header.height):
            return
        self._note_missing(
            [blob for tx in committed.txs for blob in txmod.blobs_of(tx.kind, tx.body)], {}
        )

    def _note_missing(self, blobs: list[bytes], changes: dict[bytes, bytes | None]) -> None:
        """Put the ``blobs`` we lack on the missing list, written with ``changes``."""
        new = [
            blob
            for blob in blobs
            if blob not in self.missing and blob not in self._incoming and self._lacks(blob)
        ]
        self.missing.update(new)
        changes.update((T_MISSING + b, b"") for b in new)
        if changes:
            self.kv.write(changes, sync=False)
        if new and time.monotonic() - self._asked_at > ASK_AGAIN_S:
            self._ask_for_missing()

    def erased(self, blob: bytes) -> bool:
        return self.blobs.erased(blob)

    def _lacks(self, blob: bytes) -> bool:
        """Neither held here nor erased (so it should be fetched)."""
        return not self.blobs.has(blob) and not self.erased(blob)

    # --- peers' messages --------------------------------------------------------------------

    def _on_have(self, peer: Peer, fields: dict[str, Any]) -> None:
        for blob in fields["hashes"]:
            self._holders(blob).add(peer.key)
            self._wake(blob)
            wanted = blob in self.missing or self.replicate
            if wanted and blob not in self._incoming and self._lacks(blob):
                self._schedule_fetch(peer, blob)

    def _on_want(self, peer: Peer, fields: dict[str, Any]) -> None:
        """Send the small blobs asked for (their bytes) and announce the large ones."""
        small: list[bytes] = []
        large: list[bytes] = []
        size = 0
        for blob in fields["hashes"]:
            info = self.blobs.info(blob)
            if info is None:
                continue
            if not info.inline:
                large.append(blob)
                continue
            try:
                data = self.blobs.read_small(blob)
            except EhrError:
                continue  # our copy is unreadable (logged): another peer will serve it
            if small and size + len(data) > PUSH_FRAME_BYTES:
                self.switch.send(peer, "blob_data", blobs=small)
                small, size = [], 0
            small.append(data)
            size += len(data)
        if small:
            self.switch.send(peer, "blob_data", blobs=small)
        if large:
            self.switch.send(peer, "blob_have", hashes=large)

    async def _retry_missing(self) -> None:
        while True:
            await asyncio.sleep(RETRY_MISSING_S)
            if time.monotonic() - self._asked_at > ASK_AGAIN_S:
                self._ask_for_missing()

    # --- fetching and serving ---------------------------------------------------------------

    def _schedule_fetch(self, peer: Peer, blob: bytes) -> None:
        """Queue a pull of a large blob (a few workers pull them; memory stays bounded)."""
        if blob in self._fetching or len(self._fetching) >= MAX_QUEUED_FETCHES:
            return  # a blob left out now is asked for again while it is missing
        self._fetching.add(blob)
        self._fetch_queue.put_nowait((peer, blob))

    async def _fetch_worker(self) -> None:
        while True:
            peer, blob = await self._fetch_queue.get()
            await self._fetch(peer, blob)

    async def _fetch(self, peer: Peer, blob: bytes) -> None:
        try:
            if self.relay is not None:
                await self.relay.settled()  # it may be arriving already, relayed
            if self.blobs.has(blob) or self.erased(blob):
                return
            path = f"/p2p/blobs/{blob.hex()}"
            auth = request.authorization(
                self.switch.identity, self.switch.genesis.chain_id, "GET", path, now_ms()
            )
            url = f"http://{peer.address}{path}"
            async with self.switch.session.get(url, headers={"Authorization": auth}) as resp:
                if resp.status != 200:
                    log.debug(
                        "peer %s could not serve blob %s (%d)",
                        peer.short,
                        blob.hex()[:12],
                        resp.status,
                    )
                    return
                await self.blobs.put_stream(resp.content.iter_chunked(256 * 1024), expected=blob)
            self.stored([blob])
        except (aiohttp.ClientError, OSError, TimeoutError) as err:
            log.info("fetching blob %s from %s failed: %s", blob.hex()[:12], peer.short, err)
        except EhrError as err:
            log.warning("peer %s sent a bad blob %s: %s", peer.short, blob.hex()[:12], err)
        finally:
            self._fetching.discard(blob)

    async def _serve(self, req: web.Request) -> web.StreamResponse:
        try:
            self.switch.authenticate(req)
            blob = parse_hash(req.match_info["hash"])
            info = self.blobs.info(blob)
            if info is None:
                raise NotFound("this node does not hold that blob")
        except (NotAuthorised, NotFound, InvalidEncoding, LimitExceeded) as err:
            return web.json_response(
                {"error": {"code": err.code, "message": err.message}}, status=err.http_status
            )
        return blob_response(self.blobs, blob, {})


def default_quorum(validators: int) -> int:
    """f + 1 for n = 3f + 1 (+ spares): enough copies that losing any f nodes loses none."""
    return (validators - 1) // 3 + 1
