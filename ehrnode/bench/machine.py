"""The machine line and its ceiling: ed25519 verifications per second on one core, and the
committed-transaction rate that allows for 4 validators sharing this machine's cores
(each transaction is verified once on every validator)."""

from __future__ import annotations

import array
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ehrnode.core import crypto

VALIDATORS = 4


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def interpreter() -> str:
    """The Python binary the nodes run on (a virtual environment's base interpreter): two
    builds of one version differ by a tenth or more in CPU (docs/benchmarks.md, note 36)."""
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


def machine() -> dict[str, Any]:
    return {
        "cores": cores(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "interpreter": interpreter(),
        "platform": platform.platform(),
    }


def commit_id() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[2],
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def verify_rate(seconds: float = 1.0) -> float:
    """ed25519 verifications per second on one core (this process), signatures made first."""
    identity = crypto.Identity.generate()
    messages = [os.urandom(200) for _ in range(256)]
    signed = [(m, identity.sign(b"", m)) for m in messages]
    key = identity.public_key
    count = 0
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        for message, sig in signed:
            crypto.verify(key, b"", message, sig)
        count += len(signed)
    return count / (time.perf_counter() - started)


# A full-period linear congruential order over a power-of-two table (multiplier 1 mod 4,
# odd increment): every slot is visited once a cycle, in an order no prefetcher follows.
_CHASE_MULTIPLIER = 2654435761
_CHASE_INCREMENT = 12345


def chase_table(mib: int) -> array.array[int]:
    """``mib`` MiB of 8-byte slots, slot i holding ``i * multiplier + increment``: masked to
    the table's size, the next slot of the order above."""
    slots = mib * 1024 * 1024 // 8
    stop = _CHASE_INCREMENT + slots * _CHASE_MULTIPLIER
    return array.array("q", range(_CHASE_INCREMENT, stop, _CHASE_MULTIPLIER))


def _chase_ns(mib: int, steps: int, rounds: int) -> float:
    """Median nanoseconds a step of a dependent chase through ``mib`` MiB (each read's
    value names the next slot)."""
    table = chase_table(mib)
    mask = len(table) - 1
    times = []
    at = 0
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(steps):
            at = table[at & mask]
        times.append((time.perf_counter() - started) / steps * 1e9)
    return statistics.median(times)


def memory_latency_ns(mib: int = 128, steps: int = 100_000, rounds: int = 5) -> float:
    """Nanoseconds a random read from memory takes on this machine now (one core): a chase
    through ``mib`` MiB, where each read names the next, less the same chase through 1 MiB
    (the interpreter's own cost a step, the table then in cache). Not a ceiling: a probe of
    what the work besides checking signatures waits on (pending transactions, the state's
    caches and LevelDB's memtable spread over the validators' memory), which the signature
    check's probe does not see: measured alongside the load (by a C chase, not by this
    probe), it followed a validator's CPU a transaction over six runs (docs/benchmarks.md,
    note 64). About 2 s, most of it filling the table."""
    if mib < 2 or mib & (mib - 1):
        raise ValueError("the table's size is a power of two of at least 2 MiB")
    return _chase_ns(mib, steps, rounds) - _chase_ns(1, steps, rounds)


def ceiling(rate_per_core: float) -> float:
    return cores() * rate_per_core / VALIDATORS


def disk_write_rate(directory: Path, size: int = 256 * 1024 * 1024) -> float:
    """Sequential write then fsync, in MB/s, where the nodes keep their data: the ceiling
    of a replicated attachment is this divided by the number of copies written."""
    path = directory / "disk-probe.bin"
    block = os.urandom(1024 * 1024)
    started = time.perf_counter()
    with open(path, "wb") as handle:
        for _ in range(size // len(block)):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    elapsed = time.perf_counter() - started
    path.unlink()
    return size / 1e6 / elapsed
