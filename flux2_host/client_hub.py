"""The open WebSocket clients and the one ordered outbox every message to them goes through."""

from __future__ import annotations

import asyncio
import json
import logging
import struct

from aiohttp import web

from .json_api import dumps

log = logging.getLogger("flux2.server")

# Binary WebSocket frames: big-endian uint32 event type, then the payload.
BINARY_PREVIEW_IMAGE = 1
BINARY_PREVIEW_WITH_METADATA = 4
PREVIEW_FORMAT_JPEG = 1


class ClientHub:
    """The open WebSocket clients and the single ordered outbox every message to them goes through.

    Anything may call `send` / `send_preview` from any thread; one task on the event loop delivers, so
    messages reach each client in the order they were sent.
    """

    def __init__(self) -> None:
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.client_features: dict[str, dict] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: asyncio.Queue | None = None
        self._deliverer: asyncio.Task | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._outbox = asyncio.Queue()
        self._deliverer = asyncio.create_task(self._deliver())

    def send(self, event: str, data: dict, sid: str | None = None) -> None:
        """Queue a JSON message for one client, or for every client when sid is None."""
        self._post(("json", sid, {"type": event, "data": data}))

    def send_preview(self, jpeg: bytes, metadata: dict, sid: str | None) -> None:
        self._post(("preview", sid, (jpeg, metadata)))

    def _post(self, message: tuple) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._outbox.put_nowait, message)

    async def _deliver(self) -> None:
        while True:
            kind, sid, payload = await self._outbox.get()
            targets = [sid] if sid is not None else list(self.sockets)
            for target in targets:
                try:
                    ws = self.sockets.get(target)
                    if ws is None or ws.closed:
                        continue
                    if kind == "json":
                        await ws.send_str(dumps(payload))
                    else:
                        await ws.send_bytes(self._preview_frame(target, *payload))
                except Exception as exc:  # a vanished client or an odd id must not stop delivery to the others
                    log.info("websocket send to %r failed: %s", target, exc)

    def _preview_frame(self, sid: str, jpeg: bytes, metadata: dict) -> bytes:
        if self.client_features.get(sid, {}).get("supports_preview_metadata"):
            meta = json.dumps({**metadata, "image_type": "image/jpeg"}).encode()
            return struct.pack(">II", BINARY_PREVIEW_WITH_METADATA, len(meta)) + meta + jpeg
        return struct.pack(">II", BINARY_PREVIEW_IMAGE, PREVIEW_FORMAT_JPEG) + jpeg
