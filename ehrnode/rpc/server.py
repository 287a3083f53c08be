"""The HTTP API for clients (aiohttp). Endpoints and examples: docs/protocol.md, "RPC".

Every error is JSON ``{"error": {"code": "...", "message": "..."}}`` with one HTTP status
per error class (``core.errors``); an unexpected failure is logged here and reaches the
client as a bare 500 ``internal_error`` without a trace. Bodies are limited in size, batch
requests in count, and every client address in request rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
from aiohttp import web

from ehrnode.admission import Admission
from ehrnode.blobs.store import BlobStore, parse_hash
from ehrnode.config import RpcConfig
from ehrnode.consensus.driver import Committed, Driver
from ehrnode.core import codec, crypto, request, state
from ehrnode.core.errors import (
    EhrError,
    InvalidEncoding,
    InvalidTransaction,
    LimitExceeded,
    NotAuthorised,
    NotFound,
)
from ehrnode.rpc import views
from ehrnode.rpc.limits import RateLimiter, ReplayCache
from ehrnode.store.access import AccessLog
from ehrnode.store.chain import Chain

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MSGPACK = "application/msgpack"


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def now_ms() -> int:
    return int(time.time() * 1000)


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
        status_extra: Callable[[], dict[str, Any]] | None = None,
        metrics: Callable[[], bytes] | None = None,
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
        self.replay = ReplayCache(request.MAX_SKEW_MS * 2)
        self._events: set[web.WebSocketResponse] = set()

    # --- application --------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.config.max_body_bytes,
            middlewares=[self._errors, self._limit_rate],
        )
        r = app.router
        r.add_post("/v1/txs", self.post_tx)
        r.add_post("/v1/txs/batch", self.post_batch)
        r.add_get("/v1/txs/{id}", self.get_tx)
        r.add_get("/v1/txs/{id}/proof", self.get_proof)
        r.add_get("/v1/blocks/latest", self.get_latest_block)
        r.add_get("/v1/blocks/{height}", self.get_block)
        r.add_get("/v1/accounts/{key}", self.get_account)
        r.add_get("/v1/patients/{key}/records", self.get_patient_records)
        r.add_get("/v1/patients/{key}/grants", self.get_patient_grants)
        r.add_get("/v1/patients/{key}/access-log", self.get_access_log)
        r.add_get("/v1/records/{id}", self.get_record)
        r.add_get("/v1/records/{id}/versions", self.get_record_versions)
        r.add_get("/v1/records/{id}/content", self.get_record_content)
        r.add_put("/v1/blobs/{hash}", self.put_blob)
        r.add_post("/v1/blobs", self.post_blobs)
        r.add_route("HEAD", "/v1/blobs/{hash}", self.head_blob)
        r.add_get("/v1/status", self.get_status)
        r.add_get("/v1/health", self.get_health)
        r.add_get("/v1/genesis", self.get_genesis)
        r.add_get("/v1/events", self.events)
        r.add_get("/metrics", self.get_metrics)
        self.driver.listeners.append(self._publish)
        app.on_shutdown.append(self._close_events)
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

    # --- helpers ------------------------------------------------------------------------

    def _key(self, req: web.Request, name: str = "key") -> bytes:
        return crypto.from_hex(req.match_info[name], what=name)

    def _id(self, req: web.Request, name: str = "id") -> bytes:
        return crypto.from_hex(req.match_info[name], what=f"{name} (a 64-hex transaction id)")

    def _int_query(self, req: web.Request, name: str, default: int, lo: int, hi: int) -> int:
        raw = req.query.get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError as err:
            raise InvalidEncoding(f"query parameter {name} must be an integer") from err
        if not lo <= value <= hi:
            raise InvalidEncoding(f"query parameter {name} must be from {lo} to {hi}")
        return value

    def _signed(self, req: web.Request, body: bytes | None = None) -> request.SignedRequest:
        signed = request.verify(
            req.headers.get("Authorization"),
            self.chain_id,
            req.method,
            req.path_qs,
            now_ms(),
            body,
        )
        if not self.replay.add(signed.nonce, signed.ts):
            raise NotAuthorised("this signed request was already used", code="replayed_request")
        return signed

    async def _raw_body(self, req: web.Request) -> bytes:
        if req.content_type not in (MSGPACK, "application/octet-stream"):
            raise InvalidEncoding(f"send the body as {MSGPACK}")
        return await req.read()

    def _mode(self, req: web.Request) -> str:
        mode = req.query.get("mode", "sync")
        if mode not in ("async", "sync", "commit"):
            raise InvalidEncoding("mode must be async, sync or commit")
        return mode

    # --- transactions -------------------------------------------------------------------

    async def post_tx(self, req: web.Request) -> web.Response:
        mode = self._mode(req)
        raw = await self._raw_body(req)
        tx = self.admission.decode(raw)
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

    def _admit_quietly(self, tx: Any) -> None:
        # A rejection is remembered in admission.rejected; GET /v1/txs/{id} reports it.
        with contextlib.suppress(EhrError):
            self.admission.admit(tx)

    async def post_batch(self, req: web.Request) -> web.Response:
        """A msgpack array of transactions, admitted in order; one result per transaction."""
        mode = self._mode(req)
        raw = await self._raw_body(req)
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
        for item in items:
            try:
                tx = self.admission.submit(item)
            except EhrError as err:
                results.append({"status": "rejected", "code": err.code, "message": err.message})
                continue
            admitted.append(tx.id)
            results.append({"id": tx.id.hex(), "status": "pending"})
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

    async def get_tx(self, req: web.Request) -> web.Response:
        tx_id = self._id(req)
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
        proof = self.chain.inclusion_proof(self._id(req))
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
        key = self._key(req)
        account = self.chain.load_state(state.P_ACCT + key)
        view = views.account_view(key, account)
        view["next_nonce"] = self._next_nonce(key, account)
        return web.json_response(view)

    def _next_nonce(self, key: bytes, account: dict[str, Any] | None) -> int:
        pending = state.load(self.admission.mempool.check_state, state.P_ACCT + key)
        source = pending if pending is not None else account
        return 1 if source is None else int(source["nonce"]) + 1

    async def get_patient_records(self, req: web.Request) -> web.Response:
        key = self._key(req)
        limit = self._int_query(req, "limit", 100, 1, views.MAX_PAGE)
        after = self._int_query(req, "after", -1, -1, 1 << 62)
        resource_type = req.query.get("type")
        records, cursor = views.patient_records(
            self.chain, key, after=after, limit=limit, resource_type=resource_type
        )
        return web.json_response({"patient": key.hex(), "records": records, "next": cursor})

    async def get_patient_grants(self, req: web.Request) -> web.Response:
        key = self._key(req)
        grants = views.patient_grants(self.chain, key, now_ms())
        return web.json_response({"patient": key.hex(), "grants": grants})

    def _record(self, record_id: bytes) -> dict[str, Any]:
        record = self.chain.load_state(state.P_REC + record_id)
        if record is None:
            raise NotFound("no committed record has that id", code="unknown_record")
        return record  # type: ignore[no-any-return]

    async def get_record(self, req: web.Request) -> web.Response:
        record_id = self._id(req)
        return web.json_response(views.record_view(record_id, self._record(record_id)))

    async def get_record_versions(self, req: web.Request) -> web.Response:
        record = self._record(self._id(req))
        return web.json_response({"versions": views.record_versions(self.chain, record["root"])})

    async def get_record_content(self, req: web.Request) -> web.StreamResponse:
        """The ciphertext and the reader's wrapped key, for a signed, authorised reader."""
        signed = self._signed(req)
        record_id = self._id(req)
        record = self._record(record_id)
        if record["erased"]:
            return error_response(
                410,
                "record_erased",
                f"the patient erased this record at height {record.get('erased_at')}; "
                "only its hash remains",
            )
        now = now_ms()
        if not state.may_read(self.chain.state, record_id, signed.key, now):
            raise NotAuthorised(
                "the patient has not granted this key access to this record", code="not_granted"
            )
        info = self.blobs.info(record["blob"])
        if info is None:
            raise NotFound("this node does not hold the record's ciphertext", code="blob_missing")
        wrapped = self.chain.state.get(state.P_KEY + record_id + signed.key)
        await asyncio.to_thread(
            self.access.append, record["patient"], signed.key, record_id, signed.sig, now
        )
        response = web.StreamResponse(
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(info.size),
                "Ehr-Record-Type": record["type"],
                "Ehr-Wrapped-Key": "" if wrapped is None else wrapped.hex(),
            }
        )
        await response.prepare(req)
        async for chunk in self.blobs.read_stream(record["blob"]):
            await response.write(chunk)
        await response.write_eof()
        return response

    async def get_access_log(self, req: web.Request) -> web.Response:
        signed = self._signed(req)
        patient = self._key(req)
        if signed.key != patient:
            raise NotAuthorised("only the patient can read their access log", code="not_patient")
        after = self._int_query(req, "after", -1, -1, 1 << 62)
        limit = self._int_query(req, "limit", 100, 1, views.MAX_PAGE)
        entries = self.access.entries(patient, after=after, limit=limit)
        return web.json_response({"patient": patient.hex(), "entries": views.hexify(entries)})

    # --- blobs --------------------------------------------------------------------------

    async def put_blob(self, req: web.Request) -> web.Response:
        signed = self._signed(req)
        self._require_registered(signed.key)
        expected = parse_hash(req.match_info["hash"])
        info = await self.blobs.put_stream(
            req.content.iter_chunked(256 * 1024), expected, req.content_length
        )
        return web.json_response({"hash": info.hash.hex(), "size": info.size}, status=201)

    async def post_blobs(self, req: web.Request) -> web.Response:
        """Many small blobs at once: a msgpack array of byte strings, one synced write."""
        raw = await self._raw_body(req)
        signed = self._signed(req, raw)
        self._require_registered(signed.key)
        try:
            items = msgpack.unpackb(raw, raw=False, max_array_len=self.config.max_batch_txs)
        except Exception as err:
            raise InvalidEncoding("a blob batch is a msgpack array of byte strings") from err
        if not isinstance(items, list) or not all(isinstance(i, bytes) for i in items):
            raise InvalidEncoding("a blob batch is a msgpack array of byte strings")
        hashes = await asyncio.to_thread(self.blobs.put_many, items)
        return web.json_response({"hashes": [h.hex() for h in hashes]}, status=201)

    def _require_registered(self, key: bytes) -> None:
        account = self.chain.load_state(state.P_ACCT + key)
        pending = state.load(self.admission.mempool.check_state, state.P_ACCT + key)
        if account is None and pending is None:
            raise NotAuthorised(
                "only registered identities may upload ciphertext", code="unregistered_signer"
            )

    async def head_blob(self, req: web.Request) -> web.Response:
        info = self.blobs.info(parse_hash(req.match_info["hash"]))
        if info is None:
            return web.Response(status=404)
        return web.Response(status=200, headers={"Ehr-Blob-Size": str(info.size)})

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

    # --- events -------------------------------------------------------------------------

    async def events(self, req: web.Request) -> web.WebSocketResponse:
        """A websocket of committed blocks: {"type": "block", "height", "id", "txs": [...]}."""
        if len(self._events) >= 256:
            raise LimitExceeded("too many event subscribers on this node")
        ws = web.WebSocketResponse(heartbeat=20, max_msg_size=4096)
        await ws.prepare(req)
        self._events.add(ws)
        try:
            async for _message in ws:
                pass  # subscribers only listen
        finally:
            self._events.discard(ws)
        return ws

    def _publish(self, committed: Committed) -> None:
        if not self._events:
            return
        block = committed.block
        message = json.dumps(
            {
                "type": "block",
                "height": block.header.height,
                "id": block.id.hex(),
                "time": block.header.time,
                "txs": [t.hex() for t in block.tx_ids],
            }
        )
        for ws in list(self._events):
            if ws.closed:
                self._events.discard(ws)
                continue
            asyncio.get_running_loop().create_task(ws.send_str(message))

    async def _close_events(self, app: web.Application) -> None:
        for ws in list(self._events):
            await ws.close()


__all__ = ["Api", "InvalidTransaction"]
