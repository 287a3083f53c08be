"""Peer frames: what a node takes from a peer's websocket and what disconnects the peer.

A frame is an envelope, neither signed nor hashed: its keys may come in any order and its
numbers in any msgpack form. What is signed or hashed inside it (blocks, transactions,
votes) is checked in its canonical form on its own."""

from __future__ import annotations

import msgpack
import pytest

from ehrnode.core.errors import PeerError
from ehrnode.p2p import messages

TXS = [b"\x01" * 40, b"\x02" * 60]


def test_a_frame_in_canonical_form_round_trips() -> None:
    assert messages.decode(messages.encode("txs", txs=TXS), 1 << 20) == ("txs", {"txs": TXS})


def test_a_frame_need_not_be_canonical() -> None:
    unsorted = msgpack.packb({"txs": TXS, "t": "txs"}, use_bin_type=True)
    assert unsorted != messages.encode("txs", txs=TXS)
    assert messages.decode(unsorted, 1 << 20) == ("txs", {"txs": TXS})
    wide_int = b"\x83\xa1t\xaaget_blocks\xa4from\xcd\x00\x05\xa5count\xcc\x02"
    assert messages.decode(wide_int, 1 << 20) == ("get_blocks", {"from": 5, "count": 2})


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (messages.encode("txs", txs=TXS) + b"\x00", "malformed frame"),
        (b"\xc1 not msgpack", "malformed frame"),
        (msgpack.packb({"t": "txs", "txs": [1.5]}), "malformed frame"),
        (msgpack.packb({"t": "txs", "txs": TXS, "extra": 1}, use_bin_type=True), "exactly"),
        (msgpack.packb({"t": "nothing"}), "unknown message type"),
        (messages.encode("txs", txs=TXS), "exceeds the limit"),
    ],
    ids=["trailing bytes", "garbage", "a float", "an extra field", "unknown type", "too big"],
)
def test_what_disconnects_the_peer(frame: bytes, reason: str) -> None:
    limit = 64 if reason == "exceeds the limit" else 1 << 20
    with pytest.raises(PeerError, match=reason):
        messages.decode(frame, limit)
