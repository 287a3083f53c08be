"""Four validators as separate ``ehrnode run`` processes, the way an operator runs them:
SIGKILL one and the rest go on; restarted, it catches up to the same head and pulls the
ciphertext written while it was down. Freeze two of four and nothing commits and nothing
forks; thaw them and the network goes on."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ehrnode.client.sdk import Client
from ehrnode.core import crypto
from ehrnode.testing import (
    ProcessNode,
    cluster_homes,
    start_process_node,
    validator_identity,
    wait_for,
)

pytestmark = pytest.mark.slow

NOTE = {"resourceType": "Observation", "status": "final", "code": {"text": "Temperature"}}


@pytest.fixture
def network(tmp_path: Path) -> Iterator[list[ProcessNode]]:
    homes = cluster_homes(tmp_path, 4, chain_id="process-net")
    running: list[ProcessNode] = []
    try:
        for home in homes:
            running.append(start_process_node(home))
        yield running
    finally:
        for node in running:
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGCONT)
                node.terminate()


async def status(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/v1/status") as response:
        body: dict[str, Any] = await response.json()
        return body


async def connected(nodes: list[ProcessNode]) -> None:
    async def all_linked() -> bool:
        counts = [len((await status(n.rpc_url))["peers"]) for n in nodes]
        return all(count == len(nodes) - 1 for count in counts)

    await wait_for(all_linked, 30, "the validators to connect")


async def setup_people(url: str, institution: crypto.Identity) -> dict[str, crypto.Identity]:
    provider, patient, doctor = (crypto.Identity.generate() for _ in range(3))
    async with Client(url, institution) as c:
        await c.as_identity(provider).register(
            "provider", "Dr A", c.endorse(provider.public_key, "provider")
        )
        await c.as_identity(doctor).register(
            "provider", "Dr B", c.endorse(doctor.public_key, "provider")
        )
        await c.as_identity(patient).register("patient")
    return {"provider": provider, "patient": patient, "doctor": doctor}


async def test_kill_one_validator_and_it_catches_up(network: list[ProcessNode]) -> None:
    first, second, _, fourth = network
    await connected(network)
    people = await setup_people(first.rpc_url, validator_identity(first.home))
    patient = people["patient"].public_key

    async with Client(first.rpc_url, people["provider"]) as writer:
        before = await writer.put(patient, NOTE)
    assert before.height is not None
    written_at = before.height

    # A standing grant wraps the key of every record the patient's node lists: node 4 lists
    # them, so it must have committed the note's block (each node learns at its own pace).
    async def fourth_has_it() -> bool:
        return int((await status(fourth.rpc_url))["height"]) >= written_at

    await wait_for(fourth_has_it, 10, "node 4 to commit the note")
    async with Client(fourth.rpc_url, people["patient"]) as owner:
        await owner.grant(people["doctor"].public_key, standing=True)
    async with Client(fourth.rpc_url, people["doctor"]) as doctor:
        assert await doctor.read(before.id) == NOTE

    second.kill()
    written = []
    async with Client(first.rpc_url, people["provider"]) as writer:
        for k in range(5):
            written.append(await writer.put(patient, {**NOTE, "id": f"while-down-{k}"}))
        # and a bundle's worth in one records transaction
        batch = [{**NOTE, "id": f"batch-{k}"} for k in range(3)]
        batched = await writer.put_many(patient, batch)
    assert all(w.status == "committed" for w in written)

    restarted = start_process_node(second.home)
    network[1] = restarted
    target = (await status(first.rpc_url))["height"]

    async def caught_up() -> bool:
        return int((await status(restarted.rpc_url))["height"]) >= target

    await wait_for(caught_up, 30, "the restarted validator to catch up")
    async with aiohttp.ClientSession() as http:
        urls = [n.rpc_url for n in network]
        heads = set()
        for url in urls:
            async with http.get(f"{url}/v1/blocks/{target}") as response:
                heads.add((await response.json())["id"])
        assert len(heads) == 1

        async def has_payloads() -> bool:
            for record_id in [w.id for w in written] + batched:
                async with http.get(f"{restarted.rpc_url}/v1/records/{record_id}") as response:
                    blob = (await response.json())["blob"]
                async with http.head(f"{restarted.rpc_url}/v1/blobs/{blob}") as response:
                    if response.status != 200:
                        return False
            return True

        await wait_for(has_payloads, 30, "the restarted node to pull the missed ciphertext")
    # The grantee reads what was written while the node was down, through that node.
    async with Client(restarted.rpc_url, people["doctor"]) as doctor:
        assert await doctor.read(written[-1].id) == {**NOTE, "id": "while-down-4"}
        assert [await doctor.read(record_id) for record_id in batched] == batch


async def test_two_of_four_frozen_nothing_commits_then_it_goes_on(
    network: list[ProcessNode],
) -> None:
    await connected(network)
    first = network[0]
    async with Client(first.rpc_url, crypto.Identity.generate()) as c:
        await c.register("patient")
    height = (await status(first.rpc_url))["height"]

    frozen = network[2:]
    for node in frozen:
        node.process.send_signal(signal.SIGSTOP)
    try:
        async with Client(first.rpc_url, crypto.Identity.generate()) as c:
            pending = await c.register("patient", wait=False)
        assert pending.status == "pending"

        async def stuck_after_prevoting() -> bool:
            # Both live validators have prevoted at the next height; without a third vote
            # there is no quorum of prevotes, so neither can precommit, let alone commit.
            for node in network[:2]:
                c = (await status(node.rpc_url))["consensus"]
                if (c["height"], c["step"]) != (height + 1, "prevote"):
                    return False
            return True

        await wait_for(stuck_after_prevoting, 30, "the live validators to prevote")
        for node in network[:2]:
            s = await status(node.rpc_url)
            assert s["height"] == height, "a block was committed without a quorum"
    finally:
        for node in frozen:
            node.process.send_signal(signal.SIGCONT)

    async def committed() -> bool:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{first.rpc_url}/v1/txs/{pending.id}") as response:
                return bool((await response.json()).get("status") == "committed")

    await wait_for(committed, 60, "the network to commit after the thaw")
    heights = [int((await status(n.rpc_url))["height"]) for n in network]
    common = min(heights)
    async with aiohttp.ClientSession() as http:
        ids = set()
        for node in network:
            async with http.get(f"{node.rpc_url}/v1/blocks/{common}") as response:
                ids.add((await response.json())["id"])
    assert len(ids) == 1, "the validators disagree on a block: a fork"
