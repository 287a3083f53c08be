"""Small values the SDK's modules share: ids given as bytes or hex, expiry times, and the
result of a submitted transaction."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ehrnode.client.errors import InvalidEncoding
from ehrnode.core import crypto

KeyLike = bytes | str


def key_bytes(value: KeyLike, what: str = "public id") -> bytes:
    """A 32-byte id from bytes or 64 hex characters."""
    if isinstance(value, bytes):
        if len(value) != 32:
            raise InvalidEncoding(f"{what} must be 32 bytes")
        return value
    return crypto.from_hex(value.strip().lower(), what=what)


def to_ms(when: datetime | int | None) -> int | None:
    """Milliseconds since the epoch; a datetime must carry its time zone."""
    if when is None or isinstance(when, int):
        return when
    if when.tzinfo is None:
        raise InvalidEncoding("give an expiry time with a time zone (e.g. ...T00:00:00Z)")
    return int(when.timestamp() * 1000)


@dataclass(frozen=True)
class Submitted:
    """A transaction the node accepted: ``committed`` at ``height``, or still ``pending``."""

    id: str
    status: str
    height: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "height": self.height}
