"""Admission: how a transaction from a client or a peer gets into the mempool.

Order of checks, cheapest first: size, form and signature (``core.tx.decode``); already
committed or already pending; for a ``record`` (or ``records``), each ciphertext blob must
be held by this node with the declared size; then the state machine, on top of everything pending
(``Mempool.add``). A transaction that passes wakes consensus and goes to the peers.

Also keeps what a client asks about afterwards: recent rejections (bounded) and waiters for
"tell me when it is committed".
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ehrnode.blobs.store import BlobStore
from ehrnode.consensus.driver import Committed
from ehrnode.core import tx as txmod
from ehrnode.core.errors import Conflict, EhrError, InvalidTransaction
from ehrnode.core.tx import Tx
from ehrnode.mempool import RECHECK_MAX, Mempool
from ehrnode.store.chain import Chain, TxLocation

MAX_REMEMBERED_REJECTIONS = 10_000
# Transactions checked between two turns of the event loop when a batch or a peer's frame
# brings many: about 3 ms of signature checks.
YIELD_EVERY = 32


@dataclass(frozen=True)
class Rejection:
    code: str
    message: str


class Admission:
    def __init__(
        self,
        chain: Chain,
        mempool: Mempool,
        blobs: BlobStore,
        wake: Callable[[], None],
    ) -> None:
        self.chain = chain
        self.mempool = mempool
        self.blobs = blobs
        self.wake = wake
        self.relays: list[Callable[[list[Tx]], None]] = []
        self.rejected: OrderedDict[bytes, Rejection] = OrderedDict()
        self._waiters: dict[bytes, list[asyncio.Future[TxLocation]]] = {}

    def decode(self, raw: bytes, tx_id: bytes | None = None) -> Tx:
        return txmod.decode(raw, max_bytes=self.chain.genesis.params.max_tx_bytes, tx_id=tx_id)

    async def decode_batch(self, raws: list[bytes]) -> list[Tx | EhrError]:
        """Each of ``raws`` decoded and its signature checked, or why not; the event loop
        gets a turn every ``YIELD_EVERY`` transactions, so that consensus is not kept
        waiting behind a batch's signature checks (tens of milliseconds each)."""
        out: list[Tx | EhrError] = []
        for n, raw in enumerate(raws, 1):
            try:
                out.append(self.decode(raw))
            except EhrError as err:
                out.append(err)
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        return out

    async def admit_relayed(self, raws: list[bytes]) -> int:
        """Admit a peer's transactions in order, those not known here (see ``known``),
        giving the event loop a turn every ``YIELD_EVERY``; how many were not admitted
        (already pending, or raced with a commit: not the peer's fault). Compiled with the
        rest of admission: three quarters of a validator's transactions come this way."""
        rejected = 0
        for n, raw in enumerate(raws, 1):
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            tx_id = hashlib.sha256(raw).digest()
            if self.known(tx_id):
                continue  # a block brought it first: no second signature check
            try:
                self.submit(raw, relay=False, from_peer=True, tx_id=tx_id)
            except EhrError:
                rejected += 1
        return rejected

    def known(self, tx_id: bytes) -> bool:
        """Pending here or committed recently: what gossip skips before a signature check.
        Not a database read for every relayed transaction; one committed longer ago costs
        its signature check and then fails the nonce rule."""
        return tx_id in self.mempool or self.mempool.committed_recently(tx_id)

    def submit(
        self,
        raw: bytes,
        *,
        relay: bool = True,
        from_peer: bool = False,
        tx_id: bytes | None = None,
    ) -> Tx:
        """Check and admit one transaction; raise the reason it cannot be admitted
        (``tx_id``: the SHA-256 of ``raw``, when the caller has it)."""
        tx = self.decode(raw, tx_id)
        self.admit(tx, relay=relay, from_peer=from_peer)
        return tx

    def admit(self, tx: Tx, *, relay: bool = True, from_peer: bool = False) -> None:
        """``from_peer``: a peer already checked the blob; ours may still be on its way."""
        try:
            self._admit(tx, relay, from_peer)
        except EhrError as err:
            if not from_peer:
                self._remember(tx.id, err)
            raise

    def _admit(self, tx: Tx, relay: bool, from_peer: bool) -> None:
        if tx.chain != self.chain.genesis.chain_id:
            raise InvalidTransaction(
                f"transaction is for chain '{tx.chain}', this node serves "
                f"'{self.chain.genesis.chain_id}'",
                code="wrong_chain",
            )
        if from_peer:
            # Gossip asked ``known`` (pending, or among the recently committed) before the
            # signature check. An older committed transaction fails the nonce rule here, or,
            # behind a backlog whose pending nonces are not re-checked, is dropped by the
            # block builder: never committed twice.
            self.mempool.add_relayed(tx)
            self.wake()
            return
        if len(self.mempool) > RECHECK_MAX:
            # With a backlog this large the mempool lays its pending writes over a new block
            # without checking them again, and its nonces may not show what others got in.
            self._refuse_replay(tx)
        try:
            self._check_blobs(tx)
            admitted = self.mempool.add(tx)
        except EhrError:
            # Only a transaction that fails is looked for among the committed ones (its
            # nonce is spent, or its blob erased): a replay is named as such.
            self._refuse_replay(tx)
            raise
        self.rejected.pop(tx.id, None)
        for evicted, evicted_err in self.mempool.drain_evicted():
            self._remember(evicted.id, evicted_err)
        if admitted:
            self.wake()
            if relay:
                for send in self.relays:
                    send(admitted)

    def _refuse_replay(self, tx: Tx) -> None:
        if self.chain.tx_location(tx.id) is not None:
            raise Conflict("this transaction is already committed (a replay)", code="duplicate")

    def _check_blobs(self, tx: Tx) -> None:
        """Each ciphertext a record names is held here, with the size it declares."""
        for body in txmod.record_bodies(tx.kind, tx.body):
            size = self.blobs.size_of(body["blob"])
            if size is None:
                raise Conflict(
                    f"the ciphertext blob {body['blob'].hex()[:16]}… of a record is not "
                    "stored on this node; upload it first",
                    code="blob_missing",
                )
            if size != body["size"]:
                raise InvalidTransaction(
                    f"a record declares {body['size']} bytes but its blob "
                    f"{body['blob'].hex()[:16]}… holds {size}",
                    code="blob_size_mismatch",
                )

    def _remember(self, tx_id: bytes, err: EhrError) -> None:
        if err.code == "duplicate":
            return
        self.rejected[tx_id] = Rejection(err.code, err.message)
        while len(self.rejected) > MAX_REMEMBERED_REJECTIONS:
            self.rejected.popitem(last=False)
        for future in self._waiters.pop(tx_id, []):
            if not future.done():
                future.set_exception(InvalidTransaction(err.message, code=err.code))

    async def wait_committed(self, tx_id: bytes, timeout: float) -> TxLocation | None:
        """The location once committed, or None when ``timeout`` passes first."""
        location = self.chain.tx_location(tx_id)
        if location is not None:
            return location
        rejection = self.rejected.get(tx_id)
        if rejection is not None:
            raise InvalidTransaction(rejection.message, code=rejection.code)
        future: asyncio.Future[TxLocation] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(tx_id, []).append(future)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            return None
        finally:
            waiters = self._waiters.get(tx_id)
            if waiters is not None and future in waiters:
                waiters.remove(future)
                if not waiters:
                    del self._waiters[tx_id]

    def on_commit(self, committed: Committed) -> None:
        height = committed.block.header.height
        for index, tx_id in enumerate(committed.block.tx_ids):
            for future in self._waiters.pop(tx_id, []):
                if not future.done():
                    future.set_result(TxLocation(height, index))
        for tx, err in committed.dropped:
            self._remember(tx.id, err)
