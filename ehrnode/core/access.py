"""The access log's entries as bytes: their hash, what the node signs, and the check that a
patient's copy of the log is one unbroken, signed chain. The node writes the log
(``store.access``); a client verifies it here. Pure: no I/O.

    entry = {"seq", "time" (ms), "reader" bin32, "record" bin32, "node" bin32,
             "request" bin64 (the reader's signature of its request),
             "prev" bin32 (hash of the previous entry; zeros for the first),
             "sig" bin64 (the node's signature of the entry without "sig")}

    hash(entry)          = sha256(encode(entry))            (with "sig")
    node signs           DOMAIN_ACCESS || encode(entry without "sig")
"""

from __future__ import annotations

from typing import Any

from ehrnode.core import codec, crypto

ZERO = bytes(32)


def entry_hash(entry: dict[str, Any]) -> bytes:
    return crypto.sha256(codec.encode(entry))


def entry_signing_bytes(entry: dict[str, Any]) -> bytes:
    unsigned = {k: v for k, v in entry.items() if k != "sig"}
    return crypto.DOMAIN_ACCESS + codec.encode(unsigned)


def verify_chain(entries: list[dict[str, Any]], previous: bytes = ZERO) -> bool:
    """True when each entry is signed by its node and links to the one before it."""
    for entry in entries:
        if entry["prev"] != previous:
            return False
        if not crypto.verify(entry["node"], b"", entry_signing_bytes(entry), entry["sig"]):
            return False
        previous = entry_hash(entry)
    return True
