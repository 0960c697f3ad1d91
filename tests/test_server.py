"""`flux2 serve` and `flux2 run` as users meet them: real subprocesses on loopback, driven over HTTP and the
WebSocket like ComfyUI's own server tests, with the cheap nodes of tests/host_test_nodes.py.

One server (module scope) serves every server test; tests only look at the prompts they queued, so their
order does not matter.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import urllib.parse
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server_harness import FLUX2_SCRIPT, TESTS_DIR, FluxServer

pytestmark = pytest.mark.server


def slow_prompt(value: int, steps: int = 3, delay: float = 0.0) -> dict:
    return {"1": {"class_type": "TestSlowCounter", "inputs": {"value": value, "steps": steps, "delay": delay}},
            "2": {"class_type": "TestShowInt", "inputs": {"value": ["1", 0]}}}


def png_bytes(color: tuple[int, int, int], size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def tiny_safetensors(path: Path, metadata: dict[str, str]) -> None:
    """A valid one-tensor safetensors file, written by hand so the test process need not import torch."""
    header = json.dumps({"__metadata__": metadata, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0\0\0\0")


def build_model_folders(root: Path) -> Path:
    """A ComfyUI-style models folder (legacy unet/ and clip/ included, a diffusers model folder, a file
    that is no model) plus a second root added through extra_model_paths.yaml; returns the yaml."""
    models = root / "models"
    tiny_safetensors(models / "diffusion_models" / "flux-2-klein-4b.safetensors", {"title": "tiny klein"})
    tiny_safetensors(models / "unet" / "legacy" / "old.safetensors", {})
    (models / "diffusion_models" / "readme.txt").parent.mkdir(parents=True, exist_ok=True)
    (models / "diffusion_models" / "readme.txt").write_text("not a model")
    diffusers_folder = models / "diffusion_models" / "FLUX.2-klein-4B"
    tiny_safetensors(diffusers_folder / "diffusion_pytorch_model.safetensors", {})
    (diffusers_folder / "config.json").write_text("{}")
    tiny_safetensors(models / "clip" / "qwen_3_4b.safetensors", {})
    tiny_safetensors(root / "shared" / "more_models" / "extra-dit.safetensors", {})
    tiny_safetensors(root / "shared" / "loras" / "style.safetensors", {})
    config = root / "extra_model_paths.yaml"
    config.write_text("shared:\n"
                      "    base_path: shared\n"
                      "    diffusion_models: |\n"
                      "        more_models\n"
                      "        missing_folder\n"
                      "    loras: loras\n"
                      "preferred:\n"
                      "    is_default: true\n"
                      "    loras: preferred_loras\n")
    return config


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    config = build_model_folders(root)
    running = FluxServer(root, extra_args=("--extra-model-paths-config", str(config))).start()
    yield running
    running.stop()


# --- running prompts -------------------------------------------------------------------------------------


def test_prompt_runs_with_progress_and_lands_in_history(server):
    run = server.run_prompt(slow_prompt(value=1, steps=3))
    assert run.reply["node_errors"] == {} and isinstance(run.reply["number"], (int, float))

    names = run.event_names
    assert names.index("execution_start") < names.index("execution_cached") < names.index("executed")
    assert [(p["value"], p["max"], p["node"]) for p in run.events("progress")] == [(1, 3, "1"), (2, 3, "1"),
                                                                                   (3, 3, "1")]
    assert {e["node"] for e in run.events("executing") if e["node"]} == {"1", "2"}
    assert run.events("executed") == [{"node": "2", "display_node": "2", "output": {"text": ["4"]},
                                       "prompt_id": run.prompt_id}]
    assert "execution_success" in names and names[-1] == "executing"
    assert all(d.get("prompt_id") == run.prompt_id for n, d in run.messages if n not in ("status", "feature_flags"))
    assert run.events("status")[-1]["status"]["exec_info"]["queue_remaining"] == 0

    for prefix in ("", "/api"):
        entry = server.get(f"{prefix}/history/{run.prompt_id}").json()[run.prompt_id]
        assert entry["outputs"] == {"2": {"text": ["4"]}}
        assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
        assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached",
                                                                "execution_success"]
        number, prompt_id, prompt, extra_data, outputs = entry["prompt"]
        assert prompt_id == run.prompt_id and prompt["1"]["class_type"] == "TestSlowCounter" and outputs == ["2"]
        assert "client_id" in extra_data and "create_time" in extra_data
        assert entry["meta"]["2"]["node_id"] == "2"


def test_identical_prompt_comes_from_cache(server):
    first = server.run_prompt(slow_prompt(value=50))
    again = server.run_prompt(slow_prompt(value=50))
    assert first.events("progress") and not again.events("progress")
    assert set(again.events("execution_cached")[0]["nodes"]) == {"1", "2"}
    assert again.events("executed")[0]["output"] == {"text": ["53"]}  # cached outputs are still shown


def test_previews_are_binary_frames_in_both_layouts(server):
    plain = server.run_prompt(slow_prompt(value=60, steps=2), extra_data={"preview_method": "auto"})
    assert len(plain.binary_frames) == 2
    event_type, image_type = struct.unpack(">II", plain.binary_frames[0][:8])
    assert (event_type, image_type) == (1, 1)
    assert Image.open(io.BytesIO(plain.binary_frames[0][8:])).format == "JPEG"

    rich = server.run_prompt(slow_prompt(value=61, steps=2), extra_data={"preview_method": "auto"},
                             feature_flags={"supports_preview_metadata": True})
    event_type, length = struct.unpack(">II", rich.binary_frames[0][:8])
    metadata = json.loads(rich.binary_frames[0][8:8 + length])
    assert event_type == 4
    assert metadata["node_id"] == "1" and metadata["prompt_id"] == rich.prompt_id
    assert metadata["image_type"] == "image/jpeg"
    assert Image.open(io.BytesIO(rich.binary_frames[0][8 + length:])).format == "JPEG"

    quiet = server.run_prompt(slow_prompt(value=62, steps=2), extra_data={"preview_method": "none"})
    assert quiet.binary_frames == []
    # Without a method of its own a prompt gets the server's --preview-method, auto by default.
    assert len(server.run_prompt(slow_prompt(value=63, steps=2)).binary_frames) == 2


def test_a_node_that_raises_is_reported_and_the_server_keeps_serving(server):
    prompt = {"1": {"class_type": "TestExplode", "inputs": {"value": 3}},
              "2": {"class_type": "TestShowInt", "inputs": {"value": ["1", 0]}}}
    failed = server.run_prompt(prompt)
    error = failed.events("execution_error")[0]
    assert error["prompt_id"] == failed.prompt_id and error["node_id"] == "1"
    assert error["node_type"] == "TestExplode" and "boom with value 3" in error["exception_message"]
    assert error["traceback"] and "execution_success" not in failed.event_names

    entry = server.get(f"/api/history/{failed.prompt_id}").json()[failed.prompt_id]
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    job = server.get(f"/api/jobs/{failed.prompt_id}").json()
    assert job["status"] == "failed" and job["execution_error"]["node_id"] == "1"

    assert server.run_prompt(slow_prompt(value=2)).events("execution_success")


def test_interrupt_queue_order_and_cancel_while_a_prompt_runs(server):
    observed = {}

    def while_running(event: str, data: dict) -> None:
        if event != "progress" or observed:
            return
        later = server.post("/api/prompt", {"prompt": slow_prompt(value=70)}).json()["prompt_id"]
        first = server.post("/api/prompt", {"prompt": slow_prompt(value=71), "front": True}).json()["prompt_id"]
        observed["queue"] = server.get("/api/queue").json()
        observed["jobs"] = server.get("/api/jobs", status="in_progress,pending").json()
        observed["prompt"] = server.get("/prompt").json()
        server.post("/api/queue", {"delete": [later]})
        observed["cancelled"] = server.post(f"/api/jobs/{first}/cancel").json()
        observed["pending_after"] = server.get("/queue").json()["queue_pending"]
        observed["ids"] = (later, first)
        assert server.post("/api/interrupt", {"prompt_id": "some-other-prompt"}).status == 200  # not this one
        assert server.post("/api/interrupt").status == 200

    run = server.run_prompt(slow_prompt(value=7, steps=400, delay=0.05), on_message=while_running)
    later, first = observed["ids"]

    running, pending = observed["queue"]["queue_running"], observed["queue"]["queue_pending"]
    assert [item[1] for item in running] == [run.prompt_id]
    assert [item[1] for item in pending] == [first, later]  # front=True goes first
    assert len(pending[0]) == 5 and pending[0][4] == ["2"]
    statuses = {job["id"]: job["status"] for job in observed["jobs"]["jobs"]}
    assert statuses == {run.prompt_id: "in_progress", first: "pending", later: "pending"}
    assert observed["prompt"] == {"exec_info": {"queue_remaining": 3}}
    assert observed["cancelled"] == {"cancelled": [first]} and observed["pending_after"] == []

    interrupted = run.events("execution_interrupted")
    assert interrupted and interrupted[0]["node_id"] == "1"
    assert len(run.events("progress")) < 400
    assert server.get(f"/api/jobs/{run.prompt_id}").json()["status"] == "cancelled"
    assert server.get(f"/api/history/{later}").json() == {}  # deleted before it ran
    assert server.run_prompt(slow_prompt(value=8)).events("execution_success")


def test_jobs_pagination_sorting_and_details(server):
    ids = [server.run_prompt(slow_prompt(value=v, steps=1)).prompt_id for v in (90, 91, 92)]
    everything = server.get("/api/jobs", status="completed", sort_order="asc").json()
    order = [job["id"] for job in everything["jobs"]]
    assert order.index(ids[0]) < order.index(ids[1]) < order.index(ids[2])
    total = everything["pagination"]["total"]
    assert total >= 3 and everything["pagination"]["has_more"] is False

    page = server.get("/api/jobs", status="completed", limit=2, offset=1).json()
    assert page["pagination"] == {"offset": 1, "limit": 2, "total": total, "has_more": total > 3}
    assert len(page["jobs"]) == 2
    newest_first = [job["id"] for job in server.get("/api/jobs", status="completed").json()["jobs"]]
    assert [job_id for job_id in newest_first if job_id in ids] == ids[::-1]

    job = server.get(f"/api/jobs/{ids[0]}").json()
    assert job["status"] == "completed" and job["outputs"] == {"2": {"text": ["91"]}}
    assert job["workflow"]["prompt"]["1"]["inputs"]["value"] == 90
    assert job["create_time"] > 0 and job["execution_end_time"] >= job["execution_start_time"]
    assert server.get("/api/jobs/no-such-job").status == 404
    assert server.get("/api/jobs", status="bogus").status == 400
    assert server.get("/api/jobs", limit="x").status == 400


def test_history_paging_and_deletion(server):
    ids = [server.run_prompt(slow_prompt(value=v, steps=1)).prompt_id for v in (95, 96)]
    newest = server.get("/api/history", max_items=1).json()
    assert list(newest) == [ids[1]]
    assert list(server.get("/history", max_items=1, offset=0).json()) != [ids[1]]  # offset counts from oldest
    assert server.post("/api/history", {"delete": [ids[0]]}).status == 200
    assert server.get(f"/api/history/{ids[0]}").json() == {}
    assert ids[1] in server.get("/api/history").json()


# --- refusing bad prompts --------------------------------------------------------------------------------


def test_invalid_prompts_answer_400_with_node_errors(server):
    unknown = server.post("/api/prompt", {"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}})
    assert unknown.status == 400 and unknown.json()["error"]["type"] == "missing_node_type"

    too_big = server.post("/prompt", {"prompt": {
        "1": {"class_type": "TestConstantInt", "inputs": {"value": 1000}},
        "2": {"class_type": "TestShowInt", "inputs": {"value": ["1", 0]}}}})
    body = too_big.json()
    assert too_big.status == 400 and body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["node_errors"]["1"]["errors"][0]["type"] == "value_bigger_than_max"
    assert body["node_errors"]["1"]["dependent_outputs"] == ["2"]

    lonely = {"1": {"class_type": "TestConstantInt", "inputs": {"value": 1}}}
    no_outputs = server.post("/api/prompt", {"prompt": lonely})
    assert no_outputs.status == 400 and no_outputs.json()["error"]["type"] == "prompt_no_outputs"
    missing = server.post("/api/prompt", {"client_id": "x"})
    assert missing.status == 400 and missing.json()["error"]["type"] == "no_prompt"
    not_json = server.request("POST", "/api/prompt", body=b"{not json", headers={"Content-Type": "application/json"})
    assert not_json.status == 400 and not_json.json()["error"]["type"] == "invalid_json"
    wrong_shape = server.post("/api/prompt", {"prompt": ["not", "a", "graph"]})
    assert wrong_shape.status == 400 and wrong_shape.json()["error"]["type"] == "invalid_prompt"


def test_one_invalid_output_does_not_block_a_valid_one(server):
    prompt = {**slow_prompt(value=30, steps=1),
              "3": {"class_type": "TestEvenOnly", "inputs": {"value": 3}},
              "4": {"class_type": "TestShowInt", "inputs": {"value": ["3", 0]}}}
    run = server.run_prompt(prompt)
    assert run.prompt_id and "3" in run.reply["node_errors"]
    assert [e["node"] for e in run.events("executed")] == ["2"]


def test_a_windows_model_name_validates_over_http(server):
    """A workflow saved on Windows names `legacy\\old.safetensors`; the combo lists `legacy/old.safetensors`."""
    prompt = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "legacy\\old.safetensors",
                                                          "weight_dtype": "default"}},
              "2": {"class_type": "TestShowAnything", "inputs": {"value": ["1", 0]}}}
    reply = server.post("/api/prompt", {"prompt": prompt})
    assert reply.status == 200 and reply.json()["node_errors"] == {}
    unknown = server.post("/api/prompt", {"prompt": {**prompt, "1": {"class_type": "UNETLoader", "inputs": {
        "unet_name": "legacy\\missing.safetensors", "weight_dtype": "default"}}}})
    assert unknown.status == 400 and unknown.json()["node_errors"]["1"]["errors"][0]["type"] == "value_not_in_list"


def test_requests_from_another_origin_are_refused(server):
    refused = server.request("POST", "/api/prompt", json_body={"prompt": slow_prompt(1)},
                             headers={"Origin": "http://evil.example"})
    assert refused.status == 403 and refused.json()["error"]["type"] == "origin_mismatch"


# --- files ----------------------------------------------------------------------------------------------


def test_upload_and_view_with_overwrite_rules(server):
    red, blue = png_bytes((255, 0, 0)), png_bytes((0, 0, 255))
    first = server.upload("photo.png", red, subfolder="shots")
    assert first.status == 200 and first.json() == {"name": "photo.png", "subfolder": "shots", "type": "input"}
    assert server.upload("photo.png", red, subfolder="shots").json()["name"] == "photo.png"  # same bytes: reused
    renamed = server.upload("photo.png", blue, subfolder="shots").json()
    assert renamed["name"] == "photo (1).png"
    assert server.upload("photo.png", blue, subfolder="shots", overwrite="true").json()["name"] == "photo.png"

    for prefix in ("", "/api"):
        view = server.get(f"{prefix}/view", filename="photo.png", subfolder="shots", type="input")
        assert view.status == 200 and view.body == blue
    preview = server.get("/api/view", filename="photo (1).png", subfolder="shots", type="input", preview="jpeg;80")
    assert preview.content_type == "image/jpeg"
    assert Image.open(io.BytesIO(preview.body)).size == (8, 8)
    rgb = server.get("/api/view", filename="photo.png [input]", subfolder="shots", channel="rgb")
    assert rgb.content_type == "image/png"
    assert server.get("/api/view", filename="nothing.png", type="input").status == 404

    output = server.upload("result.png", red, type="output").json()
    assert output["type"] == "output" and (server.dirs["output"] / "result.png").read_bytes() == red


def test_mask_upload_puts_the_alpha_on_the_original_and_keeps_its_workflow(server):
    from PIL.PngImagePlugin import PngInfo

    original = io.BytesIO()
    chunks = PngInfo()
    chunks.add_text("workflow", '{"nodes": []}')
    Image.new("RGB", (4, 4), (10, 20, 30)).save(original, format="PNG", pnginfo=chunks)
    assert server.upload("painted.png", original.getvalue(), type="output").status == 200
    mask = Image.new("RGBA", (4, 4), (0, 0, 0, 255))
    mask.putpixel((0, 0), (0, 0, 0, 0))
    mask_png = io.BytesIO()
    mask.save(mask_png, format="PNG")

    reply = server.upload("clipspace-mask.png", mask_png.getvalue(), route="/api/upload/mask", type="input",
                          subfolder="clipspace",
                          original_ref=json.dumps({"filename": "painted.png", "subfolder": "", "type": "output"}))
    assert reply.status == 200 and reply.json()["subfolder"] == "clipspace"
    with Image.open(server.dirs["input"] / "clipspace" / reply.json()["name"]) as result:
        assert result.mode == "RGBA" and result.getpixel((0, 0)) == (10, 20, 30, 0)
        assert result.getpixel((1, 1)) == (10, 20, 30, 255) and result.text["workflow"] == '{"nodes": []}'
    missing = server.upload("m.png", mask_png.getvalue(), route="/api/upload/mask",
                            original_ref=json.dumps({"filename": "../../secret.txt", "type": "output"}))
    assert missing.status == 400


def test_path_traversal_is_refused_on_view_and_upload(server):
    (server.root / "secret.txt").write_text("secret")
    for params in ({"filename": "../secret.txt", "type": "output"}, {"filename": "/etc/passwd"},
                   {"filename": "secret.txt", "subfolder": "../", "type": "input"},
                   {"filename": "secret.txt", "subfolder": "../../..", "type": "output"},
                   {"filename": "secret.txt", "type": "models"}):
        for prefix in ("", "/api"):
            reply = server.get(f"{prefix}/view", **params)
            assert reply.status in (400, 403), (params, reply.status)
            assert "error" in reply.json() and b"secret" != reply.body

    assert server.upload("../escape.png", png_bytes((1, 2, 3))).status == 400
    assert server.upload("escape.png", png_bytes((1, 2, 3)), subfolder="../..").status == 400
    assert not list(server.root.rglob("escape.png"))


def test_userdata_round_trip_is_atomic_and_respects_overwrite(server):
    workflow = {"nodes": [], "links": [], "version": 0.4}
    saved = server.request("POST", "/api/userdata/workflows%2Fmy%20flow.json", body=json.dumps(workflow).encode())
    assert saved.status == 200 and saved.json() == "workflows/my flow.json"
    assert (server.dirs["user"] / "default" / "workflows" / "my flow.json").is_file()
    assert not [p for p in (server.dirs["user"] / "default" / "workflows").iterdir() if p.name.startswith(".tmp")]

    kept = server.request("POST", "/api/userdata/workflows%2Fmy%20flow.json?overwrite=false", body=b"{}")
    assert kept.status == 409 and "error" in kept.json()
    assert json.loads(server.get("/api/userdata/workflows%2Fmy%20flow.json").body) == workflow

    info = server.request("POST", "/userdata/workflows%2Fsecond.json?full_info=true", body=b"{}").json()
    assert info["path"] == "workflows/second.json" and info["size"] == 2 and info["modified"] > 0
    listing = server.get("/api/userdata", dir="workflows", recurse="true", full_info="true", split="false").json()
    assert sorted(entry["path"] for entry in listing) == ["my flow.json", "second.json"]
    assert server.get("/api/userdata", dir="workflows", split="true").json() == [
        ["my flow.json", "my flow.json"], ["second.json", "second.json"]]
    assert server.get("/api/userdata", dir="no_such_dir").status == 404

    blocked = server.request("POST", "/api/userdata/workflows%2Fsecond.json/move/workflows%2Fmy%20flow.json"
                                     "?overwrite=false")
    assert blocked.status == 409
    moved = server.request("POST", "/api/userdata/workflows%2Fsecond.json/move/workflows%2Fsub%2Fthird.json")
    assert moved.status == 200 and moved.json() == "workflows/sub/third.json"
    assert server.request("DELETE", "/api/userdata/workflows%2Fsub%2Fthird.json").status == 204
    gone = server.get("/api/userdata/workflows%2Fsub%2Fthird.json")
    assert gone.status == 404 and "error" in gone.json()

    for escape in ("..%2F..%2Fsecret.txt", "%2Fetc%2Fpasswd"):
        assert server.get(f"/api/userdata/{escape}").status == 403
        assert server.request("POST", f"/api/userdata/{escape}", body=b"x").status == 403


def test_settings_are_stored_per_user(server):
    assert server.post("/api/settings/Comfy.ColorPalette", "light").status == 200
    assert server.post("/api/settings", {"Comfy.Locale": "en", "Comfy.Zoom": 2}).status == 200
    settings = server.get("/api/settings").json()
    assert settings["Comfy.ColorPalette"] == "light" and settings["Comfy.Zoom"] == 2
    assert server.get("/settings/Comfy.Locale").json() == "en"
    stored = json.loads((server.dirs["user"] / "default" / "comfy.settings.json").read_text())
    assert stored == settings


# --- what the canvas reads --------------------------------------------------------------------------------


JSON_ROUTES = ["/prompt", "/queue", "/history", "/jobs", "/object_info", "/object_info/TestConstantInt",
               "/system_stats", "/features", "/embeddings", "/extensions", "/users", "/settings",
               "/experiment/models", "/experiment/models/loras", "/models", "/models/vae", "/i18n",
               "/workflow_templates", "/global_subgraphs", "/node_replacements"]


@pytest.mark.parametrize("route", JSON_ROUTES)
def test_every_route_answers_json_under_both_prefixes(server, route):
    plain, api = server.get(route), server.get("/api" + route)
    assert plain.status == api.status == 200
    assert plain.content_type == api.content_type == "application/json"
    assert isinstance(api.json(), (dict, list))


def test_errors_are_json_and_unknown_routes_too(server):
    for reply in (server.get("/api/no_such_route"), server.request("DELETE", "/api/prompt"),
                  server.get("/api/models/no_such_kind")):
        assert reply.status in (404, 405) and reply.content_type == "application/json" and "error" in reply.json()


def test_system_stats_users_and_features(server):
    stats = server.get("/api/system_stats").json()
    for key in ("os", "ram_total", "ram_free", "comfyui_version", "python_version", "pytorch_version",
                "embedded_python", "argv", "required_frontend_version"):
        assert key in stats["system"]
    assert {"name", "type", "index", "vram_total", "vram_free", "torch_vram_total", "torch_vram_free"} <= set(
        stats["devices"][0])
    assert server.get("/api/users").json() == {"storage": "server", "migrated": True}
    assert server.get("/api/features").json()["supports_preview_metadata"] is True


def test_object_info_has_our_nodes_with_module_and_category(server):
    info = server.get("/api/object_info").json()
    assert {"TestConstantInt", "TestSlowCounter", "SaveImage", "UNETLoader", "Flux2EmptyLatent"} <= set(info)
    for name, entry in info.items():
        assert entry["python_module"] and entry["category"], name
        assert entry["name"] == name
    assert info["TestConstantInt"]["python_module"] == "custom_nodes.host_test_nodes"
    assert info["TestConstantInt"]["display_name"] == "Constant Int (test)"
    assert info["SaveImage"]["python_module"] == "nodes" and info["SaveImage"]["output_node"] is True
    assert info["Flux2EmptyLatent"]["python_module"] == "custom_nodes.flux2"
    assert server.get("/api/object_info/TestConstantInt").json() == {"TestConstantInt": info["TestConstantInt"]}
    assert server.get("/api/object_info/NoSuchNode").json() == {}


def test_model_folders_legacy_names_model_folders_and_extra_paths(server):
    expected = ["FLUX.2-klein-4B", "extra-dit.safetensors", "flux-2-klein-4b.safetensors", "legacy/old.safetensors"]
    assert server.get("/api/models/diffusion_models").json() == expected
    assert server.get("/api/models/unet").json() == expected
    info = server.get("/api/object_info/UNETLoader").json()["UNETLoader"]
    assert info["input"]["required"]["unet_name"][0] == expected  # the combo is the list validation uses
    assert server.get("/api/models/text_encoders").json() == ["qwen_3_4b.safetensors"]

    kinds = {entry["name"]: entry["folders"] for entry in server.get("/api/experiment/models").json()}
    roots = kinds["diffusion_models"]
    assert roots[0] == str(server.dirs["models"] / "diffusion_models")
    assert str(server.root / "shared" / "more_models") in roots
    entries = server.get("/api/experiment/models/diffusion_models").json()
    assert {"name": "extra-dit.safetensors", "pathIndex": roots.index(str(server.root / "shared" / "more_models"))
            } in entries
    lora_roots = kinds["loras"]  # is_default puts a root before the models folder's own
    assert lora_roots == [str(server.root / "preferred_loras"), str(server.dirs["models"] / "loras"),
                          str(server.root / "shared" / "loras")]
    assert server.get("/api/experiment/models/loras").json() == [{"name": "style.safetensors", "pathIndex": 2}]

    metadata = server.get("/api/view_metadata/diffusion_models", filename="flux-2-klein-4b.safetensors")
    assert metadata.json() == {"title": "tiny klein"}
    assert server.get("/api/view_metadata/diffusion_models", filename="../../secret.safetensors").status == 404


def test_frontend_templates_and_websocket_ids(server):
    page = server.get("/")
    assert page.status == 200 and page.content_type == "text/html" and b"<html" in page.body
    assert server.get("/assets/favicon.ico").status == 200
    index = server.get("/templates/index.json")
    assert index.status == 200 and index.content_type == "application/json"
    assert isinstance(index.json(), list) and index.json()
    template = server.get("/templates/image_flux2_klein_text_to_image.json")
    assert template.status == 200 and "nodes" in template.json()
    assert server.get("/templates/../server.log").status == 404


def test_save_image_paths_continue_the_counter_and_stay_in_the_output_folder(tmp_path):
    from flux2_host import folders

    output = tmp_path / "output"
    (output / "renders").mkdir(parents=True)
    (output / "renders" / "fox_00007_.png").write_bytes(b"")
    (output / "renders" / "foxes_00020_.png").write_bytes(b"")  # another prefix: not counted
    folder, filename, counter, subfolder, prefix = folders.get_save_image_path("renders/fox", str(output))
    assert (folder, filename, counter, subfolder) == (str(output / "renders"), "fox", 8, "renders")
    assert folders.get_save_image_path("%width%x%height%/img", str(output), 64, 32)[3] == "64x32"
    with pytest.raises(ValueError, match="outside the output folder"):
        folders.get_save_image_path("../escape", str(output))


# --- flux2 run ------------------------------------------------------------------------------------------


SHARED_WORKFLOW = Path(__file__).resolve().parents[1] / "workflows" / "flux2_klein_text_to_image.json"


def flux2_run(tmp_path: Path, workflow: Path | dict, *args: str, models: Path | None = None
              ) -> subprocess.CompletedProcess:
    if isinstance(workflow, dict):
        path = tmp_path / "workflow.json"
        path.write_text(json.dumps(workflow))
        workflow = path
    env = {**os.environ, "FLUX2_EXTRA_NODES": "host_test_nodes",
           "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([str(FLUX2_SCRIPT), "run", str(workflow), "--models-dir", str(models or tmp_path / "models"),
                           "--output-dir", str(tmp_path / "output"), "--input-dir", str(tmp_path / "input"), *args],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)


def test_flux2_run_renders_a_shared_workflow_and_prints_one_json_object(tmp_path, demo_models_dir):
    done = flux2_run(tmp_path, SHARED_WORKFLOW, "--set", "6.width=64", "--set", "6.height=48", "--json",
                     models=demo_models_dir)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    uuid.UUID(report["prompt_id"])
    [image_path] = report["files"]
    assert image_path == str(tmp_path / "output" / report["outputs"]["9"]["images"][0]["filename"])
    with Image.open(image_path) as image:
        assert image.size == (64, 48)
        assert json.loads(image.text["workflow"])["nodes"]  # the UI graph travels with the image
        assert json.loads(image.text["prompt"])["6"]["inputs"]["width"] == 64
    assert "Flux2Sampler" in done.stderr  # the progress bar names the sampling node


def test_flux2_run_dtype_flag_sets_the_compute_dtype(tmp_path, demo_models_dir):
    """--dtype bf16 on the CPU (whose default is fp32) gives the same picture, computed in lower precision."""
    pixels = {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / dtype
        out.mkdir()
        done = flux2_run(out, SHARED_WORKFLOW, "--set", "6.width=64", "--set", "6.height=64", "--set", "7.seed=3",
                         "--dtype", dtype, "--json", models=demo_models_dir)
        assert done.returncode == 0, done.stderr
        with Image.open(json.loads(done.stdout)["files"][0]) as image:
            pixels[dtype] = np.asarray(image.convert("RGB"), dtype=np.float32)
    difference = np.abs(pixels["fp32"] - pixels["bf16"])
    assert difference.max() > 0 and difference.mean() < 16, (difference.max(), difference.mean())
    refused = flux2_run(tmp_path, SHARED_WORKFLOW, "--dtype", "fp64", models=demo_models_dir)
    assert refused.returncode == 2 and "--dtype" in refused.stderr


def test_flux2_run_exit_codes_for_invalid_and_failing_workflows(tmp_path):
    invalid = flux2_run(tmp_path, {"1": {"class_type": "TestConstantInt", "inputs": {"value": 1000}},
                                   "2": {"class_type": "TestShowInt", "inputs": {"value": ["1", 0]}}})
    assert invalid.returncode == 2 and invalid.stdout == ""
    report = json.loads(invalid.stderr.splitlines()[-1])
    assert report["node_errors"]["1"]["errors"][0]["type"] == "value_bigger_than_max"

    failing = flux2_run(tmp_path, {"1": {"class_type": "TestExplode", "inputs": {"value": 1}},
                                   "2": {"class_type": "TestShowInt", "inputs": {"value": ["1", 0]}}}, "--json")
    assert failing.returncode == 1 and json.loads(failing.stdout)["error"]["node_type"] == "TestExplode"
    assert "boom with value 1" in failing.stderr and "TestExplode" in failing.stderr


# --- malformed requests -------------------------------------------------------------------------------------


def _strict_json(reply) -> object:
    """The reply as a browser's JSON.parse would read it: NaN and Infinity are not JSON."""
    def refuse(constant: str) -> None:
        raise AssertionError(f"reply holds {constant}, which is not JSON: {reply.body[:200]!r}")
    return json.loads(reply.body, parse_constant=refuse)


def _multipart(boundary: str, *parts: tuple[str, str | None, bytes]) -> bytes:
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


def _malformed_requests() -> list[tuple[str, str, bytes | None, dict[str, str]]]:
    """(method, path with query, body, headers): a bounded set of what a broken or hostile client sends."""
    as_json = {"Content-Type": "application/json"}
    bad_json = [b"{", b"[]", b"null", b'"text"', b"42", b"\xff\xfe\x00", b'{"a": NaN}', b'{"a": Infinity}',
                b'{"a": 1e999999}', b"[" * 5000 + b"]" * 5000, b'{"prompt": ' * 3000]
    json_posts = ["/prompt", "/queue", "/history", "/interrupt", "/free", "/jobs/cancel", "/jobs/fuzz/cancel",
                  "/settings", "/settings/Fuzz.Setting", "/users"]
    requests = [("POST", "/api" + route, body, as_json) for route in json_posts for body in bad_json]

    node = {"class_type": "TestShowInt", "inputs": {"value": 1}}
    prompts = [[node], "text", 7, {"1": []}, {"1": None}, {"1": {"inputs": {}}}, {"1": {"class_type": 5}},
               {"1": {"class_type": ["TestShowInt"]}}, {"1": {"class_type": {"a": 1}, "inputs": {}}},
               {"1": {**node, "inputs": "value"}}, {"1": {**node, "inputs": None}}, {"1": {**node, "inputs": [1, 2]}},
               {"1": {**node, "_meta": "title"}}, {"1": {**node, "_meta": None}},
               {"1": {**node, "_meta": {"title": ["x"]}, "inputs": {"value": ["9", 0]}}},
               {"1": {**node, "inputs": {"value": ["1", 0]}}}, {"1": {**node, "inputs": {"value": ["1", -1]}}},
               {"1": {**node, "inputs": {"value": ["1", 10**30]}}}, {"1": {**node, "inputs": {"value": [1, 0]}}},
               {"1": {**node, "inputs": {"value": ["2", 0, 1]}}}, {"1": {**node, "inputs": {"value": 10**400}}},
               {"1": {**node, "inputs": {"value": -10**30}}}, {"1": {**node, "inputs": {"value": {"x": 1}}}},
               {"1": {**node, "inputs": {"value": "\u2603"}}}, {"1": {**node, "inputs": {"value": {"__value__": {}}}}},
               {"1": {"class_type": "TestSlowCounter", "inputs": {"value": 1, "steps": -5, "delay": 1e300}},
                "2": {"class_type": "TestShowInt", "inputs": {"value": ["1", 0]}}},
               {"": node, "\u2603/..": node}, {}]
    requests += [("POST", "/api/prompt", json.dumps({"prompt": prompt}).encode(), as_json) for prompt in prompts]
    fields = [{"number": "first"}, {"number": [1]}, {"number": 10**400}, {"extra_data": []}, {"extra_data": "x"},
              {"extra_data": {"extra_pnginfo": "x"}}, {"extra_data": {"extra_pnginfo": {"workflow": [1]}}},
              {"extra_data": {"client_id": {"a": 1}}}, {"client_id": {"a": 1}}, {"client_id": [1]},
              {"client_id": 5}, {"prompt_id": {"a": 1}}, {"prompt_id": ""}, {"front": "yes"},
              {"partial_execution_targets": "1"}, {"partial_execution_targets": [1]},
              {"partial_execution_targets": ["missing"]}]
    requests += [("POST", "/api/prompt", json.dumps({"prompt": {"1": node}, **extra}).encode(), as_json)
                 for extra in fields]
    for body in ({"delete": "x"}, {"delete": [1, None]}, {"delete": None}, {"clear": []}, {"job_ids": "x"},
                 {"job_ids": [{}]}, {"prompt_id": 5}, {"prompt_id": ["x"]}, {"unload_models": "x", "free_memory": []}):
        requests += [("POST", "/api" + route, json.dumps(body).encode(), as_json)
                     for route in ("/queue", "/history", "/jobs/cancel", "/interrupt", "/free")]

    q = urllib.parse.quote
    gets = ["/prompt?unknown=1", "/queue?x=%00", "/history?max_items=-1", "/history?max_items=abc",
            "/history?offset=" + "9" * 40, "/history?max_items=1e9&offset=-3", "/history/%00", "/history/" + "x" * 2000,
            "/jobs?limit=0", "/jobs?limit=-5", "/jobs?offset=-1", "/jobs?limit=" + "9" * 40, "/jobs?status=nope",
            "/jobs?status=,,,", "/jobs?sort_by=x", "/jobs?sort_order=sideways", "/jobs?workflow_id=%00",
            "/jobs/%2e%2e", "/jobs/%00",
            "/view", "/view?filename=", "/view?filename=%00", "/view?filename=a.png&type=models",
            "/view?filename=a.png&type=%00", "/view?filename=" + q("../../etc/passwd"), "/view?filename=%2Fetc%2Fpasswd",
            "/view?filename=a.png&subfolder=%2Fetc", "/view?filename=a.png&subfolder=%00",
            "/view?filename=" + q("\u2603.png"), "/view?filename=" + q("x.png [input]"),
            "/view?filename=" + q("../x.png [output]"), "/view?filename=" + q("/etc/passwd [temp]"),
            "/object_info/%00", "/object_info/..", "/object_info/" + q("\u2603"),
            "/models/..", "/models/%00", "/models/" + q("\u2603"), "/experiment/models/%00",
            "/experiment/models/" + q("../loras"), "/view_metadata/loras", "/view_metadata/loras?filename=%00",
            "/view_metadata/loras?filename=" + q("../../x.safetensors"),
            "/view_metadata/loras?filename=" + q("/etc/x.safetensors"), "/view_metadata/no_kind?filename=a.safetensors",
            "/userdata", "/userdata?dir=..", "/userdata?dir=%2Fetc", "/userdata?dir=%00", "/userdata?dir=" + q("\u2603"),
            "/userdata?dir=workflows&recurse=%00&split=maybe&full_info=", "/userdata/%00", "/userdata/..",
            "/userdata/%252e%252e%252fsecret.txt", "/userdata/" + q("\u2603.json"), "/settings/%00",
            "/settings/" + "s" * 2000, "/object_info?refresh=%00", "/ws?clientId=%00"]
    requests += [("GET", "/api" + path, None, {}) for path in gets]
    requests += [("GET", path, None, {}) for path in ("/templates/..%2F..%2Fserver.log", "/templates/%00",
                                                       "/%00", "/..%2F..%2Fserver.log", "/" + q("\u2603"))]

    for name in ("%00", "..", "%2E", "..%2F..%2Fx.json", "%2Fetc%2Fx.json", "a%00b.json", "fuzz%2F",
                 "comfy.settings.json%2Fx", "fuzz%2F" + "n" * 300 + ".json", q("fuzz/\u2603.json")):
        requests += [("POST", f"/api/userdata/{name}", b"{}", {}), ("DELETE", f"/api/userdata/{name}", None, {}),
                     ("POST", f"/api/userdata/fuzz%2Fmissing.json/move/{name}", None, {}),
                     ("POST", f"/api/userdata/{name}/move/fuzz%2Fmoved.json", None, {})]
    requests += [("POST", "/api/userdata/fuzz%2Fsource.json", b"{}", {}),
                 ("POST", "/api/userdata/fuzz%2Fsource.json/move/fuzz", None, {}),  # onto a folder
                 ("POST", "/api/userdata/fuzz%2Fsource.json/move/fuzz%2Fsource.json%2Fdeeper.json", None, {})]

    boundary = uuid.uuid4().hex
    multipart = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    png = png_bytes((9, 9, 9))
    forms = [b"", b"garbage", _multipart(boundary), _multipart(boundary, ("image", None, b"not a file")),
             _multipart(boundary, ("image", "", png)), _multipart(boundary, ("image", ".", png)),
             _multipart(boundary, ("image", "fuzz.png", png), ("type", None, b"models")),
             _multipart(boundary, ("image", "fuzz.png", png), ("type", None, b"\0")),
             _multipart(boundary, ("image", "fuzz.png", png), ("subfolder", None, b"/etc")),
             _multipart(boundary, ("image", "fuzz.png", png), ("subfolder", None, b"a\0b")),
             _multipart(boundary, ("image", "a\0b.png", png)),
             _multipart(boundary, ("image", "fuzz.png", png), ("original_ref", None, b"x")),
             _multipart(boundary, ("image", "fuzz.png", png), ("original_ref", None, b'{"filename": 5}')),
             _multipart(boundary, ("image", "fuzz.png", png), ("original_ref", None, b'{"filename": "../x.png"}')),
             _multipart(boundary, ("image", "fuzz.png", png),
                        ("original_ref", None, b'{"filename": "x.png", "subfolder": 3, "type": []}')),
             _multipart(boundary, ("image", "fuzz.png", b"not a png"),
                        ("original_ref", None, b'{"filename": "fuzz.png", "type": "input"}'))]
    for route in ("/api/upload/image", "/api/upload/mask"):
        requests += [("POST", route, form, headers) for form in forms for headers in (multipart, as_json)]
    return requests


def test_malformed_requests_answer_json_errors_and_the_server_keeps_serving(server):
    saved_workflow = b'{"nodes": [], "links": [], "version": 0.4, "fuzz": "keep me"}'
    assert server.request("POST", "/api/userdata/workflows%2Ffuzz-kept.json", body=saved_workflow).status == 200
    assert server.post("/api/settings/Fuzz.Kept", "yes").status == 200

    failures = []
    for method, path, body, headers in _malformed_requests():
        reply = server.request(method, path, body=body, headers=headers)
        problem = None
        if reply.status >= 500:
            problem = "server error"
        elif reply.status >= 400:
            try:
                problem = None if "error" in _strict_json(reply) else "error reply without an error object"
            except (ValueError, AssertionError) as exc:
                problem = f"error reply is not JSON: {exc}"
        elif reply.content_type == "application/json":
            try:
                _strict_json(reply)
            except (ValueError, AssertionError) as exc:
                problem = f"reply is not JSON: {exc}"
        if problem:
            failures.append((method, path[:120], (body or b"")[:80], reply.status, problem, reply.body[:160]))
    assert not failures, "\n".join(map(str, failures))

    # Still serving, with nothing the fuzzing queued or stored breaking a later reply.
    for route in JSON_ROUTES:
        reply = server.get("/api" + route)
        assert reply.status == 200, (route, reply.body[:300])
        _strict_json(reply)
    run = server.run_prompt(slow_prompt(57, steps=1))
    assert "execution_success" in run.event_names
    odd_flags = server.run_prompt(slow_prompt(56, steps=1), feature_flags=["not", "an", "object"],  # type: ignore
                                  extra_data={"preview_method": "auto"})
    assert "execution_success" in odd_flags.event_names and len(odd_flags.binary_frames) == 1
    assert server.get(f"/api/history/{run.prompt_id}").json()[run.prompt_id]["outputs"] == {"2": {"text": ["58"]}}
    assert server.get("/api/userdata/workflows%2Ffuzz-kept.json").body == saved_workflow
    assert server.get("/api/settings/Fuzz.Kept").json() == "yes"


def test_an_unreadable_settings_file_is_kept_aside_not_overwritten(server):
    settings_file = server.dirs["user"] / "default" / "comfy.settings.json"
    previous = settings_file.read_bytes() if settings_file.exists() else None
    try:
        settings_file.write_text('{"Comfy.Locale": "de", half a file')
        assert server.get("/api/settings").json() == {}
        assert server.post("/api/settings/Comfy.Zoom", 3).status == 200
        assert json.loads(settings_file.read_text()) == {"Comfy.Zoom": 3}
        kept = list(settings_file.parent.glob("comfy.settings.json.unreadable-*"))
        assert [path.read_text() for path in kept] == ['{"Comfy.Locale": "de", half a file']
    finally:
        for path in settings_file.parent.glob("comfy.settings.json.unreadable-*"):
            path.unlink()
        if previous is not None:
            settings_file.write_bytes(previous)


def test_job_list_reuses_summaries_only_while_the_history_record_is_the_same():
    from flux2_host.jobs import JOB_STATUSES, JobList
    from flux2_host.prompt_queue import QueueItem, history_record

    def record(status: str) -> dict:
        item = QueueItem(1, "p", {}, {"create_time": 5}, [])
        return history_record(item, status, {}, [("execution_start", {"timestamp": 1})])

    jobs = JobList()
    listing = lambda history: jobs.list([], [], history, list(JOB_STATUSES), None, "created_at", "desc")
    first = record("success")
    assert [job["status"] for job in listing({"p": first})] == ["completed"]
    assert listing({"p": first})[0] is listing({"p": first})[0]
    assert [job["status"] for job in listing({"p": record("error")})] == ["failed"]
    assert listing({}) == [] and jobs.finished_jobs({}) == []
