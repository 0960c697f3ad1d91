"""The JSON side of every route: refusals as `RequestError`, JSON replies and error bodies, reading request
bodies and query parameters, and the middlewares every request passes (errors as JSON, no caching of
code; who may ask at all is `access`).

Every error answers JSON, and no request can stop the server: a handler that raises becomes a 500 JSON reply.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from .errors import error_body  # replies are built on it; importable from here as before
from .limits import json_depth, limits_of

log = logging.getLogger("flux2.server")


class RequestError(Exception):
    """A request the server refuses; becomes a JSON error reply with this status."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type


def dumps(value: Any) -> str:
    # Node ui dicts come from third-party code; an odd value is shown as text rather than failing the reply.
    return json.dumps(value, default=str)


def json_reply(value: Any, status: int = 200) -> web.Response:
    return web.json_response(value, status=status, dumps=dumps)


def json_error(status: int, error_type: str, message: str) -> web.Response:
    return json_reply({"error": error_body(error_type, message)}, status)


def query_int(request: web.Request, name: str, default: int | None, minimum: int = 0) -> int | None:
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


def query_flag(request: web.Request, name: str, default: bool = False) -> bool:
    raw = request.query.get(name)
    return default if raw is None else raw.lower() in ("true", "1")


async def read_json(request: web.Request, default: Any = None) -> Any:
    """The request body as JSON; an empty body is `default`; anything unparseable is a 400, a body over the
    server's size or nesting limit a 413 (read no further than the limit)."""
    limits = limits_of(request)
    too_big = RequestError(413, "body_too_large", f"a JSON body may hold at most {limits.max_json_bytes} bytes "
                                                  f"(--max-json-bytes)")
    if request.content_length is not None and request.content_length > limits.max_json_bytes:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limits.max_json_bytes:
            raise too_big
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        return default
    try:
        value = json.loads(body, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise RequestError(400, "invalid_json", f"request body is not valid JSON: {exc}") from None
    if json_depth(value) > limits.max_json_depth:
        raise RequestError(413, "too_deeply_nested", f"JSON nests deeper than {limits.max_json_depth} levels "
                                                     f"(--max-json-depth)")
    return value


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


@web.middleware
async def no_cache_for_code(request: web.Request, handler):
    response = await handler(request)
    if request.path.endswith((".js", ".css", ".html")) or request.path == "/":
        response.headers.setdefault("Cache-Control", "no-cache")
    return response
