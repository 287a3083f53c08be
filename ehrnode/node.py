"""A node: creates the parts and connects them. It holds no logic of its own.

rpc / p2p  ->  admission  ->  mempool  ->  consensus driver  ->  core.state  ->  store
"""

from __future__ import annotations

import logging
import time
from typing import Any

from aiohttp import web

from ehrnode import config as cfg
from ehrnode.admission import Admission
from ehrnode.blobs.erasure import Eraser
from ehrnode.blobs.store import BlobStore
from ehrnode.consensus.driver import Driver, Network, NullNetwork
from ehrnode.consensus.engine import Timeouts
from ehrnode.consensus.execution import Executor, next_context
from ehrnode.core.crypto import Identity
from ehrnode.core.errors import ConfigError
from ehrnode.core.genesis import Genesis
from ehrnode.keys import load_identity
from ehrnode.mempool import Limits, Mempool
from ehrnode.metrics import NodeMetrics
from ehrnode.rpc.server import Api
from ehrnode.store.access import AccessLog
from ehrnode.store.chain import Chain
from ehrnode.store.db import KV, LevelKV

log = logging.getLogger(__name__)


def now_ms() -> int:
    return int(time.time() * 1000)


class Node:
    def __init__(self, config: cfg.NodeConfig, *, network: Network | None = None) -> None:
        self.config = config
        self.genesis = Genesis.from_json(_read(config.genesis_path, "genesis"))
        self.identity: Identity = load_identity(config.key_path)
        self.network: Network = network or NullNetwork()
        self.kv: KV | None = None
        self._runner: web.AppRunner | None = None
        self.rpc_port: int | None = None

    @classmethod
    def from_home(cls, home: Any) -> Node:
        return cls(cfg.load(home))

    async def start(self) -> None:
        c = self.config
        self.kv = kv = LevelKV(c.data_dir)
        try:
            self.chain = chain = Chain(kv, self.genesis)
            self.blobs = blobs = BlobStore(c.blobs_dir, kv, max_blob_bytes=c.rpc.max_blob_bytes)
            self.mempool = mempool = Mempool(
                chain.state,
                lambda: next_context(chain, now_ms()),
                Limits(max_txs=c.mempool.max_txs, max_bytes=c.mempool.max_bytes),
            )
            self.executor = executor = Executor(chain, mempool, now_ms)
            validator = self.identity if self.identity.public_key in self.genesis.powers else None
            timeouts = Timeouts(
                propose=c.consensus.timeout_propose_s,
                propose_delta=c.consensus.timeout_propose_delta_s,
                prevote=c.consensus.timeout_vote_s,
                prevote_delta=c.consensus.timeout_vote_delta_s,
                precommit=c.consensus.timeout_vote_s,
                precommit_delta=c.consensus.timeout_vote_delta_s,
                rebroadcast=c.consensus.rebroadcast_s,
            )
            self.driver = driver = Driver(validator, executor, kv, self.network, timeouts)
            self.admission = admission = Admission(chain, mempool, blobs, driver.txs_available)
            self.access = access = AccessLog(kv, self.identity)
            self.metrics = metrics = NodeMetrics()
            eraser = Eraser(chain, blobs)
            swept = eraser.sweep()
            if swept:
                log.info("deleted the ciphertext of %d records erased before this start", swept)
            driver.listeners += [admission.on_commit, eraser.on_commit, metrics.on_commit]
            self.api = Api(
                config=c.rpc,
                identity=self.identity,
                chain=chain,
                driver=driver,
                admission=admission,
                blobs=blobs,
                access=access,
                metrics=self._render_metrics,
            )
            await driver.start()
            await self._serve_rpc()
        except BaseException:
            await self.stop()
            raise
        log.info(
            "node %s serving chain %s at height %d; RPC on %s",
            self.identity.public_id[:16],
            self.genesis.chain_id,
            chain.head.height,
            self.rpc_url,
        )

    async def _serve_rpc(self) -> None:
        host, port = cfg.split_address(self.config.rpc.listen, "rpc.listen")
        self._runner = web.AppRunner(self.api.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.rpc_port = sockets[0].getsockname()[1] if sockets else port

    @property
    def rpc_url(self) -> str:
        host, _ = cfg.split_address(self.config.rpc.listen)
        return f"http://{host}:{self.rpc_port}"

    def _render_metrics(self) -> bytes:
        self.metrics.mempool.set(len(self.mempool))
        return self.metrics.render()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        driver = getattr(self, "driver", None)
        if driver is not None:
            await driver.stop()
        if self.kv is not None:
            self.kv.close()
            self.kv = None


def _read(path: Any, what: str) -> str:
    try:
        return str(path.read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"{what} file {path} does not exist") from err
    except OSError as err:
        raise ConfigError(f"cannot read {what} file {path}: {err}") from err
