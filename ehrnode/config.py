"""A node's home directory and its config file.

    <home>/config.toml     settings (below); every key optional, unknown keys are errors
    <home>/genesis.json    the network's genesis (core.genesis)
    <home>/node_key.json   this node's identity (keys.py); a validator's key is in genesis
    <home>/data/           the LevelDB database
    <home>/blobs/          large ciphertext blobs

Every setting, its type and default is in the dataclasses below; ``configs/node.toml`` is
a commented example. A bad file gives a ConfigError that names the file, the key and what
is expected.
"""

from __future__ import annotations

import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ehrnode.core.crypto import Identity
from ehrnode.core.errors import ConfigError
from ehrnode.core.genesis import Genesis, ValidatorInfo
from ehrnode.keys import save_identity
from ehrnode.process import MAX_PREFAULT_MIB

CONFIG_FILE = "config.toml"
GENESIS_FILE = "genesis.json"
KEY_FILE = "node_key.json"


@dataclass(frozen=True)
class RpcConfig:
    listen: str = "127.0.0.1:8645"
    max_body_bytes: int = 16 * 1024 * 1024
    max_blob_bytes: int = 8 * 1024**3
    max_batch_txs: int = 10_000
    rate_per_s: float = 20_000.0
    commit_timeout_s: float = 30.0


@dataclass(frozen=True)
class P2pConfig:
    listen: str = "127.0.0.1:8646"
    peers: tuple[str, ...] = ()
    max_message_bytes: int = 32 * 1024 * 1024
    rate_per_s: float = 20_000.0


@dataclass(frozen=True)
class ConsensusConfig:
    timeout_propose_s: float = 3.0
    timeout_propose_delta_s: float = 0.5
    timeout_vote_s: float = 0.5
    timeout_vote_delta_s: float = 0.5
    rebroadcast_s: float = 1.0


@dataclass(frozen=True)
class MempoolConfig:
    max_txs: int = 100_000
    max_bytes: int = 256 * 1024 * 1024
    high_water: int = 8_000  # clients' transactions wait while more are pending; 0: never


@dataclass(frozen=True)
class BlobsConfig:
    write_quorum: int = 0  # 0 means f+1 of the validators
    replicate: bool = True


@dataclass(frozen=True)
class MemoryConfig:
    prefault_mb: int = 0  # heap faulted in at start and kept (``process.prefault_heap``)


@dataclass(frozen=True)
class NodeConfig:
    home: Path
    moniker: str = "ehrnode"
    log_level: str = "info"
    rpc: RpcConfig = field(default_factory=RpcConfig)
    p2p: P2pConfig = field(default_factory=P2pConfig)
    consensus: ConsensusConfig = field(default_factory=ConsensusConfig)
    mempool: MempoolConfig = field(default_factory=MempoolConfig)
    blobs: BlobsConfig = field(default_factory=BlobsConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    @property
    def genesis_path(self) -> Path:
        return self.home / GENESIS_FILE

    @property
    def key_path(self) -> Path:
        return self.home / KEY_FILE

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def blobs_dir(self) -> Path:
        return self.home / "blobs"

    @property
    def blocks_dir(self) -> Path:
        return self.home / "blocks"


_SECTIONS: dict[str, type] = {
    "rpc": RpcConfig,
    "p2p": P2pConfig,
    "consensus": ConsensusConfig,
    "mempool": MempoolConfig,
    "blobs": BlobsConfig,
    "memory": MemoryConfig,
}
_TOP = {"moniker": str, "log_level": str}
_LOG_LEVELS = ("debug", "info", "warning", "error")


def _coerce(where: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false")
        return value
    if isinstance(default, int):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{where} must be a non-negative integer")
        return value
    if isinstance(default, float):
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{where} must be a positive number")
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of strings")
        return tuple(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string")
    return value


def parse(text: str, home: Path, source: str = CONFIG_FILE) -> NodeConfig:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source} is not valid TOML: {err}") from err
    top: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [{key}] must be a table")
            cls = _SECTIONS[key]
            defaults = cls()
            known = defaults.__dataclass_fields__
            fields = {}
            for name, item in value.items():
                if name not in known:
                    raise ConfigError(
                        f"{source}: unknown setting {key}.{name} (known: {', '.join(known)})"
                    )
                fields[name] = _coerce(f"{source}: {key}.{name}", item, getattr(defaults, name))
            sections[key] = cls(**fields)
        elif key in _TOP:
            top[key] = _coerce(f"{source}: {key}", value, "")
        else:
            raise ConfigError(f"{source}: unknown setting '{key}'")
    config = NodeConfig(home=home, **top, **sections)
    if config.log_level not in _LOG_LEVELS:
        raise ConfigError(f"{source}: log_level must be one of {', '.join(_LOG_LEVELS)}")
    if config.memory.prefault_mb > MAX_PREFAULT_MIB:  # what glibc's mallopt can keep
        raise ConfigError(f"{source}: memory.prefault_mb must be at most {MAX_PREFAULT_MIB}")
    for where, address in (("rpc.listen", config.rpc.listen), ("p2p.listen", config.p2p.listen)):
        split_address(address, f"{source}: {where}")
    return config


def split_address(address: str, where: str = "address") -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where} must be host:port, got '{address}'")
    return host, int(port)


def load(home: Path) -> NodeConfig:
    path = home / CONFIG_FILE
    if not home.is_dir():
        raise ConfigError(f"node home {home} does not exist; create it with 'ehrnode init'")
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = ""
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err}") from err
    return parse(text, home, str(path))


def render(config: NodeConfig) -> str:
    """A config file with this config's values (what ``ehrnode init`` writes)."""
    peers = ", ".join(f'"{p}"' for p in config.p2p.peers)
    return (
        "# ehrnode node configuration; see configs/node.toml for every setting.\n"
        f'moniker = "{config.moniker}"\n'
        f'log_level = "{config.log_level}"\n\n'
        "[rpc]\n"
        f'listen = "{config.rpc.listen}"\n\n'
        "[p2p]\n"
        f'listen = "{config.p2p.listen}"\n'
        f"peers = [{peers}]\n"
    )


def init_home(
    home: Path,
    *,
    chain_id: str = "ehr-local",
    genesis: Genesis | None = None,
    identity: Identity | None = None,
    rpc: str = "127.0.0.1:8645",
    p2p: str = "127.0.0.1:8646",
    peers: tuple[str, ...] = (),
    moniker: str = "ehrnode",
) -> Identity:
    """Create a node home: key, config and (unless given) a one-validator genesis."""
    if (home / KEY_FILE).exists():
        raise ConfigError(f"{home} already holds a node; refusing to overwrite it")
    home.mkdir(parents=True, exist_ok=True)
    identity = identity or Identity.generate()
    save_identity(identity, home / KEY_FILE)
    if genesis is None:
        genesis = Genesis(
            chain_id=chain_id,
            genesis_time=int(time.time() * 1000),
            validators=(ValidatorInfo(identity.public_key, 1, moniker),),
        )
    (home / GENESIS_FILE).write_text(genesis.to_json())
    node_config = NodeConfig(
        home=home,
        moniker=moniker,
        rpc=RpcConfig(listen=rpc),
        p2p=P2pConfig(listen=p2p, peers=peers),
    )
    (home / CONFIG_FILE).write_text(render(node_config))
    return identity
