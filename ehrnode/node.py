"""A node: creates the parts and connects them. It holds no logic of its own.

rpc / p2p  ->  admission  ->  mempool  ->  consensus driver  ->  core.state  ->  store
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any

from aiohttp import web

from ehrnode import config as cfg
from ehrnode.admission import Admission
from ehrnode.blobs.erasure import Eraser
from ehrnode.blobs.relay import BlobRelay
from ehrnode.blobs.replication import Replication, default_quorum
from ehrnode.blobs.store import BlobStore
from ehrnode.consensus.driver import Driver
from ehrnode.consensus.engine import STEP_NAMES, Timeouts
from ehrnode.consensus.evidence import EvidenceReporter
from ehrnode.consensus.execution import Executor, next_context
from ehrnode.core.crypto import Identity
from ehrnode.core.errors import ConfigError
from ehrnode.core.genesis import Genesis
from ehrnode.keys import load_identity
from ehrnode.mempool import Limits, Mempool
from ehrnode.metrics import NodeMetrics
from ehrnode.p2p.gossip import ConsensusGossip, TxGossip
from ehrnode.p2p.switch import Switch
from ehrnode.p2p.sync import BlockSync
from ehrnode.rpc.server import Api
from ehrnode.store.access import AccessLog
from ehrnode.store.chain import Chain
from ehrnode.store.db import KV, LevelKV

log = logging.getLogger(__name__)
STOP_TIMEOUT = 10.0
# The claim filter's slices while block sync waits for it: long enough that the filling goes
# at nearly full speed, short enough that an RPC request waits little.
HURRIED_FILL_S = 0.02


def now_ms() -> int:
    return int(time.time() * 1000)


class Node:
    def __init__(self, config: cfg.NodeConfig) -> None:
        self.config = config
        self.genesis = Genesis.from_json(_read(config.genesis_path, "genesis"))
        self.identity: Identity = load_identity(config.key_path)
        self.kv: KV | None = None
        self.switch: Switch | None = None
        self._runner: web.AppRunner | None = None
        self._filling: asyncio.Task[None] | None = None
        self._hurry_filling = False  # set by block sync: fill in slices of HURRIED_FILL_S
        self.rpc_port: int | None = None

    async def start(self) -> None:
        c = self.config
        self.kv = kv = LevelKV(c.data_dir)
        try:
            self.chain = chain = Chain(kv, self.genesis, c.blocks_dir)
            self.blobs = blobs = BlobStore(c.blobs_dir, kv, max_blob_bytes=c.rpc.max_blob_bytes)
            self.mempool = mempool = Mempool(
                chain.state,
                lambda: next_context(chain, now_ms()),
                Limits(max_txs=c.mempool.max_txs, max_bytes=c.mempool.max_bytes),
            )
            self.executor = executor = Executor(chain, mempool, now_ms)
            timeouts = Timeouts(
                propose=c.consensus.timeout_propose_s,
                propose_delta=c.consensus.timeout_propose_delta_s,
                prevote=c.consensus.timeout_vote_s,
                prevote_delta=c.consensus.timeout_vote_delta_s,
                precommit=c.consensus.timeout_vote_s,
                precommit_delta=c.consensus.timeout_vote_delta_s,
                rebroadcast=c.consensus.rebroadcast_s,
            )
            self.switch = switch = Switch(self.identity, self.genesis, c.p2p)
            switch.allowed = lambda key: key in chain.validators()
            gossip = ConsensusGossip(switch, self.genesis.params.max_block_bytes)
            self.driver = driver = Driver(self.identity, executor, gossip, timeouts)
            gossip.driver = driver
            self.admission = admission = Admission(chain, mempool, blobs, driver.txs_available)
            TxGossip(switch, admission)
            driver.evidence_listeners.append(EvidenceReporter(self.identity, admission).report)
            self.sync = BlockSync(
                switch, chain, driver, c.p2p.max_message_bytes, prepare=self._claims_filled
            )
            self.replication = replication = Replication(
                switch,
                blobs,
                kv,
                quorum=lambda: c.blobs.write_quorum or default_quorum(len(chain.validators())),
                replicate=c.blobs.replicate,
            )
            replication.is_validator = lambda key: key in chain.validators()
            replication.sweep.catch_up = self.sync
            replication.relay = BlobRelay(switch, blobs, replication.stored, c.blobs.replicate)
            self.access = access = AccessLog(kv, self.identity)
            self.metrics = metrics = NodeMetrics()
            eraser = Eraser(chain, blobs)
            swept = eraser.sweep()
            if swept:
                log.info("deleted the ciphertext of %d records erased before a crash", swept)
            driver.listeners += [
                admission.on_commit,
                eraser.on_commit,
                replication.on_commit,
                metrics.on_commit,
            ]
            self.api = Api(
                config=c.rpc,
                identity=self.identity,
                chain=chain,
                driver=driver,
                admission=admission,
                blobs=blobs,
                access=access,
                replication=replication,
                status_extra=self._status,
                metrics=self._render_metrics,
                high_water=c.mempool.high_water,
            )
            recovered = replication.recover(chain)
            if recovered:
                log.info("%d committed records' ciphertext to fetch after a crash", recovered)
            await switch.start()
            replication.start()
            await driver.start()
            await self._serve_rpc()
            self._filling = asyncio.create_task(self._fill_claims())
        except BaseException:
            await self.stop()
            raise
        log.info(
            "node %s (%s) serving chain %s at height %d; RPC on %s",
            self.config.moniker,
            self.identity.public_id[:16],
            self.genesis.chain_id,
            chain.head.height,
            self.rpc_url,
        )

    async def _fill_claims(self) -> None:
        """Fill the blob-claim filter from the database once the node serves, a chunk at a
        time between other work (``store.claims``): about 2 s of the event loop's time a
        million claims, in slices of half a millisecond, so that the requests that come
        in meanwhile wait little (2,048 claims a slice put a record list's p99 at 10 ms
        instead of 2.4 in the bench's first queries after a start). Once block sync asks
        for it (``_claims_filled``), in slices of ``HURRIED_FILL_S``."""
        started = turn = time.perf_counter()
        filling = self.chain.state.fill_claims()
        try:
            for _ in filling:
                if not self._hurry_filling or time.perf_counter() - turn >= HURRIED_FILL_S:
                    await asyncio.sleep(0)
                    turn = time.perf_counter()
        finally:
            filling.close()  # its database iterator with it, before the database closes
        claims = self.chain.state.claims.count
        log.info("claim filter filled: %d claims, %.2f s", claims, time.perf_counter() - started)

    async def _claims_filled(self) -> None:
        """Block sync waits here, before it applies blocks, until the claim filter is filled.
        Each record of a block asks whether its ciphertext is claimed already; until the
        filter is filled that is a LevelDB read, and during a catch-up the event loop turns
        so seldom (once or twice a block of a few thousand records) that a filling in
        half-millisecond slices would last the whole catch-up. Filled first, in 20 ms
        slices: the same work, done once, and the catch-up's reads of claims come from
        memory (the catching-up node's CPU a transaction, median of runs: 69 against 75
        us, docs/benchmarks.md note 53)."""
        filling = self._filling
        if filling is None or filling.done():
            return
        self._hurry_filling = True
        await asyncio.wait({filling})  # neither its failure nor our cancellation is its

    async def _serve_rpc(self) -> None:
        host, port = cfg.split_address(self.config.rpc.listen, "rpc.listen")
        self._runner = web.AppRunner(
            self.api.app(), access_log=None, handle_signals=False, shutdown_timeout=5.0
        )
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

    def _status(self) -> dict[str, Any]:
        assert self.switch is not None
        return {
            "p2p": self.switch.listen_address,
            "peers": [
                {"node": p.key.hex(), "address": p.address, "height": p.height}
                for p in self.switch.peers.values()
            ],
            "syncing": self.sync.syncing,
            "consensus": {
                "height": self.driver.engine.height,
                "round": self.driver.engine.round,
                "step": STEP_NAMES[self.driver.engine.step],
            },
            "write_quorum": self.replication.quorum,
            "blobs_missing": len(self.replication.missing),
        }

    def _render_metrics(self) -> bytes:
        self.metrics.mempool.set(len(self.mempool))
        if self.switch is not None:
            self.metrics.peers.set(len(self.switch.peers))
        return self.metrics.render()

    async def stop(self) -> None:
        """Stop serving, then consensus, then the network; each part gets a bounded time so
        one stuck part cannot keep the node (and its database) from closing."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await self._stop_part("rpc", runner.cleanup())
        driver = getattr(self, "driver", None)
        if driver is not None:
            await self._stop_part("consensus", driver.stop())
        for name in ("sync", "replication"):
            part = getattr(self, name, None)
            if part is not None:
                await self._stop_part(name, part.stop())
        if self.switch is not None:
            switch, self.switch = self.switch, None
            await self._stop_part("p2p", switch.stop())
        if self._filling is not None:
            filling, self._filling = self._filling, None
            filling.cancel()
            await asyncio.gather(filling, return_exceptions=True)
        if self.kv is not None:
            self.kv.close()  # waits for blob writes on the database's worker threads
            self.kv = None
            for part in (getattr(self, "blobs", None), getattr(self, "chain", None)):
                if part is not None:
                    part.close()

    async def _stop_part(self, name: str, stopping: Awaitable[None]) -> None:
        try:
            await asyncio.wait_for(stopping, STOP_TIMEOUT)
        except TimeoutError:
            log.error("%s did not stop within %s s; closing anyway", name, STOP_TIMEOUT)


def _read(path: Any, what: str) -> str:
    try:
        return str(path.read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"{what} file {path} does not exist") from err
    except OSError as err:
        raise ConfigError(f"cannot read {what} file {path}: {err}") from err
