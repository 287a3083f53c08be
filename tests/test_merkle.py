"""The Merkle tree of a block's transaction ids, checked against RFC 6962 written out here."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings, strategies as st

from ehrnode.core import merkle
from ehrnode.core.crypto import sha256

SETTINGS = settings(max_examples=200, deadline=None)


# --- RFC 6962 §2.1, directly -----------------------------------------------------------------


def _k(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    k = 1
    while k << 1 < n:
        k <<= 1
    return k


def mth(items: Sequence[bytes]) -> bytes:
    """Merkle Tree Hash, RFC 6962 §2.1."""
    n = len(items)
    if n == 0:
        return sha256(b"")
    if n == 1:
        return sha256(b"\x00" + items[0])
    k = _k(n)
    return sha256(b"\x01" + mth(items[:k]) + mth(items[k:]))


def audit_path(m: int, items: Sequence[bytes]) -> list[bytes]:
    """PATH(m, D[n]), RFC 6962 §2.1.1."""
    n = len(items)
    if n == 1:
        return []
    k = _k(n)
    if m < k:
        return [*audit_path(m, items[:k]), mth(items[k:])]
    return [*audit_path(m - k, items[k:]), mth(items[:k])]


def ids(n: int) -> list[bytes]:
    return [sha256(i.to_bytes(4, "big")) for i in range(n)]


# --- roots -----------------------------------------------------------------------------------


def test_empty_tree_and_single_leaf() -> None:
    assert merkle.root([]) == sha256(b"")
    assert merkle.root([b"a"]) == sha256(b"\x00a") == merkle.leaf_hash(b"a")


@pytest.mark.parametrize("n", range(0, 201))
def test_root_matches_rfc6962(n: int) -> None:
    assert merkle.root(ids(n)) == mth(ids(n))


@SETTINGS
@given(st.lists(st.binary(max_size=40), max_size=70))
def test_root_matches_rfc6962_for_any_items(items: list[bytes]) -> None:
    assert merkle.root(items) == mth(items)


@SETTINGS
@given(st.lists(st.binary(min_size=1, max_size=8), min_size=1, max_size=40, unique=True), st.data())
def test_root_depends_on_every_item_and_the_order(items: list[bytes], data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(items) - 1))
    changed = [*items]
    changed[i] = changed[i] + b"!"
    assert merkle.root(changed) != merkle.root(items)
    if len(items) > 1:
        j = data.draw(st.integers(0, len(items) - 1).filter(lambda j: j != i))
        swapped = [*items]
        swapped[i], swapped[j] = swapped[j], swapped[i]
        assert merkle.root(swapped) != merkle.root(items)
    assert merkle.root([*items, items[-1]]) != merkle.root(items)


def test_leaf_cannot_pass_for_an_inner_node() -> None:
    # Without the 0x00/0x01 prefixes, the 64 bytes h0||h1 would be a "leaf" whose hash is
    # the root of [a, b]: a two-leaf tree and a one-leaf tree would share a root.
    a, b = b"a", b"b"
    forged = merkle.leaf_hash(a) + merkle.leaf_hash(b)
    assert merkle.root([forged]) != merkle.root([a, b])
    four = [b"a", b"b", b"c", b"d"]
    inner_right = merkle.leaf_hash(b"c") + merkle.leaf_hash(b"d")
    path = [merkle.root(four[:2])]
    assert not merkle.verify(inner_right, 1, 2, path, merkle.root(four))


# --- proofs ----------------------------------------------------------------------------------


def test_every_proof_verifies_for_every_size_up_to_200() -> None:
    for n in range(1, 201):
        items = ids(n)
        root = merkle.root(items)
        other_root = merkle.root([*items[:-1], b"z"])
        for i in range(n):
            path = merkle.proof(items, i)
            assert merkle.verify(items[i], i, n, path, root), (n, i)
            # ... and proves nothing else about this tree.
            assert not merkle.verify(items[(i + 1) % n] + b"x", i, n, path, root)
            if n > 1:
                assert not merkle.verify(items[i], (i + 1) % n, n, path, root)
                assert not merkle.verify(items[(i + 1) % n], i, n, path, root)
            assert not merkle.verify(items[i], i, n, path, other_root)


@pytest.mark.parametrize("n", range(1, 65))
def test_proof_is_the_rfc6962_audit_path(n: int) -> None:
    items = ids(n)
    for i in range(n):
        assert merkle.proof(items, i) == audit_path(i, items)


@pytest.mark.parametrize("n", range(2, 33))
def test_proof_is_bound_to_its_index(n: int) -> None:
    items = ids(n)
    root = merkle.root(items)
    for i in range(n):
        path = merkle.proof(items, i)
        for j in range(n + 2):
            assert merkle.verify(items[i], j, n, path, root) == (j == i), (n, i, j)


@pytest.mark.parametrize("n", range(1, 65))
def test_proof_with_a_wrong_total(n: int) -> None:
    """RFC 9162's check binds the total only through the shape of the path: a wrong total
    whose path has the same shape still reaches the same root (so ``InclusionProof`` also
    compares the total with the header's ``ntx``). A wrong total with another shape fails."""
    items = ids(n)
    root = merkle.root(items)
    for i in range(n):
        path = merkle.proof(items, i)
        for total in range(1, n + 9):
            if total == n:
                continue
            ok = merkle.verify(items[i], i, total, path, root)
            same_shape = i < total and _path_shape(i, total) == _path_shape(i, n)
            if not same_shape:
                assert not ok, (n, i, total)
            else:
                assert ok, (n, i, total)
        assert not merkle.verify(items[i], i, 0, path, root)


def _path_shape(index: int, total: int) -> list[bool]:
    """Left/right of each sibling, leaf upward: what RFC 9162's loop derives from the total."""
    if total == 1:
        return []
    k = _k(total)
    if index < k:
        return [*_path_shape(index, k), True]
    return [*_path_shape(index - k, total - k), False]


@SETTINGS
@given(st.integers(1, 300), st.data())
def test_altered_path_fails(n: int, data: st.DataObject) -> None:
    items = ids(n)
    root = merkle.root(items)
    i = data.draw(st.integers(0, n - 1))
    path = merkle.proof(items, i)
    assert merkle.verify(items[i], i, n, path, root)
    assert not merkle.verify(items[i], i, n, [*path, path[-1] if path else root], root)
    if path:
        assert not merkle.verify(items[i], i, n, path[:-1], root)
        k = data.draw(st.integers(0, len(path) - 1))
        bad = [*path]
        bad[k] = sha256(bad[k])
        assert not merkle.verify(items[i], i, n, bad, root)
        if len(path) > 1:
            assert not merkle.verify(items[i], i, n, list(reversed(path)), root)


@pytest.mark.parametrize("index", [-1, 3, 4])
def test_proof_index_out_of_range(index: int) -> None:
    with pytest.raises(IndexError):
        merkle.proof(ids(3), index)


def test_out_of_range_index_never_verifies() -> None:
    items = ids(4)
    root = merkle.root(items)
    path = merkle.proof(items, 3)
    assert not merkle.verify(items[3], -1, 4, path, root)
    assert not merkle.verify(items[3], 4, 4, path, root)
    assert not merkle.verify(items[0], 0, 0, [], merkle.root([]))
