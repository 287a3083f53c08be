"""``scripts/bench``: run the measurements, print a table, write the figures as JSON.

    scripts/bench [--only NAME ...] [--out FILE] [--smoke] [--stage-times]
    scripts/bench --compare REV [--pairs N] [--only NAME ...] [--out FILE] [--smoke]

NAME is one of: ceiling, throughput, latency, import, sync, attachment, query. A figure
not measured in a run is null, never a guess. ``--smoke`` runs every measurement at a
size of seconds (for CI: it proves the bench runs and writes valid JSON; its figures mean
little). ``--compare REV`` runs the same measurements on this tree and on commit REV in
turn, ``--pairs`` times each, and prints both sides' figures (``ehrnode.bench.compare``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ehrnode import compiled
from ehrnode.bench import (
    compare,
    machine,
    measures,
    nodetimes,
    threadcpu,
    throughput,
    workload,
)
from ehrnode.bench.network import Network
from ehrnode.process import STAGE_TIMES_ENV, tune_malloc
from ehrnode.testing import validator_identity

NAMES = ("ceiling", "throughput", "latency", "import", "sync", "attachment", "query")
KEYS = (
    "verify_per_s_per_core",
    "ceiling_tx_per_s",
    "tx_per_s",
    "ratio_to_ceiling",
    "latency_p50_s",
    "latency_p99_s",
    "import_resources_per_s",
    "sync_speedup",
    "attachment_mb_per_s",
    "attachment_ceiling_mb_per_s",
    "attachment_peak_rss_mb",
    "query_p99_ms",
    "start_s",
    "validator_cpu_us_per_tx",
    "sync_node_cpu_us_per_tx",
    "sync_node_peak_rss_mb",
    "import_client_cpu_s",
    "import_validators_cpu_s",
)
TARGETS = {
    "tx_per_s": ">= 4000",
    "ratio_to_ceiling": ">= 0.45",
    "latency_p50_s": "<= 0.5",
    "latency_p99_s": "<= 1.5",
    "import_resources_per_s": ">= 3000",
    "sync_speedup": ">= 5",
    "attachment_mb_per_s": ">= 100",
    "attachment_ceiling_mb_per_s": "(disk write / 4 copies)",
    "attachment_peak_rss_mb": "<= 256",
    "query_p99_ms": "<= 20",
    "start_s": "<= 3",
    "validator_cpu_us_per_tx": "(CPU per committed tx, each validator, throughput phase)",
    "sync_node_cpu_us_per_tx": "(CPU per synced tx, the node catching up, its start included)",
    "sync_node_peak_rss_mb": "(peak RSS of the node catching up, its start included)",
    "import_client_cpu_s": "(the ehr import process and its workers)",
    "import_validators_cpu_s": "(the 4 validators during the import)",
}


@dataclass(frozen=True)
class Sizes:
    throughput_txs: int
    latency_txs: int
    sync_txs: int
    import_bundles: int | None  # None: all
    attachment_bytes: int
    chain_records: int
    chain_patients: int
    queries: int
    warmup_s: float


FULL = Sizes(60_000, 10_000, 100_000, None, 1024**3, 1_000_000, 1000, 2000, 2.0)
SMOKE = Sizes(300, 100, 300, 1, 4 * 1024 * 1024, 2000, 20, 50, 0.0)


async def run(names: set[str], sizes: Sizes, workdir: Path) -> dict[str, Any]:
    figures: dict[str, Any] = dict.fromkeys(KEYS)
    notes: list[str] = []
    rate = machine.verify_rate(0.3 if sizes is SMOKE else 2.0)
    figures["verify_per_s_per_core"] = rate
    figures["ceiling_tx_per_s"] = machine.ceiling(rate)
    needs_network = names & {"throughput", "latency", "import", "sync", "attachment"}
    if needs_network:
        net = Network(workdir / "net")
        net.start()
        try:
            await _network_measures(net, names, sizes, figures, notes)
        finally:
            net.stop()
    if "query" in names:
        figures.update(
            await measures.query_and_start(
                workdir / "query", sizes.chain_records, sizes.chain_patients, sizes.queries
            )
        )
    figures["notes"] = notes
    return figures


async def _network_measures(
    net: Network, names: set[str], sizes: Sizes, figures: dict[str, Any], notes: list[str]
) -> None:
    # On fresh nodes first: a large attachment and an import measure the system's own
    # memory and speed, not what a backlog of 170,000 earlier transactions left behind.
    if "attachment" in names:
        disk = machine.disk_write_rate(net.root, min(sizes.attachment_bytes, 256 * 1024 * 1024))
        figures["disk_write_mb_per_s"] = disk
        figures["attachment_ceiling_mb_per_s"] = disk / len(net.nodes)
        figures.update(await measures.attachment(net, sizes.attachment_bytes))
    if "import" in names:
        files = sorted(workload.SAMPLES.glob("*.json")) if workload.SAMPLES.is_dir() else []
        if not files:
            files = sorted(
                (Path(__file__).resolve().parents[2] / "tests" / "data").glob("*bundle*.json")
            )
            notes.append("import: ../shared samples absent; imported the bundle in tests/data")
        if sizes.import_bundles is not None:
            files = sorted(files, key=lambda f: f.stat().st_size)[: sizes.import_bundles]
        times = _stage_times_folder()
        times_before = nodetimes.snapshot(times) if times else {}
        threads_before = net.thread_cpu()
        with tempfile.TemporaryDirectory() as keys:
            figures.update(measures.import_bundles(net, files, Path(keys)))
        threads_after = net.thread_cpu()
        by_thread = threadcpu.split_note(
            "import", threads_before, threads_after, figures["import_resources"], "resource"
        )
        busiest = threadcpu.busiest_note(
            "import", threads_before, threads_after, figures["import_elapsed_s"]
        )
        notes.extend(n for n in (by_thread, busiest) if n)
        if figures["import_resources"]:
            faults = figures["import_client_faults"]
            notes.append(
                f"import: the ehr import process and its workers took {faults:,} page faults, "
                f"{faults / figures['import_resources']:.1f} a resource"
            )
        if times:
            unit = ("resource", figures["import_resources"])
            notes.extend(
                [
                    "import " + n
                    for n in nodetimes.report(times_before, nodetimes.snapshot(times), unit)
                ]
            )
    chain = "ehr-bench"
    if names & {"throughput", "latency", "sync"}:
        total = sizes.throughput_txs + sizes.latency_txs + sizes.sync_txs
        people = await workload.register_people(
            net.urls[0], chain, validator_identity(net.homes[0]), 64, 500
        )
        # Registration returned at node 0's commit: every node must have it before its
        # generator sends records of those writers.
        await measures.all_at_height(net.urls, await measures.height(net.urls[0]))
        resources, source = workload.sample_resources(min(total, 30_000))
        notes.append(f"workload: {source}")
        work = workload.seal_and_sign(chain, people, workload.cycle(resources, total), {})
        raws = [raw for _, raw in work]
        blobs = [blob for blob, _ in work]
        split = sizes.throughput_txs + sizes.latency_txs
        first = raws[: sizes.throughput_txs]
        second = raws[sizes.throughput_txs : split]
        third = raws[split:]
        # Each phase's ciphertext goes up just before that phase: storing the sync phase's
        # 100,000 blobs first would leave LevelDB compacting them during the throughput
        # measurement (a backlog no steady state has).
        await workload.upload_blobs(net.urls[0], chain, people.providers[0], blobs[:split])
        probe_s = 0.3 if sizes is SMOKE else 2.0
        table_mib = 16 if sizes is SMOKE else 128  # the memory probe's (about 2 s at 128)
        if "throughput" in names or "latency" in names or "sync" in names:
            # Not the ceiling (that is measured first): the same probe again, next to the
            # phase it is compared with, so a run shows how far the machine's speed moved.
            again = machine.verify_rate(probe_s)
            figures["verify_per_s_per_core_before_load"] = again
            notes.append(
                f"verify rate probed again before the load phases: {again:,.0f}/s per core, "
                f"{again / figures['verify_per_s_per_core']:.0%} of the first probe's"
            )
            # And how long a read from memory takes, which the work besides the signature
            # check waits on and the check's probe does not see (note 64).
            figures["memory_latency_ns_before_load"] = machine.memory_latency_ns(table_mib)
            before = net.thread_cpu()
            times = _stage_times_folder()
            times_before = nodetimes.snapshot(times) if times else {}
            result = await throughput.sustained(
                net.urls, first, sample=lambda: (threadcpu.machine_cpu(), net.cpu_s())
            )
            after = net.thread_cpu()
            if times:
                notes.extend(nodetimes.report(times_before, nodetimes.snapshot(times)))
            figures["tx_per_s"] = result["tx_per_s"]
            used = (
                None
                if before is None or after is None
                else sum(a.total - b.total for a, b in zip(after, before, strict=True))
            )
            if used is not None and after and first:
                figures["validator_cpu_us_per_tx"] = used / len(after) / len(first) * 1e6
            by_thread = threadcpu.split_note("throughput", before, after, len(first), "transaction")
            # Where the machine's cores went while the rate was measured: a rate that
            # falls at the same CPU a transaction had less of the machine (note 56).
            spent = threadcpu.window_note(
                "throughput, while the rate was measured", result["samples"]
            )
            notes.extend(n for n in (by_thread, spent, result["window_note"]) if n)
            # Not a target: how much memory a validator takes with a backlog of 60,000.
            figures["load_peak_rss_mb"] = max(net.peak_rss_mb(i) for i in range(len(net.nodes)))
            if result["tx_per_s"] and figures["ceiling_tx_per_s"]:
                figures["ratio_to_ceiling"] = result["tx_per_s"] / figures["ceiling_tx_per_s"]
            notes.append(_speed_around_the_load(figures, probe_s, table_mib))
        if "latency" in names and figures["tx_per_s"]:
            rate = figures["tx_per_s"] / 2
            before = net.thread_cpu()
            times = _stage_times_folder()
            times_before = nodetimes.snapshot(times) if times else {}
            with tempfile.TemporaryDirectory() as sent_dir:
                figures.update(
                    await throughput.latency(
                        net.urls, second, rate, sent_dir, warmup_s=sizes.warmup_s
                    )
                )
            # The latency phase's load follows the sustained rate, and its blocks and
            # batches are small: what a transaction costs there explains its figures.
            notes.append(f"latency: {len(second):,} transactions sent at {rate:,.0f} tx/s")
            if times:
                stages = nodetimes.report(times_before, nodetimes.snapshot(times))
                notes.extend("latency " + line for line in stages)
            by_thread = threadcpu.split_note(
                "latency", before, net.thread_cpu(), len(second), "transaction"
            )
            notes.extend([by_thread] if by_thread else [])
        if "sync" in names:
            if "latency" not in names:
                # The sync phase's nonces follow the latency phase's: commit those first.
                await throughput.sustained(net.urls, second)
            await workload.upload_blobs(net.urls[0], chain, people.providers[0], blobs[split:])
            synced = await measures.block_sync(net, third, figures["tx_per_s"])
            sync_note = synced.pop("sync_node_cpu_note")
            notes.extend([sync_note] if sync_note else [])
            figures.update(synced)


def _speed_around_the_load(figures: dict[str, Any], probe_s: float, table_mib: int) -> str:
    """Both probes again right after the throughput phase, and a note of both before and
    after. The memory's latency measured alongside the load followed a validator's CPU a
    transaction over six runs; these probes, taken beside the load, catch only a spell
    that lasts past it (note 64)."""
    verify_after = machine.verify_rate(probe_s)
    memory_after = machine.memory_latency_ns(table_mib)
    figures["verify_per_s_per_core_after_load"] = verify_after
    figures["memory_latency_ns_after_load"] = memory_after
    verify_before = figures["verify_per_s_per_core_before_load"]
    memory_before = figures["memory_latency_ns_before_load"]
    return (
        f"this machine before and after the throughput phase, one core: signature checks "
        f"{verify_before:,.0f} and {verify_after:,.0f}/s; a random read from memory "
        f"{memory_before:.0f} and {memory_after:.0f} ns"
    )


def _stage_times_folder() -> Path | None:
    """Where the validators write their stage timers (``--stage-times``), if they do."""
    folder = os.environ.get(STAGE_TIMES_ENV)
    return Path(folder) if folder else None


def table(figures: dict[str, Any]) -> str:
    lines = [f"{'figure':28} {'value':>14}  target"]
    for key in KEYS:
        value = figures.get(key)
        shown = (
            "not measured"
            if value is None
            else f"{value:,.3f}"
            if isinstance(value, float)
            else str(value)
        )
        lines.append(f"{key:28} {shown:>14}  {TARGETS.get(key, '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=NAMES, help="run only these measurements")
    parser.add_argument("--out", help="write the figures as JSON to this file")
    parser.add_argument("--smoke", action="store_true", help="seconds-long sizes (CI)")
    parser.add_argument("--workdir", help="keep node data here (default: a temporary folder)")
    parser.add_argument(
        "--stage-times",
        action="store_true",
        help="time the stages of the transaction path inside the validators and print "
        "where a transaction's CPU went in the throughput phase (costs a few percent)",
    )
    parser.add_argument(
        "--compare",
        metavar="REV",
        help="run the measurements on this tree and on commit REV in turn and print both",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=3,
        help=f"with --compare: runs of each side, alternating (1 to {compare.MAX_PAIRS}, "
        "default 3)",
    )
    args = parser.parse_args(argv)
    if args.compare is not None:
        return _compare(parser, args)
    # This process is the attachment's client: tuned as the ehr CLI is (ehrnode.process).
    tune_malloc()
    names = set(args.only or NAMES)
    sizes = SMOKE if args.smoke else FULL
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="ehr-bench-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.stage_times:
            folder = workdir / "stage-times"
            shutil.rmtree(folder, ignore_errors=True)  # an earlier run's nodes' files
            os.environ[STAGE_TIMES_ENV] = str(folder)  # the nodes inherit it
            # Timers wrap Python functions, which a compiled module calls past them.
            os.environ[compiled.PURE_ENV] = "1"
        figures = asyncio.run(run(names, sizes, workdir))
        if args.stage_times:
            figures["notes"].append(
                "stage timers were on in the validators, which ran the Python sources, "
                "not the compiled build: every figure of this run includes their cost"
            )
    figures["machine"] = machine.machine()
    figures["commit"] = machine.commit_id()
    figures["smoke"] = args.smoke
    figures["seconds"] = time.time() - started
    print(f"{_machine_line(figures['machine'])}; commit {figures['commit']}")
    print(table(figures))
    for note in figures["notes"]:
        print(f"note: {note}")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def _machine_line(m: dict[str, Any]) -> str:
    return f"machine: {m['cores']} cores, {m['cpu']}, Python {m['python']} ({m['interpreter']})"


def _compare(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.workdir:
        parser.error("--workdir does not go with --compare (each run keeps its own)")
    passed = [*(["--only", *args.only] if args.only else []), *(["--smoke"] if args.smoke else [])]
    if args.stage_times:
        passed.append("--stage-times")
    try:
        result = compare.compare(args.compare, args.pairs, passed, KEYS)
    except compare.CompareError as err:
        print(f"scripts/bench: --compare: {err}", file=sys.stderr)
        return 2
    m = machine.machine()
    print(_machine_line(m))
    print(compare.table(result["rows"], args.compare))
    if args.out:
        Path(args.out).write_text(json.dumps({**result, "machine": m}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
