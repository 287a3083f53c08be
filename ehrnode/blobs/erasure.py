"""Crypto-shredding: when an ``erase`` commits, this node deletes the erased records'
ciphertext. The chain keeps each record's hash and the fact of its erasure; without the
ciphertext, the wrapped keys on chain open nothing."""

from __future__ import annotations

import logging

from ehrnode.blobs.store import BlobStore
from ehrnode.consensus.driver import Committed
from ehrnode.core import codec, state
from ehrnode.store.chain import Chain

log = logging.getLogger(__name__)


class Eraser:
    def __init__(self, chain: Chain, blobs: BlobStore) -> None:
        self.chain = chain
        self.blobs = blobs

    def on_commit(self, committed: Committed) -> None:
        for tx in committed.txs:
            if tx.kind != "erase":
                continue
            for record_id in tx.body["records"]:
                record = self.chain.load_state(state.P_REC + record_id)
                if record is not None and self.blobs.delete(record["blob"]):
                    log.info("erased the ciphertext of record %s", record_id.hex()[:16])

    def sweep(self, last_blocks: int = 16) -> int:
        """At start: finish erasures the last blocks committed just before a crash (deletion
        follows the commit, so only the newest blocks can have any left undone)."""
        removed = 0
        head = self.chain.head.height
        for height in range(max(1, head - last_blocks + 1), head + 1):
            for raw in self.chain.block(height).txs:
                body = codec.decode(raw)
                if body["kind"] != "erase":
                    continue
                for record_id in body["body"]["records"]:
                    record = self.chain.load_state(state.P_REC + record_id)
                    if record is not None and self.blobs.delete(record["blob"]):
                        removed += 1
        return removed
