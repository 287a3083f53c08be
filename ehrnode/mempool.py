"""Pending transactions: checked against the committed state plus everything pending before
them, kept in arrival order, limited in count and bytes.

- A transaction enters only if it applies on top of the committed state and every pending
  transaction ahead of it (so a patient's ``register`` and ``grant`` can be pending together).
- Nonces: a transaction whose nonce is ahead of its signer's next one waits in a small
  per-signer parking area until the gap fills; it is not checked or counted before that.
- After each block ``update`` drops what was committed and re-checks the rest against the
  new state; what no longer applies is dropped and reported.
- Reads of the committed state are cached until the next block (``update`` starts a new
  overlay): a patient's account and standing grants are read for each of their records.
- The ids of the transactions committed most recently (at least ``RECENTLY_COMMITTED``,
  at most about twice as many) are kept, so that gossip can tell a transaction a block
  brought first without a database read.

No I/O: the committed state, the block context and the clock are passed in.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ehrnode.core import state
from ehrnode.core.errors import Conflict, InvalidTransaction, LimitExceeded
from ehrnode.core.tx import Tx

MAX_PARKED_PER_SIGNER = 64
MAX_NONCE_AHEAD = 256
RECHECK_MAX = 2000
# Ids kept at least (up to about twice as many, 10-20 MB): many blocks' worth at any rate.
RECENTLY_COMMITTED = 65_536
# Reads cached between two blocks: account look-ups over the RPC go through this overlay
# too, and an idle chain makes no blocks, so the cache is bounded (about 20 MB).
MAX_CACHED_READS = 100_000
MAX_AHEAD_UNREGISTERED = 4
MAX_PARKED_UNREGISTERED = 1000


@dataclass(frozen=True)
class Limits:
    max_txs: int = 100_000
    max_bytes: int = 256 * 1024 * 1024
    max_parked: int = 10_000


class Mempool:
    def __init__(
        self,
        reader: state.StateReader,
        context: Callable[[], state.BlockContext],
        limits: Limits | None = None,
    ) -> None:
        self._reader = reader
        self._context = context
        self.limits = limits or Limits()
        self._txs: dict[bytes, Tx] = {}
        self._bytes = 0
        self._overlay = self._new_overlay()
        # The ids committed since the last turn-over, and those before it (``update``).
        self._recent: set[bytes] = set()
        self._older: set[bytes] = set()
        # The writes of each pending transaction this node checked (a relayed one has none
        # here), in arrival order: what is laid over the state after each block.
        self._changes: dict[bytes, dict[bytes, bytes | None]] = {}
        self._relayed: set[bytes] = set()  # admitted from peers without a state check
        self._nonces: set[tuple[bytes, int]] = set()  # (signer, nonce) of every pending tx
        self._parked: dict[bytes, dict[int, Tx]] = {}
        self._parked_ids: dict[bytes, Tx] = {}
        self._evicted: list[tuple[Tx, InvalidTransaction]] = []
        self._parked_count = 0

    def __len__(self) -> int:
        return len(self._txs)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def _new_overlay(self) -> state.Overlay:
        # Valid until the committed state changes, after which ``update`` makes a new one.
        return state.Overlay(self._reader, cache_reads=True, max_reads=MAX_CACHED_READS)

    def committed_recently(self, tx_id: bytes) -> bool:
        """Among the transactions committed most recently: True for each of the last
        ``RECENTLY_COMMITTED`` (and perhaps for as many before them); False says nothing
        about older ones."""
        return tx_id in self._recent or tx_id in self._older

    def __contains__(self, tx_id: object) -> bool:
        return tx_id in self._txs or tx_id in self._parked_ids

    def waiting(self, tx_id: bytes) -> Tx | None:
        """A transaction parked until its signer's earlier nonces arrive."""
        return self._parked_ids.get(tx_id)

    def drain_evicted(self) -> list[tuple[Tx, InvalidTransaction]]:
        """Parked transactions that failed when their turn came (to report to senders)."""
        evicted, self._evicted = self._evicted, []
        return evicted

    @property
    def check_state(self) -> state.StateReader:
        """The committed state with every pending transaction applied."""
        return self._overlay

    def get(self, tx_id: bytes) -> Tx | None:
        return self._txs.get(tx_id)

    def add(self, tx: Tx) -> list[Tx]:
        """Admit ``tx`` (or park it if its nonce is ahead); return what was admitted.

        Raises InvalidTransaction if it does not apply, Conflict if it is already pending,
        LimitExceeded if the pool is full.
        """
        if tx.id in self._txs:
            raise Conflict("this transaction is already pending", code="duplicate")
        if len(self._txs) >= self.limits.max_txs or self._bytes + tx.size > self.limits.max_bytes:
            raise LimitExceeded(
                "the node's mempool is full; retry after the next block", code="mempool_full"
            )
        try:
            self._admit(tx)  # checks the nonce before anything else
        except InvalidTransaction as err:
            if err.code != "nonce_gap":
                raise
            self._park(tx)
            return []
        admitted = [tx]
        admitted.extend(self._unpark(tx.signer, tx.nonce + 1))
        return admitted

    def add_relayed(self, tx: Tx) -> None:
        """Admit a transaction a peer relayed: its signature was checked on arrival, the
        peer checked it against the state, and the block builder applies it again, so it
        is not applied here (three quarters of a validator's transactions come this way).
        It joins the queue in arrival order, with no writes of its own in the check state.
        """
        if tx.id in self._txs or tx.id in self._parked_ids:
            raise Conflict("this transaction is already pending", code="duplicate")
        if (tx.signer, tx.nonce) in self._nonces:
            raise Conflict("another transaction with this nonce is pending", code="duplicate")
        if len(self._txs) >= self.limits.max_txs or self._bytes + tx.size > self.limits.max_bytes:
            raise LimitExceeded(
                "the node's mempool is full; retry after the next block", code="mempool_full"
            )
        # Its nonce must follow a pending one or the committed one: a relayed transaction
        # that cannot be next may never be, and would hold a place in every block's reap.
        # (Following a pending one, the usual case under load, needs no state read.)
        if (tx.signer, tx.nonce - 1) not in self._nonces:
            expected = state.next_nonce(state.load(self._reader, state.P_ACCT + tx.signer))
            if tx.nonce < expected:
                raise InvalidTransaction("nonce already used", code="stale_nonce")
            if tx.nonce != expected:
                raise InvalidTransaction(
                    "an earlier nonce of this signer is missing", code="nonce_gap"
                )
        self._txs[tx.id] = tx
        self._relayed.add(tx.id)
        self._nonces.add((tx.signer, tx.nonce))
        self._bytes += tx.size

    def _admit(self, tx: Tx) -> None:
        # A child of our own, not apply_tx's: its changes are kept per transaction (to
        # take them out again), and on a rejection it is simply dropped.
        scratch = self._overlay.child()
        state.apply_tx(scratch, self._context(), tx, atomic=False)
        self._overlay.merge(scratch)
        self._changes[tx.id] = scratch.changes
        self._nonces.add((tx.signer, tx.nonce))
        self._txs[tx.id] = tx
        self._bytes += tx.size

    def _park(self, tx: Tx) -> None:
        account = state.load(self._overlay, state.P_ACCT + tx.signer)
        if account is None and not self._may_park_unregistered(tx):
            raise InvalidTransaction(
                f"nonce {tx.nonce} skips ahead; an unregistered signer starts at nonce 1",
                code="nonce_gap",
            )
        expected = state.next_nonce(account)
        if tx.nonce > expected + MAX_NONCE_AHEAD:
            raise InvalidTransaction(
                f"nonce {tx.nonce} is too far ahead; the next nonce is {expected}", code="nonce_gap"
            )
        parked = self._parked.setdefault(tx.signer, {})
        if tx.nonce in parked:
            raise Conflict(
                f"a transaction with nonce {tx.nonce} is already waiting", code="duplicate"
            )
        if len(parked) >= MAX_PARKED_PER_SIGNER or self._parked_count >= self.limits.max_parked:
            raise LimitExceeded(
                "too many transactions waiting for earlier nonces", code="mempool_full"
            )
        parked[tx.nonce] = tx
        self._parked_ids[tx.id] = tx
        self._parked_count += 1

    def _may_park_unregistered(self, tx: Tx) -> bool:
        """A signer whose ``register`` has not arrived may park a few transactions (a new
        patient's register and first grant can arrive out of order), but keys cost nothing
        to make, so strangers share a small part of the parking area."""
        if tx.nonce > 1 + MAX_AHEAD_UNREGISTERED:
            return False
        strangers = sum(
            len(parked)
            for signer, parked in self._parked.items()
            if state.load(self._overlay, state.P_ACCT + signer) is None
        )
        return strangers < MAX_PARKED_UNREGISTERED

    def _unpark(self, signer: bytes, nonce: int) -> list[Tx]:
        admitted: list[Tx] = []
        parked = self._parked.get(signer)
        while parked and nonce in parked:
            tx = parked.pop(nonce)
            self._parked_ids.pop(tx.id, None)
            self._parked_count -= 1
            try:
                self._admit(tx)
            except InvalidTransaction as err:
                self._evicted.append((tx, err))
                break
            admitted.append(tx)
            nonce += 1
        if parked is not None and not parked:
            del self._parked[signer]
        return admitted

    def reap(self, max_bytes: int, max_txs: int) -> list[Tx]:
        """Pending transactions in arrival order, up to the limits."""
        out: list[Tx] = []
        total = 0
        for tx in self._txs.values():
            if len(out) >= max_txs or total + tx.size > max_bytes:
                break
            out.append(tx)
            total += tx.size
        return out

    def remove(self, tx_id: bytes) -> Tx | None:
        """Drop one pending transaction (the block builder found it no longer applies)."""
        tx = self._txs.pop(tx_id, None)
        if tx is not None:
            self._bytes -= tx.size
            self._changes.pop(tx_id, None)
            self._relayed.discard(tx_id)
            self._nonces.discard((tx.signer, tx.nonce))
        return tx

    def update(self, committed: Iterable[bytes]) -> list[tuple[Tx, InvalidTransaction]]:
        """After a block: drop ``committed``, bring the rest up to the new state; return
        what was dropped.

        When the block committed exactly the oldest pending transactions, the rest stand
        as checked: their writes are laid over the new state unchanged. Otherwise, with a
        small backlog, every remaining transaction is checked again; with a large one the
        writes are laid over as they are too, and the block builder leaves out (and drops)
        any that no longer apply, so a backlog never costs a full re-check per block.
        """
        done = set(committed)
        # Two generations, turned over whole: an ordered map that forgot its oldest id one
        # at a time cost 0.7 us a committed transaction, at every node.
        self._recent |= done
        if len(self._recent) >= RECENTLY_COMMITTED:
            self._older, self._recent = self._recent, set()
        prefix = set(itertools.islice(self._txs, len(done))) == done
        for tx_id in done:
            self.remove(tx_id)
        dropped: list[tuple[Tx, InvalidTransaction]] = []
        if prefix or len(self._txs) > RECHECK_MAX:
            self._overlay = self._new_overlay()
            for changes in self._changes.values():  # the checked ones, in arrival order
                self._overlay.changes.update(changes)
        else:
            remaining = list(self._txs.values())
            relayed = self._relayed
            self._txs.clear()
            self._changes.clear()
            self._relayed = set()
            self._nonces = set()
            self._bytes = 0
            self._overlay = self._new_overlay()
            for tx in remaining:
                try:
                    if tx.id in relayed:
                        self.add_relayed(tx)
                    else:
                        self._admit(tx)
                except InvalidTransaction as err:
                    dropped.append((tx, err))
        for signer in list(self._parked):
            expected = state.next_nonce(state.load(self._overlay, state.P_ACCT + signer))
            parked = self._parked[signer]
            for nonce in [n for n in parked if n < expected]:
                tx = parked.pop(nonce)
                self._parked_ids.pop(tx.id, None)
                self._parked_count -= 1
                # A parked transaction that another node got into the block is committed,
                # not dropped: reporting it as dropped would tell its sender it failed.
                if tx.id not in done:
                    dropped.append(
                        (tx, InvalidTransaction("nonce already used", code="stale_nonce"))
                    )
            self._unpark(signer, expected)
            if not parked:
                self._parked.pop(signer, None)
        return dropped
