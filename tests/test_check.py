"""``ehrnode check`` on a node's real database: the state hash, and the index entries
outside it, derived again from the records and grants they index."""

from __future__ import annotations

from typing import Any

from ehrnode.client import Client
from ehrnode.core import state
from ehrnode.core.crypto import Identity
from ehrnode.node import Node
from ehrnode.store.chain import T_STATE
from ehrnode.store.check import check_chain


def observation(text: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final", "code": {"text": text}}


async def write_some(node: Node) -> str:
    """Records (one amended, three in a records transaction) and a standing grant; the
    first record's id."""
    async with Client(node.rpc_url, node.identity) as validator:
        doctor = validator.as_identity(Identity.generate())
        patient = validator.as_identity(Identity.generate())
        await patient.register("patient")
        endorsement = validator.endorse(doctor.public_key, "provider")
        await doctor.register("provider", "Dr Who", endorsement)
        first = await doctor.put(patient.public_id, observation("Heart rate"))
        await doctor.put(patient.public_id, observation("Heart rate, again"), amends=first.id)
        await doctor.put_many(patient.public_id, [observation(f"Weight {i}") for i in range(3)])
        await patient.grant(doctor.public_id, standing=True)
    return first.id


async def test_check_finds_an_index_entry_changed_removed_or_added(node: Node) -> None:
    await write_some(node)
    report = check_chain(node.chain)
    assert report.ok, report.problems
    kv = node.chain.kv
    index = [(k, v) for k, v in node.chain.state.scan(b"") if not state.in_state_hash(k)]
    assert {k[:3] for k, _ in index} == {b"pre", b"ver", b"pgr", b"blo"}
    some_key, some_value = index[len(index) // 2]

    tamperings: list[dict[bytes, bytes | None]] = [
        {T_STATE + some_key: some_value + b"\x00"},  # changed
        {T_STATE + some_key: None},  # removed
        {T_STATE + state.P_BLOB + bytes(32): some_value},  # added
    ]
    for tampering in tamperings:
        kv.write(tampering, sync=True)
        report = check_chain(node.chain)
        assert report.state_entries_hash_ok  # the index is outside the state hash...
        assert not report.index_entries_ok and not report.ok  # ...and still checked
        assert any("index entries" in problem for problem in report.problems)
        kv.write({T_STATE + some_key: some_value, T_STATE + state.P_BLOB + bytes(32): None})
        assert check_chain(node.chain).ok


async def test_check_reports_a_damaged_record_entry_instead_of_failing(node: Node) -> None:
    key = T_STATE + state.P_REC + bytes.fromhex(await write_some(node))
    # Not msgpack; not a map; a first version without its patient; a version 0, whose
    # place among its root's versions would be -1.
    for damage in (
        b"\xc1 not msgpack",
        b"\x93\x01\x02\x03",
        b"\x81\xa3ver\x01",
        b"\x81\xa3ver\x00",
    ):
        node.chain.kv.write({key: damage}, sync=True)
        report = check_chain(node.chain)
        assert not report.ok and not report.state_entries_hash_ok
        assert any("cannot be read" in problem for problem in report.problems), report.problems
