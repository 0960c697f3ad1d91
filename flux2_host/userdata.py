"""The single user's files under `user/default/`: `/users`, `/userdata` (saved workflows, user.css) and
`/settings` (comfy.settings.json). Every write goes through a temp file and a rename."""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from typing import Callable
from urllib.parse import unquote

from aiohttp import web

from . import folders
from .json_api import RequestError, json_error, json_reply, query_flag, read_json, read_json_object

log = logging.getLogger("flux2.server")

SETTINGS_FILE = "comfy.settings.json"
DEFAULT_USER = "default"


class UserData:
    """Route handlers over the default user's folder."""

    def routes(self) -> list[tuple[str, str, Callable]]:
        return [
            ("GET", "/users", self.get_users), ("POST", "/users", self.post_users),
            ("GET", "/settings", self.get_settings), ("POST", "/settings", self.post_settings),
            ("GET", "/settings/{setting_id}", self.get_setting), ("POST", "/settings/{setting_id}", self.post_setting),
            ("GET", "/userdata", self.list_userdata), ("GET", "/userdata/{file}", self.get_userdata),
            ("POST", "/userdata/{file}", self.post_userdata), ("DELETE", "/userdata/{file}", self.delete_userdata),
            ("POST", "/userdata/{file}/move/{dest}", self.move_userdata),
        ]

    @staticmethod
    def _user_root() -> str:
        return folders.get_public_user_directory(DEFAULT_USER)

    def _user_path(self, relative: str) -> str:
        """A path under the user's folder from a URL parameter (arrives URL-encoded: workflows%2Fa.json)."""
        if "%" in relative:
            relative = unquote(relative)
        root = self._user_root()
        path = os.path.abspath(os.path.join(root, relative))
        if not relative or not folders.is_inside(root, path) or path == os.path.abspath(root):
            raise RequestError(403, "path_refused", f"{relative!r} is not a path inside the user folder")
        return path

    def _file_info(self, path: str) -> dict:
        stat = os.stat(path)
        return {"path": os.path.relpath(path, self._user_root()).replace(os.sep, "/"), "size": stat.st_size,
                "modified": int(stat.st_mtime * 1000), "created": int(stat.st_ctime * 1000)}

    def _written_reply(self, request: web.Request, path: str) -> web.Response:
        if query_flag(request, "full_info"):
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
        recurse, full_info, split = (query_flag(request, n) for n in ("recurse", "full_info", "split"))
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
        if not query_flag(request, "overwrite", default=True) and os.path.exists(path):
            return json_error(409, "file_exists", f"{request.match_info['file']!r} exists and overwrite=false")
        if os.path.isdir(path):
            return json_error(409, "file_exists", f"{request.match_info['file']!r} is a folder")
        try:
            folders.write_atomically(path, await request.read())
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
        if not query_flag(request, "overwrite", default=True) and os.path.exists(dest):
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

    def _read_settings(self) -> dict | None:
        """The stored settings; {} when there are none yet, None when the file holds no JSON object."""
        try:
            with open(self._settings_path(), encoding="utf-8") as f:
                settings = json.load(f)
        except FileNotFoundError:
            return {}
        except (ValueError, UnicodeDecodeError):
            return None
        return settings if isinstance(settings, dict) else None

    def _load_settings(self) -> dict:
        settings = self._read_settings()
        if settings is None:
            log.warning("%s is not a JSON object; answering empty settings", self._settings_path())
        return settings or {}

    def _update_settings(self, changes: dict) -> None:
        """Merge `changes` into the stored settings. An unreadable file is kept aside, never overwritten."""
        path = self._settings_path()
        settings = self._read_settings()
        if settings is None:
            kept = f"{path}.unreadable-{int(time.time())}"
            os.replace(path, kept)
            log.warning("%s is not a JSON object; kept as %s and starting new settings", path, kept)
            settings = {}
        folders.write_atomically(path, json.dumps({**settings, **changes}, indent=4).encode())

    def add_missing_settings(self, defaults: dict) -> None:
        """Store the `defaults` the user has no value for (what the host wants a new user to start with)."""
        settings = self._read_settings()
        missing = {key: value for key, value in defaults.items() if settings is not None and key not in settings}
        if missing:
            self._update_settings(missing)

    async def get_settings(self, request: web.Request) -> web.Response:
        return json_reply(self._load_settings())

    async def get_setting(self, request: web.Request) -> web.Response:
        return json_reply(self._load_settings().get(request.match_info["setting_id"]))

    async def post_settings(self, request: web.Request) -> web.Response:
        changes = await read_json_object(request)
        self._update_settings(changes)
        return json_reply({})

    async def post_setting(self, request: web.Request) -> web.Response:
        value = await read_json(request)
        self._update_settings({request.match_info["setting_id"]: value})
        return json_reply({})
