"""`flux2 serve`: the ComfyUI-compatible HTTP + WebSocket server and the official web canvas.

This module holds the routes and `serve_command`; the parts they are built from live beside it:
`json_api` (replies, request parsing, middlewares), `prompt_queue` (queue, history, the worker thread),
`client_hub` (WebSocket clients), `jobs` (the `/api/jobs` view) and `userdata` (users, user files, settings).

Every route answers under `/` and under `/api` (the frontend only calls `/api/...`). Every error answers
JSON, and no request can stop the server: a handler that raises becomes a 500 JSON reply.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import glob
import importlib.metadata
import importlib.resources
import io
import itertools
import json
import logging
import math
import os
import platform
import ssl
import struct
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from . import default_graph, folders
from .access import AccessPolicy, access_guard, policy_from_args, ssl_context_from_args
from .client_hub import ClientHub, OutboxLimits
from .internal_routes import InternalRoutes
from .jobs import JOB_STATUSES, JobList, find_job
from .logs import LogBuffer, configure_logging
from .memory_refusal import memory_refusal
from .json_api import (RequestError, error_body, errors_as_json, json_error, json_reply, no_cache_for_code,
                       query_int, read_form, read_json, read_json_object)
from .limits import LIMITS, ServiceLimits, prompt_refusal
from .persistence import DATABASE_NAME, PromptStore
from .prompt_queue import PromptQueue, PromptWorker, QueueItem
from .template_index import INDEX_FILE, filter_index, runnable_templates
from .userdata import DEFAULT_USER, UserData
from .workflow import match_windows_model_names

log = logging.getLogger("flux2.server")

MAX_UPLOAD_BYTES = 100 * 1024 * 1024
MAX_FILE_NAME_BYTES = 255  # one path component, on every common file system
SHUTDOWN_WAIT_S = 30  # for the running prompt to notice the interrupt before the process exits anyway


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


def frontend_extensions(web_root: Path) -> list[str]:
    """The frontend's own extension scripts, as the URLs `/extensions` lists."""
    scripts = glob.glob(os.path.join(glob.escape(str(web_root)), "extensions", "**", "*.js"), recursive=True)
    return sorted("/" + os.path.relpath(script, web_root).replace(os.sep, "/") for script in scripts)


@functools.cache
def _package_version(name: str, fallback: str = "unknown") -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return fallback


class Flux2Server:
    """Routes over one registry, one prompt queue, one worker and the WebSocket clients."""

    def __init__(self, registry, executor, policy: AccessPolicy | None = None, limits: ServiceLimits | None = None,
                 outbox_limits: OutboxLimits | None = None, store: PromptStore | None = None,
                 redis_keys=None, log_buffer: LogBuffer | None = None) -> None:
        """`store` keeps the embedded queue on disk; with `redis_keys` (a `redis_queue.RedisKeys`) prompts go
        to Redis instead, for `flux2 worker` processes to run, and their events come back from there."""
        self.registry = registry
        self.executor = executor
        self.policy = policy or AccessPolicy()
        self.limits = limits or ServiceLimits()
        self.hub = ClientHub(outbox_limits)
        self.internal = InternalRoutes(self.hub, log_buffer or LogBuffer())
        if redis_keys is None:
            self.queue = PromptQueue(on_change=self._broadcast_status, store=store)
            self.worker = PromptWorker(self.queue, executor, self.hub)
        else:
            from .redis_queue import RedisEventRelay, RedisQueue
            self.queue = RedisQueue(redis_keys, on_change=self._broadcast_status)
            self.worker = RedisEventRelay(redis_keys, self.hub)
        self.next_number = itertools.count()
        self.userdata = UserData()
        self.job_list = JobList()
        self.web_root = frontend_root()
        self.template_dirs = template_directories()
        # The installed frontend does not change; our own extension swaps its default graph (default_graph.py).
        self.extension_scripts = [*frontend_extensions(self.web_root), default_graph.EXTENSION_URL]

    def _broadcast_status(self, queue_remaining: int) -> None:
        self.hub.send("status", {"status": {"exec_info": {"queue_remaining": queue_remaining}}})

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_UPLOAD_BYTES,
                              middlewares=[errors_as_json, access_guard(self.policy), no_cache_for_code])
        app[LIMITS] = self.limits
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
            ("GET", "/i18n", self.empty_object), ("GET", "/workflow_templates", self.empty_object),
            ("GET", "/global_subgraphs", self.empty_object), ("GET", "/node_replacements", self.empty_object),
            ("GET", "/flux2/default_workflow", self.default_workflow),
            *self.userdata.routes(),
        ]
        for method, path, handler in api:
            app.router.add_route(method, path, handler)
            app.router.add_route(method, "/api" + path, handler)
        for method, path, handler in self.internal.routes():  # ComfyUI serves these under /internal only
            app.router.add_route(method, path, handler)
        app.router.add_get(default_graph.EXTENSION_URL, self.default_graph_extension)
        app.router.add_get("/", self.index)
        app.router.add_get("/templates/{file:.+}", self.template_file)
        self._add_node_pack_routes(app)
        app.router.add_get("/{file:.+}", self.static_file)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        return app

    def _add_node_pack_routes(self, app: web.Application) -> None:
        """What ComfyUI serves for third-party node packs: the routes they declared on
        `PromptServer.instance.routes` (each also under /api), and every WEB_DIRECTORY at /extensions/<pack>/.
        Packs' `send_sync` messages go to the WebSocket clients."""
        from .comfy_api import STAND_IN_MARK

        comfy_server = sys.modules.get("server")
        if getattr(comfy_server, STAND_IN_MARK, False):  # our stand-in, installed when packs were loaded
            pack_server = comfy_server.PromptServer.instance
            pack_server.attach(self.hub.send)
            for route in pack_server.routes:
                try:
                    if isinstance(route, web.RouteDef):
                        app.router.add_route(route.method, "/api" + route.path, route.handler, **route.kwargs)
                    route.register(app.router)
                except (RuntimeError, ValueError) as exc:  # a path or method the host already serves
                    log.error("a node pack's route %r not added: %s", route, exc)
        for name, directory in self.registry.web_directories.items():
            app.router.add_static(f"/extensions/{name}", directory)

    async def _on_startup(self, app: web.Application) -> None:
        await self.hub.start()
        self.worker.start()

    async def _on_shutdown(self, app: web.Application) -> None:
        # The running prompt is interrupted and the worker stopped before the interpreter exits: a thread
        # still inside torch at exit aborts the process. Open sockets would hold the shutdown until their
        # browsers leave.
        await asyncio.to_thread(self.worker.stop, SHUTDOWN_WAIT_S)
        await self.hub.close_all(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")

    # --- WebSocket ---

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        status = {"status": {"exec_info": {"queue_remaining": self.queue.queue_remaining()}}, "sid": sid}
        # A reconnect with the same clientId replaces the old socket.
        self.hub.add(sid, ws, request.transport, greeting=("status", status))
        try:
            async for message in ws:
                if message.type == WSMsgType.TEXT:
                    self._on_client_message(sid, message.data)
        finally:
            self.hub.remove(sid, ws)
        return ws

    def _on_client_message(self, sid: str, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            return
        if isinstance(message, dict) and message.get("type") == "feature_flags":
            flags = message.get("data")
            self.hub.set_features(sid, flags if isinstance(flags, dict) else {})
            self.hub.send("feature_flags", self.server_features(), sid)

    # --- prompts and queue ---

    async def get_prompt(self, request: web.Request) -> web.Response:
        return json_reply({"exec_info": {"queue_remaining": self.queue.queue_remaining()}})

    async def post_prompt(self, request: web.Request) -> web.Response:
        from .executor import validate_prompt  # torch comes with it: loaded after serve_command applied --cpu

        body = await read_json_object(request)
        prompt = body.get("prompt")
        if prompt is None:
            return _prompt_refused(error_body("no_prompt", "No prompt provided"))
        if not isinstance(prompt, dict):
            message = f"prompt must be an object of nodes (API format), got {type(prompt).__name__}"
            return _prompt_refused(error_body("invalid_prompt", message))
        # Workflows saved on Windows name model files `sub\\model.safetensors`; the combos list `sub/model...`.
        prompt = await asyncio.to_thread(match_windows_model_names, prompt, self.registry)
        too_much = prompt_refusal(prompt, self.limits)
        if too_much is not None:
            return _prompt_refused(error_body("limit_exceeded", too_much))
        targets = body.get("partial_execution_targets")
        if targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
            raise RequestError(400, "invalid_prompt", "partial_execution_targets must be a list of node ids")
        validation = await asyncio.to_thread(validate_prompt, prompt, self.registry, targets)
        if not validation.ok:
            return _prompt_refused(validation.error, validation.node_errors)
        cannot_fit = await asyncio.to_thread(memory_refusal, prompt, self.limits.memory_budget_bytes)
        if cannot_fit is not None:
            return _prompt_refused(error_body("limit_exceeded", cannot_fit))

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
        if not self.queue.put_new(QueueItem(number, prompt_id, prompt, extra_data, list(validation.outputs))):
            raise RequestError(409, "duplicate_prompt_id", f"prompt_id {prompt_id!r} is already queued or in history")
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
        max_items = query_int(request, "max_items", None)
        offset = query_int(request, "offset", None)
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
        return self.queue.interrupt_running(prompt_id, self.executor.interrupt)

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
        limit = query_int(request, "limit", None, minimum=1)
        offset = query_int(request, "offset", 0)
        workflow_id = request.query.get("workflow_id")

        jobs = self.job_list.list(*self.queue.snapshot(), statuses, workflow_id, sort_by, sort_order)
        total = len(jobs)
        page = jobs[offset:] if limit is None else jobs[offset:offset + limit]
        return json_reply({"jobs": page, "pagination": {
            "offset": offset, "limit": limit if limit is not None else total, "total": total,
            "has_more": offset + len(page) < total}})

    async def get_job(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        job = find_job(job_id, *self.queue.snapshot())
        if job is not None:
            return json_reply(job)
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
        if not folders.is_inside(directory, folder) or not folders.is_inside(directory, path):
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
        if not folders.is_inside(directory, folder) or not folders.is_inside(directory, path) or os.path.dirname(path) != folder:
            raise RequestError(400, "path_refused", "file name and subfolder may not leave the upload folder")
        data = image.file.read()
        if original_ref is not None:
            data = self._masked_original(original_ref, data)
        else:
            _check_is_image(image.filename, data)
        name = image.filename
        if str(post.get("overwrite", "")).lower() in ("true", "1"):
            unchanged = os.path.exists(path) and _same_content(path, data)
        else:
            stem, extension = os.path.splitext(image.filename)
            for n in itertools.count(1):
                if not os.path.exists(path) or _same_content(path, data):
                    break
                name = f"{stem} ({n}){extension}"
                path = os.path.join(folder, name)
            unchanged = os.path.exists(path)  # the loop stopped at a free name or at identical content
        for part in (*subfolder.replace("\\", "/").split("/"), name):
            if len(os.fsencode(part)) > MAX_FILE_NAME_BYTES:
                raise RequestError(400, "name_too_long", f"file name or folder {part[:40]!r}... is "
                                   f"{len(os.fsencode(part))} bytes; at most {MAX_FILE_NAME_BYTES} fit in a folder")
        if not unchanged:
            folders.write_atomically(path, data)
        return {"name": name, "subfolder": subfolder, "type": upload_type}

    def _masked_original(self, original_ref: dict, mask_png: bytes) -> bytes:
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo

        name, annotated_dir = folders.annotated_filepath(original_ref["filename"])
        directory = annotated_dir or self._directory_of_type(original_ref.get("type") or "output")
        path = os.path.join(directory, original_ref.get("subfolder") or "", name)
        if not folders.is_inside(directory, path) or not os.path.isfile(path):
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
        from .custom_packs import extension_scripts

        return json_reply(self.extension_scripts + extension_scripts(self.registry.web_directories))

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

    async def default_workflow(self, request: web.Request) -> web.Response:
        return json_reply(await asyncio.to_thread(default_graph.default_workflow, self.registry))

    async def default_graph_extension(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(default_graph.WEB_DIRECTORY / "default_graph.js",
                                headers={"Content-Type": "text/javascript"})

    # --- frontend and templates ---

    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(self.web_root / "index.html")

    async def static_file(self, request: web.Request) -> web.StreamResponse:
        """The frontend's files. Anything else under GET ends here too, so it answers a JSON 404."""
        relative = request.match_info["file"]
        path = self.web_root / relative
        if folders.is_inside(str(self.web_root), str(path)) and path.is_file():
            return web.FileResponse(path)
        return json_error(404, "not_found", f"no route or file {request.path!r}")

    async def template_file(self, request: web.Request) -> web.StreamResponse:
        relative = request.match_info["file"]
        for directory in self.template_dirs:
            path = directory / relative
            if folders.is_inside(str(directory), str(path)) and path.is_file():
                if INDEX_FILE.fullmatch(relative):
                    return json_reply(await asyncio.to_thread(self._runnable_template_index, path))
                if path.suffix == ".json":
                    return web.FileResponse(path, headers={"Content-Type": "application/json"})
                return web.FileResponse(path)
        return json_error(404, "not_found", f"no template file {relative!r}")


    @functools.cached_property
    def _runnable_templates(self) -> set[str]:
        return runnable_templates(self.template_dirs, self.registry.classes)

    def _runnable_template_index(self, path: Path) -> object:
        """The templates dialog's index with only the templates whose node types this host has."""
        return filter_index(json.loads(path.read_text(encoding="utf-8")), self._runnable_templates)


def _prompt_refused(error: dict, node_errors: dict | None = None) -> web.Response:
    """POST /prompt's 400 reply, in ComfyUI's shape."""
    return json_reply({"error": error, "node_errors": node_errors or {}}, 400)


def _check_is_image(filename: str, data: bytes) -> None:
    """Refuse an upload PIL cannot read as an image: LoadImage, the only reader of uploads here, would fail later."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise RequestError(400, "not_an_image", f"{filename!r} is not an image (expected PNG, JPEG, WebP or another "
                                                f"format Pillow reads): {exc}") from None


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


DEMO_FILE_KINDS = ("diffusion_models", "text_encoders", "vae", "loras")


def demo_model_files() -> list[str]:
    """`kind/name` of every model in the combos that `flux2 demo-models` wrote (random weights)."""
    from flux2_core.checkpoints.detect import is_demo_model
    from flux2_core.checkpoints.reader import open_checkpoint
    from flux2_core.errors import CheckpointError

    demo = []
    for kind in DEMO_FILE_KINDS:
        for name in folders.get_filename_list(kind):
            try:
                with open_checkpoint(folders.get_full_path(kind, name)) as source:
                    if is_demo_model(source.metadata):
                        demo.append(f"{kind}/{name}")
            except CheckpointError:
                continue  # a broken file is reported when a loader uses it
    return demo


def remove_partial_writes(directory: str) -> None:
    """Delete the temp files of writes a killed process never finished (`folders.write_atomically` names
    them .tmp-*): no one will finish them, and they must not be served."""
    for path in glob.glob(os.path.join(glob.escape(directory), "**", ".tmp-*"), recursive=True):
        log.info("removing %s, a write the last run did not finish", path)
        os.unlink(path)


def serve_command(args) -> int:
    """Configure folders, load nodes, start the worker and serve until interrupted."""
    from .run import build_registry, set_up_host

    log_buffer = configure_logging()
    if not set_up_host(args, "serve"):
        return 2
    os.makedirs(folders.get_public_user_directory(DEFAULT_USER), exist_ok=True)
    UserData().add_missing_settings(default_graph.FIRST_VISIT_SETTINGS)
    if args.demo_models and not folders.get_filename_list("diffusion_models"):  # no FLUX.2 weights
        from flux2_core.demo_models import write_demo_models
        log.info("no FLUX.2 weights in %s: writing tiny demo models there", folders.models_dir)
        write_demo_models(folders.models_dir)
    if args.demo_models:
        from .demo_inputs import write_demo_dataset, write_demo_inputs
        write_demo_inputs(folders.get_input_directory())
        write_demo_dataset(folders.get_input_directory())
    demo_files = demo_model_files()
    if demo_files:
        log.warning("%d model file(s) in %s are tiny random demo stand-ins, so images are noise: %s. "
                    "Replace them with real FLUX.2 files (README: 'Model files').", len(demo_files),
                    folders.models_dir, ", ".join(demo_files))

    for directory in (folders.get_output_directory(), folders.get_temp_directory()):
        remove_partial_writes(directory)
    from .executor import PromptExecutor

    try:
        policy, ssl_context = policy_from_args(args), ssl_context_from_args(args)
    except (OSError, ValueError, ssl.SSLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    registry = build_registry()
    store = redis_keys = None
    if args.queue == "sqlite":
        store = PromptStore(os.path.join(folders.get_user_directory(), DATABASE_NAME))
    else:
        from .redis_queue import connect_redis
        redis_keys = connect_redis(args.queue, "serve")
        if redis_keys is None:
            return 2
    server = Flux2Server(registry, PromptExecutor(registry, preview_method=args.preview_method), policy,
                         ServiceLimits.from_args(args), OutboxLimits(args.ws_max_queued, args.ws_send_timeout), store,
                         redis_keys, log_buffer)
    pending, interrupted = server.queue.restore(args.on_restart)
    server.next_number = itertools.count(int(max(server.queue.largest_number(), -1)) + 1)
    if pending or interrupted:
        log.info("restored %d pending prompt(s); %d interrupted by the last stop (%s)", pending, interrupted,
                 "queued again" if args.on_restart == "requeue" else "recorded as failed")
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    # aiohttp calls `print` once the port is bound, so a busy port never announces the canvas.
    scheme = "https" if ssl_context else "http"
    serving = f"flux2: serving the canvas at {scheme}://{shown_host}:{args.port}/ (models: {folders.models_dir})"
    try:
        web.run_app(server.build_app(), host=args.host, port=args.port, ssl_context=ssl_context, access_log=None,
                    print=lambda _aiohttp_banner: print(serving, flush=True))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE and "address already in use" not in str(exc).lower():
            raise
        print(f"flux2 serve: port {args.port} on {args.host} is already in use (another flux2 serve or ComfyUI?); "
              f"choose another with --port", file=sys.stderr)
        return 1
    return 0
