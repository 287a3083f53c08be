"""The access log: every read of a record's ciphertext through this node, per patient.

Table in the node's LevelDB:

    b"A" + patient(32) + seq(8, BE)   entry (canonical msgpack), see below
    b"a" + patient(32)                {"seq": next seq, "hash": hash of the last entry}

    entry = {"seq", "time" (ms), "reader" bin32, "record" bin32, "node" bin32,
             "request" bin64 (the reader's signature of its request),
             "prev" bin32 (hash of the previous entry; zeros for the first),
             "sig" bin64 (the node's signature of the entry without "sig")}

Entries are hash-chained per patient and signed by the node, so a node cannot quietly drop
or rewrite a read it served: the patient's copy of the chain would no longer link. Each
entry is written in a synced batch before the ciphertext is served. The entry's bytes,
hash and the chain check are pure and live in ``core.access``; a client verifies with them.
"""

from __future__ import annotations

import struct
import threading
from typing import Any

from ehrnode.core import codec
from ehrnode.core.access import ZERO, entry_hash, entry_signing_bytes, verify_chain
from ehrnode.core.crypto import Identity
from ehrnode.store.db import KV

T_ACCESS = b"A"
T_HEAD = b"a"


class AccessLog:
    def __init__(self, kv: KV, node: Identity) -> None:
        self.kv = kv
        self.node = node
        # Appends run on worker threads and each reads the head it links to: one at a time,
        # or two concurrent reads of one patient would both claim the same place.
        self._lock = threading.Lock()

    def append(
        self, patient: bytes, reader: bytes, record: bytes, request_sig: bytes, now_ms: int
    ) -> dict[str, Any]:
        with self._lock:
            return self._append(patient, reader, record, request_sig, now_ms)

    def _append(
        self, patient: bytes, reader: bytes, record: bytes, request_sig: bytes, now_ms: int
    ) -> dict[str, Any]:
        raw_head = self.kv.get(T_HEAD + patient)
        head: dict[str, Any] = (
            {"seq": 0, "hash": ZERO} if raw_head is None else codec.decode(raw_head)
        )
        entry: dict[str, Any] = {
            "seq": head["seq"],
            "time": now_ms,
            "reader": reader,
            "record": record,
            "node": self.node.public_key,
            "request": request_sig,
            "prev": head["hash"],
        }
        entry["sig"] = self.node.sign(b"", entry_signing_bytes(entry))
        new_head = {"seq": head["seq"] + 1, "hash": entry_hash(entry)}
        self.kv.write(
            {
                T_ACCESS + patient + struct.pack(">Q", entry["seq"]): codec.encode(entry),
                T_HEAD + patient: codec.encode(new_head),
            },
            sync=True,
        )
        return entry

    def entries(self, patient: bytes, after: int = -1, limit: int = 100) -> list[dict[str, Any]]:
        start = T_ACCESS + patient + struct.pack(">Q", after + 1)
        return [
            codec.decode(value)
            for _key, value in self.kv.scan(T_ACCESS + patient, start=start, limit=limit)
        ]


__all__ = ["ZERO", "AccessLog", "entry_hash", "entry_signing_bytes", "verify_chain"]
