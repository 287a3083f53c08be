"""The chain on disk: blocks, certificates, the transaction index and the state entries.

Tables in the node's LevelDB (one-byte prefix, then the key; heights are 8-byte big-endian
so that keys sort by height):

    b"M" + b"head"            {"height", "id", "time", "digest" bin(256), "genesis" bin32}
    b"B" + height             the block's place in the block files (``store.blockfiles``),
                              or, in a chain kept without them (in memory), the block's
                              bytes (core.block.Block); above the head, the block this validator
                              proposed or locked on at that height (``pending_block_key``,
                              written by ``consensus.signing``), never read as committed
    b"C" + height             the certificate that finalised it (core.block.Certificate)
    b"H" + block id           height
    b"T" + tx id              height(8) + index(4) + offset(4) + size(4): where a
                              transaction was committed, and where its bytes lie in
                              that block's bytes
    b"S" + state key          state entry (layouts in core.layout)

``commit`` appends a block to the block files (unless it is in its slot already), durably,
then writes its place, its certificate, its index entries, its state changes and the new
head in one synced batch: after a crash the head names the last block whose changes are
all there, and none of a later block's changes are.

This module persists and reads; it decides nothing (``core.state`` does).
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Generator, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ehrnode.core import authority, codec, merkle, state
from ehrnode.core.block import ZERO_HASH, Block, Certificate, InclusionProof
from ehrnode.core.errors import ConfigError, NotFound, Unavailable
from ehrnode.core.genesis import Genesis
from ehrnode.core.layout import P_BLOB
from ehrnode.store.batches import TX_PLACE, commit_entries
from ehrnode.store.blockfiles import BlockFiles, is_place
from ehrnode.store.claims import ClaimFilter
from ehrnode.store.db import KV

T_META = b"M"
T_BLOCK = b"B"
T_CERT = b"C"
T_BLOCK_ID = b"H"
T_TX = b"T"
T_STATE = b"S"
K_HEAD = T_META + b"head"
# The layout of the state entries (``core.layout``) this build writes and reads, kept in the
# head record. 2: a record's first wrapped keys in one ``wkey`` entry, no ``ver`` entry for
# a first version. 3: index entries outside the state hash, a root record's "seq". 4: a
# patient's account keeps the height of its latest record write ("last"). A data
# directory of another layout holds other state hashes: its chain cannot be continued by
# this build. 5: the blocks' bytes in block files, their places in b"B" (layout 4's
# blocks in b"B" are still read, and such a directory is continued as layout 5). 6: no
# ``wkey`` entry; a record's first wrapped keys are read from its transaction, which
# b"T" now places within its block; a first version's ``rec`` entry leaves out "root"
# and "head" while each is its own id.
STATE_LAYOUT = 6
READ_LAYOUTS = (6,)

MAX_STORED_BLOCK = 1 << 30


def height_key(table: bytes, height: int) -> bytes:
    return table + struct.pack(">Q", height)


def pending_block_key(height: int) -> bytes:
    """Where the block of ``height`` is kept: before its commit, a validator's signing
    record puts the block it proposes or locks on there, so that committing that same
    block does not write it a second time (``Chain.commit``'s ``stored``)."""
    return height_key(T_BLOCK, height)


@dataclass(frozen=True)
class Head:
    height: int
    id: bytes
    time: int
    digest: int

    @property
    def state_hash(self) -> bytes:
        return state.state_hash(self.digest)


@dataclass(frozen=True)
class TxLocation:
    height: int
    index: int


class StateView:
    """Committed state entries, as the state machine reads them. A blob claim that the
    claim filter rules out is answered without LevelDB once the filter is filled
    (``store.claims``)."""

    def __init__(self, kv: KV) -> None:
        self._kv = kv
        self.claims = ClaimFilter()

    def get(self, key: bytes) -> bytes | None:
        if self.claims.rules_out(key):
            return None
        return self._kv.get(T_STATE + key)

    def fill_claims(self, chunk: int = 256) -> Generator[int, None, None]:
        """Add every committed claim to the filter, yielding the count after each
        ``chunk``; the filter answers once the scan is done. Claims committed meanwhile
        reach it from ``Chain`` (before their batch is written), so none is missed
        whichever side of the scan's snapshot they land on."""
        claims, cut, count = self.claims, len(T_STATE), 0
        for key, _ in self._kv.scan(T_STATE + P_BLOB):
            claims.add(key[cut:])
            count += 1
            if count % chunk == 0:
                yield count
        claims.ready = True
        yield count

    def scan(
        self,
        prefix: bytes,
        *,
        start: bytes | None = None,
        reverse: bool = False,
        limit: int | None = None,
    ) -> Iterator[tuple[bytes, bytes]]:
        cut = len(T_STATE)
        for key, value in self._kv.scan(
            T_STATE + prefix,
            start=None if start is None else T_STATE + start,
            reverse=reverse,
            limit=limit,
        ):
            yield key[cut:], value


class Chain:
    def __init__(self, kv: KV, genesis: Genesis, blocks_dir: Path | None = None) -> None:
        """``blocks_dir``: where the block files are (``store.blockfiles``); without one,
        as for an in-memory store, a block's bytes are kept in its ``b"B"`` entry."""
        self.kv = kv
        self.genesis = genesis
        self.files = None if blocks_dir is None else BlockFiles(blocks_dir, kv)
        self.state = StateView(kv)
        self._validators: tuple[int, dict[bytes, int]] | None = None
        raw = kv.get(K_HEAD)
        if raw is None:
            self._head = self._init_genesis()
        else:
            head = codec.decode(raw)
            if head["genesis"] != genesis.hash():
                raise ConfigError(
                    "this data directory belongs to another network (genesis hash differs)"
                )
            layout = head.get("layout", 1)
            if layout not in READ_LAYOUTS:
                raise ConfigError(
                    f"this data directory holds state layout {layout}, written by another "
                    f"ehrnode version; this one keeps layout {STATE_LAYOUT}, with other state "
                    "hashes, so it cannot continue that chain: start the network again from "
                    "a new genesis (`scripts/testnet --reset` does) or run the version that "
                    "wrote it"
                )
            self._head = Head(
                head["height"], head["id"], head["time"], int.from_bytes(head["digest"], "big")
            )

    def _init_genesis(self) -> Head:
        changes = state.genesis_changes(self.genesis)
        digest = state.digest_after(self.state, changes, 0)
        head = Head(0, ZERO_HASH, self.genesis.genesis_time, digest)
        batch: dict[bytes, bytes | None] = {T_STATE + k: v for k, v in changes.items()}
        batch[K_HEAD] = self._encode_head(head)
        self.kv.write(batch, sync=True)
        return head

    def _encode_head(self, head: Head) -> bytes:
        return codec.encode(
            {
                "height": head.height,
                "id": head.id,
                "time": head.time,
                "digest": head.digest.to_bytes(256, "big"),
                "genesis": self.genesis.hash(),
                "layout": STATE_LAYOUT,
            }
        )

    def close(self) -> None:
        """Close the block files (their descriptors; every append is durable already)."""
        if self.files is not None:
            self.files.close()

    @property
    def head(self) -> Head:
        return self._head

    def validators(self) -> dict[bytes, int]:
        """The set that votes on the next block (cached until the next commit)."""
        if self._validators is None or self._validators[0] != self._head.height:
            self._validators = (self._head.height, state.validators(self.state))
        return self._validators[1]

    def commit(
        self,
        block: Block,
        certificate: Certificate,
        execution: state.Execution,
        *,
        stored: bool = False,
    ) -> Head:
        """Persist a block and everything it changes in one synced batch; return the new head.
        ``stored``: the block's bytes are at ``pending_block_key`` already."""
        batch, head = self._commit_batch(block, certificate, execution)
        self.write_with_block(batch, None if stored else block)
        self._advance(head)
        return head

    def write_with_block(self, batch: dict[bytes, bytes | None], block: Block | None) -> None:
        """Write ``batch`` (synced) with ``block`` in its height's ``b"B"`` entry: its
        bytes appended to the block files first, or, without them, in the entry."""
        appending = self._place_block(batch, block)
        if appending is None:
            self.kv.write(batch, sync=True)
            return
        with appending as entries:
            batch.update(entries)
            self.kv.write(batch, sync=True)

    def _place_block(
        self, batch: dict[bytes, bytes | None], block: Block | None
    ) -> AbstractContextManager[dict[bytes, bytes]] | None:
        """Without block files, put ``block`` in ``batch``; with them, give the append of
        its bytes, to be entered around the batch's write (None: nothing to append)."""
        if block is None:
            return None
        key = height_key(T_BLOCK, block.header.height)
        if self.files is None:
            batch[key] = block.raw
            return None
        return self.files.appending(key, block.raw)

    async def commit_from_loop(
        self,
        block: Block,
        certificate: Certificate,
        execution: state.Execution,
        *,
        stored: bool = False,
    ) -> Head:
        """``commit`` from the event loop: the batch is built here, written on a worker
        thread (``KV.write_from_loop``), which moves the head right after the write (as
        ``commit`` does), before the loop can read the new state under the old head."""
        batch, head = self._commit_batch(block, certificate, execution)
        await self.kv.write_from_loop(
            batch,
            sync=True,
            around=self._place_block(batch, None if stored else block),
            then=lambda: self._advance(head),
        )
        return head

    def _advance(self, head: Head) -> None:
        self._head = head

    def _commit_batch(
        self, block: Block, certificate: Certificate, execution: state.Execution
    ) -> tuple[dict[bytes, bytes | None], Head]:
        """Everything a commit writes but the block's bytes (``_place_block``)."""
        h = block.header
        assert h.height == self._head.height + 1, "blocks are committed in height order"
        head = Head(h.height, block.id, h.time, execution.digest)
        batch: dict[bytes, bytes | None] = {}
        # The state changes, their blob claims into the filter, the transactions' places.
        commit_entries(
            batch,
            execution.changes,
            T_STATE,
            self.state.claims,
            T_TX,
            h.height,
            block.tx_ids,
            block.tx_spans(),
        )
        batch[height_key(T_CERT, h.height)] = certificate.encode()
        batch[T_BLOCK_ID + block.id] = struct.pack(">Q", h.height)
        batch[K_HEAD] = self._encode_head(head)
        return batch, head

    # --- reads ----------------------------------------------------------------------------

    def block(self, height: int) -> Block:
        return Block.decode(self.block_raw(height), max_bytes=MAX_STORED_BLOCK)

    def block_raw(self, height: int) -> bytes:
        # Above the head the key may hold a block not committed (``pending_block_key``).
        raw = None if height > self._head.height else self.stored_block(height)
        if raw is None:
            raise NotFound(f"no block at height {height} (the head is {self._head.height})")
        return raw

    def stored_block(self, height: int) -> bytes | None:
        """The bytes of the block in ``height``'s ``b"B"`` entry, committed or not."""
        return self._stored_bytes(height)

    def _stored_bytes(self, height: int, part: tuple[int, int] | None = None) -> bytes | None:
        """The bytes of the block in ``height``'s ``b"B"`` entry, or only ``part`` of them
        (offset, size); None when there is no entry."""
        value = self.kv.get(height_key(T_BLOCK, height))
        if value is None:
            return None
        if not is_place(value):  # a chain kept without block files holds the bytes
            return value if part is None else value[part[0] : part[0] + part[1]]
        if self.files is None:
            raise ConfigError(
                f"block {height} is kept in the block files, and this chain was opened "
                "without their directory"
            )
        return self.files.read(value) if part is None else self.files.read_part(value, *part)

    def certificate(self, height: int) -> Certificate:
        raw = self.kv.get(height_key(T_CERT, height))
        if raw is None:
            raise NotFound(f"no certificate for height {height}")
        return Certificate.from_wire(codec.decode(raw))

    def tx_location(self, tx_id: bytes) -> TxLocation | None:
        raw = self.kv.get(T_TX + tx_id)
        if raw is None:
            return None
        height, index, _offset, _size = TX_PLACE.unpack(raw)
        return TxLocation(height, index)

    def tx_raw(self, tx_id: bytes) -> tuple[bytes, TxLocation]:
        """A committed transaction's bytes, read from their place in its block (not the
        whole block), and where it was committed."""
        raw = self.kv.get(T_TX + tx_id)
        if raw is None:
            raise NotFound("no committed transaction with that id")
        height, index, offset, size = TX_PLACE.unpack(raw)
        data = self._stored_bytes(height, (offset, size))
        if data is None:
            raise Unavailable(
                f"block {height} is missing, though the transaction index names it; the "
                "data directory is damaged"
            )
        return data, TxLocation(height, index)

    def tx_body(self, tx_id: bytes) -> dict[str, Any]:
        """A committed transaction's body, as stored (checked when it was committed)."""
        body: dict[str, Any] = codec.decode_trusted(self.tx_raw(tx_id)[0])["body"]
        return body

    def inclusion_proof(self, tx_id: bytes) -> InclusionProof:
        location = self.tx_location(tx_id)
        if location is None:
            raise NotFound("no committed transaction with that id")
        block = self.block(location.height)
        return InclusionProof(
            tx=block.txs[location.index],
            index=location.index,
            total=len(block.txs),
            path=tuple(merkle.proof(block.tx_ids, location.index)),
            header=block.header,
            certificate=self.certificate(location.height),
        )

    def recent_txs(self, kinds: Collection[str], last_blocks: int) -> Iterator[dict[str, Any]]:
        """The transactions of these ``kinds`` in the newest blocks, as stored (for start-up
        checks of what happens after a commit: these bytes were checked when committed)."""
        head = self._head.height
        for height in range(max(1, head - last_blocks + 1), head + 1):
            yield from self.stored_txs(height, kinds)

    def stored_txs(self, height: int, kinds: Collection[str]) -> Iterator[dict[str, Any]]:
        """The transactions of these ``kinds`` in the committed block at ``height``, as
        stored (checked when committed, so parsed without checks)."""
        block = codec.decode_trusted(self.block_raw(height))
        for raw in block["txs"]:
            tx = codec.decode_trusted(raw)
            if tx["kind"] in kinds:
                yield tx

    def validators_at(self, height: int) -> dict[bytes, int]:
        """The validator set that voted on the block at ``height``."""
        start = authority.P_FROM + struct.pack(">Q", height + 1)
        for _key, value in self.state.scan(authority.P_FROM, start=start, reverse=True, limit=1):
            found: dict[bytes, int] = authority.decode_set(codec.decode(value))
            return found
        raise NotFound(f"no validator set is recorded for height {height}")

    def load_state(self, key: bytes) -> Any:
        return state.load(self.state, key)
