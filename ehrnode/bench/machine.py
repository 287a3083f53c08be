"""The machine line and its ceiling: ed25519 verifications per second on one core, and the
committed-transaction rate that allows for 4 validators sharing this machine's cores
(each transaction is verified once on every validator)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ehrnode.core import crypto, tx

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


def decode_rate(raws: Sequence[bytes], seconds: float = 1.0) -> float:
    """Transactions decoded per second on one core (this process), without their signature
    check: parsing, the canonical check and the body's rules, through the nodes' own
    decode, over the first 256 of ``raws`` again and again. Not a ceiling: a probe of this
    machine's speed at the kind of work a validator does besides checking signatures,
    which does not always move with the signature check's (docs/benchmarks.md, note 64)."""
    sample = list(raws[:256])
    if not sample:
        raise ValueError("no transactions to decode")
    count = 0
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        for raw in sample:
            tx.decode(raw, verify_sig=False)
        count += len(sample)
    return count / (time.perf_counter() - started)


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
