"""Blocks, votes and commit certificates: their byte forms and the checks that need no state.

Byte forms (canonical msgpack maps; docs/protocol.md has the full table):

    header  {"chain", "height", "time" (ms since the epoch), "proposer" bin32,
             "prev" bin32 (previous block id; 32 zero bytes at height 1),
             "txs" bin32 (Merkle root of the tx ids), "ntx" uint,
             "vals" bin32, "next_vals" bin32 (validator-set hashes),
             "state" bin32 (state hash after the previous block),
             "last_commit" bin32 (hash of the previous block's certificate; zeros at 1)}
    block   {"header": header, "txs": [tx bytes...], "last_commit": certificate | nil}
    vote    {"type": 1 prevote | 2 precommit, "height", "round", "block": bin32 | nil,
             "validator": bin32, "sig": bin64}
    certificate {"height", "round", "block": bin32, "sigs": [[validator, sig], ...]}

- block id      = sha256(encode(header))
- vote signs    DOMAIN_VOTE || encode({"chain", "type", "height", "round", "block"})
- a certificate holds precommits for one block from validators with more than 2/3 of the
  voting power; its signatures all sign the same bytes, so it is small and checks offline.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ehrnode.core import codec, crypto, merkle
from ehrnode.core.errors import InvalidBlock, InvalidEncoding

ZERO_HASH = bytes(32)
PREVOTE = 1
PRECOMMIT = 2


def validator_set_hash(powers: Mapping[bytes, int]) -> bytes:
    """Hash of a validator set: sha256(encode([[key, power], ...] sorted by key))."""
    return crypto.sha256(codec.encode([[key, powers[key]] for key in sorted(powers)]))


def has_quorum(signed_power: int, total_power: int) -> bool:
    """More than two thirds of the voting power (Tendermint's +2/3)."""
    return 3 * signed_power > 2 * total_power


# --- votes --------------------------------------------------------------------------------


def vote_signing_bytes(
    chain: str, vote_type: int, height: int, round_: int, block: bytes | None
) -> bytes:
    return crypto.DOMAIN_VOTE + codec.encode(
        {"chain": chain, "type": vote_type, "height": height, "round": round_, "block": block}
    )


@dataclass(frozen=True)
class Vote:
    type: int
    height: int
    round: int
    block: bytes | None
    validator: bytes
    sig: bytes

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "height": self.height,
            "round": self.round,
            "block": self.block,
            "validator": self.validator,
            "sig": self.sig,
        }

    @classmethod
    def from_wire(cls, obj: Any) -> Vote:
        if not isinstance(obj, dict) or set(obj) != {
            "type",
            "height",
            "round",
            "block",
            "validator",
            "sig",
        }:
            raise InvalidEncoding("a vote is a map of type, height, round, block, validator, sig")
        vote = cls(
            obj["type"], obj["height"], obj["round"], obj["block"], obj["validator"], obj["sig"]
        )
        if isinstance(vote.type, bool) or vote.type not in (PREVOTE, PRECOMMIT):
            raise InvalidEncoding("vote type must be 1 (prevote) or 2 (precommit)")
        _check_uint(vote.height, "vote height", minimum=1)
        _check_uint(vote.round, "vote round")
        if vote.block is not None and not _is_hash(vote.block):
            raise InvalidEncoding("vote block must be a 32-byte id or nil")
        if not _is_hash(vote.validator) or not isinstance(vote.sig, bytes) or len(vote.sig) != 64:
            raise InvalidEncoding("vote validator must be 32 bytes and sig 64 bytes")
        return vote

    def verify(self, chain: str) -> bool:
        message = vote_signing_bytes(chain, self.type, self.height, self.round, self.block)
        return crypto.verify(self.validator, b"", message, self.sig)


def sign_vote(
    identity: crypto.Identity,
    chain: str,
    vote_type: int,
    height: int,
    round_: int,
    block: bytes | None,
) -> Vote:
    sig = identity.sign(b"", vote_signing_bytes(chain, vote_type, height, round_, block))
    return Vote(vote_type, height, round_, block, identity.public_key, sig)


# --- commit certificates ------------------------------------------------------------------


@dataclass(frozen=True)
class Certificate:
    height: int
    round: int
    block: bytes
    sigs: tuple[tuple[bytes, bytes], ...]

    def to_wire(self) -> dict[str, Any]:
        return {
            "height": self.height,
            "round": self.round,
            "block": self.block,
            "sigs": [[key, sig] for key, sig in self.sigs],
        }

    @classmethod
    def from_wire(cls, obj: Any) -> Certificate:
        if not isinstance(obj, dict) or set(obj) != {"height", "round", "block", "sigs"}:
            raise InvalidEncoding("a certificate is a map of height, round, block, sigs")
        _check_uint(obj["height"], "certificate height", minimum=1)
        _check_uint(obj["round"], "certificate round")
        if not _is_hash(obj["block"]):
            raise InvalidEncoding("certificate block must be a 32-byte id")
        sigs = obj["sigs"]
        if not isinstance(sigs, list) or len(sigs) > 1000:
            raise InvalidEncoding("certificate sigs must be a list of at most 1000 pairs")
        pairs: list[tuple[bytes, bytes]] = []
        for item in sigs:
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not _is_hash(item[0])
                or not isinstance(item[1], bytes)
                or len(item[1]) != 64
            ):
                raise InvalidEncoding("certificate sigs must be [32-byte key, 64-byte sig] pairs")
            pairs.append((item[0], item[1]))
        return cls(obj["height"], obj["round"], obj["block"], tuple(pairs))

    def encode(self) -> bytes:
        return codec.encode(self.to_wire())

    def hash(self) -> bytes:
        return crypto.sha256(self.encode())

    def verify(self, chain: str, powers: Mapping[bytes, int]) -> None:
        """Raise InvalidBlock unless more than 2/3 of ``powers`` precommitted this block."""
        message = vote_signing_bytes(chain, PRECOMMIT, self.height, self.round, self.block)
        seen: set[bytes] = set()
        signed = 0
        for key, sig in self.sigs:
            if key in seen:
                raise InvalidBlock("certificate names a validator twice")
            seen.add(key)
            if key not in powers:
                raise InvalidBlock(f"certificate signer {key.hex()[:16]}… is not a validator")
            if not crypto.verify(key, b"", message, sig):
                raise InvalidBlock(f"certificate signature of {key.hex()[:16]}… does not verify")
            signed += powers[key]
        if not has_quorum(signed, sum(powers.values())):
            raise InvalidBlock(
                f"certificate carries {signed} of {sum(powers.values())} voting power; "
                "more than 2/3 is needed"
            )


def make_certificate(votes: Sequence[Vote]) -> Certificate:
    first = votes[0]
    assert first.block is not None
    sigs = tuple(sorted((v.validator, v.sig) for v in votes))
    return Certificate(first.height, first.round, first.block, sigs)


# --- headers and blocks -------------------------------------------------------------------

_HEADER_KEYS = {
    "chain",
    "height",
    "time",
    "proposer",
    "prev",
    "txs",
    "ntx",
    "vals",
    "next_vals",
    "state",
    "last_commit",
}


@dataclass(frozen=True)
class Header:
    chain: str
    height: int
    time: int
    proposer: bytes
    prev: bytes
    txs: bytes
    ntx: int
    vals: bytes
    next_vals: bytes
    state: bytes
    last_commit: bytes

    def to_wire(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _HEADER_KEYS}

    @classmethod
    def from_wire(cls, obj: Any) -> Header:
        if not isinstance(obj, dict) or set(obj) != _HEADER_KEYS:
            raise InvalidEncoding(f"a header is a map of {', '.join(sorted(_HEADER_KEYS))}")
        if not isinstance(obj["chain"], str):
            raise InvalidEncoding("header chain must be a string")
        _check_uint(obj["height"], "header height", minimum=1)
        _check_uint(obj["time"], "header time")
        _check_uint(obj["ntx"], "header ntx")
        for name in ("proposer", "prev", "txs", "vals", "next_vals", "state", "last_commit"):
            if not _is_hash(obj[name]):
                raise InvalidEncoding(f"header {name} must be 32 bytes")
        return cls(**obj)

    def encode(self) -> bytes:
        return codec.encode(self.to_wire())

    def id(self) -> bytes:
        return crypto.sha256(self.encode())


@dataclass(frozen=True)
class Block:
    header: Header
    txs: tuple[bytes, ...]
    last_commit: Certificate | None
    raw: bytes = field(repr=False, compare=False)
    id: bytes = field(compare=False)
    tx_ids: tuple[bytes, ...] = field(repr=False, compare=False)

    @classmethod
    def build(
        cls,
        header: Header,
        txs: Sequence[bytes],
        last_commit: Certificate | None,
        tx_ids: Sequence[bytes] | None = None,
    ) -> Block:
        """``tx_ids``: the transactions' ids (SHA-256), when the caller has them already."""
        wire = {
            "header": header.to_wire(),
            "txs": list(txs),
            "last_commit": None if last_commit is None else last_commit.to_wire(),
        }
        raw = codec.encode(wire)
        ids = tuple(merkle.digests(txs) if tx_ids is None else tx_ids)
        return cls(header, tuple(txs), last_commit, raw, header.id(), ids)

    @classmethod
    def decode(cls, raw: bytes, *, max_bytes: int) -> Block:
        """Parse a block and check what needs no state: form, tx root, certificate hash."""
        try:
            obj = codec.decode(raw, max_bytes=max_bytes)
            if not isinstance(obj, dict) or set(obj) != {"header", "txs", "last_commit"}:
                raise InvalidEncoding("a block is a map of header, txs, last_commit")
            header = Header.from_wire(obj["header"])
            txs = obj["txs"]
            if not isinstance(txs, list) or not all(isinstance(t, bytes) for t in txs):
                raise InvalidEncoding("block txs must be a list of byte strings")
            cert = None if obj["last_commit"] is None else Certificate.from_wire(obj["last_commit"])
        except InvalidEncoding as err:
            raise InvalidBlock(f"malformed block: {err}") from err
        tx_ids = tuple(merkle.digests(txs))
        block = cls(header, tuple(txs), cert, bytes(raw), header.id(), tx_ids)
        block.check_form()
        return block

    def tx_spans(self) -> list[tuple[int, int]]:
        """Where each transaction's bytes lie in ``raw``: (offset, size). A block's
        canonical map ends with its "txs" array (its keys sort header, last_commit, txs),
        each element a msgpack bin, so the places follow from the sizes, counted back
        from the end."""
        spans: list[tuple[int, int]] = []
        end = len(self.raw)
        for tx in reversed(self.txs):
            size = len(tx)
            start = end - size
            spans.append((start, size))
            end = start - (2 if size < 0x100 else 3 if size < 0x10000 else 5)
        spans.reverse()
        return spans

    def check_form(self) -> None:
        h = self.header
        if h.ntx != len(self.txs):
            raise InvalidBlock(f"header says {h.ntx} transactions, block holds {len(self.txs)}")
        if merkle.root(self.tx_ids) != h.txs:
            raise InvalidBlock("transaction root does not match the transactions")
        if len(set(self.tx_ids)) != len(self.tx_ids):
            raise InvalidBlock("block holds a transaction twice")
        if h.height == 1:
            if self.last_commit is not None or h.last_commit != ZERO_HASH or h.prev != ZERO_HASH:
                raise InvalidBlock("the first block has no previous block or certificate")
        else:
            if self.last_commit is None:
                raise InvalidBlock("block lacks the previous block's certificate")
            if self.last_commit.hash() != h.last_commit:
                raise InvalidBlock("last_commit hash in header does not match the certificate")
            if self.last_commit.height != h.height - 1 or self.last_commit.block != h.prev:
                raise InvalidBlock("certificate is not for the previous block")


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == 32


def _check_uint(value: object, what: str, minimum: int = 0) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value < 1 << 63:
        raise InvalidEncoding(f"{what} must be an integer of at least {minimum}")


@dataclass(frozen=True)
class InclusionProof:
    """A transaction's path to a header, and the certificate that finalised that header."""

    tx: bytes
    index: int
    total: int
    path: tuple[bytes, ...]
    header: Header
    certificate: Certificate

    def verify(self, chain: str, powers: Mapping[bytes, int]) -> None:
        """Raise InvalidBlock unless the tx is in a block final under ``powers``."""
        if self.header.chain != chain:
            raise InvalidBlock(f"proof is for chain '{self.header.chain}', not '{chain}'")
        tx_id = crypto.sha256(self.tx)
        if not merkle.verify(tx_id, self.index, self.total, self.path, self.header.txs):
            raise InvalidBlock("Merkle path does not lead to the header's transaction root")
        if self.total != self.header.ntx:
            raise InvalidBlock("proof's leaf count differs from the header's")
        if (
            self.certificate.block != self.header.id()
            or self.certificate.height != self.header.height
        ):
            raise InvalidBlock("certificate is for another block")
        if validator_set_hash(powers) != self.header.vals:
            raise InvalidBlock("the given validator set is not the one that signed this height")
        self.certificate.verify(chain, powers)

    def to_wire(self) -> dict[str, Any]:
        return {
            "tx": self.tx,
            "index": self.index,
            "total": self.total,
            "path": list(self.path),
            "header": self.header.to_wire(),
            "certificate": self.certificate.to_wire(),
        }

    @classmethod
    def from_wire(cls, obj: Any) -> InclusionProof:
        if not isinstance(obj, dict) or set(obj) != {
            "tx",
            "index",
            "total",
            "path",
            "header",
            "certificate",
        }:
            raise InvalidEncoding("a proof is a map of tx, index, total, path, header, certificate")
        if not isinstance(obj["tx"], bytes) or not isinstance(obj["path"], list):
            raise InvalidEncoding("proof tx must be bytes and path a list")
        if not all(_is_hash(p) for p in obj["path"]) or len(obj["path"]) > 64:
            raise InvalidEncoding("proof path must hold at most 64 32-byte hashes")
        _check_uint(obj["index"], "proof index")
        _check_uint(obj["total"], "proof total", minimum=1)
        return cls(
            obj["tx"],
            obj["index"],
            obj["total"],
            tuple(obj["path"]),
            Header.from_wire(obj["header"]),
            Certificate.from_wire(obj["certificate"]),
        )


# --- proposals ----------------------------------------------------------------------------


def proposal_signing_bytes(
    chain: str, height: int, round_: int, pol_round: int, block_id: bytes
) -> bytes:
    return crypto.DOMAIN_PROPOSAL + codec.encode(
        {
            "chain": chain,
            "height": height,
            "round": round_,
            "pol_round": pol_round,
            "block": block_id,
        }
    )


@dataclass(frozen=True)
class Proposal:
    """A proposer's signed offer of a block for (height, round); pol_round is -1 or the
    round in which the block got a prevote quorum (Tendermint's validRound)."""

    height: int
    round: int
    pol_round: int
    block: Block
    proposer: bytes
    sig: bytes

    def to_wire(self) -> dict[str, Any]:
        return {
            "height": self.height,
            "round": self.round,
            "pol_round": self.pol_round,
            "block": self.block.raw,
            "proposer": self.proposer,
            "sig": self.sig,
        }

    @classmethod
    def from_wire(cls, obj: Any, *, max_block_bytes: int) -> Proposal:
        keys = {"height", "round", "pol_round", "block", "proposer", "sig"}
        if not isinstance(obj, dict) or set(obj) != keys:
            raise InvalidEncoding(f"a proposal is a map of {', '.join(sorted(keys))}")
        _check_uint(obj["height"], "proposal height", minimum=1)
        _check_uint(obj["round"], "proposal round")
        pol = obj["pol_round"]
        if not isinstance(pol, int) or isinstance(pol, bool) or not -1 <= pol < obj["round"]:
            raise InvalidEncoding("proposal pol_round must be -1 or a round before this one")
        if (
            not _is_hash(obj["proposer"])
            or not isinstance(obj["sig"], bytes)
            or len(obj["sig"]) != 64
        ):
            raise InvalidEncoding("proposal proposer must be 32 bytes and sig 64 bytes")
        if not isinstance(obj["block"], bytes):
            raise InvalidEncoding("proposal block must be bytes")
        block = Block.decode(obj["block"], max_bytes=max_block_bytes)
        if block.header.height != obj["height"]:
            raise InvalidEncoding("proposal height differs from its block's height")
        return cls(obj["height"], obj["round"], pol, block, obj["proposer"], obj["sig"])

    def verify(self, chain: str) -> bool:
        message = proposal_signing_bytes(
            chain, self.height, self.round, self.pol_round, self.block.id
        )
        return crypto.verify(self.proposer, b"", message, self.sig)


def sign_proposal(
    identity: crypto.Identity, chain: str, round_: int, pol_round: int, block: Block
) -> Proposal:
    height = block.header.height
    sig = identity.sign(b"", proposal_signing_bytes(chain, height, round_, pol_round, block.id))
    return Proposal(height, round_, pol_round, block, identity.public_key, sig)
