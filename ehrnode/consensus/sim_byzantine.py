"""The simulator's Byzantine validator: it runs an honest engine and lies with what it signs.

For each proposal its engine makes it signs a second one, of another block and sometimes
naming a polka that never happened; for each vote it signs one for every value it has seen
that round too. Each peer gets one version (every version goes to someone), some get a
second, some get nothing, and a precommit for a block goes to one peer only, so that one
may decide while the others, locked but undecided, go on to later rounds, which is where a
lock that does not hold shows. Once it has voted it also answers each vote it hears with
its own vote for the same value, to that voter only: every honest node sees it agree, and
only locking keeps their quorums apart. Rebroadcasts repeat the same choices. Pure.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from ehrnode.consensus import engine as eng
from ehrnode.consensus.sim_checks import Checks
from ehrnode.consensus.sim_node import CHAIN, Message, SimNode, block_of
from ehrnode.core.block import PRECOMMIT, Block, Proposal, Vote, sign_proposal, sign_vote

BOTH_VERSIONS = 0.2  # how often a peer gets a second version
WITHHOLD = 0.2  # how often a peer gets nothing at all


class Equivocator:
    def __init__(
        self,
        node: SimNode,
        peers: Sequence[SimNode],
        rng: random.Random,
        checks: Checks,
        send: Callable[[SimNode, Message], None],
    ) -> None:
        self.node, self.rng, self.checks, self.send = node, rng, checks, send
        self.peers = list(peers)
        self.by_key = {peer.key: peer for peer in peers}
        self.seen: dict[tuple[int, int], set[bytes | None]] = {}  # (h, r) -> values
        self.sent: dict[tuple[int, int], list[tuple[SimNode, Message]]] = {}
        self.voted: set[tuple[int, int, int]] = set()
        self.agreed: set[tuple[int, int, int, bytes, bytes | None]] = set()

    def propose(self, action: eng.SignProposal, other_block: Block) -> Proposal:
        identity = self.node.identity
        ours = sign_proposal(identity, CHAIN, action.round, action.pol_round, action.block)
        pol = self.rng.randint(-1, action.round - 1)
        other = sign_proposal(identity, CHAIN, action.round, pol, other_block)
        self.seen.setdefault((action.height, action.round), set()).add(other_block.id)
        self._spread([ours, other])
        return ours

    def vote(self, action: eng.SignVote) -> Vote:
        h, r, t = action.height, action.round, action.type
        seen = self.seen.get((h, r), set()) | {None}
        others = sorted(b or b"" for b in seen if b != action.block_id)
        if not others:
            others = [self.rng.randbytes(32)]
        self.voted.add((h, r, t))
        ours = sign_vote(self.node.identity, CHAIN, t, h, r, action.block_id)
        versions = [ours] + [
            sign_vote(self.node.identity, CHAIN, t, h, r, b or None) for b in others
        ]
        self._spread(versions)
        return ours

    def heard(self, message: Message) -> None:
        self.seen.setdefault((message.height, message.round), set()).add(block_of(message))
        if not isinstance(message, Vote):
            return
        h, r, t = message.height, message.round, message.type
        key = (h, r, t, message.validator, message.block)
        peer = self.by_key.get(message.validator)
        if (h, r, t) not in self.voted or key in self.agreed or peer is None:
            return
        self.agreed.add(key)
        mine = sign_vote(self.node.identity, CHAIN, t, h, r, message.block)
        self.sent.setdefault((h, r), []).append((peer, mine))
        self.send(peer, mine)

    def rebroadcast(self, height: int, round_: int) -> None:
        for peer, message in self.sent.get((height, round_), []):
            self.send(peer, message)

    def _spread(self, versions: Sequence[Message]) -> None:
        peers = list(self.peers)
        self.rng.shuffle(peers)
        ours, others = versions[0], versions[1:]
        only_one = isinstance(ours, Vote) and ours.type == PRECOMMIT and ours.block is not None
        pool = others if only_one else versions
        plan = []
        for i, peer in enumerate(peers):
            if i > len(others) and self.rng.random() < WITHHOLD:
                continue
            plan.append((peer, versions[i] if i <= len(others) else self.rng.choice(pool)))
            if self.rng.random() < BOTH_VERSIONS:
                plan.append((peer, self.rng.choice(pool)))
        for message in versions:
            self.checks.sent(self.node.index, self.node.key, message, honest=False)
        self.sent.setdefault((ours.height, ours.round), []).extend(plan)
        for peer, message in plan:
            self.send(peer, message)
