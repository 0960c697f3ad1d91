"""Scale-out on Redis: `flux2 serve --queue redis://...` and two `flux2 worker` processes against a real
`redis-server` (Debian package) on a free loopback port. One worker is SIGKILLed mid-prompt: its lease runs
out, the prompt runs on the other worker, and every prompt completes exactly once with its progress seen by
the client that posted it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
import redis

from server_harness import FLUX2_SCRIPT, TESTS_DIR, FluxServer, free_port

pytestmark = [pytest.mark.server, pytest.mark.slow]

LEASE_S = 2.0
PROMPTS = 40


def counter_prompt(value: int, steps: int = 6, delay: float = 0.04) -> dict:
    return {"1": {"class_type": "TestSlowCounter", "inputs": {"value": value, "steps": steps, "delay": delay}},
            "2": {"class_type": "TestShowInt", "inputs": {"value": ["1", 0]}}}


@pytest.fixture
def redis_url(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (scripts/test.sh installs the Debian package)")
    port = free_port()
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(tmp_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 20
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.05)
    yield url
    process.kill()
    process.wait()


def start_worker(root: Path, server: FluxServer, url: str, name: str) -> subprocess.Popen:
    env = {**os.environ, "FLUX2_EXTRA_NODES": "host_test_nodes",
           "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    log = open(root / f"{name}.log", "wb")
    process = subprocess.Popen([str(FLUX2_SCRIPT), "worker", "--queue", url, "--lease", str(LEASE_S),
                                "--worker-id", name, "--models-dir", str(server.dirs["models"]),
                                "--output-dir", str(server.dirs["output"]), "--input-dir", str(server.dirs["input"]),
                                "--temp-dir", str(server.dirs["temp"])],
                               stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    log.close()
    return process


async def post_and_collect(server: FluxServer, client_id: str, prompts: list[dict], on_progress) -> dict:
    """Post every prompt with this client's id; collect its events until every prompt's end marker."""
    events: dict[str, list[str]] = {}
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{server.url}/ws?clientId={client_id}") as ws:
            ids = []
            for prompt in prompts:
                async with session.post(server.url + "/api/prompt",
                                        json={"prompt": prompt, "client_id": client_id}) as reply:
                    assert reply.status == 200, await reply.text()
                    ids.append((await reply.json())["prompt_id"])
            ended: set[str] = set()
            async for message in ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                parsed = json.loads(message.data)
                data = parsed["data"]
                prompt_id = data.get("prompt_id") if isinstance(data, dict) else None
                if prompt_id is None:
                    continue
                events.setdefault(prompt_id, []).append(parsed["type"])
                if parsed["type"] == "progress":
                    await asyncio.to_thread(on_progress)
                if parsed["type"] == "executing" and data.get("node") is None:
                    ended.add(prompt_id)
                    if ended >= set(ids):
                        return {prompt_id: events.get(prompt_id, []) for prompt_id in ids}
    raise AssertionError("socket closed early")


def test_two_workers_one_killed_mid_prompt_every_prompt_completes_once(tmp_path, redis_url):
    server = FluxServer(tmp_path, extra_args=("--queue", redis_url)).start()
    workers = {name: start_worker(tmp_path, server, redis_url, name) for name in ("worker-a", "worker-b")}
    client = redis.Redis.from_url(redis_url)
    killed: list[str] = []

    def kill_a_mid_prompt() -> None:
        """On a progress event: once worker-a holds a lease on a running prompt, SIGKILL it (once)."""
        if killed:
            return
        for prompt_id in client.zrange("flux2:leases", 0, -1):
            if client.hget(b"flux2:job:" + prompt_id, "worker") == b"worker-a":
                workers["worker-a"].kill()
                killed.append(prompt_id.decode())
                return

    try:
        for name in workers:  # both ready before the first prompt, so both take part
            deadline = time.monotonic() + 90
            while f"worker {name} taking prompts" not in (tmp_path / f"{name}.log").read_text(errors="replace"):
                assert workers[name].poll() is None and time.monotonic() < deadline, \
                    (tmp_path / f"{name}.log").read_text()
                time.sleep(0.1)
        client_id = uuid.uuid4().hex
        prompts = [counter_prompt(i) for i in range(PROMPTS)]
        events = asyncio.run(asyncio.wait_for(post_and_collect(server, client_id, prompts, kill_a_mid_prompt), 240))

        assert len(killed) == 1 and workers["worker-a"].wait() == -9
        history = server.get("/api/history").json()
        assert sorted(history) == sorted(events) and len(history) == PROMPTS
        for prompt_id, names in events.items():
            record = history[prompt_id]
            value = record["prompt"][2]["1"]["inputs"]["value"]
            assert record["status"]["status_str"] == "success" and record["outputs"]["2"]["text"] == [str(value + 6)]
            assert names.count("execution_success") == 1, (prompt_id, names)  # completed once
            assert "progress" in names  # the posting client saw its progress
        # The prompt worker-a held was run again by worker-b after the lease ran out.
        assert client.hget(f"flux2:job:{killed[0]}", "worker") == b"worker-b"
        b_log = (tmp_path / "worker-b.log").read_text()
        assert f"claimed prompt {killed[0]}" in b_log
    finally:
        for process in workers.values():
            if process.poll() is None:
                process.terminate()
                assert process.wait(60) == 0
        server.stop()


def test_interrupt_cancel_and_history_reach_the_redis_workers(tmp_path, redis_url):
    server = FluxServer(tmp_path, extra_args=("--queue", redis_url)).start()
    worker = start_worker(tmp_path, server, redis_url, "worker-one")
    try:
        busy = {"1": {"class_type": "TestBusyTorch", "inputs": {"seconds": 300.0}},
                "2": {"class_type": "TestShowInt", "inputs": {"value": ["1", 0]}}}
        busy_id = server.post("/api/prompt", {"prompt": busy}).json()["prompt_id"]
        cancelled = server.post("/api/prompt", {"prompt": counter_prompt(1)}).json()["prompt_id"]
        kept = server.post("/api/prompt", {"prompt": counter_prompt(2)}).json()["prompt_id"]
        deadline = time.monotonic() + 90
        while [item[1] for item in server.get("/api/queue").json()["queue_running"]] != [busy_id]:
            assert time.monotonic() < deadline and worker.poll() is None, (tmp_path / "worker-one.log").read_text()
            time.sleep(0.1)
        assert [item[1] for item in server.get("/api/queue").json()["queue_pending"]] == [cancelled, kept]
        assert server.post("/api/queue", {"delete": [cancelled]}).status == 200
        assert server.post("/api/interrupt", {"prompt_id": busy_id}).status == 200
        while server.get(f"/api/history/{kept}").json() == {}:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        history = server.get("/api/history").json()
        assert list(history) == [busy_id, kept]
        assert server.get(f"/api/jobs/{busy_id}").json()["status"] == "cancelled"
        assert history[kept]["outputs"]["2"]["text"] == ["8"]
        assert server.post("/api/prompt", {"prompt": counter_prompt(3), "prompt_id": kept}).status == 409
        assert server.post("/api/history", {"delete": [busy_id]}).status == 200
        assert list(server.get("/api/history").json()) == [kept]
    finally:
        worker.terminate()
        assert worker.wait(60) == 0
        server.stop()
