"""Every official FLUX.2 workflow template (dev and klein, text-to-image and editing) runs unchanged in the host:
the UI file from comfyui-workflow-templates-json goes through `flux2_host.workflow.to_api_prompt`, validation and
the executor, on the tiny demo checkpoints `flux2 demo-models` writes under the file names the templates ask for
(their Turbo LoRAs and the klein 9B KV checkpoint included).

For time only, image sizes are overridden after conversion, on the template's own nodes: width/height of
EmptyFlux2LatentImage and Flux2Scheduler (or the PrimitiveInt nodes feeding them) become 64, and
ImageScaleToTotalPixels scales reference images to 0.01 MP. Steps, seeds, cfg, guidance, prompts and wiring are
the template's.
"""

from __future__ import annotations

import json
from pathlib import Path

import comfyui_workflow_templates_json
import numpy as np
import pytest
from PIL import Image

from flux2_core.checkpoints.loaders import load_dit, load_text_encoder, load_vae
from flux2_core.pipeline import Flux2Pipeline
from flux2_host import folders
from flux2_host.executor import PromptExecutor, validate_prompt
from flux2_host.registry import NodeRegistry
from flux2_host.workflow import to_api_prompt

TEMPLATE_DIR = Path(comfyui_workflow_templates_json.__file__).parent / "templates"
TEMPLATES = sorted(path.name for path in TEMPLATE_DIR.glob("image_flux2*.json"))
UI_ONLY_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
TINY_SIZE = 64
TINY_MEGAPIXELS = 0.01
class Events:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def send(self, event: str, data: dict) -> None:
        self.events.append((event, data))

    def send_preview(self, node_id: str, prompt_id: str, image) -> None:
        pass


def template(name: str) -> dict:
    return json.loads((TEMPLATE_DIR / name).read_text(encoding="utf-8"))


def all_nodes(workflow: dict) -> list[dict]:
    """Top-level nodes and the nodes inside every subgraph definition."""
    nodes = list(workflow["nodes"])
    for subgraph in workflow.get("definitions", {}).get("subgraphs", []):
        nodes.extend(subgraph["nodes"])
    return nodes


def subgraph_ids(workflow: dict) -> set[str]:
    return {subgraph["id"] for subgraph in workflow.get("definitions", {}).get("subgraphs", [])}


@pytest.fixture(scope="module")
def host(demo_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The demo models as they are (`flux2 demo-models` writes every file a template names) and an input folder
    with an image under every name a template's LoadImage nodes ask for."""
    root = tmp_path_factory.mktemp("templates")
    folders.configure(models=str(demo_models_dir), input_dir=str(root / "input"), output_dir=str(root / "output"),
                      temp_dir=str(root / "temp"))
    folders.install_as_folder_paths()
    rng = np.random.default_rng(0)
    for name in TEMPLATES:
        for node in all_nodes(template(name)):
            if node["type"] == "LoadImage":
                pixels = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "input" / node["widgets_values"][0])
    registry = NodeRegistry.default()
    return {"registry": registry, "executor": PromptExecutor(registry), "models": demo_models_dir,
            "output": root / "output"}


def shrink(prompt: dict) -> dict:
    """The size overrides described in the module docstring, applied to the converted API prompt."""
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] in ("EmptyFlux2LatentImage", "Flux2Scheduler"):
            for name in ("width", "height"):
                value = inputs[name]
                if not isinstance(value, list):
                    inputs[name] = TINY_SIZE
                elif prompt[value[0]]["class_type"] == "PrimitiveInt":
                    prompt[value[0]]["inputs"]["value"] = TINY_SIZE
        if node["class_type"] == "ImageScaleToTotalPixels":
            inputs["megapixels"] = TINY_MEGAPIXELS
    return prompt


def run_template(host: dict, name: str, changes=None):
    prompt = shrink(to_api_prompt(template(name), host["registry"]))
    if changes:
        changes(prompt)
    validation = validate_prompt(prompt, host["registry"])
    assert validation.ok, json.dumps({"error": validation.error, "node_errors": validation.node_errors}, default=str)
    events = Events()
    result = host["executor"].execute(prompt, name, {}, list(validation.outputs), events)
    return prompt, result, events


def saved_images(host: dict, result) -> list[Path]:
    return [host["output"] / entry["subfolder"] / entry["filename"]
            for ui in result.outputs.values() for entry in ui.get("images", [])]


def test_the_template_set_covers_dev_and_klein_text_to_image_and_editing() -> None:
    assert {"image_flux2.json", "image_flux2_text_to_image.json", "image_flux2_klein_text_to_image.json",
            "image_flux2_klein_image_edit_4b_distilled.json",
            "image_flux2_klein_9b_kv_image_edit.json"} <= set(TEMPLATES)


@pytest.mark.parametrize("name", TEMPLATES)
def test_every_node_type_of_the_template_is_provided(host, name: str) -> None:
    workflow = template(name)
    types = {node["type"] for node in all_nodes(workflow)} - UI_ONLY_TYPES - subgraph_ids(workflow)
    assert types - set(host["registry"].classes) == set()


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_widget_values_fit_our_widget_layouts(host, name: str) -> None:
    """Each core node's saved widgets_values has the length our INPUT_TYPES gives (widget order as ComfyUI's)."""
    for node in all_nodes(template(name)):
        if node["type"] not in host["registry"].classes or node.get("widgets_values") is None:
            continue
        info = host["registry"].object_info_for(node["type"])
        expected = 0
        for section in ("required", "optional"):
            for spec in info["input"].get(section, {}).values():
                options = spec[1] if len(spec) > 1 else {}
                if isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                    expected += 1 + bool(options.get("control_after_generate")) + bool(options.get("image_upload"))
        assert len(node["widgets_values"]) == expected, (node["type"], node["widgets_values"])


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_runs_unchanged_and_saves_its_image(host, name: str) -> None:
    prompt, result, events = run_template(host, name)
    assert result.status == "success", result.error
    [image] = saved_images(host, result)
    with Image.open(image) as png:
        width, height = png.size
        assert json.loads(png.text["prompt"]) == json.loads(json.dumps(prompt))
    assert width % 16 == 0 and height % 16 == 0 and width >= 16 and height >= 16
    if not any(node["class_type"] == "LoadImage" for node in prompt.values()):
        assert (width, height) == (TINY_SIZE, TINY_SIZE)
    progress = [data for event, data in events.events if event == "progress"]
    assert progress and progress[-1]["value"] == progress[-1]["max"]
    # The dev templates' Turbo LoRA sits on the switch branch that is off: lazy, so never loaded.
    used = {prompt[node]["class_type"] for node in [*result.executed, *result.cached]}
    assert "LoraLoaderModelOnly" not in used


@pytest.mark.parametrize("name", ["image_flux2_text_to_image.json", "image_flux2.json", "image_flux2_fp8.json"])
def test_dev_templates_run_with_their_turbo_lora_switched_on(host, name: str) -> None:
    """The template's own PrimitiveBoolean flips both switches: LoRA model and 8 steps instead of 20."""
    def switch_on(prompt: dict) -> None:
        for node in prompt.values():
            if node["class_type"] == "PrimitiveBoolean":
                node["inputs"]["value"] = True

    prompt, result, events = run_template(host, name, switch_on)
    assert result.status == "success", result.error
    used = {prompt[node]["class_type"] for node in [*result.executed, *result.cached]}
    assert "LoraLoaderModelOnly" in used
    progress = [data for event, data in events.events if event == "progress"]
    assert progress[-1]["max"] == 8


def pipeline_pixels(host: dict, dit: str, text_encoder: str, vae: str, **call) -> np.ndarray:
    models = host["models"]
    pipeline = Flux2Pipeline(load_dit(models / "diffusion_models" / dit), load_vae(models / "vae" / vae),
                             load_text_encoder(models / "text_encoders" / text_encoder))
    return np.asarray(pipeline(width=TINY_SIZE, height=TINY_SIZE, **call)[0], dtype=np.int16)


def template_pixels(host: dict, name: str) -> tuple[dict, np.ndarray]:
    prompt, result, _ = run_template(host, name)
    assert result.status == "success", result.error
    [image] = saved_images(host, result)
    with Image.open(image) as png:
        return prompt, np.asarray(png.convert("RGB"), dtype=np.int16)


def input_of(prompt: dict, class_type: str, name: str):
    [value] = [node["inputs"][name] for node in prompt.values() if node["class_type"] == class_type]
    return value


def test_klein_text_to_image_template_equals_the_pipeline(host) -> None:
    """The active subgraph: klein base 4B, CFGGuider 5 with an empty negative, 20 steps, seed 0."""
    prompt, ours = template_pixels(host, "image_flux2_klein_text_to_image.json")
    text = input_of(prompt, "PrimitiveStringMultiline", "value")
    expected = pipeline_pixels(host, "flux-2-klein-base-4b.safetensors", "qwen_3_4b.safetensors",
                               "flux2-vae.safetensors", prompt=text, steps=20, cfg=5.0, seed=0)
    assert np.abs(ours - expected).max() <= 2


def test_dev_text_to_image_template_equals_the_pipeline(host) -> None:
    """FluxGuidance 4 + BasicGuider, 20 steps, the template's seed."""
    prompt, ours = template_pixels(host, "image_flux2_text_to_image.json")
    text = next(node["inputs"]["text"] for node in prompt.values() if node["class_type"] == "CLIPTextEncode")
    expected = pipeline_pixels(host, "flux2_dev_fp8mixed.safetensors", "mistral_3_small_flux2_bf16.safetensors",
                               "full_encoder_small_decoder.safetensors", prompt=text, steps=20, guidance=4.0,
                               seed=input_of(prompt, "RandomNoise", "noise_seed"))
    assert np.abs(ours - expected).max() <= 2
