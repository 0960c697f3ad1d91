"""Inside a real ComfyUI, the pack's models and ComfyUI's share the GPU: each side frees memory for the other.

ComfyUI is not installable here, so a stand-in `comfy` package with the functions and signatures of ComfyUI's
`comfy.model_management` (free_memory(memory_required, device, keep_loaded=[]), get_free_memory,
unload_all_models, get_torch_device) and `comfy.cli_args.args` records what the pack calls. The pack is loaded
by file location, as ComfyUI loads custom nodes, in a fresh process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import custom_nodes_flux2

STAND_IN = {
    "comfy/__init__.py": "",
    "comfy/utils.py": """
class ProgressBar:
    def __init__(self, total, node_id=None):
        pass
    def update_absolute(self, value, total=None, preview=None):
        pass
""",
    "comfy/cli_args.py": """
import enum, types
class LatentPreviewMethod(enum.Enum):
    NoPreviews = "none"
args = types.SimpleNamespace(preview_method=LatentPreviewMethod.NoPreviews, preview_size=512, lowvram=False,
                             novram=False, highvram=False, gpu_only=False, cpu=False, reserve_vram=0.25)
""",
    "comfy/model_management.py": """
import torch
free_requests = []   # (bytes, device) ComfyUI was asked to free
unloads = 0          # calls of unload_all_models
free_now = 0         # what get_free_memory answers
def get_torch_device():
    return torch.device("cpu")
def get_free_memory(dev=None, torch_free_too=False):
    return free_now
def free_memory(memory_required, device, keep_loaded=[]):
    free_requests.append((int(memory_required), str(device)))
def unload_all_models():
    global unloads
    unloads += 1
    free_memory(1e30, get_torch_device())
def throw_exception_if_processing_interrupted():
    pass
""",
}

SCRIPT = """
import importlib.util, json, sys
sys.path.insert(0, {stand_in!r})
spec = importlib.util.spec_from_file_location("pack", {init!r}, submodule_search_locations=[{pack!r}])
pack = importlib.util.module_from_spec(spec)
sys.modules["pack"] = pack
spec.loader.exec_module(pack)
from flux2_host import folders  # stands in for ComfyUI's folder_paths
folders.configure(models={models!r}, input_dir={tmp!r} + "/in", output_dir={tmp!r} + "/out", temp_dir={tmp!r} + "/t")
folders.install_as_folder_paths()
import comfy.model_management as mm
from flux2_core.memory import residency
report = {{"mode": residency.default_manager().mode.value, "reserve": residency.default_manager().reserve_bytes}}
# A made-up 10 GB device, so that room matters on this CPU (sizes below are a large klein's, not the tiny files').
GB = 10 ** 9
memory = residency.set_default_manager(residency.MemoryManager(device="cpu", total_bytes=10 * GB, reserve_bytes=0))
nodes = pack.NODE_CLASS_MAPPINGS
model = nodes["Flux2LoadModel"]().load("flux-2-klein-4b.safetensors", "default")[0]
encoder = nodes["Flux2LoadTextEncoder"]().load("qwen_3_4b.safetensors")[0]
report["asked_before_loading"] = len(mm.free_requests)
memory.register(model.diffusion_model, size_bytes=4 * GB)
memory.register(encoder, size_bytes=3 * GB)
del mm.free_requests[:]
positive = nodes["Flux2TextEncode"]().encode(encoder, "a fox")[0]
latent = nodes["Flux2EmptyLatent"]().generate(32, 32, 1)[0]
nodes["Flux2Sampler"]().sample(model, positive, latent, 0, 1, 0.0, 0.0, 1.0, "euler")
report["asked_before_use"] = [n for n, _device in mm.free_requests]
from flux2_core.memory.estimate import step_working_bytes
report["step_working"] = step_working_bytes(model.diffusion_model, latent["samples"].shape)
report["resident_after_sampling"] = sorted(r.name for r in memory.models() if r.location.value == "device")

mm.free_now = 10 * GB  # ComfyUI needs room and finds enough after freeing its own: ours stay
mm.free_memory(5 * GB, mm.get_torch_device())
report["resident_when_comfy_had_room"] = sorted(r.name for r in memory.models() if r.location.value == "device")
mm.free_now = 0  # still short after its own: ours go, least recently used first, until ours leave 5 GB
mm.free_memory(5 * GB, mm.get_torch_device())
report["resident_when_comfy_was_short"] = sorted(r.name for r in memory.models() if r.location.value == "device")
mm.unload_all_models()  # the "Unload models" button and POST /free {{"unload_models": true}}
report["resident_after_unload_all"] = [r.name for r in memory.models() if r.location.value == "device"]
report["comfy_unloads"] = mm.unloads
print(json.dumps(report))
"""


def test_inside_comfyui_our_models_and_comfys_free_memory_for_each_other(tmp_path: Path, demo_models_dir: Path) -> None:
    for relative, source in STAND_IN.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(source)
    pack = Path(custom_nodes_flux2.__file__).parent
    script = SCRIPT.format(stand_in=str(tmp_path), init=str(pack / "__init__.py"), pack=str(pack),
                           models=str(demo_models_dir), tmp=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])

    assert report["mode"] == "normal" and report["reserve"] == int(0.25 * 1024 ** 3)  # ComfyUI's --reserve-vram
    assert report["asked_before_loading"] == 2  # one request per model file, before reading it
    # The text encoder (3 GB) and then the DiT (4 GB plus a step's working memory) asked ComfyUI for their room
    # before coming in.
    assert report["step_working"] > 0
    assert report["asked_before_use"] == [3 * 10 ** 9, 4 * 10 ** 9 + report["step_working"]]
    names = report["resident_after_sampling"]
    assert len(names) == 2 and any(n.startswith("DiT") for n in names)  # 7 of 10 GB: the encoder stays
    assert report["resident_when_comfy_had_room"] == names
    assert [n for n in report["resident_when_comfy_was_short"] if n.startswith("DiT")]  # the encoder went first
    assert len(report["resident_when_comfy_was_short"]) == 1
    assert report["resident_after_unload_all"] == [] and report["comfy_unloads"] == 1
