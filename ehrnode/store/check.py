"""``ehrnode check``: is a stopped node's database consistent? For operators after a crash,
and for the crash tests.

Checks that the head's block is stored, that every block links to the one before it and
carries the certificate of that one, that each stored certificate verifies, and that a full
scan of the state entries hashes to the head's state digest, the index entries (outside the
state hash, ``core.layout``) being exactly those the other entries imply. The two sets of
index entries are compared by their multiset digests, so the check holds a batch of at
most 10,000 entries in memory, whatever the state's size.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ehrnode.core import state
from ehrnode.core.block import ZERO_HASH
from ehrnode.core.errors import EhrError
from ehrnode.store.chain import Chain


@dataclass
class Report:
    height: int = 0
    blocks_checked: int = 0
    state_entries_hash_ok: bool = False
    index_entries_ok: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.state_entries_hash_ok and self.index_entries_ok


def check_chain(chain: Chain, *, last_blocks: int | None = None) -> Report:
    head = chain.head
    report = Report(height=head.height)
    chain_id = chain.genesis.chain_id
    first = 1 if last_blocks is None else max(1, head.height - last_blocks + 1)
    previous_id = ZERO_HASH
    if first > 1:
        previous_id = chain.block(first - 1).id
    for height in range(first, head.height + 1):
        try:
            block = chain.block(height)
            if block.header.prev != previous_id:
                report.problems.append(f"block {height} does not link to block {height - 1}")
            powers = chain.validators_at(height)
            chain.certificate(height).verify(chain_id, powers)
            if chain.certificate(height).block != block.id:
                report.problems.append(f"certificate {height} is for another block")
            if block.last_commit is not None:
                block.last_commit.verify(chain_id, chain.validators_at(height - 1))
        except EhrError as err:
            report.problems.append(f"block {height}: {err}")
            break
        previous_id = block.id
        report.blocks_checked += 1
    if head.height and previous_id != head.id:
        report.problems.append("the head does not name the last stored block")
    hashed, stored_index, implied_index, damaged, examples = _scan_state(chain)
    if damaged:
        report.problems.append(
            f"{damaged} record or grant entries cannot be read, e.g. state key {examples[0].hex()}"
        )
    report.state_entries_hash_ok = hashed == head.digest
    if not report.state_entries_hash_ok:
        report.problems.append("the state entries do not hash to the head's state hash")
    report.index_entries_ok = stored_index == implied_index
    if not report.index_entries_ok:
        report.problems.append(
            "the index entries (record lists, versions, blob claims, grant lists) differ from "
            "those the records and grants imply"
        )
    return report


def _scan_state(chain: Chain) -> tuple[int, int, int, int, list[bytes]]:
    """One scan of the state: the digest of the hashed entries, of the index entries stored
    and of the index entries the hashed ones imply; how many entries are too damaged to
    imply anything, and the keys of the first 10."""
    damaged = 0
    examples: list[bytes] = []
    hashed: list[tuple[bytes, bytes]] = []
    stored: list[tuple[bytes, bytes]] = []
    implied: list[tuple[bytes, bytes]] = []
    digests = [0, 0, 0]
    for key, value in chain.state.scan(b""):
        if state.in_state_hash(key):
            hashed.append((key, value))
            try:
                implied.extend(state.implied_index(key, value))
            except (ValueError, TypeError, KeyError, IndexError, OverflowError, struct.error):
                damaged += 1
                if len(examples) < 10:
                    examples.append(key)
        else:
            stored.append((key, value))
        if len(hashed) + len(stored) + len(implied) >= 10_000:  # fold into the digests
            for i, part in enumerate((hashed, stored, implied)):
                digests[i] = state.digest_moved(digests[i], part, [])
                part.clear()
    for i, part in enumerate((hashed, stored, implied)):
        digests[i] = state.digest_moved(digests[i], part, [])
    return digests[0], digests[1], digests[2], damaged, examples
