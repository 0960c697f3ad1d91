"""A real `flux2 serve` on a free loopback port, with its own folders, and a client to drive it.

`FluxServer` starts the subprocess (with the test node pack `host_test_nodes` added through the
FLUX2_EXTRA_NODES developer variable), waits until it answers, and stops it. Its HTTP helpers are plain
blocking calls; `run_prompt` opens a WebSocket the way the web frontend does, queues a prompt and
collects every message until the `executing {node: null}` end marker for that prompt.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import aiohttp

TESTS_DIR = Path(__file__).resolve().parent
FLUX2_SCRIPT = Path(sys.executable).with_name("flux2")
START_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";")[0]


@dataclass
class PromptRun:
    """What one queued prompt produced: the POST reply and the WebSocket messages until its end marker, less
    those of other prompts."""
    prompt_id: str
    reply: dict
    messages: list[tuple[str, dict]] = field(default_factory=list)
    binary_frames: list[bytes] = field(default_factory=list)

    def events(self, event: str) -> list[dict]:
        return [data for name, data in self.messages if name == event]

    @property
    def event_names(self) -> list[str]:
        return [name for name, _ in self.messages]


class FluxServer:
    """`flux2 serve` in a subprocess, with models/, input/, output/, temp/ and user/ under `root`."""

    def __init__(self, root: Path, extra_args: tuple[str, ...] = (), extra_nodes: str = "host_test_nodes",
                 headers: dict[str, str] | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        """`headers` go with every request (an auth token); `ssl_context` trusts a TLS server's certificate."""
        self.root = root
        self.port = free_port()
        self.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{self.port}"
        self.headers = headers or {}
        self.ssl_context = ssl_context
        self.dirs = {name: root / name for name in ("models", "input", "output", "temp", "user")}
        self.extra_args = extra_args
        self.extra_nodes = extra_nodes
        self.log_path = root / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> "FluxServer":
        for directory in self.dirs.values():
            directory.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "FLUX2_EXTRA_NODES": self.extra_nodes,
               "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
        command = [str(FLUX2_SCRIPT), "serve", "--host", "127.0.0.1", "--port", str(self.port),
                   "--models-dir", str(self.dirs["models"]), "--input-dir", str(self.dirs["input"]),
                   "--output-dir", str(self.dirs["output"]), "--temp-dir", str(self.dirs["temp"]),
                   "--user-dir", str(self.dirs["user"]), *self.extra_args]
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"flux2 serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                if self.get("/api/prompt").status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"flux2 serve did not answer within {START_TIMEOUT_S}s:\n{self.log()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- HTTP ---

    def request(self, method: str, path: str, body: bytes | None = None, json_body: Any = None,
                headers: dict[str, str] | None = None, params: dict | None = None) -> Reply:
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        headers = {**self.headers, **(headers or {})}
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers.setdefault("Content-Type", "application/json")
        request = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30, context=self.ssl_context) as response:
                return Reply(response.status, response.read(), dict(response.headers))
        except urllib.error.HTTPError as error:
            return Reply(error.code, error.read(), dict(error.headers))

    def get(self, path: str, **params: Any) -> Reply:
        return self.request("GET", path, params=params or None)

    def post(self, path: str, json_body: Any = None, **params: Any) -> Reply:
        return self.request("POST", path, json_body=json_body if json_body is not None else {}, params=params or None)

    def upload(self, filename: str, data: bytes, route: str = "/api/upload/image", **fields: str) -> Reply:
        """POST an upload as a browser does: multipart with the file name sent exactly as given."""
        boundary = uuid.uuid4().hex
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
                 for name, value in fields.items()]
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                     f'Content-Type: image/png\r\n\r\n'.encode() + data + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return self.request("POST", route, body=body,
                            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})

    # --- prompts over the WebSocket ---

    def run_prompt(self, prompt: dict, *, client_id: str | None = None, feature_flags: dict | None = None,
                   on_message: Callable[[str, dict], None] | None = None, timeout: float = 60,
                   **body: Any) -> PromptRun:
        """Connect a socket, POST the prompt with that socket's id, collect until its end marker.

        A 400 reply comes back as a PromptRun with an empty prompt_id and no messages.
        """
        client_id = client_id or uuid.uuid4().hex
        return asyncio.run(asyncio.wait_for(
            self._run_prompt(prompt, client_id, feature_flags or {}, on_message, body), timeout))

    async def _run_prompt(self, prompt, client_id, feature_flags, on_message, body) -> PromptRun:
        connector = aiohttp.TCPConnector(ssl=self.ssl_context or True)
        async with aiohttp.ClientSession(headers=self.headers, connector=connector) as session:
            async with session.ws_connect(f"{self.url}/ws?clientId={client_id}") as ws:
                await ws.send_json({"type": "feature_flags", "data": feature_flags})
                first = await ws.receive_json()
                assert first["type"] == "status" and first["data"]["sid"] == client_id, first
                async with session.post(self.url + "/api/prompt",
                                        json={"prompt": prompt, "client_id": client_id, **body}) as response:
                    reply = await response.json()
                    if response.status != 200:
                        return PromptRun("", {"status": response.status, **reply})
                run = PromptRun(reply["prompt_id"], reply)
                async for message in ws:
                    if message.type == aiohttp.WSMsgType.BINARY:
                        run.binary_frames.append(message.data)
                        continue
                    if message.type != aiohttp.WSMsgType.TEXT:
                        raise AssertionError(f"socket closed before the end marker: {message}")
                    parsed = json.loads(message.data)
                    data = parsed["data"]
                    # A prompt queued without a client_id broadcasts its events to every socket: not ours.
                    if isinstance(data, dict) and data.get("prompt_id", run.prompt_id) != run.prompt_id:
                        continue
                    run.messages.append((parsed["type"], data))
                    if on_message is not None:
                        await asyncio.to_thread(on_message, parsed["type"], data)
                    if (parsed["type"] == "executing" and data.get("node") is None
                            and data.get("prompt_id") == run.prompt_id):
                        return run
        raise AssertionError("socket closed before the end marker")
