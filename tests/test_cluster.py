"""Four validators in one process over real loopback sockets: a record written anywhere is
final and readable everywhere, replicas reach every validator, bad peers are refused,
and a validator restarted mid-round never signs two different votes."""

from __future__ import annotations

import logging
import secrets
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ehrnode import config as cfg
from ehrnode.client.errors import NotAuthorised
from ehrnode.client.sdk import Client
from ehrnode.client.verification import next_set
from ehrnode.core import authority, crypto
from ehrnode.core.block import PREVOTE, Vote, sign_vote
from ehrnode.core.errors import InvalidBlock
from ehrnode.node import Node
from ehrnode.p2p import messages, sync
from ehrnode.testing import cluster, free_port, validator_identity, wait_for

OBSERVATION = {
    "resourceType": "Observation",
    "status": "final",
    "code": {"text": "Heart rate"},
    "valueQuantity": {"value": 72, "unit": "beats/minute"},
}


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[list[Node]]:
    async with cluster(tmp_path, n=4) as running:
        yield running


async def actors(nodes: list[Node]) -> dict[str, Any]:
    """A provider endorsed by validator 0's institution, a patient and a second doctor."""
    institution = validator_identity(nodes[0].config.home)
    provider, patient, doctor = (crypto.Identity.generate() for _ in range(3))
    async with Client(nodes[0].rpc_url, institution) as c:
        endorsement = c.endorse(provider.public_key, "provider")
        endorsement2 = c.endorse(doctor.public_key, "provider")
        await c.as_identity(provider).register("provider", "Dr A", endorsement)
        await c.as_identity(doctor).register("provider", "Dr B", endorsement2)
        await c.as_identity(patient).register("patient")
    return {"provider": provider, "patient": patient, "doctor": doctor}


async def test_written_on_one_node_read_through_another(nodes: list[Node]) -> None:
    people = await actors(nodes)
    async with Client(nodes[0].rpc_url, people["provider"]) as writer:
        written = await writer.put(people["patient"].public_key, OBSERVATION)
    assert written.status == "committed"
    record = bytes.fromhex(written.id)

    # Final everywhere: every node has the same block at that height.
    height = written.height
    assert height is not None
    await wait_for(lambda: all(n.chain.head.height >= height for n in nodes), 10, "all heads")
    assert len({n.chain.block(height).id for n in nodes}) == 1

    # Every validator pulls a replica.
    blob = nodes[0].chain.load_state(b"rec" + record)["blob"]
    await wait_for(lambda: all(n.blobs.has(blob) for n in nodes), 10, "replicas on all nodes")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{nodes[2].rpc_url}/v1/blobs/{blob.hex()}/replicas") as response:
            replicas = await response.json()
    assert replicas["durable"] and len(replicas["holders"]) == 4

    # The grantee reads and decrypts through node 4; before the grant it cannot.
    async with Client(nodes[3].rpc_url, people["doctor"]) as doctor:
        with pytest.raises(NotAuthorised):
            await doctor.read(record)
        async with Client(nodes[3].rpc_url, people["patient"]) as patient:
            await patient.grant(people["doctor"].public_key, [record])
        assert await doctor.read(record) == OBSERVATION


async def test_a_peer_with_another_chain_or_a_bad_signature_is_refused(
    nodes: list[Node], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    target = nodes[0]
    assert target.switch is not None
    url = f"http://{target.switch.listen_address}/p2p"
    stranger = crypto.Identity.generate()

    def hello(**changes: Any) -> bytes:
        fields: dict[str, Any] = {
            "chain": target.genesis.chain_id,
            "genesis": target.genesis.hash(),
            "node": stranger.public_key,
            "nonce": secrets.token_bytes(32),
            "height": 0,
            "version": messages.PROTOCOL_VERSION,
            "listen": "127.0.0.1:9",
        }
        fields.update(changes)
        return messages.encode("hello", **fields)

    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url) as ws:
            await ws.receive()  # the node's hello
            await ws.send_bytes(hello(chain="another-chain"))
            assert (await ws.receive()).type == aiohttp.WSMsgType.CLOSE
        async with http.ws_connect(url) as ws:
            await ws.receive()
            await ws.send_bytes(hello())
            await ws.receive()  # the node's auth
            await ws.send_bytes(messages.encode("auth", sig=bytes(64)))
            assert (await ws.receive()).type == aiohttp.WSMsgType.CLOSE

        async def authenticated_link() -> aiohttp.ClientWebSocketResponse:
            ws = await http.ws_connect(url)
            their_hello = messages.decode((await ws.receive()).data, 1 << 20)[1]
            await ws.send_bytes(hello())
            await ws.receive()
            sig = stranger.sign(
                b"",
                messages.auth_bytes(
                    target.genesis.chain_id,
                    target.genesis.hash(),
                    stranger.public_key,
                    target.identity.public_key,
                    their_hello["nonce"],
                ),
            )
            await ws.send_bytes(messages.encode("auth", sig=sig))
            return ws

        async def until_closed(ws: aiohttp.ClientWebSocketResponse) -> None:
            while (await ws.receive()).type not in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSED,
            ):
                pass
            await ws.close()

        # A key that proves itself but is neither a validator nor a configured peer.
        await until_closed(await authenticated_link())
        assert stranger.public_key not in target.switch.peers
        # An operator-configured full node that then sends garbage is dropped.
        target.switch.configured_keys.add(stranger.public_key)
        ws = await authenticated_link()
        await wait_for(lambda: stranger.public_key in target.switch.peers, 5, "admission")
        await ws.send_bytes(b"\xc1 not msgpack")
        await until_closed(ws)
    text = caplog.text
    assert "peer is on chain 'another-chain'" in text
    assert "failed to prove its key (bad handshake signature)" in text
    assert "neither a validator nor a configured peer" in text
    assert "malformed frame" in text
    assert stranger.public_key not in target.switch.peers

    # And the network goes on committing.
    async with Client(target.rpc_url, crypto.Identity.generate()) as c:
        assert (await c.register("patient")).status == "committed"


async def test_a_validator_restarted_mid_round_never_double_signs(nodes: list[Node]) -> None:
    victim = nodes[0]
    home = victim.config.home
    key = victim.identity.public_key
    seen: dict[tuple[int, int, int], set[bytes | None]] = {}

    def spy(node: Node) -> None:
        assert node.switch is not None
        original = node.switch.handlers["vote"]

        def capture(peer: Any, fields: dict[str, Any]) -> Any:
            vote = Vote.from_wire(fields["vote"])
            if vote.validator == key:
                seen.setdefault((vote.height, vote.round, vote.type), set()).add(vote.block)
            return original(peer, fields)

        node.switch.handlers["vote"] = capture

    for node in nodes[1:]:
        spy(node)

    # Freeze the victim right after it prevotes at a new height: from then on it hears no
    # consensus message, so it sits mid-round (prevoted, not precommitted) until stopped.
    start = victim.chain.head.height
    frozen = False
    frozen_at = -1
    assert victim.switch is not None
    broadcast = victim.driver.network.broadcast_vote
    deliver = dict(victim.switch.handlers)

    def watch(vote: Vote) -> None:
        nonlocal frozen
        broadcast(vote)
        nonlocal frozen_at
        if vote.height > start and vote.type == PREVOTE and not frozen:
            frozen = True
            frozen_at = victim.chain.head.height
            engine = victim.driver.engine  # also drop what is already queued for it
            engine.on_vote = lambda vote: []  # type: ignore[method-assign]
            engine.on_proposal = lambda proposal: []  # type: ignore[method-assign]

    def gate(kind: str) -> Any:
        return lambda peer, fields: None if frozen else deliver[kind](peer, fields)

    victim.driver.network.broadcast_vote = watch  # type: ignore[method-assign]
    for kind in ("vote", "proposal", "status", "blocks"):
        victim.switch.handlers[kind] = gate(kind)

    async with Client(nodes[1].rpc_url, crypto.Identity.generate()) as c:
        await c.register("patient")
        await wait_for(lambda: frozen, 10, "the victim to prevote")
        last = victim.driver.signing.last
        assert last is not None
        assert (last["step"], last["height"]) == (PREVOTE, frozen_at + 1)
        await victim.stop()
        restarted = Node(cfg.load(home))
        nodes[0] = restarted  # so the fixture stops it
        await restarted.start()
        for _ in range(3):
            async with Client(nodes[3].rpc_url, crypto.Identity.generate()) as more:
                await more.register("patient")
        final = nodes[3].chain.head.height
        await wait_for(lambda: restarted.chain.head.height >= final, 15, "the restarted node")
    assert restarted.chain.block(final).id == nodes[3].chain.block(final).id
    double = {slot: blocks for slot, blocks in seen.items() if len(blocks) > 1}
    assert not double, f"validator signed conflicting votes: {double}"
    assert all(not n.driver.evidence for n in nodes)
    assert any(h > start for h, _, _ in seen), "the spy saw none of the victim's votes"


async def test_validators_vote_a_new_validator_in_and_it_carries_the_quorum(
    nodes: list[Node], tmp_path: Path
) -> None:
    genesis = nodes[0].genesis
    home = tmp_path / "newcomer"
    peers = tuple(
        f"{n.identity.public_id}@{n.switch.listen_address}" for n in nodes if n.switch is not None
    )
    cfg.init_home(
        home,
        genesis=genesis,
        rpc=f"127.0.0.1:{free_port()}",
        p2p=f"127.0.0.1:{free_port()}",
        peers=peers,
        moniker="newcomer",
    )
    newcomer = Node(cfg.load(home))
    await newcomer.start()
    try:
        key = newcomer.identity.public_key
        change = {"action": "add", "key": key, "power": 1}
        for node in nodes[:3]:
            async with Client(node.rpc_url, node.identity) as validator:
                await validator.submit("validator", change)
        async with aiohttp.ClientSession() as http:

            async def in_the_set() -> bool:
                async with http.get(f"{nodes[0].rpc_url}/v1/validators") as response:
                    listed = (await response.json())["validators"]
                return key.hex() in {v["key"] for v in listed}

            await wait_for(in_the_set, 15, "the new validator to enter the set")
        # With five validators a quorum is four: stop one of the founders, and blocks can
        # only be final if the newcomer signs.
        await nodes[3].stop()
        async with Client(nodes[1].rpc_url, crypto.Identity.generate()) as c:
            done = await c.register("patient")
        assert done.status == "committed" and done.height is not None
        final = done.height
        await wait_for(lambda: nodes[0].chain.head.height >= final, 10, "node 0 to commit it")
        cert = nodes[0].chain.certificate(final)
        assert key in {signer for signer, _ in cert.sigs}
        # A verifier that trusts only genesis follows the change to the new set.
        async with Client(nodes[1].rpc_url, crypto.Identity.generate()) as auditor:
            assert await auditor.verify(done.id) == final
        # ... and refuses a set the chain did not name (a node lying about a change).
        changes = [h for h, _ in nodes[0].chain.state.scan(authority.P_FROM)]
        changed_at = struct.unpack(">Q", changes[-1][len(authority.P_FROM) :])[0]
        before = nodes[0].chain.block(changed_at - 1)
        with pytest.raises(InvalidBlock):
            next_set(
                genesis.chain_id,
                genesis.powers,
                before.raw,
                nodes[0].chain.certificate(changed_at - 1).encode(),
                {crypto.Identity.generate().public_key: 1},
            )
        await wait_for(lambda: newcomer.chain.head.height >= final, 10, "newcomer head")
    finally:
        await newcomer.stop()


async def test_a_double_vote_ends_up_on_chain_as_evidence(nodes: list[Node]) -> None:
    cheat = nodes[3].identity
    chain_id = nodes[0].genesis.chain_id
    first = sign_vote(cheat, chain_id, PREVOTE, 1, 0, b"\x01" * 32)
    second = sign_vote(cheat, chain_id, PREVOTE, 1, 0, b"\x02" * 32)
    assert nodes[0].switch is not None
    peer = next(iter(nodes[0].switch.peers.values()))
    # A double vote by a key that is no validator is no evidence of anything: it is sent
    # first, and when the real one is on chain the outsider's is not.
    outsider = crypto.Identity.generate()
    fake_a = sign_vote(outsider, chain_id, PREVOTE, 1, 0, b"\x01" * 32)
    fake_b = sign_vote(outsider, chain_id, PREVOTE, 1, 0, b"\x02" * 32)
    nodes[0].switch.handlers["evidence"](peer, {"a": fake_a.to_wire(), "b": fake_b.to_wire()})
    nodes[0].switch.handlers["evidence"](peer, {"a": first.to_wire(), "b": second.to_wire()})
    async with aiohttp.ClientSession() as http:

        async def recorded() -> list[Any]:
            async with http.get(f"{nodes[2].rpc_url}/v1/evidence") as response:
                found: list[Any] = (await response.json())["evidence"]
                return found

        await wait_for(recorded, 15, "the evidence to be committed")
        (entry,) = await recorded()
    assert entry["validator"] == cheat.public_id
    assert (entry["height"], entry["round"], entry["type"]) == (1, 0, PREVOTE)
    assert entry["reporter"] == nodes[0].identity.public_id
    assert [v for v, _ in nodes[0].driver.evidence] == [first]


async def test_an_attachment_flows_to_every_replica_and_a_failed_upload_leaves_nothing(
    nodes: list[Node], tmp_path: Path
) -> None:
    people = await actors(nodes)
    scan = tmp_path / "scan.bin"
    scan.write_bytes(secrets.token_bytes(3 * 1024 * 1024 + 17))
    async with Client(nodes[0].rpc_url, people["provider"]) as writer:
        written = await writer.put_attachment(
            people["patient"].public_key, scan, "application/octet-stream"
        )
    blob = nodes[0].chain.load_state(b"rec" + bytes.fromhex(written.id))["blob"]
    await wait_for(lambda: all(n.blobs.has(blob) for n in nodes), 15, "replicas everywhere")
    # Replicas travel before the commit; node 4 serves the record once it has the block.
    height = written.height
    assert height is not None
    await wait_for(lambda: nodes[3].chain.head.height >= height, 10, "node 4 to commit it")
    async with Client(nodes[3].rpc_url, people["patient"]) as patient:
        back = tmp_path / "back.bin"
        await patient.read(written.id, out=back)
    assert back.read_bytes() == scan.read_bytes()

    # An upload cut off half-way: neither the receiving node nor the relay chain keeps it.
    async def cut_off() -> AsyncIterator[bytes]:
        yield secrets.token_bytes(1024 * 1024)
        yield secrets.token_bytes(1024 * 1024)
        raise ConnectionError("client gave up")

    held = [set(n.blobs.kv.scan(b"O")) for n in nodes]
    async with Client(nodes[0].rpc_url, people["provider"]) as writer:
        with pytest.raises(Exception):  # noqa: B017 - the client's own error, whatever it is
            await writer.transport.stream_blob(people["provider"], cut_off())

    def relays_idle() -> bool:
        return all(
            n.replication.relay is not None and n.replication.relay._idle.is_set() for n in nodes
        )

    await wait_for(relays_idle, 15, "the relays to end")
    assert [set(n.blobs.kv.scan(b"O")) for n in nodes] == held
    assert all(not any((n.config.blobs_dir / "tmp").iterdir()) for n in nodes)


async def test_a_validator_far_behind_asks_for_the_next_blocks_while_it_applies_a_batch(
    nodes: list[Node], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Block sync in batches (of 1, then 2, up to 4 here): the request for the blocks after
    a batch goes out before that batch is applied, and the node ends on the network's
    chain, saying how long the catch-up took."""
    monkeypatch.setattr(sync, "FIRST_BATCH", 1)
    monkeypatch.setattr(sync, "BATCH", 4)
    monkeypatch.setattr(sync, "LOG_BLOCKS", 4)
    caplog.set_level(logging.INFO, logger="ehrnode.p2p.sync")
    seen: list[tuple[sync.BlockSync, str, int, int]] = []  # every node's; a live one
    ask, apply = sync.BlockSync._ask, sync.BlockSync._apply  # may sync a block it missed

    def spy_ask(self: sync.BlockSync, first: int, count: int) -> Any:
        seen.append((self, "ask", first, count))
        return ask(self, first, count)

    async def spy_apply(self: sync.BlockSync, items: list[Any], following: Any = None) -> None:
        seen.append((self, "apply", self.chain.head.height + 1, len(items)))
        await apply(self, items, following)

    victim = nodes[0]
    home = victim.config.home
    await victim.stop()
    for _ in range(12):
        async with Client(nodes[1].rpc_url, crypto.Identity.generate()) as c:
            await c.register("patient")
    final = nodes[1].chain.head.height
    monkeypatch.setattr(sync.BlockSync, "_ask", spy_ask)
    monkeypatch.setattr(sync.BlockSync, "_apply", spy_apply)
    restarted = Node(cfg.load(home))
    nodes[0] = restarted  # so the fixture stops it
    await restarted.start()
    await wait_for(lambda: restarted.chain.head.height >= final, 20, "the restarted node")

    assert restarted.chain.block(final).id == nodes[1].chain.block(final).id

    def said_how_long() -> bool:  # "block sync applied N blocks (to height H) in S s"
        for said in (r.getMessage().split() for r in caplog.records):
            if said[:3] == ["block", "sync", "applied"] and int(said[3]) >= 4:
                return int(said[7].rstrip(")")) >= final and said[-1] == "s"
        return False

    await wait_for(said_how_long, 20, "the catch-up's log line")
    events = [event for who, *event in seen if who is restarted.sync]
    applies = [i for i, event in enumerate(events) if event[0] == "apply"]
    assert len(applies) >= 4, events
    assert [events[i][2] for i in applies[:3]] == [1, 2, 4], events  # each batch twice the last
    for i in applies[:-1]:
        _, first, count = events[i]
        assert events[i - 1][:2] == ["ask", first + count], events
