"""`flux2 serve`: the ComfyUI-compatible HTTP + WebSocket server and the official web canvas.

Read top to bottom: the prompt queue and history (shared with the worker thread), the WebSocket clients
(one ordered outbox, fed thread-safely), the worker thread that runs prompts, the `/api/jobs` view of
queue and history, the routes, then `serve_command`.

Every route answers under `/` and under `/api` (the frontend only calls `/api/...`). Every error answers
JSON, and no request can stop the server: a handler that raises becomes a 500 JSON reply.
"""

from __future__ import annotations

import asyncio
import glob
import heapq
import importlib.metadata
import importlib.resources
import io
import itertools
import json
import logging
import math
import os
import platform
import struct
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.http_exceptions import HttpProcessingError

from . import folders

log = logging.getLogger("flux2.server")

MAX_HISTORY = 10000
MAX_UPLOAD_BYTES = 100 * 1024 * 1024
PREVIEW_MAX_SIZE = 512
JOB_STATUSES = ("pending", "in_progress", "completed", "failed", "cancelled")
PREVIEWABLE_MEDIA = ("images", "video", "audio", "3d")
SETTINGS_FILE = "comfy.settings.json"
DEFAULT_USER = "default"

# Binary WebSocket frames: big-endian uint32 event type, then the payload.
BINARY_PREVIEW_IMAGE = 1
BINARY_PREVIEW_WITH_METADATA = 4
PREVIEW_FORMAT_JPEG = 1


class RequestError(Exception):
    """A request the server refuses; becomes a JSON error reply with this status."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type


def _dumps(value: Any) -> str:
    # Node ui dicts come from third-party code; an odd value is shown as text rather than failing the reply.
    return json.dumps(value, default=str)


def json_reply(value: Any, status: int = 200) -> web.Response:
    return web.json_response(value, status=status, dumps=_dumps)


def error_body(error_type: str, message: str, details: str = "") -> dict:
    """ComfyUI's error object: what /prompt answers and what every other refusal here answers too."""
    return {"type": error_type, "message": message, "details": details or message, "extra_info": {}}


def json_error(status: int, error_type: str, message: str) -> web.Response:
    return json_reply({"error": error_body(error_type, message)}, status)


# --- queue and history ----------------------------------------------------------------------------


@dataclass
class QueueItem:
    number: float
    prompt_id: str
    prompt: dict
    extra_data: dict
    outputs: list[str]

    @property
    def client_id(self) -> str | None:
        return self.extra_data.get("client_id")

    def as_list(self) -> list:
        """The 5-list ComfyUI uses in /queue and in history: [number, prompt_id, prompt, extra_data, outputs]."""
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


class PromptQueue:
    """Pending prompts (ordered by number, then arrival), the running one, and the history.

    Shared by the event loop and the worker thread; every method takes the lock. `on_change` gets the new
    queue_remaining after each change, still under the lock so clients see the counts in order (it must
    only hand the number on, never block).
    """

    def __init__(self, on_change: Callable[[int], None]) -> None:
        self._lock = threading.Condition()
        self._pending: list[tuple[float, int, QueueItem]] = []
        self._arrivals = itertools.count()
        self._running: QueueItem | None = None
        self._history: dict[str, dict] = {}
        self._free_request: bool | None = None  # unload_models flag of a pending /free, None if none
        self._on_change = on_change

    def _changed(self) -> None:
        self._on_change(len(self._pending) + (self._running is not None))

    def queue_remaining(self) -> int:
        """Pending plus running, as ComfyUI counts it (simple clients stop waiting at 0)."""
        with self._lock:
            return len(self._pending) + (self._running is not None)

    def put(self, item: QueueItem) -> None:
        with self._lock:
            heapq.heappush(self._pending, (item.number, next(self._arrivals), item))
            self._lock.notify_all()
            self._changed()

    def request_free(self, unload_models: bool) -> None:
        with self._lock:
            self._free_request = bool(self._free_request) or unload_models
            self._lock.notify_all()

    def wait_for_work(self) -> tuple[QueueItem | None, bool | None]:
        """Block until there is a prompt to run or memory to free; the prompt becomes the running one."""
        with self._lock:
            while not self._pending and self._free_request is None:
                self._lock.wait()
            free_request, self._free_request = self._free_request, None
            item = None
            if self._pending:
                item = heapq.heappop(self._pending)[2]
                self._running = item
                self._changed()
        return item, free_request

    def finish(self, item: QueueItem, record: dict) -> None:
        """Move the running prompt into history (dropping the oldest entry past MAX_HISTORY)."""
        with self._lock:
            self._running = None
            self._history[item.prompt_id] = record
            while len(self._history) > MAX_HISTORY:
                self._history.pop(next(iter(self._history)))
            self._changed()

    def running(self) -> QueueItem | None:
        with self._lock:
            return self._running

    def snapshot(self) -> tuple[list[QueueItem], list[QueueItem], dict[str, dict]]:
        """(running, pending in run order, history) at one instant, so no prompt shows twice or not at all."""
        with self._lock:
            running = [self._running] if self._running else []
            return running, [entry[2] for entry in sorted(self._pending)], dict(self._history)

    def delete_pending(self, prompt_ids: set[str]) -> list[str]:
        with self._lock:
            removed = [entry[2].prompt_id for entry in self._pending if entry[2].prompt_id in prompt_ids]
            self._pending = [entry for entry in self._pending if entry[2].prompt_id not in prompt_ids]
            heapq.heapify(self._pending)
            if removed:
                self._changed()
        return removed

    def clear_pending(self) -> None:
        with self._lock:
            self._pending.clear()
            self._changed()

    def history(self, max_items: int | None = None, offset: int | None = None) -> dict[str, dict]:
        """History oldest first. By default the newest `max_items`; `offset` counts from the oldest."""
        with self._lock:
            ids = list(self._history)
            if offset is None:
                offset = max(0, len(ids) - max_items) if max_items is not None else 0
            chosen = ids[offset:] if max_items is None else ids[offset:offset + max_items]
            return {prompt_id: self._history[prompt_id] for prompt_id in chosen}

    def history_item(self, prompt_id: str) -> dict | None:
        with self._lock:
            return self._history.get(prompt_id)

    def delete_history(self, prompt_ids: set[str]) -> None:
        with self._lock:
            for prompt_id in prompt_ids:
                self._history.pop(prompt_id, None)

    def clear_history(self) -> None:
        with self._lock:
            self._history.clear()


def history_record(item: QueueItem, status: str, outputs: dict, messages: list) -> dict:
    """One /history entry. `status` is the executor's: success, error or interrupted."""
    return {
        "prompt": item.as_list(),
        "outputs": outputs,
        "status": {
            "status_str": "success" if status == "success" else "error",
            "completed": status == "success",
            "messages": [[event, data] for event, data in messages],
        },
        "meta": {node_id: {"node_id": node_id, "display_node": node_id, "parent_node": None,
                           "real_node_id": node_id} for node_id in outputs},
    }


# --- WebSocket clients ----------------------------------------------------------------------------


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
                        await ws.send_str(_dumps(payload))
                    else:
                        await ws.send_bytes(self._preview_frame(target, *payload))
                except Exception as exc:  # a vanished client or an odd id must not stop delivery to the others
                    log.info("websocket send to %r failed: %s", target, exc)

    def _preview_frame(self, sid: str, jpeg: bytes, metadata: dict) -> bytes:
        if self.client_features.get(sid, {}).get("supports_preview_metadata"):
            meta = json.dumps({**metadata, "image_type": "image/jpeg"}).encode()
            return struct.pack(">II", BINARY_PREVIEW_WITH_METADATA, len(meta)) + meta + jpeg
        return struct.pack(">II", BINARY_PREVIEW_IMAGE, PREVIEW_FORMAT_JPEG) + jpeg


# --- the worker thread ----------------------------------------------------------------------------


class _ClientListener:
    """What the executor talks to while one prompt runs: events go to the submitting client.

    A prompt queued without client_id has its events broadcast, as in ComfyUI, so API clients that
    connect a socket but post without client_id still see progress. The `executing {node: null}` end
    marker is the worker's to send, after history is written, so one from the executor is dropped.
    """

    def __init__(self, hub: ClientHub, sid: str | None) -> None:
        self.hub = hub
        self.sid = sid

    def send(self, event: str, data: dict) -> None:
        if event == "executing" and data.get("node") is None:
            return
        self.hub.send(event, data, self.sid)

    def send_preview(self, node_id: str, prompt_id: str, image) -> None:
        # Called from inside the node's progress report: a preview that cannot be encoded is skipped,
        # it must not fail the node.
        try:
            image = image.convert("RGB")
            image.thumbnail((PREVIEW_MAX_SIZE, PREVIEW_MAX_SIZE))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=95)
        except Exception as exc:
            log.warning("preview of node %s skipped: %s", node_id, exc)
            return
        metadata = {"node_id": node_id, "prompt_id": prompt_id, "display_node_id": node_id,
                    "parent_node_id": None, "real_node_id": node_id}
        self.hub.send_preview(buffer.getvalue(), metadata, self.sid)


class PromptWorker:
    """The one thread that runs prompts, in queue order, and writes their history."""

    def __init__(self, queue: PromptQueue, executor, hub: ClientHub) -> None:
        self.queue = queue
        self.executor = executor
        self.hub = hub

    def start(self) -> None:
        threading.Thread(target=self._run, name="flux2-prompt-worker", daemon=True).start()

    def _run(self) -> None:
        while True:
            item, free_request = self.queue.wait_for_work()
            if free_request is not None:
                self._free(unload_models=free_request)
            if item is not None:
                self._execute(item)

    def _free(self, unload_models: bool) -> None:
        try:
            self.executor.free_memory(unload_models)
        except Exception:
            log.exception("freeing memory failed")

    def _execute(self, item: QueueItem) -> None:
        listener = _ClientListener(self.hub, item.client_id)
        try:
            result = self.executor.execute(item.prompt, item.prompt_id, item.extra_data, item.outputs, listener)
            record = history_record(item, result.status, result.outputs, result.messages)
        except Exception as exc:  # an executor bug fails this prompt, never the server
            log.exception("prompt %s failed outside any node", item.prompt_id)
            error = {"prompt_id": item.prompt_id, "node_id": "", "node_type": "", "executed": [],
                     "exception_message": str(exc), "exception_type": type(exc).__name__,
                     "traceback": [], "current_inputs": {}, "current_outputs": {},
                     "timestamp": int(time.time() * 1000)}
            listener.send("execution_error", error)
            record = history_record(item, "error", {}, [("execution_error", error)])
        self.queue.finish(item, record)
        self.hub.send("executing", {"node": None, "prompt_id": item.prompt_id}, item.client_id)


# --- /api/jobs: one view over queue and history -----------------------------------------------------


def _workflow_id(extra_data: dict) -> str | None:
    pnginfo = extra_data.get("extra_pnginfo")
    workflow = pnginfo.get("workflow") if isinstance(pnginfo, dict) else None
    return workflow.get("id") if isinstance(workflow, dict) else None


def _outputs_summary(outputs: dict) -> tuple[int, int, dict | None]:
    """(number of output items, how many are previewable, the one to preview: an 'output' file first)."""
    count = previewable = 0
    preview = fallback = None
    for node_id, node_outputs in outputs.items():
        if not isinstance(node_outputs, dict):
            continue
        for media_type, items in node_outputs.items():
            if media_type == "animated" or not isinstance(items, list):
                continue
            for entry in items:
                count += 1
                if media_type not in PREVIEWABLE_MEDIA or not isinstance(entry, dict):
                    continue
                previewable += 1
                candidate = {**entry, "nodeId": node_id, "mediaType": media_type}
                if entry.get("type") == "output" and preview is None:
                    preview = candidate
                elif fallback is None:
                    fallback = candidate
    return count, previewable, preview or fallback


def queued_job(item: QueueItem, status: str) -> dict:
    job = {"id": item.prompt_id, "status": status, "priority": item.number,
           "create_time": item.extra_data.get("create_time", 0), "outputs_count": 0,
           "previewable_outputs_count": 0}
    workflow_id = _workflow_id(item.extra_data)
    if workflow_id is not None:
        job["workflow_id"] = workflow_id
    return job


def finished_job(prompt_id: str, record: dict, with_details: bool = False) -> dict:
    number, _, prompt, extra_data, _ = record["prompt"]
    status_info = record.get("status") or {}
    start = end = error = None
    interrupted = False
    for event, data in status_info.get("messages", []):
        if event == "execution_start":
            start = data.get("timestamp")
        elif event in ("execution_success", "execution_error", "execution_interrupted"):
            end = data.get("timestamp")
            error = data if event == "execution_error" else error
            interrupted = interrupted or event == "execution_interrupted"
    if status_info.get("status_str") == "success":
        status = "completed"
    else:
        status = "cancelled" if interrupted else "failed"
    count, previewable, preview = _outputs_summary(record.get("outputs", {}))
    job = {"id": prompt_id, "status": status, "priority": number,
           "create_time": extra_data.get("create_time", 0), "execution_start_time": start,
           "execution_end_time": end, "outputs_count": count, "previewable_outputs_count": previewable}
    optional = {"execution_error": error, "preview_output": preview, "workflow_id": _workflow_id(extra_data)}
    job.update({key: value for key, value in optional.items() if value is not None})
    if with_details:
        job.update(outputs=record.get("outputs", {}), execution_status=status_info,
                   workflow={"prompt": prompt, "extra_data": extra_data})
    return job


def _job_sort_key(sort_by: str) -> Callable[[dict], float]:
    if sort_by == "execution_duration":
        def duration(job: dict) -> float:
            start, end = job.get("execution_start_time"), job.get("execution_end_time")
            return end - start if start and end else 0
        return duration
    return lambda job: job.get("create_time") or 0


# --- the server ----------------------------------------------------------------------------------


def frontend_root() -> Path:
    import comfyui_frontend_package
    return Path(importlib.resources.files(comfyui_frontend_package)) / "static"


def template_directories() -> list[Path]:
    """Where /templates/{file} looks: the JSON package first, then the media bundles (as ComfyUI's
    template packages split them), then the older single-package layout."""
    packages = []
    try:
        from comfyui_workflow_templates_core import loader
        packages = [loader.JSON_PACKAGE, *loader.BUNDLE_PACKAGE_MAP.values()]
    except ImportError:
        pass
    packages.append("comfyui_workflow_templates")
    found = []
    for package in packages:
        try:
            directory = Path(importlib.resources.files(package)) / "templates"
        except (ImportError, TypeError):
            continue
        if directory.is_dir():
            found.append(directory)
    return found


def _package_version(name: str, fallback: str = "unknown") -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return fallback


def _inside(root: str, path: str) -> bool:
    if "\0" in root or "\0" in path:  # not a file name on any system; os calls would raise ValueError
        return False
    root, path = os.path.abspath(root), os.path.abspath(path)
    try:
        return os.path.commonpath((root, path)) == root
    except ValueError:  # different drives on Windows
        return False


def write_atomically(path: str, data: bytes) -> None:
    """Write through a temp file in the same folder and rename over, so a crash never leaves half a file."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, temp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # mkstemp makes the file private; keep a replaced file's mode, or the usual one for a new file.
        os.chmod(temp_path, os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644)
        os.replace(temp_path, path)
    except BaseException:
        os.unlink(temp_path)
        raise


def _query_int(request: web.Request, name: str, default: int | None, minimum: int = 0) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise RequestError(400, "invalid_parameter", f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise RequestError(400, "invalid_parameter", f"{name} must be at least {minimum}, got {value}")
    return value


def _query_flag(request: web.Request, name: str, default: bool = False) -> bool:
    raw = request.query.get(name)
    return default if raw is None else raw.lower() in ("true", "1")


async def read_json(request: web.Request, default: Any = None) -> Any:
    """The request body as JSON; an empty body is `default`; anything unparseable is a 400."""
    body = await request.read()
    if not body.strip():
        return default
    try:
        return json.loads(body, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise RequestError(400, "invalid_json", f"request body is not valid JSON: {exc}") from None


def _refuse_constant(name: str) -> Any:
    # NaN and Infinity are not JSON: stored in a prompt they would make every later /history reply unreadable.
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a number")
    return value


async def read_form(request: web.Request):
    """A multipart / urlencoded body; a body that is neither is a 400."""
    try:
        return await request.post()
    except (ValueError, HttpProcessingError) as exc:
        raise RequestError(400, "invalid_form", f"request body is not a valid form: {exc}") from None


async def read_json_object(request: web.Request) -> dict:
    body = await read_json(request, default={})
    if not isinstance(body, dict):
        raise RequestError(400, "invalid_json", f"expected a JSON object, got {type(body).__name__}")
    return body


@web.middleware
async def errors_as_json(request: web.Request, handler):
    """Every refusal and every failure answers JSON; nothing a request does can stop the server."""
    try:
        return await handler(request)
    except RequestError as exc:
        return json_error(exc.status, exc.error_type, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_error(exc.status, "http_error", exc.reason or str(exc))
    except Exception as exc:
        log.exception("%s %s failed", request.method, request.path)
        return json_error(500, "server_error", f"{type(exc).__name__}: {exc}")


_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


@web.middleware
async def same_origin_on_loopback(request: web.Request, handler):
    """A web page on another site could otherwise make the browser POST prompts to 127.0.0.1 (as ComfyUI
    guards): when the server is on loopback, a request whose Origin names another host is refused."""
    origin, host = request.headers.get("Origin"), request.headers.get("Host")
    if origin and host:
        host_name = urlsplit("//" + host).hostname or ""
        if host_name in _LOOPBACK_NAMES or host_name.startswith("127."):
            if urlsplit(origin).netloc.lower() != host.lower():
                return json_error(403, "origin_mismatch", f"Origin {origin} does not match Host {host}")
    return await handler(request)


@web.middleware
async def no_cache_for_code(request: web.Request, handler):
    response = await handler(request)
    if request.path.endswith((".js", ".css", ".html")) or request.path == "/":
        response.headers.setdefault("Cache-Control", "no-cache")
    return response


class Flux2Server:
    """Routes over one registry, one prompt queue, one worker and the WebSocket clients."""

    def __init__(self, registry, executor) -> None:
        self.registry = registry
        self.executor = executor
        self.hub = ClientHub()
        self.queue = PromptQueue(on_change=self._broadcast_status)
        self.worker = PromptWorker(self.queue, executor, self.hub)
        self.next_number = itertools.count()
        self.web_root = frontend_root()
        self.template_dirs = template_directories()

    def _broadcast_status(self, queue_remaining: int) -> None:
        self.hub.send("status", {"status": {"exec_info": {"queue_remaining": queue_remaining}}})

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_UPLOAD_BYTES,
                              middlewares=[errors_as_json, same_origin_on_loopback, no_cache_for_code])
        api = [
            ("GET", "/ws", self.websocket),
            ("GET", "/prompt", self.get_prompt), ("POST", "/prompt", self.post_prompt),
            ("GET", "/queue", self.get_queue), ("POST", "/queue", self.post_queue),
            ("GET", "/history", self.get_history), ("GET", "/history/{prompt_id}", self.get_history_item),
            ("POST", "/history", self.post_history),
            ("GET", "/jobs", self.get_jobs), ("GET", "/jobs/{job_id}", self.get_job),
            ("POST", "/jobs/cancel", self.cancel_jobs), ("POST", "/jobs/{job_id}/cancel", self.cancel_job),
            ("POST", "/interrupt", self.interrupt), ("POST", "/free", self.free),
            ("GET", "/view", self.view), ("POST", "/upload/image", self.upload_image),
            ("POST", "/upload/mask", self.upload_mask),
            ("GET", "/object_info", self.object_info), ("GET", "/object_info/{node_class}", self.object_info_node),
            ("GET", "/system_stats", self.system_stats), ("GET", "/features", self.features),
            ("GET", "/embeddings", self.embeddings), ("GET", "/extensions", self.extensions),
            ("GET", "/models", self.model_kinds), ("GET", "/models/{folder}", self.models_in_folder),
            ("GET", "/experiment/models", self.experiment_models),
            ("GET", "/experiment/models/{folder}", self.experiment_models_in_folder),
            ("GET", "/view_metadata/{folder}", self.view_metadata),
            ("GET", "/users", self.get_users), ("POST", "/users", self.post_users),
            ("GET", "/settings", self.get_settings), ("POST", "/settings", self.post_settings),
            ("GET", "/settings/{setting_id}", self.get_setting), ("POST", "/settings/{setting_id}", self.post_setting),
            ("GET", "/userdata", self.list_userdata), ("GET", "/userdata/{file}", self.get_userdata),
            ("POST", "/userdata/{file}", self.post_userdata), ("DELETE", "/userdata/{file}", self.delete_userdata),
            ("POST", "/userdata/{file}/move/{dest}", self.move_userdata),
            ("GET", "/i18n", self.empty_object), ("GET", "/workflow_templates", self.empty_object),
            ("GET", "/global_subgraphs", self.empty_object), ("GET", "/node_replacements", self.empty_object),
        ]
        for method, path, handler in api:
            app.router.add_route(method, path, handler)
            app.router.add_route(method, "/api" + path, handler)
        app.router.add_get("/", self.index)
        app.router.add_get("/templates/{file:.+}", self.template_file)
        app.router.add_get("/{file:.+}", self.static_file)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        await self.hub.start()
        self.worker.start()

    async def _on_shutdown(self, app: web.Application) -> None:
        # Open sockets would otherwise hold the shutdown until their browsers leave.
        for ws in list(self.hub.sockets.values()):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")

    # --- WebSocket ---

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        self.hub.sockets[sid] = ws  # a reconnect with the same clientId replaces the old socket
        self.hub.send("status", {"status": {"exec_info": {"queue_remaining": self.queue.queue_remaining()}},
                                 "sid": sid}, sid)
        try:
            async for message in ws:
                if message.type == WSMsgType.TEXT:
                    self._on_client_message(sid, message.data)
        finally:
            if self.hub.sockets.get(sid) is ws:
                del self.hub.sockets[sid]
                self.hub.client_features.pop(sid, None)
        return ws

    def _on_client_message(self, sid: str, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            return
        if isinstance(message, dict) and message.get("type") == "feature_flags":
            self.hub.client_features[sid] = message.get("data") or {}
            self.hub.send("feature_flags", self.server_features(), sid)

    # --- prompts and queue ---

    async def get_prompt(self, request: web.Request) -> web.Response:
        return json_reply({"exec_info": {"queue_remaining": self.queue.queue_remaining()}})

    async def post_prompt(self, request: web.Request) -> web.Response:
        from .executor import validate_prompt  # torch comes with it: loaded after serve_command applied --cpu

        body = await read_json_object(request)
        prompt = body.get("prompt")
        if prompt is None:
            return json_reply({"error": error_body("no_prompt", "No prompt provided"), "node_errors": {}}, 400)
        if not isinstance(prompt, dict):
            message = f"prompt must be an object of nodes (API format), got {type(prompt).__name__}"
            return json_reply({"error": error_body("invalid_prompt", message), "node_errors": {}}, 400)
        targets = body.get("partial_execution_targets")
        if targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
            raise RequestError(400, "invalid_prompt", "partial_execution_targets must be a list of node ids")
        validation = await asyncio.to_thread(validate_prompt, prompt, self.registry, targets)
        if not validation.ok:
            return json_reply({"error": validation.error, "node_errors": validation.node_errors}, 400)

        if "number" in body:
            try:
                number = float(body["number"])
                if not math.isfinite(number):
                    raise ValueError(number)
            except (TypeError, ValueError, OverflowError):
                raise RequestError(400, "invalid_prompt", f"number must be a number, got {body['number']!r}") from None
        else:
            number = next(self.next_number)
            number = -number if body.get("front") else number
        if not isinstance(body.get("extra_data") or {}, dict):
            raise RequestError(400, "invalid_prompt", "extra_data must be an object")
        extra_data = dict(body.get("extra_data") or {})
        client_id = body.get("client_id") or extra_data.get("client_id")
        if client_id:
            extra_data["client_id"] = str(client_id)  # socket ids are strings; another value matches no socket
        extra_data["create_time"] = int(time.time() * 1000)
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        self.queue.put(QueueItem(number, prompt_id, prompt, extra_data, list(validation.outputs)))
        return json_reply({"prompt_id": prompt_id, "number": number, "node_errors": validation.node_errors})

    async def get_queue(self, request: web.Request) -> web.Response:
        running, pending, _ = self.queue.snapshot()
        return json_reply({"queue_running": [item.as_list() for item in running],
                           "queue_pending": [item.as_list() for item in pending]})

    async def post_queue(self, request: web.Request) -> web.Response:
        body = await read_json_object(request)
        if body.get("clear"):
            self.queue.clear_pending()
        if "delete" in body:
            self.queue.delete_pending(set(self._id_list(body["delete"], "delete")))
        return json_reply({})

    @staticmethod
    def _id_list(value: Any, name: str) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise RequestError(400, "invalid_parameter", f"{name} must be a list of prompt ids")
        return value

    async def get_history(self, request: web.Request) -> web.Response:
        max_items = _query_int(request, "max_items", None)
        offset = _query_int(request, "offset", None)
        return json_reply(self.queue.history(max_items, offset))

    async def get_history_item(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info["prompt_id"]
        record = self.queue.history_item(prompt_id)
        return json_reply({prompt_id: record} if record is not None else {})

    async def post_history(self, request: web.Request) -> web.Response:
        body = await read_json_object(request)
        if body.get("clear"):
            self.queue.clear_history()
        if "delete" in body:
            self.queue.delete_history(set(self._id_list(body["delete"], "delete")))
        return json_reply({})

    async def interrupt(self, request: web.Request) -> web.Response:
        body = await read_json(request, default={})
        wanted = body.get("prompt_id") if isinstance(body, dict) else None
        self._interrupt(wanted)
        return json_reply({})

    def _interrupt(self, prompt_id: str | None) -> bool:
        """Stop the running prompt (only if it is `prompt_id`, when one is named)."""
        running = self.queue.running()
        if running is None or (prompt_id is not None and running.prompt_id != prompt_id):
            return False
        self.executor.interrupt()
        return True

    async def free(self, request: web.Request) -> web.Response:
        body = await read_json_object(request)
        if body.get("unload_models") or body.get("free_memory"):
            self.queue.request_free(bool(body.get("unload_models")))
        return json_reply({})

    # --- jobs ---

    async def get_jobs(self, request: web.Request) -> web.Response:
        statuses = [s for s in request.query.get("status", "").split(",") if s] or list(JOB_STATUSES)
        unknown = [s for s in statuses if s not in JOB_STATUSES]
        if unknown:
            raise RequestError(400, "invalid_parameter", f"unknown status {unknown}; expected some of {JOB_STATUSES}")
        sort_by = request.query.get("sort_by", "created_at")
        sort_order = request.query.get("sort_order", "desc")
        if sort_by not in ("created_at", "execution_duration") or sort_order not in ("asc", "desc"):
            raise RequestError(400, "invalid_parameter",
                               "sort_by must be created_at or execution_duration; sort_order asc or desc")
        limit = _query_int(request, "limit", None, minimum=1)
        offset = _query_int(request, "offset", 0)
        workflow_id = request.query.get("workflow_id")

        running, pending, history = self.queue.snapshot()
        jobs = [queued_job(item, "in_progress") for item in running]
        jobs += [queued_job(item, "pending") for item in pending]
        jobs += [finished_job(prompt_id, record) for prompt_id, record in history.items()]
        jobs = [job for job in jobs if job["status"] in statuses
                and (workflow_id is None or job.get("workflow_id") == workflow_id)]
        jobs.sort(key=_job_sort_key(sort_by), reverse=sort_order == "desc")
        total = len(jobs)
        page = jobs[offset:] if limit is None else jobs[offset:offset + limit]
        return json_reply({"jobs": page, "pagination": {
            "offset": offset, "limit": limit if limit is not None else total, "total": total,
            "has_more": offset + len(page) < total}})

    async def get_job(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        running, pending, history = self.queue.snapshot()
        if job_id in history:
            return json_reply(finished_job(job_id, history[job_id], with_details=True))
        for items, status in ((running, "in_progress"), (pending, "pending")):
            for item in items:
                if item.prompt_id == job_id:
                    return json_reply(queued_job(item, status))
        return json_error(404, "not_found", f"no job {job_id!r} in the queue or history")

    async def cancel_job(self, request: web.Request) -> web.Response:
        cancelled = self._cancel([request.match_info["job_id"]])
        if not cancelled:
            return json_error(404, "not_found", f"job {request.match_info['job_id']!r} is neither pending nor running")
        return json_reply({"cancelled": cancelled})

    async def cancel_jobs(self, request: web.Request) -> web.Response:
        body = await read_json_object(request)
        return json_reply({"cancelled": self._cancel(self._id_list(body.get("job_ids"), "job_ids"))})

    def _cancel(self, job_ids: list[str]) -> list[str]:
        cancelled = self.queue.delete_pending(set(job_ids))
        cancelled += [job_id for job_id in job_ids if job_id not in cancelled and self._interrupt(job_id)]
        return cancelled

    # --- files: view and upload ---

    @staticmethod
    def _directory_of_type(type_name: str) -> str:
        directory = folders.get_directory_by_type(type_name)
        if directory is None:
            raise RequestError(400, "invalid_parameter", f"type must be output, input or temp, got {type_name!r}")
        return directory

    async def view(self, request: web.Request) -> web.StreamResponse:
        filename = request.query.get("filename")
        if not filename:
            raise RequestError(400, "invalid_parameter", "filename is required")
        filename, annotated_dir = folders.annotated_filepath(filename)
        if filename.startswith(("/", "\\")) or ".." in filename or os.path.isabs(filename):
            raise RequestError(400, "path_refused", f"filename {filename!r} may not leave its folder")
        directory = annotated_dir or self._directory_of_type(request.query.get("type") or "output")
        folder = os.path.join(directory, request.query.get("subfolder", ""))
        path = os.path.join(folder, os.path.basename(filename))
        if not _inside(directory, folder) or not _inside(directory, path):
            raise RequestError(403, "path_refused", "subfolder may not leave the output, input or temp folder")
        if not os.path.isfile(path):
            return json_error(404, "not_found", f"no file {filename!r} in {request.query.get('type') or 'output'}")
        disposition = {"Content-Disposition": f'filename="{os.path.basename(path)}"'}
        preview, channel = request.query.get("preview"), request.query.get("channel", "")
        if not preview and channel in ("", "rgba"):
            return web.FileResponse(path, headers=disposition)
        try:
            body, content_type = await asyncio.to_thread(_converted_image, path, preview, channel)
        except OSError as exc:
            raise RequestError(400, "not_an_image", f"{filename!r} cannot be converted: {exc}") from None
        return web.Response(body=body, content_type=content_type, headers=disposition)

    async def upload_image(self, request: web.Request) -> web.Response:
        post = await read_form(request)
        return json_reply(await asyncio.to_thread(self._store_upload, post, None))

    async def upload_mask(self, request: web.Request) -> web.Response:
        post = await read_form(request)
        try:
            original_ref = json.loads(post.get("original_ref") or "")
        except (TypeError, ValueError):
            raise RequestError(400, "invalid_parameter",
                               "original_ref must be JSON {filename, subfolder, type}") from None
        if not isinstance(original_ref, dict) or not original_ref.get("filename") or not all(
                isinstance(original_ref.get(key) or "", str) for key in ("filename", "subfolder", "type")):
            raise RequestError(400, "invalid_parameter", "original_ref must name the image the mask belongs to")
        return json_reply(await asyncio.to_thread(self._store_upload, post, original_ref))

    def _store_upload(self, post, original_ref: dict | None) -> dict:
        """Save an uploaded image (or, with original_ref, the original with the upload's alpha as mask).

        Without overwrite an existing name gets ' (1)', ' (2)'... unless the content is identical.
        """
        image = post.get("image")
        if image is None or not hasattr(image, "file") or not image.filename:
            raise RequestError(400, "invalid_parameter", "multipart field 'image' with a file name is required")
        upload_type = post.get("type") or "input"
        directory = self._directory_of_type(upload_type)
        subfolder = post.get("subfolder") or ""
        folder = os.path.abspath(os.path.join(directory, os.path.normpath(subfolder)))
        path = os.path.abspath(os.path.join(folder, image.filename))
        if not _inside(directory, folder) or not _inside(directory, path) or os.path.dirname(path) != folder:
            raise RequestError(400, "path_refused", "file name and subfolder may not leave the upload folder")
        data = image.file.read()
        if original_ref is not None:
            data = self._masked_original(original_ref, data)
        name = image.filename
        if str(post.get("overwrite", "")).lower() not in ("true", "1"):
            stem, extension = os.path.splitext(image.filename)
            for n in itertools.count(1):
                if not os.path.exists(path) or _same_content(path, data):
                    break
                name = f"{stem} ({n}){extension}"
                path = os.path.join(folder, name)
        if not (os.path.exists(path) and _same_content(path, data)):
            write_atomically(path, data)
        return {"name": name, "subfolder": subfolder, "type": upload_type}

    def _masked_original(self, original_ref: dict, mask_png: bytes) -> bytes:
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo

        name, annotated_dir = folders.annotated_filepath(original_ref["filename"])
        directory = annotated_dir or self._directory_of_type(original_ref.get("type") or "output")
        path = os.path.join(directory, original_ref.get("subfolder") or "", name)
        if not _inside(directory, path) or not os.path.isfile(path):
            raise RequestError(400, "path_refused", f"original image {original_ref['filename']!r} not found")
        try:
            with Image.open(path) as original:
                text_chunks = PngInfo()
                for key, value in getattr(original, "text", {}).items():
                    text_chunks.add_text(key, value)  # keeps the workflow a saved image carries
                result = original.convert("RGBA")
            with Image.open(io.BytesIO(mask_png)) as mask:
                result.putalpha(mask.convert("RGBA").getchannel("A").resize(result.size))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise RequestError(400, "not_an_image", f"mask or original image cannot be read: {exc}") from None
        buffer = io.BytesIO()
        result.save(buffer, format="PNG", pnginfo=text_chunks, compress_level=4)
        return buffer.getvalue()

    # --- nodes, models and system ---

    async def object_info(self, request: web.Request) -> web.Response:
        return json_reply(await asyncio.to_thread(self.registry.object_info))

    async def object_info_node(self, request: web.Request) -> web.Response:
        node_class = request.match_info["node_class"]
        if node_class not in self.registry.classes:
            return json_reply({})
        return json_reply({node_class: await asyncio.to_thread(self.registry.object_info_for, node_class)})

    def server_features(self) -> dict:
        return {"supports_preview_metadata": True, "max_upload_size": MAX_UPLOAD_BYTES}

    async def features(self, request: web.Request) -> web.Response:
        return json_reply(self.server_features())

    async def system_stats(self, request: web.Request) -> web.Response:
        return json_reply(await asyncio.to_thread(system_stats))

    async def embeddings(self, request: web.Request) -> web.Response:
        return json_reply([os.path.splitext(name)[0] for name in folders.get_filename_list("embeddings")])

    async def extensions(self, request: web.Request) -> web.Response:
        scripts = glob.glob(os.path.join(glob.escape(str(self.web_root)), "extensions", "**", "*.js"), recursive=True)
        return json_reply(sorted("/" + os.path.relpath(s, self.web_root).replace(os.sep, "/") for s in scripts))

    @staticmethod
    def _model_kind(request: web.Request) -> str:
        kind = folders.map_legacy(request.match_info["folder"])
        if kind not in folders.folder_names_and_paths:
            raise RequestError(404, "not_found", f"no model folder kind {request.match_info['folder']!r}")
        return kind

    async def model_kinds(self, request: web.Request) -> web.Response:
        return json_reply(list(folders.folder_names_and_paths))

    async def models_in_folder(self, request: web.Request) -> web.Response:
        return json_reply(await asyncio.to_thread(folders.get_filename_list, self._model_kind(request)))

    async def experiment_models(self, request: web.Request) -> web.Response:
        return json_reply([{"name": kind, "folders": folders.get_folder_paths(kind)}
                           for kind in folders.folder_names_and_paths if kind not in ("configs", "custom_nodes")])

    async def experiment_models_in_folder(self, request: web.Request) -> web.Response:
        entries = await asyncio.to_thread(folders.list_model_entries, self._model_kind(request))
        return json_reply([{"name": name, "pathIndex": index} for name, index in entries])

    async def view_metadata(self, request: web.Request) -> web.Response:
        filename = request.query.get("filename", "")
        if not filename.endswith(".safetensors"):
            raise RequestError(400, "invalid_parameter", "filename of a .safetensors file is required")
        path = folders.get_full_path(self._model_kind(request), filename)
        if path is None or not os.path.isfile(path):
            return json_error(404, "not_found", f"no model {filename!r} in {request.match_info['folder']}")
        header = await asyncio.to_thread(_safetensors_header, path)
        if header is None or "__metadata__" not in header:
            return json_error(404, "not_found", f"{filename!r} has no metadata")
        return json_reply(header["__metadata__"])

    async def empty_object(self, request: web.Request) -> web.Response:
        return json_reply({})

    # --- user data and settings ---

    @staticmethod
    def _user_root() -> str:
        return folders.get_public_user_directory(DEFAULT_USER)

    def _user_path(self, relative: str) -> str:
        """A path under the user's folder from a URL parameter (arrives URL-encoded: workflows%2Fa.json)."""
        if "%" in relative:
            relative = unquote(relative)
        root = self._user_root()
        path = os.path.abspath(os.path.join(root, relative))
        if not relative or not _inside(root, path) or path == os.path.abspath(root):
            raise RequestError(403, "path_refused", f"{relative!r} is not a path inside the user folder")
        return path

    def _file_info(self, path: str) -> dict:
        stat = os.stat(path)
        return {"path": os.path.relpath(path, self._user_root()).replace(os.sep, "/"), "size": stat.st_size,
                "modified": int(stat.st_mtime * 1000), "created": int(stat.st_ctime * 1000)}

    def _written_reply(self, request: web.Request, path: str) -> web.Response:
        if _query_flag(request, "full_info"):
            return json_reply(self._file_info(path))
        return json_reply(os.path.relpath(path, self._user_root()).replace(os.sep, "/"))

    async def get_users(self, request: web.Request) -> web.Response:
        # No "users" key: that key switches the frontend to its multi-user login screen.
        return json_reply({"storage": "server", "migrated": True})

    async def post_users(self, request: web.Request) -> web.Response:
        return json_error(400, "single_user", "this server has a single user; there is nothing to create")

    async def list_userdata(self, request: web.Request) -> web.Response:
        directory = request.query.get("dir", "")
        if not directory:
            raise RequestError(400, "invalid_parameter", "dir is required")
        path = self._user_path(directory)
        if not os.path.isdir(path):
            return json_error(404, "not_found", f"no folder {directory!r} in the user data")
        recurse, full_info, split = (_query_flag(request, n) for n in ("recurse", "full_info", "split"))
        pattern = os.path.join(glob.escape(path), "**", "*") if recurse else os.path.join(glob.escape(path), "*")
        listing = []
        for full in sorted(glob.glob(pattern, recursive=recurse)):
            if not os.path.isfile(full):
                continue
            relative = os.path.relpath(full, path).replace(os.sep, "/")
            if full_info:
                listing.append({**self._file_info(full), "path": relative})
            elif split:
                listing.append([relative, *relative.split("/")])
            else:
                listing.append(relative)
        return json_reply(listing)

    async def get_userdata(self, request: web.Request) -> web.StreamResponse:
        path = self._user_path(request.match_info["file"])
        if not os.path.isfile(path):
            return json_error(404, "not_found", f"no file {request.match_info['file']!r} in the user data")
        # The canvas links user.css as its stylesheet. Every other user file is arbitrary content the browser
        # must not render inline in our origin.
        if path == os.path.join(os.path.abspath(self._user_root()), "user.css"):
            return web.FileResponse(path, headers={"Content-Type": "text/css"})
        content_type = "application/json" if path.endswith(".json") else "application/octet-stream"
        return web.FileResponse(path, headers={"Content-Type": content_type, "X-Content-Type-Options": "nosniff",
                                               "Content-Disposition": "attachment"})

    async def post_userdata(self, request: web.Request) -> web.Response:
        path = self._user_path(request.match_info["file"])
        if not _query_flag(request, "overwrite", default=True) and os.path.exists(path):
            return json_error(409, "file_exists", f"{request.match_info['file']!r} exists and overwrite=false")
        if os.path.isdir(path):
            return json_error(409, "file_exists", f"{request.match_info['file']!r} is a folder")
        try:
            write_atomically(path, await request.read())
        except OSError as exc:
            raise RequestError(400, "invalid_filename", f"cannot write {request.match_info['file']!r}: {exc}") from None
        return self._written_reply(request, path)

    async def delete_userdata(self, request: web.Request) -> web.Response:
        path = self._user_path(request.match_info["file"])
        if not os.path.isfile(path):
            return json_error(404, "not_found", f"no file {request.match_info['file']!r} in the user data")
        os.remove(path)
        return web.Response(status=204)

    async def move_userdata(self, request: web.Request) -> web.Response:
        source = self._user_path(request.match_info["file"])
        dest = self._user_path(request.match_info["dest"])
        if not os.path.isfile(source):
            return json_error(404, "not_found", f"no file {request.match_info['file']!r} in the user data")
        if not _query_flag(request, "overwrite", default=True) and os.path.exists(dest):
            return json_error(409, "file_exists", f"{request.match_info['dest']!r} exists and overwrite=false")
        if os.path.isdir(dest):
            return json_error(409, "file_exists", f"{request.match_info['dest']!r} is a folder")
        try:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.replace(source, dest)
        except OSError as exc:
            raise RequestError(400, "invalid_filename", f"cannot move to {request.match_info['dest']!r}: {exc}") from None
        return self._written_reply(request, dest)

    def _settings_path(self) -> str:
        return os.path.join(self._user_root(), SETTINGS_FILE)

    def _load_settings(self) -> dict:
        try:
            with open(self._settings_path(), encoding="utf-8") as f:
                settings = json.load(f)
        except FileNotFoundError:
            return {}
        except ValueError:
            log.warning("%s is not valid JSON; answering empty settings", self._settings_path())
            return {}
        return settings if isinstance(settings, dict) else {}

    def _save_settings(self, settings: dict) -> None:
        write_atomically(self._settings_path(), json.dumps(settings, indent=4).encode())

    async def get_settings(self, request: web.Request) -> web.Response:
        return json_reply(self._load_settings())

    async def get_setting(self, request: web.Request) -> web.Response:
        return json_reply(self._load_settings().get(request.match_info["setting_id"]))

    async def post_settings(self, request: web.Request) -> web.Response:
        changes = await read_json_object(request)
        self._save_settings({**self._load_settings(), **changes})
        return json_reply({})

    async def post_setting(self, request: web.Request) -> web.Response:
        value = await read_json(request)
        self._save_settings({**self._load_settings(), request.match_info["setting_id"]: value})
        return json_reply({})

    # --- frontend and templates ---

    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(self.web_root / "index.html")

    async def static_file(self, request: web.Request) -> web.StreamResponse:
        """The frontend's files. Anything else under GET ends here too, so it answers a JSON 404."""
        relative = request.match_info["file"]
        path = self.web_root / relative
        if _inside(str(self.web_root), str(path)) and path.is_file():
            return web.FileResponse(path)
        return json_error(404, "not_found", f"no route or file {request.path!r}")

    async def template_file(self, request: web.Request) -> web.StreamResponse:
        relative = request.match_info["file"]
        for directory in self.template_dirs:
            path = directory / relative
            if _inside(str(directory), str(path)) and path.is_file():
                if path.suffix == ".json":
                    return web.FileResponse(path, headers={"Content-Type": "application/json"})
                return web.FileResponse(path)
        return json_error(404, "not_found", f"no template file {relative!r}")


def _same_content(path: str, data: bytes) -> bool:
    return os.path.getsize(path) == len(data) and Path(path).read_bytes() == data


def _converted_image(path: str, preview: str | None, channel: str) -> tuple[bytes, str]:
    """/view with `preview=webp;90` / `jpeg;90` (a smaller encoding; webp when alpha is asked for) or
    `channel=rgb` / `a`."""
    from PIL import Image

    with Image.open(path) as image:
        buffer = io.BytesIO()
        if preview:
            fmt, _, quality = preview.partition(";")
            fmt = fmt if fmt in ("webp", "jpeg") and "a" not in channel else "webp"
            converted = image.convert("RGB") if fmt == "jpeg" or channel == "rgb" else image.convert("RGBA")
            converted.save(buffer, format=fmt, quality=int(quality) if quality.isdigit() else 90)
            return buffer.getvalue(), f"image/{fmt}"
        if channel == "a":
            alpha = image.getchannel("A") if image.mode == "RGBA" else Image.new("L", image.size, 255)
            converted = Image.new("RGBA", image.size)
            converted.putalpha(alpha)
        else:
            converted = image.convert("RGB")
        converted.save(buffer, format="PNG")
        return buffer.getvalue(), "image/png"


def _safetensors_header(path: str, max_size: int = 100 * 1024 * 1024) -> dict | None:
    with open(path, "rb") as f:
        raw_length = f.read(8)
        if len(raw_length) != 8:
            return None
        length = struct.unpack("<Q", raw_length)[0]
        if length > max_size:
            return None
        try:
            return json.loads(f.read(length))
        except ValueError:
            return None


def _ram_total_and_free() -> tuple[int, int]:
    try:
        import psutil
        memory = psutil.virtual_memory()
        return memory.total, memory.available
    except ImportError:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page


def system_stats() -> dict:
    import torch

    ram_total, ram_free = _ram_total_and_free()
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        vram_free, vram_total = torch.cuda.mem_get_info(device)
        torch_total = torch.cuda.memory_reserved(device)
        torch_free = torch_total - torch.cuda.memory_allocated(device)
        name = f"{device} {torch.cuda.get_device_name(device)}"
    else:
        device = torch.device("cpu")
        vram_total, vram_free, torch_total, torch_free = ram_total, ram_free, ram_total, ram_free
        name = "cpu"
    return {
        "system": {
            "os": os.name, "ram_total": ram_total, "ram_free": ram_free,
            "comfyui_version": f"flux2-{_package_version('flux2')}",
            "python_version": sys.version, "pytorch_version": torch.__version__,
            "embedded_python": False, "argv": sys.argv,
            "required_frontend_version": _package_version("comfyui-frontend-package"),
            "installed_templates_version": _package_version("comfyui-workflow-templates"),
            "platform": platform.platform(),
        },
        "devices": [{"name": name, "type": device.type, "index": device.index, "vram_total": vram_total,
                     "vram_free": vram_free, "torch_vram_total": torch_total, "torch_vram_free": torch_free}],
    }


# --- flux2 serve ----------------------------------------------------------------------------------


def _has_flux2_weights() -> bool:
    return bool(folders.get_filename_list("diffusion_models"))


def serve_command(args) -> int:
    """Configure folders, load nodes, start the worker and serve until interrupted."""
    from .run import build_registry, hide_gpu_if

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    hide_gpu_if(args.cpu)
    try:
        folders.configure(models=args.models_dir, input_dir=args.input_dir, output_dir=args.output_dir,
                          temp_dir=args.temp_dir, user_dir=args.user_dir,
                          extra_model_paths=args.extra_model_paths_config)
    except (OSError, ValueError) as exc:  # an unreadable extra_model_paths.yaml, an unwritable folder
        print(f"flux2 serve: {exc}", file=sys.stderr)
        return 2
    folders.install_as_folder_paths()
    os.makedirs(folders.get_public_user_directory(DEFAULT_USER), exist_ok=True)
    if args.demo_models and not _has_flux2_weights():
        from flux2_core.demo_models import write_demo_models
        log.info("no FLUX.2 weights in %s: writing tiny demo models there", folders.models_dir)
        write_demo_models(folders.models_dir)
    if args.demo_models:
        from .demo_inputs import write_demo_inputs
        write_demo_inputs(folders.get_input_directory())

    from .executor import PromptExecutor

    registry = build_registry()
    server = Flux2Server(registry, PromptExecutor(registry))
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"flux2: serving the canvas at http://{shown_host}:{args.port}/ (models: {folders.models_dir})",
          flush=True)
    web.run_app(server.build_app(), host=args.host, port=args.port, print=None, access_log=None)
    return 0
