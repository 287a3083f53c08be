"""Blocks' bytes, appended to numbered segment files beside LevelDB.

    <home>/blocks/segments/<8-digit number>.seg   blocks one after another, no framing
    b"B" + height   in LevelDB: the block's place, segment BE4 + offset BE8 + size BE4
    b"F" + BE4(n)   in LevelDB: BE8, how far segment n is committed

A block is 3.5 MB under load. Kept in LevelDB, its bytes went through the write-ahead log,
a memtable (half of each one) and a level-0 table, and then again through every
compaction of the tables around them: LevelDB's threads took 28-37 us of a validator's CPU
a transaction (docs/benchmarks.md, notes 46-47). Here they are written once.

The segments are ``blobs.segments``' (the same append, cut and crash rules): a block's
bytes are durable before the batch naming them is written, and the same batch records how
far its segment is committed; what lies past that (an append whose batch a crash or an
error kept from being written) is cut off, at once or at the next start. A place is the
only 16-byte value a ``B`` entry can hold: a block's own bytes, as earlier builds stored
them in that entry, are a msgpack map far longer, and are still read.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ehrnode.blobs.segments import Segments, recorded_ends
from ehrnode.core.errors import Unavailable
from ehrnode.store.db import KV

T_FILE_END = b"F"
PLACE = struct.Struct(">IQI")


class BlockFiles:
    """The segment files under ``root``; the appends that name a block in a batch are
    serialised here (a commit's runs on a worker thread, a proposal's on another)."""

    def __init__(self, root: Path, kv: KV) -> None:
        self._segments = Segments(root, recorded_ends(kv.scan(T_FILE_END), T_FILE_END))
        self._appending = threading.Lock()

    @contextmanager
    def appending(self, key: bytes, raw: bytes) -> Iterator[dict[bytes, bytes]]:
        """Append ``raw`` durably and give the entries to write with it: its place at
        ``key`` and its segment's new end. The caller writes them (synced) inside the
        ``with``; if that raises, the appended bytes are cut off again."""
        with self._appending, self._segments.appending([raw], T_FILE_END) as (places, ends):
            [(segment, offset)] = places
            yield {key: PLACE.pack(segment, offset, len(raw)), **ends}

    def read(self, place: bytes) -> bytes:
        return self.read_part(place, 0, PLACE.unpack(place)[2])

    def read_part(self, place: bytes, start: int, size: int) -> bytes:
        """``size`` bytes from ``start`` within the block at ``place`` (one transaction's)."""
        segment, offset, block_size = PLACE.unpack(place)
        if start < 0 or size < 0 or start + size > block_size:
            raise Unavailable(
                f"bytes {start}-{start + size} are outside the block at {offset} of block "
                f"segment {segment} ({block_size} bytes); the data directory is damaged"
            )
        try:
            return self._segments.read(segment, offset + start, size)
        except OSError as err:
            raise Unavailable(
                f"a block's bytes are missing from block segment {segment} (at {offset}, "
                f"{block_size} bytes): {err}; the data directory is damaged"
            ) from err

    def close(self) -> None:
        self._segments.close()


def is_place(value: bytes) -> bool:
    return len(value) == PLACE.size
