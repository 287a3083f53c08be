"""Sustained committed transactions per second, and commit latency at a lower rate.

Load generators are separate processes. Each validator gets its own writers (a provider's
transactions all go to one node, in nonce order) and its share of the transactions in
batches (``POST /v1/txs/batch``). A watcher follows committed blocks on the events
websocket of one node and stamps each with the time it saw it; the sustained rate is the
transactions committed from the first block after the warm-up to the last block.
Latency: generators pace their sends, note when each transaction left, and the watcher's
stamps give when it was final.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import multiprocessing
import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgpack

from ehrnode.bench.workload import MSGPACK
from ehrnode.core import crypto, tx


@dataclass
class Block:
    seen: float
    height: int
    txs: list[str]


async def watch(url: str, stop: asyncio.Event, blocks: list[Block]) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"{url.replace('http', 'ws', 1)}/v1/events") as ws,
    ):
        while not stop.is_set():
            try:
                message = await asyncio.wait_for(ws.receive(), 0.5)
            except TimeoutError:
                continue
            if message.type != aiohttp.WSMsgType.TEXT:
                return
            event = json.loads(message.data)
            blocks.append(Block(time.time(), event["height"], event["txs"]))


def split_by_node(raws: list[bytes], nodes: int) -> list[list[bytes]]:
    """Each signer's transactions to one node, in nonce order, signers interleaved."""
    by_signer: dict[bytes, list[bytes]] = defaultdict(list)
    for raw in raws:
        by_signer[tx.decode(raw, verify_sig=False).signer].append(raw)
    lanes: list[list[list[bytes]]] = [[] for _ in range(nodes)]
    for i, signer in enumerate(sorted(by_signer)):
        lanes[i % nodes].append(by_signer[signer])
    out = []
    for lane in lanes:
        merged: list[bytes] = []
        longest = max((len(s) for s in lane), default=0)
        for k in range(longest):
            merged.extend(s[k] for s in lane if k < len(s))
        out.append(merged)
    return out


def _generator(
    url: str, raws: list[bytes], batch: int, rate: float | None, sent_path: str | None
) -> None:
    """In its own process: post ``raws`` to ``url`` in batches, paced to ``rate`` tx/s."""

    async def run() -> None:
        sent: list[tuple[str, float]] = []
        started = time.perf_counter()
        async with aiohttp.ClientSession() as http:
            for k in range(0, len(raws), batch):
                chunk = raws[k : k + batch]
                if rate is not None:
                    due = started + k / rate
                    delay = due - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                now = time.time()
                if sent_path is not None:
                    sent.extend((crypto.sha256(r).hex(), now) for r in chunk)
                async with http.post(
                    f"{url}/v1/txs/batch?mode=async", data=msgpack.packb(chunk), headers=MSGPACK
                ) as r:
                    body = await r.json()
                bad = [x for x in body.get("results", []) if x["status"] == "rejected"]
                if bad:
                    print(f"generator: {len(bad)} rejected, e.g. {bad[0]}", flush=True)
        if sent_path is not None:
            with open(sent_path, "w") as handle:
                json.dump(sent, handle)

    asyncio.run(run())


def start_generators(
    urls: list[str], lanes: list[list[bytes]], batch: int, rate: float | None, sent_dir: str | None
) -> list[Any]:
    context = multiprocessing.get_context("spawn")
    per_lane_rate = None if rate is None else rate / len(lanes)
    processes = []
    for i, (url, lane) in enumerate(zip(urls, lanes, strict=True)):
        path = None if sent_dir is None else f"{sent_dir}/sent-{i}.json"
        process = context.Process(
            target=_generator, args=(url, lane, batch, per_lane_rate, path), daemon=True
        )
        process.start()
        processes.append(process)
    return processes


async def _load(
    urls: list[str],
    raws: list[bytes],
    batch: int,
    rate: float | None,
    sent_dir: str | None,
    sample: Callable[[], Any] | None = None,
    samples: list[tuple[float, Any]] | None = None,
) -> tuple[list[Block], float]:
    """Send ``raws`` from generator processes until all are committed (or 600 s pass);
    the blocks the watcher saw, and when sending started. ``sample``: called every tenth
    of a second while the load runs, each result kept in ``samples`` with its time."""
    blocks: list[Block] = []
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch(urls[0], stop, blocks))
    await asyncio.sleep(0.2)
    lanes = split_by_node(raws, len(urls))
    started = time.time()
    processes = start_generators(urls, lanes, batch, rate, sent_dir)
    while sum(len(b.txs) for b in blocks) < len(raws) and time.time() < started + 600:
        if sample is not None and samples is not None:
            samples.append((time.time(), sample()))
        await asyncio.sleep(0.1)
    stop.set()
    await watcher
    for process in processes:
        process.join(timeout=30)
    return blocks, started


async def sustained(
    urls: list[str],
    raws: list[bytes],
    *,
    warmup_s: float = 2.0,
    batch: int = 250,
    sample: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Send everything as fast as the nodes take it; the committed rate after warm-up.
    ``sample``: called every tenth of a second during the load; the results taken within
    the rate's window are under "samples" as (time, result), the first and last nearest
    its ends."""
    samples: list[tuple[float, Any]] = []
    blocks, started = await _load(urls, raws, batch, None, None, sample, samples)
    window = [b for b in blocks if b.seen >= started + warmup_s]
    if len(window) < 2:
        window = blocks
    committed = sum(len(b.txs) for b in window[1:])
    elapsed = window[-1].seen - window[0].seen if window else 0.0
    inside = [s for s in samples if window and window[0].seen <= s[0] <= window[-1].seen]
    return {
        "tx_per_s": committed / elapsed if elapsed > 0 else None,
        "committed": sum(len(b.txs) for b in blocks),
        "blocks": len(blocks),
        "seconds": blocks[-1].seen - started if blocks else None,
        "samples": inside,
        "window_note": window_blocks_note(window),
    }


def window_blocks_note(window: list[Block]) -> str | None:
    """How the rate's window was cut into blocks: their count, transactions a block and
    seconds between blocks (the same work in fewer, larger blocks costs less a
    transaction, and a round that failed shows as a long gap)."""
    if len(window) < 2:
        return None
    sizes = sorted(len(b.txs) for b in window[1:])
    gaps = sorted(b.seen - a.seen for a, b in itertools.pairwise(window))

    def spread(values: list[Any], form: str) -> str:
        middle = values[len(values) // 2]
        return f"{values[0]:{form}} / {middle:{form}} / {values[-1]:{form}}"

    return (
        f"throughput: {len(sizes)} blocks in the rate's window; transactions a block "
        f"(least / median / most) {spread(sizes, ',')}; seconds between blocks "
        f"{spread(gaps, '.2f')}"
    )


async def latency(
    urls: list[str], raws: list[bytes], rate: float, sent_dir: str, *, warmup_s: float = 2.0
) -> dict[str, Any]:
    blocks, _started = await _load(urls, raws, 20, rate, sent_dir)
    committed_at = {t: b.seen for b in blocks for t in b.txs}
    timeline = []
    for i in range(len(urls)):
        with open(f"{sent_dir}/sent-{i}.json") as handle:
            for tx_hex, sent_at in json.load(handle):
                if tx_hex in committed_at:
                    timeline.append((sent_at, committed_at[tx_hex] - sent_at))
    timeline.sort()
    if os.environ.get("EHR_BENCH_TRACE"):
        with open(os.environ["EHR_BENCH_TRACE"], "w") as handle:
            json.dump(timeline, handle)
    # Like the sustained rate, leave out the warm-up: generator processes starting,
    # first connections, caches filling.
    start = timeline[0][0] if timeline else 0.0
    delays = sorted(d for sent, d in timeline if sent >= start + warmup_s)
    if not delays:
        return {"latency_p50_s": None, "latency_p99_s": None}
    return {
        "latency_p50_s": delays[len(delays) // 2],
        "latency_p99_s": delays[min(len(delays) - 1, int(len(delays) * 0.99))],
        "latency_samples": len(delays),
    }
