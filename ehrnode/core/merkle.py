"""Merkle tree of a block's transaction ids, as in RFC 6962 (Certificate Transparency) §2.1.

- leaf hash  = sha256(0x00 || tx id)
- inner hash = sha256(0x01 || left || right)
- the tree over n leaves splits at k, the largest power of two below n
- the root of no leaves is sha256("")

The 0x00/0x01 prefixes keep a leaf from passing for an inner node. An inclusion proof is
the audit path of RFC 6962 §2.1.1, checked by the algorithm of RFC 9162 §2.1.3.2. Pure.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

# hashlib's own constructor, called from this compiled module without a Python frame in
# between (``crypto.sha256`` is interpreted): two hashes a transaction at every node.
_sha256 = hashlib.sha256


def sha256(data: bytes) -> bytes:
    return _sha256(data).digest()


def digests(items: Sequence[bytes]) -> list[bytes]:
    """The SHA-256 of each item: a block's transaction ids."""
    return [_sha256(item).digest() for item in items]


def leaf_hash(item: bytes) -> bytes:
    return _sha256(b"\x00" + item).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return _sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def root(items: Sequence[bytes]) -> bytes:
    if not items:
        return sha256(b"")
    level = [leaf_hash(item) for item in items]
    return _root_of_hashes(level)


def _root_of_hashes(hashes: Sequence[bytes]) -> bytes:
    # Iterative form of RFC 6962's recursion: pair off left to right; an odd last node is
    # promoted unchanged. For n leaves this gives the same tree as splitting at the largest
    # power of two below n.
    level = list(hashes)
    while len(level) > 1:
        paired = [_node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def proof(items: Sequence[bytes], index: int) -> list[bytes]:
    """The audit path of ``items[index]``: sibling hashes from the leaf up."""
    if not 0 <= index < len(items):
        raise IndexError("leaf index out of range")
    return _path(index, [leaf_hash(item) for item in items])


def _path(index: int, hashes: list[bytes]) -> list[bytes]:
    n = len(hashes)
    if n <= 1:
        return []
    k = _split(n)
    if index < k:
        return [*_path(index, hashes[:k]), _root_of_hashes(hashes[k:])]
    return [*_path(index - k, hashes[k:]), _root_of_hashes(hashes[:k])]


def verify(
    item: bytes, index: int, total: int, path: Sequence[bytes], expected_root: bytes
) -> bool:
    """True when ``path`` proves ``item`` is leaf ``index`` of ``total`` under the root."""
    if not 0 <= index < total:
        return False
    fn, sn = index, total - 1
    h = leaf_hash(item)
    for sibling in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            h = _node(sibling, h)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            h = _node(h, sibling)
        fn >>= 1
        sn >>= 1
    return sn == 0 and h == expected_root
