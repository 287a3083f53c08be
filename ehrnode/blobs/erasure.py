"""Crypto-shredding: when an ``erase`` commits, this node deletes the erased records'
ciphertext. The chain keeps each record's hash and the fact of its erasure; without the
ciphertext, the wrapped keys on chain open nothing."""

from __future__ import annotations

import logging

from ehrnode.blobs.store import BlobStore
from ehrnode.consensus.driver import Committed
from ehrnode.core import state
from ehrnode.store.chain import Chain

log = logging.getLogger(__name__)


class Eraser:
    def __init__(self, chain: Chain, blobs: BlobStore) -> None:
        self.chain = chain
        self.blobs = blobs

    def on_commit(self, committed: Committed) -> None:
        for tx in [t for t in committed.txs if t.kind == "erase"]:
            for record_id in tx.body["records"]:
                if self._erase(record_id):
                    log.info("erased the ciphertext of record %s", record_id.hex()[:16])

    def sweep(self, last_blocks: int = 2) -> int:
        """At start: finish erasures of the newest blocks (deletion follows a commit before
        the next block starts, so only the last block can have any left undone; two for
        margin)."""
        removed = 0
        for erase in self.chain.recent_txs(("erase",), last_blocks):
            for record_id in erase["body"]["records"]:
                removed += self._erase(record_id)
        return removed

    def _erase(self, record_id: bytes) -> bool:
        """Delete one record's ciphertext; a failure (the disk) is logged, and the other
        records of the erasure still go (a start sweeps the newest blocks' again)."""
        record = self.chain.load_state(state.P_REC + record_id)
        if record is None:
            return False
        try:
            return self.blobs.delete(record["blob"])
        except OSError as err:
            log.error("could not erase the ciphertext of record %s: %s", record_id.hex()[:16], err)
            return False
