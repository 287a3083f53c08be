"""Signatures with domain separation, key wrapping to a reader, and sealing payloads."""

from __future__ import annotations

import hashlib
import itertools
import pickle

import ed25519_zebra
import nacl.bindings
import nacl.exceptions
import pytest
from helpers_core import identity
from hypothesis import given, settings, strategies as st

from ehrnode.core import crypto
from ehrnode.core.errors import InvalidEncoding, NotAuthorised

SETTINGS = settings(max_examples=100, deadline=None)

DOMAINS = [
    crypto.DOMAIN_TX,
    crypto.DOMAIN_VOTE,
    crypto.DOMAIN_PROPOSAL,
    crypto.DOMAIN_ENDORSE,
    crypto.DOMAIN_REQUEST,
    crypto.DOMAIN_ACCESS,
    crypto.DOMAIN_PEER,
]

ALICE = identity(1)
BOB = identity(2)
MALLORY = identity(3)


def test_sha256_is_sha256() -> None:
    assert crypto.sha256(b"abc").hex() == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


# --- identities ----------------------------------------------------------------------------


def test_identity_is_determined_by_its_seed() -> None:
    again = crypto.Identity(ALICE.seed)
    assert again.public_key == ALICE.public_key
    assert len(ALICE.public_key) == crypto.PUBLIC_KEY_BYTES
    assert ALICE.public_id == ALICE.public_key.hex()
    assert len(ALICE.public_id) == 64
    assert ALICE.public_key != BOB.public_key


def test_an_identity_derives_its_key_pair_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deriving the key pair is a scalar multiplication, as costly as a signature: a client
    signing thousands of transactions, or a node its votes, must not pay it at each."""
    made = []
    real = crypto.nacl.signing.SigningKey

    def counting(seed: bytes) -> object:
        made.append(seed)
        return real(seed)

    monkeypatch.setattr(crypto.nacl.signing, "SigningKey", counting)
    me = crypto.Identity(bytes(range(32)))
    for _ in range(3):
        assert crypto.verify(me.public_key, b"", b"m", me.sign(b"", b"m"))
    assert len(made) == 1


def test_generated_identities_differ() -> None:
    assert crypto.Identity.generate().public_key != crypto.Identity.generate().public_key


@pytest.mark.parametrize("seed", [b"", bytes(31), bytes(33)])
def test_identity_seed_must_be_32_bytes(seed: bytes) -> None:
    with pytest.raises(InvalidEncoding):
        crypto.Identity(seed)


def test_repr_does_not_show_the_secret() -> None:
    text = repr(ALICE) + str(ALICE)
    assert ALICE.seed.hex() not in text
    assert ALICE.seed.hex()[:16] not in text
    assert ALICE.public_id[:16] in text


def test_hex_round_trip_and_errors_name_the_field() -> None:
    assert crypto.from_hex(ALICE.public_id) == ALICE.public_key
    assert crypto.from_hex(crypto.to_hex(b"\x01\x02"), size=2) == b"\x01\x02"
    with pytest.raises(InvalidEncoding, match="grantee"):
        crypto.from_hex("ab" * 31, what="grantee")
    with pytest.raises(InvalidEncoding, match="public id"):
        crypto.from_hex("zz" * 32)


# --- signatures ----------------------------------------------------------------------------


def test_domains_are_distinct_nul_terminated_tags() -> None:
    # No tag is a prefix of another, so domain || message is never ambiguous.
    assert len(set(DOMAINS)) == len(DOMAINS)
    for domain in DOMAINS:
        assert domain.endswith(b"\x00")
        assert domain.count(b"\x00") == 1
        assert domain.isascii()
    for a, b in itertools.permutations(DOMAINS, 2):
        assert not b.startswith(a)


@SETTINGS
@given(st.binary(max_size=200))
def test_signature_verifies_under_its_own_domain_only(message: bytes) -> None:
    for signed_for in DOMAINS:
        sig = ALICE.sign(signed_for, message)
        assert len(sig) == crypto.SIGNATURE_BYTES
        for checked_as in DOMAINS:
            ok = crypto.verify(ALICE.public_key, checked_as, message, sig)
            assert ok == (checked_as == signed_for)


def test_signature_fails_for_another_key_message_or_signature() -> None:
    sig = ALICE.sign(crypto.DOMAIN_VOTE, b"hello")
    assert crypto.verify(ALICE.public_key, crypto.DOMAIN_VOTE, b"hello", sig)
    assert not crypto.verify(BOB.public_key, crypto.DOMAIN_VOTE, b"hello", sig)
    assert not crypto.verify(ALICE.public_key, crypto.DOMAIN_VOTE, b"hellO", sig)
    for i in (0, 31, 32, 63):
        bad = bytearray(sig)
        bad[i] ^= 1
        assert not crypto.verify(ALICE.public_key, crypto.DOMAIN_VOTE, b"hello", bytes(bad))


@pytest.mark.parametrize(
    ("key", "sig"),
    [
        (bytes(31), bytes(64)),
        (bytes(33), bytes(64)),
        (bytes(32), bytes(63)),
        (bytes(32), bytes(65)),
        (b"", b""),
        (b"\xff" * 32, bytes(64)),
    ],
)
def test_verify_returns_false_for_malformed_keys_and_signatures(key: bytes, sig: bytes) -> None:
    assert crypto.verify(key, crypto.DOMAIN_TX, b"m", sig) is False


# The group order: S + L is the same scalar in a form libsodium must refuse.
ORDER = 2**252 + 27742317777372353535851937790883648493
SMALL_ORDER_KEYS = [
    bytes([1]) + bytes(31),  # the identity point
    bytes([0xEC]) + b"\xff" * 30 + bytes([0x7F]),  # -1: order 2
    bytes(32),  # order 4
]


def public_binding_verify(key: bytes, message: bytes, sig: bytes) -> bool:
    try:
        nacl.bindings.crypto_sign_open(sig + message, key)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
        return False
    return True


def _non_canonical(sig: bytes) -> bytes:
    s = int.from_bytes(sig[32:], "little") + ORDER
    return sig[:32] + s.to_bytes(32, "little")


@SETTINGS
@given(st.binary(max_size=300), st.integers(0, 63), st.integers(0, 7))
def test_verify_answers_as_libsodium_on_every_signature_a_signer_or_a_forger_makes(
    message: bytes, at: int, bit: int
) -> None:
    """``verify`` (ZIP 215, by ed25519-zebra) accepts what libsodium accepts, so a chain
    written before still verifies, and refuses what a forger without the key can make: another
    key or message, any flipped bit, S + L, a key or an R of small order."""
    sig = ALICE.sign(b"", message)
    flipped = bytearray(sig)
    flipped[at] ^= 1 << bit
    cases = [
        (ALICE.public_key, message, sig),
        (ALICE.public_key, message + b"x", sig),
        (BOB.public_key, message, sig),
        (ALICE.public_key, message, bytes(flipped)),
        (ALICE.public_key, message, _non_canonical(sig)),
        *((key, message, sig) for key in SMALL_ORDER_KEYS),
        *((ALICE.public_key, message, key + sig[32:]) for key in SMALL_ORDER_KEYS),
    ]
    answers = [crypto.verify(key, b"", msg, s) for key, msg, s in cases]
    assert answers == [public_binding_verify(key, msg, s) for key, msg, s in cases]
    assert answers[0] is True
    assert not any(answers[1:])


def test_verify_takes_any_bytes_like_arguments() -> None:
    sig = ALICE.sign(crypto.DOMAIN_TX, b"m")
    assert crypto.verify(bytearray(ALICE.public_key), crypto.DOMAIN_TX, memoryview(b"m"), sig)
    assert crypto.verify(ALICE.public_key, crypto.DOMAIN_TX, bytearray(b"m"), bytearray(sig))


# Signatures made by hand, from libsodium's scalar and point operations, to reach the edge
# cases no honest signer produces (RFC 8032: S = r + H(R || A || M) a mod L).
ORDER_2_POINT = SMALL_ORDER_KEYS[1]


def _scalar(data: bytes) -> bytes:
    return nacl.bindings.crypto_core_ed25519_scalar_reduce(hashlib.sha512(data).digest())


def _point(scalar: bytes) -> bytes:
    return nacl.bindings.crypto_scalarmult_ed25519_base_noclamp(scalar)


def _sign_by_hand(a: bytes, key: bytes, message: bytes, r: bytes, nonce_point: bytes) -> bytes:
    h = _scalar(nonce_point + key + message)
    s = nacl.bindings.crypto_core_ed25519_scalar_add(
        r, nacl.bindings.crypto_core_ed25519_scalar_mul(h, a)
    )
    return nonce_point + s


def test_a_key_of_small_order_signs_nothing() -> None:
    """Under ZIP 215 alone anyone could sign for a key of small order (R the identity, S
    zero, any message): the key check refuses such keys before any signature is looked at."""
    forged = bytes([1]) + bytes(31) + bytes(32)
    for key in SMALL_ORDER_KEYS:
        for message in (b"grant everything", b"erase everything"):
            assert ed25519_zebra.ed_verify(forged, message, key) is True  # the forgery's case
            assert crypto.verify(key, b"", message, forged) is False


def test_a_key_with_a_small_order_part_is_refused() -> None:
    a, r = _scalar(b"a"), _scalar(b"r")
    key, nonce_point = _point(a), _point(r)
    assert crypto.verify(key, b"", b"m", _sign_by_hand(a, key, b"m", r, nonce_point))
    mixed = nacl.bindings.crypto_core_ed25519_add(key, ORDER_2_POINT)
    sig = _sign_by_hand(a, mixed, b"m", r, nonce_point)
    assert ed25519_zebra.ed_verify(sig, b"m", mixed) is True
    assert crypto.verify(mixed, b"", b"m", sig) is False


def test_the_rule_is_zip_215_where_it_and_libsodium_differ() -> None:
    """Every node must answer alike, so the rule is pinned: an R with a small-order part is
    valid (ZIP 215's cofactored check), where libsodium would refuse it. Only the key's
    holder can make one."""
    a, r = _scalar(b"a"), _scalar(b"r")
    key = _point(a)
    nonce_point = nacl.bindings.crypto_core_ed25519_add(_point(r), ORDER_2_POINT)
    sig = _sign_by_hand(a, key, b"m", r, nonce_point)
    assert not public_binding_verify(key, b"m", sig)
    assert crypto.verify(key, b"", b"m", sig) is True
    assert crypto.verify(key, b"", b"n", sig) is False


# --- key wrapping --------------------------------------------------------------------------


def test_wrapped_key_opens_for_the_recipient_only() -> None:
    data_key = crypto.new_data_key()
    assert len(data_key) == crypto.DATA_KEY_BYTES
    wrapped = crypto.wrap_key(data_key, BOB.public_key)
    assert len(wrapped) == crypto.WRAPPED_KEY_BYTES
    assert BOB.unwrap_key(wrapped) == data_key
    with pytest.raises(NotAuthorised):
        MALLORY.unwrap_key(wrapped)
    with pytest.raises(NotAuthorised):
        ALICE.unwrap_key(wrapped)  # the writer cannot reopen it either: the box is anonymous


def test_wrapping_is_randomised() -> None:
    data_key = crypto.new_data_key()
    first = crypto.wrap_key(data_key, BOB.public_key)
    second = crypto.wrap_key(data_key, BOB.public_key)
    assert first != second
    assert BOB.unwrap_key(first) == BOB.unwrap_key(second) == data_key


@pytest.mark.parametrize("position", [0, 31, 32, 79])
def test_tampered_wrapped_key_does_not_open(position: int) -> None:
    wrapped = bytearray(crypto.wrap_key(crypto.new_data_key(), BOB.public_key))
    wrapped[position] ^= 0x40
    with pytest.raises(NotAuthorised):
        BOB.unwrap_key(bytes(wrapped))


@pytest.mark.parametrize(
    "wrapped",
    [b"", b"x", bytes(47), bytes(crypto.WRAPPED_KEY_BYTES), bytes(crypto.BATCH_WRAPPED_KEY_BYTES)],
)
def test_garbage_wrapped_key_is_not_authorised(wrapped: bytes) -> None:
    with pytest.raises(NotAuthorised):
        BOB.unwrap_key(wrapped)


@pytest.mark.parametrize("recipient", [b"", bytes(31), bytes(32), b"\xff" * 32])
def test_wrapping_to_an_invalid_public_key_is_an_encoding_error(recipient: bytes) -> None:
    with pytest.raises(InvalidEncoding):
        crypto.wrap_key(crypto.new_data_key(), recipient)
    with pytest.raises(InvalidEncoding):
        crypto.KeyWrapper().wrap(crypto.new_data_key(), recipient)


def test_a_batch_wrapper_opens_for_each_recipient_only_with_a_fresh_nonce_each_time() -> None:
    wrapper = crypto.KeyWrapper()
    keys = [crypto.new_data_key() for _ in range(3)]
    to_bob = [wrapper.wrap(key, BOB.public_key) for key in keys]
    to_alice = [wrapper.wrap(key, ALICE.public_key) for key in keys]
    for key, bob, alice in zip(keys, to_bob, to_alice, strict=True):
        assert len(bob) == len(alice) == crypto.BATCH_WRAPPED_KEY_BYTES
        assert BOB.unwrap_key(bob) == ALICE.unwrap_key(alice) == key
        for wrong, wrapped in ((ALICE, bob), (BOB, alice), (MALLORY, bob)):
            with pytest.raises(NotAuthorised):
                wrong.unwrap_key(wrapped)
    # One ephemeral key for the batch (the first 32 bytes), a new nonce for every wrap.
    assert len({w[:32] for w in to_bob + to_alice}) == 1
    assert len({w[32:56] for w in to_bob + to_alice}) == 6
    again = wrapper.wrap(keys[0], BOB.public_key)
    assert again != to_bob[0] and BOB.unwrap_key(again) == keys[0]
    # Another batch, another ephemeral key.
    assert crypto.KeyWrapper().wrap(keys[0], BOB.public_key)[:32] != to_bob[0][:32]


@pytest.mark.parametrize("position", [0, 31, 32, 55, 56, 103])
def test_tampered_batch_wrapped_key_does_not_open(position: int) -> None:
    wrapped = bytearray(crypto.KeyWrapper().wrap(crypto.new_data_key(), BOB.public_key))
    wrapped[position] ^= 0x40
    with pytest.raises(NotAuthorised):
        BOB.unwrap_key(bytes(wrapped))


# --- sealing payloads ----------------------------------------------------------------------


@SETTINGS
@given(st.binary(max_size=2000))
def test_seal_round_trip(plaintext: bytes) -> None:
    data_key = crypto.new_data_key()
    sealed = crypto.seal(data_key, plaintext)
    assert crypto.open_sealed(data_key, sealed) == plaintext


def test_seal_uses_a_fresh_nonce() -> None:
    data_key = crypto.new_data_key()
    assert crypto.seal(data_key, b"same") != crypto.seal(data_key, b"same")


def test_sealed_payload_does_not_open_with_another_key_or_after_tampering() -> None:
    data_key = crypto.new_data_key()
    sealed = crypto.seal(data_key, b'{"resourceType": "Observation"}')
    with pytest.raises(NotAuthorised):
        crypto.open_sealed(crypto.new_data_key(), sealed)
    for i in (0, 23, 24, len(sealed) - 1):
        bad = bytearray(sealed)
        bad[i] ^= 1
        with pytest.raises(NotAuthorised):
            crypto.open_sealed(data_key, bytes(bad))
    with pytest.raises(NotAuthorised):
        crypto.open_sealed(data_key, sealed[:10])


def test_full_envelope_reader_gets_plaintext_stranger_does_not() -> None:
    plaintext = b'{"resourceType": "Condition"}'
    data_key = crypto.new_data_key()
    sealed = crypto.seal(data_key, plaintext)
    wrapped = {r.public_key: crypto.wrap_key(data_key, r.public_key) for r in (ALICE, BOB)}
    for reader in (ALICE, BOB):
        key = reader.unwrap_key(wrapped[reader.public_key])
        assert crypto.open_sealed(key, sealed) == plaintext
    for key in wrapped.values():
        with pytest.raises(NotAuthorised):
            MALLORY.unwrap_key(key)


def test_an_identity_pickles_as_its_seed_alone() -> None:
    """Identities travel to worker processes; the derived key pair stays behind."""
    me = crypto.Identity.generate()
    signature = me.sign(b"", b"message")  # derives and keeps the key pair
    copy = pickle.loads(pickle.dumps(me))
    assert copy == me
    assert copy.public_key == me.public_key
    assert copy.sign(b"", b"message") == signature
    assert len(pickle.dumps(me)) < 128  # seed only, no cached key objects


def test_wrapping_to_the_same_recipient_twice_gives_different_wraps() -> None:
    """The converted recipient key is reused; each wrap still has a fresh ephemeral key."""
    reader = crypto.Identity.generate()
    key = crypto.new_data_key()
    first = crypto.wrap_key(key, reader.public_key)
    second = crypto.wrap_key(key, reader.public_key)
    assert first != second
    assert reader.unwrap_key(first) == reader.unwrap_key(second) == key
    for _ in range(2):  # a refused key is refused every time, not cached as accepted
        with pytest.raises(InvalidEncoding):
            crypto.wrap_key(key, b"\x00" * 31)
