"""`flux2 demo-models`: the files ComfyUI's FLUX.2 templates name, loadable and able to make an image."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flux2_core import Flux2Error, Flux2Pipeline, IncompatibleModelsError, load_dit
from flux2_core.checkpoints.detect import DEMO_TOKENIZER_FILE, inspect_checkpoint
from flux2_core.checkpoints.loaders import load_text_encoder
from flux2_core.demo_tokenizers import build_qwen3_tokenizer, write_tiny_text_encoder
from flux2_core.errors import CheckpointError
from flux2_core.demo_models import DEMO_DITS, DEMO_LORAS, DEMO_TEXT_ENCODERS, DEMO_VAES
from flux2_core.pipeline import fit_image
from flux2_core.text_encoder_files import text_encoder_output_dim
from flux2_host.cli import main

TEMPLATE_FILES = [
    "diffusion_models/flux-2-klein-4b.safetensors",
    "diffusion_models/flux-2-klein-base-4b.safetensors",
    "diffusion_models/flux2_dev_fp8mixed.safetensors",
    "text_encoders/qwen_3_4b.safetensors",
    "text_encoders/qwen_3_4b_tokenizer/tokenizer.json",
    "text_encoders/mistral_3_small_flux2_bf16.safetensors",
    "vae/flux2-vae.safetensors",
]


def digests(directory: Path) -> dict[str, str]:
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def command_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("cli") / "models"
    assert main(["demo-models", "--dir", str(directory)]) == 0
    return directory


def test_command_writes_the_template_files(command_dir):
    for name in TEMPLATE_FILES:
        assert (command_dir / name).is_file(), name
    listed = {f"diffusion_models/{d.file}" for d in DEMO_DITS} | {f"text_encoders/{t.file}" for t in DEMO_TEXT_ENCODERS}
    listed |= {f"vae/{file}" for file, _ in DEMO_VAES} | {f"loras/{file}" for file in DEMO_LORAS}
    assert all((command_dir / name).is_file() for name in listed)
    total = sum(path.stat().st_size for path in command_dir.rglob("*") if path.is_file())
    assert total < 40 * 2**20


def test_files_are_deterministic_and_a_second_run_keeps_them(command_dir, demo_models_dir, capsys):
    # The session fixture wrote its copy with write_demo_models: same bytes as the command's.
    before = digests(command_dir)
    assert before == digests(demo_models_dir)
    times = {path: path.stat().st_mtime_ns for path in command_dir.rglob("*") if path.is_file()}
    assert main(["demo-models", "--dir", str(command_dir)]) == 0
    assert "0 demo model file(s) written" in capsys.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in times} == times


def test_each_dit_reads_prompts_as_wide_as_its_text_encoder(demo_models_dir):
    for spec in DEMO_DITS:
        info = inspect_checkpoint(demo_models_dir / "diffusion_models" / spec.file)
        width = text_encoder_output_dim(demo_models_dir / "text_encoders" / spec.text_encoder.file)
        assert info.kind == "dit" and info.details["context_dim"] == width, spec.file
        assert info.details["guidance_embed"] == spec.guidance_embed


@pytest.mark.parametrize("dit, text_encoder, variant", [
    ("flux-2-klein-4b", "qwen_3_4b", "klein-4b"),
    ("flux-2-klein-base-4b", "qwen_3_4b", "klein-base-4b"),
    ("flux2_dev_fp8mixed", "mistral_3_small_flux2_bf16", "flux2-dev"),
    ("flux-2-klein-9b-fp8", "qwen_3_8b_fp8mixed", "klein-9b"),
])
def test_demo_models_generate_an_image(demo_models_dir, dit, text_encoder, variant):
    pipe = Flux2Pipeline.from_files(dit=demo_models_dir / "diffusion_models" / f"{dit}.safetensors",
                                    vae=demo_models_dir / "vae" / "flux2-vae.safetensors",
                                    text_encoder=demo_models_dir / "text_encoders" / f"{text_encoder}.safetensors",
                                    device="cpu")
    assert pipe.variant == variant
    [image] = pipe("a red fox in the snow", width=64, height=64, steps=2, seed=1)
    assert image.size == (64, 64) and image.mode == "RGB"
    pixels = np.asarray(image)
    assert pixels.std() > 0
    # device="cpu": the memory manager leaves every model on the CPU, the text encoder included.
    assert pipe.text_encoder.weights_device == torch.device("cpu")


@pytest.fixture(scope="module")
def klein_pipe(demo_models_dir) -> Flux2Pipeline:
    return Flux2Pipeline.from_files(demo_models_dir / "diffusion_models" / "flux-2-klein-4b.safetensors",
                                    demo_models_dir / "vae" / "flux2-vae.safetensors",
                                    demo_models_dir / "text_encoders" / "qwen_3_4b.safetensors", device="cpu")


@pytest.mark.parametrize("options, field", [
    ({"width": 100}, "width"),
    ({"height": 8}, "height"),
    ({"denoise": 0.5}, "denoise"),
    ({"output_type": "np"}, "output_type"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_arguments_name_the_field(klein_pipe, options, field):
    with pytest.raises(Flux2Error, match=field):
        klein_pipe("a cat", **{"width": 64, "height": 64, "steps": 1, **options})


def test_text_encoder_of_another_width_is_refused(demo_models_dir, klein_pipe):
    nine_b = demo_models_dir / "diffusion_models" / "flux-2-klein-9b-fp8.safetensors"
    with pytest.raises(IncompatibleModelsError, match="expects 144-wide .* produces 96"):
        Flux2Pipeline.from_files(nine_b, demo_models_dir / "vae" / "flux2-vae.safetensors",
                                 demo_models_dir / "text_encoders" / "qwen_3_4b.safetensors")
    with pytest.raises(IncompatibleModelsError, match="expects 144-wide"):
        Flux2Pipeline(load_dit(nine_b), klein_pipe.vae, klein_pipe.text_encoder)


def test_img2img_start_image_is_fitted_to_the_requested_size(klein_pipe):
    start = Image.new("RGB", (100, 50), (200, 30, 30))
    assert fit_image(start, 64, 48).size == (64, 48)
    [image] = klein_pipe("a cat", width=64, height=48, steps=4, seed=2, image=start, denoise=0.5)
    assert image.size == (64, 48)


def test_demo_files_are_marked_so_users_are_told_they_are_random(command_dir: Path, tmp_path: Path) -> None:
    """`flux2 info` and `flux2 serve` tell a demo stand-in from real weights by its metadata marker."""
    from safetensors.torch import load_file, save_file

    from flux2_host import folders
    from flux2_host.server import demo_model_files

    demo = command_dir / "diffusion_models" / "flux-2-klein-4b.safetensors"
    assert inspect_checkpoint(demo).notes[0].startswith("demo model: tiny random weights")
    for other in ("vae/flux2-vae.safetensors", "text_encoders/qwen_3_4b.safetensors",
                  "text_encoders/mistral_3_small_flux2_fp8.safetensors", "loras/Flux2TurboComfyv2.safetensors"):
        assert any("demo model" in note for note in inspect_checkpoint(command_dir / other).notes), other

    models = tmp_path / "models"
    (models / "diffusion_models").mkdir(parents=True)
    real = models / "diffusion_models" / "my-klein.safetensors"
    save_file(load_file(str(demo)), str(real))  # same tensors, no marker: what a real download looks like
    (models / "diffusion_models" / "flux-2-klein-4b.safetensors").write_bytes(demo.read_bytes())
    (models / "diffusion_models" / "broken.safetensors").write_bytes(b"not a checkpoint")
    assert not any("demo model" in note for note in inspect_checkpoint(real).notes)
    (models / "text_encoders").mkdir()
    (models / "text_encoders" / "qwen_3_4b.safetensors").write_bytes(
        (command_dir / "text_encoders" / "qwen_3_4b.safetensors").read_bytes())
    folders.configure(models=str(models), input_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "out"),
                      temp_dir=str(tmp_path / "tmp"))
    # What `flux2 serve` names in its start-up warning: every demo file still in use, of every kind.
    assert demo_model_files() == ["diffusion_models/flux-2-klein-4b.safetensors", "text_encoders/qwen_3_4b.safetensors"]


def qwen3_file_with_rows(path: Path, rows: int) -> Path:
    """A non-demo ComfyUI-style Qwen3 file (with its own tiny tokenizer folder) whose embedding table has `rows`
    rows: what a real text encoder for another vocabulary looks like to the tokenizer check."""
    from safetensors.torch import load_file, save_file

    write_tiny_text_encoder("qwen3", path)
    tensors = load_file(str(path))
    table = tensors["model.embed_tokens.weight"]
    tensors["model.embed_tokens.weight"] = table.new_zeros(rows, table.shape[1])
    save_file(tensors, str(path))
    return path


def test_a_demo_tokenizer_is_refused_for_a_real_text_encoder_naming_its_folder(command_dir, tmp_path):
    """The stale-demo trap: a real qwen_3_4b.safetensors dropped where the demo one was, next to the demo's
    qwen_3_4b_tokenizer/ (the first place the lookup tries)."""
    real = qwen3_file_with_rows(tmp_path / "qwen_3_4b.safetensors", rows=len(build_qwen3_tokenizer().get_vocab()))
    stale = tmp_path / "qwen_3_4b_tokenizer"
    shutil.copy(command_dir / "text_encoders" / "qwen_3_4b_tokenizer" / DEMO_TOKENIZER_FILE, stale)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(stale))}: the tiny demo tokenizer `flux2 demo-models` "
                                              rf"wrote, but qwen_3_4b.safetensors is not a demo text encoder; "
                                              rf"delete {re.escape(str(stale))}"):
        load_text_encoder(real)
    # The demo encoder itself still loads with it.
    assert load_text_encoder(command_dir / "text_encoders" / "qwen_3_4b.safetensors").kind == "qwen3"


@pytest.mark.parametrize("rows, reason", [
    (2000, r"expected a tokenizer for the 2000-row embedding table of .*, found only \d+ tokens"),
    (300, r"expected token ids below the 300 rows of the embedding table of .*, found ids up to \d+"),
])
def test_a_tokenizer_for_another_vocabulary_is_refused(tmp_path, rows, reason):
    path = qwen3_file_with_rows(tmp_path / "other_vocab.safetensors", rows)
    with pytest.raises(CheckpointError, match=reason):
        load_text_encoder(path)
