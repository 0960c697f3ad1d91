"""POST /prompt's memory refusal (flux2_host/memory_refusal.py) counts reference images and reads diffusers
folders: each reference adds its (w/16)(h/16) tokens to every step, and a model named by folder is estimated
as its single file is. Compared with the estimate's own plan (flux2_core/memory/estimate.py) for the sizes the
reference preprocessing (flux2_core/references.py) really produces."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from flux2_core.checkpoints.loaders import load_dit
from flux2_core.memory.estimate import InsufficientMemoryError, MemoryRequest, check_fits, plan_for_files
from flux2_core.references import preprocess_reference, reference_pixel_cap
from flux2_host import folders
from flux2_host.memory_refusal import _cached_shape, _reference_sizes, memory_refusal

DIT, ENCODER, VAE = "flux-2-klein-4b.safetensors", "qwen_3_4b.safetensors", "flux2-vae.safetensors"
IMAGES = {"wide.png": (2048, 1024), "small.png": (300, 200)}


@pytest.fixture
def input_dir(tmp_path, demo_models_dir):
    folders.configure(models=str(demo_models_dir), input_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "out"),
                      temp_dir=str(tmp_path / "tmp"))
    (tmp_path / "in").mkdir(exist_ok=True)
    for name, size in IMAGES.items():
        Image.new("RGB", size, (200, 30, 30)).save(tmp_path / "in" / name)
    _cached_shape.cache_clear()
    return tmp_path / "in"


def edit_prompt(images: list[str], dit: str = DIT) -> dict:
    """The klein edit workflow's graph (workflows/flux2_klein_edit_two_references.json) with these inputs, at
    64x64: with the tiny models, the VAE decode of a larger image would be the peak whatever the references."""
    prompt = {"2": {"class_type": "Flux2LoadModel", "inputs": {"model_name": dit, "weight_dtype": "default"}},
              "3": {"class_type": "Flux2LoadTextEncoder", "inputs": {"text_encoder_name": ENCODER}},
              "4": {"class_type": "Flux2LoadVAE", "inputs": {"vae_name": VAE}},
              "7": {"class_type": "Flux2TextEncode", "inputs": {"prompt": "a hat", "text_encoder": ["3", 0]}},
              "10": {"class_type": "Flux2EmptyLatent", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}
    conditioning = ["7", 0]
    for number, image in enumerate(images):
        prompt[f"load{number}"] = {"class_type": "LoadImage", "inputs": {"image": image}}
        prompt[f"ref{number}"] = {"class_type": "Flux2ReferenceImage", "inputs": {
            "conditioning": conditioning, "image": [f"load{number}", 0], "vae": ["4", 0]}}
        conditioning = [f"ref{number}", 0]
    prompt["11"] = {"class_type": "Flux2Sampler", "inputs": {"seed": 7, "steps": 4, "guidance": 0.0, "cfg": 1.0,
                                                              "model": ["2", 0], "positive": conditioning,
                                                              "latent": ["10", 0]}}
    return prompt


def preprocessed_sizes(input_dir, images: list[str]) -> tuple[tuple[int, int], ...]:
    """What Flux2ReferenceImage encodes: each image after the official downscale and crop."""
    cap = reference_pixel_cap(len(images))
    shapes = [preprocess_reference(Image.open(input_dir / name), cap).shape for name in images]
    return tuple((shape[-1], shape[-2]) for shape in shapes)


def plan(demo_models_dir, references: tuple[tuple[int, int], ...]):
    files = [demo_models_dir / kind / name for kind, name in (
        ("diffusion_models", DIT), ("text_encoders", ENCODER), ("vae", VAE))]
    return plan_for_files(MemoryRequest(64, 64, 1, 1.0, references=references), *files, device="cpu",
                          dtype=torch.float32)


@pytest.mark.parametrize("images", [["wide.png", "small.png"], ["wide.png"]])
def test_reference_sizes_are_those_the_preprocessing_produces(input_dir, images):
    assert _reference_sizes(edit_prompt(images)) == preprocessed_sizes(input_dir, images)


def test_a_comfyui_reference_chain_counts_the_loaded_image_size(input_dir):
    prompt = {"load": {"class_type": "LoadImage", "inputs": {"image": "small.png"}},
              "scale": {"class_type": "ImageScaleToTotalPixels",
                        "inputs": {"image": ["load", 0], "upscale_method": "area", "megapixels": 1.0}},
              "encode": {"class_type": "VAEEncode", "inputs": {"pixels": ["scale", 0], "vae": ["vae", 0]}},
              "plain": {"class_type": "VAEEncode", "inputs": {"pixels": ["load", 0], "vae": ["vae", 0]}},
              "r1": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["c", 0], "latent": ["encode", 0]}},
              "r2": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["r1", 0], "latent": ["plain", 0]}}}
    assert _reference_sizes(prompt) == ((1024, 1024), (288, 192))


def test_references_can_make_a_prompt_not_fit(input_dir, demo_models_dir):
    """A budget between what the prompt needs without and with its two references: refused only when they
    are counted, with the message of the estimate's plan for the references' real sizes."""
    images = ["wide.png", "small.png"]
    without, with_references = plan(demo_models_dir, ()), plan(demo_models_dir, preprocessed_sizes(input_dir, images))
    assert with_references.peak_bytes > without.peak_bytes
    budget = (without.peak_bytes + with_references.peak_bytes) // 2
    with pytest.raises(InsufficientMemoryError) as expected:
        check_fits(with_references, budget, what=f"this prompt ({DIT})")
    assert memory_refusal(edit_prompt(images), budget) == str(expected.value)
    assert memory_refusal(edit_prompt([]), budget) is None


def write_diffusers_transformer(folder, single_file) -> None:
    from tiny_models import diffusers_transformer

    diffusers_transformer(single_file, load_dit(single_file, device="cpu").config).save_pretrained(
        folder, safe_serialization=True)


@pytest.mark.parametrize("layout", ["component folder", "pipeline folder"])
def test_a_diffusers_folder_is_estimated_as_its_single_file(tmp_path, input_dir, demo_models_dir, layout):
    models = tmp_path / "models"
    for kind, name in (("diffusion_models", DIT), ("text_encoders", ENCODER), ("vae", VAE)):
        (models / kind).mkdir(parents=True, exist_ok=True)
        (models / kind / name).symlink_to(demo_models_dir / kind / name)
    folder = models / "diffusion_models" / "klein-diffusers"
    if layout == "pipeline folder":
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline"}))
        write_diffusers_transformer(folder / "transformer", demo_models_dir / "diffusion_models" / DIT)
    else:
        write_diffusers_transformer(folder, demo_models_dir / "diffusion_models" / DIT)
    folders.configure(models=str(models), input_dir=str(input_dir), output_dir=str(tmp_path / "out"),
                      temp_dir=str(tmp_path / "tmp"))

    from_file = memory_refusal(edit_prompt(["wide.png"]), budget_bytes=1)
    from_folder = memory_refusal(edit_prompt(["wide.png"], dit="klein-diffusers"), budget_bytes=1)
    assert from_file is not None and "needs" in from_file
    assert from_folder == from_file.replace(DIT, "klein-diffusers")
