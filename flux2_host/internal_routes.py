"""ComfyUI's `/internal/*` routes, the ones the web frontend calls: the Logs panel (`/logs`, `/logs/raw`, and
`PATCH /logs/subscribe` for live `logs` WebSocket messages), `/folder_paths` and `/files/{input|output|temp}`.

ComfyUI mounts them under `/internal` only (not under `/api`), with these reply shapes: `/logs` one string of
"time - line" entries, `/logs/raw` `{"entries": [{"t", "m"}], "size": {"cols", "rows"}}`, `/folder_paths`
`{kind: [folders]}`, `/files/...` file names, newest first.
"""

from __future__ import annotations

import os
import shutil
import threading
from typing import Callable

from aiohttp import web

from . import folders
from .client_hub import ClientHub
from .json_api import RequestError, json_reply, read_json_object
from .logs import LogBuffer, LogEntry

FILE_DIRECTORY_TYPES = ("output", "input", "temp")


class InternalRoutes:
    """The route handlers, and which WebSocket clients get every new log line."""

    def __init__(self, hub: ClientHub, log_buffer: LogBuffer) -> None:
        self.hub = hub
        self.log_buffer = log_buffer
        self._subscribers: set[str] = set()
        self._subscribers_lock = threading.Lock()  # log lines arrive from any thread
        log_buffer.listeners.append(self._send_to_subscribers)

    def routes(self) -> list[tuple[str, str, Callable]]:
        return [
            ("GET", "/internal/logs", self.logs), ("GET", "/internal/logs/raw", self.raw_logs),
            ("PATCH", "/internal/logs/subscribe", self.subscribe_logs),
            ("GET", "/internal/folder_paths", self.folder_paths),
            ("GET", "/internal/files/{directory_type}", self.files),
        ]

    async def logs(self, request: web.Request) -> web.Response:
        return json_reply("".join(f"{entry['t']} - {entry['m']}" for entry in self.log_buffer.snapshot()))

    async def raw_logs(self, request: web.Request) -> web.Response:
        size = shutil.get_terminal_size()
        return json_reply({"entries": self.log_buffer.snapshot(), "size": {"cols": size.columns, "rows": size.lines}})

    async def subscribe_logs(self, request: web.Request) -> web.Response:
        body = await read_json_object(request)
        client_id, enabled = body.get("clientId"), body.get("enabled")
        if not isinstance(client_id, str) or not isinstance(enabled, bool):
            raise RequestError(400, "invalid_parameter", "expected {\"clientId\": string, \"enabled\": boolean}")
        with self._subscribers_lock:
            (self._subscribers.add if enabled else self._subscribers.discard)(client_id)
        return json_reply({})

    def _send_to_subscribers(self, entry: LogEntry) -> None:
        with self._subscribers_lock:
            self._subscribers &= self.hub.client_ids  # a client that left is unsubscribed, as in ComfyUI
            subscribers = list(self._subscribers)
        for client_id in subscribers:
            self.hub.send("logs", {"entries": [entry], "size": None}, client_id)

    async def folder_paths(self, request: web.Request) -> web.Response:
        return json_reply({kind: folders.get_folder_paths(kind) for kind in folders.folder_names_and_paths})

    async def files(self, request: web.Request) -> web.Response:
        directory_type = request.match_info["directory_type"]
        if directory_type not in FILE_DIRECTORY_TYPES:
            raise RequestError(400, "invalid_parameter",
                               f"directory type: expected one of {', '.join(FILE_DIRECTORY_TYPES)}, found {directory_type!r}")
        directory = folders.get_directory_by_type(directory_type)
        entries = [entry for entry in os.scandir(directory) if entry.is_file()] if os.path.isdir(directory) else []
        entries.sort(key=lambda entry: -entry.stat().st_mtime)
        return json_reply([entry.name for entry in entries])
