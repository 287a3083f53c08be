"""The example deployment files in configs/ load with the node's own parsers, and a bad
config is refused with an error naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ehrnode import config as cfg
from ehrnode.core.errors import ConfigError
from ehrnode.core.genesis import Genesis
from ehrnode.p2p.switch import parse_peer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_example_node_config_sets_every_section(tmp_path: Path) -> None:
    config = cfg.parse((CONFIGS / "node.toml").read_text(), tmp_path)
    assert config.rpc.listen == "0.0.0.0:8645"
    assert len(config.p2p.peers) == 3
    for peer in config.p2p.peers:
        parse_peer(peer)
    assert config.blobs.replicate and config.mempool.max_txs > 0
    assert config.memory.prefault_mb == 0  # the default: the heap grows as needed


def test_example_genesis_parses() -> None:
    genesis = Genesis.from_json((CONFIGS / "genesis.json").read_text())
    assert len(genesis.validators) == 4 and genesis.chain_id == "ehr-regional-1"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[rpc]\nlisten = 8645\n", "rpc.listen"),
        ("[rpc]\nlisen = '1:2'\n", "rpc.lisen"),
        ("[p2p]\npeers = 'x'\n", "p2p.peers"),
        ("log_level = 'loud'\n", "log_level"),
        ("[mempool]\nmax_txs = -1\n", "mempool.max_txs"),
        ("[rpc\n", "not valid TOML"),
        ("[memory]\nprefault_mb = -1\n", "memory.prefault_mb"),
        ("[memory]\nprefault_mb = 1025\n", "memory.prefault_mb must be at most 1024"),
        ("[memory]\nprefault_mb = '64'\n", "memory.prefault_mb"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        cfg.parse(text, tmp_path)


def test_memory_prefault_is_read_from_its_section(tmp_path: Path) -> None:
    assert cfg.parse("[memory]\nprefault_mb = 128\n", tmp_path).memory.prefault_mb == 128
    assert cfg.parse("", tmp_path).memory.prefault_mb == 0
