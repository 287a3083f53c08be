"""``scripts/bench --compare REV``: the same measurements on this tree and on commit REV,
run in turn, so that a change is judged against this machine's noise and not against a
figure recorded on another day.

- A is this tree as it is (uncommitted changes included); B is REV, its files written
  to a temporary folder (whose ``../shared`` is this tree's). Both are byte-compiled
  first and run on this environment's interpreter and packages.
- ``pairs`` pairs in the order A B, B A, A B, ...: a machine that speeds up or slows down
  during the comparison favours neither side.
- Each run is its own ``python -m ehrnode.bench`` process with the same ``--only`` and
  ``--smoke``, so each starts its own nodes.
- Printed per figure: each side's values, their medians, and A's median over B's (1.05
  for a rate: this tree is 5% faster than REV). Rates
  move with the machine's speed from one minute to the next (docs/benchmarks.md, notes
  36-37), so the CPU a transaction or a resource cost is also given in signature checks'
  worth: its CPU time multiplied by that run's own verify probe.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ehrnode import compiled

ROOT = Path(__file__).resolve().parents[2]
MAX_PAIRS = 20


class CompareError(Exception):
    """What stops a comparison, in a sentence for the user."""


def _per_resource(figures: dict[str, Any]) -> float | None:
    client, nodes = figures.get("import_client_cpu_s"), figures.get("import_validators_cpu_s")
    resources = figures.get("import_resources")
    if client is None or nodes is None or not resources:
        return None
    return float((client + nodes) / resources * 1e6)


def _in_checks(us: float | None, figures: dict[str, Any]) -> float | None:
    rate = figures.get("verify_per_s_per_core")
    return None if us is None or not rate else us * rate / 1e6


def derived(figures: dict[str, Any]) -> dict[str, float | None]:
    """Figures of one run that hold up better against the machine's speed."""
    per_tx = figures.get("validator_cpu_us_per_tx")
    per_resource = _per_resource(figures)
    return {
        "validator_cpu_per_tx_in_checks": _in_checks(per_tx, figures),
        "import_cpu_us_per_resource": per_resource,
        "import_cpu_per_resource_in_checks": _in_checks(per_resource, figures),
    }


def summary(
    a_runs: list[dict[str, Any]], b_runs: list[dict[str, Any]], keys: Sequence[str]
) -> list[dict[str, Any]]:
    """Per figure of ``keys`` (and of ``derived``) measured on both sides: the values, the
    medians, A's median over B's."""
    a_all = [{**r, **derived(r)} for r in a_runs]
    b_all = [{**r, **derived(r)} for r in b_runs]
    rows = []
    for key in [*keys, *derived({})]:
        a = [r[key] for r in a_all if isinstance(r.get(key), int | float)]
        b = [r[key] for r in b_all if isinstance(r.get(key), int | float)]
        if not a or not b:
            continue
        a_median, b_median = statistics.median(a), statistics.median(b)
        ratio = a_median / b_median if b_median else None
        rows.append(
            {
                "figure": key,
                "a": a,
                "b": b,
                "a_median": a_median,
                "b_median": b_median,
                "a_over_b": ratio,
            }
        )
    return rows


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.3g}"


def table(rows: list[dict[str, Any]], rev: str) -> str:
    head = f"{'figure':34} {'this tree: median (runs)':38} {rev + ': median (runs)':38}"
    lines = [head + " this/" + rev]
    for row in rows:
        a = f"{_number(row['a_median'])} ({' / '.join(_number(v) for v in row['a'])})"
        b = f"{_number(row['b_median'])} ({' / '.join(_number(v) for v in row['b'])})"
        ratio = "-" if row["a_over_b"] is None else f"{row['a_over_b']:.3f}"
        lines.append(f"{row['figure']:34} {a:38} {b:38} {ratio}")
    return "\n".join(lines)


def resolve(rev: str) -> str:
    """The full commit id REV names in this repository."""
    if rev.startswith("-"):
        raise CompareError(f"'{rev}' is not a commit")
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError as err:
        raise CompareError(f"git is needed to export '{rev}': {err}") from err
    if out.returncode != 0 or not out.stdout.strip():
        raise CompareError(f"'{rev}' is not a commit of the repository in {ROOT}")
    return out.stdout.strip()


def export(commit: str, into: Path) -> Path:
    """``commit``'s files in ``into/tree`` (through an index of its own: this repository's
    index and work tree are not touched), with ``into/shared`` standing for ``../shared``."""
    tree = into / "tree"
    env = dict(os.environ, GIT_INDEX_FILE=str(into / "index"))
    for command in (
        ["git", "read-tree", commit],
        ["git", "checkout-index", "--all", f"--prefix={tree}/"],
    ):
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise CompareError(f"cannot export {commit[:12]}: {done.stderr.strip()[-300:]}")
    # Byte-compiled, as ``compare`` does this tree: otherwise, where Python writes no
    # .pyc, each of the rev's processes would compile its sources at start.
    compiled.write_bytecode(tree / "ehrnode")
    shared = ROOT.parent / "shared"
    if shared.is_dir():
        (into / "shared").symlink_to(shared, target_is_directory=True)
    return tree


def run_once(tree: Path, args: Sequence[str], out: Path, name: str) -> dict[str, Any]:
    """One bench run of the code in ``tree`` (``name`` in an error); its figures."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run(
        [sys.executable, "-m", "ehrnode.bench", *args, "--out", str(out)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0 or not out.exists():
        raise CompareError(f"the bench of {name} failed: {done.stderr.strip()[-800:]}")
    figures: dict[str, Any] = json.loads(out.read_text())
    return figures


def compare(
    rev: str,
    pairs: int,
    args: Sequence[str],
    keys: Sequence[str],
    *,
    report: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> dict[str, Any]:
    """Run the pairs and return what ``--out`` writes: every run's figures and the rows."""
    if not 1 <= pairs <= MAX_PAIRS:
        raise CompareError(f"--pairs must be from 1 to {MAX_PAIRS}, not {pairs}")
    commit = resolve(rev)
    label = f"{rev} ({commit[:9]})"
    compiled.write_bytecode()  # this tree, as export does the rev's (a no-op when done)
    with tempfile.TemporaryDirectory(prefix="ehr-compare-") as tmp:
        trees = {"a": ROOT, "b": export(commit, Path(tmp))}
        runs: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
        order = []
        for pair in range(pairs):
            order += ["a", "b"] if pair % 2 == 0 else ["b", "a"]
        for n, side in enumerate(order, 1):
            name = "this tree" if side == "a" else label
            report(f"run {n} of {len(order)}: {name}")
            figures = run_once(trees[side], args, Path(tmp) / f"run-{n}.json", name)
            if side == "b":  # its exported tree has no git metadata to name it by
                figures["commit"] = commit[:7]
            runs[side].append(figures)
    rows = summary(runs["a"], runs["b"], keys)
    return {"rev": rev, "commit": commit, "order": order, "runs": runs, "rows": rows}
