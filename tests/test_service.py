"""`flux2 serve` as a long-running service under attack and fault: cross-site requests, a WebSocket client
that never reads, SIGTERM mid-run, oversized requests, bad upload names and duplicate prompt ids.
Each test reproduces one defect of issue 11 against a real `flux2 serve` subprocess on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import uuid

import aiohttp
import pytest

from server_harness import FluxServer

pytestmark = pytest.mark.server


def slow_prompt(value: int, steps: int = 3, delay: float = 0.0) -> dict:
    return {"1": {"class_type": "TestSlowCounter", "inputs": {"value": value, "steps": steps, "delay": delay}},
            "2": {"class_type": "TestShowInt", "inputs": {"value": ["1", 0]}}}


def wait_until(condition, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def running_ids(server: FluxServer) -> list[str]:
    return [item[1] for item in server.get("/api/queue").json()["queue_running"]]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    running = FluxServer(root, extra_args=(
        "--allow-host", "flux.example", "--max-json-bytes", "200000", "--max-json-depth", "40",
        "--max-text-chars", "5000", "--max-pixels", str(2048 * 2048), "--max-batch", "16",
        "--ws-max-queued", "32", "--ws-send-timeout", "2")).start()
    yield running
    running.stop()


# --- defect 1: cross-site requests ------------------------------------------------------------------------

CROSS_SITE_HOSTS = ["x.localhost", "localhost.", "0.0.0.0", "[::ffff:127.0.0.1]", "attacker.example"]


def cross_site_headers(host: str) -> dict[str, str]:
    return {"Host": host, "Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site",
            "Content-Type": "text/plain"}


@pytest.mark.parametrize("host", CROSS_SITE_HOSTS + ["127.0.0.1:{port}", "localhost:{port}"])
def test_cross_site_requests_are_refused_for_every_method(server, host):
    host = host.format(port=server.port)
    prompt = json.dumps({"prompt": slow_prompt(1)}).encode()
    css = server.dirs["user"] / "default" / "user.css"
    before = css.read_bytes() if css.exists() else None
    attempts = [("POST", "/api/prompt", prompt), ("POST", "/api/userdata/user.css", b"body{display:none}"),
                ("DELETE", "/api/userdata/user.css", None), ("PUT", "/api/settings", b"{}"),
                ("POST", "/api/queue", b'{"clear": true}')]
    for method, path, body in attempts:
        reply = server.request(method, path, body=body, headers=cross_site_headers(host))
        assert reply.status == 403, (method, path, host, reply.status, reply.body)
    assert (css.read_bytes() if css.exists() else None) == before
    assert server.get("/api/queue").json()["queue_pending"] == []

    async def upgrade() -> int:
        async with aiohttp.ClientSession() as session:
            try:
                async with session.ws_connect(f"{server.url}/ws", headers=cross_site_headers(host)):
                    return 101
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status
    assert asyncio.run(upgrade()) == 403


@pytest.mark.parametrize("headers,error", [
    ({"Origin": "http://evil.example"}, "origin_mismatch"),
    ({"Origin": "null"}, "origin_mismatch"),
    ({"Origin": "http://127.0.0.1:1"}, "origin_mismatch"),  # same host, another port: another origin
    ({"Sec-Fetch-Site": "cross-site"}, "cross_site"),
    ({"Host": "rebound.attacker.example"}, "host_refused"),  # DNS rebinding: no Origin, a foreign name
])
def test_each_cross_site_signal_is_refused_on_its_own(server, headers, error):
    reply = server.request("POST", "/api/prompt", json_body={"prompt": slow_prompt(1)}, headers=headers)
    assert reply.status == 403 and reply.json()["error"]["type"] == error, reply.body


def test_same_origin_and_allowed_hosts_still_work(server):
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", f"flux.example:{server.port}"):
        headers = {"Host": host, "Origin": f"http://{host}", "Sec-Fetch-Site": "same-origin"}
        reply = server.request("POST", "/api/prompt", json_body={"prompt": slow_prompt(2)}, headers=headers)
        assert reply.status == 200, (host, reply.body)
    # A link followed from another site opens the canvas (a navigation), but reads nothing else.
    navigation = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
    assert server.request("GET", "/", headers=navigation).status == 200
    assert server.request("GET", "/api/history", headers={"Sec-Fetch-Site": "cross-site",
                                                          "Sec-Fetch-Mode": "cors"}).status == 403


# --- defect 2: a WebSocket client that never reads --------------------------------------------------------


def connect_without_reading(server: FluxServer, client_id: str) -> socket.socket:
    """A raw WebSocket client with a tiny receive buffer that completes the handshake and then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                  f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
    handshake = b""
    while b"\r\n\r\n" not in handshake:
        handshake += sock.recv(1)
    assert handshake.startswith(b"HTTP/1.1 101"), handshake
    return sock


def test_a_client_that_never_reads_is_dropped_and_holds_no_one_else(server):
    stalled_id = "stalled-" + uuid.uuid4().hex
    stalled = connect_without_reading(server, stalled_id)
    try:
        # Megabytes of progress events for the stalled client: far more than the socket buffers hold.
        loud = {"1": {"class_type": "TestLoudPreviews", "inputs": {"steps": 40000, "cells": 1}},
                "2": {"class_type": "TestShowInt", "inputs": {"value": ["1", 0]}}}
        reply = server.post("/api/prompt", {"prompt": loud, "client_id": stalled_id})
        assert reply.status == 200
        run = server.run_prompt(slow_prompt(7), timeout=60)  # queued behind the loud prompt
        assert run.events("executed")[0]["output"] == {"text": ["10"]}
        wait_until(lambda: f"websocket client '{stalled_id}' dropped" in server.log(), what="the drop")
    finally:
        stalled.close()


# --- defect 3: SIGTERM / Ctrl-C during a run --------------------------------------------------------------


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_run_interrupts_it_and_exits_0(tmp_path, stop_signal):
    # Listening on every interface without a token or TLS, to see the start-up warnings too.
    server = FluxServer(tmp_path, extra_args=("--host", "0.0.0.0")).start()
    try:
        busy = {"1": {"class_type": "TestBusyTorch", "inputs": {"seconds": 300.0}},
                "2": {"class_type": "TestShowInt", "inputs": {"value": ["1", 0]}}}
        prompt_id = server.post("/api/prompt", {"prompt": busy}).json()["prompt_id"]
        wait_until(lambda: running_ids(server) == [prompt_id], what="the prompt to run")
        time.sleep(0.5)  # inside the torch loop
        server.process.send_signal(stop_signal)
        assert server.process.wait(60) == 0, server.log()
        assert "terminate called" not in server.log()
        assert f"prompt {prompt_id} interrupted" in server.log()
        assert "without --auth-token" in server.log() and "without TLS" in server.log()
    finally:
        server.stop()


# --- defect 6: limits -------------------------------------------------------------------------------------


def test_oversized_and_deeply_nested_bodies_are_refused_and_history_keeps_answering(server):
    deep = '{"x": ' * 970 + '"bottom"' + "}" * 970  # by hand: json.dumps itself gives up near 1000 levels
    body = ('{"prompt": %s, "extra_data": {"nest": %s}}' % (json.dumps(slow_prompt(1)), deep)).encode()
    reply = server.request("POST", "/api/prompt", body=body, headers={"Content-Type": "application/json"})
    assert reply.status == 413 and reply.json()["error"]["type"] == "too_deeply_nested"
    big = json.dumps({"prompt": slow_prompt(1), "extra_data": {"blob": "x" * 300_000}}).encode()
    reply = server.request("POST", "/api/prompt", body=big, headers={"Content-Type": "application/json"})
    assert reply.status == 413 and reply.json()["error"]["type"] == "body_too_large"
    assert server.get("/api/history").status == 200


@pytest.mark.parametrize("node,expected", [
    ({"class_type": "TestConstantString", "inputs": {"text": "y" * 5001}}, "5001 characters"),
    ({"class_type": "EmptyFlux2LatentImage", "inputs": {"width": 16384, "height": 16384, "batch_size": 1}},
     "16384x16384"),
    ({"class_type": "EmptyFlux2LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 4096}},
     "batch of 4096"),
])
def test_prompts_over_the_limits_are_refused_naming_node_and_input(server, node, expected):
    reply = server.post("/api/prompt", {"prompt": {"9": node}})
    assert reply.status == 400, reply.body
    error = reply.json()["error"]
    assert error["type"] == "limit_exceeded" and expected in error["message"] and "node 9" in error["message"]


def memory_prompt(width: int, height: int, batch_size: int) -> dict:
    """The demo klein 4B with its text encoder and VAE, at one size; every model shown so each is used."""
    nodes = {"1": ("UNETLoader", {"unet_name": "flux-2-klein-4b.safetensors", "weight_dtype": "default"}),
             "2": ("CLIPLoader", {"clip_name": "qwen_3_4b.safetensors", "type": "flux2"}),
             "3": ("VAELoader", {"vae_name": "flux2-vae.safetensors"}),
             "4": ("EmptyFlux2LatentImage", {"width": width, "height": height, "batch_size": batch_size})}
    prompt = {node_id: {"class_type": cls, "inputs": inputs} for node_id, (cls, inputs) in nodes.items()}
    prompt.update({f"show{n}": {"class_type": "TestShowAnything", "inputs": {"value": [n, 0]}} for n in nodes})
    return prompt


def test_a_prompt_that_cannot_fit_the_memory_budget_is_refused_before_queueing(tmp_path, demo_models_dir):
    """`--memory-budget-gb` gives the CPU a budget: between what 64x64 and 1024x1024 x 4 need (the estimate's
    plan for the same files), the small prompt is queued and the large one refused with the estimate's message."""
    import torch
    from flux2_core.memory.estimate import InsufficientMemoryError, MemoryRequest, check_fits, plan_for_files

    files = [demo_models_dir / kind / name for kind, name in (
        ("diffusion_models", "flux-2-klein-4b.safetensors"), ("text_encoders", "qwen_3_4b.safetensors"),
        ("vae", "flux2-vae.safetensors"))]
    small, large = (plan_for_files(MemoryRequest(w, h, b), *files, device="cpu", dtype=torch.float32)
                    for w, h, b in ((64, 64, 1), (1024, 1024, 4)))
    budget_gb = (small.peak_bytes + large.peak_bytes) / 2 / 1e9
    with pytest.raises(InsufficientMemoryError) as expected:
        check_fits(large, int(budget_gb * 1e9), what="this prompt (flux-2-klein-4b.safetensors)")

    server = FluxServer(tmp_path, extra_args=("--cpu", "--models-dir", str(demo_models_dir),
                                              "--memory-budget-gb", repr(budget_gb))).start()
    try:
        refused = server.post("/api/prompt", {"prompt": memory_prompt(1024, 1024, 4)})
        assert refused.status == 400, refused.body
        assert refused.json()["error"] == {"type": "limit_exceeded", "message": str(expected.value),
                                           "details": str(expected.value), "extra_info": {}}
        assert "needs" in str(expected.value) and "GB available" in str(expected.value)
        queued = server.post("/api/prompt", {"prompt": memory_prompt(64, 64, 1)})
        assert queued.status == 200 and queued.json()["node_errors"] == {}
    finally:
        server.stop()


def test_the_memory_estimate_reads_each_file_once_until_it_changes(tmp_path, demo_models_dir):
    """POST /prompt must stay cheap: a file's header is read again only when its modification time changes."""
    from flux2_host import folders
    from flux2_host.memory_refusal import _cached_shape, memory_refusal

    folders.configure(models=str(demo_models_dir), input_dir=str(tmp_path / "in"),
                      output_dir=str(tmp_path / "out"), temp_dir=str(tmp_path / "tmp"))
    _cached_shape.cache_clear()
    prompt = memory_prompt(1024, 1024, 4)
    assert memory_refusal(prompt, budget_bytes=1) is not None
    assert memory_refusal(prompt, budget_bytes=10**15) is None
    assert _cached_shape.cache_info().misses == 3 and _cached_shape.cache_info().hits == 3
    vae = demo_models_dir / "vae" / "flux2-vae.safetensors"
    stat = vae.stat()
    os.utime(vae, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    memory_refusal(prompt, budget_bytes=1)
    assert _cached_shape.cache_info().misses == 4


# --- defect 8: bad upload names and duplicate prompt ids --------------------------------------------------


def test_an_overlong_upload_name_is_a_clear_400(server):
    import io
    from PIL import Image
    png = io.BytesIO()
    Image.new("RGB", (2, 2)).save(png, format="PNG")  # a real image: uploads that are not images are refused first
    reply = server.upload("n" * 300 + ".png", png.getvalue())
    assert reply.status == 400 and reply.json()["error"]["type"] == "name_too_long"


def test_a_duplicate_prompt_id_is_refused_and_the_first_record_kept(server):
    prompt_id = "client-chosen-" + uuid.uuid4().hex
    first = server.run_prompt(slow_prompt(3, steps=1), prompt_id=prompt_id)
    assert first.prompt_id == prompt_id
    again = server.post("/api/prompt", {"prompt": slow_prompt(50, steps=1), "prompt_id": prompt_id})
    assert again.status == 409 and again.json()["error"]["type"] == "duplicate_prompt_id"
    record = server.get(f"/api/history/{prompt_id}").json()[prompt_id]
    assert record["outputs"]["2"]["text"] == ["4"]


# --- defect 5: a crash while SaveImage writes -------------------------------------------------------------


def test_a_crash_while_saving_leaves_no_partial_png(tmp_path, monkeypatch):
    """The PNG encoder dies after writing part of the second image (as a killed process would): the output
    folder holds the first image whole and nothing of the second, so /view never serves half a file."""
    import torch
    from PIL import Image, PngImagePlugin

    from flux2_host import folders
    from flux2_host.core_nodes.images import SaveImage

    monkeypatch.setattr(folders, "output_directory", str(tmp_path))
    real_save, calls = PngImagePlugin._save, []

    class Killed(BaseException):
        """What a kill looks like from inside: no `except Exception` cleanup runs (Pillow's would)."""

    def dying_save(image, fp, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:
            fp.write(b"\x89PNG\r\n\x1a\n half an image")
            raise Killed("killed mid-write")
        return real_save(image, fp, filename, *args, **kwargs)

    monkeypatch.setitem(Image.SAVE, "PNG", dying_save)
    with pytest.raises(Killed):
        SaveImage().save_images(torch.rand(2, 8, 8, 3), filename_prefix="crash")
    files = sorted(path.name for path in tmp_path.iterdir())
    assert files == ["crash_00001_.png"], files
    with Image.open(tmp_path / files[0]) as saved:
        saved.load()
        assert saved.size == (8, 8)


# --- defect 4: persistence across restarts ----------------------------------------------------------------


def history_status(server: FluxServer, prompt_id: str) -> str | None:
    record = server.get(f"/api/history/{prompt_id}").json().get(prompt_id)
    return record["status"]["status_str"] if record else None


def test_kill_9_loses_nothing_and_the_interrupted_prompt_runs_again(tmp_path):
    server = FluxServer(tmp_path).start()
    try:
        done = server.run_prompt(slow_prompt(1, steps=1)).prompt_id
        running = server.post("/api/prompt", {"prompt": slow_prompt(2, steps=40, delay=0.05)}).json()["prompt_id"]
        pending = [server.post("/api/prompt", {"prompt": slow_prompt(10 + i, steps=1)}).json()["prompt_id"]
                   for i in range(3)]
        wait_until(lambda: running_ids(server) == [running], what="the long prompt to run")
        server.process.kill()
        server.process.wait()
    finally:
        server.stop()
    restarted = FluxServer(tmp_path).start()
    try:
        assert history_status(restarted, done) == "success"
        for prompt_id in [running, *pending]:
            wait_until(lambda: history_status(restarted, prompt_id) == "success", what=f"{prompt_id} to finish")
        history = restarted.get("/api/history").json()
        assert list(history) == [done, running, *pending]  # each once, in the order they were queued
        assert history[running]["outputs"]["2"]["text"] == ["42"]
        # New prompts number after the restored ones, so they queue behind them.
        assert restarted.post("/api/prompt", {"prompt": slow_prompt(3)}).json()["number"] > \
            history[pending[-1]]["prompt"][0]
    finally:
        restarted.stop()


def test_after_a_clean_stop_the_interrupted_prompt_can_be_recorded_as_failed(tmp_path):
    server = FluxServer(tmp_path).start()
    try:
        busy = {"1": {"class_type": "TestBusyTorch", "inputs": {"seconds": 300.0}},
                "2": {"class_type": "TestShowInt", "inputs": {"value": ["1", 0]}}}
        stopped = server.post("/api/prompt", {"prompt": busy}).json()["prompt_id"]
        pending = server.post("/api/prompt", {"prompt": slow_prompt(5, steps=1)}).json()["prompt_id"]
        wait_until(lambda: running_ids(server) == [stopped], what="the busy prompt to run")
        server.process.terminate()
        assert server.process.wait(60) == 0
    finally:
        server.stop()
    restarted = FluxServer(tmp_path, extra_args=("--on-restart", "fail")).start()
    try:
        wait_until(lambda: history_status(restarted, pending) == "success", what="the pending prompt")
        record = restarted.get(f"/api/history/{stopped}").json()[stopped]
        assert record["status"]["status_str"] == "error"
        assert record["status"]["messages"][0][1]["exception_type"] == "ServerStopped"
        assert restarted.get(f"/api/jobs/{stopped}").json()["status"] == "failed"
    finally:
        restarted.stop()


# --- beyond loopback: auth token and TLS ------------------------------------------------------------------


def self_signed_certificate(directory) -> tuple[str, str]:
    key, cert = str(directory / "key.pem"), str(directory / "cert.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return key, cert


def test_token_is_required_on_every_route_and_the_websocket_over_tls(tmp_path):
    key, cert = self_signed_certificate(tmp_path)
    token = "s3cret-" + uuid.uuid4().hex
    (tmp_path / "token.txt").write_text(token + "\n")
    trust = ssl.create_default_context(cafile=cert)
    server = FluxServer(tmp_path, extra_args=("--host", "0.0.0.0", "--auth-token-file", str(tmp_path / "token.txt"),
                                              "--tls-keyfile", key, "--tls-certfile", cert),
                        headers={"Authorization": f"Bearer {token}"}, ssl_context=trust).start()
    try:
        assert server.url.startswith("https://")
        for method, path in [("GET", "/"), ("GET", "/api/queue"), ("GET", "/api/history"), ("POST", "/api/prompt"),
                             ("GET", "/api/view"), ("POST", "/api/userdata/user.css"), ("GET", "/ws")]:
            for wrong in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
                reply = server.request(method, path, body=b"{}", headers=wrong)
                assert reply.status == 401, (method, path, reply.status)
        run = server.run_prompt(slow_prompt(4, steps=1))  # the Bearer header on the POST and the socket
        assert run.events("executed")[0]["output"] == {"text": ["5"]}

        # The canvas opened once with ?token= keeps it as a cookie for its own requests and WebSocket.
        opened = server.request("GET", "/", headers={"Authorization": ""}, params={"token": token})
        assert opened.status == 200 and "flux2_token=" in opened.headers["Set-Cookie"]
        cookie = {"Authorization": "", "Cookie": f"flux2_token={token}"}
        assert server.request("GET", "/api/queue", headers=cookie).status == 200

        async def socket_status(headers) -> int:
            async with aiohttp.ClientSession() as session:
                try:
                    async with session.ws_connect(f"{server.url}/ws", headers=headers, ssl=trust):
                        return 101
                except aiohttp.WSServerHandshakeError as exc:
                    return exc.status
        assert asyncio.run(socket_status({})) == 401
        assert asyncio.run(socket_status({"Cookie": f"flux2_token={token}"})) == 101
        assert "without --auth-token" not in server.log() and "without TLS" not in server.log()
    finally:
        server.stop()
