"""Prometheus metrics of one node, in a registry of its own (tests run several nodes in one
process). Served at ``/metrics``."""

from __future__ import annotations

import collections
import operator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from ehrnode.consensus.driver import Committed
from ehrnode.core.tx import record_bodies

_KIND = operator.attrgetter("kind")


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.height = Gauge(
            "ehr_chain_height", "Height of the last committed block", registry=self.registry
        )
        self.blocks = Counter("ehr_blocks_committed", "Blocks committed", registry=self.registry)
        self.txs = Counter(
            "ehr_txs_committed", "Transactions committed", ["kind"], registry=self.registry
        )
        self.records = Counter(
            "ehr_records_written",
            "Records written (one per record transaction, one per item of a records one)",
            registry=self.registry,
        )
        self.mempool = Gauge("ehr_mempool_txs", "Transactions pending", registry=self.registry)
        self.peers = Gauge("ehr_peers_connected", "Peers connected", registry=self.registry)

    def on_commit(self, committed: Committed) -> None:
        self.height.set(committed.block.header.height)
        self.blocks.inc()
        # Counted in C (a block holds thousands): a loop here cost 0.2 us a transaction.
        kinds = collections.Counter(map(_KIND, committed.txs))
        records = kinds.get("record", 0)
        if kinds.get("records"):
            records += sum(
                len(record_bodies(t.kind, t.body)) for t in committed.txs if t.kind == "records"
            )
        for kind, count in kinds.items():
            self.txs.labels(kind).inc(count)
        self.records.inc(records)

    def render(self) -> bytes:
        data: bytes = generate_latest(self.registry)
        return data
