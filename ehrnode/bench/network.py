"""A local network of validator processes for the benchmark, started as an operator would
(``python -m ehrnode run --home``), with limits raised for load."""

from __future__ import annotations

import contextlib
import json
import urllib.request
from pathlib import Path
from typing import Any

from ehrnode.bench.threadcpu import ThreadCpu, thread_cpu
from ehrnode.testing import ProcessNode, cluster_homes, start_process_node

# Limits raised for load: one client address sends everything, in large batches.
RPC_SETTINGS = (
    "rate_per_s = 1000000.0\n"
    "max_body_bytes = 67108864\n"
    "max_batch_txs = 20000\n"
    "commit_timeout_s = 120.0\n"
)
MEMPOOL_SETTINGS = "\n[mempool]\nmax_txs = 400000\nmax_bytes = 1073741824\n"
# The heap a validator grows to in its first minute of load, faulted in at start (as an
# operator of a loaded validator would set it): otherwise the load phases pay for its
# first touch (docs/benchmarks.md, note 65).
MEMORY_SETTINGS = "\n[memory]\nprefault_mb = 128\n"


class Network:
    def __init__(self, root: Path, size: int = 4) -> None:
        self.root = root
        self.homes = cluster_homes(root, size, chain_id="ehr-bench")
        for home in self.homes:
            config = home / "config.toml"
            text = config.read_text()
            text = text.replace("[rpc]\n", "[rpc]\n" + RPC_SETTINGS, 1)
            config.write_text(text + MEMPOOL_SETTINGS + MEMORY_SETTINGS)
        self.nodes: list[ProcessNode] = []

    def start(self) -> None:
        self.nodes = [start_process_node(home) for home in self.homes]

    def restart(self, index: int) -> ProcessNode:
        self.nodes[index] = start_process_node(self.homes[index])
        return self.nodes[index]

    def stop(self) -> None:
        for node in self.nodes:
            if node.process.poll() is None:
                node.terminate()

    @property
    def urls(self) -> list[str]:
        return [n.rpc_url for n in self.nodes]

    def status(self, index: int = 0) -> dict[str, Any]:
        with urllib.request.urlopen(self.urls[index] + "/v1/status", timeout=10) as response:
            body: dict[str, Any] = json.load(response)
            return body

    def reset_peak_rss(self) -> None:
        """Start the nodes' peak-memory counters afresh (Linux: clear_refs 5 resets VmHWM)."""
        for node in self.nodes:
            with contextlib.suppress(OSError):
                Path(f"/proc/{node.process.pid}/clear_refs").write_text("5")

    def cpu_s(self) -> list[float] | None:
        """CPU time (user + system, all threads) each node process has used so far, from
        /proc; None where there is no /proc."""
        readings = self.thread_cpu()
        if readings is None:
            return None
        return [r.total for r in readings]

    def thread_cpu(self) -> list[ThreadCpu] | None:
        """Each node's CPU so far by thread (``bench.threadcpu``); None without /proc."""
        out = []
        for node in self.nodes:
            reading = thread_cpu(node.process.pid)
            if reading is None:
                return None
            out.append(reading)
        return out

    def peak_rss_mb(self, index: int) -> float:
        """The process's peak resident memory (VmHWM), in MB."""
        pid = self.nodes[index].process.pid
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")
