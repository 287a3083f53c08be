"""The validator set: who votes, with what power, who proposes, and the quorum arithmetic.

Proposers rotate round-robin over the keys in byte order: the proposer of (height, round)
is ``keys[(height + round) % n]``. Power weighs votes, not turns; every validator in our
networks is one institution with power 1 unless genesis says otherwise. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping

from ehrnode.core.block import has_quorum, validator_set_hash


class ValidatorSet:
    def __init__(self, powers: Mapping[bytes, int]) -> None:
        if not powers:
            raise ValueError("a validator set needs at least one validator")
        self.powers = dict(powers)
        self.keys = sorted(self.powers)
        self.total = sum(self.powers.values())
        self.hash = validator_set_hash(self.powers)

    def __contains__(self, key: object) -> bool:
        return key in self.powers

    def __len__(self) -> int:
        return len(self.keys)

    def power(self, key: bytes) -> int:
        return self.powers.get(key, 0)

    def proposer(self, height: int, round_: int) -> bytes:
        return self.keys[(height + round_) % len(self.keys)]

    def is_quorum(self, power: int) -> bool:
        """More than 2/3 of the power: Tendermint's 2f+1."""
        return has_quorum(power, self.total)

    def is_one_third(self, power: int) -> bool:
        """More than 1/3 of the power: Tendermint's f+1 (at least one honest voter)."""
        return 3 * power > self.total
