"""What a new user meets first, outside the canvas: the errors and log lines of `flux2 run` and `flux2 serve`
(validation causes, LoRA and size errors, one line per prompt, one log format), the `/internal/*` routes the
frontend's Logs panel calls, upload checks and a busy port."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import uuid
from pathlib import Path

import pytest
from PIL import Image

from flux2_core.errors import Flux2Error, IncompatibleModelsError
from flux2_core.lora.apply import prepare_loras
from flux2_core.sampling import check_image_size
from flux2_host import folders
from flux2_host.cli import main
from flux2_host.executor import PromptExecutor, validate_prompt
from flux2_host.logs import configure_logging
from flux2_host.registry import NodeRegistry
from flux2_host.workflow import to_api_prompt
from server_harness import FLUX2_SCRIPT, FluxServer
from test_nodes import write_kohya_lora

REPO = Path(__file__).resolve().parents[1]
KLEIN_WORKFLOW = REPO / "workflows" / "flux2_klein_text_to_image.json"
WIDE_LORA = "wide_lora.safetensors"  # a LoRA for a DiT 96 wide; every demo DiT is 64 wide
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")


@pytest.fixture
def our_logging():
    """Removes the handlers configure_logging installs (the test, or `flux2 run` inside it, calls it)."""
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "flux2_handler", False)]:
        root.removeHandler(handler)


@pytest.fixture(scope="module")
def made_dirs(demo_models_dir: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("first_contact")
    loras = root / "loras"
    loras.mkdir()
    write_kohya_lora(loras / WIDE_LORA, hidden=96)
    return {"models": demo_models_dir, "loras": loras, **{n: root / n for n in ("input", "output", "temp")}}


@pytest.fixture
def dirs(made_dirs: dict[str, Path]) -> dict[str, Path]:
    """The demo models plus a loras folder, set up as `folder_paths` for each test (`flux2 run` resets folders)."""
    folders.configure(models=str(made_dirs["models"]), input_dir=str(made_dirs["input"]),
                      output_dir=str(made_dirs["output"]), temp_dir=str(made_dirs["temp"]))
    folders.add_model_folder_path("loras", str(made_dirs["loras"]))
    folders.install_as_folder_paths()
    return made_dirs


def klein_prompt(registry: NodeRegistry) -> dict:
    """The shipped klein text-to-image workflow as an API prompt, at 64x64."""
    prompt = to_api_prompt(json.loads(KLEIN_WORKFLOW.read_text()), registry)
    prompt["6"]["inputs"].update(width=64, height=64)
    return prompt


# --- (10) validation failures name their cause ----------------------------------------------------------------


def test_flux2_run_json_prints_the_validation_errors_and_exits_non_zero(dirs, our_logging, capsys):
    args = ["run", str(KLEIN_WORKFLOW), "--json", "--models-dir", str(dirs["models"]), "--output-dir",
            str(dirs["output"]), "--set", "2.model_name=missing.safetensors"]
    assert main(args) == 2
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["error"]["type"] == "prompt_outputs_failed_validation"
    assert report["node_errors"]["2"]["errors"][0]["type"] == "value_not_in_list"
    cause = "node 2 (Flux2LoadModel) input model_name: Value not in list: model_name: 'missing.safetensors' not in"
    assert report["error"]["details"].startswith(cause)
    # The log names the output and the cause, not an empty list.
    assert "Failed to validate prompt for output 9:" in captured.err and cause in captured.err


# --- (11) a LoRA that does not fit is the LoRA loader's error -----------------------------------------------------


def test_a_lora_of_another_width_fails_on_the_lora_loader_node(dirs):
    registry = NodeRegistry.default()
    prompt = klein_prompt(registry)
    prompt["20"] = {"class_type": "Flux2LoadLoRA", "inputs": {"model": ["2", 0], "lora_name": WIDE_LORA, "strength": 1.0}}
    prompt["7"]["inputs"]["model"] = ["20", 0]
    validation = validate_prompt(prompt, registry)
    assert validation.ok, validation.node_errors
    result = PromptExecutor(registry).execute(prompt, "lora", {}, validation.outputs, _Silent())
    assert result.status == "error"
    assert (result.error["node_id"], result.error["node_type"]) == ("20", "Flux2LoadLoRA")
    assert result.error["exception_type"].endswith(IncompatibleModelsError.__name__)
    assert "width 96" in result.error["exception_message"] and "width is 64" in result.error["exception_message"]


class _Silent:
    def send(self, event: str, data: dict) -> None:
        pass

    def send_preview(self, node_id: str, prompt_id: str, image) -> None:
        pass


# --- (13) the size error names every wrong side ---------------------------------------------------------------


def test_the_size_error_names_both_wrong_values():
    with pytest.raises(Flux2Error, match=r"^width and height: expected positive multiples of 16 px, found width 100 "
                                         r"and height 50$"):
        check_image_size(100, 50)
    with pytest.raises(Flux2Error, match=r"^height: expected a positive multiple of 16 px, found 50$"):
        check_image_size(64, 50)


# --- (15, 16) one line per prompt, one format, package loggers ------------------------------------------------


def test_a_finished_prompt_logs_one_line_with_id_seconds_and_outputs(dirs, caplog):
    registry = NodeRegistry.default()
    prompt = klein_prompt(registry)
    with caplog.at_level(logging.INFO, logger="flux2_host.executor"):
        result = PromptExecutor(registry).execute(prompt, "p-15", {}, ["9"], _Silent())
    assert result.status == "success"
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prompt p-15")]
    assert re.fullmatch(r"prompt p-15: success in \d+\.\d\d s, outputs: 9 \(1 images\)", line)


def test_lora_warnings_come_from_the_package_logger_in_the_one_format(dirs, our_logging, capsys):
    configure_logging()  # here, so its stderr handler writes into capsys
    lora = dirs["loras"] / WIDE_LORA
    prepare_loras([(lora, 1.0), (lora, 0.5)])  # the same LoRA twice: warned about once
    [line] = [line for line in capsys.readouterr().err.splitlines() if "more than once" in line]
    assert LOG_LINE.match(line) and " WARNING flux2_core.lora.apply: LoRA " in line
    assert "WARNING:root:" not in line


# --- a real server: logs panel, internal routes, uploads, busy port ---------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = FluxServer(tmp_path_factory.mktemp("serve_first_contact")).start()
    yield running
    running.stop()


def test_internal_log_routes_show_the_prompt_line_and_stream_it_to_subscribers(server):
    def subscribe_on_first_message(event: str, data: dict, done=[]) -> None:
        if not done:
            done.append(True)
            reply = server.request("PATCH", "/internal/logs/subscribe", json_body={"clientId": client_id, "enabled": True})
            assert reply.status == 200

    client_id = uuid.uuid4().hex
    prompt = {"1": {"class_type": "TestSlowCounter", "inputs": {"value": 7, "steps": 3, "delay": 0.3}},
              "2": {"class_type": "TestShowInt", "inputs": {"value": ["1", 0]}}}
    run = server.run_prompt(prompt, client_id=client_id, on_message=subscribe_on_first_message)
    finished = f"prompt {run.prompt_id}: success in"
    streamed = [entry["m"] for data in run.events("logs") for entry in data["entries"]]
    assert any(finished in line for line in streamed)

    raw = server.get("/internal/logs/raw").json()
    assert any(finished in entry["m"] and entry["t"] for entry in raw["entries"]) and raw["size"]["cols"] > 0
    assert finished in server.get("/internal/logs").json()
    assert finished in server.log() and "WARNING:root:" not in server.log()
    assert all(LOG_LINE.match(line) for line in server.log().splitlines() if finished in line)


def test_internal_folder_paths_and_file_lists(server):
    paths = server.get("/internal/folder_paths").json()
    assert paths["diffusion_models"][0] == str(server.dirs["models"] / "diffusion_models")
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    for name in ("older.png", "newer.png"):
        assert server.upload(name, buffer.getvalue()).status == 200
    assert server.get("/internal/files/input").json()[:2] == ["newer.png", "older.png"]
    assert server.get("/internal/files/models").status == 400


def test_a_non_image_upload_is_refused_with_a_clear_400(server):
    reply = server.upload("notes.png", b"these are not the pixels you are looking for")
    assert reply.status == 400
    error = reply.json()["error"]
    assert error["type"] == "not_an_image" and "'notes.png' is not an image" in error["message"]
    assert not (server.dirs["input"] / "notes.png").exists()


def test_a_busy_port_is_one_line_naming_the_port_flag(server, tmp_path):
    done = subprocess.run([str(FLUX2_SCRIPT), "serve", "--port", str(server.port), "--models-dir",
                           str(tmp_path / "models"), "--user-dir", str(tmp_path / "user")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 1
    assert "serving the canvas" not in done.stdout and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"flux2 serve: port {server.port} on 127.0.0.1 is already in use (another flux2 serve or ComfyUI?); "
        "choose another with --port")
