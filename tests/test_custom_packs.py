"""Third-party ComfyUI node packs in the host: loading from custom_nodes/ folders, the stand-ins for ComfyUI's
Python API, WEB_DIRECTORY and PromptServer routes/messages in `flux2 serve`, one-line import errors.

The packs are small ones written here, each in the shape real packs have (a folder with relative imports, a
single file, a web directory, routes declared at import time)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flux2_core.errors import Interrupted
from flux2_host import comfy_api
from flux2_host.custom_packs import extension_scripts, load_custom_packs, pack_candidates
from flux2_host.registry import NodeRegistry

PACKS = {
    # A pure image pack: a folder whose __init__ imports a sibling module, ComfyUI's utils and helpers.
    "pixel_tools/__init__.py": """
        import torch
        import comfy.model_management
        import comfy.utils
        import folder_paths
        import node_helpers

        from .ops import invert_colours


        class InvertColours:
            CATEGORY = "test packs"
            FUNCTION = "invert"
            RETURN_TYPES = ("IMAGE",)

            @classmethod
            def INPUT_TYPES(cls):
                return {"required": {"image": ("IMAGE",)}}

            def invert(self, image):
                bar = comfy.utils.ProgressBar(image.shape[0])
                frames = []
                for frame in image:
                    comfy.model_management.throw_exception_if_processing_interrupted()
                    frames.append(invert_colours(frame))
                    bar.update(1)
                return (torch.stack(frames).to(comfy.model_management.intermediate_device()),)


        class HalfSize:
            CATEGORY = "test packs"
            FUNCTION = "half"
            RETURN_TYPES = ("IMAGE",)

            @classmethod
            def INPUT_TYPES(cls):
                return {"required": {"image": ("IMAGE",)}}

            def half(self, image):
                samples = image.movedim(-1, 1)
                half = comfy.utils.common_upscale(samples, samples.shape[-1] // 2, samples.shape[-2] // 2,
                                                  "area", "disabled")
                return (half.movedim(1, -1),)


        NODE_CLASS_MAPPINGS = {"TestPackInvert": InvertColours, "TestPackHalfSize": HalfSize}
        NODE_DISPLAY_NAME_MAPPINGS = {"TestPackInvert": "Invert colours (test pack)"}
    """,
    "pixel_tools/ops.py": """
        def invert_colours(frame):
            return 1.0 - frame
    """,
    # A pack that talks to the canvas: a route, WebSocket messages, and a web directory with its scripts.
    "hello_server/__init__.py": """
        from aiohttp import web
        from server import PromptServer

        WEB_DIRECTORY = "./web"


        @PromptServer.instance.routes.get("/hello_pack/ping")
        async def ping(request):
            return web.json_response({"pong": request.query.get("who", "")})


        class Announce:
            CATEGORY = "test packs"
            FUNCTION = "announce"
            OUTPUT_NODE = True
            RETURN_TYPES = ()

            @classmethod
            def INPUT_TYPES(cls):
                return {"required": {"text": ("STRING", {"default": "hi"})}}

            def announce(self, text):
                PromptServer.instance.send_sync("hello_pack.announce", {"text": text})
                return {"ui": {"text": [text]}}


        NODE_CLASS_MAPPINGS = {"TestPackAnnounce": Announce}
    """,
    "hello_server/web/js/hello.js": "console.log('hello from a node pack');\n",
    "hello_server/web/js/panels/panel.js": "export const panel = 1;\n",
    "hello_server/web/readme.txt": "not a script\n",
    # A single-file pack.
    "shout.py": """
        class Shout:
            CATEGORY = "test packs"
            FUNCTION = "shout"
            RETURN_TYPES = ("STRING",)

            @classmethod
            def INPUT_TYPES(cls):
                return {"required": {"text": ("STRING", {"default": "hi"})}}

            def shout(self, text):
                return (text.upper(),)


        NODE_CLASS_MAPPINGS = {"TestPackShout": Shout}
    """,
    # A pack built on ComfyUI's core node classes, as rgthree's Image Comparer is on PreviewImage.
    "compare_pack.py": """
        import nodes
        from nodes import MAX_RESOLUTION, PreviewImage

        assert MAX_RESOLUTION >= 8192 and "VAEDecode" in nodes.NODE_CLASS_MAPPINGS


        class Compare(PreviewImage):
            FUNCTION = "compare"

            @classmethod
            def INPUT_TYPES(cls):
                return {"required": {"image_a": ("IMAGE",), "image_b": ("IMAGE",)},
                        "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

            def compare(self, image_a, image_b, prompt=None, extra_pnginfo=None):
                a = self.save_images(image_a, "compare.a.", prompt, extra_pnginfo)["ui"]["images"]
                b = self.save_images(image_b, "compare.b.", prompt, extra_pnginfo)["ui"]["images"]
                return {"ui": {"a_images": a, "b_images": b}}


        NODE_CLASS_MAPPINGS = {"TestPackCompare": Compare}
    """,
    # Packs that cannot run here: ComfyUI's model internals, by import and by name, and a missing library.
    "needs_internals/__init__.py": """
        import comfy.sd

        NODE_CLASS_MAPPINGS = {}
    """,
    "needs_a_loader.py": """
        from comfy.model_management import load_models_gpu

        NODE_CLASS_MAPPINGS = {}
    """,
    "broken_dependency.py": """
        import a_library_nobody_installed

        NODE_CLASS_MAPPINGS = {}
    """,
    # Skipped without being imported, as ComfyUI does.
    "retired.disabled/__init__.py": "raise SystemExit('a disabled pack must not be imported')\n",
    "notes.txt": "not a pack\n",
}

INTERNALS_ERRORS = {
    "needs_internals": "node pack 'needs_internals' not loaded: it needs ComfyUI's internals (comfy.sd), which "
                       "the flux2 host does not provide; run it in ComfyUI, with the FLUX.2 pack "
                       "(custom_nodes_flux2) installed there",
    "needs_a_loader": "node pack 'needs_a_loader' not loaded: it needs ComfyUI's internals "
                      "(comfy.model_management.load_models_gpu), which the flux2 host does not provide; run it "
                      "in ComfyUI, with the FLUX.2 pack (custom_nodes_flux2) installed there",
}
DEPENDENCY_ERROR = ("node pack 'broken_dependency' not loaded: ModuleNotFoundError: No module named "
                    "'a_library_nobody_installed'")


def write_packs(root: Path) -> Path:
    for relative, source in PACKS.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return root


def stand_in_module_names() -> list[str]:
    extras = [name for name in sys.modules if name == "comfy_extras" or name.startswith("comfy_extras.")]
    return ["comfy", "folder_paths", "execution", *comfy_api.STAND_INS, *extras]


@pytest.fixture
def stand_ins():
    """Installs the stand-ins in this process for one test, then takes them out again."""
    saved = {name: sys.modules[name] for name in stand_in_module_names() if name in sys.modules}
    yield
    for name in stand_in_module_names():
        sys.modules.pop(name, None)
    sys.modules.update(saved)


def test_packs_load_as_comfyui_loads_them(tmp_path, stand_ins, caplog):
    root = write_packs(tmp_path / "custom_nodes")
    assert [os.path.basename(path) for path in pack_candidates(str(root))] == [
        "broken_dependency.py", "compare_pack.py", "hello_server", "needs_a_loader.py", "needs_internals",
        "pixel_tools", "shout.py"]
    registry = NodeRegistry.default()
    with caplog.at_level(logging.INFO, logger="flux2.custom_nodes"):
        results = {result.name: result for result in load_custom_packs(registry, [str(root)])}

    assert {name: result.nodes for name, result in results.items() if result.error is None} == {
        "compare_pack": ["TestPackCompare"], "hello_server": ["TestPackAnnounce"], "pixel_tools": ["TestPackInvert", "TestPackHalfSize"],
        "shout": ["TestPackShout"]}
    info = registry.object_info()
    assert info["TestPackInvert"]["display_name"] == "Invert colours (test pack)"
    assert info["TestPackInvert"]["python_module"] == "custom_nodes.pixel_tools"
    assert info["TestPackShout"]["python_module"] == "custom_nodes.shout"
    assert registry.web_directories == {"hello_server": str(root / "hello_server" / "web")}
    assert issubclass(registry.classes["TestPackCompare"], registry.classes["PreviewImage"])
    assert extension_scripts(registry.web_directories) == ["/extensions/hello_server/js/hello.js",
                                                           "/extensions/hello_server/js/panels/panel.js"]
    # One error line per pack that did not load, naming it; nothing else at error level.
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == [DEPENDENCY_ERROR, INTERNALS_ERRORS["needs_a_loader"], INTERNALS_ERRORS["needs_internals"]]
    assert all("\n" not in message for message in errors)

    image = torch.rand(2, 6, 8, 3)
    assert torch.equal(registry.classes["TestPackInvert"]().invert(image)[0], 1.0 - image)
    # "area" halving is the mean of each 2x2 block.
    expected = image.reshape(2, 3, 2, 4, 2, 3).mean(dim=(2, 4))
    assert torch.allclose(registry.classes["TestPackHalfSize"]().half(image)[0], expected, atol=1e-6)


def test_common_upscale_crops_the_centre_to_the_target_aspect(stand_ins):
    comfy_api.install()
    import comfy.utils

    samples = torch.arange(2 * 3 * 4 * 8, dtype=torch.float32).reshape(2, 3, 4, 8)
    # 8x4 -> square: ComfyUI keeps the middle 4 columns (x = round((8 - 8 * 1 / 2) / 2) = 2).
    assert torch.equal(comfy.utils.common_upscale(samples, 4, 4, "nearest-exact", "center"), samples[..., 2:6])
    # Without crop the width is squeezed: nearest-exact samples pixel centres, columns floor((i + 0.5) * 2).
    assert torch.equal(comfy.utils.common_upscale(samples, 4, 4, "nearest-exact", "disabled"), samples[..., 1::2])
    # 8x4 -> 2 wide, 4 tall (aspect 0.5): x = round((8 - 8 * 0.5 / 2) / 2) = 3, the middle 2 columns.
    assert torch.equal(comfy.utils.common_upscale(samples, 2, 4, "nearest-exact", "center"), samples[..., 3:5])
    # 8x4 -> 8 wide, 2 tall (aspect 4): y = round((4 - 4 * 2 / 4) / 2) = 1, the middle 2 rows.
    assert torch.equal(comfy.utils.common_upscale(samples, 8, 2, "nearest-exact", "center"), samples[..., 1:3, :])
    pixels = torch.rand(1, 3, 8, 8)
    lanczos = comfy.utils.common_upscale(pixels, 4, 4, "lanczos", "disabled")
    picture = Image.fromarray(np.clip(255.0 * pixels[0].movedim(0, -1).numpy(), 0, 255).astype(np.uint8))
    reference = np.array(picture.resize((4, 4), Image.Resampling.LANCZOS)).astype(np.float32) / 255.0
    assert torch.allclose(lanczos[0].movedim(0, -1), torch.from_numpy(reference))
    # comfy.utils.lanczos, which packs call directly (ImageScaleToTotalPixelsX), is the same resize.
    assert torch.equal(comfy.utils.lanczos(pixels, 4, 4), lanczos)
    with pytest.raises(ValueError, match="upscale_method must be one of"):
        comfy.utils.common_upscale(pixels, 4, 4, "bislerp", "disabled")


def test_interrupt_and_progress_reach_the_host(stand_ins):
    from flux2_core import progress

    comfy_api.install()
    import comfy.model_management as mm
    import comfy.utils

    seen = []
    with progress.progress_handler(lambda step, total, preview: seen.append((step, total, preview))):
        bar = comfy.utils.ProgressBar(3)
        bar.update(1)
        bar.update_absolute(5)  # clamped to the total, as ComfyUI does
        bar.update_absolute(2, total=4, preview=("JPEG", Image.new("RGB", (2, 2)), 512))
    assert seen == [(1, 3, None), (3, 3, None), (2, 4, None)]
    assert not mm.processing_interrupted()
    mm.interrupt_current_processing()
    assert mm.processing_interrupted()
    with pytest.raises(Interrupted):  # the executor's own interruption, so a run ends "interrupted"
        mm.throw_exception_if_processing_interrupted()
    assert not mm.processing_interrupted()
    assert mm.get_torch_device().type in ("cpu", "cuda") and mm.intermediate_device() == torch.device("cpu")
    assert mm.get_free_memory(torch.device("cpu")) > 0


def test_node_helpers(stand_ins):
    comfy_api.install()
    import node_helpers

    embeddings = torch.zeros(1, 4, 8)
    conditioning = [[embeddings, {"guidance": 3.5, "reference_latents": ["a"]}]]
    changed = node_helpers.conditioning_set_values(conditioning, {"guidance": 4.0, "reference_latents": ["b"]},
                                                   append=False)
    appended = node_helpers.conditioning_set_values(conditioning, {"reference_latents": ["b"]}, append=True)
    assert changed[0][1] == {"guidance": 4.0, "reference_latents": ["b"]}
    assert appended[0][1]["reference_latents"] == ["a", "b"] and appended[0][0] is embeddings
    assert conditioning[0][1] == {"guidance": 3.5, "reference_latents": ["a"]}  # the input is untouched
    rgb, rgba = torch.rand(1, 2, 2, 3), torch.rand(1, 2, 2, 4)
    destination, source = node_helpers.image_alpha_fix(rgb, rgba)
    assert destination is rgb and torch.equal(source, rgba[..., :3])
    destination, source = node_helpers.image_alpha_fix(rgba, rgb)
    assert destination is rgba and torch.equal(source[..., :3], rgb) and torch.equal(source[..., 3], torch.ones(1, 2, 2))


def test_a_real_comfyui_is_left_alone(tmp_path, stand_ins, monkeypatch):
    """Inside ComfyUI (a `comfy` package importable), packs get ComfyUI's own modules, not ours."""
    (tmp_path / "comfy").mkdir()
    (tmp_path / "comfy" / "__init__.py").write_text("")
    for name in ["comfy", *comfy_api.STAND_INS]:
        sys.modules.pop(name, None)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert comfy_api.comfyui_present() and comfy_api.install() is False
    assert "server" not in sys.modules


def test_flux2_run_loads_packs_from_custom_nodes_dir(tmp_path):
    packs = write_packs(tmp_path / "packs")
    inputs = tmp_path / "input"
    inputs.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(inputs / "in.png")
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
              "2": {"class_type": "TestPackInvert", "inputs": {"image": ["1", 0]}},
              "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inverted"}},
              "4": {"class_type": "TestPackCompare", "inputs": {"image_a": ["1", 0], "image_b": ["2", 0]}}}
    workflow = tmp_path / "prompt.json"
    workflow.write_text(json.dumps(prompt))
    result = subprocess.run(
        [sys.executable, "-m", "flux2_host.cli", "run", str(workflow), "--json", "--cpu",
         "--custom-nodes-dir", str(packs), "--models-dir", str(tmp_path / "models"), "--input-dir", str(inputs),
         "--output-dir", str(tmp_path / "output")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    saved = report["outputs"]["3"]["images"]
    assert len(saved) == 1
    # What ComfyUI's SaveImage writes for the inverted IMAGE: 255 * (1 - k/255) truncated, often 254 - k.
    inverted = np.clip(255. * (1.0 - pixels.astype(np.float32) / 255.0), 0, 255).astype(np.uint8)
    assert np.array_equal(np.array(Image.open(tmp_path / "output" / saved[0]["filename"])), inverted)
    compared = report["outputs"]["4"]
    assert [entry["type"] for entry in compared["a_images"] + compared["b_images"]] == ["temp", "temp"]
    b_file = tmp_path / "temp" / compared["b_images"][0]["filename"]
    assert np.array_equal(np.array(Image.open(b_file)), inverted)
    for line in [DEPENDENCY_ERROR, *INTERNALS_ERRORS.values()]:
        assert any(logged.endswith(line) for logged in result.stderr.splitlines()), line


def test_flux2_serve_serves_a_packs_routes_scripts_and_messages(tmp_path):
    from server_harness import FluxServer

    write_packs(tmp_path / "custom_nodes")  # next to the server's models/ folder: found without a flag
    server = FluxServer(tmp_path).start()
    try:
        for prefix in ("", "/api"):
            reply = server.get(f"{prefix}/hello_pack/ping", who="canvas")
            assert reply.status == 200 and reply.json() == {"pong": "canvas"}
        listed = server.get("/api/extensions").json()
        assert {"/extensions/hello_server/js/hello.js", "/extensions/hello_server/js/panels/panel.js"} <= set(listed)
        assert any(url.startswith("/extensions/core/") for url in listed)  # the frontend's own stay listed
        script = server.get("/extensions/hello_server/js/hello.js")
        assert script.status == 200 and script.body == PACKS["hello_server/web/js/hello.js"].encode()
        assert server.get("/extensions/hello_server/../../shout.py").status == 404

        info = server.get("/api/object_info").json()
        assert info["TestPackInvert"]["python_module"] == "custom_nodes.pixel_tools"
        assert info["TestPackShout"]["display_name"] == "TestPackShout"
        run = server.run_prompt({"1": {"class_type": "TestPackAnnounce", "inputs": {"text": "from a pack"}}})
        assert run.events("hello_pack.announce") == [{"text": "from a pack"}]
        assert run.events("executed")[0]["output"] == {"text": ["from a pack"]}
        log = server.log()
        for line in [DEPENDENCY_ERROR, *INTERNALS_ERRORS.values()]:
            assert any(logged.endswith(line) for logged in log.splitlines()), line
        assert server.get("/api/prompt").status == 200  # still serving
    finally:
        server.stop()


# Packs in the shapes of real utility packs (rgthree, KJNodes, LanPaint, TextEncodeEditAdvanced): they import
# ComfyUI's executor module, sampler lists, comfy_extras node classes and comfy.utils helpers at module level.
UTILITY_PACKS = {
    "utility_pack/__init__.py": """
        import execution  # imported, never used at import time (as rgthree does)
        import comfy.samplers
        from comfy.comfy_types import IO, ComfyNodeABC, InputTypeDict
        from comfy.comfy_types.node_typing import CheckLazyMixin
        from comfy.utils import repeat_to_batch_size, save_torch_file
        from comfy_extras.nodes_clip_sdxl import CLIPTextEncodeSDXL
        from comfy_extras.nodes_latent import LatentBatch
        from comfy_extras.nodes_mask import GrowMask
        from nodes import node_helpers


        class SamplerSettings:
            FUNCTION = "settings"
            RETURN_TYPES = (comfy.samplers.KSampler.SAMPLERS, comfy.samplers.KSampler.SCHEDULERS)

            @classmethod
            def INPUT_TYPES(cls):
                return {"required": {"sampler_name": (comfy.samplers.KSampler.SAMPLERS,),
                                     "scheduler": (comfy.samplers.KSampler.SCHEDULERS,)}}

            def settings(self, sampler_name, scheduler):
                return (sampler_name, scheduler)


        class GrowTwice:
            FUNCTION = "grow"
            RETURN_TYPES = ("MASK",)

            @classmethod
            def INPUT_TYPES(cls):
                return {"required": {"mask": ("MASK",), "batch_size": ("INT", {"default": 1})}}

            def grow(self, mask, batch_size):
                once = GrowMask().expand_mask(mask, 1, True)[0]
                return (repeat_to_batch_size(GrowMask().expand_mask(once, 1, True)[0], batch_size),)


        class SaveMask:
            FUNCTION = "save"
            RETURN_TYPES = ()
            OUTPUT_NODE = True

            @classmethod
            def INPUT_TYPES(cls):
                return {"required": {"mask": ("MASK",), "path": ("STRING",)}}

            def save(self, mask, path):
                save_torch_file({"mask": mask.contiguous()}, path, metadata={"made_by": "utility_pack"})
                return {}


        class SdxlOrPlain:
            '''Tries ComfyUI's SDXL encoder first and falls back, as rgthree's SDXL power prompt does.'''
            FUNCTION = "encode"
            RETURN_TYPES = ("STRING",)

            @classmethod
            def INPUT_TYPES(cls):
                return {"required": {}}

            def encode(self):
                try:
                    CLIPTextEncodeSDXL()
                except Exception as exc:
                    return (f"fell back: {exc}",)
                return ("sdxl",)


        class FirstPresent(ComfyNodeABC, CheckLazyMixin):
            FUNCTION = "pick"
            RETURN_TYPES = (IO.ANY,)

            @classmethod
            def INPUT_TYPES(cls) -> InputTypeDict:
                return {"required": {"first": (IO.ANY, {"lazy": True}), "second": (IO.ANY, {"lazy": True})}}

            def check_lazy_status(self, first=None, second=None):
                return ["first"] if first is None else []

            def pick(self, first=None, second=None):
                return (first,)


        def add_reference(conditioning, latent):
            return node_helpers.conditioning_set_values(conditioning, {"reference_latents": [latent]}, append=True)


        NODE_CLASS_MAPPINGS = {"TestSamplerSettings": SamplerSettings, "TestGrowTwice": GrowTwice,
                               "TestSaveMask": SaveMask, "TestSdxlOrPlain": SdxlOrPlain,
                               "TestFirstPresent": FirstPresent}
    """,
    # Packs that use ComfyUI's executor or samplers at import time, or import a comfy_extras name the host
    # lacks: each must fail in one line naming what it asked for.
    "patches_the_executor.py": """
        import execution

        original = execution.PromptExecutor.execute
        NODE_CLASS_MAPPINGS = {}
    """,
    "builds_a_guider.py": """
        import comfy.samplers

        class Guider(comfy.samplers.CFGGuider):
            pass

        NODE_CLASS_MAPPINGS = {}
    """,
    "custom_noise.py": """
        from comfy_extras.nodes_custom_sampler import Noise_RandomNoise

        NODE_CLASS_MAPPINGS = {}
    """,
    "video_nodes.py": """
        from comfy_extras.nodes_wan import WanImageToVideo

        NODE_CLASS_MAPPINGS = {}
    """,
}

UTILITY_PACK_ERRORS = {
    name: f"node pack {name!r} not loaded: it needs ComfyUI's internals ({internal}), which the flux2 host does "
          "not provide; run it in ComfyUI, with the FLUX.2 pack (custom_nodes_flux2) installed there"
    for name, internal in {"builds_a_guider": "comfy.samplers.CFGGuider",
                           "custom_noise": "comfy_extras.nodes_custom_sampler.Noise_RandomNoise",
                           "patches_the_executor": "execution.PromptExecutor",
                           "video_nodes": "comfy_extras.nodes_wan"}.items()
}


def test_utility_packs_use_the_samplers_extras_and_utils_stand_ins(tmp_path, stand_ins, caplog):
    root = tmp_path / "custom_nodes"
    for relative, source in UTILITY_PACKS.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(textwrap.dedent(source))
    registry = NodeRegistry.default()
    with caplog.at_level(logging.INFO, logger="flux2.custom_nodes"):
        results = {result.name: result for result in load_custom_packs(registry, [str(root)])}
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == [UTILITY_PACK_ERRORS[name] for name in sorted(UTILITY_PACK_ERRORS)]
    assert results["utility_pack"].nodes == ["TestSamplerSettings", "TestGrowTwice", "TestSaveMask",
                                             "TestSdxlOrPlain", "TestFirstPresent"]

    # The sampler lists are the host KSampler's, so a pack's widget values validate there.
    info = registry.object_info()
    for widget in ("sampler_name", "scheduler"):
        assert info["TestSamplerSettings"]["input"]["required"][widget][0] == \
            info["KSampler"]["input"]["required"][widget][0]
    import comfy.samplers

    assert comfy.samplers.SAMPLER_NAMES[:3] == ["euler", "euler_cfg_pp", "euler_ancestral"]
    assert comfy.samplers.KSAMPLER_NAMES == comfy.samplers.SAMPLER_NAMES[:-3]  # less ddim, uni_pc, uni_pc_bh2
    assert {"simple", "karras", "beta"} <= set(comfy.samplers.SCHEDULER_NAMES)
    with pytest.raises(comfy_api.ComfyInternalsMissing, match=r"comfy\.samplers\.KSampler\(\)"):
        comfy.samplers.KSampler("a model", 20)

    # comfy_extras names are the host's core node classes; one dot grown twice along a cross is a diamond of
    # radius 2 (|dy| + |dx| <= 2), then repeated to the asked batch size.
    from comfy_extras.nodes_mask import GrowMask

    assert GrowMask is registry.classes["GrowMask"]
    mask = torch.zeros(1, 7, 7)
    mask[0, 3, 3] = 1.0
    grown = registry.classes["TestGrowTwice"]().grow(mask, 3)[0]
    rows, columns = torch.meshgrid(torch.arange(7), torch.arange(7), indexing="ij")
    diamond = ((rows - 3).abs() + (columns - 3).abs() <= 2).float()
    assert grown.shape == (3, 7, 7) and all(torch.equal(frame, diamond) for frame in grown)

    path = tmp_path / "mask.safetensors"
    registry.classes["TestSaveMask"]().save(grown, str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as saved:
        assert torch.equal(saved.get_tensor("mask"), grown) and saved.metadata() == {"made_by": "utility_pack"}

    # Through the executor: IO.ANY sockets link to a MASK, and the lazy input nobody asks for never runs.
    from flux2_host.executor import PromptExecutor, validate_prompt

    path = tmp_path / "picked.safetensors"
    prompt = {"1": {"class_type": "SolidMask", "inputs": {"value": 0.25, "width": 8, "height": 4}},
              "2": {"class_type": "TestSdxlOrPlain", "inputs": {}},
              "3": {"class_type": "TestFirstPresent", "inputs": {"first": ["1", 0], "second": ["2", 0]}},
              "4": {"class_type": "TestSaveMask", "inputs": {"mask": ["3", 0], "path": str(path)}}}
    validation = validate_prompt(prompt, registry)
    assert validation.ok, validation.node_errors
    silent = type("Silent", (), {"send": lambda self, event, data: None,
                                 "send_preview": lambda self, node_id, prompt_id, image: None})()
    result = PromptExecutor(registry).execute(prompt, "lazy", {}, validation.outputs, silent)
    assert result.status == "success", result.error
    assert "2" not in result.executed
    with safe_open(str(path), framework="pt") as saved:
        assert torch.equal(saved.get_tensor("mask"), torch.full((1, 4, 8), 0.25))

    fallback = registry.classes["TestSdxlOrPlain"]().encode()[0]
    assert fallback.startswith("fell back: comfy_extras.nodes_clip_sdxl.CLIPTextEncodeSDXL is part of ComfyUI's")
    from comfy_extras.nodes_latent import LatentBatch

    with pytest.raises(comfy_api.ComfyInternalsMissing, match="comfy_extras.nodes_latent.LatentBatch"):
        LatentBatch.INPUT_TYPES()


def test_comfy_types(stand_ins):
    comfy_api.install()
    from comfy.comfy_types import IO, CheckLazyMixin
    from comfy.comfy_types.node_typing import IO as node_typing_IO

    assert node_typing_IO is IO and IO.IMAGE == "IMAGE" and str(IO.ANY) == "*"
    assert json.dumps({"input": (IO.MASK, {})}) == '{"input": ["MASK", {}]}'  # object_info serialises the names
    # ComfyUI's link rule in `!=`: "*" matches all; comma lists match when one contains the other.
    assert not IO.ANY != "LATENT" and not IO.IMAGE != "*" and not IO.NUMBER != "INT" and not IO.INT != "FLOAT,INT"
    assert IO.IMAGE != "MASK" and IO.NUMBER != "STRING" and IO.IMAGE != 3
    assert {IO.IMAGE: 1}["IMAGE"] == 1
    assert CheckLazyMixin().check_lazy_status(a=None, b=1, c=None) == ["a", "c"]


def test_state_dict_prefix_replace(stand_ins):
    comfy_api.install()
    from comfy.utils import state_dict_prefix_replace

    tensors = {"model.diffusion_model.a": 1, "model.diffusion_model.b": 2, "vae.c": 3}
    renamed = state_dict_prefix_replace(tensors, {"model.diffusion_model.": ""})
    assert renamed is tensors and renamed == {"vae.c": 3, "a": 1, "b": 2}
    tensors = {"lora_unet_x": 1, "lora_te_y": 2}
    only = state_dict_prefix_replace(tensors, {"lora_unet_": "diffusion_model."}, filter_keys=True)
    assert only == {"diffusion_model.x": 1} and tensors == {"lora_te_y": 2}


def test_repeat_to_batch_size(stand_ins):
    comfy_api.install()
    from comfy.utils import repeat_to_batch_size

    frames = torch.arange(3.0).reshape(3, 1)
    assert repeat_to_batch_size(frames, 2).flatten().tolist() == [0.0, 1.0]
    assert repeat_to_batch_size(frames, 7).flatten().tolist() == [0.0, 1.0, 2.0, 0.0, 1.0, 2.0, 0.0]
    assert repeat_to_batch_size(frames, 3) is frames
    columns = torch.arange(2.0).reshape(1, 2)
    assert repeat_to_batch_size(columns, 5, dim=1).tolist() == [[0.0, 1.0, 0.0, 1.0, 0.0]]


def test_custom_nodes_folders_from_the_environment(tmp_path, monkeypatch):
    from flux2_host import folders

    first, second = tmp_path / "packs_a", tmp_path / "packs_b"
    monkeypatch.setenv(folders.CUSTOM_NODES_ENV, os.pathsep.join([str(first), str(second)]))
    common = dict(models=str(tmp_path / "models"), input_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "out"))
    folders.configure(**common)
    assert folders.get_folder_paths("custom_nodes") == [str(first), str(second)]
    folders.configure(**common, custom_nodes=[str(tmp_path / "flag")])  # --custom-nodes-dir wins
    assert folders.get_folder_paths("custom_nodes") == [str(tmp_path / "flag")]
    monkeypatch.delenv(folders.CUSTOM_NODES_ENV)
    folders.configure(**common)
    assert folders.get_folder_paths("custom_nodes") == [str(tmp_path / "custom_nodes")]
