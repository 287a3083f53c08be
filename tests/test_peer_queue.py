"""Consensus first on a peer link (``p2p.switch``): bulk frames (relayed transactions,
blobs, synced blocks) wait behind every other frame in the sender's queue, and the link's
kernel buffers are capped so that a backlog stays in that queue."""

from __future__ import annotations

import asyncio
import socket
import sys

import pytest

from ehrnode.p2p.switch import BULK, LINK_BUFFER_BYTES, Peer, _cap_buffers


class SlowLink:
    """A websocket whose sends complete only when the test lets them."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.gate = asyncio.Semaphore(0)

    async def send_bytes(self, frame: bytes) -> None:
        await self.gate.acquire()
        self.sent.append(frame)

    async def close(self) -> None:
        pass


async def _until(condition: object, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0)


async def test_a_vote_overtakes_queued_transactions() -> None:
    link = SlowLink()
    peer = Peer(b"\x01" * 32, "127.0.0.1:1", link, b"\x02" * 32)
    peer.start_writer()
    for n in range(3):
        assert peer.send(b"txs %d" % n, bulk=True)
    await asyncio.sleep(0)  # the writer has taken the first and waits on the link
    assert peer.send(b"vote")
    assert peer.send(b"proposal")
    for _ in range(5):
        link.gate.release()
    await _until(lambda: len(link.sent) == 5)
    assert link.sent == [b"txs 0", b"vote", b"proposal", b"txs 1", b"txs 2"]
    peer.close()


def test_bulk_is_what_carries_transactions_blobs_and_blocks() -> None:
    assert {"txs", "blob_data", "blocks"} <= BULK
    assert not {"proposal", "vote", "evidence", "status", "get_blocks"} & BULK


class _Link:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def get_extra_info(self, name: str) -> socket.socket | None:
        return self.sock if name == "socket" else None


@pytest.mark.skipif(sys.platform != "linux", reason="Linux reports a socket buffer doubled")
def test_a_links_socket_buffers_are_capped_not_left_to_autotuning() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with socket.create_connection(listener.getsockname()) as client:
            _cap_buffers(_Link(client))
            for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                assert client.getsockopt(socket.SOL_SOCKET, option) == 2 * LINK_BUFFER_BYTES
