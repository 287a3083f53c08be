"""Canonical msgpack: one byte form per value, and nothing else gets through ``decode``."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from ehrnode.core import codec
from ehrnode.core.errors import InvalidEncoding

SETTINGS = settings(max_examples=200, deadline=None)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.text(max_size=40),
    st.binary(max_size=40),
)


def values(depth: int = 5) -> st.SearchStrategy[Any]:
    if depth == 0:
        return scalars
    inner = values(depth - 1)
    return st.one_of(
        scalars,
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=8), inner, max_size=4),
    )


def nested_lists(levels: int) -> Any:
    value: Any = []
    for _ in range(levels - 1):
        value = [value]
    return value


def as_decoded(value: Any) -> Any:
    """What decode gives back for a value: tuples come back as lists."""
    if isinstance(value, dict):
        return {k: as_decoded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_decoded(v) for v in value]
    return value


# --- round trips -------------------------------------------------------------------------


@SETTINGS
@given(values())
def test_round_trip(value: Any) -> None:
    raw = codec.encode(value)
    decoded = codec.decode(raw)
    assert decoded == as_decoded(value)
    assert codec.encode(decoded) == raw


def reference_bytes(value: Any) -> bytes:
    """The canonical bytes by the rule's own definition: keys sorted by a copy in Python,
    packed by the reference packer (msgpack-python)."""

    def sort(item: Any) -> Any:
        if isinstance(item, dict):
            return {key: sort(item[key]) for key in sorted(item)}
        if isinstance(item, list | tuple):
            return [sort(x) for x in item]
        return item

    out: bytes = msgpack.packb(sort(value), use_bin_type=True)
    return out


@settings(max_examples=2000, deadline=None)
@given(values())
def test_encode_gives_the_reference_packers_bytes(value: Any) -> None:
    """The fast packer (ormsgpack) and the reference agree byte for byte, and ``decode``
    accepts exactly those bytes."""
    raw = codec.encode(value)
    assert raw == reference_bytes(value)
    assert codec.encode_trusted(value) == raw
    assert codec.decode(raw) == as_decoded(value)


def test_trailing_bytes_are_refused() -> None:
    with pytest.raises(InvalidEncoding):
        codec.decode(codec.encode({"a": 1}) + b"\x00")


@SETTINGS
@given(st.dictionaries(st.text(max_size=8), scalars, min_size=2, max_size=8))
def test_map_bytes_do_not_depend_on_insertion_order(value: dict[str, Any]) -> None:
    backwards = dict(reversed(list(value.items())))
    assert codec.encode(backwards) == codec.encode(value)


@SETTINGS
@given(st.binary(max_size=64))
def test_arbitrary_bytes_either_decode_canonically_or_raise_invalid_encoding(data: bytes) -> None:
    try:
        value = codec.decode(data)
    except InvalidEncoding:
        return
    assert codec.encode(value) == data


@SETTINGS
@given(values(3), st.data())
def test_a_changed_byte_is_never_accepted_as_another_form_of_the_same_value(
    value: Any, data: st.DataObject
) -> None:
    raw = codec.encode(value)
    i = data.draw(st.integers(0, len(raw) - 1))
    flip = data.draw(st.integers(1, 255))
    mutated = raw[:i] + bytes([raw[i] ^ flip]) + raw[i + 1 :]
    try:
        decoded = codec.decode(mutated)
    except InvalidEncoding:
        return
    assert codec.encode(decoded) == mutated


def test_str_and_bin_are_distinct_types() -> None:
    assert codec.encode("a") != codec.encode(b"a")
    assert codec.decode(codec.encode("a")) == "a"
    assert codec.decode(codec.encode(b"a")) == b"a"


def test_keys_sort_by_utf8_bytes() -> None:
    raw = codec.encode({"é": 1, "a": 2, "B": 3, "aa": 4})
    assert list(msgpack.unpackb(raw)) == ["B", "a", "aa", "é"]


@pytest.mark.parametrize(
    "value",
    [0, 127, 128, 255, 256, 65535, 65536, 2**32, 2**64 - 1, -1, -32, -33, -128, -129, -(2**63)],
)
def test_int_boundaries_round_trip(value: int) -> None:
    raw = codec.encode(value)
    assert raw == msgpack.packb(value)
    assert codec.decode(raw) == value


def test_decode_accepts_bytearray_and_memoryview() -> None:
    raw = codec.encode({"a": [1, b"x"]})
    assert codec.decode(bytearray(raw)) == {"a": [1, b"x"]}
    assert codec.decode(memoryview(raw)) == {"a": [1, b"x"]}


# --- what encode refuses -----------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        1.5,
        float("nan"),
        {1, 2},
        object(),
        2**64,
        -(2**63) - 1,
        {b"key": 1},
        {1: "a"},
        {"a": [1.0]},
    ],
)
def test_encode_rejects_what_has_no_canonical_form(value: Any) -> None:
    with pytest.raises(InvalidEncoding):
        codec.encode(value)


def test_depth_limit_is_the_same_for_encode_and_decode() -> None:
    deepest = nested_lists(codec.MAX_DEPTH + 1)
    raw = codec.encode(deepest)
    assert codec.decode(raw) == deepest
    too_deep = nested_lists(codec.MAX_DEPTH + 2)
    with pytest.raises(InvalidEncoding, match="deeper"):
        codec.encode(too_deep)
    with pytest.raises(InvalidEncoding, match="deeper"):
        codec.decode(b"\x91" + raw)


def test_deep_maps_count_too() -> None:
    value: Any = 1
    for _ in range(codec.MAX_DEPTH + 1):
        value = {"k": value}
    with pytest.raises(InvalidEncoding):
        codec.encode(value)
    raw = msgpack.packb(value)
    with pytest.raises(InvalidEncoding):
        codec.decode(raw)


# --- what decode refuses -----------------------------------------------------------------

NON_CANONICAL = {
    "unsorted keys": b"\x82\xa1b\x01\xa1a\x02",
    "duplicate key": b"\x82\xa1a\x01\xa1a\x02",
    "duplicate key same value": b"\x82\xa1a\x01\xa1a\x01",
    "uint8 for a fixint": b"\xcc\x01",
    "uint16 for a uint8": b"\xcd\x00\xff",
    "uint32 for a uint16": b"\xce\x00\x00\xff\xff",
    "uint64 for a uint32": b"\xcf\x00\x00\x00\x00\xff\xff\xff\xff",
    "int8 for a negative fixint": b"\xd0\xff",
    "int16 for an int8": b"\xd1\xff\x80",
    "int64 for a positive value": b"\xd3\x00\x00\x00\x00\x00\x00\x00\x01",
    "str8 for a fixstr": b"\xd9\x01a",
    "str16 for a str8": b"\xda\x00\x01a",
    "bin16 for a bin8": b"\xc5\x00\x01a",
    "bin32 for a bin8": b"\xc6\x00\x00\x00\x01a",
    "array16 for a fixarray": b"\xdc\x00\x01\x01",
    "array32 for a fixarray": b"\xdd\x00\x00\x00\x01\x01",
    "map16 for a fixmap": b"\xde\x00\x01\xa1a\x01",
    "map32 for a fixmap": b"\xdf\x00\x00\x00\x01\xa1a\x01",
    "nested unsorted keys": b"\x91\x82\xa1b\x01\xa1a\x02",
}

NOT_ALLOWED = {
    "float64": b"\xcb" + bytes(8),
    "float32": b"\xca" + bytes(4),
    "float inside a map": b"\x81\xa1a\xca\x00\x00\x00\x00",
    "fixext1": b"\xd4\x05\x00",
    "ext8": b"\xc7\x01\x05\x00",
    "timestamp ext": msgpack.packb(msgpack.Timestamp(1, 0)),
    "bin map key": b"\x81\xc4\x01a\x01",
    "int map key": b"\x81\x01\x01",
    "nil map key": b"\x81\xc0\x01",
    "array map key": b"\x81\x90\x01",
}

GARBAGE = {
    "empty": b"",
    "reserved byte": b"\xc1",
    "truncated array": b"\x92\x01",
    "truncated str": b"\xa5ab",
    "trailing data": b"\x01\x01",
    "invalid utf-8": b"\xa1\xff",
    "lone surrogate as utf-8": b"\xa3\xed\xa0\x80",
    "array claims 2**32-1 items": b"\xdd\xff\xff\xff\xff",
    "map claims 2**32-1 pairs": b"\xdf\xff\xff\xff\xff",
    "bin claims 2**32-1 bytes": b"\xc6\xff\xff\xff\xff",
    "nesting past msgpack's own stack": b"\x91" * 5000 + b"\x90",
}


@pytest.mark.parametrize("data", NON_CANONICAL.values(), ids=NON_CANONICAL.keys())
def test_decode_rejects_non_canonical_forms(data: bytes) -> None:
    # Each of these parses as msgpack, so only the canonical check stands in the way.
    msgpack.unpackb(data, strict_map_key=False)
    with pytest.raises(InvalidEncoding, match="canonical"):
        codec.decode(data)


@pytest.mark.parametrize("data", NOT_ALLOWED.values(), ids=NOT_ALLOWED.keys())
def test_decode_rejects_types_outside_the_subset(data: bytes) -> None:
    with pytest.raises(InvalidEncoding):
        codec.decode(data)


@pytest.mark.parametrize("data", GARBAGE.values(), ids=GARBAGE.keys())
def test_decode_rejects_garbage(data: bytes) -> None:
    with pytest.raises(InvalidEncoding):
        codec.decode(data)


BOTH_PARSERS = pytest.mark.parametrize("parse", [codec.decode, codec.parse])


@BOTH_PARSERS
@pytest.mark.parametrize("data", ["\x01", None, 1, [1]])
def test_decode_rejects_what_is_not_bytes(parse: Any, data: Any) -> None:
    with pytest.raises(InvalidEncoding, match="bytes"):
        parse(data)


@BOTH_PARSERS
def test_size_limit_is_checked_before_parsing(parse: Any) -> None:
    raw = codec.encode(b"x" * 100)
    assert parse(raw, max_bytes=len(raw)) == b"x" * 100
    with pytest.raises(InvalidEncoding, match="exceeds the limit"):
        parse(raw, max_bytes=len(raw) - 1)
    # Even garbage is refused for its size, without being parsed.
    with pytest.raises(InvalidEncoding, match="exceeds the limit"):
        parse(b"\xc1" * (codec.DEFAULT_MAX_BYTES + 1))


# --- parse: an envelope's bytes in any form, within the same limits and types -------------


@pytest.mark.parametrize("data", NON_CANONICAL.values(), ids=NON_CANONICAL.keys())
def test_parse_takes_every_byte_form_of_a_value(data: bytes) -> None:
    assert codec.parse(data) == msgpack.unpackb(data, raw=False)


@pytest.mark.parametrize(
    "data",
    [*NOT_ALLOWED.values(), *GARBAGE.values()],
    ids=[*NOT_ALLOWED.keys(), *GARBAGE.keys()],
)
def test_parse_refuses_what_decode_refuses_but_the_form(data: bytes) -> None:
    with pytest.raises(InvalidEncoding):
        codec.parse(data)


def test_parse_keeps_the_depth_limit() -> None:
    deep: Any = 1
    for _ in range(codec.MAX_DEPTH + 1):
        deep = {"k": deep}
    with pytest.raises(InvalidEncoding, match="deeper"):
        codec.parse(msgpack.packb(deep))
