"""The bench's probes of this machine (``ehrnode.bench.machine``). Speeds are never
asserted: only that each probe does the work it names."""

from __future__ import annotations

import pytest

from ehrnode.bench import machine


def test_the_memory_chase_visits_every_slot_once_a_cycle() -> None:
    """Each read names the next slot, and the order goes through the whole table before it
    repeats: a chase that fell into a short cycle would stay in cache and measure nothing
    of the memory."""
    table = machine.chase_table(1)
    mask = len(table) - 1
    seen = set()
    at = 0
    for _ in range(len(table)):
        at = table[at & mask] & mask
        seen.add(at)
    assert len(seen) == len(table) == 1024 * 1024 // 8


def test_consecutive_reads_land_far_apart() -> None:
    """No prefetcher follows the order: successive slots are not neighbours."""
    table = machine.chase_table(2)
    mask = len(table) - 1
    at, near = 0, 0
    for _ in range(10_000):
        following = table[at & mask] & mask
        near += abs(following - at) < 64  # within 512 bytes
        at = following
    assert near < 10


@pytest.mark.parametrize("mib", [0, 1, 3, 96])
def test_the_memory_probe_needs_a_table_of_a_power_of_two_past_the_baseline(mib: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        machine.memory_latency_ns(mib)


def test_the_memory_probe_gives_nanoseconds() -> None:
    assert isinstance(machine.memory_latency_ns(2, steps=1000, rounds=1), float)
