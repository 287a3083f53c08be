"""scripts/bench runs end to end at smoke sizes and writes the figures as valid JSON.

Figures are never asserted here: speed is measured by the benchmark, not by tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ehrnode import compiled
from ehrnode.bench import nodetimes, stages
from ehrnode.bench.__main__ import KEYS

pytestmark = pytest.mark.slow
TX = nodetimes.TX_STAGE
ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [str(ROOT / "scripts" / "bench"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(out.read_text())
    for key in KEYS:
        assert key in figures, key
        assert figures[key] is None or isinstance(figures[key], int | float), key
    measured = [k for k in KEYS if figures[k] is not None]
    assert len(measured) == len(KEYS), f"smoke left figures unmeasured: {set(KEYS) - set(measured)}"
    assert figures["machine"]["cores"] >= 1
    # The interpreter's binary, since two builds of one Python version differ by a tenth.
    assert Path(figures["machine"]["interpreter"]).is_file()
    assert "verify_per_s_per_core" in result.stdout  # the table went to stdout
    if Path("/proc/self/task").is_dir():  # Linux: the validators' CPU read by thread
        for phase in ("throughput", "latency", "import"):
            # Split, or (a smoke phase being a few clock ticks) said to be too short.
            head = f"{phase}: validator CPU by thread"
            assert any(n.startswith(head) for n in figures["notes"]), figures["notes"]
    # The latency phase's load is half the sustained rate: the note says what it was.
    [sent] = [n for n in figures["notes"] if n.startswith("latency: ") and " sent at " in n]
    assert sent.endswith(f"sent at {figures['tx_per_s'] / 2:,.0f} tx/s"), sent
    # Both probes again around the throughput phase, so that a run shows whether the
    # signature check's speed and the memory's moved (the ratio's slow spells).
    for key in (
        "verify_per_s_per_core_before_load",
        "verify_per_s_per_core_after_load",
        "memory_latency_ns_before_load",
        "memory_latency_ns_after_load",
    ):
        assert isinstance(figures[key], float), key
    [speed] = [n for n in figures["notes"] if n.startswith("this machine before and after")]
    assert f"from memory {figures['memory_latency_ns_before_load']:.0f} and" in speed
    assert f"{figures['verify_per_s_per_core_after_load']:,.0f}/s" in speed
    # A process that starts takes page faults: the client's count is read, not left at 0.
    client = [n for n in figures["notes"] if n.startswith("import: the ehr import process")]
    assert len(client) == 1, figures["notes"]
    assert int(client[0].split(" took ")[1].split()[0].replace(",", "")) > 0, client[0]


def test_stage_timers_account_for_one_signature_check_per_node() -> None:
    """``python -m ehrnode.bench.stages``: the tool that says where a transaction's CPU
    goes runs, and what it counts is the network's real work (each of the 4 validators
    decodes each record once and checks its signature once)."""
    # As Python: timers cannot wrap the calls between compiled modules.
    run = subprocess.run(
        [sys.executable, "-m", "ehrnode.bench.stages", "40"],
        env={**os.environ, compiled.PURE_ENV: "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = run.stdout
    assert "us per tx per validator" in report
    counts, times = {}, {}
    for line in report.splitlines():
        if line.endswith(" calls)"):
            *numbers, label = line.rsplit(" (", 1)[0].split()
            counts[label] = int(line.rsplit("(", 1)[1].split()[0])
            times[label] = [float(n) for n in numbers]  # with the stages inside, without
    assert counts["ehrnode.core.tx.decode"] == 4 * 40
    assert counts["Chain.commit_from_loop"] >= 4  # each node committed at least one block
    assert len(times["Chain.commit_from_loop"]) == 1  # a coroutine: no time without inner
    with_verify, without = times["ehrnode.core.tx.decode"]
    assert 0 < without < with_verify  # its signature check is a stage of its own
    assert all(len(t) == 1 or t[1] <= t[0] for t in times.values())
    assert "in the synchronous stages" in report


def test_the_stages_tool_names_a_bad_argument_without_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for bad in (["abc"], ["0"]):
        with pytest.raises(SystemExit) as stopped:
            stages.main(bad)
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        assert "records" in err and "Traceback" not in err


def test_stage_times_inside_the_validators_cover_every_transaction(tmp_path: Path) -> None:
    """``scripts/bench --stage-times``: the validators time their own stages (thread CPU)
    and the bench reports the throughput phase's and the latency phase's: each of the 4
    decoded each of the smoke run's 300 and then 100 transactions once."""
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [
            str(ROOT / "scripts" / "bench"),
            "--smoke",
            "--only",
            "throughput",
            "latency",
            "--stage-times",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    notes = json.loads(out.read_text())["notes"]
    [head] = [n for n in notes if n.startswith("stage times:")]
    assert head.startswith("stage times: 1200 transaction decodes over 4 validators"), head
    [latency] = [n for n in notes if n.startswith("latency stage times:")]
    assert latency.startswith("latency stage times: 400 transaction decodes over 4"), latency
    labels = {n.rsplit(" (", 1)[0].split()[-1] for n in notes if n.endswith(")")}
    assert {"ehrnode.core.crypto.verify", "ehrnode.core.state.execute_block"} <= labels


def test_stage_times_report_per_transaction_per_validator() -> None:
    start = {"cpu": 1.0, "seconds": {"a": 0.5}, "own": {"a": 0.5}, "calls": {TX: 10, "a": 1}}
    end = {"cpu": 3.0, "seconds": {"a": 1.5}, "own": {"a": 1.0}, "calls": {TX: 510, "a": 3}}
    lines = nodetimes.report({"1.json": start}, {"1.json": end, "2.json": end})
    # 500 decodes on one node, 510 on the other (it has no earlier snapshot): 1,010.
    assert lines[0].startswith("stage times: 1010 transaction decodes over 2 validators")
    assert f"process CPU {(2.0 + 3.0) / 1010 * 1e6:.1f} us" in lines[0]
    assert lines[1].split() == [f"{2.5 / 1010 * 1e6:.1f}", f"{1.5 / 1010 * 1e6:.1f}", "a", "(5)"]
    assert lines[-1].startswith(f"{1.5 / 1010 * 1e6:7.1f} in the synchronous stages")
    assert nodetimes.report({}, {"1.json": start | {"calls": {}}})[0].endswith("snapshots")
    # Per imported resource instead: 100 resources, each on both validators.
    per_resource = nodetimes.report(
        {"1.json": start}, {"1.json": end, "2.json": end}, ("resource", 100)
    )
    assert f"process CPU {(2.0 + 3.0) / 200 * 1e6:.1f} us a resource a validator" in per_resource[0]
    assert per_resource[1].split()[:2] == [f"{2.5 / 200 * 1e6:.1f}", f"{1.5 / 200 * 1e6:.1f}"]
    # An import that wrote nothing is reported per transaction, not divided by zero.
    nothing = nodetimes.report({"1.json": start}, {"1.json": end, "2.json": end}, ("resource", 0))
    assert nothing[0] == lines[0]
