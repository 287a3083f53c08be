"""Canonical msgpack: the one byte form of every signed or hashed structure.

Rules (also in docs/protocol.md, "Canonical encoding"):

- Values are nil, bool, int (-2**63 .. 2**64-1), str (UTF-8), bin, array, map. No floats,
  no extension types: a float has many byte forms and health data on chain needs none.
- Every map key is a str; keys are sorted by their UTF-8 bytes; no key repeats.
- Every int, str, bin, array and map header uses the shortest msgpack form (what the
  reference packer emits); str and bin are distinct types (msgpack "use_bin_type").

``decode`` enforces all of it by re-encoding what it parsed and comparing the bytes, so a
value has exactly one encoding and a transaction has exactly one id. It also enforces size
and nesting limits before and after parsing, so an outsider's bytes cannot exhaust memory
or the stack. ``parse`` keeps the types and limits but takes any byte form, for an
envelope whose contents are checked on their own (a peer's frame). Pure: no I/O.

The packing and parsing are ormsgpack's (Rust; it sorts map keys itself, about 9x faster
than sorting a copy in Python). The reference packer (msgpack-python) stays the arbiter:
tests/test_codec.py checks the two give the same bytes for every kind of value, and
``decode`` falls back to it to name what is wrong with bytes it rejects.
"""

from __future__ import annotations

from typing import Any

import msgpack
import ormsgpack

from ehrnode.core.errors import InvalidEncoding

MAX_DEPTH = 16
DEFAULT_MAX_BYTES = 1 << 20

Value = Any  # nil | bool | int | str | bytes | list[Value] | dict[str, Value]


_SCALARS = (type(None), bool, int, str, bytes)
_SORTED = ormsgpack.OPT_SORT_KEYS


def _check(obj: Value, depth: int) -> None:
    """Only the allowed types (no float, no extension), str map keys, nesting within
    MAX_DEPTH; the same walk for what is encoded and what was parsed (no copy made)."""
    kind = type(obj)
    if kind in _SCALARS:
        return
    if depth > MAX_DEPTH or (depth == MAX_DEPTH and isinstance(obj, dict | list | tuple) and obj):
        raise InvalidEncoding(f"value nests deeper than {MAX_DEPTH} levels")
    if kind is dict:
        for key, item in obj.items():
            if type(key) is not str:
                raise InvalidEncoding(f"map keys must be strings, not {type(key).__name__}")
            if type(item) not in _SCALARS:
                _check(item, depth + 1)
        return
    if kind is list or kind is tuple:
        for item in obj:
            if type(item) not in _SCALARS:
                _check(item, depth + 1)
        return
    if isinstance(obj, _SCALARS) and not isinstance(obj, float):  # IntEnum, str subclasses
        return
    raise InvalidEncoding(f"values of type {kind.__name__} are not allowed")


def check_types(obj: Value) -> None:
    """InvalidEncoding unless ``obj`` holds only the allowed types, nested within
    ``MAX_DEPTH`` (what ``decode`` checks unless told ``typed=False``)."""
    _check(obj, 0)


def encode(obj: Value) -> bytes:
    """The canonical bytes of ``obj`` (dict keys sorted, shortest forms), its types checked."""
    _check(obj, 0)
    return encode_trusted(obj)


def encode_trusted(obj: Value) -> bytes:
    """The canonical bytes of a value built by this node's own code from checked parts (the
    state machine's entries): the same bytes as ``encode`` without the walk over types."""
    try:
        out: bytes = ormsgpack.packb(obj, option=_SORTED)
    except (OverflowError, ValueError, TypeError) as err:
        raise InvalidEncoding(f"cannot encode value: {err}") from err
    return out


def _reject_ext(code: int, data: bytes) -> object:
    raise InvalidEncoding(f"msgpack extension type {code} is not allowed")


def _sorted_pairs(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    """Build a map from the wire, refusing keys that are not strictly increasing."""
    previous = None
    for key, _ in pairs:
        if type(key) is not str:
            raise InvalidEncoding(f"map keys must be strings, not {type(key).__name__}")
        if previous is not None and key <= previous:
            raise InvalidEncoding("not in canonical form (map keys unsorted or repeated)")
        previous = key
    return dict(pairs)


def decode(data: object, *, max_bytes: int = DEFAULT_MAX_BYTES, typed: bool = True) -> Value:
    """Parse canonical msgpack, rejecting anything non-canonical or over the limits (and
    anything that is not bytes: typed ``object`` so that compiled code refuses it here).

    ``typed=False`` leaves out the walk over the parsed value's types (no float, nesting
    within ``MAX_DEPTH``) for a caller that checks the type of every value itself, as a
    transaction's fields and body specs do: the parser already refuses extension types
    and map keys that are not strings, and the bytes are still checked to be canonical."""
    data = _sized(data, max_bytes)
    obj = _unpacked(data)
    if typed:
        _check(obj, 0)
    # Packing the parsed value with sorted keys gives the canonical bytes; any difference is
    # an unsorted or repeated key, a longer-than-shortest form, or trailing bytes.
    try:
        again = ormsgpack.packb(obj, option=_SORTED)
    except (TypeError, ValueError, OverflowError):  # e.g. nested deeper than it packs
        return _diagnose(data)
    if again != data:
        return _diagnose(data)
    return obj


def decode_certified(data: object, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Value:
    """``decode(typed=False)`` of bytes a quorum of validators certified as canonical (the
    transactions of a certified block), without packing the value again to compare."""
    return _unpacked(_sized(data, max_bytes))


def _unpacked(data: bytes) -> Value:
    """The fast parse of ``decode`` and ``decode_certified``."""
    try:
        return ormsgpack.unpackb(data)
    except Exception:  # ormsgpack raises ValueError/TypeError; the reference parser says why
        return _diagnose(data)


def parse(data: object, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Value:
    """Parse msgpack within ``decode``'s limits and types, in any of its byte forms: for an
    envelope (a peer's frame) that is neither signed nor hashed, whose signed and hashed
    contents are checked on their own. Packing a multi-megabyte frame again, to compare it
    with the bytes received, took up to 50 times as long as parsing it."""
    data = _sized(data, max_bytes)
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_reject_ext)
    except InvalidEncoding:
        raise
    except Exception as err:  # ValueError, ExtraData, FormatError and a few others on garbage
        raise InvalidEncoding(f"not valid msgpack: {err or type(err).__name__}") from err
    _check(obj, 0)  # also refuses the bytes keys strict_map_key lets through
    return obj


def _sized(data: object, max_bytes: int) -> bytes:
    # Exact bytes (nearly every caller's) take one type check. Compiled, the former
    # ``isinstance(data, bytes | bytearray | memoryview)`` built the union at each call,
    # about 2k instructions a transaction at every node.
    if type(data) is not bytes and not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidEncoding("expected bytes")
    if len(data) > max_bytes:
        raise InvalidEncoding(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    if len(data) == 0:
        raise InvalidEncoding("empty message")
    return data if type(data) is bytes else bytes(data)


def _diagnose(data: bytes) -> Value:
    """Raise InvalidEncoding naming what is wrong with ``data`` (the slow, exact path)."""
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_reject_ext,
            object_pairs_hook=_sorted_pairs,
        )
    except InvalidEncoding:
        raise
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as err:
        raise InvalidEncoding(f"not valid msgpack: {err}") from err
    except Exception as err:  # msgpack's C parser raises a few other kinds on garbage
        raise InvalidEncoding(f"not valid msgpack: {err}") from err
    _check(obj, 0)
    if msgpack.packb(obj, use_bin_type=True) != data:
        raise InvalidEncoding("not in canonical form (a value is not in its shortest form)")
    # Both parsers accepted bytes the fast path refused (it nests deeper than ormsgpack
    # allows, say): refuse them all the same, as one form of every value is the rule.
    raise InvalidEncoding("not in canonical form")


def decode_trusted(data: bytes) -> Value:
    """Parse bytes this node wrote itself (its own state entries): no canonical check."""
    return ormsgpack.unpackb(data)
