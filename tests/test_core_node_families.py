"""The ComfyUI core nodes shared FLUX.2 workflows use, family by family: ComfyUI's names, inputs in widget order,
defaults and outputs, and outputs against values derived here from ComfyUI's formulas; the samplers against the
engine on the tiny demo models, inpainting included."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from flux2_core.checkpoints.loaders import load_vae
from flux2_core.comfy_layouts import decode_latent, encode_image
from flux2_core.patched_model import PatchedModel
from flux2_core.schedulers import MODEL_SAMPLING_SHIFT, FlowModelSampling, scheduler_sigmas
from flux2_host import core_nodes, folders

CORE = core_nodes.NODE_CLASS_MAPPINGS
KLEIN, QWEN, VAE = "flux-2-klein-4b.safetensors", "qwen_3_4b.safetensors", "flux2-vae.safetensors"

# (required inputs in widget order, optional inputs, RETURN_TYPES) as ComfyUI declares them.
DECLARATIONS = {
    "KSampler": (["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative",
                  "latent_image", "denoise"], [], ("LATENT",)),
    "KSamplerAdvanced": (["model", "add_noise", "noise_seed", "steps", "cfg", "sampler_name", "scheduler", "positive",
                          "negative", "latent_image", "start_at_step", "end_at_step", "return_with_leftover_noise"],
                         [], ("LATENT",)),
    "SamplerCustom": (["model", "add_noise", "noise_seed", "cfg", "positive", "negative", "sampler", "sigmas",
                       "latent_image"], [], ("LATENT", "LATENT")),
    "BasicScheduler": (["model", "scheduler", "steps", "denoise"], [], ("SIGMAS",)),
    "SplitSigmas": (["sigmas", "step"], [], ("SIGMAS", "SIGMAS")),
    "SplitSigmasDenoise": (["sigmas", "denoise"], [], ("SIGMAS", "SIGMAS")),
    "BetaSamplingScheduler": (["model", "steps", "alpha", "beta"], [], ("SIGMAS",)),
    "DisableNoise": ([], [], ("NOISE",)),
    "DifferentialDiffusion": (["model"], ["strength"], ("MODEL",)),
    "EmptySD3LatentImage": (["width", "height", "batch_size"], [], ("LATENT",)),
    "StringReplace": (["string", "find", "replace"], [], ("STRING",)),
    "ImageScaleToMaxDimension": (["image", "upscale_method", "largest_size"], [], ("IMAGE",)),
    "EmptyImage": (["width", "height", "batch_size", "color"], [], ("IMAGE",)),
    "ModelSamplingFlux": (["model", "max_shift", "base_shift", "width", "height"], [], ("MODEL",)),
    "EmptyLatentImage": (["width", "height", "batch_size"], [], ("LATENT",)),
    "LatentUpscale": (["samples", "upscale_method", "width", "height", "crop"], [], ("LATENT",)),
    "LatentUpscaleBy": (["samples", "upscale_method", "scale_by"], [], ("LATENT",)),
    "LoraLoader": (["model", "clip", "lora_name", "strength_model", "strength_clip"], [], ("MODEL", "CLIP")),
    "SetLatentNoiseMask": (["samples", "mask"], [], ("LATENT",)),
    "InpaintModelConditioning": (["positive", "negative", "vae", "pixels", "mask", "noise_mask"], [],
                                 ("CONDITIONING", "CONDITIONING", "LATENT")),
    "VAEEncodeForInpaint": (["pixels", "vae", "mask", "grow_mask_by"], [], ("LATENT",)),
    "ImagePadForOutpaint": (["image", "left", "top", "right", "bottom", "feathering"], [], ("IMAGE", "MASK")),
    "LoadImageMask": (["image", "channel"], [], ("MASK",)),
    "ImageToMask": (["image", "channel"], [], ("MASK",)),
    "MaskToImage": (["mask"], [], ("IMAGE",)),
    "InvertMask": (["mask"], [], ("MASK",)),
    "SolidMask": (["value", "width", "height"], [], ("MASK",)),
    "GrowMask": (["mask", "expand", "tapered_corners"], [], ("MASK",)),
    "FeatherMask": (["mask", "left", "top", "right", "bottom"], [], ("MASK",)),
    "ThresholdMask": (["mask", "value"], [], ("MASK",)),
    "CropMask": (["mask", "x", "y", "width", "height"], [], ("MASK",)),
    "MaskComposite": (["destination", "source", "x", "y", "operation"], [], ("MASK",)),
    "MaskPreview": (["mask"], [], ()),
    "ImageScale": (["image", "upscale_method", "width", "height", "crop"], [], ("IMAGE",)),
    "ImageScaleBy": (["image", "upscale_method", "scale_by"], [], ("IMAGE",)),
    "ImageCrop": (["image", "width", "height", "x", "y"], [], ("IMAGE",)),
    "ImageBatch": (["image1", "image2"], [], ("IMAGE",)),
    "ImageStitch": (["image1", "direction", "match_image_size", "spacing_width", "spacing_color"], ["image2"],
                    ("IMAGE",)),
    "ImageBlur": (["image", "blur_radius", "sigma"], [], ("IMAGE",)),
    "ImageBlend": (["image1", "image2", "blend_factor", "blend_mode"], [], ("IMAGE",)),
    "KarrasScheduler": (["steps", "sigma_max", "sigma_min", "rho"], [], ("SIGMAS",)),
    "ImageSharpen": (["image", "sharpen_radius", "sigma", "alpha"], [], ("IMAGE",)),
    "ImageInvert": (["image"], [], ("IMAGE",)),
    "ImageCompositeMasked": (["destination", "source", "x", "y", "resize_source"], ["mask"], ("IMAGE",)),
    "RegexReplace": (["string", "regex_pattern", "replace"], ["case_insensitive", "multiline", "dotall", "count"],
                     ("STRING",)),
    "JsonExtractString": (["json_string", "key"], [], ("STRING",)),
    "StringConcatenate": (["string_a", "string_b", "delimiter"], [], ("STRING",)),
    "PreviewAny": (["source"], [], ()),
    "ConditioningCombine": (["conditioning_1", "conditioning_2"], [], ("CONDITIONING",)),
    "ConditioningAverage": (["conditioning_to", "conditioning_from", "conditioning_to_strength"], [],
                            ("CONDITIONING",)),
    "LatentCompositeMasked": (["destination", "source", "x", "y", "resize_source"], ["mask"], ("LATENT",)),
    "ConditioningSetTimestepRange": (["conditioning", "start", "end"], [], ("CONDITIONING",)),
    "UpscaleModelLoader": (["model_name"], [], ("UPSCALE_MODEL",)),
    "ImageUpscaleWithModel": (["upscale_model", "image"], [], ("IMAGE",)),
}

# (node, input): (default, min, max, step) from ComfyUI's declarations.
DEFAULTS = {
    ("KSampler", "steps"): (20, 1, 10000, None), ("KSampler", "cfg"): (8.0, 0.0, 100.0, 0.1),
    ("KSampler", "denoise"): (1.0, 0.0, 1.0, 0.01), ("KSamplerAdvanced", "end_at_step"): (10000, 0, 10000, None),
    ("ModelSamplingFlux", "max_shift"): (1.15, 0.0, 100.0, 0.01),
    ("ModelSamplingFlux", "base_shift"): (0.5, 0.0, 100.0, 0.01),
    ("ModelSamplingFlux", "width"): (1024, 16, 16384, 8), ("LatentUpscaleBy", "scale_by"): (1.5, 0.01, 8.0, 0.01),
    ("ImageScaleBy", "scale_by"): (1.0, 0.01, 8.0, 0.01), ("ImageScale", "width"): (512, 0, 16384, 1),
    ("VAEEncodeForInpaint", "grow_mask_by"): (6, 0, 64, 1), ("ImagePadForOutpaint", "left"): (0, 0, 16384, 8),
    ("ImagePadForOutpaint", "feathering"): (40, 0, 16384, 1), ("GrowMask", "expand"): (0, -16384, 16384, 1),
    ("ImageBlur", "blur_radius"): (1, 1, 31, 1), ("ImageSharpen", "alpha"): (1.0, 0.0, 5.0, 0.01),
    ("LoraLoader", "strength_clip"): (1.0, -100.0, 100.0, 0.01), ("RegexReplace", "count"): (0, 0, 100, None),
    ("ConditioningSetTimestepRange", "end"): (1.0, 0.0, 1.0, 0.001), ("SolidMask", "width"): (512, 1, 16384, 1),
}


@pytest.mark.parametrize("node_id", sorted(DECLARATIONS))
def test_declared_like_comfyui(node_id: str) -> None:
    required, optional, returns = DECLARATIONS[node_id]
    inputs = CORE[node_id].INPUT_TYPES()
    assert list(inputs["required"]) == required
    assert list(inputs.get("optional", {})) == optional
    assert tuple(CORE[node_id].RETURN_TYPES) == returns


@pytest.mark.parametrize("key", sorted(DEFAULTS))
def test_widget_defaults_and_ranges_like_comfyui(key: tuple[str, str]) -> None:
    node_id, name = key
    inputs = CORE[node_id].INPUT_TYPES()
    options = {**inputs["required"], **inputs.get("optional", {})}[name][1]
    default, minimum, maximum, step = DEFAULTS[key]
    assert (options["default"], options["min"], options["max"]) == (default, minimum, maximum)
    assert options.get("step") == step


def test_sampler_and_scheduler_combos_are_comfyuis() -> None:
    combos = CORE["KSampler"].INPUT_TYPES()["required"]
    assert combos["scheduler"][0] == ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta",
                                      "normal", "linear_quadratic", "kl_optimal"]
    assert combos["sampler_name"][0][:4] == ["euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp"]
    assert combos["sampler_name"][0][-3:] == ["ddim", "uni_pc", "uni_pc_bh2"]
    assert len(combos["sampler_name"][0]) == 42


# --- masks ----------------------------------------------------------------------------------------------------

def test_mask_conversions_invert_solid_threshold_and_crop() -> None:
    image = torch.rand(2, 5, 7, 3)
    mask = CORE["ImageToMask"]().image_to_mask(image, "green")[0]
    assert torch.equal(mask, image[..., 1])
    assert torch.equal(CORE["MaskToImage"]().mask_to_image(mask)[0], mask.unsqueeze(-1).expand(-1, -1, -1, 3))
    assert torch.equal(CORE["InvertMask"]().invert(mask)[0], 1 - mask)
    assert torch.equal(CORE["SolidMask"]().solid(0.25, 4, 3)[0], torch.full((1, 3, 4), 0.25))
    assert torch.equal(CORE["ThresholdMask"]().image_to_mask(mask, 0.5)[0], (mask > 0.5).float())
    assert torch.equal(CORE["CropMask"]().crop(mask, 2, 1, 3, 10)[0], mask[:, 1:, 2:5])


def test_grow_mask_dilates_with_a_cross_or_a_square_and_shrinks() -> None:
    mask = torch.zeros(1, 7, 7)
    mask[0, 3, 3] = 1.0
    cross = CORE["GrowMask"]().expand_mask(mask, 1, True)[0][0]
    square = CORE["GrowMask"]().expand_mask(mask, 1, False)[0][0]
    assert cross.sum() == 5 and cross[2, 3] == cross[3, 2] == 1 and cross[2, 2] == 0
    assert square.sum() == 9 and square[2, 2] == 1
    # Two steps of the cross make a diamond of radius 2; shrinking it twice gives the dot back.
    diamond = CORE["GrowMask"]().expand_mask(mask, 2, True)[0]
    rows, cols = torch.meshgrid(torch.arange(7), torch.arange(7), indexing="ij")
    assert torch.equal(diamond[0], ((rows - 3).abs() + (cols - 3).abs() <= 2).float())
    assert torch.equal(CORE["GrowMask"]().expand_mask(diamond, -2, True)[0], mask)
    # At the border the mask never grows from outside the image.
    edge = torch.zeros(1, 3, 3)
    assert CORE["GrowMask"]().expand_mask(edge, 3, False)[0].sum() == 0


def test_feather_mask_ramps_linearly_from_the_edges() -> None:
    mask = torch.ones(1, 4, 6)
    out = CORE["FeatherMask"]().feather(mask, 3, 2, 0, 0)[0][0]
    assert out[3].tolist() == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1])
    assert out[:, 5].tolist() == pytest.approx([0.5, 1, 1, 1])
    # ComfyUI's right edge uses index -x, so its first factor (1 / right) lands on column 0.
    right = CORE["FeatherMask"]().feather(torch.ones(1, 1, 6), 0, 0, 2, 0)[0][0, 0]
    assert right.tolist() == pytest.approx([0.5, 1, 1, 1, 1, 1])


@pytest.mark.parametrize("operation, expected", [
    ("multiply", [0.6 * 0.8, 0.6 * 0.2]), ("add", [1.0, 0.8]), ("subtract", [0.0, 0.4]),
    ("and", [1.0, 0.0]), ("or", [1.0, 1.0]), ("xor", [0.0, 1.0])])
def test_mask_composite_operations(operation: str, expected: list[float]) -> None:
    destination = torch.full((1, 2, 4), 0.6)
    source = torch.tensor([[[0.8, 0.2]]])
    out = CORE["MaskComposite"]().combine(destination, source, 1, 1, operation)[0]
    assert out[0, 1, 1:3].tolist() == pytest.approx(expected)
    assert out[0, 0].tolist() == pytest.approx([0.6] * 4) and out[0, 1, 0] == out[0, 1, 3] == pytest.approx(0.6)


def test_load_image_mask_reads_a_channel_and_inverts_alpha(tmp_path: Path) -> None:
    folders.configure(models=str(tmp_path / "models"), input_dir=str(tmp_path), output_dir=str(tmp_path / "out"),
                      temp_dir=str(tmp_path / "temp"))
    rgba = np.zeros((4, 5, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 51
    Image.fromarray(rgba, "RGBA").save(tmp_path / "m.png")
    assert torch.equal(CORE["LoadImageMask"]().load_image("m.png", "red")[0], torch.ones(1, 4, 5))
    torch.testing.assert_close(CORE["LoadImageMask"]().load_image("m.png", "alpha")[0], torch.full((1, 4, 5), 0.8))


# --- images ---------------------------------------------------------------------------------------------------

def test_image_scale_keeps_the_aspect_for_a_zero_side_and_crops_to_the_center() -> None:
    image = torch.rand(1, 40, 60, 3)
    assert CORE["ImageScale"]().upscale(image, "bilinear", 30, 0, "disabled")[0].shape == (1, 20, 30, 3)
    # center crop of 60 x 40 to a square: 10 columns off each side, then a plain resize.
    cropped = CORE["ImageScale"]().upscale(image, "nearest-exact", 40, 40, "center")[0]
    assert torch.equal(cropped, image[:, :, 10:50])
    assert CORE["ImageScaleBy"]().upscale(image, "lanczos", 0.5)[0].shape == (1, 20, 30, 3)


def test_image_crop_batch_invert_and_composite() -> None:
    image = torch.rand(1, 8, 8, 3)
    assert torch.equal(CORE["ImageCrop"]().crop(image, 3, 2, 6, 7)[0], image[:, 7:9, 6:9])
    other = torch.rand(1, 4, 4, 3)
    batch = CORE["ImageBatch"]().batch(image, other)[0]
    assert batch.shape == (2, 8, 8, 3)
    assert torch.equal(CORE["ImageInvert"]().invert(image)[0], 1 - image)
    mask = torch.zeros(1, 4, 4)
    mask[:, :, 2:] = 1.0
    out = CORE["ImageCompositeMasked"]().composite(image, other, 2, 3, False, mask)[0]
    assert torch.equal(out[:, 3:7, 4:6], other[:, :, 2:])  # mask 1: source
    assert torch.equal(out[:, 3:7, 2:4], image[:, 3:7, 2:4])  # mask 0: destination
    assert torch.equal(out[:, :3], image[:, :3])


def test_blur_and_sharpen_use_comfyuis_kernel_over_reflected_edges() -> None:
    image = torch.rand(1, 6, 7, 3, dtype=torch.float64)
    radius, sigma = 1, 0.8
    axis = np.linspace(-1, 1, 3)
    kernel = np.exp(-(axis[:, None] ** 2 + axis[None, :] ** 2) / (2 * sigma * sigma))
    kernel /= kernel.sum()
    padded = np.pad(image[0].numpy(), ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    expected = sum(kernel[i, j] * padded[i:i + 6, j:j + 7] for i in range(3) for j in range(3))
    blurred = CORE["ImageBlur"]().blur(image, radius, sigma)[0][0].numpy()
    np.testing.assert_allclose(blurred, expected, atol=1e-6)
    sharp_kernel = -10 * 0.5 * kernel
    sharp_kernel[1, 1] += 1 - sharp_kernel.sum()
    expected = np.clip(sum(sharp_kernel[i, j] * padded[i:i + 6, j:j + 7] for i in range(3) for j in range(3)), 0, 1)
    sharpened = CORE["ImageSharpen"]().sharpen(image, radius, sigma, 0.5)[0][0].numpy()
    np.testing.assert_allclose(sharpened, expected, atol=1e-6)


def test_image_pad_for_outpaint_pads_grey_and_feathers_quadratically() -> None:
    image = torch.rand(1, 10, 12, 3)
    padded, mask = CORE["ImagePadForOutpaint"]().expand_image(image, 8, 0, 0, 16, 3)
    assert padded.shape == (1, 26, 20, 3) and mask.shape == (1, 26, 20)
    assert torch.equal(padded[:, :10, 8:], image) and (padded[:, 10:] == 0.5).all() and (padded[:, :, :8] == 0.5).all()
    assert (mask[0, 10:] == 1).all() and (mask[0, :, :8] == 1).all()
    for i in range(10):
        for j in range(12):
            distance = min(j, 10 - i)
            expected = ((3 - distance) / 3) ** 2 if distance < 3 else 0.0
            assert mask[0, i, 8 + j].item() == pytest.approx(expected)


# --- text -----------------------------------------------------------------------------------------------------

def test_text_nodes() -> None:
    fenced = '```json\n{"prompt": "a cat", "n": 3}\n```'
    stripped = CORE["RegexReplace"]().execute(fenced, r"^```json\s*", "", True, False, False, 0)[0]
    stripped = CORE["RegexReplace"]().execute(stripped, r"\s*```$", "")[0]
    assert CORE["JsonExtractString"]().execute(stripped, "prompt")[0] == "a cat"
    assert CORE["JsonExtractString"]().execute(stripped, "n")[0] == "3"
    assert CORE["JsonExtractString"]().execute("not json", "prompt")[0] == ""
    assert CORE["RegexReplace"]().execute("aAa", "a", "b", count=2)[0] == "bba"
    assert CORE["RegexReplace"]().execute("aAa", "a", "b", case_insensitive=False)[0] == "bAb"
    assert CORE["StringConcatenate"]().execute("a", "b", ", ")[0] == "a, b"
    assert CORE["PreviewAny"]().main({"k": [1, 2]}) == {"ui": {"text": ('{"k": [1, 2]}',)}}
    assert CORE["PreviewAny"]().main(2.5) == {"ui": {"text": ("2.5",)}}
    with pytest.raises(ValueError, match="RegexReplace: regex_pattern"):
        CORE["RegexReplace"]().execute("a", "(", "")


# --- latents and sampling on the demo models ------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo(demo_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("core_families")
    folders.configure(models=str(demo_models_dir), input_dir=str(root / "in"), output_dir=str(root / "out"),
                      temp_dir=str(root / "temp"))
    clip = CORE["CLIPLoader"]().load_clip(QWEN, "flux2", "default")[0]
    positive = CORE["CLIPTextEncode"]().encode(clip, "a fox")[0]
    return {"model": CORE["UNETLoader"]().load_unet(KLEIN, "default")[0], "clip": clip, "positive": positive,
            "clip_path": demo_models_dir / "text_encoders" / QWEN,
            "negative": CORE["ConditioningZeroOut"]().zero_out(positive)[0],
            "vae": load_vae(demo_models_dir / "vae" / VAE), "root": root}


def smooth_image(width: int = 96, height: int = 64) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(height) / height, torch.arange(width) / width, indexing="ij")
    return torch.stack([x, y, 0.5 + 0.3 * torch.sin(x * 9)], -1).unsqueeze(0)


def test_ksampler_equals_the_engine_with_the_scheduler_sigmas(demo) -> None:
    latent = CORE["EmptyFlux2LatentImage"]().generate(64, 48, 1)[0]
    out = CORE["KSampler"]().sample(demo["model"], 7, 3, 1.0, "euler", "beta", demo["positive"], demo["negative"],
                                    latent)[0]
    noise = torch.randn(latent["samples"].shape, generator=torch.Generator().manual_seed(7))
    expected = demo["model"].sample(noise, scheduler_sigmas("beta", 3), demo["positive"][0][0], guidance=None,
                                    latent_image=latent["samples"])
    assert torch.equal(out["samples"], expected)


def test_basic_scheduler_uses_the_flux2_shift_or_model_sampling_flux(demo) -> None:
    sigmas = CORE["BasicScheduler"]().get_sigmas(demo["model"], "simple", 4, 1.0)[0]
    assert torch.equal(sigmas, scheduler_sigmas("simple", 4))
    patched = CORE["ModelSamplingFlux"]().patch(demo["model"], 1.15, 0.5, 512, 512)[0]
    mu = 0.5 + (1.15 - 0.5) / 3840 * (1024 - 256)
    assert patched.options[MODEL_SAMPLING_SHIFT] == pytest.approx(mu)
    assert MODEL_SAMPLING_SHIFT not in demo["model"].options  # a copy, the input untouched
    shifted = CORE["BasicScheduler"]().get_sigmas(patched, "simple", 4, 0.5)[0]
    assert torch.equal(shifted, scheduler_sigmas("simple", 8, FlowModelSampling(mu))[-5:])
    high, low = CORE["SplitSigmas"]().get_sigmas(sigmas, 2)
    assert torch.equal(high, sigmas[:3]) and torch.equal(low, sigmas[2:])


def test_ksampler_advanced_in_two_passes_equals_one_pass(demo) -> None:
    """Pass 1 stops at step 2 with leftover noise (divided by 1 - sigma, ComfyUI's inverse noise scaling), pass 2
    continues without new noise from step 2: the same latent as one 4-step run."""
    latent = CORE["EmptyFlux2LatentImage"]().generate(64, 48, 1)[0]
    args = (demo["model"], 4, 1.0, "euler", "simple", demo["positive"], demo["negative"])
    whole = CORE["KSampler"]().sample(demo["model"], 3, *args[1:], latent)[0]
    advanced = CORE["KSamplerAdvanced"]()
    first = advanced.sample(demo["model"], "enable", 3, *args[1:], latent, 0, 2, "enable")[0]
    second = advanced.sample(demo["model"], "disable", 3, *args[1:], first, 2, 10000, "disable")[0]
    torch.testing.assert_close(second["samples"], whole["samples"], rtol=1e-4, atol=1e-4)
    # start_at_step at or past the end returns the latent unchanged.
    assert advanced.sample(demo["model"], "enable", 3, *args[1:], latent, 4, 10000, "disable")[0] is latent


def test_unimplemented_samplers_fail_by_name(demo) -> None:
    latent = CORE["EmptyFlux2LatentImage"]().generate(32, 32, 1)[0]
    with pytest.raises(ValueError, match="KSampler: sampler_name: expected one of .*found 'dpmpp_2m_sde'"):
        CORE["KSampler"]().sample(demo["model"], 0, 2, 1.0, "dpmpp_2m_sde", "simple", demo["positive"],
                                  demo["negative"], latent)


def test_empty_latent_image_is_widened_like_comfyui(demo) -> None:
    """ComfyUI's 4-channel empty latent at 1/8 becomes a 128-channel FLUX.2 latent of the same grid (so twice the
    pixel size)."""
    latent = CORE["EmptyLatentImage"]().generate(64, 32, 1)[0]
    assert latent["samples"].shape == (1, 4, 4, 8)
    out = CORE["KSampler"]().sample(demo["model"], 0, 1, 1.0, "euler", "simple", demo["positive"], demo["negative"],
                                    latent)[0]
    assert out["samples"].shape == (1, 128, 4, 8)


def test_latent_upscale_nodes(demo) -> None:
    latent = {"samples": torch.rand(1, 128, 4, 6), "noise_mask": torch.ones(1, 1, 64, 96)}
    by = CORE["LatentUpscaleBy"]().upscale(latent, "nearest-exact", 1.5)[0]
    assert by["samples"].shape == (1, 128, 6, 9) and by["noise_mask"] is latent["noise_mask"]
    assert torch.equal(by["samples"], torch.nn.functional.interpolate(latent["samples"], size=(6, 9),
                                                                      mode="nearest-exact"))
    sized = CORE["LatentUpscale"]().upscale(latent, "bilinear", 192, 0, "disabled")[0]
    assert sized["samples"].shape == (1, 128, 8, 12)  # 192 px wide, the height from the aspect ratio: 128 px
    assert CORE["LatentUpscaleBy"]().upscale(latent, "bislerp", 2.0)[0]["samples"].shape == (1, 128, 8, 12)


def test_bislerp_slerps_channel_vectors_between_neighbours() -> None:
    """Two orthogonal unit vectors a, b in a row, widened to 4: half-pixel source positions -0.25, 0.25, 0.75, 1.25
    (clamped) give a, slerp(a, b, 1/4), slerp(a, b, 3/4), b; slerp of orthogonal unit vectors at r is
    sin((1 - r) pi/2) a + sin(r pi/2) b."""
    from flux2_host.core_nodes.resizing import bislerp

    row = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)
    out = bislerp(row, 4, 1)[0, :, 0].T
    s1, s3 = math.sin(math.pi / 8), math.sin(3 * math.pi / 8)
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0], [s3, s1], [s1, s3], [0.0, 1.0]]), atol=1e-6, rtol=0)
    # Same size: unchanged. Parallel vectors: the first one is kept (ComfyUI's near-equal-direction case).
    field = torch.randn(1, 3, 4, 5)
    torch.testing.assert_close(bislerp(field, 5, 4), field, atol=1e-5, rtol=0)
    parallel = torch.tensor([[1.0, 1.0], [2.0, 2.0]]).T.reshape(1, 2, 1, 2)
    assert torch.equal(bislerp(parallel, 4, 1)[0, :, 0, 1], torch.tensor([1.0, 1.0]))


def test_ksampler_inpainting_keeps_the_unmasked_region(demo) -> None:
    image = smooth_image()
    mask = torch.zeros(1, 64, 96)
    mask[:, :, 48:] = 1.0
    _, _, latent = CORE["InpaintModelConditioning"]().encode(demo["positive"], demo["negative"], image, demo["vae"],
                                                             mask, True)
    assert latent["noise_mask"].shape == (1, 1, 64, 96)
    out = CORE["KSampler"]().sample(demo["model"], 1, 4, 1.0, "euler", "simple", demo["positive"], demo["negative"],
                                    latent)[0]
    source = encode_image(demo["vae"], image)
    torch.testing.assert_close(out["samples"][..., :3], source[..., :3], rtol=0, atol=1e-5)
    assert (out["samples"][..., 3:] - source[..., 3:]).abs().mean() > 0.1
    # The same through SetLatentNoiseMask on a VAEEncode latent.
    masked = CORE["SetLatentNoiseMask"]().set_mask({"samples": source}, mask)[0]
    again = CORE["KSampler"]().sample(demo["model"], 1, 4, 1.0, "euler", "simple", demo["positive"],
                                      demo["negative"], masked)[0]
    assert torch.equal(again["samples"], out["samples"])
    # Decoded, the kept half stays closer to the VAE round trip than the regenerated half.
    result, round_trip = decode_latent(demo["vae"], out["samples"]), decode_latent(demo["vae"], source)
    difference = (result - round_trip).abs()
    assert difference[:, :, :48].mean() < difference[:, :, 48:].mean()
    # DifferentialDiffusion with a binary mask changes nothing.
    differential = CORE["DifferentialDiffusion"]().apply(demo["model"], 1.0)[0]
    same = CORE["KSampler"]().sample(differential, 1, 4, 1.0, "euler", "simple", demo["positive"], demo["negative"],
                                     latent)[0]
    torch.testing.assert_close(same["samples"], out["samples"], rtol=0, atol=1e-5)
    # noise_mask off: a plain img2img latent.
    plain = CORE["InpaintModelConditioning"]().encode(demo["positive"], demo["negative"], image, demo["vae"], mask,
                                                      False)[2]
    assert "noise_mask" not in plain


def test_vae_encode_for_inpaint_greys_the_masked_pixels_and_grows_the_mask(demo) -> None:
    image = smooth_image()
    mask = torch.zeros(1, 64, 96)
    mask[:, 20:30, 40:50] = 1.0
    latent = CORE["VAEEncodeForInpaint"]().encode(demo["vae"], image, mask, 6)[0]
    greyed = image.clone()
    greyed[:, 20:30, 40:50] = 0.5
    torch.testing.assert_close(latent["samples"], encode_image(demo["vae"], greyed))
    grown = latent["noise_mask"][0, 0]
    # A 6 x 6 box filter with padding 3: output o sums inputs o - 3 .. o + 2, so rows 20..29 reach rows 18..32.
    expected = torch.zeros(64, 96)
    expected[18:33, 38:53] = 1.0
    assert torch.equal(grown, expected)


def test_lora_loader_applies_the_model_part_and_the_text_encoder_part(demo) -> None:
    """The CLIP part equals encoding with the LoRA merged into the text encoder's weights (W + alpha/rank up @ down);
    kohya (underscored) and PEFT (dotted) text-encoder names both land on the layers."""
    from flux2_core.checkpoints.loaders import load_text_encoder

    loras = demo["root"] / "loras"
    loras.mkdir(exist_ok=True)
    hidden = demo["model"].diffusion_model.config.hidden_size
    generator = torch.Generator().manual_seed(5)
    tensors = {"lora_unet_single_blocks_0_linear2.lora_down.weight": torch.randn(2, 4 * hidden, generator=generator),
               "lora_unet_single_blocks_0_linear2.lora_up.weight": torch.randn(hidden, 2, generator=generator),
               "lora_unet_single_blocks_0_linear2.alpha": torch.tensor(2.0)}
    save_file(tensors, str(loras / "dit_only.safetensors"))
    text = demo["clip"].model
    q_proj, up_proj = text.layers[0].self_attn.q_proj, text.layers[1].mlp.up_proj
    te = {"lora_te_model_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, q_proj.in_features,
                                                                                 generator=generator) * 0.1,
          "lora_te_model_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(q_proj.out_features, 4,
                                                                               generator=generator) * 0.1,
          "lora_te_model_layers_0_self_attn_q_proj.alpha": torch.tensor(2.0),
          "text_encoder.model.layers.1.mlp.up_proj.lora_A.weight": torch.randn(2, up_proj.in_features,
                                                                              generator=generator) * 0.1,
          "text_encoder.model.layers.1.mlp.up_proj.lora_B.weight": torch.randn(up_proj.out_features, 2,
                                                                              generator=generator) * 0.1}
    save_file({**tensors, **te}, str(loras / "with_te.safetensors"))
    folders.add_model_folder_path("loras", str(loras))

    model, clip = CORE["LoraLoader"]().load_lora(demo["model"], demo["clip"], "dit_only.safetensors", 0.7, 1.0)
    assert clip is demo["clip"] and model.lora_patches[-1][1] == 0.7
    only = CORE["LoraLoaderModelOnly"]().load_lora_model_only(demo["model"], "dit_only.safetensors", 0.7)[0]
    assert only.lora_patches[-1][0].fingerprint == model.lora_patches[-1][0].fingerprint

    model, clip = CORE["LoraLoader"]().load_lora(demo["model"], demo["clip"], "with_te.safetensors", 1.0, 0.5)
    patched = CORE["CLIPTextEncode"]().encode(clip, "a fox")[0][0][0]
    plain = CORE["CLIPTextEncode"]().encode(demo["clip"], "a fox")[0][0][0]
    assert torch.equal(plain, demo["positive"][0][0])  # the shared encoder is untouched

    merged = load_text_encoder(demo["clip_path"])
    with torch.no_grad():
        layer = merged.model.layers[0].self_attn.q_proj
        layer.weight += 0.5 * (2.0 / 4) * te["lora_te_model_layers_0_self_attn_q_proj.lora_up.weight"] @ \
            te["lora_te_model_layers_0_self_attn_q_proj.lora_down.weight"]
        layer = merged.model.layers[1].mlp.up_proj
        layer.weight += 0.5 * te["text_encoder.model.layers.1.mlp.up_proj.lora_B.weight"] @ \
            te["text_encoder.model.layers.1.mlp.up_proj.lora_A.weight"]
    torch.testing.assert_close(patched, merged.encode("a fox"), rtol=1e-4, atol=1e-5)
    assert (patched - plain).abs().max() > 1e-3
    # strength_clip 0: the CLIP passes through.
    assert CORE["LoraLoader"]().load_lora(demo["model"], demo["clip"], "with_te.safetensors", 1.0, 0.0)[1] is demo["clip"]


def test_conditioning_combine_and_timestep_range(demo) -> None:
    """Combined entries: one pass each, x0 predictions averaged (ComfyUI). One Euler step from sigma 1 lands on the
    prediction, so combining two prompts gives the mean of the two one-prompt results."""
    other = CORE["CLIPTextEncode"]().encode(demo["clip"], "a boat")[0]
    both = CORE["ConditioningCombine"]().combine(demo["positive"], other)[0]
    assert len(both) == 2 and both[0][0] is demo["positive"][0][0]
    latent = CORE["EmptyFlux2LatentImage"]().generate(32, 32, 1)[0]

    def one_step(positive) -> torch.Tensor:
        return CORE["KSampler"]().sample(demo["model"], 0, 1, 1.0, "euler", "simple", positive, demo["negative"],
                                         latent)[0]["samples"]

    torch.testing.assert_close(one_step(both), (one_step(demo["positive"]) + one_step(other)) / 2,
                               rtol=1e-4, atol=1e-5)
    ranged = CORE["ConditioningSetTimestepRange"]().set_range(demo["positive"], 0.2, 0.8)[0]
    assert ranged[0][1]["start_percent"] == 0.2 and ranged[0][1]["end_percent"] == 0.8
    assert "start_percent" not in demo["positive"][0][1]
    # Inactive at sigma 1 (the range starts at 20 %): no entry predicts, x0 is 0, as in ComfyUI.
    assert not one_step(ranged).any()
    full = CORE["ConditioningSetTimestepRange"]().set_range(demo["positive"], 0.0, 1.0)[0]
    assert torch.equal(one_step(full), one_step(demo["positive"]))


# --- model upscaling ------------------------------------------------------------------------------------------

def test_tiled_upscale_blends_tiles_into_the_whole_image_result() -> None:
    """A model that upscales each pixel on its own gives the same result whole or in overlapping tiles (the ramps
    only weight agreeing values); ComfyUI's tile grid: starts every tile - overlap, the last one moved back."""
    from flux2_host.core_nodes.upscale import tiled_upscale

    image = torch.rand(2, 3, 30, 41)
    seen: list[tuple[int, int]] = []

    def nearest_double(tile: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(tile.shape[-2:]))
        return tile.repeat_interleave(2, -1).repeat_interleave(2, -2) * 0.5

    tiled = tiled_upscale(image, nearest_double, 2, tile=16, overlap=4)
    torch.testing.assert_close(tiled, nearest_double(image), rtol=0, atol=1e-6)
    assert seen[0] == (16, 16) and len(seen) == 2 * 3 * 4 + 1  # rows at 0, 12, 24; columns at 0, 12, 24, 36


def test_upscale_model_nodes_through_spandrel(tmp_path: Path) -> None:
    """With spandrel installed: a tiny real ESRGAN state dict loads and doubles the image size. Without it: the
    loader says how to install it."""
    folders.configure(models=str(tmp_path), input_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "out"),
                      temp_dir=str(tmp_path / "temp"))
    (tmp_path / "upscale_models").mkdir()
    try:
        from spandrel.architectures.ESRGAN import ESRGAN
    except ImportError:
        save_file({"conv_first.weight": torch.zeros(1)}, str(tmp_path / "upscale_models" / "tiny.safetensors"))
        with pytest.raises(ImportError, match="pip install spandrel"):
            CORE["UpscaleModelLoader"]().load_model("tiny.safetensors")
        return
    network = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=2)
    save_file(network.state_dict(), str(tmp_path / "upscale_models" / "tiny.safetensors"))
    model = CORE["UpscaleModelLoader"]().load_model("tiny.safetensors")[0]
    image = torch.rand(1, 20, 24, 3)
    out = CORE["ImageUpscaleWithModel"]().upscale(model, image)[0]
    assert out.shape == (1, 40, 48, 3)
    with torch.no_grad():
        expected = network(image.movedim(-1, 1)).clamp(0, 1).movedim(1, -1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_image_stitch() -> None:
    left, right = torch.rand(1, 8, 6, 3), torch.rand(2, 4, 5, 3)
    stitch = CORE["ImageStitch"]().stitch
    assert stitch(left, "right", True, 0, "white")[0] is left
    # match_image_size: image2 scaled to 8 px high keeping its aspect (int(8 * 5 / 4) = 10 wide), batch repeated.
    out = stitch(left, "right", True, 2, "red", right)[0]
    assert out.shape == (2, 8, 6 + 2 + 10, 3)
    assert torch.equal(out[1, :, :6], left[0]) and (out[:, :, 6:8] == torch.tensor([1.0, 0.0, 0.0])).all()
    # Without matching: the smaller one padded (centred) in the spacing grey; image2 first for "up".
    out = stitch(left, "up", False, 0, "white", right)[0]
    assert out.shape == (2, 4 + 8, 6, 3)
    assert torch.equal(out[0, :4, :5], right[0]) and (out[0, :4, 5] == 1.0).all()
    assert torch.equal(out[0, 4:], left[0])


def test_more_core_utilities(demo) -> None:
    sigmas = scheduler_sigmas("simple", 4)
    high, low = CORE["SplitSigmasDenoise"]().get_sigmas(sigmas, 0.5)
    assert torch.equal(high, sigmas[:3]) and torch.equal(low, sigmas[2:])
    assert torch.equal(CORE["BetaSamplingScheduler"]().get_sigmas(demo["model"], 4, 0.6, 0.6)[0],
                       scheduler_sigmas("beta", 4))
    assert CORE["EmptySD3LatentImage"]().generate(64, 32, 2)[0]["samples"].shape == (2, 16, 4, 8)
    assert CORE["StringReplace"]().execute("a.b.c", ".", "-")[0] == "a-b-c"
    image = torch.rand(1, 30, 60, 3)
    assert CORE["ImageScaleToMaxDimension"]().upscale(image, "area", 20)[0].shape == (1, 10, 20, 3)
    color = CORE["EmptyImage"]().generate(3, 2, 1, 0xFF8000)[0]
    assert color.shape == (1, 2, 3, 3) and color[0, 0, 0].tolist() == pytest.approx([1.0, 128 / 255, 0.0])


def test_disable_noise_continues_a_latent_like_ksampler_advanced(demo) -> None:
    latent = {"samples": torch.randn(1, 128, 2, 2, generator=torch.Generator().manual_seed(2))}
    guider = CORE["CFGGuider"]().get_guider(demo["model"], demo["positive"], demo["negative"], 1.0)[0]
    sigmas = scheduler_sigmas("simple", 4)[2:]
    custom = CORE["SamplerCustomAdvanced"]().sample(CORE["DisableNoise"]().get_noise()[0], guider,
                                                    CORE["KSamplerSelect"]().get_sampler("euler")[0], sigmas,
                                                    latent)[0]
    advanced = CORE["KSamplerAdvanced"]().sample(demo["model"], "disable", 0, 4, 1.0, "euler", "simple",
                                                 demo["positive"], demo["negative"], latent, 2, 10000, "disable")[0]
    assert torch.equal(custom["samples"], advanced["samples"])


def test_conditioning_average_and_latent_composite_masked() -> None:
    to = [[torch.ones(1, 4, 3), {"guidance": 4.0}]]
    source = [[torch.full((1, 2, 3), 3.0), {}]]
    out = CORE["ConditioningAverage"]().addWeighted(to, source, 0.25)[0]
    expected = torch.cat([torch.full((1, 2, 3), 0.25 + 3 * 0.75), torch.full((1, 2, 3), 0.25)], dim=1)
    assert torch.equal(out[0][0], expected) and out[0][1] == {"guidance": 4.0} and out[0][1] is not to[0][1]
    destination = {"samples": torch.zeros(1, 128, 4, 6)}
    pasted = {"samples": torch.ones(1, 128, 2, 2)}
    mask = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    out = CORE["LatentCompositeMasked"]().composite(destination, pasted, 32, 16, False, mask)[0]["samples"]
    expected = torch.zeros(4, 6)
    expected[1:3, 2:4] = mask[0]
    assert torch.equal(out[0, 5], expected) and not destination["samples"].any()


def test_karras_scheduler_and_image_blend() -> None:
    sigmas = CORE["KarrasScheduler"]().get_sigmas(3, 1.0, 0.01, 7.0)[0]
    expected = [(1.0 + i / 2 * (0.01 ** (1 / 7) - 1.0)) ** 7 for i in range(3)] + [0.0]
    torch.testing.assert_close(sigmas, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    a, b = torch.tensor([[[[0.2, 0.6, 0.9]]]]), torch.tensor([[[[0.5, 0.3, 0.8]]]])
    blend = CORE["ImageBlend"]().blend
    cases = {"multiply": a * b, "screen": 1 - (1 - a) * (1 - b), "difference": (a - b).clamp(0, 1),
             "overlay": torch.tensor([[[[2 * 0.2 * 0.5, 1 - 2 * 0.4 * 0.7, 1 - 2 * 0.1 * 0.2]]]])}
    for mode, expected in cases.items():
        torch.testing.assert_close(blend(a, b, 1.0, mode)[0], expected)
    # soft light: b <= 0.5 darkens by (1 - 2b) a (1 - a); b > 0.5 lightens towards D(a) (sqrt(a) above 0.25).
    soft = blend(a, b, 1.0, "soft_light")[0][0, 0, 0]
    assert soft.tolist() == pytest.approx([0.2, 0.6 - 0.4 * 0.6 * 0.4, 0.9 + 0.6 * (math.sqrt(0.9) - 0.9)])
    torch.testing.assert_close(blend(a, b, 0.25, "normal")[0], 0.75 * a + 0.25 * b)


# widgets_values as shared workflows save them (from the community corpus), and the API inputs they stand for.
SAVED_WIDGETS = {
    "KSampler": ([350700258930986, "fixed", 5, 1, "euler_ancestral", "simple", 0.12],
                 {"seed": 350700258930986, "steps": 5, "cfg": 1, "sampler_name": "euler_ancestral",
                  "scheduler": "simple", "denoise": 0.12}),
    "RegexReplace": (["", "^```json\\s*", "", True, False, False, 0],
                     {"string": "", "regex_pattern": "^```json\\s*", "replace": "", "case_insensitive": True,
                      "multiline": False, "dotall": False, "count": 0}),
    "ModelSamplingFlux": ([1.15, 0.5, 32, 1024], {"max_shift": 1.15, "base_shift": 0.5, "width": 32,
                                                  "height": 1024}),
    "LatentUpscaleBy": (["nearest-exact", 1.25], {"upscale_method": "nearest-exact", "scale_by": 1.25}),
    "BasicScheduler": (["simple", 5, 0.45], {"scheduler": "simple", "steps": 5, "denoise": 0.45}),
    "ImageScale": (["area", 512, 512, "center"], {"upscale_method": "area", "width": 512, "height": 512,
                                                  "crop": "center"}),
    "ImageToMask": (["red"], {"channel": "red"}),
    "JsonExtractString": (["", "prompt"], {"json_string": "", "key": "prompt"}),
    "LoraLoader": (["lora1.safetensors", 1, 1], {"lora_name": "lora1.safetensors", "strength_model": 1,
                                                 "strength_clip": 1}),
}


def test_saved_widget_values_map_to_comfyuis_inputs(tmp_path: Path) -> None:
    from flux2_host.registry import NodeRegistry
    from flux2_host.workflow import to_api_prompt

    folders.configure(models=str(tmp_path), input_dir=str(tmp_path), output_dir=str(tmp_path / "out"),
                      temp_dir=str(tmp_path / "temp"))
    nodes = [{"id": i, "type": node_type, "inputs": [], "outputs": [], "mode": 0, "widgets_values": values}
             for i, (node_type, (values, _)) in enumerate(SAVED_WIDGETS.items(), start=1)]
    prompt = to_api_prompt({"version": 0.4, "nodes": nodes, "links": []}, NodeRegistry.default())
    for i, (node_type, (_, inputs)) in enumerate(SAVED_WIDGETS.items(), start=1):
        assert prompt[str(i)]["class_type"] == node_type
        assert prompt[str(i)]["inputs"] == inputs
