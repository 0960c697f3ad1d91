"""Stand-in for ComfyUI's `server` module: `PromptServer.instance`, as node packs use it.

Packs declare HTTP routes on `PromptServer.instance.routes` when they are imported; `flux2 serve` adds them
to its app (also under /api, as ComfyUI does) and connects `send_sync` to its WebSocket clients. Under
`flux2 run` there are no clients and messages are dropped.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from aiohttp import web

from . import STAND_IN_MARK, ComfyInternalsMissing, missing_name

globals()[STAND_IN_MARK] = True
__getattr__ = missing_name("server")

log = logging.getLogger("flux2.custom_nodes")

Sender = Callable[[str, Any, "str | None"], None]


class PromptServer:
    instance: "PromptServer"

    def __init__(self) -> None:
        self.routes = web.RouteTableDef()
        self.client_id: str | None = None  # ComfyUI's id of the client whose prompt runs; here always None
        self.last_node_id: str | None = None
        self._sender: Sender | None = None

    def attach(self, sender: Sender) -> None:
        """Deliver `send_sync` messages with `sender(event, data, sid)` (the server's ClientHub.send)."""
        self._sender = sender

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        """Send `{"type": event, "data": data}` to one client, or to all when sid is None; callable from any
        thread. Binary events (bytes data) are not forwarded."""
        if isinstance(data, (bytes, bytearray)):
            log.debug("binary event %r from a node pack not forwarded", event)
            return
        if self._sender is None:
            log.debug("event %r from a node pack dropped: no WebSocket clients here", event)
            return
        self._sender(event, data, sid)

    async def send(self, event: str, data: Any, sid: str | None = None) -> None:
        self.send_sync(event, data, sid)

    async def send_json(self, event: str, data: Any, sid: str | None = None) -> None:
        self.send_sync(event, data, sid)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ComfyInternalsMissing(f"server.PromptServer.instance.{name}")
