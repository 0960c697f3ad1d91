"""The open WebSocket clients, each with its own bounded outbox and sender, so a slow client holds no one else.

Anything may call `send` / `send_preview` from any thread; the event loop hands each message to the outbox
of every client it is for, and each client's own task delivers its outbox in order. A client whose outbox
fills up (it stopped reading) or whose send does not finish within the timeout is dropped: its connection
is aborted, and the other clients never wait for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from dataclasses import dataclass, field

from aiohttp import web

from .json_api import dumps

log = logging.getLogger("flux2.server")

# Binary WebSocket frames: big-endian uint32 event type, then the payload.
BINARY_PREVIEW_IMAGE = 1
BINARY_PREVIEW_WITH_METADATA = 4
PREVIEW_FORMAT_JPEG = 1


def _json_message(event: str, data: dict) -> dict:
    return {"type": event, "data": data}


@dataclass(frozen=True)
class OutboxLimits:
    max_messages: int = 1024  # queued for one client before it counts as not keeping up
    send_timeout_s: float = 10.0  # one message's send, before the client counts as not reading


@dataclass
class _Client:
    ws: web.WebSocketResponse
    transport: asyncio.BaseTransport | None
    outbox: asyncio.Queue
    features: dict = field(default_factory=dict)
    sender: asyncio.Task | None = None


class ClientHub:
    """The open WebSocket clients by id; every message to them goes through their own outbox."""

    def __init__(self, limits: OutboxLimits | None = None) -> None:
        self.limits = limits or OutboxLimits()
        self._clients: dict[str, _Client] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    @property
    def client_ids(self) -> frozenset[str]:
        """Ids of the connected clients (a copy, so any thread may read it)."""
        return frozenset(self._clients)

    # -- clients (event loop only) --

    def add(self, sid: str, ws: web.WebSocketResponse, transport: asyncio.BaseTransport | None,
            greeting: tuple[str, dict]) -> None:
        """Register a connected socket whose first message is `greeting` (event, data). A second connection
        with the same id takes over its messages; the old socket stays open (a duplicated browser tab shares
        the id: cutting it would make the two tabs cut each other in turn)."""
        old = self._clients.get(sid)
        if old is not None:
            old.sender.cancel()
        client = _Client(ws, transport, asyncio.Queue(self.limits.max_messages))
        # Straight into the outbox: sent through `send`, a broadcast another thread had already posted
        # would reach the new socket first, and clients expect their id in the very first message.
        client.outbox.put_nowait(("json", _json_message(*greeting)))
        client.sender = asyncio.create_task(self._deliver(sid, client))
        self._clients[sid] = client

    def remove(self, sid: str, ws: web.WebSocketResponse) -> None:
        client = self._clients.get(sid)
        if client is not None and client.ws is ws:
            del self._clients[sid]
            client.sender.cancel()

    def set_features(self, sid: str, features: dict) -> None:
        if sid in self._clients:
            self._clients[sid].features = features

    async def close_all(self, code: int, message: bytes) -> None:
        for sid, client in list(self._clients.items()):
            client.sender.cancel()
            try:
                await asyncio.wait_for(client.ws.close(code=code, message=message), self.limits.send_timeout_s)
            except (asyncio.TimeoutError, ConnectionError):
                self._abort(client)
        self._clients.clear()

    # -- sending (any thread) --

    def send(self, event: str, data: dict, sid: str | None = None) -> None:
        """Queue a JSON message for one client, or for every client when sid is None."""
        self._post("json", sid, _json_message(event, data))

    def send_preview(self, jpeg: bytes, metadata: dict, sid: str | None) -> None:
        self._post("preview", sid, (jpeg, metadata))

    def _post(self, kind: str, sid: str | None, payload) -> None:
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._dispatch, kind, sid, payload)
            except RuntimeError:  # the loop closed between the check and the call (shutdown)
                pass

    def _dispatch(self, kind: str, sid: str | None, payload) -> None:
        targets = [sid] if sid is not None else list(self._clients)
        for target in targets:
            client = self._clients.get(target)
            if client is None:
                continue
            try:
                client.outbox.put_nowait((kind, payload))
            except asyncio.QueueFull:
                self._drop(target, client, f"{self.limits.max_messages} messages waiting: it stopped reading")

    async def _deliver(self, sid: str, client: _Client) -> None:
        while True:
            kind, payload = await client.outbox.get()
            if client.ws.closed:
                continue
            if kind == "json":
                sending = client.ws.send_str(dumps(payload))
            else:
                sending = client.ws.send_bytes(self._preview_frame(client, *payload))
            try:
                await asyncio.wait_for(sending, self.limits.send_timeout_s)
            except asyncio.TimeoutError:
                self._drop(sid, client, f"a send took over {self.limits.send_timeout_s} s: it stopped reading")
                return
            except Exception as exc:  # a vanished client must not stop its sender with an unlogged error
                log.info("websocket send to %r failed: %s", sid, exc)

    def _drop(self, sid: str, client: _Client, reason: str) -> None:
        log.warning("websocket client %r dropped: %s", sid, reason)
        if self._clients.get(sid) is client:
            del self._clients[sid]
        if client.sender is not None and client.sender is not asyncio.current_task():
            client.sender.cancel()
        self._abort(client)

    @staticmethod
    def _abort(client: _Client) -> None:
        # A close handshake would wait on the very buffers that are full: cut the connection.
        if client.transport is not None:
            client.transport.abort()

    @staticmethod
    def _preview_frame(client: _Client, jpeg: bytes, metadata: dict) -> bytes:
        if client.features.get("supports_preview_metadata"):
            meta = json.dumps({**metadata, "image_type": "image/jpeg"}).encode()
            return struct.pack(">II", BINARY_PREVIEW_WITH_METADATA, len(meta)) + meta + jpeg
        return struct.pack(">II", BINARY_PREVIEW_IMAGE, PREVIEW_FORMAT_JPEG) + jpeg
