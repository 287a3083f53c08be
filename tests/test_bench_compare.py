"""``scripts/bench --compare REV``: both sides measured in turn, summarised per figure."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ehrnode import compiled
from ehrnode.bench import compare
from ehrnode.bench.__main__ import KEYS

ROOT = Path(__file__).resolve().parents[1]
IN_GIT = (ROOT / ".git").exists()


def _run(verify: float, per_tx: float | None, **extra: Any) -> dict[str, Any]:
    return {"verify_per_s_per_core": verify, "validator_cpu_us_per_tx": per_tx, **extra}


def test_summary_gives_medians_ratios_and_cost_in_signature_checks() -> None:
    a = [_run(10_000, 300.0), _run(12_000, 250.0), _run(8_000, 400.0)]
    b = [_run(10_000, 200.0), _run(12_000, 150.0), _run(8_000, 300.0)]
    rows = {r["figure"]: r for r in compare.summary(a, b, KEYS)}
    cpu = rows["validator_cpu_us_per_tx"]
    assert cpu["a"] == [300.0, 250.0, 400.0] and cpu["a_median"] == 300.0
    assert cpu["b_median"] == 200.0 and cpu["a_over_b"] == pytest.approx(1.5)
    # 300 us at 10,000 checks a second is the CPU of 3 checks; 250 at 12,000 of 3 too.
    checks = rows["validator_cpu_per_tx_in_checks"]
    assert checks["a"] == pytest.approx([3.0, 3.0, 3.2])
    assert checks["b"] == pytest.approx([2.0, 1.8, 2.4])
    # Figures one side did not measure are left out, not shown as zero.
    assert "tx_per_s" not in rows and "import_cpu_us_per_resource" not in rows


def test_import_cost_per_resource_counts_the_client_and_the_validators() -> None:
    run = _run(10_000, None, import_client_cpu_s=5.0, import_validators_cpu_s=10.0)
    run["import_resources"] = 30_000
    derived = compare.derived(run)
    assert derived["import_cpu_us_per_resource"] == pytest.approx(500.0)
    assert derived["import_cpu_per_resource_in_checks"] == pytest.approx(5.0)
    assert derived["validator_cpu_per_tx_in_checks"] is None


def test_sides_alternate_so_a_drifting_machine_favours_neither(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: list[tuple[str, tuple[str, ...]]] = []

    def fake_run(tree: Path, args: Any, out: Path, name: str) -> dict[str, Any]:
        seen.append((name, tuple(args)))
        return _run(10_000, 100.0 if name == "this tree" else 90.0)

    compiled_trees: list[Path] = []
    monkeypatch.setattr(compare, "resolve", lambda rev: "ab" * 20)
    monkeypatch.setattr(compare, "export", lambda commit, into: tmp_path)
    monkeypatch.setattr(compare, "run_once", fake_run)

    def write_bytecode(package: Path = compiled.PACKAGE) -> bool:
        compiled_trees.append(package)
        return True

    monkeypatch.setattr(compiled, "write_bytecode", write_bytecode)
    result = compare.compare("v1", 3, ["--only", "throughput"], KEYS, report=lambda _: None)
    # This tree byte-compiled before its runs, as the rev's tree is by ``export`` (faked
    # here; the test below checks it): neither side compiles its sources at each start.
    assert compiled_trees == [compiled.PACKAGE]
    assert result["order"] == ["a", "b", "b", "a", "a", "b"]
    assert [name for name, _ in seen] == [
        "this tree", "v1 (ababababa)", "v1 (ababababa)", "this tree", "this tree",
        "v1 (ababababa)",
    ]  # fmt: skip
    assert {args for _, args in seen} == {("--only", "throughput")}
    rows = {r["figure"]: r for r in result["rows"]}
    # This tree's 100 us against REV's 90: a change that costs 11% more CPU.
    assert rows["validator_cpu_us_per_tx"]["a_over_b"] == pytest.approx(100 / 90)


@pytest.mark.parametrize("pairs", [0, compare.MAX_PAIRS + 1])
def test_pairs_out_of_range_are_refused(pairs: int) -> None:
    with pytest.raises(compare.CompareError, match="--pairs must be from 1"):
        compare.compare("HEAD", pairs, [], KEYS)


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / "scripts" / "bench"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.skipif(not IN_GIT, reason="--compare needs this tree's git history")
def test_a_rev_that_is_not_a_commit_is_named_without_a_traceback() -> None:
    result = _bench("--compare", "no-such-rev-here", "--smoke")
    assert result.returncode == 2
    assert "'no-such-rev-here' is not a commit" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(not IN_GIT, reason="--compare needs this tree's git history")
def test_compare_runs_this_tree_and_head_and_writes_both(tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    result = _bench("--compare", "HEAD", "--pairs", "1", "--smoke", "--only", "import",
                    "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["order"] == ["a", "b"]
    for side in ("a", "b"):
        (run,) = report["runs"][side]
        assert run["import_resources_per_s"] > 0 and run["tx_per_s"] is None
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert report["commit"] == head and report["runs"]["b"][0]["commit"] == head[:7]
    figures = {row["figure"] for row in report["rows"]}
    assert {"import_resources_per_s", "import_cpu_per_resource_in_checks"} <= figures
    assert "import_resources_per_s" in result.stdout and "HEAD: median" in result.stdout


@pytest.mark.skipif(not IN_GIT, reason="--compare needs this tree's git history")
def test_the_rev_is_byte_compiled_as_this_tree_is(tmp_path: Path) -> None:
    """Otherwise, where Python writes no .pyc, each of the rev's processes would compile
    its sources at start, and its starts would be measured slower than this tree's."""
    tree = compare.export(compare.resolve("HEAD"), tmp_path)
    modules = sorted((tree / "ehrnode").rglob("*.py"))
    assert len(modules) > 40
    missing = [m for m in modules if not Path(importlib.util.cache_from_source(str(m))).is_file()]
    assert missing == []
