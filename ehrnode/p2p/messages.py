"""Peer messages: one msgpack map per binary websocket frame, ``{"t": type, ...}``. Sent
canonical, taken in any byte form (``codec.parse``): a frame is neither signed nor hashed,
and what is (blocks, transactions, votes) is checked on its own.

    type        fields                                  meaning
    hello       chain, genesis bin32, node bin32,       first frame each way
                nonce bin32, height, version,
                listen (our p2p host:port)
    auth        sig bin64                               signature of the other side's nonce
    status      height, head bin32                      our head (on connect, after commits)
    txs         txs [tx bytes...]                       transactions for the mempool
    proposal    proposal (core.block.Proposal wire)     consensus
    vote        vote (core.block.Vote wire)             consensus
    evidence    a, b (two Vote wires)                   a validator signed two votes
    get_blocks  from, count                             block sync request (count <= 256)
    blocks      items [[block bytes, certificate bytes]...]  block sync answer
    blob_have   hashes [bin32...]                       "I hold these blobs"
    blob_want   hashes [bin32...]                       "do you hold these?"
    blob_data   blobs [bin...]                          small blobs pushed to replicas
                                                        (each at most 64 KiB)

The auth signature is ed25519 over ``DOMAIN_PEER || encode({"chain", "genesis", "from",
"to", "nonce"})`` where ``nonce`` is the one the *other* side sent in its hello. Pure: no
I/O; ``decode`` names what is wrong with a frame.
"""

from __future__ import annotations

from typing import Any

from ehrnode.core import codec, crypto
from ehrnode.core.errors import InvalidEncoding, PeerError

# 2: the state hash leaves the index entries out (state layout 3). 3: a patient's account
# keeps its latest record write, and a standing grant may name its listing's height (state
# layout 4). Nodes that hash the state differently would split at the first record: the
# handshake refuses the peer.
PROTOCOL_VERSION = 3
MAX_SYNC_BLOCKS = 256
MAX_HASHES = 4096
MAX_TXS = 20_000
MAX_PUSHED_BLOB = 64 * 1024

_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "hello": {
        "chain": str,
        "genesis": bytes,
        "node": bytes,
        "nonce": bytes,
        "height": int,
        "version": int,
        "listen": str,
    },
    "auth": {"sig": bytes},
    "status": {"height": int, "head": bytes},
    "txs": {"txs": list},
    "proposal": {"proposal": dict},
    "vote": {"vote": dict},
    "evidence": {"a": dict, "b": dict},
    "get_blocks": {"from": int, "count": int},
    "blocks": {"items": list},
    "blob_have": {"hashes": list},
    "blob_want": {"hashes": list},
    "blob_data": {"blobs": list},
}


def encode(kind: str, **fields: Any) -> bytes:
    return codec.encode({"t": kind, **fields})


def decode(frame: bytes, max_bytes: int) -> tuple[str, dict[str, Any]]:
    """Parse one frame; PeerError naming the problem for anything unexpected."""
    try:
        obj = codec.parse(frame, max_bytes=max_bytes)
    except InvalidEncoding as err:
        raise PeerError(f"malformed frame: {err}") from err
    if not isinstance(obj, dict) or not isinstance(obj.get("t"), str):
        raise PeerError("a frame must be a map with a string 't'")
    kind = obj.pop("t")
    spec = _FIELDS.get(kind)
    if spec is None:
        raise PeerError(f"unknown message type '{kind}'")
    if set(obj) != set(spec):
        raise PeerError(f"'{kind}' must have exactly the fields {', '.join(sorted(spec))}")
    for name, expected in spec.items():
        value = obj[name]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise PeerError(f"'{kind}'.{name} has the wrong type")
        if isinstance(value, int) and value < 0:
            raise PeerError(f"'{kind}'.{name} must not be negative")
    _check_lists(kind, obj)
    return kind, obj


def _check_lists(kind: str, obj: dict[str, Any]) -> None:
    if kind == "hello":
        if len(obj["genesis"]) != 32 or len(obj["node"]) != 32 or len(obj["nonce"]) != 32:
            raise PeerError("hello genesis, node and nonce must be 32 bytes")
    elif kind == "auth":
        if len(obj["sig"]) != 64:
            raise PeerError("auth sig must be 64 bytes")
    elif kind == "status":
        if len(obj["head"]) != 32:
            raise PeerError("status head must be 32 bytes")
    elif kind == "txs":
        if len(obj["txs"]) > MAX_TXS or not all(isinstance(t, bytes) for t in obj["txs"]):
            raise PeerError(f"txs must be a list of at most {MAX_TXS} byte strings")
    elif kind == "get_blocks":
        if not 1 <= obj["count"] <= MAX_SYNC_BLOCKS or obj["from"] < 1:
            raise PeerError(f"get_blocks asks for 1 to {MAX_SYNC_BLOCKS} blocks from height 1 up")
    elif kind == "blocks":
        items = obj["items"]
        if len(items) > MAX_SYNC_BLOCKS or not all(
            isinstance(i, list) and len(i) == 2 and all(isinstance(x, bytes) for x in i)
            for i in items
        ):
            raise PeerError("blocks items must be [block bytes, certificate bytes] pairs")
    elif kind == "blob_data":
        blobs = obj["blobs"]
        if len(blobs) > MAX_HASHES or not all(
            isinstance(b, bytes) and len(b) <= MAX_PUSHED_BLOB for b in blobs
        ):
            raise PeerError(
                f"blob_data holds at most {MAX_HASHES} blobs of {MAX_PUSHED_BLOB} bytes"
            )
    elif kind in ("blob_have", "blob_want"):
        hashes = obj["hashes"]
        if len(hashes) > MAX_HASHES or not all(
            isinstance(h, bytes) and len(h) == 32 for h in hashes
        ):
            raise PeerError(f"{kind} hashes must be at most {MAX_HASHES} 32-byte hashes")


def auth_bytes(chain: str, genesis: bytes, sender: bytes, receiver: bytes, nonce: bytes) -> bytes:
    return crypto.DOMAIN_PEER + codec.encode(
        {"chain": chain, "genesis": genesis, "from": sender, "to": receiver, "nonce": nonce}
    )
