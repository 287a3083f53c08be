"""Builders shared by the block tests: validators, transactions, headers, certificates."""

from __future__ import annotations

from typing import Any

from helpers_core import CHAIN, identity

from ehrnode.core import crypto, merkle, tx
from ehrnode.core.block import (
    PRECOMMIT,
    ZERO_HASH,
    Block,
    Certificate,
    Header,
    make_certificate,
    sign_vote,
    validator_set_hash,
)

VALIDATORS = [identity(100 + i) for i in range(4)]
POWERS = {v.public_key: 1 for v in VALIDATORS}
OUTSIDER = identity(200)
MAX = 1 << 20
BLOCK_ID = crypto.sha256(b"block")


def txs(n: int, start: int = 0) -> list[bytes]:
    return [
        tx.make(identity(300 + i), CHAIN, "register", 1, {"role": "patient"}).raw
        for i in range(start, start + n)
    ]


def header(height: int, raws: list[bytes], **changes: Any) -> Header:
    fields: dict[str, Any] = {
        "chain": CHAIN,
        "height": height,
        "time": 1_000 + height,
        "proposer": VALIDATORS[height % 4].public_key,
        "prev": ZERO_HASH,
        "txs": merkle.root([crypto.sha256(t) for t in raws]),
        "ntx": len(raws),
        "vals": validator_set_hash(POWERS),
        "next_vals": validator_set_hash(POWERS),
        "state": crypto.sha256(b"state"),
        "last_commit": ZERO_HASH,
    }
    fields.update(changes)
    return Header(**fields)


def certify(
    block_id: bytes, height: int, signers: list[crypto.Identity], round_: int = 0
) -> Certificate:
    return make_certificate(
        [sign_vote(v, CHAIN, PRECOMMIT, height, round_, block_id) for v in signers]
    )


def chain_of_two(n_txs: int = 3) -> tuple[Block, Certificate, Block]:
    first = Block.build(header(1, txs(2)), txs(2), None)
    cert = certify(first.id, 1, VALIDATORS[:3])
    raws = txs(n_txs, start=10)
    second = Block.build(header(2, raws, prev=first.id, last_commit=cert.hash()), raws, cert)
    return first, cert, second
