"""scripts/bench runs end to end at smoke sizes and writes the figures as valid JSON.

Figures are never asserted here: speed is measured by the benchmark, not by tests."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ehrnode.bench import stages
from ehrnode.bench.__main__ import KEYS

pytestmark = pytest.mark.slow
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
    assert "verify_per_s_per_core" in result.stdout  # the table went to stdout


async def test_stage_timers_account_for_one_signature_check_per_node(tmp_path: Path) -> None:
    """``python -m ehrnode.bench.stages``: the tool that says where a transaction's CPU
    goes runs, and what it counts is the network's real work (each of the 4 validators
    decodes each record once and checks its signature once)."""
    report = await stages.measure(tmp_path, 40)
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
