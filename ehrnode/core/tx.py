"""Transactions: kinds, byte form, signing bytes, ids and the stateless checks.

Byte form (canonical msgpack, see ``core.codec``), a map with exactly these keys::

    {"body": map, "chain": str, "kind": str, "nonce": uint, "sig": bin(64),
     "signer": bin(32), "v": 1}

- signing bytes = ``DOMAIN_TX || encode(the same map without "sig")``
- id            = ``sha256(the transaction's bytes)``; it is the permanent identity of a
  record, a grant, and so on. A ``records`` transaction writes several records at once
  (a FHIR transaction Bundle's worth, all or none); its i-th record's id is
  ``record_id(tx id, i)``, as a Bitcoin output is named by its transaction and index.

Each kind's body is described by ``core.bodies.BODY_SPECS`` and in docs/protocol.md. A body may
hold no key the spec does not name. What needs the chain's state (nonces, roles, grants)
is checked in ``core.state``; everything here needs only the bytes. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Final

from ehrnode.core import codec, crypto
from ehrnode.core.bodies import (
    KINDS as KINDS,
    MAX_BLOB_BYTES as MAX_BLOB_BYTES,
    MAX_NAME_CHARS as MAX_NAME_CHARS,
    MAX_NONCE as MAX_NONCE,
    MAX_RECORDS_PER_ERASE as MAX_RECORDS_PER_ERASE,
    MAX_RECORDS_PER_GRANT as MAX_RECORDS_PER_GRANT,
    MAX_RECORDS_PER_TX as MAX_RECORDS_PER_TX,
    ROLES as ROLES,
    check_body,
)
from ehrnode.core.errors import InvalidEncoding, InvalidTransaction

TX_VERSION = 1
DEFAULT_MAX_TX_BYTES = 256 * 1024

_CHAIN_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def is_chain_id(text: str) -> bool:
    return bool(_CHAIN_ID.match(text))


# --- the transaction ----------------------------------------------------------------------


class Tx:
    """A decoded transaction: its fields, its canonical bytes (``raw``) and its id (the
    SHA-256 of ``raw``). Immutable: ``Final`` fields, which the compiled build refuses to
    set again and mypy refuses in the sources.

    A plain class, not a frozen dataclass: every node builds one for every transaction it
    decodes, and a frozen dataclass's generated ``__init__`` (interpreted even in the
    compiled build, each field set through ``object.__setattr__``) took 1.46 us; this one,
    compiled, about 0.05 (0.2 called from Python; benchmarks note 56)."""

    __slots__ = ("body", "chain", "id", "kind", "nonce", "raw", "sig", "signer")

    def __init__(
        self,
        chain: str,
        kind: str,
        signer: bytes,
        nonce: int,
        body: dict[str, Any],
        sig: bytes,
        raw: bytes,
        id: bytes,
    ) -> None:
        self.chain: Final = chain
        self.kind: Final = kind
        self.signer: Final = signer
        self.nonce: Final = nonce
        self.body: Final = body
        self.sig: Final = sig
        self.raw: Final = raw
        self.id: Final = id

    def _fields(self) -> tuple[str, str, bytes, int, dict[str, Any], bytes, bytes, bytes]:
        return (
            self.chain,
            self.kind,
            self.signer,
            self.nonce,
            self.body,
            self.sig,
            self.raw,
            self.id,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tx):
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # its body is a dict

    def __repr__(self) -> str:
        return (
            f"Tx(chain={self.chain!r}, kind={self.kind!r}, signer={self.signer!r}, "
            f"nonce={self.nonce!r}, body={self.body!r}, sig={self.sig!r})"
        )

    @property
    def size(self) -> int:
        return len(self.raw)

    def signing_bytes(self) -> bytes:
        return signing_bytes(self.chain, self.kind, self.signer, self.nonce, self.body)


def signing_bytes(chain: str, kind: str, signer: bytes, nonce: int, body: dict[str, Any]) -> bytes:
    return crypto.DOMAIN_TX + codec.encode(_unsigned(chain, kind, signer, nonce, body))


def _unsigned(
    chain: str, kind: str, signer: bytes, nonce: int, body: dict[str, Any]
) -> dict[str, Any]:
    return {
        "v": TX_VERSION,
        "chain": chain,
        "kind": kind,
        "signer": signer,
        "nonce": nonce,
        "body": body,
    }


# Kinds whose body spec checks only the shape of some values (the evidence's votes are
# checked in full by core.authority): their bodies get the codec's walk over types.
# Every other spec checks the type of every value it admits (tests/test_tx_types.py).
_SHAPE_ONLY = {"evidence"}


def make(identity: crypto.Identity, chain: str, kind: str, nonce: int, body: Any) -> Tx:
    """Build and sign a transaction (what a client does); any ``body`` gets check_body's checks."""
    raw, tx_id = sign(identity, chain, kind, nonce, body)
    signed = codec.decode_trusted(raw)  # the canonical body: keys sorted, lists
    return Tx(chain, kind, identity.public_key, nonce, signed["body"], signed["sig"], raw, tx_id)


def sign(
    identity: crypto.Identity, chain: str, kind: str, nonce: int, body: Any
) -> tuple[bytes, bytes]:
    """``make``'s bytes and id only, for a client that sends them (the decoded canonical
    body's round trip was a tenth of ``ehr import``'s main thread)."""
    check_body(kind, body)
    unsigned = _unsigned(chain, kind, identity.public_key, nonce, body)
    # The body spec checked the type of every value (but for the shape-only kinds), and
    # the other fields are ours: the codec's walk over types is needed only for those.
    if kind in _SHAPE_ONLY or type(chain) is not str or type(nonce) is not int:
        codec.check_types(unsigned)
    message = crypto.DOMAIN_TX + codec.encode_trusted(unsigned)
    raw = codec.encode_trusted({**unsigned, "sig": identity.sign(b"", message)})
    return raw, hashlib.sha256(raw).digest()


_TOP_KEYS = {"v", "chain", "kind", "signer", "nonce", "body", "sig"}


def decode(
    raw: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_TX_BYTES,
    verify_sig: bool = True,
    tx_id: bytes | None = None,
    certified: bool = False,
) -> Tx:
    """Parse and check a transaction's bytes: form, fields, body and signature.

    ``tx_id``: the SHA-256 of ``raw`` when the caller has computed it already.
    ``certified``: ``raw`` is in a block a quorum certified, so more than two thirds of the
    validators checked its signature and that its bytes are canonical; neither is checked
    again (every field and the body still are).

    The chain id is checked against the node's in ``core.state`` so that the error can
    name the right one.
    """
    if len(raw) > max_bytes:
        raise InvalidTransaction(
            f"transaction of {len(raw)} bytes exceeds the limit of {max_bytes}",
            code="tx_too_large",
        )
    try:
        # Every field and body value is type-checked below (a float, a bool for an int or
        # a nesting too deep is refused there), so the codec's own walk is left out.
        if certified:
            obj = codec.decode_certified(raw, max_bytes=max_bytes)
        else:
            obj = codec.decode(raw, max_bytes=max_bytes, typed=False)
    except InvalidEncoding as err:
        raise InvalidTransaction(
            f"transaction is not canonical msgpack: {err}", code="malformed"
        ) from err
    if not isinstance(obj, dict) or set(obj) != _TOP_KEYS:
        raise InvalidTransaction(
            f"a transaction is a map with exactly the keys {', '.join(sorted(_TOP_KEYS))}",
            code="malformed",
        )
    # ``True == 1`` in Python, and msgpack's true is another byte form of the same signed
    # content: without the type check one signature would fit two transaction ids.
    if type(obj["v"]) is not int or obj["v"] != TX_VERSION:
        raise InvalidTransaction(f"unsupported transaction version {obj['v']!r}", code="malformed")
    chain, kind, signer, nonce, body, sig = (
        obj["chain"],
        obj["kind"],
        obj["signer"],
        obj["nonce"],
        obj["body"],
        obj["sig"],
    )
    if not isinstance(chain, str) or not isinstance(kind, str):
        raise InvalidTransaction("'chain' and 'kind' must be strings", code="malformed")
    if not isinstance(signer, bytes) or len(signer) != crypto.PUBLIC_KEY_BYTES:
        raise InvalidTransaction("'signer' must be a 32-byte public key", code="malformed")
    if not isinstance(nonce, int) or isinstance(nonce, bool) or not 1 <= nonce <= MAX_NONCE:
        raise InvalidTransaction("'nonce' must be an integer from 1 to 2^63-1", code="malformed")
    if not isinstance(sig, bytes) or len(sig) != crypto.SIGNATURE_BYTES:
        raise InvalidTransaction("'sig' must be a 64-byte signature", code="malformed")
    check_body(kind, body)
    if kind in _SHAPE_ONLY:
        try:
            codec.check_types(body)
        except InvalidEncoding as err:
            raise InvalidTransaction(f"{kind} body: {err}", code="malformed_body") from err
    checked = verify_sig and not certified
    if checked and not crypto.verify(signer, b"", _signing_bytes_of(bytes(raw), sig), sig):
        raise InvalidTransaction(
            "signature does not verify for this signer and content", code="bad_signature"
        )
    if tx_id is None:
        tx_id = hashlib.sha256(raw).digest()  # crypto.sha256, without its Python frame
    return Tx(chain, kind, signer, nonce, body, sig, bytes(raw), tx_id)


def _signing_bytes_of(raw: bytes, sig: bytes) -> bytes:
    """The signing bytes of canonical transaction bytes, cut out of them rather than
    encoded again: the same 7-key map without its "sig" entry, as a 6-key map.

    The top-level "sig" entry is the last occurrence of its 70 bytes: only the 32-byte
    "signer" and "v" follow it, too short to hold another.
    """
    entry = b"\xa3sig\xc4\x40" + sig
    at = raw.rindex(entry)
    assert raw[0] == 0x87, "a canonical transaction is a 7-entry fixmap"
    return crypto.DOMAIN_TX + b"\x86" + raw[1:at] + raw[at + len(entry) :]


def record_id(tx_id: bytes, index: int) -> bytes:
    """The id of the ``index``-th record of a ``records`` transaction."""
    return crypto.sha256(crypto.DOMAIN_RECORD + tx_id + index.to_bytes(4, "big"))


def record_bodies(kind: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The record bodies a transaction writes (of a decoded or stored body): its body for
    ``record``, its items for ``records`` (record i is ``record_id(tx id, i)``), none for
    other kinds."""
    if kind == "record":
        return [body]
    if kind == "records":
        items: list[dict[str, Any]] = body["items"]
        return items
    return []


def blobs_of(kind: str, body: dict[str, Any]) -> list[bytes]:
    """The ciphertext blobs a transaction's records name."""
    return [record["blob"] for record in record_bodies(kind, body)]


def endorsement_bytes(chain: str, role: str, subject: bytes) -> bytes:
    """What an institution (or validator) signs to endorse ``subject`` in ``role``."""
    return crypto.DOMAIN_ENDORSE + codec.encode({"chain": chain, "role": role, "subject": subject})


def endorse(endorser: crypto.Identity, chain: str, role: str, subject: bytes) -> dict[str, bytes]:
    return {
        "by": endorser.public_key,
        "sig": endorser.sign(b"", endorsement_bytes(chain, role, subject)),
    }
