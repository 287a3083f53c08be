"""Serving a blob over HTTP: a small one in one body (read from its segment), a large one
straight from its file with ``sendfile`` (``web.FileResponse``), so the node copies no
bytes of a multi-GB attachment through Python."""

from __future__ import annotations

from aiohttp import web

from ehrnode.blobs.store import BlobStore
from ehrnode.core.errors import NotFound


def blob_response(
    blobs: BlobStore, blob_hash: bytes, headers: dict[str, str]
) -> web.StreamResponse:
    info = blobs.info(blob_hash)
    if info is None:
        raise NotFound("this node does not hold that blob", code="blob_missing")
    headers = {"Content-Type": "application/octet-stream", **headers}
    if info.inline:
        return web.Response(body=blobs.read_small(blob_hash), headers=headers)
    return web.FileResponse(blobs.path(blob_hash), headers=headers)
