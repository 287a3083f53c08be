"""Where a transaction's CPU goes: a network of 4 validators in this one process, each
stage of the transaction path wrapped in a timer.

    python -m ehrnode.bench.stages [RECORDS]

Prints the process's CPU per transaction per validator, and the time each stage took per
transaction per validator, with the stages inside it (a transaction's decoding includes
its signature check) and without them, and how much of the CPU no synchronous stage
holds. Sampling profilers mislead on this workload: they count threads waiting for a core
as busy and cannot see LevelDB's own threads; these timers are exact, at the cost of
about half a microsecond per wrapped call. Not part of ``scripts/bench``: a tool for
finding what to optimise, not a figure.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import inspect
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgpack

from ehrnode import admission, compiled, mempool
from ehrnode.bench import workload
from ehrnode.bench.throughput import split_by_node
from ehrnode.blobs import replication, store as blobstore
from ehrnode.consensus import execution
from ehrnode.core import block, codec, crypto, records, state, tx as txmod
from ehrnode.p2p import gossip, messages
from ehrnode.store import chain, db
from ehrnode.testing import cluster, validator_identity, wait_for

# (owner, attribute): the stages timed, in the order of a transaction's path.
STAGES: list[tuple[Any, str]] = [
    (gossip.TxGossip, "_on_txs"),
    (admission.Admission, "submit"),
    (txmod, "decode"),
    (codec, "decode"),
    (txmod, "check_body"),
    (crypto, "verify"),
    (admission.Admission, "admit"),
    (mempool.Mempool, "add"),
    (mempool.Mempool, "add_relayed"),
    (messages, "encode"),
    (messages, "decode"),
    (gossip.ConsensusGossip, "_on_proposal"),
    (block.Proposal, "from_wire"),
    (block.Block, "decode"),
    (execution.Executor, "build"),
    (execution.Executor, "check"),
    (state, "execute_block"),
    (state, "apply_tx"),
    (records, "_write_record"),
    (state, "digest_after"),
    (chain.Chain, "commit_from_loop"),
    (mempool.Mempool, "update"),
    (replication.Replication, "on_commit"),
    # The blob path (``ehr import``): pushed, announced, stored (on a LevelDB worker thread).
    (replication.Replication, "push"),
    (replication.Replication, "_on_data"),
    (replication.Replication, "_on_have"),
    (replication.Replication, "stored"),
    (blobstore.BlobStore, "put_many"),
    (chain.Chain, "_commit_batch"),
    (db.LevelKV, "_batch"),
]


class Timers:
    """``clock``: wall time by default (all 4 nodes share this process's threads); a node
    process timing itself uses its thread's CPU time (``nodetimes``)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.own: defaultdict[str, float] = defaultdict(float)  # less the stages inside
        self.calls: Counter[str] = Counter()
        # Per open synchronous stage, the time spent in the stages inside it (one stack
        # per thread, though today every stage runs on the event loop's).
        self._local = threading.local()
        self._originals: list[tuple[Any, str, Any]] = []

    def install(self, *, coroutines: bool = True) -> None:
        """``coroutines=False``: leave out the stages that are coroutines (timed to their
        end, they would count what other tasks do on the thread meanwhile as theirs)."""
        for owner, name in STAGES:
            original = getattr(owner, name)
            if not coroutines and inspect.iscoroutinefunction(original):
                continue
            label = f"{getattr(owner, '__name__', owner)}.{name}"
            setattr(owner, name, self._timed(original, label))
            self._originals.append((owner, name, original))

    def remove(self) -> None:
        for owner, name, original in reversed(self._originals):
            setattr(owner, name, original)
        self._originals.clear()

    def _timed(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        if inspect.iscoroutinefunction(fn):  # timed to its end, awaits included

            @functools.wraps(fn)
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                started = self._clock()
                try:
                    return await fn(*args, **kwargs)
                finally:
                    self.seconds[label] += self._clock() - started
                    self.calls[label] += 1

            return timed_async

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            inner = self._inner()
            inner.append(0.0)
            started = self._clock()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = self._clock() - started
                self.seconds[label] += elapsed
                self.own[label] += elapsed - inner.pop()
                self.calls[label] += 1
                if inner:
                    inner[-1] += elapsed

        return timed

    def _inner(self) -> list[float]:
        stack: list[float] | None = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def reset(self) -> None:
        self.seconds.clear()
        self.own.clear()
        self.calls.clear()


async def measure(root: Path, records: int) -> str:
    if compiled.active():
        raise RuntimeError("stage timers need the Python sources: set EHR_PURE_PYTHON=1")
    timers = Timers()
    timers.install()
    try:
        async with cluster(root, 4) as nodes:
            chain_id = nodes[0].genesis.chain_id
            home = nodes[0].config.home
            people = await workload.register_people(
                nodes[0].rpc_url, chain_id, validator_identity(home), 16, 50
            )
            resources, source = workload.sample_resources(records)
            work = workload.seal_and_sign(chain_id, people, workload.cycle(resources, records), {})
            await workload.upload_blobs(
                nodes[0].rpc_url, chain_id, people.providers[0], [b for b, _ in work]
            )
            # Every node must hold each blob and know every writer before it takes their
            # records: the upload returns at the write quorum, registration at node 0's commit.
            hashes = [crypto.sha256(blob) for blob, _ in work]
            height = nodes[0].chain.head.height
            await wait_for(
                lambda: all(
                    n.chain.head.height >= height and all(n.blobs.info(h) for h in hashes)
                    for n in nodes
                ),
                60,
            )
            raws = [raw for _, raw in work]
            lanes = split_by_node(raws, len(nodes))
            timers.reset()
            cpu, wall = time.process_time(), time.perf_counter()
            async with aiohttp.ClientSession() as http:

                async def lane(i: int) -> None:
                    for k in range(0, len(lanes[i]), 250):
                        async with http.post(
                            nodes[i].rpc_url + "/v1/txs/batch?mode=async",
                            data=msgpack.packb(lanes[i][k : k + 250]),
                            headers={"Content-Type": "application/msgpack"},
                        ) as response:
                            if response.status != 200:
                                text = await response.text()
                                raise RuntimeError(f"node {i} answered {response.status}: {text}")
                            results = (await response.json())["results"]
                        refused = [r for r in results if r["status"] == "rejected"]
                        if refused:
                            raise RuntimeError(f"node {i} refused records: {refused[:2]}")

                await asyncio.gather(*(lane(i) for i in range(len(nodes))))
            last = [crypto.sha256(raw) for raw in raws[-50:]]
            await wait_for(
                lambda: all(n.chain.tx_location(t) is not None for n in nodes for t in last),
                300,
            )
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        timers.remove()
    per = len(raws) * 4
    lines = [
        f"{len(raws)} records ({source}); 4 validators in one process",
        f"process CPU {cpu:.2f} s over {wall:.2f} s: {cpu / per * 1e6:.1f} us per tx per validator",
        "us per tx per validator, by stage: with the stages inside it, then without them",
        "(a coroutine's stage is timed to its end, awaits included: no 'without' figure)",
    ]
    for label, seconds in sorted(timers.seconds.items(), key=lambda item: -item[1]):
        own = f"{timers.own[label] / per * 1e6:8.1f}" if label in timers.own else " " * 8
        lines.append(f"{seconds / per * 1e6:8.1f} {own}  {label} ({timers.calls[label]} calls)")
    inside = sum(timers.own.values())
    lines.append(
        f"{inside / per * 1e6:8.1f} us in the synchronous stages; {(cpu - inside) / per * 1e6:.1f} "
        "outside them (the event loop, sockets, HTTP, websockets, the commit, untimed code, "
        "LevelDB's own threads; the stages' times are wall time, the process's CPU time)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ehrnode.bench.stages",
        description="Where a transaction's CPU goes: 4 validators in one process, each "
        "stage of the transaction path timed.",
    )
    parser.add_argument(
        "records", nargs="?", type=int, default=6000, help="records to send (default 6000)"
    )
    args = sys.argv[1:] if argv is None else argv
    records = parser.parse_args(args).records
    if records < 1:
        parser.error("records must be at least 1")
    if compiled.active():
        # Timers wrap Python functions; a compiled module calls its neighbours directly.
        print("note: timing the Python sources (EHR_PURE_PYTHON=1), not the compiled build")
        sys.stdout.flush()
        command = [sys.executable, "-m", "ehrnode.bench.stages", *args]
        os.execve(sys.executable, command, {**os.environ, compiled.PURE_ENV: "1"})
    root = Path(tempfile.mkdtemp(prefix="ehr-stages-"))
    try:
        print(asyncio.run(measure(root, records)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
