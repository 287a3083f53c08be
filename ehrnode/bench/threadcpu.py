"""Where a validator's CPU goes by thread: its event loop's thread against its helper
threads (LevelDB's flushes and compactions, the writer threads of blob and block writes),
user time against the kernel's, from ``/proc/PID/task`` (Linux); and the page faults the
process took, each a page of memory touched for the first time (on this machine's virtual
machine 12-17 us apiece for memory it had not used before, docs/benchmarks.md note 41).

The benchmark prints the split for the throughput phase and the import. Sampling
profilers attribute a helper's time badly and the stage timers see only the event loop's
thread; this counts what the kernel charged each thread.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Below this much CPU a validator, a split by thread is a handful of clock ticks (10 ms
# each): a smoke run's helper threads came out at -17 us a transaction.
MIN_SPLIT_S = 0.5


@dataclass(frozen=True)
class ThreadCpu:
    """CPU seconds a process has used so far: its main thread's, and the rest (threads
    running now and those already ended), each as user and system time; and its minor
    page faults (every thread's)."""

    main_user: float
    main_system: float
    other_user: float
    other_system: float
    faults: int = 0

    @property
    def total(self) -> float:
        return self.main_user + self.main_system + self.other_user + self.other_system

    def __sub__(self, earlier: ThreadCpu) -> ThreadCpu:
        return ThreadCpu(
            self.main_user - earlier.main_user,
            self.main_system - earlier.main_system,
            self.other_user - earlier.other_user,
            self.other_system - earlier.other_system,
            self.faults - earlier.faults,
        )

    def __add__(self, other: ThreadCpu) -> ThreadCpu:
        return ThreadCpu(
            self.main_user + other.main_user,
            self.main_system + other.main_system,
            self.other_user + other.other_user,
            self.other_system + other.other_system,
            self.faults + other.faults,
        )


def _clock_ticks() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError, AttributeError):
        return 100


def _stat_fields(stat_file: Path) -> list[str]:
    """The fields after the command name (field 2, in parentheses, may hold spaces): the
    state is [0], minor faults (field 10) [7], user and system time (14, 15) [11], [12]."""
    return stat_file.read_text().rsplit(")", 1)[1].split()


def thread_cpu(pid: int, proc: Path = Path("/proc")) -> ThreadCpu | None:
    """``pid``'s CPU by thread so far, or None where there is no such ``/proc`` entry."""
    ticks = _clock_ticks()
    try:
        # The main thread first: the process's line, read after it, then counts at least
        # as much, so no reading gives the helpers less than nothing (the difference of
        # two can still be a tick off either way: ``MIN_SPLIT_S``).
        main = _stat_fields(proc / str(pid) / "task" / str(pid) / "stat")
        whole = _stat_fields(proc / str(pid) / "stat")
        total_user, total_system, faults = int(whole[11]), int(whole[12]), int(whole[7])
        main_user, main_system = int(main[11]), int(main[12])
    except (OSError, IndexError, ValueError):
        return None
    # The process's own line counts every thread, ended ones included.
    return ThreadCpu(
        main_user / ticks,
        main_system / ticks,
        max(0, total_user - main_user) / ticks,
        max(0, total_system - main_system) / ticks,
        faults,
    )


def split_note(
    phase: str,
    before: list[ThreadCpu] | None,
    after: list[ThreadCpu] | None,
    count: int,
    unit: str,
) -> str | None:
    """One line: the validators' CPU per ``unit`` per validator between two readings,
    by thread, and their page faults; None when a reading is missing or nothing was
    counted. Too little CPU for a split to mean anything (the kernel counts in clock
    ticks, and a smoke run's phase is a few of them) is said instead of split."""
    if count <= 0 or not before or not after:
        return None
    total = sum((a - b for a, b in zip(after, before, strict=True)), ThreadCpu(0, 0, 0, 0, 0))
    scale = 1e6 / count / len(after)
    main = (total.main_user + total.main_system) * scale
    other = (total.other_user + total.other_system) * scale
    whole = main + other
    if whole <= 0:
        return None
    if total.total / len(after) < MIN_SPLIT_S:
        return (
            f"{phase}: validator CPU by thread not split: {total.total / len(after):.2f} s "
            "a validator is too few clock ticks"
        )
    return (
        f"{phase}: validator CPU by thread, us a {unit} a validator: event-loop thread "
        f"{main:.0f} (user {total.main_user * scale:.0f}, system "
        f"{total.main_system * scale:.0f}), helper threads {other:.0f} (user "
        f"{total.other_user * scale:.0f}, system {total.other_system * scale:.0f}); "
        f"system time {(total.main_system + total.other_system) * scale / whole:.0%} of it; "
        f"{total.faults / count / len(after):.1f} page faults a {unit} a validator"
    )


def busiest_note(
    phase: str, before: list[ThreadCpu] | None, after: list[ThreadCpu] | None, seconds: float
) -> str | None:
    """One line: each validator's event-loop thread as a share of the phase's wall time.
    A share near 100% is a node whose loop the phase waits on (a single-threaded stage of
    the pipeline), whatever the machine's other core is doing."""
    if seconds <= 0 or not before or not after:
        return None
    shares = [
        (a.main_user + a.main_system - b.main_user - b.main_system) / seconds
        for a, b in zip(after, before, strict=True)
    ]
    totals = [(a - b).total for a, b in zip(after, before, strict=True)]
    listed = ", ".join(
        f"node {i} {share:.0%} ({total:.1f} s all threads)"
        for i, (share, total) in enumerate(zip(shares, totals, strict=True))
    )
    return f"{phase}: event-loop thread busy over {seconds:.1f} s: {listed}"


@dataclass(frozen=True)
class MachineCpu:
    """The whole machine's CPU time so far, from ``/proc/stat``'s ``cpu`` line, in
    seconds summed over its cores: busy (user, nice, system, interrupts), idle (idle and
    I/O wait) and stolen (a virtual machine's time its host gave to someone else)."""

    busy: float
    idle: float
    steal: float


def machine_cpu(stat: Path = Path("/proc/stat")) -> MachineCpu | None:
    """The machine's CPU so far, or None where there is no readable ``/proc/stat``."""
    try:
        for line in stat.read_text().splitlines():
            if line.startswith("cpu "):
                values = [int(v) for v in line.split()[1:]]
                break
        else:
            return None
    except (OSError, ValueError):
        return None
    values += [0] * (8 - len(values))
    user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
    ticks = _clock_ticks()
    return MachineCpu(
        (user + nice + system + irq + softirq) / ticks, (idle + iowait) / ticks, steal / ticks
    )


def machine_note(
    phase: str,
    before: MachineCpu | None,
    after: MachineCpu | None,
    validators_s: float | None,
    seconds: float,
) -> str | None:
    """One line: how the machine's cores were spent over the phase, in cores on average:
    the validators, every other process, idle, and stolen by the host. A phase whose
    validators had less than the whole machine says here where the rest went (a pause of
    the network shows as idle, another tenant of the host as stolen)."""
    if before is None or after is None or validators_s is None or seconds <= 0:
        return None
    busy = (after.busy - before.busy) / seconds
    others = max(0.0, busy - validators_s / seconds)
    return (
        f"{phase}: the machine's cores over {seconds:.1f} s, on average: validators "
        f"{validators_s / seconds:.2f}, other processes {others:.2f}, idle "
        f"{(after.idle - before.idle) / seconds:.2f}, stolen by the host "
        f"{(after.steal - before.steal) / seconds:.2f}"
    )


def window_note(
    phase: str, samples: list[tuple[float, tuple[MachineCpu | None, list[float] | None]]]
) -> str | None:
    """``machine_note`` between the first and last of ``samples``: (time, (the machine's
    reading, each validator's CPU seconds so far)), as the throughput phase takes them."""
    if len(samples) < 2:
        return None
    (t0, (machine0, nodes0)), (t1, (machine1, nodes1)) = samples[0], samples[-1]
    if nodes0 is None or nodes1 is None:
        return None
    return machine_note(phase, machine0, machine1, sum(nodes1) - sum(nodes0), t1 - t0)
