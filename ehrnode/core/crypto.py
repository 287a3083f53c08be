"""Identities, signatures, hashing and envelope encryption, through libsodium (PyNaCl) and,
for checking signatures, ed25519-zebra.

- An identity is an ed25519 key pair. Its public id is the 32-byte verify key, written as
  64 lowercase hex characters wherever text is needed.
- Encryption keys are X25519, derived from the ed25519 keys (libsodium's
  ``crypto_sign_ed25519_*_to_curve25519``), so one key file serves both.
- Every signature is over ``domain || message``; each domain is a fixed ASCII tag ending in
  a NUL byte, so a signature made for one purpose never verifies for another.
- Which signatures are valid is a consensus rule, so it is a written one: ZIP 215 (Zcash's
  precise ed25519 validity criteria, which every RFC 8032 signer's signatures meet), as
  ed25519-zebra implements it, and a signer key must be a canonical point of prime order
  (libsodium's ``crypto_core_ed25519_is_valid_point``), so no key of small order, for
  which anyone could sign, ever signs anything. libsodium promises no stable criteria (its
  own changed in 1.0.16); ed25519-zebra is also 30% faster here (47 against 67 us).
- Hashes are SHA-256.
- A record's data key is a random 32-byte SecretBox key (XSalsa20-Poly1305); it is wrapped
  for each reader with a SealedBox to the reader's X25519 key (80 bytes), or, when many
  keys are wrapped at once, with a crypto_box from one ephemeral key pair made for that
  batch (104 bytes: ephemeral public key, nonce, box), which spares the two X25519
  operations a SealedBox pays per wrap.

Nothing here is hand-rolled: we only compose libsodium's and ed25519-zebra's primitives.
Pure: no I/O.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import ed25519_zebra
import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.secret
import nacl.signing
import nacl.utils

from ehrnode.core.errors import InvalidEncoding, NotAuthorised

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
HASH_BYTES = 32
DATA_KEY_BYTES: int = nacl.secret.SecretBox.KEY_SIZE
# A SealedBox adds an ephemeral public key and a MAC to the 32-byte data key.
WRAPPED_KEY_BYTES: int = DATA_KEY_BYTES + nacl.bindings.crypto_box_SEALBYTES
# A batch wrap (KeyWrapper): the same ephemeral key, MAC and data key, plus the nonce.
BATCH_WRAPPED_KEY_BYTES: int = WRAPPED_KEY_BYTES + nacl.public.Box.NONCE_SIZE
WRAPPED_KEY_SIZES: tuple[int, int] = (WRAPPED_KEY_BYTES, BATCH_WRAPPED_KEY_BYTES)

DOMAIN_TX = b"ehrnode/tx/v1\x00"
DOMAIN_VOTE = b"ehrnode/vote/v1\x00"
DOMAIN_PROPOSAL = b"ehrnode/proposal/v1\x00"
DOMAIN_ENDORSE = b"ehrnode/endorse/v1\x00"
DOMAIN_REQUEST = b"ehrnode/request/v1\x00"
DOMAIN_ACCESS = b"ehrnode/access/v1\x00"
DOMAIN_PEER = b"ehrnode/peer/v1\x00"
DOMAIN_RECORD = b"ehrnode/record/v1\x00"


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def to_hex(key: bytes) -> str:
    return key.hex()


def from_hex(text: str, size: int = PUBLIC_KEY_BYTES, what: str = "public id") -> bytes:
    """Parse ``size`` bytes written as hex, with an error that names ``what``."""
    try:
        raw = bytes.fromhex(text)
    except (ValueError, TypeError) as err:
        raise InvalidEncoding(f"{what} must be {size * 2} hex characters") from err
    if len(raw) != size:
        raise InvalidEncoding(f"{what} must be {size * 2} hex characters, got {len(text)}")
    return raw


# Signer keys checked, and how they came out: a network's signers are far fewer than its
# signatures, and the check (a scalar multiplication) costs as much as a signature's.
KEY_CHECKS_KEPT = 16384
_ed_verify: Callable[[bytes, bytes, bytes], bool] = ed25519_zebra.ed_verify


@functools.lru_cache(maxsize=KEY_CHECKS_KEPT)
def _signer_key_is_valid(public_key: bytes) -> bool:
    return bool(nacl.bindings.crypto_core_ed25519_is_valid_point(public_key))


def verify(public_key: bytes, domain: bytes, message: bytes, signature: bytes) -> bool:
    """True when ``signature`` is ``public_key``'s ed25519 signature of domain||message:
    valid under ZIP 215, by a canonical key of prime order (see the module's docstring)."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    if type(public_key) is not bytes or type(signature) is not bytes:
        public_key, signature = bytes(public_key), bytes(signature)
    return _signer_key_is_valid(public_key) and _ed_verify(signature, domain + message, public_key)


@dataclass(frozen=True)
class Identity:
    """An ed25519 signing key and what derives from it. Holds the secret: never log it."""

    seed: bytes

    def __post_init__(self) -> None:
        if len(self.seed) != 32:
            raise InvalidEncoding("an identity seed is 32 bytes")

    @classmethod
    def generate(cls) -> Identity:
        return cls(nacl.utils.random(32))

    # Derived once per identity (deriving the key pair from the seed is a scalar
    # multiplication, as costly as a signature); kept out of pickles and comparisons.
    @functools.cached_property
    def _signing_key(self) -> nacl.signing.SigningKey:
        return nacl.signing.SigningKey(self.seed)

    @functools.cached_property
    def public_key(self) -> bytes:
        return bytes(self._signing_key.verify_key)

    def __getstate__(self) -> dict[str, bytes]:
        return {"seed": self.seed}

    def __setstate__(self, state: dict[str, bytes]) -> None:
        object.__setattr__(self, "seed", state["seed"])

    @property
    def public_id(self) -> str:
        return self.public_key.hex()

    def sign(self, domain: bytes, message: bytes) -> bytes:
        signed = self._signing_key.sign(domain + message)
        return bytes(signed.signature)

    def unwrap_key(self, wrapped: bytes) -> bytes:
        """Open a data key wrapped for this identity (either form); NotAuthorised if it was
        not."""
        private = self._signing_key.to_curve25519_private_key()
        try:
            if len(wrapped) == BATCH_WRAPPED_KEY_BYTES:
                sender = nacl.public.PublicKey(wrapped[:PUBLIC_KEY_BYTES])
                box = nacl.public.Box(private, sender)
                return bytes(box.decrypt(wrapped[PUBLIC_KEY_BYTES:]))
            return bytes(nacl.public.SealedBox(private).decrypt(wrapped))
        except (nacl.exceptions.CryptoError, ValueError, TypeError) as err:
            raise NotAuthorised("this key cannot open the wrapped data key") from err

    def __repr__(self) -> str:
        return f"Identity({self.public_id[:16]}…)"


def wrap_key(data_key: bytes, recipient_public_key: bytes) -> bytes:
    """Seal ``data_key`` to the X25519 key derived from an ed25519 public key."""
    return bytes(_sealed_box_to(recipient_public_key).encrypt(data_key))


@functools.lru_cache(maxsize=4096)
def _sealed_box_to(recipient_public_key: bytes) -> nacl.public.SealedBox[nacl.public.PublicKey]:
    return nacl.public.SealedBox(_x25519_of(recipient_public_key))


@functools.lru_cache(maxsize=4096)
def _x25519_of(recipient_public_key: bytes) -> nacl.public.PublicKey:
    """An ed25519 key's X25519 twin (the conversion, a field inversion and a point check,
    is done once per recipient rather than once per wrap)."""
    try:
        return nacl.signing.VerifyKey(recipient_public_key).to_curve25519_public_key()
    except (nacl.exceptions.CryptoError, TypeError, ValueError) as err:
        raise InvalidEncoding("the recipient is not a valid ed25519 public key") from err


class KeyWrapper:
    """Wraps many data keys at once: ``crypto_box`` from one ephemeral X25519 key pair, made
    here and never stored, to each reader, with a random nonce per wrap. The key agreement
    with a reader is done once per batch instead of twice per wrap (a SealedBox makes a new
    ephemeral key pair for every wrap): about 3 us a wrap instead of 53.

    Use one per batch (an import batch, one ``put_many``) and drop it: whoever
    held its private key could open every key it wrapped.
    """

    def __init__(self) -> None:
        self._private = nacl.public.PrivateKey.generate()
        self._public = bytes(self._private.public_key)
        self._boxes: dict[bytes, nacl.public.Box] = {}

    def wrap(self, data_key: bytes, recipient_public_key: bytes) -> bytes:
        """``ephemeral public key || nonce || box(data_key)`` for an ed25519 public key."""
        box = self._boxes.get(recipient_public_key)
        if box is None:
            recipient = _x25519_of(recipient_public_key)
            box = self._boxes[recipient_public_key] = nacl.public.Box(self._private, recipient)
        return self._public + bytes(box.encrypt(data_key))


def new_data_key() -> bytes:
    return nacl.utils.random(DATA_KEY_BYTES)


def seal(data_key: bytes, plaintext: bytes) -> bytes:
    """SecretBox(data_key) with a random nonce: nonce || ciphertext+MAC."""
    return bytes(nacl.secret.SecretBox(data_key).encrypt(plaintext))


def open_sealed(data_key: bytes, ciphertext: bytes) -> bytes:
    try:
        return bytes(nacl.secret.SecretBox(data_key).decrypt(ciphertext))
    except nacl.exceptions.CryptoError as err:
        raise NotAuthorised("ciphertext does not open with this data key") from err
