"""Soak: 8 WebSocket clients x 25 prompts (each saving a PNG) against one `flux2 serve`, SIGKILLed and
restarted twice on the same port while they run. Every accepted prompt completes exactly once (or is
reported failed), every file in output/ is a whole PNG, no client receives another's events, and the RSS of
the last server returns to its baseline. Loopback only, bounded to a few minutes on 2 cores."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import psutil
import pytest
from PIL import Image

from server_harness import FluxServer

pytestmark = [pytest.mark.server, pytest.mark.slow]

CLIENTS = 8
PROMPTS_PER_CLIENT = 25
KILL_AFTER_FINISHED = (50, 120)  # SIGKILL the server when history holds this many of the prompts


def saving_prompt(client: int, index: int) -> dict:
    return {"1": {"class_type": "TestSolidImage", "inputs": {"value": (client * 31 + index) % 256, "size": 64}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": f"soak/c{client}"}}}


class Soak:
    def __init__(self, server: FluxServer) -> None:
        self.server = server
        self.url = server.url
        self.foreign: list[tuple[str, str]] = []  # (client id, prompt id of another client's event)
        self.accepted: set[str] = set()
        self.done = asyncio.Event()

    async def _history_of(self, session: aiohttp.ClientSession, prompt_id: str) -> dict | None:
        async with session.get(f"{self.url}/api/history/{prompt_id}") as reply:
            return (await reply.json()).get(prompt_id)

    async def listen(self, client_id: str) -> None:
        """This client's socket, reconnected after each restart; records events of other clients' prompts."""
        async with aiohttp.ClientSession() as session:
            while not self.done.is_set():
                try:
                    async with session.ws_connect(f"{self.url}/ws?clientId={client_id}") as ws:
                        async for message in ws:
                            if message.type != aiohttp.WSMsgType.TEXT:
                                continue
                            data = json.loads(message.data)["data"]
                            prompt_id = data.get("prompt_id") if isinstance(data, dict) else None
                            if prompt_id and not prompt_id.startswith(client_id + "-"):
                                self.foreign.append((client_id, prompt_id))
                except (aiohttp.ClientError, ConnectionError):
                    pass
                await asyncio.sleep(0.1)

    async def client(self, number: int) -> None:
        """Post 25 prompts with client-chosen ids (a POST lost in a restart is retried; 409 means the first
        one got in), then wait until each is in history."""
        client_id = f"client{number}"
        listener = asyncio.create_task(self.listen(client_id))
        ids = [f"{client_id}-{index}" for index in range(PROMPTS_PER_CLIENT)]
        async with aiohttp.ClientSession() as session:
            for index, prompt_id in enumerate(ids):
                while True:
                    try:
                        async with session.post(f"{self.url}/api/prompt", json={
                                "prompt": saving_prompt(number, index), "client_id": client_id,
                                "prompt_id": prompt_id}) as reply:
                            if reply.status in (200, 409):
                                self.accepted.add(prompt_id)
                                break
                            raise AssertionError(await reply.text())
                    except (aiohttp.ClientError, ConnectionError):
                        await asyncio.sleep(0.2)
            for prompt_id in ids:
                while True:
                    try:
                        if await self._history_of(session, prompt_id) is not None:
                            break
                    except (aiohttp.ClientError, ConnectionError):
                        pass
                    await asyncio.sleep(0.2)
        listener.cancel()

    async def finished_count(self, session: aiohttp.ClientSession) -> int:
        try:
            async with session.get(f"{self.url}/api/history") as reply:
                return len(await reply.json())
        except (aiohttp.ClientError, ConnectionError):
            return 0

    async def killer(self, kills: list[int]) -> None:
        """SIGKILL the server at each threshold and start it again on the same port and folders."""
        async with aiohttp.ClientSession() as session:
            for threshold in KILL_AFTER_FINISHED:
                while await self.finished_count(session) < threshold:
                    await asyncio.sleep(0.1)
                self.server.process.kill()
                self.server.process.wait()
                kills.append(threshold)
                restarted = FluxServer(self.server.root)
                restarted.port, restarted.url = self.server.port, self.server.url
                self.server = await asyncio.to_thread(restarted.start)


def test_soak_8_clients_x_25_prompts_through_two_kill_9_restarts(tmp_path):
    server = FluxServer(tmp_path).start()
    soak = Soak(server)
    kills: list[int] = []

    async def run() -> float:
        started = time.monotonic()
        killer = asyncio.create_task(soak.killer(kills))
        await asyncio.gather(*(soak.client(n) for n in range(CLIENTS)))
        await killer
        soak.done.set()
        return time.monotonic() - started

    try:
        elapsed = asyncio.run(asyncio.wait_for(run(), 600))
        server = soak.server
        process = psutil.Process(server.process.pid)
        baseline = process.memory_info().rss

        history = server.get("/api/history").json()
        expected = {f"client{n}-{i}" for n in range(CLIENTS) for i in range(PROMPTS_PER_CLIENT)}
        assert soak.accepted == expected and set(history) == expected  # each accepted prompt once, no other
        statuses = {prompt_id: record["status"]["status_str"] for prompt_id, record in history.items()}
        assert set(statuses.values()) <= {"success", "error"}
        for prompt_id, record in history.items():
            if statuses[prompt_id] == "success":
                for image in record["outputs"]["2"]["images"]:
                    assert (server.dirs["output"] / image["subfolder"] / image["filename"]).is_file()
        assert soak.foreign == []
        assert len(kills) == 2

        files = [path for path in server.dirs["output"].rglob("*") if path.is_file()]
        assert not [path for path in files if path.name.startswith(".tmp-")]
        for path in files:
            with Image.open(path) as image:
                image.load()  # a truncated PNG raises here
                assert image.size == (64, 64)

        # The last server ran the remaining prompts; one more round of 25 must leave its RSS where it was.
        for index in range(PROMPTS_PER_CLIENT):
            assert server.post("/api/prompt", {"prompt": saving_prompt(0, index)}).status == 200
        while server.get("/api/prompt").json()["exec_info"]["queue_remaining"]:
            time.sleep(0.2)
        after = process.memory_info().rss
        successes = sum(status == "success" for status in statuses.values())
        print(f"\nsoak: {len(expected)} prompts, {successes} succeeded, {len(expected) - successes} failed, "
              f"{len(files)} PNGs, {elapsed:.1f} s, SIGKILL + restart at {kills} finished, RSS {baseline / 2**20:.0f} MiB -> "
              f"{after / 2**20:.0f} MiB after 25 more")
        assert after <= baseline * 1.1 + 32 * 2**20, (baseline, after)
    finally:
        soak.done.set()
        soak.server.stop()
