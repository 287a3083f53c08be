"""The properties the simulator holds every run to, checked as the run goes.

- agreement: no two honest nodes decide different blocks at one height, restarts included;
- validity: a decided block was proposed at its height and its certificate verifies
  against the validator set;
- no honest validator sends two different signed messages for one (height, round, step).

A broken property calls ``fail``, which raises with the seed and the replay command. Pure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NoReturn

from ehrnode.consensus.sim_node import CHAIN, Message, block_of, step_of
from ehrnode.core.block import Block, Certificate, Proposal
from ehrnode.core.errors import InvalidBlock


class Checks:
    def __init__(self, powers: Mapping[bytes, int], fail: Callable[[str], NoReturn]) -> None:
        self.powers = powers
        self.fail = fail
        self.decided: dict[int, bytes] = {}  # height -> the block honest nodes decided
        self.proposed: dict[int, set[bytes]] = {}  # height -> every block signed in a proposal
        self.signed: dict[tuple[bytes, int, int, int], tuple[bytes | None, int]] = {}
        self.good_certificates: set[bytes] = set()

    def sent(self, node: int, signer: bytes, message: Message, *, honest: bool) -> None:
        """Every signed message a node sends (or resends) passes here."""
        if isinstance(message, Proposal):
            self.proposed.setdefault(message.height, set()).add(message.block.id)
        if not honest:
            return
        pol = message.pol_round if isinstance(message, Proposal) else -1
        key = (signer, message.height, message.round, step_of(message))
        signed = (block_of(message), pol)
        first = self.signed.setdefault(key, signed)
        if first != signed:
            self.fail(
                f"honest n{node} signed two different messages for (height, round, step) "
                f"{key[1:]}: {first} and {signed}"
            )

    def decision(self, node: int, height: int, block: Block, certificate: Certificate) -> None:
        """An honest node's decision."""
        first = self.decided.setdefault(height, block.id)
        if first != block.id:
            self.fail(
                f"agreement: n{node} decided {block.id.hex()[:8]} at height {height}, "
                f"another honest node decided {first.hex()[:8]}"
            )
        if block.id not in self.proposed.get(height, set()):
            self.fail(f"validity: n{node} decided a block nobody proposed at height {height}")
        self.certificate(height, block, certificate)

    def certificate(self, height: int, block: Block, certificate: Certificate) -> None:
        if certificate.height != height or certificate.block != block.id:
            self.fail(f"the certificate of height {height} is for another block")
        digest = certificate.hash()
        if digest in self.good_certificates:
            return
        try:
            certificate.verify(CHAIN, self.powers)
        except InvalidBlock as err:
            self.fail(f"certificate of height {height} does not verify: {err}")
        self.good_certificates.add(digest)
