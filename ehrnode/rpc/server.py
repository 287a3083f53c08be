"""The HTTP API for clients (aiohttp). Endpoints and examples: docs/protocol.md, "RPC".

Every error is JSON ``{"error": {"code": "...", "message": "..."}}`` with one HTTP status
per error class (``core.errors``); an unexpected failure is logged here and reaches the
client as a bare 500 ``internal_error`` without a trace. Bodies are limited in size, batch
requests in count, and every client address in request rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
from aiohttp import web

from ehrnode.admission import Admission
from ehrnode.blobs.replication import Replication
from ehrnode.blobs.store import BlobStore
from ehrnode.config import RpcConfig
from ehrnode.consensus.driver import Driver
from ehrnode.core import codec, crypto, records, state, tx as txmod
from ehrnode.core.errors import (
    EhrError,
    InvalidEncoding,
    InvalidTransaction,
    NotFound,
    Unavailable,
)
from ehrnode.core.tx import Tx
from ehrnode.rpc import params, views
from ehrnode.rpc.authority import AuthorityApi
from ehrnode.rpc.content import ContentApi
from ehrnode.rpc.events import BlockEvents
from ehrnode.rpc.limits import Backlog, RateLimiter
from ehrnode.rpc.params import error_response, now_ms
from ehrnode.store.access import AccessLog
from ehrnode.store.chain import Chain

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MSGPACK = params.MSGPACK


class Api:
    """Request handlers; holds references to the node's parts, owns none of them."""

    def __init__(
        self,
        *,
        config: RpcConfig,
        identity: crypto.Identity,
        chain: Chain,
        driver: Driver,
        admission: Admission,
        blobs: BlobStore,
        access: AccessLog,
        replication: Replication | None = None,
        status_extra: Callable[[], dict[str, Any]] | None = None,
        metrics: Callable[[], bytes] | None = None,
        high_water: int = 0,
    ) -> None:
        self.config = config
        self.identity = identity
        self.chain = chain
        self.driver = driver
        self.admission = admission
        self.blobs = blobs
        self.access = access
        self.status_extra = status_extra
        self.metrics = metrics
        self.chain_id = chain.genesis.chain_id
        self.rate = RateLimiter(config.rate_per_s, burst=config.rate_per_s * 2)
        self.auth = params.RequestAuth(self.chain_id, self._registered)
        self.replication = replication
        self.content = ContentApi(
            config=config,
            identity=identity,
            chain=chain,
            mempool=admission.mempool,
            blobs=blobs,
            access=access,
            auth=self.auth,
            replication=replication,
        )
        self.events = BlockEvents()
        self.backlog = Backlog(lambda: len(admission.mempool), high_water)

    # --- application --------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.config.max_body_bytes,
            middlewares=[self._errors, self._limit_rate],
        )
        r = app.router
        r.add_post("/v1/txs", self.post_tx)
        r.add_post("/v1/txs/batch", self.post_batch)
        r.add_post("/v1/txs/wait", self.post_wait)
        r.add_get("/v1/txs/{id}", self.get_tx)
        r.add_get("/v1/txs/{id}/proof", self.get_proof)
        r.add_get("/v1/blocks/latest", self.get_latest_block)
        r.add_get("/v1/blocks/{height}", self.get_block)
        r.add_get("/v1/accounts/{key}", self.get_account)
        r.add_get("/v1/patients/{key}/records", self.get_patient_records)
        r.add_get("/v1/patients/{key}/grants", self.get_patient_grants)
        r.add_get("/v1/records/{id}", self.get_record)
        r.add_get("/v1/records/{id}/versions", self.get_record_versions)
        r.add_get("/v1/status", self.get_status)
        r.add_get("/v1/health", self.get_health)
        r.add_get("/v1/genesis", self.get_genesis)
        r.add_get("/v1/events", self.events.subscribe)
        r.add_get("/metrics", self.get_metrics)
        self.content.add_routes(app)
        AuthorityApi(self.chain).add_routes(app)
        self.driver.listeners += [self.events.publish, self.backlog.on_commit]
        app.on_shutdown.append(self.events.close)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        req = request
        try:
            return await handler(req)
        except EhrError as err:
            return error_response(err.http_status, err.code, err.message)
        except web.HTTPRequestEntityTooLarge:
            return error_response(
                413, "body_too_large", f"request body exceeds {self.config.max_body_bytes} bytes"
            )
        except web.HTTPException as err:
            if err.status >= 400:
                code = {404: "not_found", 405: "method_not_allowed"}.get(err.status, "bad_request")
                return error_response(err.status, code, err.reason)
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("internal error serving %s %s", req.method, req.path)
            return error_response(500, "internal_error", "the node failed to serve this request")

    @web.middleware
    async def _limit_rate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self.rate.allow(request.remote or "?"):
            return error_response(429, "rate_limited", "too many requests; slow down and retry")
        return await handler(request)

    def _mode(self, req: web.Request) -> str:
        mode = req.query.get("mode", "sync")
        if mode not in ("async", "sync", "commit"):
            raise InvalidEncoding("mode must be async, sync or commit")
        return mode

    # --- transactions -------------------------------------------------------------------

    async def post_tx(self, req: web.Request) -> web.Response:
        mode = self._mode(req)
        raw = await params.raw_body(req)
        async with self.backlog.room(1, self.config.commit_timeout_s):
            tx = self.admission.decode(raw)
            if mode != "async":
                short = await self._short_of_replicas([tx])
                if short:
                    raise self._replication_pending(min(short.values()))
            if mode == "async":
                asyncio.get_running_loop().call_soon(self._admit_quietly, tx)
                return web.json_response({"id": tx.id.hex(), "status": "received"}, status=202)
            self.admission.admit(tx)
        if mode == "sync":
            return web.json_response({"id": tx.id.hex(), "status": "pending"}, status=202)
        location = await self.admission.wait_committed(tx.id, self.config.commit_timeout_s)
        if location is None:
            return web.json_response({"id": tx.id.hex(), "status": "pending"}, status=202)
        return web.json_response(
            {
                "id": tx.id.hex(),
                "status": "committed",
                "height": location.height,
                "index": location.index,
            }
        )

    def _registered(self, key: bytes) -> bool:
        """Registered on chain, or about to be (its register is pending here)."""
        if self.chain.state.get(state.P_ACCT + key) is not None:
            return True
        return self.admission.mempool.check_state.get(state.P_ACCT + key) is not None

    async def _short_of_replicas(self, txs: list[Tx]) -> dict[bytes, int]:
        """Wait (up to the commit timeout) until a write quorum holds each record's
        ciphertext; return the blobs still short of it, with how many nodes hold them.

        A record is acknowledged only once that many nodes hold its ciphertext; a blob this
        node lacks altogether is left to admission, which refuses the record at once."""
        if self.replication is None:
            return {}
        replication = self.replication
        held = self.admission.blobs.has
        # A transaction missing a blob here is refused by admission at once: no waiting.
        wanted: set[bytes] = set()
        for t in txs:
            named = txmod.blobs_of(t.kind, t.body)
            if all(held(b) for b in named):
                wanted.update(named)
        blobs = list(wanted)
        if not blobs:
            return {}
        timeout = self.config.commit_timeout_s
        counts = await replication.wait_quorum(blobs, timeout)
        quorum = replication.quorum
        return {b: n for b, n in zip(blobs, counts, strict=True) if n < quorum}

    def _admit_one(self, item: Tx | EhrError, short: dict[bytes, int]) -> Tx | EhrError:
        if isinstance(item, EhrError):
            return item
        for blob in txmod.blobs_of(item.kind, item.body):
            if blob in short:
                return self._replication_pending(short[blob])
        try:
            self.admission.admit(item)
        except EhrError as err:
            return err
        return item

    def _replication_pending(self, holders: int) -> Unavailable:
        quorum = self.replication.quorum if self.replication is not None else 1
        return Unavailable(
            f"the record's ciphertext is held by {holders} node(s) and {quorum} are needed "
            "before the record is accepted; retry shortly",
            code="replication_pending",
        )

    def _admit_quietly(self, tx: Any) -> None:
        # A rejection is remembered in admission.rejected; GET /v1/txs/{id} reports it.
        with contextlib.suppress(EhrError):
            self.admission.admit(tx)

    async def post_batch(self, req: web.Request) -> web.Response:
        """A msgpack array of transactions, admitted in order; one result per transaction."""
        mode = self._mode(req)
        raw = await params.raw_body(req)
        try:
            items = msgpack.unpackb(raw, raw=False, max_array_len=self.config.max_batch_txs)
        except Exception as err:
            raise InvalidEncoding(
                f"a batch is a msgpack array of at most {self.config.max_batch_txs} "
                "transactions' bytes"
            ) from err
        if not isinstance(items, list) or not all(isinstance(i, bytes) for i in items):
            raise InvalidEncoding("a batch is a msgpack array of byte strings")
        results: list[dict[str, Any]] = []
        admitted: list[bytes] = []
        async with self.backlog.room(len(items), self.config.commit_timeout_s):
            decoded = await self.admission.decode_batch(items)
            short = await self._short_of_replicas([t for t in decoded if isinstance(t, Tx)])
            for item in decoded:
                outcome = self._admit_one(item, short)
                if isinstance(outcome, EhrError):
                    results.append(
                        {"status": "rejected", "code": outcome.code, "message": outcome.message}
                    )
                    continue
                admitted.append(outcome.id)
                results.append({"id": outcome.id.hex(), "status": "pending"})
        if mode == "commit" and admitted:
            deadline = self.config.commit_timeout_s
            locations = await asyncio.gather(
                *(self.admission.wait_committed(i, deadline) for i in admitted),
                return_exceptions=True,
            )
            by_id = dict(zip(admitted, locations, strict=True))
            for result in results:
                if result["status"] != "pending":
                    continue
                location = by_id[bytes.fromhex(result["id"])]
                if isinstance(location, EhrError):
                    result.update(status="rejected", code=location.code, message=location.message)
                elif location is not None and not isinstance(location, BaseException):
                    result.update(status="committed", height=location.height, index=location.index)
        return web.json_response({"results": results})

    async def post_wait(self, req: web.Request) -> web.Response:
        """Wait until each of these transactions (a msgpack array of ids) is committed, or
        rejected, or ``timeout`` seconds pass; one result per id, in order."""
        raw = await params.raw_body(req)
        try:
            ids = msgpack.unpackb(raw, raw=False, max_array_len=self.config.max_batch_txs)
        except Exception as err:
            raise InvalidEncoding("send a msgpack array of transaction ids") from err
        if not isinstance(ids, list) or not all(isinstance(i, bytes) and len(i) == 32 for i in ids):
            raise InvalidEncoding("send a msgpack array of 32-byte transaction ids")
        timeout = float(params.int_query(req, "timeout", int(self.config.commit_timeout_s), 0, 600))
        outcomes = await asyncio.gather(
            *(self.admission.wait_committed(i, timeout) for i in ids), return_exceptions=True
        )
        results: list[dict[str, Any]] = []
        for tx_id, outcome in zip(ids, outcomes, strict=True):
            if isinstance(outcome, EhrError):
                results.append(
                    {
                        "id": tx_id.hex(),
                        "status": "rejected",
                        "code": outcome.code,
                        "message": outcome.message,
                    }
                )
            elif isinstance(outcome, BaseException) or outcome is None:
                known = tx_id in self.admission.mempool
                results.append({"id": tx_id.hex(), "status": "pending" if known else "unknown"})
            else:
                results.append(
                    {
                        "id": tx_id.hex(),
                        "status": "committed",
                        "height": outcome.height,
                        "index": outcome.index,
                    }
                )
        return web.json_response({"results": results})

    async def get_tx(self, req: web.Request) -> web.Response:
        tx_id = params.tx_id(req)
        location = self.chain.tx_location(tx_id)
        if location is not None:
            raw, _ = self.chain.tx_raw(tx_id)
            return web.json_response(
                {
                    "id": tx_id.hex(),
                    "status": "committed",
                    "height": location.height,
                    "index": location.index,
                    "tx": views.tx_view(self.admission.decode(raw)),
                }
            )
        pending = self.admission.mempool.get(tx_id)
        if pending is not None:
            return web.json_response(
                {"id": tx_id.hex(), "status": "pending", "tx": views.tx_view(pending)}
            )
        waiting = self.admission.mempool.waiting(tx_id)
        if waiting is not None:
            return web.json_response(
                {
                    "id": tx_id.hex(),
                    "status": "pending",
                    "waiting": "for the signer's earlier nonces to arrive",
                    "tx": views.tx_view(waiting),
                }
            )
        rejection = self.admission.rejected.get(tx_id)
        if rejection is not None:
            return web.json_response(
                {
                    "id": tx_id.hex(),
                    "status": "rejected",
                    "code": rejection.code,
                    "message": rejection.message,
                }
            )
        raise NotFound("this node knows no transaction with that id", code="unknown_tx")

    async def get_proof(self, req: web.Request) -> web.Response:
        proof = self.chain.inclusion_proof(params.tx_id(req))
        if req.query.get("format") == "msgpack":
            return web.Response(body=codec.encode(proof.to_wire()), content_type=MSGPACK)
        return web.json_response(views.proof_view(proof))

    # --- blocks -------------------------------------------------------------------------

    async def get_latest_block(self, req: web.Request) -> web.Response:
        height = self.chain.head.height
        if height == 0:
            raise NotFound("no block has been committed yet", code="no_blocks")
        return self._block_response(req, height)

    async def get_block(self, req: web.Request) -> web.Response:
        try:
            height = int(req.match_info["height"])
        except ValueError as err:
            raise InvalidEncoding("block height must be an integer") from err
        if height < 1:
            raise InvalidEncoding("block heights start at 1")
        return self._block_response(req, height)

    def _block_response(self, req: web.Request, height: int) -> web.Response:
        if req.query.get("format") == "msgpack":
            raw = self.chain.block_raw(height)
            cert = self.chain.certificate(height).encode()
            return web.Response(
                body=codec.encode({"block": raw, "certificate": cert}), content_type=MSGPACK
            )
        block = self.chain.block(height)
        return web.json_response(views.block_view(block, self.chain.certificate(height)))

    # --- accounts, records, grants ------------------------------------------------------

    async def get_account(self, req: web.Request) -> web.Response:
        key = params.key(req)
        account = self.chain.load_state(state.P_ACCT + key)
        view = views.account_view(key, account)
        view["next_nonce"] = self._next_nonce(key, account)
        return web.json_response(view)

    def _next_nonce(self, key: bytes, account: dict[str, Any] | None) -> int:
        pending = state.load(self.admission.mempool.check_state, state.P_ACCT + key)
        source = pending if pending is not None else account
        return 1 if source is None else int(source["nonce"]) + 1

    async def get_patient_records(self, req: web.Request) -> web.Response:
        key = params.key(req)
        limit = params.int_query(req, "limit", 100, 1, views.MAX_PAGE)
        after = params.int_query(req, "after", -1, -1, 1 << 62)
        resource_type = req.query.get("type")
        page, cursor = views.patient_records(
            self.chain, key, after=after, limit=limit, resource_type=resource_type
        )
        return web.json_response({"patient": key.hex(), "records": page, "next": cursor})

    async def get_patient_grants(self, req: web.Request) -> web.Response:
        key = params.key(req)
        grants = views.patient_grants(self.chain, key, now_ms())
        return web.json_response({"patient": key.hex(), "grants": grants})

    async def get_record(self, req: web.Request) -> web.Response:
        record_id = params.tx_id(req)
        return web.json_response(
            views.record_view(record_id, views.committed_record(self.chain, record_id))
        )

    async def get_record_versions(self, req: web.Request) -> web.Response:
        record_id = params.tx_id(req)
        root_id = records.root_of(record_id, views.committed_record(self.chain, record_id))
        return web.json_response({"versions": views.record_versions(self.chain, root_id)})

    # --- node ---------------------------------------------------------------------------

    async def get_status(self, req: web.Request) -> web.Response:
        head = self.chain.head
        body: dict[str, Any] = {
            "chain_id": self.chain_id,
            "genesis_hash": self.chain.genesis.hash().hex(),
            "node": self.identity.public_id,
            "validator": self.identity.public_key in state.validators(self.chain.state),
            "height": head.height,
            "head": head.id.hex(),
            "time": head.time,
            "state_hash": head.state_hash.hex(),
            "mempool": len(self.admission.mempool),
            "clients_waiting": self.backlog.waiting,
            "validators": [
                {"key": k.hex(), "power": p} for k, p in state.validators(self.chain.state).items()
            ],
        }
        if self.status_extra is not None:
            body.update(self.status_extra())
        return web.json_response(body)

    async def get_health(self, req: web.Request) -> web.Response:
        return web.json_response({"ok": True, "height": self.chain.head.height})

    async def get_genesis(self, req: web.Request) -> web.Response:
        return web.Response(text=self.chain.genesis.to_json(), content_type="application/json")

    async def get_metrics(self, req: web.Request) -> web.Response:
        if self.metrics is None:
            raise NotFound("metrics are not enabled on this node")
        return web.Response(body=self.metrics(), content_type="text/plain", charset="utf-8")


__all__ = ["Api", "InvalidTransaction"]
