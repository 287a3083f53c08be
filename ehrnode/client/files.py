"""Writing what a client reads to files: whole or streamed, never half-written (a reader
writes to a hidden ``.part`` file and renames it into place when it is whole)."""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path
from typing import Any

import aiohttp

from ehrnode.client import envelope, fhir

READ_CHUNK = 1024 * 1024


def part_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.{secrets.token_hex(4)}.part")


def write_atomically(out: Path, data: bytes) -> None:
    part = part_path(out)
    try:
        part.write_bytes(data)
        os.replace(part, out)
    finally:
        part.unlink(missing_ok=True)


async def stream_to_file(
    response: aiohttp.ClientResponse, first: bytes, data_key: bytes, out: Path
) -> dict[str, Any]:
    """Decrypt an attachment as it arrives into ``out`` (renamed into place when whole)."""
    opener = envelope.StreamOpener(data_key)
    part = part_path(out)
    handle = await asyncio.to_thread(open, part, "wb")
    try:
        handle.write(opener.feed(first))
        async for chunk in response.content.iter_chunked(READ_CHUNK):
            plain = await asyncio.to_thread(opener.feed, chunk)
            await asyncio.to_thread(handle.write, plain)
        handle.write(opener.close())
        await asyncio.to_thread(handle.close)
        os.replace(part, out)
    finally:
        handle.close()
        part.unlink(missing_ok=True)
    assert opener.metadata is not None
    meta: dict[str, Any] = fhir.decode(opener.metadata)
    return meta
