"""``scripts/testnet`` names the node that did not start and says why, from its log."""

from __future__ import annotations

from pathlib import Path

import pytest

from ehrnode import config as cfg, testnet
from ehrnode.core import codec
from ehrnode.core.errors import ConfigError
from ehrnode.core.genesis import Genesis
from ehrnode.store.chain import K_HEAD, Chain
from ehrnode.store.db import LevelKV
from ehrnode.testing import free_port


def test_a_node_that_cannot_start_is_named_with_the_reason(tmp_path: Path) -> None:
    rpc, p2p = free_port(), free_port()
    home = tmp_path / "node0"
    cfg.init_home(home, chain_id="tn-test", rpc=f"127.0.0.1:{rpc}", p2p=f"127.0.0.1:{p2p}")
    # A data directory an earlier ehrnode wrote (no state layout in its head record).
    genesis = Genesis.from_json((home / cfg.GENESIS_FILE).read_text())
    kv = LevelKV(home / "data")
    try:
        Chain(kv, genesis)
        head = codec.decode(kv.get(K_HEAD))
        del head["layout"]
        kv.write({K_HEAD: codec.encode(head)}, sync=True)
    finally:
        kv.close()
    entry = {
        "name": "node0",
        "home": str(home),
        "rpc": f"http://127.0.0.1:{rpc}",
        "p2p": f"127.0.0.1:{p2p}",
    }
    with pytest.raises(ConfigError) as caught:
        testnet.start({"nodes": [entry]}, timeout=60)
    message = str(caught.value)
    assert message.startswith("node0 did not start: ehrnode: this data directory holds state")
    assert "testnet --reset" in message
    assert str(home / "node.log") in message
