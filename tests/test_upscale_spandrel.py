"""UpscaleModelLoader + ImageUpscaleWithModel with the real spandrel library, in .venv-upscale (spandrel needs
torchvision, which no wheel here provides for the CPU torch of .venv; scripts/upscale_venv.sh builds that venv on
first use). Tiny random models with the tensor names of the real releases are written at test time; the reference
is spandrel's own loader and model called on the whole image, in the same interpreter (tests/upscale_spandrel_probe.py)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from flux2_host.core_nodes.upscale import OVERLAP, TILE

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv-upscale" / "bin" / "python"
PROBE = Path(__file__).resolve().parent / "upscale_spandrel_probe.py"
# spandrel's RRDBNet fixes the dense blocks' growth channels at 32, as ESRGAN does.
GROWTH = 32
# Model files: (architecture spandrel must detect, its scale). The .pth is a pickle wrapped in {"params_ema": ...},
# the form of Real-ESRGAN's releases; the x2plus layout packs 2x2 pixels into 12 input channels (pixel unshuffle).
MODELS = {"RealESRGAN_x4plus_tiny.safetensors": ("ESRGAN", 4),
          "RealESRGAN_x2plus_tiny.pth": ("ESRGAN", 2),
          "realesr-general-x2v3_tiny.safetensors": ("Compact", 2)}
# "small" is under one tile and not a multiple of 4 (the x2plus model needs multiples of 4: spandrel pads); "wide"
# spans two tiles, the second starting at TILE - OVERLAP; "png" is what the workflow's LoadImage reads.
IMAGE_SIZES = {"small": (21, 30), "wide": (24, TILE + 8), "png": (20, 28)}


def _conv(name: str, out_channels: int, in_channels: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A 3x3 conv's weight and bias, variance-preserving so that the tiny nets' outputs vary over (0, 1)."""
    std = (in_channels * 9) ** -0.5
    return {f"{name}.weight": torch.randn(out_channels, in_channels, 3, 3, generator=generator) * std,
            f"{name}.bias": torch.randn(out_channels, generator=generator) * 0.05}


def rrdbnet_state_dict(unshuffle: int, features: int, blocks: int, seed: int) -> dict[str, torch.Tensor]:
    """Real-ESRGAN's RRDBNet (BasicSR names): a 4x net, fed 2x2-unshuffled pixels for the x2 release."""
    generator = torch.Generator().manual_seed(seed)
    state = _conv("conv_first", features, 3 * unshuffle * unshuffle, generator)
    for block in range(blocks):
        for rdb in (1, 2, 3):
            for index in range(1, 6):
                out_channels = GROWTH if index < 5 else features
                state |= _conv(f"body.{block}.rdb{rdb}.conv{index}", out_channels, features + (index - 1) * GROWTH,
                               generator)
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        state |= _conv(name, features, features, generator)
    state |= _conv("conv_last", 3, features, generator)
    # Mid-grey plus detail: few pixels clamp to [0, 1], so the parity checks see the model's values.
    state["conv_last.weight"] *= 0.5
    state["conv_last.bias"] += 0.5
    return state


def compact_state_dict(scale: int, features: int, convs: int, seed: int) -> dict[str, torch.Tensor]:
    """SRVGGNetCompact (realesr-general-x4v3 & co.): conv + PReLU pairs in `body`, then a conv to 3 * scale^2
    channels that a pixel shuffle turns into the residual over the nearest-upscaled input."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    in_channels = 3
    for index in range(convs + 1):
        state |= _conv(f"body.{2 * index}", features, in_channels, generator)
        state[f"body.{2 * index + 1}.weight"] = torch.full((features,), 0.25)  # PReLU slopes, PyTorch's default
        in_channels = features
    state |= _conv(f"body.{2 * convs + 2}", 3 * scale * scale, features, generator)
    for name in ("weight", "bias"):
        state[f"body.{2 * convs + 2}.{name}"] *= 0.1  # a small residual, as a trained model adds
    return state


@pytest.fixture(scope="module")
def upscale_python() -> Path:
    """.venv-upscale's python, built by scripts/upscale_venv.sh if missing (a no-op when it is up to date)."""
    result = subprocess.run(["bash", str(ROOT / "scripts" / "upscale_venv.sh")], capture_output=True, text=True,
                            timeout=1800)
    if result.returncode != 0:
        pytest.fail("scripts/upscale_venv.sh could not build .venv-upscale (torch==2.14.1, torchvision==0.29.1, "
                    "spandrel): expected those wheels on local disk or a reachable index, found exit status "
                    f"{result.returncode}:\n{result.stderr[-3000:]}")
    return VENV_PYTHON


def run_python(python: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH: this checkout's packages, whichever checkout the venv's editable install points at.
    result = subprocess.run([str(python), *args], capture_output=True, text=True, timeout=600, cwd=cwd,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, f"{args}: exit status {result.returncode}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def probe(upscale_python: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("upscale")
    folder = root / "models" / "upscale_models"
    folder.mkdir(parents=True)
    save_file(rrdbnet_state_dict(unshuffle=1, features=8, blocks=1, seed=1),
              str(folder / "RealESRGAN_x4plus_tiny.safetensors"))
    torch.save({"params_ema": rrdbnet_state_dict(unshuffle=2, features=8, blocks=1, seed=2)},
               folder / "RealESRGAN_x2plus_tiny.pth")
    save_file(compact_state_dict(scale=2, features=8, convs=2, seed=3),
              str(folder / "realesr-general-x2v3_tiny.safetensors"))
    generator = torch.Generator().manual_seed(0)
    images = {key: torch.rand(1, height, width, 3, generator=generator) for key, (height, width) in IMAGE_SIZES.items()}
    pixels = (images["png"][0] * 255).round().to(torch.uint8).numpy()
    images["png"] = torch.from_numpy(pixels.astype(np.float32) / 255).unsqueeze(0)  # what LoadImage will read
    (root / "input").mkdir()
    Image.fromarray(pixels).save(root / "input" / "in.png")
    save_file(images, str(root / "images.safetensors"))
    out = root / "probe.safetensors"
    run_python(upscale_python, [str(PROBE), str(root / "models"), str(root / "images.safetensors"), str(out)], root)
    with safe_open(str(out), "pt") as results:
        outputs = {key: results.get_tensor(key) for key in results.keys()}
        info = json.loads(results.metadata()["info"])
    return {"root": root, "images": images, "outputs": outputs, "info": info}


@pytest.mark.parametrize("model_name", list(MODELS))
def test_nodes_match_spandrel_on_the_whole_image(probe: dict, model_name: str) -> None:
    architecture, scale = MODELS[model_name]
    info = probe["info"][model_name]
    assert (info["architecture"], info["scale"]) == (architecture, scale)
    assert (info["our_architecture"], info["our_scale"]) == (architecture, scale)
    for key in ("small", "wide", "png"):
        height, width = IMAGE_SIZES[key]
        node, reference = probe["outputs"][f"{model_name}/{key}/node"], probe["outputs"][f"{model_name}/{key}/reference"]
        assert node.shape == reference.shape == (1, height * scale, width * scale, 3), key
        inside = ((reference > 0) & (reference < 1)).float().mean().item()
        assert inside > 0.9, f"{key}: only {inside:.0%} of the reference is unclamped; the comparison would be weak"
        if key != "wide":  # under one tile: the node runs the model once on the whole image
            torch.testing.assert_close(node, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_name", list(MODELS))
def test_tiles_blend_to_the_untiled_result(probe: dict, model_name: str) -> None:
    """Two tiles: columns [0, TILE) and [TILE - OVERLAP, width). Outside their overlap one tile counts, and its cut
    edge (where zero padding changes the convolutions) is OVERLAP pixels away, more than these nets' receptive
    radius: equal to the untiled result. In the overlap both tiles' edge pixels enter with linear ramp weights:
    close, not equal (ComfyUI's tiled_scale blends the same way)."""
    scale = MODELS[model_name][1]
    node = probe["outputs"][f"{model_name}/wide/node"]
    reference = probe["outputs"][f"{model_name}/wide/reference"]
    seam = slice((TILE - OVERLAP) * scale, TILE * scale)
    outside = torch.ones(node.shape[2], dtype=torch.bool)
    outside[seam] = False
    torch.testing.assert_close(node[:, :, outside], reference[:, :, outside], rtol=0, atol=1e-5)
    seam_error = (node[:, :, seam] - reference[:, :, seam]).abs()
    assert seam_error.max().item() < 0.1 and seam_error.mean().item() < 0.01, (
        f"seam: max error {seam_error.max().item():.4f}, mean {seam_error.mean().item():.2e}")


def test_flux2_run_workflow_upscales_with_a_pth_model(upscale_python: Path, probe: dict) -> None:
    """LoadImage -> UpscaleModelLoader (the pickled x2plus model) -> ImageUpscaleWithModel -> SaveImage over
    `flux2 run`; the PNG equals spandrel's whole-image output up to 8-bit quantization."""
    root = probe["root"]
    model_name = "RealESRGAN_x2plus_tiny.pth"
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
              "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": model_name}},
              "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
              "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "upscaled"}}}
    (root / "upscale.json").write_text(json.dumps(prompt))
    result = run_python(upscale_python, ["-m", "flux2_host.cli", "run", "upscale.json", "--json", "--cpu",
                                         "--models-dir", str(root / "models"), "--input-dir", str(root / "input"),
                                         "--output-dir", str(root / "output")], root)
    saved = json.loads(result.stdout)["outputs"]["4"]["images"]
    assert len(saved) == 1
    png = np.asarray(Image.open(root / "output" / saved[0]["filename"]), dtype=np.int16)
    reference = probe["outputs"][f"{model_name}/png/reference"][0].numpy() * 255
    height, width = IMAGE_SIZES["png"]
    assert png.shape == (height * 2, width * 2, 3)
    assert np.abs(png - reference).max() <= 1.0
