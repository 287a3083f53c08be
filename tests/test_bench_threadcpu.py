"""The benchmark's split of a validator's CPU by thread (``ehrnode.bench.threadcpu``)."""

from __future__ import annotations

import mmap
import os
import threading
import time
from pathlib import Path

import pytest

from ehrnode.bench.threadcpu import (
    MachineCpu,
    ThreadCpu,
    busiest_note,
    machine_cpu,
    machine_note,
    split_note,
    thread_cpu,
    window_note,
)

linux_only = pytest.mark.skipif(
    not Path(f"/proc/{os.getpid()}/task").is_dir(), reason="needs Linux's /proc/PID/task"
)


def _burn(seconds: float) -> None:
    """Use ``seconds`` of this thread's CPU (bounded by a wall-clock limit too)."""
    start, deadline = time.thread_time(), time.monotonic() + 30
    while time.thread_time() - start < seconds and time.monotonic() < deadline:
        sum(range(1000))


@linux_only
def test_a_helper_threads_cpu_is_counted_apart_from_the_main_threads() -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("the test must run on the process's main thread")
    before = thread_cpu(os.getpid())
    assert before is not None
    helper = threading.Thread(target=_burn, args=(0.3,))
    helper.start()
    helper.join()  # ended: its time still counts, from the process's own line
    after = thread_cpu(os.getpid())
    assert after is not None
    used = after - before
    # Clock ticks are 10 ms: 0.3 s of helper work shows as at least 0.2 s.
    assert used.other_user + used.other_system >= 0.2
    assert used.main_user + used.main_system < 0.2  # the main thread only waited
    main_start = thread_cpu(os.getpid())
    assert main_start is not None
    _burn(0.3)
    main_end = thread_cpu(os.getpid())
    assert main_end is not None
    assert (main_end - main_start).main_user >= 0.2


def test_a_process_that_is_gone_reads_as_none(tmp_path: Path) -> None:
    assert thread_cpu(123456, proc=tmp_path) is None


def test_a_command_name_with_spaces_and_parentheses_is_read_right(tmp_path: Path) -> None:
    # Fields after the name: state, ppid, ... minflt is the 10th field, utime the 14th and
    # stime the 15th.
    rest = " ".join(["S"] + ["0"] * 6 + ["{f}"] + ["0"] * 3 + ["{u}", "{s}"] + ["0"] * 30)
    (tmp_path / "7" / "task" / "7").mkdir(parents=True)
    (tmp_path / "7" / "stat").write_text("7 (ehr node (x)) " + rest.format(f=900, u=500, s=300))
    (tmp_path / "7" / "task" / "7" / "stat").write_text(
        "7 (ehr node (x)) " + rest.format(f=600, u=400, s=100)
    )
    ticks = os.sysconf("SC_CLK_TCK")
    reading = thread_cpu(7, proc=tmp_path)
    # The faults are the process's (every thread's), from its own line.
    assert reading == ThreadCpu(400 / ticks, 100 / ticks, 100 / ticks, 200 / ticks, 900)


@linux_only
def test_memory_touched_for_the_first_time_counts_as_page_faults() -> None:
    before = thread_cpu(os.getpid())
    assert before is not None
    size = 16 * 1024 * 1024
    with mmap.mmap(-1, size) as fresh:  # anonymous: no page is there until touched
        if hasattr(mmap, "MADV_NOHUGEPAGE"):  # a huge page would take 512 in one fault
            fresh.madvise(mmap.MADV_NOHUGEPAGE)
        for offset in range(0, size, mmap.PAGESIZE):
            fresh[offset] = 1
        after = thread_cpu(os.getpid())
    assert after is not None
    assert (after - before).faults >= size // mmap.PAGESIZE * 0.9


def test_the_note_gives_microseconds_a_unit_a_validator() -> None:
    zero = ThreadCpu(0, 0, 0, 0)
    # Two validators, 10,000 transactions: 2 s main user on each = 200 us a transaction.
    after = [ThreadCpu(2.0, 0.5, 0.1, 0.4, 30000)] * 2
    note = split_note("throughput", [zero, zero], after, 10_000, "transaction")
    assert note == (
        "throughput: validator CPU by thread, us a transaction a validator: event-loop "
        "thread 250 (user 200, system 50), helper threads 50 (user 10, system 40); "
        "system time 30% of it; 3.0 page faults a transaction a validator"
    )


def test_no_note_without_readings_or_work() -> None:
    zero = ThreadCpu(0, 0, 0, 0)
    assert split_note("import", None, [zero], 10, "resource") is None
    assert split_note("import", [zero], [zero], 0, "resource") is None
    assert split_note("import", [zero], [zero], 10, "resource") is None


def test_a_few_clock_ticks_are_not_split() -> None:
    """A smoke run's phase is a few ticks of CPU: its split would be noise (it once gave
    helper threads a negative time)."""
    zero = ThreadCpu(0, 0, 0, 0)
    short = [ThreadCpu(0.3, 0.02, 0.0, 0.01, 50)] * 4
    assert split_note("throughput", [zero] * 4, short, 300, "transaction") == (
        "throughput: validator CPU by thread not split: 0.33 s a validator is too few clock ticks"
    )
    enough = [ThreadCpu(0.55, 0.02, 0.02, 0.01, 50)] * 4
    note = split_note("throughput", [zero] * 4, enough, 300, "transaction")
    assert note is not None and "helper threads 100 (user 67, system 33)" in note


def test_the_busiest_note_gives_each_event_loop_as_a_share_of_the_wall_time() -> None:
    """Whether one node's event loop is what a phase waits on: its main thread's CPU over
    the phase's seconds, each node's helper threads counted in its total only."""
    before = [ThreadCpu(1.0, 0.0, 5.0, 0.0), ThreadCpu(0, 0, 0, 0)]
    after = [ThreadCpu(8.0, 1.0, 6.0, 1.0), ThreadCpu(2.0, 0.5, 0.5, 0.0)]
    assert busiest_note("import", before, after, 10.0) == (
        "import: event-loop thread busy over 10.0 s: node 0 80% (10.0 s all threads), "
        "node 1 25% (3.0 s all threads)"
    )
    assert busiest_note("import", None, after, 10.0) is None
    assert busiest_note("import", before, after, 0.0) is None


def _proc_stat(tmp_path: Path, name: str, fields: list[int]) -> Path:
    path = tmp_path / name
    path.write_text(
        "cpu  " + " ".join(str(v) for v in fields) + "\ncpu0 1 2 3 4 5 6 7 8 0 0\nintr 9\n"
    )
    return path


def test_the_machines_cores_are_split_into_validators_others_idle_and_stolen(
    tmp_path: Path,
) -> None:
    ticks = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal guest guest_nice, in clock ticks
    start = _proc_stat(tmp_path, "a", [0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    end = [150 * ticks, 10 * ticks, 20 * ticks, 15 * ticks, 5 * ticks, 0, 0, 10 * ticks, 0, 0]
    before = machine_cpu(start)
    after = machine_cpu(_proc_stat(tmp_path, "b", end))
    assert before is not None and after is not None
    assert (after.busy, after.idle, after.steal) == (180.0, 20.0, 10.0)
    # Over 100 s the validators used 160 s of CPU: 1.6 cores of the 1.8 busy.
    note = machine_note("throughput", before, after, 160.0, 100.0)
    assert note == (
        "throughput: the machine's cores over 100.0 s, on average: validators 1.60, "
        "other processes 0.20, idle 0.20, stolen by the host 0.10"
    )


def test_a_machine_without_proc_stat_gives_no_note(tmp_path: Path) -> None:
    assert machine_cpu(tmp_path / "absent") is None
    (tmp_path / "odd").write_text("intr 9\n")
    assert machine_cpu(tmp_path / "odd") is None
    assert machine_note("throughput", None, None, 1.0, 1.0) is None


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="needs Linux's /proc/stat")
def test_this_machines_time_moves_forward_while_a_thread_works() -> None:
    before = machine_cpu()
    _burn(0.3)
    after = machine_cpu()
    assert before is not None and after is not None
    # This thread's 0.3 s is in the machine's busy time (clock ticks: at least 0.2 s).
    assert after.busy - before.busy >= 0.2
    assert after.idle >= before.idle and after.steal >= before.steal


def test_the_window_note_spans_the_first_and_last_sample() -> None:
    def reading(busy: float, idle: float) -> MachineCpu:
        return MachineCpu(busy, idle, 0.0)

    samples = [
        (10.0, (reading(100.0, 50.0), [1.0, 1.0, 1.0, 1.0])),
        (12.0, (reading(102.0, 52.0), [1.5, 1.5, 1.5, 1.5])),  # between: not used
        (14.0, (reading(107.0, 51.0), [2.5, 2.5, 2.5, 2.5])),
    ]
    note = window_note("window", samples)
    # 4 s: the machine busy 7 s (1.75 cores), the validators 6 s of it (1.50).
    assert note == (
        "window: the machine's cores over 4.0 s, on average: validators 1.50, "
        "other processes 0.25, idle 0.25, stolen by the host 0.00"
    )
    assert window_note("window", samples[:1]) is None  # one sample spans no time
    assert window_note("window", [(1.0, (None, None)), (2.0, (None, None))]) is None
