"""A transaction's every value is type-checked by its field and body specs (the codec's own
walk over types is left out for transactions): a float, a bool where an int belongs, a
nesting far too deep or a map where a scalar belongs is refused wherever it appears."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from ehrnode.core import bodies, crypto, tx
from ehrnode.core.errors import InvalidEncoding, InvalidTransaction

K = bytes(range(32))
WRAP = b"\x07" * crypto.WRAPPED_KEY_BYTES
RECORD = {
    "patient": K,
    "blob": b"\x01" * 32,
    "size": 10,
    "type": "Observation",
    "keys": [[K, WRAP]],
    "amends": b"\x02" * 32,
}
BODIES: dict[str, dict[str, Any]] = {
    "register": {"role": "provider", "name": "Dr A", "endorsement": {"by": K, "sig": K + K}},
    "record": RECORD,
    "records": {"items": [RECORD]},
    "grant": {"grantee": K, "scope": "records", "records": [[K, WRAP]]},
    "revoke": {"grant": K},
    "erase": {"records": [K]},
    "validator": {"action": "add", "key": K, "power": 10},
}
STANDING = {"grantee": K, "scope": "standing", "types": ["Observation"], "expires": 5}


def canonical(value: Any) -> bytes:
    """msgpack with sorted map keys and the shortest forms, whatever the types inside."""

    def sort(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: sort(v[k]) for k in sorted(v)}
        if isinstance(v, list):
            return [sort(x) for x in v]
        return v

    packed: bytes = msgpack.packb(sort(value), use_bin_type=True)
    return packed


def raw_tx(kind_: str, body_: Any, **top: Any) -> bytes:
    fields = {"v": 1, "chain": "c", "kind": kind_, "signer": K, "nonce": 1, "body": body_}
    fields["sig"] = K + K
    fields.update(top)
    return canonical(fields)


def leaves(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The path of every value inside ``value``, containers included."""
    if path:
        yield path
    if isinstance(value, dict):
        for key in value:
            yield from leaves(value[key], (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from leaves(item, (*path, index))


def replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    out = copy.deepcopy(value)
    holder = out
    for step in path[:-1]:
        holder = holder[step]
    holder[path[-1]] = new
    return out


def deep(levels: int) -> Any:
    value: Any = []
    for _ in range(levels):
        value = [value]
    return value


WRONG = [1.5, True, None, deep(40), deep(300), {"x": 1.5}, [1.5]]
CASES = [(kind, body) for kind, body in BODIES.items()] + [("grant", STANDING)]
IDS = [f"{kind}-{i}" for i, (kind, _) in enumerate(CASES)]


@pytest.mark.parametrize(
    ("kind", "body"), CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)]
)
def test_the_sample_body_is_valid(kind: str, body: dict[str, Any]) -> None:
    assert tx.decode(raw_tx(kind, body), verify_sig=False).body == body


@pytest.mark.parametrize(
    ("kind", "body"), CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)]
)
def test_a_wrong_type_anywhere_in_a_body_is_refused(kind: str, body: dict[str, Any]) -> None:
    for path in leaves(body):
        for wrong in WRONG:
            raw = raw_tx(kind, replaced(body, path, wrong))
            with pytest.raises(InvalidTransaction) as caught:
                tx.decode(raw, verify_sig=False)
            assert caught.value.code != "bad_signature", (path, wrong)


@pytest.mark.parametrize(
    ("kind", "body"), CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)]
)
def test_make_refuses_a_wrong_type_anywhere_in_a_body(kind: str, body: dict[str, Any]) -> None:
    """``make`` leaves the codec's walk over types to the body specs (and to it for the
    shape-only kinds): a client still cannot sign a body a node would refuse."""
    signer = crypto.Identity(bytes(32))
    assert tx.decode(tx.make(signer, "test-chain", kind, 1, body).raw).body == body
    for path in leaves(body):
        for wrong in WRONG:
            with pytest.raises((InvalidTransaction, InvalidEncoding)):
                tx.make(signer, "test-chain", kind, 1, replaced(body, path, wrong))


@pytest.mark.parametrize("field", ["v", "chain", "kind", "signer", "nonce", "sig", "body"])
def test_a_wrong_type_in_a_top_field_is_refused(field: str) -> None:
    for wrong in WRONG:
        with pytest.raises(InvalidTransaction):
            tx.decode(raw_tx("revoke", {"grant": K}, **{field: wrong}), verify_sig=False)


def test_evidence_values_get_the_codec_walk_over_types() -> None:
    """The evidence spec checks only the shape of its votes: a float inside one is refused
    by the codec's walk, which it still gets."""
    vote = {"type": "prevote", "height": 1, "round": 0, "block": K, "validator": K, "sig": K}
    assert tx.decode(raw_tx("evidence", {"a": vote, "b": vote}), verify_sig=False)
    for wrong in (1.5, deep(40)):
        bad = {**vote, "round": wrong}
        with pytest.raises(InvalidTransaction) as caught:
            tx.decode(raw_tx("evidence", {"a": bad, "b": vote}), verify_sig=False)
        assert caught.value.code == "malformed_body"


def _record_bodies() -> Any:
    holder = st.sampled_from([K, b"\x00" * 32, b"\xff" * 32, b"\x05" * 32, b"\x05" * 31])
    wrapped = st.sampled_from(
        [WRAP, b"\x07" * crypto.BATCH_WRAPPED_KEY_BYTES, b"\x07" * 10, "text", 3]
    )
    pair = st.one_of(
        st.lists(st.one_of(holder, wrapped), min_size=2, max_size=2),
        st.tuples(holder, wrapped).map(list),
        st.sampled_from([[], [K], [K, WRAP, WRAP], (K, WRAP), "pair"]),
    )
    keys = st.one_of(
        st.lists(pair, min_size=0, max_size=4),
        st.lists(st.tuples(holder, wrapped).map(list), min_size=1, max_size=4).map(
            lambda pairs: sorted(pairs, key=lambda p: p[0])
        ),
        st.just([[K, WRAP]] * 65),
    )
    scalar = st.sampled_from([K, b"\x01" * 32, b"\x01" * 33, 7, -1, 1 << 40, (1 << 40) + 1])
    kind = st.sampled_from(
        ["Observation", "Observation\n", "A" * 64, "A" * 64 + "\n", "A" * 65, "", "obs", "O1"]
    )
    mutants = {
        "patient": st.one_of(holder, scalar),
        "blob": st.one_of(holder, scalar),
        "size": st.one_of(st.integers(-2, 1 << 41), st.booleans(), st.just(b"x")),
        "type": st.one_of(kind, st.just(5)),
        "keys": keys,
    }
    valid = {**RECORD, "keys": [[K, WRAP], [b"\xff" * 32, WRAP]]}
    del valid["amends"]
    # Mostly well-formed fields, some of them replaced; "amends" and an unknown field added.
    required = {
        name: st.one_of(st.just(valid[name]), st.just(valid[name]), mutants[name])
        for name in mutants
    }
    # Every required field present (a missing one is among the edge cases above), so that
    # a good share of the bodies are valid and the accepting side is exercised too.
    return st.fixed_dictionaries(
        required, optional={"amends": st.one_of(holder, scalar), "extra": st.just(1)}
    )


def _edge_records() -> list[dict[str, Any]]:
    base = {**RECORD, "keys": [[K, WRAP], [b"\xff" * 32, WRAP]]}
    plain = {k: v for k, v in base.items() if k != "amends"}
    batch_wrap = b"\x07" * crypto.BATCH_WRAPPED_KEY_BYTES
    holders = [bytes([i]) * 32 for i in range(1, 66)]
    return [
        base,
        plain,
        {**plain, "keys": [[K, WRAP], [K, WRAP]]},  # a holder twice
        {**plain, "keys": [[b"\xff" * 32, WRAP], [K, WRAP]]},  # unsorted
        {**plain, "keys": [[b"\xff" * 32, WRAP]]},  # not wrapped for the patient
        {**plain, "keys": [[K, batch_wrap]]},
        {**plain, "keys": [[K, WRAP[:-1]]]},
        {**plain, "keys": []},
        {**plain, "patient": holders[0], "keys": [[h, WRAP] for h in holders[:64]]},
        {**plain, "patient": holders[0], "keys": [[h, WRAP] for h in holders[:65]]},
        {**plain, "type": "A" * 64},
        {**plain, "type": "A" * 64 + "\n"},  # 65 characters the pattern's "$" lets by
        {**plain, "type": "Observation\n"},
        {**plain, "type": ""},
        {**plain, "size": 1 << 40},
        {**plain, "size": (1 << 40) + 1},
        {**plain, "size": True},
        {**plain, "size": -1},
        {**plain, "amends": b"\x02" * 31},
        {**plain, "extra": 1},
        {k: v for k, v in plain.items() if k != "blob"},
    ]


def _spec_accepts(body: dict[str, Any]) -> bool:
    try:
        bodies.check_spec("record", body)
    except InvalidTransaction:
        return False
    return True


@pytest.mark.parametrize("body", _edge_records())
def test_the_record_fast_path_agrees_on_the_edges(body: dict[str, Any]) -> None:
    assert bodies._plain_record(body) is _spec_accepts(body)


def test_the_record_fast_path_agrees_with_the_spec_walk() -> None:
    """``_plain_record`` (every record at every node) must accept exactly what walking the
    record spec accepts: never a body the walk refuses, and every body it passes (else
    the fast path would quietly stop being taken)."""
    accepted = []

    @settings(max_examples=3000, deadline=None, derandomize=True)
    @given(body=_record_bodies())
    def check(body: dict[str, Any]) -> None:
        valid = _spec_accepts(body)
        assert bodies._plain_record(body) is valid, body
        if valid:
            accepted.append(body)

    check()
    assert accepted, "the strategy never produced a valid record body"
    assert bodies._plain_record(RECORD)
