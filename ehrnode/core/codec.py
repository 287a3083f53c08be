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
or the stack. Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

import msgpack

from ehrnode.core.errors import InvalidEncoding

MAX_DEPTH = 16
DEFAULT_MAX_BYTES = 1 << 20

Value = Any  # nil | bool | int | str | bytes | list[Value] | dict[str, Value]


_SCALARS = (type(None), bool, int, str, bytes)


def _canonical(obj: Value, depth: int) -> Value:
    """A copy of ``obj`` whose dicts have their keys in sorted order, checked for types.

    Python orders str by code point, which is the order of their UTF-8 bytes.
    """
    if depth > MAX_DEPTH:
        raise InvalidEncoding(f"value nests deeper than {MAX_DEPTH} levels")
    kind = type(obj)
    if kind in _SCALARS:
        return obj
    if kind is dict:
        for key in obj:
            if type(key) is not str:
                raise InvalidEncoding(f"map keys must be strings, not {type(key).__name__}")
        return {key: _canonical(obj[key], depth + 1) for key in sorted(obj)}
    if kind is list or kind is tuple:
        return [_canonical(item, depth + 1) for item in obj]
    if isinstance(obj, _SCALARS):  # subclasses (IntEnum, ...)
        return obj
    raise InvalidEncoding(f"cannot encode a value of type {kind.__name__}")


def encode(obj: Value) -> bytes:
    """The canonical bytes of ``obj`` (dict keys sorted, shortest forms)."""
    try:
        out: bytes = msgpack.packb(_canonical(obj, 0), use_bin_type=True)
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


def _check(obj: Value, depth: int) -> None:
    """Nesting within MAX_DEPTH, and only the allowed types (no float, no timestamp)."""
    kind = type(obj)
    if kind is dict or kind is list:
        if depth > MAX_DEPTH or (depth == MAX_DEPTH and obj):
            raise InvalidEncoding(f"value nests deeper than {MAX_DEPTH} levels")
        for item in obj.values() if kind is dict else obj:
            item_kind = type(item)
            if item_kind is dict or item_kind is list:
                _check(item, depth + 1)
            elif item_kind not in _SCALARS:
                raise InvalidEncoding(f"values of type {item_kind.__name__} are not allowed")
    elif kind not in _SCALARS:
        raise InvalidEncoding(f"values of type {kind.__name__} are not allowed")


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Value:
    """Parse canonical msgpack, rejecting anything non-canonical or over the limits."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidEncoding("expected bytes")
    if len(data) > max_bytes:
        raise InvalidEncoding(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    if len(data) == 0:
        raise InvalidEncoding("empty message")
    data = bytes(data)
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
    # Keys are sorted and unique (checked while parsing), so packing the parsed value as it
    # is gives the canonical bytes; any difference is a longer-than-shortest form.
    if msgpack.packb(obj, use_bin_type=True) != data:
        raise InvalidEncoding("not in canonical form (a value is not in its shortest form)")
    return obj


def decode_trusted(data: bytes) -> Value:
    """Parse bytes this node wrote itself (its own state entries): no canonical check."""
    return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False)
