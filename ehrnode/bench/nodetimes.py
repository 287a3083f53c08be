"""Stage timers inside the running validators: ``scripts/bench --stage-times``.

With ``EHR_STAGE_TIMES`` naming a folder, ``ehrnode run`` wraps the synchronous stages of
``ehrnode.bench.stages.STAGES`` in timers of its own threads' CPU time and writes what they
hold (and the process's CPU time) to ``FOLDER/PID.json`` four times a second. The bench
reads the files before and after its throughput phase and prints where a transaction's CPU
went in the real network: the same code costs two to three times as much there as in a hot
loop or in ``python -m ehrnode.bench.stages`` (caches shared with three other nodes, heaps
of hundreds of MB), and sampling profilers mislead (note 33 of docs/benchmarks.md). Each
timed call costs about a microsecond and a half of timer.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from ehrnode.bench.stages import Timers

DUMP_EVERY_S = 0.25
TX_STAGE = "ehrnode.core.tx.decode"  # called once per transaction per validator


def record(folder: Path) -> None:
    """In a node process: time the stages, and keep ``folder/PID.json`` up to date."""
    folder.mkdir(parents=True, exist_ok=True)
    timers = Timers(clock=time.thread_time)
    timers.install(coroutines=False)  # thread time across awaits is other tasks' too
    path = folder / f"{os.getpid()}.json"

    def dump() -> None:
        while True:
            state = {
                "cpu": time.process_time(),
                "seconds": dict(timers.seconds),
                "own": dict(timers.own),
                "calls": dict(timers.calls),
            }
            partial = path.with_suffix(".tmp")
            partial.write_text(json.dumps(state))
            partial.replace(path)  # a reader never sees half a file
            time.sleep(DUMP_EVERY_S)

    threading.Thread(target=dump, name="stage-times", daemon=True).start()


def snapshot(folder: Path) -> dict[str, dict[str, Any]]:
    """What each node's timers hold now, by file name."""
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def report(
    before: dict[str, dict[str, Any]],
    after: dict[str, dict[str, Any]],
    unit: tuple[str, int] | None = None,
) -> list[str]:
    """Per transaction per validator, between two snapshots: each stage with the stages
    inside it and without them, and the process CPU no synchronous stage holds.
    ``unit``: per that many of something else instead (``("resource", 26617)`` for an
    import, whose transactions each carry many records)."""
    txs = 0
    cpu = 0.0
    seconds: dict[str, float] = {}
    own: dict[str, float] = {}
    calls: dict[str, int] = {}
    for name, end in after.items():
        start = before.get(name, {"cpu": 0.0, "seconds": {}, "own": {}, "calls": {}})
        txs += end["calls"].get(TX_STAGE, 0) - start["calls"].get(TX_STAGE, 0)
        cpu += end["cpu"] - start["cpu"]
        for table, into in (("seconds", seconds), ("own", own), ("calls", calls)):
            for label, value in end[table].items():
                into[label] = into.get(label, 0) + value - start[table].get(label, 0)
    if txs == 0:
        return ["stage times: no transaction decoded between the snapshots"]
    # Each validator decodes each transaction once: ``txs`` counts them over all of them.
    name, count = unit if unit and unit[1] else ("transaction", txs / len(after))
    per = 1e6 / (count * len(after))
    lines = [
        f"stage times: {txs} transaction decodes over {len(after)} validators; process CPU "
        f"{cpu * per:.1f} us a {name} a validator; by stage, us with the stages "
        "inside it / without them (calls)"
    ]
    for label, total in sorted(seconds.items(), key=lambda item: -item[1]):
        inner = f"{own[label] * per:7.1f}" if label in own else " " * 7
        lines.append(f"{total * per:7.1f} {inner}  {label} ({calls.get(label, 0)})")
    inside = sum(own.values())
    outside = (cpu - inside) * per
    lines.append(f"{inside * per:7.1f} in the synchronous stages, {outside:.1f} outside")
    return lines
