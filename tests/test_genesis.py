"""Genesis files: parsing with errors that name the problem, and a hash peers can compare."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import msgpack
import pytest

from ehrnode.core import tx
from ehrnode.core.errors import ConfigError
from ehrnode.core.genesis import Genesis, Params


def key(i: int) -> str:
    return hashlib.sha256(b"validator %d" % i).hexdigest()


KEYS = [key(i) for i in range(4)]


def doc(**changes: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "chain_id": "ehr-test",
        "genesis_time": 1_764_000_000_000,
        "validators": [
            {"key": KEYS[0], "power": 1, "name": "St Mary's"},
            {"key": KEYS[1], "power": 2, "name": "Lab North"},
            {"key": KEYS[2], "power": 1},
        ],
        "params": {"max_tx_bytes": 262144, "max_block_bytes": 8388608, "max_block_txs": 5000},
    }
    obj.update(changes)
    return {k: v for k, v in obj.items() if v is not None}


def parse(obj: Any) -> Genesis:
    return Genesis.from_json(json.dumps(obj))


def test_parse() -> None:
    g = parse(doc())
    assert g.chain_id == "ehr-test"
    assert g.genesis_time == 1_764_000_000_000
    assert [v.key.hex() for v in g.validators] == KEYS[:3]
    assert [v.name for v in g.validators] == ["St Mary's", "Lab North", ""]
    assert g.powers == {
        bytes.fromhex(KEYS[0]): 1,
        bytes.fromhex(KEYS[1]): 2,
        bytes.fromhex(KEYS[2]): 1,
    }
    assert g.params == Params(262144, 8388608, 5000)


def test_params_default_and_may_be_partial() -> None:
    assert parse(doc(params=None)).params == Params()
    partial = parse(doc(params={"max_block_txs": 10}))
    assert partial.params == Params(max_block_txs=10)
    assert Params().max_tx_bytes == tx.DEFAULT_MAX_TX_BYTES


def test_json_round_trip() -> None:
    g = parse(doc())
    again = Genesis.from_json(g.to_json())
    assert again == g
    assert again.hash() == g.hash()
    assert g.to_json().endswith("\n")


def test_upper_case_keys_parse_to_the_same_genesis() -> None:
    upper = doc()
    upper["validators"][0]["key"] = KEYS[0].upper()
    assert parse(upper) == parse(doc())
    assert parse(upper).hash() == parse(doc()).hash()


# --- the hash ------------------------------------------------------------------------------


GOLDEN_HASH = "6833d009ddc36551f726e5dd635d5a332ec57bf19a7eade3ce9bb29b3c195c18"


def test_hash_is_stable() -> None:
    """Peers compare this hash in their handshake: it must not change between releases.

    The value is sha256 of the canonical msgpack of the genesis as parsed (keys as bytes)."""
    assert parse(doc()).hash().hex() == GOLDEN_HASH


def test_hash_is_sha256_of_the_documented_encoding() -> None:
    g = parse(doc())
    validators = [
        {"key": bytes.fromhex(v["key"]), "name": v.get("name", ""), "power": v["power"]}
        for v in doc()["validators"]
    ]
    expected = {
        "chain_id": "ehr-test",
        "genesis_time": 1_764_000_000_000,
        "params": {"max_block_bytes": 8388608, "max_block_txs": 5000, "max_tx_bytes": 262144},
        "validators": validators,
    }
    assert g.hash() == hashlib.sha256(msgpack.packb(expected, use_bin_type=True)).digest()


def test_hash_ignores_json_layout_and_key_order() -> None:
    obj = doc()
    compact = json.dumps(obj, separators=(",", ":"))
    backwards = json.dumps(dict(reversed(list(obj.items()))), indent=4)
    assert Genesis.from_json(compact).hash() == Genesis.from_json(backwards).hash()


def test_hash_counts_default_params_as_written() -> None:
    # Params left out mean the defaults, so the genesis and its hash are the same as if
    # the defaults had been written out.
    explicit = doc(params=Params().to_wire())
    assert parse(doc(params=None)).hash() == parse(explicit).hash()


@pytest.mark.parametrize(
    "changes",
    [
        {"chain_id": "ehr-test2"},
        {"genesis_time": 1_764_000_000_001},
        {"params": {"max_block_txs": 4999}},
        {"validators": [{"key": KEYS[0], "power": 1, "name": "St Mary's"}]},
        {
            "validators": [
                {"key": KEYS[1], "power": 2, "name": "Lab North"},
                {"key": KEYS[0], "power": 1, "name": "St Mary's"},
                {"key": KEYS[2], "power": 1},
            ]
        },
        {
            "validators": [
                {"key": KEYS[0], "power": 1, "name": "St Mary's"},
                {"key": KEYS[1], "power": 3, "name": "Lab North"},
                {"key": KEYS[2], "power": 1},
            ]
        },
        {
            "validators": [
                {"key": KEYS[0], "power": 1, "name": "St Marys"},
                {"key": KEYS[1], "power": 2, "name": "Lab North"},
                {"key": KEYS[2], "power": 1},
            ]
        },
    ],
)
def test_hash_changes_with_any_content(changes: dict[str, Any]) -> None:
    assert parse(doc(**changes)).hash() != parse(doc()).hash()


# --- errors --------------------------------------------------------------------------------


def _validators(*entries: Any) -> list[Any]:
    return list(entries)


V0 = {"key": KEYS[0], "power": 1}

ERRORS: dict[str, tuple[Any, str]] = {
    "not an object": ([1, 2], "JSON object"),
    "unknown field": (doc(fees=1), "unknown field.*fees"),
    "no chain id": (doc(chain_id=None), "chain_id"),
    "chain id upper case": (doc(chain_id="EHR"), "chain_id"),
    "chain id empty": (doc(chain_id=""), "chain_id"),
    "chain id too long": (doc(chain_id="a" * 65), "chain_id"),
    "chain id not text": (doc(chain_id=7), "chain_id"),
    "no time": (doc(genesis_time=None), "genesis_time"),
    "negative time": (doc(genesis_time=-1), "genesis_time"),
    "float time": (doc(genesis_time=1.5), "genesis_time"),
    "bool time": (doc(genesis_time=True), "genesis_time"),
    "text time": (doc(genesis_time="2025-01-01"), "genesis_time"),
    "time past 2^63": (doc(genesis_time=2**63), "genesis_time"),
    "no validators": (doc(validators=None), "validators"),
    "empty validators": (doc(validators=[]), "validators"),
    "validators not a list": (doc(validators={"a": V0}), "validators"),
    "101 validators": (
        doc(validators=[{"key": key(i), "power": 1} for i in range(101)]),
        "validators",
    ),
    "validator not an object": (doc(validators=[KEYS[0]]), "validator 0"),
    "validator without power": (doc(validators=[V0, {"key": KEYS[1]}]), "validator 1.*power"),
    "validator without key": (doc(validators=[{"power": 1}]), "validator 0.*key"),
    "validator unknown field": (
        doc(validators=[{**V0, "pwoer": 2}]),
        "validator 0.*unknown field.*pwoer",
    ),
    "key not hex": (doc(validators=[{"key": "zz" * 32, "power": 1}]), "validator 0 key"),
    "key too short": (doc(validators=[{"key": KEYS[0][:-2], "power": 1}]), "validator 0 key"),
    "key too long": (doc(validators=[{"key": KEYS[0] + "00", "power": 1}]), "validator 0 key"),
    "power zero": (doc(validators=[{**V0, "power": 0}]), "validator 0 power"),
    "power too big": (doc(validators=[{**V0, "power": 1001}]), "validator 0 power"),
    "power bool": (doc(validators=[{**V0, "power": True}]), "validator 0 power"),
    "power float": (doc(validators=[{**V0, "power": 1.0}]), "validator 0 power"),
    "power text": (doc(validators=[{**V0, "power": "1"}]), "validator 0 power"),
    "name not text": (doc(validators=[{**V0, "name": 5}]), "validator 0 name"),
    "name too long": (doc(validators=[{**V0, "name": "x" * 201}]), "validator 0 name"),
    "key twice": (doc(validators=[V0, {**V0, "power": 2}]), "twice"),
    "key twice in another case": (
        doc(validators=[V0, {"key": KEYS[0].upper(), "power": 1}]),
        "twice",
    ),
    "params not an object": (doc(params=[1]), "params"),
    "unknown param": (doc(params={"max_txs": 1}), "unknown field.*max_txs"),
    "param zero": (doc(params={"max_block_txs": 0}), "max_block_txs"),
    "param negative": (doc(params={"max_tx_bytes": -5}), "max_tx_bytes"),
    "param bool": (doc(params={"max_block_txs": True}), "max_block_txs"),
    "param float": (doc(params={"max_block_txs": 10.0}), "max_block_txs"),
    "param past 2^63": (doc(params={"max_block_bytes": 2**64}), "max_block_bytes"),
    "tx bigger than block": (
        doc(params={"max_tx_bytes": 2000, "max_block_bytes": 1000}),
        "max_tx_bytes must not exceed max_block_bytes",
    ),
}


@pytest.mark.parametrize(("obj", "match"), ERRORS.values(), ids=ERRORS.keys())
def test_errors_name_the_problem(obj: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse(obj)


@pytest.mark.parametrize("text", ["", "{", "not json", '{"chain_id": "a",}', "\x00"])
def test_not_json(text: str) -> None:
    with pytest.raises(ConfigError, match="not valid JSON"):
        Genesis.from_json(text)


def test_every_accepted_genesis_can_be_hashed() -> None:
    # The largest values the parser accepts still fit the canonical encoding.
    g = parse(doc(genesis_time=2**63 - 1, params={"max_block_bytes": 2**63 - 1}))
    assert len(g.hash()) == 32
