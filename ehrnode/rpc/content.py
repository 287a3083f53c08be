"""RPC routes for ciphertext: uploading blobs (streamed, or many small ones at once),
reading a record's content as an authorised reader, and the patient's access log.

Every route here needs a signed request (``core.request``): uploads from a registered
identity, reads from the patient, the record's author or a grantee in force.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgpack
from aiohttp import web

from ehrnode.blobs.http import blob_response
from ehrnode.blobs.replication import Replication
from ehrnode.blobs.store import BlobStore, parse_hash
from ehrnode.config import RpcConfig
from ehrnode.core import crypto, state
from ehrnode.core.errors import Gone, InvalidEncoding, NotAuthorised, NotFound
from ehrnode.mempool import Mempool
from ehrnode.rpc import params, views
from ehrnode.rpc.params import now_ms
from ehrnode.store.access import AccessLog
from ehrnode.store.chain import Chain


class ContentApi:
    def __init__(
        self,
        *,
        config: RpcConfig,
        identity: crypto.Identity,
        chain: Chain,
        mempool: Mempool,
        blobs: BlobStore,
        access: AccessLog,
        auth: params.RequestAuth,
        replication: Replication | None,
    ) -> None:
        self.config = config
        self.identity = identity
        self.chain = chain
        self.mempool = mempool
        self.blobs = blobs
        self.access = access
        self.auth = auth
        self.replication = replication

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/v1/records/{id}/content", self.get_record_content)
        r.add_get("/v1/records/{id}/key", self.get_record_key)
        r.add_get("/v1/patients/{key}/access-log", self.get_access_log)
        r.add_put("/v1/blobs/{hash}", self.put_blob)
        r.add_post("/v1/blobs", self.post_blobs)
        r.add_post("/v1/blobs/stream", self.post_blob_stream)
        r.add_route("HEAD", "/v1/blobs/{hash}", self.head_blob)
        r.add_get("/v1/blobs/{hash}/replicas", self.get_replicas)

    def _readable(self, req: web.Request) -> tuple[Any, bytes, dict[str, Any], int]:
        """(signed request, record id, record, now) for a reader allowed to read it."""
        signed = self.auth.verify(req)
        record_id = params.tx_id(req)
        record = views.committed_record(self.chain, record_id)
        if record["erased"]:
            raise Gone(
                f"the patient erased this record at height {record.get('erased_at')}; "
                "only its hash remains",
                code="record_erased",
            )
        now = now_ms()
        if not state.may_read(self.chain.state, record_id, signed.key, now):
            raise NotAuthorised(
                "the patient has not granted this key access to this record", code="not_granted"
            )
        return signed, record_id, record, now

    def _wrapped_key(self, record_id: bytes, record: dict[str, Any], who: bytes) -> bytes | None:
        chain = self.chain
        return state.wrapped_key(chain.state, record_id, record, who, chain.tx_body)

    async def get_record_key(self, req: web.Request) -> web.Response:
        """Only the reader's wrapped data key (what a patient re-wraps for a grantee):
        no ciphertext, so nothing is read and nothing is logged."""
        signed, record_id, record, _now = self._readable(req)
        wrapped = self._wrapped_key(record_id, record, signed.key)
        if wrapped is None:
            raise NotFound("no data key is wrapped for this key on that record", code="no_key")
        return web.json_response({"record": record_id.hex(), "wrapped_key": wrapped.hex()})

    async def get_record_content(self, req: web.Request) -> web.StreamResponse:
        """The ciphertext and the reader's wrapped key, for a signed, authorised reader."""
        signed, record_id, record, now = self._readable(req)
        info = self.blobs.info(record["blob"])
        if info is None:
            raise NotFound("this node does not hold the record's ciphertext", code="blob_missing")
        wrapped = self._wrapped_key(record_id, record, signed.key)
        await self.access.kv.run(
            self.access.append, record["patient"], signed.key, record_id, signed.sig, now
        )
        return blob_response(
            self.blobs,
            record["blob"],
            {
                "Ehr-Record-Type": record["type"],
                "Ehr-Wrapped-Key": "" if wrapped is None else wrapped.hex(),
            },
        )

    async def get_access_log(self, req: web.Request) -> web.Response:
        signed = self.auth.verify(req)
        patient = params.key(req)
        if signed.key != patient:
            raise NotAuthorised("only the patient can read their access log", code="not_patient")
        after = params.int_query(req, "after", -1, -1, 1 << 62)
        limit = params.int_query(req, "limit", 100, 1, views.MAX_PAGE)
        entries = self.access.entries(patient, after=after, limit=limit)
        return web.json_response({"patient": patient.hex(), "entries": views.hexify(entries)})

    # --- blobs --------------------------------------------------------------------------

    async def put_blob(self, req: web.Request) -> web.Response:
        """A blob named by its hash in the URL, streamed; refused if the bytes differ."""
        return await self._stream_in(req, parse_hash(req.match_info["hash"]))

    async def post_blob_stream(self, req: web.Request) -> web.Response:
        """A blob streamed without its hash up front (the node hashes it and says): lets a
        client encrypt and upload in one pass, with no temporary copy; the client checks
        the hash returned against its own."""
        return await self._stream_in(req, None)

    async def _stream_in(self, req: web.Request, expected: bytes | None) -> web.Response:
        signed = self.auth.verify(req)
        self._require_registered(signed.key)
        chunks: AsyncIterator[bytes] = req.content.iter_chunked(256 * 1024)
        if self.replication is not None and self.replication.relay is not None:
            chunks = self.replication.relay.tee(chunks, req.content_length)
        info = await self.blobs.put_stream(chunks, expected, req.content_length)
        replicas = await self._replicate([info.hash])
        return web.json_response(
            {"hash": info.hash.hex(), "size": info.size, **replicas[0]}, status=201
        )

    async def post_blobs(self, req: web.Request) -> web.Response:
        """Many small blobs at once: a msgpack array of byte strings, one synced write."""
        raw = await params.raw_body(req)
        signed = self.auth.verify(req, raw)
        self._require_registered(signed.key)
        try:
            items = msgpack.unpackb(raw, raw=False, max_array_len=self.config.max_batch_txs)
        except Exception as err:
            raise InvalidEncoding("a blob batch is a msgpack array of byte strings") from err
        if not isinstance(items, list) or not all(isinstance(i, bytes) for i in items):
            raise InvalidEncoding("a blob batch is a msgpack array of byte strings")
        hashes = await self.blobs.kv.run(self.blobs.put_many, items)
        if self.replication is not None:
            self.replication.push(items)
        replicas = await self._replicate(hashes)
        durable = all(r["durable"] for r in replicas)
        return web.json_response(
            {"hashes": [h.hex() for h in hashes], "durable": durable}, status=201
        )

    async def _replicate(self, hashes: list[bytes]) -> list[dict[str, Any]]:
        """Announce new blobs and wait until a write quorum holds each (or time runs out)."""
        if self.replication is None:
            return [{"replicas": 1, "quorum": 1, "durable": True} for _ in hashes]
        replication = self.replication
        replication.stored(hashes)
        timeout = self.config.commit_timeout_s
        counts = await replication.wait_quorum(hashes, timeout)
        quorum = replication.quorum
        return [{"replicas": n, "quorum": quorum, "durable": n >= quorum} for n in counts]

    async def get_replicas(self, req: web.Request) -> web.Response:
        """Which nodes hold a blob, and whether that meets the write quorum."""
        blob = parse_hash(req.match_info["hash"])
        holders = [self.identity.public_key] if self.blobs.has(blob) else []
        quorum = 1
        if self.replication is not None:
            holders = self.replication.replicas(blob)
            quorum = self.replication.quorum
        return web.json_response(
            {
                "hash": blob.hex(),
                "local": self.blobs.has(blob),
                "holders": [h.hex() for h in holders],
                "quorum": quorum,
                "durable": len(holders) >= quorum,
            }
        )

    def _require_registered(self, key: bytes) -> None:
        account = self.chain.load_state(state.P_ACCT + key)
        pending = state.load(self.mempool.check_state, state.P_ACCT + key)
        if account is None and pending is None:
            raise NotAuthorised(
                "only registered identities may upload ciphertext", code="unregistered_signer"
            )

    async def head_blob(self, req: web.Request) -> web.Response:
        info = self.blobs.info(parse_hash(req.match_info["hash"]))
        if info is None:
            return web.Response(status=404)
        return web.Response(status=200, headers={"Ehr-Blob-Size": str(info.size)})
