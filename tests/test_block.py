"""Blocks, votes, proposals, commit certificates and inclusion proofs."""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Any

import pytest
from helpers_block import (
    BLOCK_ID,
    MAX,
    OUTSIDER,
    POWERS,
    VALIDATORS,
    certify,
    chain_of_two,
    header,
    txs,
)
from helpers_core import CHAIN
from hypothesis import given, settings, strategies as st

from ehrnode.core import codec, crypto, merkle, tx
from ehrnode.core.block import (
    PRECOMMIT,
    PREVOTE,
    Block,
    Certificate,
    InclusionProof,
    has_quorum,
    sign_vote,
    validator_set_hash,
)
from ehrnode.core.errors import InvalidBlock, InvalidEncoding, InvalidTransaction

# --- quorum arithmetic -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signed", "total", "ok"),
    [
        (3, 4, True),
        (2, 4, False),
        (4, 4, True),
        (2, 3, False),
        (3, 3, True),
        (7, 10, True),
        (6, 9, False),
        (7, 9, True),
        (0, 0, False),
        (1, 1, True),
        (0, 1, False),
    ],
)
def test_has_quorum(signed: int, total: int, ok: bool) -> None:
    assert has_quorum(signed, total) is ok


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 10**6))
def test_has_quorum_is_more_than_two_thirds(signed: int, total: int) -> None:
    assert has_quorum(signed, total) == (Fraction(signed, total) > Fraction(2, 3))


def test_validator_set_hash_ignores_dict_order_but_not_power() -> None:
    backwards = dict(reversed(list(POWERS.items())))
    assert validator_set_hash(backwards) == validator_set_hash(POWERS)
    heavier = {**POWERS, VALIDATORS[0].public_key: 2}
    assert validator_set_hash(heavier) != validator_set_hash(POWERS)
    assert validator_set_hash({**POWERS, OUTSIDER.public_key: 1}) != validator_set_hash(POWERS)


# --- certificates ----------------------------------------------------------------------------


def test_three_of_four_is_a_quorum() -> None:
    certify(BLOCK_ID, 5, VALIDATORS[:3]).verify(CHAIN, POWERS)
    certify(BLOCK_ID, 5, VALIDATORS[1:]).verify(CHAIN, POWERS)
    certify(BLOCK_ID, 5, VALIDATORS).verify(CHAIN, POWERS)


def test_two_of_four_is_not() -> None:
    with pytest.raises(InvalidBlock, match="more than 2/3"):
        certify(BLOCK_ID, 5, VALIDATORS[:2]).verify(CHAIN, POWERS)
    with pytest.raises(InvalidBlock):
        Certificate(5, 0, BLOCK_ID, ()).verify(CHAIN, POWERS)


def test_power_is_weighted() -> None:
    powers = {**POWERS, VALIDATORS[0].public_key: 3}  # 3 + 1 + 1 + 1 = 6
    with pytest.raises(InvalidBlock):
        certify(BLOCK_ID, 5, VALIDATORS[:2]).verify(CHAIN, powers)  # 4 of 6
    certify(BLOCK_ID, 5, VALIDATORS[:3]).verify(CHAIN, powers)  # 5 of 6
    with pytest.raises(InvalidBlock):
        certify(BLOCK_ID, 5, VALIDATORS[1:]).verify(CHAIN, powers)  # 3 of 6


def test_non_validator_signer_is_refused() -> None:
    cert = certify(BLOCK_ID, 5, [*VALIDATORS[:3], OUTSIDER])
    with pytest.raises(InvalidBlock, match="not a validator"):
        cert.verify(CHAIN, POWERS)


def test_duplicate_signer_is_refused_and_not_counted_twice() -> None:
    good = certify(BLOCK_ID, 5, VALIDATORS[:2])
    doubled = dataclasses.replace(good, sigs=(*good.sigs, good.sigs[0]))
    with pytest.raises(InvalidBlock, match="twice"):
        doubled.verify(CHAIN, POWERS)
    three = certify(BLOCK_ID, 5, VALIDATORS[:3])
    with pytest.raises(InvalidBlock, match="twice"):
        dataclasses.replace(three, sigs=(*three.sigs, three.sigs[1])).verify(CHAIN, POWERS)


@pytest.mark.parametrize(
    "bad_vote",
    [
        lambda v: sign_vote(v, CHAIN, PRECOMMIT, 5, 0, crypto.sha256(b"other block")),
        lambda v: sign_vote(v, CHAIN, PREVOTE, 5, 0, BLOCK_ID),
        lambda v: sign_vote(v, CHAIN, PRECOMMIT, 6, 0, BLOCK_ID),
        lambda v: sign_vote(v, CHAIN, PRECOMMIT, 5, 1, BLOCK_ID),
        lambda v: sign_vote(v, "ehr-other", PRECOMMIT, 5, 0, BLOCK_ID),
    ],
    ids=["other block", "prevote", "other height", "other round", "other chain"],
)
def test_signature_over_anything_else_is_refused(bad_vote: Any) -> None:
    good = certify(BLOCK_ID, 5, VALIDATORS[:3])
    wrong = bad_vote(VALIDATORS[3])
    cert = dataclasses.replace(good, sigs=(*good.sigs, (wrong.validator, wrong.sig)))
    with pytest.raises(InvalidBlock, match="does not verify"):
        cert.verify(CHAIN, POWERS)


def test_certificate_wire_round_trip() -> None:
    cert = certify(BLOCK_ID, 5, VALIDATORS[:3], round_=2)
    assert [k for k, _ in cert.sigs] == sorted(k for k, _ in cert.sigs)
    again = Certificate.from_wire(codec.decode(cert.encode()))
    assert again == cert
    assert again.hash() == cert.hash() == crypto.sha256(cert.encode())
    again.verify(CHAIN, POWERS)


@pytest.mark.parametrize(
    "change",
    [
        {"height": 0},
        {"height": True},
        {"round": -1},
        {"block": BLOCK_ID[:31]},
        {"sigs": "x"},
        {"sigs": [[BLOCK_ID, bytes(63)]]},
        {"sigs": [[BLOCK_ID[:31], bytes(64)]]},
        {"sigs": [[BLOCK_ID]]},
        {"sigs": [[BLOCK_ID, bytes(64)]] * 1001},
        {"extra": 1},
    ],
)
def test_certificate_from_wire_refuses(change: dict[str, Any]) -> None:
    wire = {**certify(BLOCK_ID, 5, VALIDATORS[:3]).to_wire(), **change}
    with pytest.raises(InvalidEncoding):
        Certificate.from_wire(wire)


# --- blocks ----------------------------------------------------------------------------------


def test_block_build_decode_round_trip() -> None:
    first, cert, second = chain_of_two()
    for block in (first, second):
        again = Block.decode(block.raw, max_bytes=MAX)
        assert again == block
        assert again.id == block.id == block.header.id()
        assert again.raw == block.raw
        assert again.tx_ids == tuple(crypto.sha256(t) for t in block.txs)
        assert Block.build(again.header, again.txs, again.last_commit).raw == block.raw
    assert second.last_commit == cert


def test_empty_block() -> None:
    block = Block.build(header(1, []), [], None)
    assert block.header.txs == merkle.root([])
    assert Block.decode(block.raw, max_bytes=MAX) == block


def test_block_id_covers_every_header_field() -> None:
    base = header(2, [])
    for name, value in [
        ("chain", "ehr-other"),
        ("height", 3),
        ("time", 1),
        ("proposer", OUTSIDER.public_key),
        ("prev", crypto.sha256(b"p")),
        ("txs", crypto.sha256(b"t")),
        ("ntx", 9),
        ("vals", crypto.sha256(b"v")),
        ("next_vals", crypto.sha256(b"n")),
        ("state", crypto.sha256(b"s")),
        ("last_commit", crypto.sha256(b"l")),
    ]:
        assert dataclasses.replace(base, **{name: value}).id() != base.id(), name


def _rebuilt(block: Block, **changes: Any) -> bytes:
    """Raw bytes of ``block`` with parts replaced, without any check."""
    wire: dict[str, Any] = {
        "header": block.header.to_wire(),
        "txs": list(block.txs),
        "last_commit": None if block.last_commit is None else block.last_commit.to_wire(),
    }
    for name, value in changes.items():
        if name in wire:
            wire[name] = value
        else:
            wire["header"][name] = value
    return codec.encode(wire)


def _check_form_cases() -> dict[str, tuple[bytes, str]]:
    first, cert, second = chain_of_two()
    other_cert = certify(crypto.sha256(b"elsewhere"), 1, VALIDATORS[:3])
    old_cert = certify(first.id, 1, VALIDATORS[:3], round_=1)
    return {
        "ntx too high": (_rebuilt(second, ntx=4), "transactions"),
        "tx dropped": (_rebuilt(second, txs=list(second.txs[:-1])), "transactions"),
        "tx swapped": (
            _rebuilt(second, txs=[second.txs[1], second.txs[0], second.txs[2]]),
            "root",
        ),
        "tx changed": (_rebuilt(second, txs=[*second.txs[:-1], txs(1, start=50)[0]]), "root"),
        "tx twice": (_duplicate_tx_block(), "twice"),
        "height 1 with certificate": (_rebuilt(first, last_commit=cert.to_wire()), "first block"),
        "height 1 with prev": (_rebuilt(first, prev=crypto.sha256(b"x")), "first block"),
        "height 1 with last_commit hash": (_first_with_commit_hash(first), "first block"),
        "height 2 without certificate": (_rebuilt(second, last_commit=None), "lacks"),
        "certificate hash mismatch": (
            _rebuilt(second, last_commit=old_cert.to_wire()),
            "does not match",
        ),
        "certificate for another block": (
            Block.build(
                dataclasses.replace(second.header, last_commit=other_cert.hash()),
                second.txs,
                other_cert,
            ).raw,
            "previous block",
        ),
    }


def _duplicate_tx_block() -> bytes:
    raws = txs(1) * 2
    return Block.build(header(1, raws), raws, None).raw


def _first_with_commit_hash(first: Block) -> bytes:
    bad = dataclasses.replace(first.header, last_commit=crypto.sha256(b"c"))
    return Block.build(bad, first.txs, None).raw


CHECK_FORM = _check_form_cases()


@pytest.mark.parametrize(("raw", "match"), CHECK_FORM.values(), ids=CHECK_FORM.keys())
def test_check_form_errors(raw: bytes, match: str) -> None:
    with pytest.raises(InvalidBlock, match=match):
        Block.decode(raw, max_bytes=MAX)


def test_certificate_for_an_older_height_is_refused() -> None:
    first, _, second = chain_of_two()
    wrong = certify(first.id, 7, VALIDATORS[:3])
    block = Block.build(
        dataclasses.replace(second.header, last_commit=wrong.hash()), second.txs, wrong
    )
    with pytest.raises(InvalidBlock, match="previous block"):
        block.check_form()


@pytest.mark.parametrize(
    "raw",
    [
        b"\xc1",
        b"",
        codec.encode([1]),
        codec.encode({"header": {}, "txs": [], "last_commit": None}),
        codec.encode({"header": header(1, []).to_wire(), "txs": [], "last_commit": None, "x": 1}),
        codec.encode({"header": header(1, []).to_wire(), "txs": ["text"], "last_commit": None}),
        codec.encode({"header": header(1, []).to_wire(), "txs": b"", "last_commit": None}),
        codec.encode({"header": header(1, []).to_wire(), "txs": [], "last_commit": 1}),
        codec.encode(
            {"header": {**header(1, []).to_wire(), "height": 0}, "txs": [], "last_commit": None}
        ),
        codec.encode(
            {"header": {**header(1, []).to_wire(), "chain": 1}, "txs": [], "last_commit": None}
        ),
        codec.encode(
            {"header": {**header(1, []).to_wire(), "time": -1}, "txs": [], "last_commit": None}
        ),
        codec.encode(
            {"header": {**header(1, []).to_wire(), "prev": b"x"}, "txs": [], "last_commit": None}
        ),
        codec.encode(
            {"header": {**header(1, []).to_wire(), "ntx": False}, "txs": [], "last_commit": None}
        ),
    ],
)
def test_malformed_block_bytes(raw: bytes) -> None:
    with pytest.raises(InvalidBlock, match="malformed"):
        Block.decode(raw, max_bytes=MAX)


def test_block_size_limit() -> None:
    block = Block.build(header(1, txs(3)), txs(3), None)
    assert Block.decode(block.raw, max_bytes=len(block.raw)) == block
    with pytest.raises(InvalidBlock):
        Block.decode(block.raw, max_bytes=len(block.raw) - 1)


def test_block_carries_transactions_that_decode() -> None:
    _, _, second = chain_of_two()
    decoded = [tx.decode(raw) for raw in second.txs]
    assert tuple(t.id for t in decoded) == second.tx_ids
    # A block does not vouch for its transactions: those are checked against state later.
    junk = Block.build(header(1, [b"not a tx"]), [b"not a tx"], None)
    assert Block.decode(junk.raw, max_bytes=MAX).txs == (b"not a tx",)
    with pytest.raises(InvalidTransaction):
        tx.decode(junk.txs[0])


# --- inclusion proofs ------------------------------------------------------------------------


def proofs(n: int = 5) -> list[InclusionProof]:
    raws = txs(n, start=20)
    block = Block.build(header(3, raws), raws, None)
    cert = certify(block.id, 3, VALIDATORS[:3])
    return [
        InclusionProof(raw, i, n, tuple(merkle.proof(block.tx_ids, i)), block.header, cert)
        for i, raw in enumerate(raws)
    ]


def test_every_inclusion_proof_verifies_and_survives_the_wire() -> None:
    for proof in proofs():
        proof.verify(CHAIN, POWERS)
        again = InclusionProof.from_wire(codec.decode(codec.encode(proof.to_wire())))
        assert again == proof
        again.verify(CHAIN, POWERS)


def _proof_faults() -> dict[str, tuple[InclusionProof, str]]:
    p = proofs()[2]
    other = proofs()[3]
    weak = certify(p.header.id(), 3, VALIDATORS[:2])
    elsewhere = certify(crypto.sha256(b"another"), 3, VALIDATORS[:3])
    return {
        "other chain's header": (
            dataclasses.replace(p, header=dataclasses.replace(p.header, chain="ehr-other")),
            "chain",
        ),
        "other tx": (dataclasses.replace(p, tx=other.tx), "Merkle"),
        "other index": (dataclasses.replace(p, index=3), "Merkle"),
        "other path": (dataclasses.replace(p, path=other.path), "Merkle"),
        "short path": (dataclasses.replace(p, path=p.path[:-1]), "Merkle"),
        "total not the header's": (dataclasses.replace(p, total=6), "leaf count"),
        "header altered": (
            dataclasses.replace(p, header=dataclasses.replace(p.header, time=1)),
            "another block",
        ),
        "certificate for another block": (dataclasses.replace(p, certificate=elsewhere), "another"),
        "certificate for another height": (
            dataclasses.replace(p, certificate=dataclasses.replace(p.certificate, height=4)),
            "another block",
        ),
        "certificate without quorum": (dataclasses.replace(p, certificate=weak), "2/3"),
    }


PROOF_FAULTS = _proof_faults()


@pytest.mark.parametrize(("proof", "match"), PROOF_FAULTS.values(), ids=PROOF_FAULTS.keys())
def test_inclusion_proof_faults(proof: InclusionProof, match: str) -> None:
    with pytest.raises(InvalidBlock, match=match):
        proof.verify(CHAIN, POWERS)


def test_inclusion_proof_under_another_validator_set() -> None:
    p = proofs()[0]
    with pytest.raises(InvalidBlock, match="validator set"):
        p.verify(CHAIN, {**POWERS, OUTSIDER.public_key: 1})
    # Even a set that a forged certificate would satisfy must match the header's hash.
    forged_powers = {OUTSIDER.public_key: 1}
    forged = dataclasses.replace(p, certificate=certify(p.header.id(), 3, [OUTSIDER]))
    with pytest.raises(InvalidBlock, match="validator set"):
        forged.verify(CHAIN, forged_powers)


@pytest.mark.parametrize(
    "change",
    [
        {"tx": "text"},
        {"path": "x"},
        {"path": [b"short"]},
        {"path": [bytes(32)] * 65},
        {"index": -1},
        {"total": 0},
        {"header": {}},
        {"certificate": {}},
        {"extra": 1},
    ],
)
def test_inclusion_proof_from_wire_refuses(change: dict[str, Any]) -> None:
    wire = {**proofs(2)[0].to_wire(), **change}
    with pytest.raises(InvalidEncoding):
        InclusionProof.from_wire(wire)
