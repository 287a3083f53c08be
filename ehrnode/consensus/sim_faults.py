"""The simulated network's fault model: scenarios, seeded fault plans and the lossy link.

A ``Scenario`` names a kind of trouble (loss, delay, duplication, reordering, partitions,
crashes, an equivocating validator, a validator that stays down); ``plan_faults`` turns it
and a seeded ``random.Random`` into a concrete ``FaultPlan``; ``Link`` decides, message by
message, when (and whether, and how often) a message arrives. Before the global
stabilisation time (GST) anything in the plan may happen; from GST on every link is reliable
with a bounded delay and no partition is in force. Pure: no clock, no I/O, no global random.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

MIN_DELAY = 0.005
DELAY_AFTER_GST = 0.05  # the bound on a message's delay once the network is stable
LONG_DELAY = 1.5  # a reordered message may take up to this long


@dataclass(frozen=True)
class Scenario:
    name: str
    validators: int
    loss: float = 0.0  # probability a message is lost (before GST)
    duplicate: float = 0.0  # probability a message arrives twice
    reorder: float = 0.0  # probability a message is held back, up to LONG_DELAY
    delay: float = 0.08  # a message normally takes MIN_DELAY..delay seconds
    partitions: int = 0  # partition windows before GST
    crashes: int = 0  # crash-and-restart episodes of honest validators before GST
    equivocators: int = 0  # Byzantine validators that sign conflicting messages
    dead: int = 0  # validators that crash before GST and never come back
    gst: float = 6.0  # virtual seconds
    heights_after_gst: int = 3  # liveness: each honest node decides this many more heights
    liveness_bound: float = 120.0  # ... within this many virtual seconds after GST
    # Short timeouts, often shorter than a message's delay before GST, so that rounds end
    # with nodes holding different views: that is where locking has to do its work.
    timeout: float = 0.2  # every base timeout and per-round increment, propose's doubled


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("lossy", 4, loss=0.25, duplicate=0.15, reorder=0.1, delay=0.15),
        Scenario("partition-crash", 4, loss=0.05, reorder=0.05, partitions=2, crashes=2),
        Scenario(
            "equivocate", 4, loss=0.1, duplicate=0.05, reorder=0.05, crashes=2, equivocators=1
        ),
        Scenario(
            "faulty7",
            7,
            loss=0.1,
            duplicate=0.05,
            reorder=0.05,
            partitions=1,
            crashes=1,
            equivocators=1,
            dead=1,
        ),
    )
}


@dataclass(frozen=True)
class Partition:
    start: float
    end: float
    side: frozenset[int]  # these nodes hear nothing from, and reach nothing of, the others

    def cuts(self, now: float, a: int, b: int) -> bool:
        return self.start <= now < self.end and ((a in self.side) != (b in self.side))


@dataclass(frozen=True)
class Crash:
    node: int
    at: float
    restart: float | None  # None: never comes back


@dataclass(frozen=True)
class FaultPlan:
    equivocators: frozenset[int]
    partitions: tuple[Partition, ...] = ()
    crashes: tuple[Crash, ...] = ()

    @property
    def dead(self) -> frozenset[int]:
        return frozenset(c.node for c in self.crashes if c.restart is None)

    def honest(self, n: int) -> list[int]:
        return [i for i in range(n) if i not in self.equivocators and i not in self.dead]

    def describe(self) -> list[str]:
        lines = [f"equivocating: {sorted(self.equivocators)}"]
        lines += [f"partition {p.start:.2f}-{p.end:.2f}: {sorted(p.side)}" for p in self.partitions]
        for c in self.crashes:
            back = "never" if c.restart is None else f"{c.restart:.2f}"
            lines.append(f"crash n{c.node} at {c.at:.2f}, back {back}")
        return lines


def plan_faults(scenario: Scenario, rng: random.Random) -> FaultPlan:
    n, gst = scenario.validators, scenario.gst
    nodes = list(range(n))
    rng.shuffle(nodes)
    equivocators = frozenset(nodes[: scenario.equivocators])
    dead_nodes = nodes[scenario.equivocators : scenario.equivocators + scenario.dead]
    others = nodes[scenario.equivocators + scenario.dead :]
    crashes = [Crash(i, rng.uniform(0.0, gst * 0.8), None) for i in dead_nodes]
    for _ in range(scenario.crashes):
        at = rng.uniform(0.0, gst * 0.9)
        crashes.append(Crash(rng.choice(others), at, rng.uniform(at + 0.05, gst)))
    partitions = []
    for _ in range(scenario.partitions):
        start = rng.uniform(0.0, gst * 0.8)
        size = rng.randint(1, n // 2)
        partitions.append(
            Partition(start, rng.uniform(start, gst), frozenset(rng.sample(range(n), size)))
        )
    return FaultPlan(equivocators, tuple(partitions), tuple(crashes))


@dataclass
class Link:
    """When a message sent at ``now`` from ``src`` reaches ``dst``: no time if it is lost."""

    scenario: Scenario
    plan: FaultPlan
    rng: random.Random
    stats: dict[str, int] = field(default_factory=dict)

    def cut(self, now: float, src: int, dst: int) -> bool:
        return now < self.scenario.gst and any(p.cuts(now, src, dst) for p in self.plan.partitions)

    def arrivals(self, now: float, src: int, dst: int) -> list[float]:
        s, rng = self.scenario, self.rng
        if now >= s.gst:
            return [now + rng.uniform(MIN_DELAY, DELAY_AFTER_GST)]
        if self.cut(now, src, dst) or rng.random() < s.loss:
            self._count("lost")
            return []
        copies = 2 if rng.random() < s.duplicate else 1
        times = []
        for _ in range(copies):
            delay = rng.uniform(MIN_DELAY, s.delay)
            if rng.random() < s.reorder:
                delay += rng.uniform(0.0, LONG_DELAY)
            times.append(now + delay)
        return times

    def _count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1
