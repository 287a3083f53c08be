"""A seeded, deterministic discrete-event simulator for the consensus engine.

It runs N engines with real ed25519 identities and plays each one's driver: it signs what
the engine asks (behind an in-memory copy of the driver's double-sign guard), sends it over
a simulated network (``sim_faults``: loss, delay, duplication, reordering, partitions),
fires timeouts on a virtual clock, builds blocks, hands decided blocks and certificates to
nodes that fall behind (block sync), crashes and restarts nodes (restoring them from their
signing record, as the driver does), and lets one validator equivocate (``sim_byzantine``).
After the global stabilisation time (GST) every fault stops.

Throughout a run it checks (``sim_checks``) agreement, validity, that no honest validator
signs two different messages for one (height, round, step), that an honest engine never
asks its guard for a conflicting signature and that evidence names only the equivocator;
at the end, liveness (each honest node decides ``heights_after_gst`` more heights within
``liveness_bound`` virtual seconds of GST). A broken property raises AssertionError naming
the seed and the command that replays it with a trace:

    python -m ehrnode.consensus.sim --seed 7 --validators 4 --scenario lossy

Everything random comes from ``random.Random(seed)``: no wall clock, no asyncio, no I/O
(except the command line printing its trace).
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import random
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import NoReturn

from ehrnode.consensus import engine as eng
from ehrnode.consensus.sim_byzantine import Equivocator
from ehrnode.consensus.sim_checks import Checks
from ehrnode.consensus.sim_faults import SCENARIOS, Link, Scenario, plan_faults
from ehrnode.consensus.sim_node import (
    CHAIN,
    STEP_PROPOSAL,
    Message,
    SimNode,
    block_of,
    describe,
    describe_restored,
    lock_of,
    step_of,
)
from ehrnode.consensus.validators import ValidatorSet
from ehrnode.core.block import (
    Block,
    Certificate,
    Proposal,
    Vote,
    sign_proposal,
    sign_vote,
)
from ehrnode.core.crypto import Identity

MAX_EVENTS = 2_000_000
SLOW_SYNC = 3.0  # before GST, block sync may take up to this long


@dataclass
class Result:
    seed: int
    scenario: str
    decided: dict[int, int]  # node -> heights decided
    honest: list[int]
    targets: dict[int, int]  # honest node -> the height it had to reach after GST
    time: float  # virtual seconds when every honest node had reached its target
    events: int
    max_round: int
    evidence: int
    trace: list[str]


def replay_command(seed: int, scenario: Scenario) -> str:
    return (
        f"python -m ehrnode.consensus.sim --seed {seed} "
        f"--validators {scenario.validators} --scenario {scenario.name}"
    )


class Simulation:
    def __init__(self, seed: int, scenario: Scenario, *, trace: bool = False) -> None:
        self.seed, self.scenario = seed, scenario
        self.rng = random.Random(seed)
        n = scenario.validators
        self.nodes = [SimNode(i, Identity(self.rng.randbytes(32))) for i in range(n)]
        self.vals = ValidatorSet({node.key: 1 for node in self.nodes})
        self.plan = plan_faults(scenario, self.rng)
        self.honest = set(self.plan.honest(n))
        self.link = Link(scenario, self.plan, self.rng)
        t = scenario.timeout
        self.timeouts = eng.Timeouts(2 * t, 2 * t, t, t, t, t, rebroadcast=4 * t)
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[], object]]] = []
        self._seq = 0
        self.trace: list[str] | None = [] if trace else None
        # what the checks need
        self.checks = Checks(self.vals.powers, self._fail)
        self.evidence = 0
        self.max_round = 0
        self.targets: dict[int, int] = {}  # set at GST: node -> height it must reach
        self.waiting: set[int] = set()  # honest nodes still short of their target
        self._verified: dict[bytes, tuple[object, ...]] = {}
        self.equivocators: dict[int, Equivocator] = {}
        for i in sorted(self.plan.equivocators):
            node = self.nodes[i]
            node.byzantine = True
            peers = [peer for peer in self.nodes if peer is not node]
            send = partial(self._send_one, node)
            self.equivocators[i] = Equivocator(node, peers, self.rng, self.checks, send)

    # --- running ------------------------------------------------------------------------

    def run(self) -> Result:
        s = self.scenario
        self._log("plan: " + "; ".join(self.plan.describe()))
        for node in self.nodes:
            self._at(0.0, partial(self._boot, node))
        for crash in self.plan.crashes:
            self._at(crash.at, partial(self._crash, self.nodes[crash.node]))
            if crash.restart is not None:
                self._at(crash.restart, partial(self._boot, self.nodes[crash.node]))
        self._at(s.gst, self._stabilise)
        deadline = s.gst + s.liveness_bound
        events = 0
        while self._queue and not (self.targets and not self.waiting):
            when, _, event = heapq.heappop(self._queue)
            if when > deadline:
                break
            self.now = when
            event()
            events += 1
            if events > MAX_EVENTS:
                self._fail(f"no end after {MAX_EVENTS} events")
        if not self.targets or self.waiting:
            behind = {
                i: (self.nodes[i].height - 1, self.targets.get(i), self._round(self.nodes[i]))
                for i in sorted(self.honest)
            }
            self._fail(
                f"liveness: by t={self.now:.1f} (GST {s.gst}, bound {s.liveness_bound}) "
                f"honest nodes short of {s.heights_after_gst} heights after GST; "
                f"node: (decided, target, round) = {behind}"
            )
        return Result(
            self.seed,
            s.name,
            {node.index: node.height - 1 for node in self.nodes},
            sorted(self.honest),
            dict(self.targets),
            self.now,
            events,
            self.max_round,
            self.evidence,
            self.trace or [],
        )

    def _at(self, when: float, event: Callable[[], object]) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (when, self._seq, event))

    def _log(self, line: str) -> None:
        if self.trace is not None:
            self.trace.append(f"{self.now:9.3f} {line}")

    def _fail(self, what: str) -> NoReturn:
        raise AssertionError(
            f"consensus simulation failed at t={self.now:.3f}: {what}\n"
            f"  seed={self.seed} scenario={self.scenario.name} "
            f"validators={self.scenario.validators}\n"
            f"  replay: {replay_command(self.seed, self.scenario)}"
        )

    @staticmethod
    def _round(node: SimNode) -> int:
        return -1 if node.engine is None else node.engine.round

    # --- node lifecycle -------------------------------------------------------------------

    def _boot(self, node: SimNode) -> None:
        """Start, or restart after a crash, from what the node kept durable."""
        if node.engine is not None:
            return
        node.engine = eng.Engine(node.key, node.validate, self.timeouts)
        node.incarnation += 1
        restored = node.signing.restored(node.height)
        self._log(
            f"n{node.index} boots at height {node.height}, restored {describe_restored(restored)}"
        )
        actions = node.engine.start_height(node.height, self.vals, has_txs=True, restored=restored)
        if restored is not None:  # as the driver does with its recorded messages
            for message in node.signing.height_messages:
                self._broadcast(node, message)
        self._perform(node, actions)

    def _crash(self, node: SimNode) -> None:
        self._log(f"n{node.index} crashes")
        node.engine = None
        node.incarnation += 1
        node.sent = {}
        node.syncing = False

    def _stabilise(self) -> None:
        self._log("GST: links reliable, partitions healed, crashed nodes back")
        for node in self.nodes:
            if node.index in self.honest:
                self._boot(node)
                self.targets[node.index] = node.height - 1 + self.scenario.heights_after_gst
        self.waiting = set(self.targets)

    # --- the driver's part ----------------------------------------------------------------

    def _perform(self, node: SimNode, actions: list[eng.Action]) -> None:
        pending = deque(actions)
        while pending and node.engine is not None:
            pending.extend(self._do(node, node.engine, pending.popleft()))

    def _do(self, node: SimNode, engine: eng.Engine, action: eng.Action) -> list[eng.Action]:
        if isinstance(action, eng.ScheduleTimeout):
            fire = partial(
                self._timeout, node, node.incarnation, action.kind, action.height, action.round
            )
            self._at(self.now + action.delay, fire)
        elif isinstance(action, eng.RequestBlock):
            return engine.on_block(
                action.height, action.round, node.build(self.rng, self.now, self.vals)
            )
        elif isinstance(action, eng.SignProposal):
            proposal = self._sign_proposal(node, action)
            return [] if proposal is None else engine.on_proposal(proposal)
        elif isinstance(action, eng.SignVote):
            vote = self._sign_vote(node, action)
            return [] if vote is None else engine.on_vote(vote)
        elif isinstance(action, eng.Decide):
            return self._decide(node, engine, action.block, action.certificate)
        elif isinstance(action, eng.Evidence):
            accused = action.first.validator
            if not self.nodes[self._index(accused)].byzantine:
                self._fail(f"n{node.index} reports evidence against honest {accused.hex()[:8]}")
            self.evidence += 1
        elif isinstance(action, eng.Rebroadcast):
            relay = {m.sig for m in action.relay}
            for message in node.sent.get((action.height, action.round), []):
                if message.sig not in relay:
                    self._broadcast(node, message, action.holders)
            for message in action.relay:
                self._relay(node, message, action.holders)
            if node.byzantine:
                self.equivocators[node.index].rebroadcast(action.height, action.round)
        return []

    def _index(self, key: bytes) -> int:
        return next(node.index for node in self.nodes if node.key == key)

    def _sign_proposal(self, node: SimNode, action: eng.SignProposal) -> Proposal | None:
        if node.byzantine:
            other_block = node.build(self.rng, self.now, self.vals)
            return self.equivocators[node.index].propose(action, other_block)
        verdict = node.signing.check(action.height, action.round, STEP_PROPOSAL, action.block.id)
        if verdict is False:
            self._refuse(node, action)
            return None
        if verdict is True:
            proposal = sign_proposal(
                node.identity, CHAIN, action.round, action.pol_round, action.block
            )
            node.signing.save(proposal, None)
            node.sent.setdefault((action.height, action.round), []).append(proposal)
        else:
            assert isinstance(verdict, Proposal)
            proposal = verdict
        self._broadcast(node, proposal)
        return proposal

    def _sign_vote(self, node: SimNode, action: eng.SignVote) -> Vote | None:
        if node.byzantine:
            return self.equivocators[node.index].vote(action)
        verdict = node.signing.check(action.height, action.round, action.type, action.block_id)
        if verdict is False:
            self._refuse(node, action)
            return None
        if verdict is True:
            vote = sign_vote(
                node.identity, CHAIN, action.type, action.height, action.round, action.block_id
            )
            node.signing.save(vote, lock_of(action), action.pol)
            node.sent.setdefault((action.height, action.round), []).append(vote)
        else:
            assert isinstance(verdict, Vote)
            vote = verdict
        self._broadcast(node, vote)
        return vote

    def _refuse(self, node: SimNode, action: eng.SignProposal | eng.SignVote) -> None:
        """The guard is the last line of defence; a correct engine never needs it."""
        self._fail(
            f"n{node.index}'s engine asked to sign {action.__class__.__name__} for "
            f"height {action.height} round {action.round}, which conflicts with its signing "
            f"record {node.signing.last}"
        )

    def _timeout(
        self, node: SimNode, incarnation: int, kind: str, height: int, round_: int
    ) -> None:
        if node.engine is not None and node.incarnation == incarnation:
            self._perform(node, node.engine.on_timeout(kind, height, round_))

    def _decide(
        self, node: SimNode, engine: eng.Engine, block: Block, certificate: Certificate
    ) -> list[eng.Action]:
        height = block.header.height
        self._log(
            f"n{node.index} decides h{height} r{engine.round} {block.id.hex()[:8]} "
            f"(cert round {certificate.round})"
        )
        if height != node.height:
            self._fail(f"n{node.index} decided height {height} while at {node.height}")
        if node.index in self.honest:
            self.checks.decision(node.index, height, block, certificate)
        self.max_round = max(self.max_round, engine.round)
        node.chain[height] = (block, certificate)
        node.sent = {k: v for k, v in node.sent.items() if k[0] > height}
        if node.index in self.waiting and node.height > self.targets[node.index]:
            self.waiting.discard(node.index)
        return engine.start_height(node.height, self.vals, has_txs=True)

    # --- the network --------------------------------------------------------------------

    def _broadcast(
        self, node: SimNode, message: Message, holders: frozenset[bytes] = frozenset()
    ) -> None:
        """To everyone; a proposal resent (as the driver does) not to ``holders``, who
        voted for its block."""
        self.checks.sent(node.index, node.key, message, honest=not node.byzantine)
        if self.trace is not None:
            self._log(f"n{node.index} sends {describe(message)}")
        skip = holders if isinstance(message, Proposal) else frozenset()
        for peer in self.nodes:
            if peer is not node and peer.key not in skip:
                self._send(node, peer, message)

    def _relay(self, node: SimNode, message: Message, holders: frozenset[bytes]) -> None:
        """Pass on a message: ours to everyone, another's to everyone but its signer; a
        proposal not to ``holders``."""
        signer = message.proposer if isinstance(message, Proposal) else message.validator
        if signer == node.key:
            if not node.byzantine:  # the equivocator resends its own split in _do
                self._broadcast(node, message, holders)
            return
        skip = holders if isinstance(message, Proposal) else frozenset()
        for peer in self.nodes:
            if peer is not node and peer.key != signer and peer.key not in skip:
                self._send(node, peer, message)

    def _send_one(self, node: SimNode, peer: SimNode, message: Message) -> None:
        """The equivocator's sends: each one to one peer."""
        if self.trace is not None:
            self._log(f"n{node.index} sends n{peer.index} {describe(message)}")
        self._send(node, peer, message)

    def _send(self, node: SimNode, peer: SimNode, message: Message) -> None:
        for when in self.link.arrivals(self.now, node.index, peer.index):
            self._at(when, partial(self._deliver, peer, message))

    def _deliver(self, node: SimNode, message: Message) -> None:
        if node.engine is None or not self._verify(message):
            return
        if message.height > node.height and not node.syncing:
            node.syncing = True
            # Slow before GST, so that consensus, not block sync, settles most heights.
            slow = self.now < self.scenario.gst
            when = self.now + self.rng.uniform(0.05, SLOW_SYNC if slow else 0.3)
            self._at(when, partial(self._sync, node, node.incarnation))
        if node.byzantine:
            self.equivocators[node.index].heard(message)
        if isinstance(message, Proposal):
            self._perform(node, node.engine.on_proposal(message))
        else:
            self._perform(node, node.engine.on_vote(message))

    def _verify(self, message: Message) -> bool:
        """The driver's signature check, done once per distinct message."""
        content = (step_of(message), message.height, message.round, block_of(message))
        if self._verified.get(message.sig) == content:
            return True
        if not message.verify(CHAIN):
            return False
        self._verified[message.sig] = content
        return True

    def _sync(self, node: SimNode, incarnation: int) -> None:
        """Block sync: blocks with certificates from a peer that decided them."""
        node.syncing = False
        while node.engine is not None and node.incarnation == incarnation:
            height = node.height
            sources = [
                peer
                for peer in self.nodes
                if height in peer.chain
                and peer.engine is not None
                and not self.link.cut(self.now, peer.index, node.index)
            ]
            if not sources:
                return
            block, certificate = sources[0].chain[height]
            self.checks.certificate(height, block, certificate)
            self._log(f"n{node.index} syncs h{height} from n{sources[0].index}")
            self._perform(node, node.engine.on_certified_block(block, certificate))
            if node.height == height:
                self._fail(f"n{node.index} did not take certified block {height}")


def run(
    seed: int, scenario: str | Scenario, *, validators: int | None = None, trace: bool = False
) -> Result:
    chosen = SCENARIOS[scenario] if isinstance(scenario, str) else scenario
    if validators is not None and validators != chosen.validators:
        chosen = dataclasses.replace(chosen, validators=validators)
    return Simulation(seed, chosen, trace=trace).run()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Replay one seeded consensus simulation.")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="lossy")
    parser.add_argument("--validators", type=int, default=None)
    args = parser.parse_args(argv)
    scenario = SCENARIOS[args.scenario]
    if args.validators is not None:
        scenario = dataclasses.replace(scenario, validators=args.validators)
    simulation = Simulation(args.seed, scenario, trace=True)
    try:
        result = simulation.run()
    except AssertionError as err:
        print("\n".join(simulation.trace or []))
        print(err, file=sys.stderr)
        return 1
    print("\n".join(result.trace))
    print(
        f"ok: seed {result.seed} {result.scenario}: decided {result.decided} by "
        f"t={result.time:.2f} in {result.events} events; max round {result.max_round}, "
        f"evidence {result.evidence}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
