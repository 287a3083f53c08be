"""Block sync: a node that is behind fetches blocks with their certificates from a peer that
is ahead, checks them and commits them, then goes on with consensus.

Peers tell each other their head (``status``) when a link opens and after every commit.
While some peer is ahead, one task asks one such peer for blocks (``get_blocks`` /
``blocks``), and for the next ones before it applies a batch: 2 blocks first, so that the
node starts applying at once, then twice as many each time, up to 256. Each block
must be the next height, its certificate must be for that very block and carry more than
2/3 of the current validators' power, and then it must apply to our state
(``Driver.apply_certified``). A peer that sends a block or a certificate that does not
verify is disconnected; a peer that does not answer in time is skipped for another.
Before it applies an answer it awaits ``prepare`` (the node has its claim filter filled
there, ``Node._claims_filled``), once the next request is out. While a block is written,
the next one (the answer's next item, or after its last, the first of the next answer if
that has arrived) is decoded and executed on top of it (``Executor.execute_ahead``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ehrnode.consensus.driver import Committed, Driver
from ehrnode.core import codec, state
from ehrnode.core.block import Block, Certificate
from ehrnode.core.errors import EhrError, InvalidBlock, InvalidEncoding, PeerError
from ehrnode.p2p.switch import Peer, Switch
from ehrnode.store.chain import Chain

log = logging.getLogger(__name__)

BATCH = 256
FIRST_BATCH = 2  # doubled on every request of a catch-up, up to BATCH
# An answer stops at this size (or a peer frame's limit, less 1 MiB, if that is smaller).
# The node catching up holds the answer it applies and the next one arriving, each as
# the frame's buffer, its bytes and the blocks decoded out of it: with answers of up to
# 31 MiB its heap grew to 110 MB, against 63 MB with 8 MiB ones, and memory touched for
# the first time is slow to come by on a virtual machine (374 MB/s here, in huge pages).
# A few blocks still travel while the ones before them apply (three of the bench's 2.5 MB
# ones; a larger block goes alone, as the first item always does; benchmarks note 55).
ANSWER_BYTES = 8 * 1024 * 1024
RESPONSE_TIMEOUT = 15.0
LOG_BLOCKS = 16  # a catch-up this long is logged with its duration


@dataclass(frozen=True)
class _Request:
    peer: Peer
    first: int  # the height asked from
    future: asyncio.Future[list[Any]]


class BlockSync:
    def __init__(
        self,
        switch: Switch,
        chain: Chain,
        driver: Driver,
        max_message_bytes: int,
        *,
        prepare: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.switch = switch
        # Awaited before each answer is applied (the node finishes its claim filter there).
        self._prepare = prepare
        self.chain = chain
        self.driver = driver
        self.max_response_bytes = min(
            ANSWER_BYTES, max(1024 * 1024, max_message_bytes - 1024 * 1024)
        )
        self._task: asyncio.Task[None] | None = None
        self._pending: tuple[Peer, asyncio.Future[list[Any]]] | None = None
        # The first item of the next answer, decoded (and executed ahead) while the last
        # block of the answer before it was written: (the item as it came, decoded).
        self._carried: tuple[Any, tuple[Block, Certificate]] | None = None
        self.synced_blocks = 0
        switch.handlers["status"] = self._on_status
        switch.handlers["get_blocks"] = self._on_get_blocks
        switch.handlers["blocks"] = self._on_blocks
        switch.on_connect.append(self._greet)
        switch.on_disconnect.append(self._on_disconnect)
        switch.height = lambda: chain.head.height
        driver.listeners.append(self._on_commit)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # --- status ---------------------------------------------------------------------------

    def _greet(self, peer: Peer) -> None:
        head = self.chain.head
        self.switch.send(peer, "status", height=head.height, head=head.id)

    def _on_commit(self, committed: Committed) -> None:
        head = self.chain.head
        self.switch.broadcast("status", height=head.height, head=head.id)

    def _on_status(self, peer: Peer, fields: dict[str, Any]) -> None:
        peer.height = fields["height"]
        if peer.height > self.chain.head.height and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run(), name="block-sync")

    @property
    def syncing(self) -> bool:
        return self._task is not None and not self._task.done()

    def blocks_behind(self) -> int:
        """How far the highest linked peer's chain is ahead of ours (0 if none is)."""
        ours = self.chain.head.height
        return max((p.height - ours for p in self.switch.peers.values() if not p.closed), default=0)

    async def idle(self) -> None:
        """Return once no catch-up runs (at once if none does)."""
        while self._task is not None and not self._task.done():
            await asyncio.wait({self._task})

    # --- fetching -------------------------------------------------------------------------

    async def _run(self) -> None:
        # The request for the blocks after a batch goes out before that batch is applied,
        # so the answer (up to ``ANSWER_BYTES``, or one larger block) travels while this
        # node executes: one request in flight at a time. Only the first answer is waited
        # for with nothing to apply, so it asks for few blocks; each later one asks for
        # twice as many, and the server cuts it by size, so it is about the size of the
        # batch being applied and still arrives before that batch is in (a block applies
        # 5-10x slower than it travels).
        asked: _Request | None = None
        count = min(FIRST_BATCH, BATCH)
        started, first = time.perf_counter(), self.chain.head.height
        try:
            while True:
                ours = self.chain.head.height
                if asked is not None and asked.first != ours + 1:
                    await self._drain(asked)  # the batch before it did not apply in full
                    asked = None
                request = asked or self._ask(ours + 1, count)
                asked = None
                if request is None:
                    return
                if self._prepare is not None:
                    await self._prepare()  # while the request travels
                try:
                    items = await asyncio.wait_for(request.future, RESPONSE_TIMEOUT)
                except TimeoutError:
                    log.info("peer %s did not answer a block request in time", request.peer.short)
                    request.peer.height = ours  # try someone else until it reports again
                    continue
                if not items:
                    request.peer.height = ours
                    continue
                count = min(BATCH, count * 2)
                asked = self._ask(ours + 1 + len(items), count)
                try:
                    await self._apply(items, asked)
                except PeerError as err:
                    log.warning("disconnecting peer %s: %s", request.peer.short, err)
                    request.peer.close()
                except InvalidBlock as err:
                    log.error("block sync stopped: %s", err)
                    return
        finally:
            self._pending = self._carried = None
            last = self.chain.head.height
            if last - first >= LOG_BLOCKS:
                elapsed = time.perf_counter() - started
                log.info(
                    "block sync applied %d blocks (to height %d) in %.2f s",
                    last - first,
                    last,
                    elapsed,
                )

    def _ask(self, first: int, count: int) -> _Request | None:
        """Ask a peer that has block ``first`` for it and up to ``count`` - 1 after it."""
        ahead = [p for p in self.switch.peers.values() if p.height >= first and not p.closed]
        if not ahead:
            return None
        peer = random.choice(ahead)
        request = _Request(peer, first, asyncio.get_running_loop().create_future())
        self._pending = (peer, request.future)
        count = min(count, peer.height - first + 1)
        self.switch.send(peer, "get_blocks", **{"from": first, "count": count})
        return request

    async def _drain(self, request: _Request) -> None:
        """Let an answer no longer wanted arrive (or time out) before asking again, so that
        it cannot be taken for the answer to the next request (a closed link brings none)."""
        if request.peer.closed:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(request.future, RESPONSE_TIMEOUT)

    async def _apply(self, items: list[Any], following: _Request | None = None) -> None:
        """Check and commit each block of an answer in turn. While one is written, the next
        is decoded and executed on top of it (``Executor.execute_ahead``): the answer's
        next item, or after its last, the first of the ``following`` answer if that has
        arrived."""
        max_block = self.chain.genesis.params.max_block_bytes
        carried, self._carried = self._carried, None
        ahead: tuple[Block, Certificate] | None = None  # the next item, decoded already
        if carried is not None and items and carried[0] is items[0]:
            ahead = carried[1]
        for index, item in enumerate(items):
            block, cert = ahead or _decode_item(item, max_block)
            ahead = None
            expected = self.chain.head.height + 1
            height = block.header.height
            if height < expected:
                continue
            if height != expected:
                raise PeerError(f"sent block {height} when {expected} was next")
            if cert.block != block.id or cert.height != height:
                raise PeerError(f"sent a certificate that is not for block {height}")
            try:
                cert.verify(self.chain.genesis.chain_id, state.validators(self.chain.state))
            except InvalidBlock as err:
                raise PeerError(f"sent block {height} with a bad certificate: {err}") from err
            executed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            applying = asyncio.ensure_future(self.driver.apply_certified(block, cert, executed))
            malformed: PeerError | None = None
            try:
                await asyncio.wait((executed, applying), return_when=asyncio.FIRST_COMPLETED)
                # While this block is written (on a worker thread), decode the next and
                # execute it on top of this one's execution.
                last = index + 1 == len(items)
                following_item = _first_arrived(following) if last else items[index + 1]
                if following_item is not None:
                    try:
                        decoded = _decode_item(following_item, max_block)
                        self.driver.executor.execute_ahead(decoded[0], block)
                    except PeerError as err:
                        if not last:
                            malformed = err  # said once this block is in
                        # The next answer's: it is decoded again, and refused, in its turn.
                    else:
                        if last:
                            self._carried = (following_item, decoded)
                        else:
                            ahead = decoded
            except asyncio.CancelledError:
                applying.cancel()
                raise
            await applying
            self.synced_blocks += 1
            if malformed is not None:
                raise malformed

    def _on_blocks(self, peer: Peer, fields: dict[str, Any]) -> None:
        self._answer(peer, fields["items"])

    def _on_disconnect(self, peer: Peer) -> None:
        # A closed link brings no answer: the request is given up now, not after
        # RESPONSE_TIMEOUT, and the next one goes to a peer still linked.
        self._answer(peer, [])

    def _answer(self, peer: Peer, items: list[Any]) -> None:
        if self._pending is not None and self._pending[0] is peer and not self._pending[1].done():
            self._pending[1].set_result(items)

    # --- serving --------------------------------------------------------------------------

    def _on_get_blocks(self, peer: Peer, fields: dict[str, Any]) -> None:
        first = fields["from"]
        last = min(self.chain.head.height, first + fields["count"] - 1)
        items: list[list[bytes]] = []
        size = 0
        for height in range(first, last + 1):
            try:
                raw = self.chain.block_raw(height)
                cert = self.chain.certificate(height).encode()
            except EhrError:
                break
            if items and size + len(raw) + len(cert) > self.max_response_bytes:
                break
            items.append([raw, cert])
            size += len(raw) + len(cert)
        self.switch.send(peer, "blocks", items=items)


def _first_arrived(request: _Request | None) -> Any:
    """The first item of ``request``'s answer if it has arrived, else None."""
    if request is None or not request.future.done() or request.future.cancelled():
        return None
    items = request.future.result()
    return items[0] if items else None


def _decode_item(item: Any, max_block: int) -> tuple[Block, Certificate]:
    raw_block, raw_cert = item
    try:
        block = Block.decode(raw_block, max_bytes=max_block)
        return block, Certificate.from_wire(codec.decode(raw_cert))
    except (InvalidEncoding, InvalidBlock) as err:
        raise PeerError(f"sent a malformed block: {err}") from err
