"""Process-wide tuning: glibc's malloc keeps the memory a stream of large buffers goes
through, instead of handing it back to the kernel and faulting it in again; Python's
collector runs far less often while a process builds and holds many small objects."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from ehrnode.client import cli as ehr_cli
from ehrnode.process import tune_malloc

# Buffers like a replicated attachment's: 64 KiB chunks copied out of a 4 MiB block, joined
# and dropped, round after round; prints the minor page faults the later rounds took.
WORKLOAD = """
import os, resource, sys
if sys.argv[1] == "tuned":
    from ehrnode.process import tune_malloc
    assert tune_malloc()
data = os.urandom(4 << 20)
def rounds(count):
    for i in range(count):
        held = [bytes(data[j : j + (64 << 10) + i]) for j in range(0, 4 << 20, 64 << 10)]
        joined = b"".join(held)
        del held, joined
rounds(20)  # malloc's thresholds settle (and the tuned heap grows) first
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(40)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""

GLIBC = platform.libc_ver()[0] == "glibc"


def faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", WORKLOAD, mode], capture_output=True, text=True, check=True
    )
    return int(done.stdout)


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc malloc's")
def test_tuned_malloc_stops_faulting_in_the_same_memory_again_and_again() -> None:
    plain, tuned = faults("plain"), faults("tuned")
    assert tuned * 10 < plain, (plain, tuned)


@pytest.mark.skipif(GLIBC, reason="on glibc the tuning applies")
def test_without_glibc_the_tuning_is_left_alone() -> None:
    assert tune_malloc() is False


# What an import does: parse bundles and hold them; prints how many collections ran.
HOLDING = """
import gc, json, sys
if sys.argv[1] == "tuned":
    from ehrnode.process import tune_gc
    tune_gc()
entry = json.dumps([{"resource": {"id": str(i)}} for i in range(500)])
before = sum(s["collections"] for s in gc.get_stats())
held = [json.loads(entry) for _ in range(400)]
print(sum(s["collections"] for s in gc.get_stats()) - before)
"""


def collections(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", HOLDING, mode], capture_output=True, text=True, check=True
    )
    return int(done.stdout)


def test_tuned_collector_runs_far_less_often_while_objects_pile_up() -> None:
    plain, tuned = collections("plain"), collections("tuned")
    assert tuned * 10 < plain, (plain, tuned)


def test_the_ehr_command_tunes_the_collector_before_it_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    called: list[str] = []
    monkeypatch.setattr(ehr_cli, "tune_gc", lambda: called.append("gc"))
    with pytest.raises(SystemExit):
        ehr_cli.main(["--help"])
    assert called == ["gc"]
