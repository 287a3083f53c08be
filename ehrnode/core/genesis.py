"""Genesis: the chain id, the first validators and the chain's parameters.

A genesis file is JSON, written once by whoever founds the network and copied unchanged to
every node::

    {
      "chain_id": "ehr-test",
      "genesis_time": 1764000000000,            # ms since the epoch
      "validators": [{"key": "<64 hex>", "power": 1, "name": "St Mary's"}],
      "params": {"max_tx_bytes": 262144, "max_block_bytes": 8388608, "max_block_txs": 5000}
    }

Its hash (sha256 of the canonical msgpack of the same map, keys as written, validator keys
as bytes) is what peers compare in their handshake. Pure: parses text, opens no file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ehrnode.core import codec, crypto, tx
from ehrnode.core.errors import ConfigError, InvalidEncoding

# Integers in the genesis are hashed as msgpack, whose range ends at 2**64 - 1; the chain's
# heights and times are checked as below 2**63 everywhere else, so the same bound here.
_MAX_INT = (1 << 63) - 1
_VALIDATOR_FIELDS = {"key", "power", "name"}


@dataclass(frozen=True)
class Params:
    max_tx_bytes: int = tx.DEFAULT_MAX_TX_BYTES
    max_block_bytes: int = 8 * 1024 * 1024
    max_block_txs: int = 5000

    def to_wire(self) -> dict[str, int]:
        return {
            "max_tx_bytes": self.max_tx_bytes,
            "max_block_bytes": self.max_block_bytes,
            "max_block_txs": self.max_block_txs,
        }


@dataclass(frozen=True)
class ValidatorInfo:
    key: bytes
    power: int
    name: str


@dataclass(frozen=True)
class Genesis:
    chain_id: str
    genesis_time: int
    validators: tuple[ValidatorInfo, ...]
    params: Params = field(default_factory=Params)

    @property
    def powers(self) -> dict[bytes, int]:
        return {v.key: v.power for v in self.validators}

    def to_json_obj(self) -> dict[str, Any]:
        return {
            "chain_id": self.chain_id,
            "genesis_time": self.genesis_time,
            "validators": [
                {"key": v.key.hex(), "power": v.power, "name": v.name} for v in self.validators
            ],
            "params": self.params.to_wire(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_json_obj(), indent=2) + "\n"

    def hash(self) -> bytes:
        obj = self.to_json_obj()
        obj["validators"] = [
            {"key": v.key, "power": v.power, "name": v.name} for v in self.validators
        ]
        return crypto.sha256(codec.encode(obj))

    @classmethod
    def from_json(cls, text: str) -> Genesis:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"genesis is not valid JSON: {err}") from err
        return cls.from_json_obj(obj)

    @classmethod
    def from_json_obj(cls, obj: Any) -> Genesis:
        if not isinstance(obj, dict):
            raise ConfigError("genesis must be a JSON object")
        unknown = set(obj) - {"chain_id", "genesis_time", "validators", "params"}
        if unknown:
            raise ConfigError(f"genesis has unknown field(s): {', '.join(sorted(unknown))}")
        chain_id = obj.get("chain_id")
        if not isinstance(chain_id, str) or not tx.is_chain_id(chain_id):
            raise ConfigError(
                "genesis chain_id must be 1-64 characters of a-z, 0-9, '.', '_' or '-'"
            )
        genesis_time = obj.get("genesis_time")
        if (
            not isinstance(genesis_time, int)
            or isinstance(genesis_time, bool)
            or not 0 <= genesis_time <= _MAX_INT
        ):
            raise ConfigError("genesis genesis_time must be milliseconds since the epoch")
        raw_validators = obj.get("validators")
        if not isinstance(raw_validators, list) or not 1 <= len(raw_validators) <= 100:
            raise ConfigError("genesis validators must be a list of 1 to 100 entries")
        validators = []
        for i, item in enumerate(raw_validators):
            if not isinstance(item, dict) or not {"key", "power"} <= set(item):
                raise ConfigError(f"genesis validator {i} must have 'key' and 'power'")
            extra = set(item) - _VALIDATOR_FIELDS
            if extra:
                raise ConfigError(
                    f"genesis validator {i} has unknown field(s): {', '.join(sorted(extra))}"
                )
            try:
                key = crypto.from_hex(str(item["key"]), what=f"genesis validator {i} key")
            except InvalidEncoding as err:
                raise ConfigError(str(err)) from err
            power = item["power"]
            if not isinstance(power, int) or isinstance(power, bool) or not 1 <= power <= 1000:
                raise ConfigError(f"genesis validator {i} power must be an integer from 1 to 1000")
            name = item.get("name", "")
            if not isinstance(name, str) or len(name) > tx.MAX_NAME_CHARS:
                raise ConfigError(f"genesis validator {i} name must be a short string")
            validators.append(ValidatorInfo(key, power, name))
        if len({v.key for v in validators}) != len(validators):
            raise ConfigError("genesis names a validator key twice")
        raw_params = obj.get("params", {})
        if not isinstance(raw_params, dict):
            raise ConfigError("genesis params must be an object")
        known = Params().to_wire()
        unknown = set(raw_params) - set(known)
        if unknown:
            raise ConfigError(f"genesis params has unknown field(s): {', '.join(sorted(unknown))}")
        for name, value in raw_params.items():
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= _MAX_INT:
                raise ConfigError(f"genesis param {name} must be a positive integer below 2^63")
        params = Params(**{**known, **raw_params})
        if params.max_tx_bytes > params.max_block_bytes:
            raise ConfigError("genesis max_tx_bytes must not exceed max_block_bytes")
        return cls(chain_id, genesis_time, tuple(validators), params)
