"""Links that end: a dialer the other end refuses (not a validator there yet) redials after
a backoff, not at once, and links as soon as it is let in; a block request to a peer whose
link closed is given up at once and asked of a peer still linked; a block sync answer is
cut at its size limit."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

from ehrnode.config import P2pConfig
from ehrnode.core import crypto
from ehrnode.core.genesis import Genesis, ValidatorInfo
from ehrnode.p2p import sync
from ehrnode.p2p.switch import RELINK_MAX, Peer, Switch
from ehrnode.testing import free_port, wait_for


async def test_a_refused_dialer_backs_off_and_links_once_let_in() -> None:
    me, them = crypto.Identity.generate(), crypto.Identity.generate()
    genesis = Genesis("ehr-links", 1764000000000, (ValidatorInfo(them.public_key, 1, "v0"),))
    listen = f"127.0.0.1:{free_port()}"
    target = Switch(them, genesis, P2pConfig(listen=listen))
    dialer = Switch(
        me,
        genesis,
        P2pConfig(listen=f"127.0.0.1:{free_port()}", peers=(f"{them.public_id}@{listen}",)),
    )
    asked: list[float] = []  # when the target checked the dialer's key
    let_in = False

    def allowed(key: bytes) -> bool:
        asked.append(time.monotonic())
        return let_in

    target.allowed = allowed
    await target.start()
    await dialer.start()
    try:
        await wait_for(lambda: len(asked) >= 4, 15, "four refused links")
        assert me.public_key not in target.peers
        # Backoffs of 0.2, 0.4 and 0.8 s, each jittered down to no less than half: a redial
        # at once would have made these four in milliseconds.
        assert asked[3] - asked[0] >= 0.69, asked
        let_in = True
        await wait_for(lambda: me.public_key in target.peers, RELINK_MAX + 5, "the link")
        assert them.public_key in dialer.peers
    finally:
        await dialer.stop()
        await target.stop()


class _Link:
    async def send_bytes(self, frame: bytes) -> None:
        pass

    async def close(self) -> None:
        pass


class _Switch:
    """What block sync uses of a switch: its peers, handlers, callbacks and sends."""

    def __init__(self, peers: list[Peer]) -> None:
        self.peers = {peer.key: peer for peer in peers}
        self.handlers: dict[str, Any] = {}
        self.on_connect: list[Any] = []
        self.on_disconnect: list[Any] = []
        self.asked: list[tuple[Peer, dict[str, Any]]] = []

    def send(self, peer: Peer, kind: str, **fields: Any) -> None:
        if kind == "get_blocks":
            self.asked.append((peer, fields))

    def close_link(self, peer: Peer) -> None:  # what Switch._run_link does as a link ends
        peer.closed = True
        del self.peers[peer.key]
        for callback in self.on_disconnect:
            callback(peer)


async def test_a_block_request_to_a_closed_link_is_asked_again_of_another_peer() -> None:
    peers = [Peer(bytes([n]) * 32, "127.0.0.1:1", _Link(), b"\x00" * 32) for n in (1, 2)]
    switch = _Switch(peers)
    head = SimpleNamespace(height=5, id=b"\x00" * 32)
    chain = SimpleNamespace(head=head)
    driver = SimpleNamespace(listeners=[])
    blocks = sync.BlockSync(switch, chain, driver, 1 << 20)  # type: ignore[arg-type]
    for peer in peers:
        switch.handlers["status"](peer, {"height": 9})
    await wait_for(lambda: len(switch.asked) == 1, 5, "a block request")
    first, fields = switch.asked[0]
    assert fields["from"] == 6
    switch.close_link(first)
    # Well inside sync.RESPONSE_TIMEOUT, which is what a closed link used to cost.
    await wait_for(lambda: len(switch.asked) == 2, sync.RESPONSE_TIMEOUT / 3, "a second request")
    second, fields = switch.asked[1]
    assert second is not first and fields["from"] == 6
    await blocks.stop()


async def test_block_sync_applies_an_answer_only_once_its_preparation_is_done() -> None:
    """The node has its claim filter filled there (``Node._claims_filled``): the request
    is out first, so the answer travels meanwhile."""
    peer = Peer(b"\x01" * 32, "127.0.0.1:1", _Link(), b"\x00" * 32)
    switch = _Switch([peer])
    chain = SimpleNamespace(head=SimpleNamespace(height=5, id=b"\x00" * 32))
    ready = asyncio.Event()
    prepared: list[int] = []

    async def prepare() -> None:
        prepared.append(len(switch.asked))
        await ready.wait()

    blocks = sync.BlockSync(
        switch,  # type: ignore[arg-type]
        chain,  # type: ignore[arg-type]
        SimpleNamespace(listeners=[]),  # type: ignore[arg-type]
        1 << 20,
        prepare=prepare,
    )
    applied: list[list[Any]] = []

    async def apply(items: list[Any], following: Any = None) -> None:
        applied.append(items)
        chain.head.height += len(items)

    blocks._apply = apply  # type: ignore[method-assign]
    switch.handlers["status"](peer, {"height": 6})
    await wait_for(lambda: prepared == [1], 5, "the preparation, after the request")
    switch.handlers["blocks"](peer, {"items": [["block 6", "cert 6"]]})
    for _ in range(20):
        await asyncio.sleep(0)
    assert applied == []
    ready.set()
    await wait_for(lambda: applied == [[["block 6", "cert 6"]]], 5, "the answer applied")
    await blocks.stop()


class _Answers(_Switch):
    def __init__(self) -> None:
        super().__init__([])
        self.answers: list[list[Any]] = []

    def send(self, peer: Peer, kind: str, **fields: Any) -> None:
        if kind == "blocks":
            self.answers.append(fields["items"])


def test_a_block_sync_answer_stops_at_its_size_limit() -> None:
    """8 MiB (``sync.ANSWER_BYTES``), or a peer frame's limit less 1 MiB where that is
    smaller; the server always sends the first block, whatever its size, so that a block
    larger than the cut still syncs (one to an answer)."""
    peer = Peer(b"\x01" * 32, "127.0.0.1:1", _Link(), b"\x00" * 32)
    # block size, max_message_bytes, blocks sent
    cases = [(3 << 20, 32 << 20, 2), (3 << 20, 4 << 20, 1), (3 << 20, 1 << 20, 1)]
    cases.append((9 << 20, 32 << 20, 1))  # larger than the cut, well inside the frame
    for size, frame_limit, expected in cases:
        chain = SimpleNamespace(
            head=SimpleNamespace(height=10, id=b"\x00" * 32),
            block_raw=lambda height, size=size: bytes([height]) * size,
            certificate=lambda height: SimpleNamespace(encode=lambda: b"cert %d" % height),
        )
        switch = _Answers()
        sync.BlockSync(switch, chain, SimpleNamespace(listeners=[]), frame_limit)  # type: ignore[arg-type]
        switch.handlers["get_blocks"](peer, {"from": 3, "count": 8})
        (items,) = switch.answers
        assert [raw[0] for raw, _ in items] == list(range(3, 3 + expected)), frame_limit
        assert all(cert == b"cert %d" % raw[0] for raw, cert in items)
