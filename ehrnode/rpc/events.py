"""``GET /v1/events``: a websocket of committed blocks, one JSON text frame each::

    {"type": "block", "height", "id", "time", "txs": [tx id hex, ...]}

Subscribers only listen; at most 256 at once; a slow subscriber does not hold up commits
(each frame is sent by its own task).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from ehrnode.consensus.driver import Committed
from ehrnode.core.errors import LimitExceeded

MAX_SUBSCRIBERS = 256


class BlockEvents:
    def __init__(self) -> None:
        self._subscribers: set[web.WebSocketResponse] = set()
        self._sending: set[asyncio.Task[Any]] = set()

    async def subscribe(self, req: web.Request) -> web.WebSocketResponse:
        if len(self._subscribers) >= MAX_SUBSCRIBERS:
            raise LimitExceeded("too many event subscribers on this node")
        ws = web.WebSocketResponse(heartbeat=20, max_msg_size=4096)
        await ws.prepare(req)
        self._subscribers.add(ws)
        try:
            async for _message in ws:
                pass
        finally:
            self._subscribers.discard(ws)
        return ws

    def publish(self, committed: Committed) -> None:
        if not self._subscribers:
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
        loop = asyncio.get_running_loop()
        for ws in list(self._subscribers):
            if ws.closed:
                self._subscribers.discard(ws)
                continue
            task = loop.create_task(ws.send_str(message))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def close(self, app: web.Application) -> None:
        for ws in list(self._subscribers):
            await ws.close()
