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


def _canonical(obj: Value, depth: int) -> Value:
    if depth > MAX_DEPTH:
        raise InvalidEncoding(f"value nests deeper than {MAX_DEPTH} levels")
    if isinstance(obj, dict):
        out = {}
        for key in sorted(obj, key=_key_bytes):
            out[key] = _canonical(obj[key], depth + 1)
        return out
    if isinstance(obj, list | tuple):
        return [_canonical(item, depth + 1) for item in obj]
    if obj is None or isinstance(obj, bool | int | str | bytes):
        return obj
    raise InvalidEncoding(f"cannot encode a value of type {type(obj).__name__}")


def _key_bytes(key: object) -> bytes:
    if not isinstance(key, str):
        raise InvalidEncoding(f"map keys must be strings, not {type(key).__name__}")
    return key.encode()


def encode(obj: Value) -> bytes:
    """The canonical bytes of ``obj`` (dict keys sorted, shortest forms)."""
    try:
        out: bytes = msgpack.packb(_canonical(obj, 0), use_bin_type=True)
    except (OverflowError, ValueError, TypeError) as err:
        raise InvalidEncoding(f"cannot encode value: {err}") from err
    return out


def _reject_ext(code: int, data: bytes) -> object:
    raise InvalidEncoding(f"msgpack extension type {code} is not allowed")


def _check(obj: Value, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise InvalidEncoding(f"value nests deeper than {MAX_DEPTH} levels")
    if isinstance(obj, dict):
        for value in obj.values():
            _check(value, depth + 1)
    elif isinstance(obj, list):
        for item in obj:
            _check(item, depth + 1)
    elif isinstance(obj, float):
        raise InvalidEncoding("floats are not allowed")


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
        )
    except InvalidEncoding:
        raise
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as err:
        raise InvalidEncoding(f"not valid msgpack: {err}") from err
    except Exception as err:  # msgpack's C parser raises a few other kinds on garbage
        raise InvalidEncoding(f"not valid msgpack: {err}") from err
    _check(obj, 0)
    if encode(obj) != data:
        raise InvalidEncoding("not in canonical form (map keys unsorted or not shortest form)")
    return obj
