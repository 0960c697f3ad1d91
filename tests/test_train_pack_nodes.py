"""The pack's training nodes (custom_nodes_flux2/training.py) on the tiny demo klein base and a generated shapes
dataset: through the host's executor (the LoRA file appears, loads with our loader and lowers the training
objective; progress and loss per step; an interrupt leaves a state that `resume` continues to the weights of an
uninterrupted run) and inside a ComfyUI stand-in (its ProgressBar, interrupt flag and exception)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import custom_nodes_flux2
from flux2_core.checkpoints.loaders import load_text_encoder, load_vae
from flux2_core.lora import load_lora
from flux2_core.patched_model import PatchedModel
from flux2_core.references import pil_to_tensor
from flux2_core.train.checkpointing import STATE_FILE
from flux2_core.train.config import TrainConfig
from flux2_core.train.objective import Batch, FlowMatchingObjective
from flux2_host import folders
from flux2_host.executor import PromptExecutor, validate_prompt
from flux2_host.registry import NodeRegistry
from train_data import write_shapes_dataset

KLEIN_BASE, VAE, QWEN = "flux-2-klein-base-4b.safetensors", "flux2-vae.safetensors", "qwen_3_4b.safetensors"
TRAIN_NODE = "2"


@pytest.fixture()
def dirs(tmp_path: Path, demo_models_dir: Path) -> dict[str, Path]:
    """The host's folders on the demo models, with two captioned 64 px shapes in input/shapes/images."""
    folders.configure(models=str(demo_models_dir), input_dir=str(tmp_path / "input"),
                      output_dir=str(tmp_path / "output"), temp_dir=str(tmp_path / "temp"))
    folders.install_as_folder_paths()
    write_shapes_dataset(tmp_path / "input" / "shapes", count=2)
    return {"models": demo_models_dir, "input": tmp_path / "input", "output": tmp_path / "output"}


def widgets(**overrides) -> dict:
    values = {"dit": KLEIN_BASE, "vae": VAE, "text_encoder": QWEN, "dataset": "shapes/images",
              "model_version": "klein-base-4b", "network_type": "lora", "network_dim": 4, "network_alpha": 4.0,
              "learning_rate": 0.01, "optimizer_type": "adamw", "max_train_steps": 4, "batch_size": 2,
              "resolution": 64, "timestep_sampling": "flux2_shift", "gradient_checkpointing": True,
              "fp8_base": False, "blocks_to_swap": 0, "seed": 7, "save_every_n_steps": 0, "output_name": "shapes",
              "sample_prompt": "", "sample_every_n_steps": 0, "resume": "", "more_options": 'device = "cpu"'}
    values.update(overrides)
    return values


class Listener:
    """Records the executor's messages; `on_progress(value)` runs at each progress message of the train node."""

    def __init__(self, executor: PromptExecutor | None = None, interrupt_at: int | None = None):
        self.messages: list[tuple[str, dict]] = []
        self.executor, self.interrupt_at = executor, interrupt_at

    def send(self, event: str, data: dict) -> None:
        self.messages.append((event, data))
        if event == "progress" and data["node"] == TRAIN_NODE and data["value"] == self.interrupt_at:
            self.executor.interrupt()  # what the host's /interrupt does

    def send_preview(self, node_id: str, prompt_id: str, image) -> None:
        pass

    def events(self, name: str) -> list[dict]:
        return [data for event, data in self.messages if event == name]


def run(prompt: dict, executor: PromptExecutor, listener: Listener, prompt_id: str = "p"):
    validation = validate_prompt(prompt, executor.registry)
    assert validation.ok, validation.node_errors
    return executor.execute(prompt, prompt_id, {}, validation.outputs, listener)


def train_prompt(**overrides) -> dict:
    return {"1": {"class_type": "Flux2LoadModel", "inputs": {"model_name": KLEIN_BASE, "weight_dtype": "default"}},
            TRAIN_NODE: {"class_type": "Flux2TrainLoRA", "inputs": {"model": ["1", 0], **widgets(**overrides)}}}


def shapes_batch(dirs: dict[str, Path]) -> Batch:
    """The dataset encoded directly (64 px pictures are their own 64x64 bucket): latents and caption embeddings."""
    images = sorted((dirs["input"] / "shapes" / "images").glob("*.png"))
    from PIL import Image

    vae, encoder = load_vae(dirs["models"] / "vae" / VAE), load_text_encoder(dirs["models"] / "text_encoders" / QWEN)
    with torch.no_grad():
        latents = vae.encode(torch.cat([pil_to_tensor(Image.open(path).convert("RGB")) for path in images]))
        context = encoder.encode([path.with_suffix(".txt").read_text() for path in images])
    return Batch(latents, context)


def objective(model: PatchedModel, batch: Batch) -> float:
    """The training objective on `batch` with fixed noise and sigmas (16 draws), without gradients."""
    loss = FlowMatchingObjective(TrainConfig(model_version="klein-base-4b"))
    generator = torch.Generator().manual_seed(123)
    with model.patches_applied() as dit, torch.no_grad():
        return float(torch.stack([loss(dit, batch, generator)[0] for _ in range(16)]).mean())


def test_declarations(dirs) -> None:
    registry = NodeRegistry.default()
    info = registry.object_info_for("Flux2TrainLoRA")
    required = info["input"]["required"]
    assert required["dit"][0] == registry.object_info_for("Flux2LoadModel")["input"]["required"]["model_name"][0]
    defaults = TrainConfig()
    for name in ("network_type", "network_dim", "network_alpha", "learning_rate", "optimizer_type",
                 "max_train_steps", "resolution", "timestep_sampling", "gradient_checkpointing", "fp8_base",
                 "blocks_to_swap", "seed", "save_every_n_steps", "output_name", "sample_every_n_steps"):
        assert required[name][1]["default"] == getattr(defaults, name), name
    assert list(info["input"]["optional"]) == ["model", "more_options"]
    assert info["output"] == ["STRING", "IMAGE", "FLUX2_MODEL"] and info["output_node"] is True
    config = registry.object_info_for("Flux2TrainFromConfig")
    assert list(config["input"]["required"]) == ["config_path", "overrides"]
    assert config["output"] == ["STRING", "IMAGE"] and config["display_name"] == "FLUX.2 Train LoRA (config file)"


def test_widget_node_trains_a_lora_that_loads_and_lowers_the_loss(dirs) -> None:
    executor = PromptExecutor(NodeRegistry.default())
    listener = Listener()
    prompt = train_prompt(max_train_steps=12, sample_prompt="a red circle --w 64 --h 64 --s 2 --d 1",
                          sample_every_n_steps=12)
    result = run(prompt, executor, listener)
    assert result.status == "success", result.error
    folder = dirs["output"] / "flux2_training"
    path = folder / "shapes.safetensors"
    lora = load_lora(path)
    assert lora.patches and not lora.unmatched_keys and {patch.delta.rank for patch in lora.patches} == {4}
    progress = [(data["value"], data["max"]) for data in listener.events("progress") if data["node"] == TRAIN_NODE]
    assert progress == [(step, 12) for step in range(1, 13)] + [(1, 2), (2, 2)]  # then the sample's 2 steps
    losses = listener.events("flux2.training")
    assert [data["step"] for data in losses] == list(range(1, 13)) and all(data["loss"] > 0 for data in losses)
    assert (folder / "sample").is_dir() and list((folder / "sample").glob("shapes_00000012_*.png"))
    model = PatchedModel.load(dirs["models"] / "diffusion_models" / KLEIN_BASE)
    batch = shapes_batch(dirs)
    assert objective(model.with_lora(lora, 1.0), batch) < 0.95 * objective(model, batch)

    # the node's outputs: the path, a loss chart IMAGE and the MODEL input with the LoRA applied
    lora_path, chart, trained = custom_nodes_flux2.NODE_CLASS_MAPPINGS["Flux2TrainLoRA"]().train(
        model=model, **widgets(max_train_steps=1, output_name="one"))
    assert lora_path == str(folder / "one.safetensors") and chart.shape[0] == 1 and chart.shape[-1] == 3
    assert trained.lora_patches[0][1] == 1.0 and model.lora_patches == ()


def test_widget_node_trains_under_comfyuis_inference_mode(dirs) -> None:
    """Real ComfyUI runs every node inside `torch.inference_mode()` (its execution.py; the host does not): the
    model input is loaded there too, and the training still gets gradients (it failed in ComfyUI 0.12.1 with
    'element 0 of tensors does not require grad')."""
    with torch.inference_mode():
        model = PatchedModel.load(dirs["models"] / "diffusion_models" / KLEIN_BASE)
        lora_path, chart, trained = custom_nodes_flux2.NODE_CLASS_MAPPINGS["Flux2TrainLoRA"]().train(
            model=model, **widgets(max_train_steps=2, output_name="inference"))
    lora = load_lora(lora_path)
    assert lora.patches and all(patch.delta.up.abs().max() > 0 for patch in lora.patches)
    assert chart.shape[-1] == 3 and trained.lora_patches[0][1] == 1.0


def test_interrupt_leaves_a_state_that_resume_continues_to_the_same_weights(dirs) -> None:
    executor = PromptExecutor(NodeRegistry.default())
    stopped = Listener(executor, interrupt_at=2)
    result = run(train_prompt(max_train_steps=5), executor, stopped, "first")
    assert result.status == "interrupted" and result.error["node_id"] == TRAIN_NODE
    folder = dirs["output"] / "flux2_training"
    state = folder / "shapes-state"
    assert torch.load(state / STATE_FILE, weights_only=False)["step"] in (2, 3)
    assert not (folder / "shapes.safetensors").exists()

    resumed = Listener()
    result = run(train_prompt(max_train_steps=5, resume="shapes-state"), executor, resumed, "second")
    assert result.status == "success", result.error
    steps = [data["value"] for data in resumed.events("progress") if data["node"] == TRAIN_NODE]
    assert steps[0] in (3, 4) and steps[-1] == 5

    result = run(train_prompt(max_train_steps=5, output_name="straight"), executor, Listener(), "third")
    assert result.status == "success", result.error
    with safe_open(str(folder / "shapes.safetensors"), "pt") as a, \
            safe_open(str(folder / "straight.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys()) and all(torch.equal(a.get_tensor(k), b.get_tensor(k))
                                                            for k in a.keys())


def test_config_node_runs_the_file_trainer_with_overrides(dirs, tmp_path) -> None:
    models = dirs["models"]
    config = tmp_path / "train.toml"
    config.write_text(
        f'dit = "{models / "diffusion_models" / KLEIN_BASE}"\nvae = "{models / "vae" / VAE}"\n'
        f'text_encoder = "{models / "text_encoders" / QWEN}"\nmodel_version = "klein-base-4b"\n'
        f'dataset_config = "{dirs["input"] / "shapes" / "dataset.toml"}"\noutput_dir = "{tmp_path / "out"}"\n'
        f'output_name = "from-file"\ndevice = "cpu"\n[network]\nnetwork_dim = 2\nmax_train_steps = 100\n')
    prompt = {"1": {"class_type": "Flux2TrainFromConfig",
                    "inputs": {"config_path": str(config), "overrides": "max_train_steps = 2\nnetwork_dim = 3"}}}
    executor = PromptExecutor(NodeRegistry.default())
    listener = Listener()
    result = run(prompt, executor, listener)
    assert result.status == "success", result.error
    assert [data["value"] for data in listener.events("progress")] == [1, 2]
    assert {patch.delta.rank for patch in load_lora(tmp_path / "out" / "from-file.safetensors").patches} == {3}


@pytest.mark.parametrize("inputs, message", [
    ({"config_path": "missing.toml", "overrides": ""}, "Flux2TrainFromConfig: config_path: expected a training"),
    ({"config_path": "train.toml", "overrides": "network_dimm = 3"}, "Flux2TrainFromConfig: overrides: .*network_dimm"),
    ({"config_path": "train.toml", "overrides": "max_train_steps = "}, "Flux2TrainFromConfig: overrides: expected TOML"),
])
def test_config_node_errors_name_the_node_and_field(dirs, inputs, message) -> None:
    (dirs["input"] / "train.toml").write_text('network_dim = 2\n')
    node = custom_nodes_flux2.NODE_CLASS_MAPPINGS["Flux2TrainFromConfig"]()
    with pytest.raises(ValueError, match=message):
        node.train(**inputs)


def test_config_node_refuses_a_config_without_models(dirs) -> None:
    (dirs["input"] / "train.toml").write_text('network_dim = 2\n')
    node = custom_nodes_flux2.NODE_CLASS_MAPPINGS["Flux2TrainFromConfig"]()
    with pytest.raises(ValueError, match="Flux2TrainFromConfig: train config dit: a path is required"):
        node.train("train.toml", "")


@pytest.mark.parametrize("overrides, message", [
    ({"dataset": "nowhere"}, "Flux2TrainLoRA: dataset: expected an image folder or a dataset .toml"),
    ({"dit": "missing.safetensors"}, "Flux2TrainLoRA: dit: expected a file"),
    ({"resume": "no-state"}, "Flux2TrainLoRA: resume: expected a training state folder"),
    ({"output_name": "../up"}, "Flux2TrainLoRA: output_name: expected a file name"),
    ({"sample_every_n_steps": 2}, "Flux2TrainLoRA: sample_prompt: expected a prompt"),
    ({"more_options": "lr_sheduler = 'cosine'"}, "Flux2TrainLoRA: more_options: .*lr_sheduler"),
    ({"more_options": "network_dim = 0"}, "Flux2TrainLoRA: train config: network_dim"),
])
def test_widget_node_errors_name_the_node_and_field(dirs, overrides, message) -> None:
    node = custom_nodes_flux2.NODE_CLASS_MAPPINGS["Flux2TrainLoRA"]()
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        node.train(**widgets(**overrides))


COMFY_STAND_IN = {
    "comfy/__init__.py": "",
    "comfy/utils.py": """
updates = []
class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total = total
    def update_absolute(self, value, total=None, preview=None):
        updates.append((value, total))
""",
    "comfy/model_management.py": """
import torch
interrupt_processing = False
unloads = 0
class InterruptProcessingException(Exception):
    pass
def get_torch_device():
    return torch.device("cpu")
def get_free_memory(dev=None, torch_free_too=False):
    return 0
def free_memory(memory_required, device, keep_loaded=[]):
    pass
def unload_all_models():
    global unloads
    unloads += 1
def soft_empty_cache(force=False):
    pass
def processing_interrupted():
    return interrupt_processing
def throw_exception_if_processing_interrupted():
    global interrupt_processing
    if interrupt_processing:
        interrupt_processing = False
        raise InterruptProcessingException()
""",
    "server.py": """
class PromptServer:
    instance = None
class _Server:
    client_id = "c"
    def __init__(self):
        self.sent = []
    def send_sync(self, event, data, sid=None):
        self.sent.append((event, data, sid))
PromptServer.instance = _Server()
""",
}

COMFY_SCRIPT = """
import importlib.util, json, sys
sys.path.insert(0, {stand_in!r})
spec = importlib.util.spec_from_file_location("pack", {init!r}, submodule_search_locations=[{pack!r}])
pack = importlib.util.module_from_spec(spec)
sys.modules["pack"] = pack
spec.loader.exec_module(pack)
from flux2_host import folders  # stands in for ComfyUI's folder_paths
folders.configure(models={models!r}, input_dir={input!r}, output_dir={tmp!r} + "/out", temp_dir={tmp!r} + "/t")
folders.install_as_folder_paths()
import comfy.model_management as mm, comfy.utils as cu
from server import PromptServer
node = pack.NODE_CLASS_MAPPINGS["Flux2TrainFromConfig"]()
def update(value, total=None, preview=None):
    cu.updates.append((value, total))
    mm.interrupt_processing = value == 2  # the user presses Cancel during step 2's report
cu.ProgressBar.update_absolute = lambda self, value, total=None, preview=None: update(value, total)
report = {{}}
try:
    node.train({config!r}, "")
except mm.InterruptProcessingException:
    report["interrupted"] = True
report["flag_after"] = mm.interrupt_processing
report["first"] = list(cu.updates)
del cu.updates[:]
path, chart = node.train({config!r}, 'resume = "{state}"')
report.update(second=cu.updates, path=path, chart=list(chart.shape), unloads=mm.unloads,
              sent=[(event, data["step"], sid) for event, data, sid in PromptServer.instance.sent])
print(json.dumps(report))
"""


def test_inside_comfyui_progress_bar_and_interrupt(dirs, tmp_path) -> None:
    """The pack loaded by file location with stand-ins for ComfyUI's comfy.utils, comfy.model_management and
    server: ComfyUI's ProgressBar per step, its interrupt flag stops the run with its own exception (cleared),
    leaving a state the config node resumes from; the loss goes to the frontend as a `flux2.training` message."""
    stand_in = tmp_path / "comfy_stand_in"
    for name, text in COMFY_STAND_IN.items():
        (stand_in / name).parent.mkdir(parents=True, exist_ok=True)
        (stand_in / name).write_text(text)
    models = dirs["models"]
    config = tmp_path / "train.toml"
    config.write_text(
        f'dit = "{models / "diffusion_models" / KLEIN_BASE}"\nvae = "{models / "vae" / VAE}"\n'
        f'text_encoder = "{models / "text_encoders" / QWEN}"\nmodel_version = "klein-base-4b"\n'
        f'dataset_config = "{dirs["input"] / "shapes" / "dataset.toml"}"\noutput_dir = "{tmp_path / "run"}"\n'
        f'output_name = "comfy"\ndevice = "cpu"\nnetwork_dim = 2\nmax_train_steps = 4\n')
    pack = Path(custom_nodes_flux2.__file__).parent
    script = COMFY_SCRIPT.format(stand_in=str(stand_in), init=str(pack / "__init__.py"), pack=str(pack),
                                 models=str(models), input=str(dirs["input"]), tmp=str(tmp_path), config=str(config),
                                 state=str(tmp_path / "run" / "comfy-state"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["interrupted"] is True and report["flag_after"] is False
    assert report["first"] == [[1, 4], [2, 4]]
    assert report["second"] == [[3, 4], [4, 4]]
    assert report["path"] == str(tmp_path / "run" / "comfy.safetensors") and report["chart"][-1] == 3
    assert report["unloads"] == 2
    assert report["sent"] == [["flux2.training", step, "c"] for step in (1, 2, 3, 4)]
