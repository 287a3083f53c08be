"""The benchmark's measurements beyond raw throughput: import, block sync, a large
attachment, and queries and start-up on a chain of a million records."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from ehrnode import config as cfg
from ehrnode.bench.bigchain import build_chain
from ehrnode.bench.network import Network
from ehrnode.bench.threadcpu import ThreadCpu, split_note, thread_cpu
from ehrnode.bench.throughput import sustained
from ehrnode.client.sdk import Client
from ehrnode.core import crypto
from ehrnode.testing import start_process_node, validator_identity


async def height(url: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/v1/status") as response:
        return int((await response.json())["height"])


async def all_at_height(urls: list[str], target: int, timeout: float = 60.0) -> None:
    """Wait until every node has committed ``target``; TimeoutError naming the laggards."""
    deadline = time.perf_counter() + timeout
    behind = list(urls)
    while behind:
        behind = [url for url in behind if await height(url) < target]
        if behind and time.perf_counter() > deadline:
            raise TimeoutError(f"nodes {behind} did not reach height {target} in {timeout} s")
        if behind:
            await asyncio.sleep(0.05)


def import_bundles(net: Network, files: list[Path], keys_dir: Path) -> dict[str, Any]:
    """``ehr import`` as a user runs it, timed from start to exit."""
    command = [
        sys.executable,
        "-m",
        "ehrnode.client.cli",
        "--node",
        net.urls[0],
        "--key",
        str(net.homes[0] / cfg.KEY_FILE),
        "--json",
        "import",
        "--keys-dir",
        str(keys_dir),
        *[str(f) for f in files],
    ]
    nodes_before, client_before = net.cpu_s(), _children_usage()
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    nodes_after, client_after = net.cpu_s(), _children_usage()
    if result.returncode != 0:
        raise RuntimeError(f"ehr import failed: {result.stderr.strip()[-500:]}")
    report = json.loads(result.stdout)
    written = int(report.get("written", 0))
    figures: dict[str, Any] = {
        "import_resources_per_s": written / elapsed,
        "import_resources": written,
        "import_elapsed_s": elapsed,
        # the client process and the worker processes it waited for
        "import_client_cpu_s": client_after[0] - client_before[0],
        "import_client_faults": client_after[1] - client_before[1],
    }
    if nodes_before is not None and nodes_after is not None:
        figures["import_validators_cpu_s"] = sum(nodes_after) - sum(nodes_before)
    return figures


def _children_usage() -> tuple[float, int]:
    """CPU seconds and minor page faults of the child processes waited for so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime, usage.ru_minflt


async def block_sync(net: Network, raws: list[bytes], live_rate: float | None) -> dict[str, Any]:
    """Stop one validator, commit ``raws`` without it, restart it and time its catch-up."""
    net.nodes[3].terminate()
    urls = net.urls[:3]
    result = await sustained(urls, raws)
    target = await height(urls[0])
    started = time.perf_counter()
    restarted = net.restart(3)
    while await height(restarted.rpc_url) < target:
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - started
    # Not a target: what the catch-up cost the node that caught up, from its start (its
    # start-up included), which varies less from run to run than its rate: the rate also
    # follows what the machine's other core is doing (the other nodes' compactions).
    used = thread_cpu(restarted.process.pid)
    peak_mb = net.peak_rss_mb(3)  # a fresh process: its peak over its start and catch-up
    rate = len(raws) / elapsed
    return {
        "sync_tx_per_s": rate,
        "sync_txs": len(raws),
        "sync_speedup": rate / live_rate if live_rate else None,
        "sync_live_rate_without_it": result["tx_per_s"],
        "sync_node_cpu_us_per_tx": used.total / len(raws) * 1e6 if used and raws else None,
        "sync_node_peak_rss_mb": None if math.isnan(peak_mb) else peak_mb,
        "sync_node_cpu_note": split_note(
            "block sync (the node that caught up, from its start)",
            [ThreadCpu(0, 0, 0, 0, 0)] if used else None,
            [used] if used else None,
            len(raws),
            "transaction",
        ),
    }


async def attachment(net: Network, size: int, timeout: float = 1800.0) -> dict[str, Any]:
    """Upload an attachment of ``size`` bytes through node 0 and wait for 4 replicas."""
    provider, patient = crypto.Identity.generate(), crypto.Identity.generate()
    institution = validator_identity(net.homes[0])
    net.reset_peak_rss()  # the peak while this attachment moves, not since the node started
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scan.bin"
        with open(path, "wb") as handle:
            chunk = os.urandom(1024 * 1024)
            for _ in range(size // len(chunk)):
                handle.write(chunk)
        async with Client(net.urls[0], institution) as c:
            endorsement = c.endorse(provider.public_key, "provider")
            await c.as_identity(provider).register("provider", None, endorsement)
            await c.as_identity(patient).register("patient")
            started = time.perf_counter()
            written = await c.as_identity(provider).put_attachment(
                patient.public_key, path, "application/octet-stream"
            )
            record = await c.record(written.id)
            blob = record["blob"]
            async with aiohttp.ClientSession() as http:
                deadline = time.perf_counter() + timeout
                while time.perf_counter() < deadline:
                    async with http.get(f"{net.urls[0]}/v1/blobs/{blob}/replicas") as response:
                        if len((await response.json())["holders"]) >= len(net.nodes):
                            break
                    await asyncio.sleep(0.1)
            elapsed = time.perf_counter() - started
    return {
        "attachment_mb_per_s": size / 1e6 / elapsed,
        "attachment_bytes": size,
        "attachment_peak_rss_mb": max(net.peak_rss_mb(i) for i in range(len(net.nodes))),
    }


async def query_and_start(root: Path, records: int, patients: int, queries: int) -> dict[str, Any]:
    """Build a chain of ``records`` records (offline, one validator), start a node on it
    and time the start and a patient's record list."""
    home, patient_ids = await asyncio.to_thread(build_chain, root, records, patients)
    started = time.perf_counter()
    node = start_process_node(home, timeout=120)
    start_s = time.perf_counter() - started
    try:
        timings = []
        rng = random.Random(3)
        async with aiohttp.ClientSession() as http:
            for _ in range(queries):
                who = rng.choice(patient_ids)
                t0 = time.perf_counter()
                async with http.get(f"{node.rpc_url}/v1/patients/{who}/records?limit=100") as r:
                    body = await r.json()
                timings.append(time.perf_counter() - t0)
                assert body["records"], "a patient of the big chain has no records"
        timings.sort()
        return {
            "query_p99_ms": 1000 * timings[min(len(timings) - 1, int(len(timings) * 0.99))],
            "query_p50_ms": 1000 * timings[len(timings) // 2],
            "chain_records": records,
            "start_s": start_s,
        }
    finally:
        node.terminate()
