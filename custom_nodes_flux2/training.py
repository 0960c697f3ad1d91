"""Training nodes: the engine's trainer (`flux2_core.train`, the one `flux2 train` runs) inside the graph.

- Flux2TrainFromConfig: a training TOML (the file `flux2 train CONFIG.toml` takes) plus TOML lines that override
  its options; any training mode of that file (LoRA, full fine-tune, distillation) runs.
- Flux2TrainLoRA: the main options as widgets (defaults as `TrainConfig`'s), every other option as TOML lines.

Both report each optimizer step to the progress bar (with the loss as a `flux2.training` message) and watch the
interrupt: an interrupted run saves a training state (`<output_name>-state`) that `resume` continues from.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import torch

from flux2_core.comfy_layouts import pil_to_image
from flux2_core.errors import Flux2Error, Interrupted
from flux2_core.patched_model import PatchedModel
from flux2_core.train.config import (
    FIELD_TYPES,
    NETWORK_TYPES,
    OPTIMIZERS,
    TIMESTEP_SAMPLINGS,
    TrainConfig,
    config_from_mapping,
    load_config,
)
from flux2_core.train.full_finetune import make_trainer
from flux2_core.train.loss_chart import loss_chart
from flux2_core.train.trainer import StepInfo

from .comfy_bridge import (
    input_directory,
    make_room_for_training,
    model_files,
    model_path,
    output_directory,
    raise_interruption,
    training_hooks,
)

CATEGORY = "FLUX.2/training"
# Where the widget node writes its LoRAs, states, logs and caches, under ComfyUI's output folder.
TRAINING_FOLDER = "flux2_training"
AUTO_VARIANT = "auto"
VARIANT_CHOICES = [AUTO_VARIANT, "klein-base-4b", "klein-base-9b", "klein-4b", "klein-9b", "dev"]
DEFAULTS = TrainConfig()
RETURN_TYPES = ("STRING", "IMAGE")
OVERRIDES_TOOLTIP = ("More training options as TOML lines (`name = value`, the names of `flux2 train`'s config "
                     "file), e.g. `lr_scheduler = \"cosine\"`; they win over the widgets.")


def parse_overrides(text: str, where: str) -> dict[str, Any]:
    """TOML lines of TrainConfig options (tables are flattened, as in a config file); `where` ("Node: input")
    names the input in errors. Unknown option names are refused (a typo would silently change nothing)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{where}: expected TOML lines `name = value`, found {text!r} ({error})") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    unknown = sorted(set(flat) - set(FIELD_TYPES))
    if unknown:
        raise ValueError(f"{where}: expected training option names (as in `flux2 train --print-config`), found "
                         f"unknown {unknown}")
    return flat


def run_training(config: TrainConfig, node: str) -> tuple[str, torch.Tensor]:
    """Train with `config` (any training mode) reporting to the progress bar and stopping on the interrupt;
    returns (path of the saved file, loss chart IMAGE). Engine errors are raised with the node's name first.

    ComfyUI runs every node under `torch.inference_mode()`: tensors made there (the trainer's models included)
    can never take part in autograd, so the whole run, loading too, leaves inference mode and enables gradients.
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _train(config, node)


def _train(config: TrainConfig, node: str) -> tuple[str, torch.Tensor]:
    on_step, cancel = training_hooks(config.max_train_steps)

    def report(info: StepInfo) -> None:
        on_step(info.step, info.total, info.loss, info.lr)

    try:
        trainer = make_trainer(config.validate(), on_step=report, cancel=cancel)
    except Flux2Error as error:
        raise ValueError(f"{node}: {error}") from None
    make_room_for_training()
    try:
        path = trainer.run()
    except Interrupted as error:
        state = Path(config.output_dir) / f"{config.output_name}-state"
        raise_interruption(Interrupted(f"{node}: {error}; the training state in {state} continues it "
                                       f"(resume = {str(state)!r})"))
    except (Flux2Error, ValueError) as error:  # the loaders raise ValueError for a model_version / file mismatch
        raise ValueError(f"{node}: {error}") from None
    return str(path), pil_to_image(loss_chart(trainer.losses))


class Flux2TrainFromConfig:
    DESCRIPTION = ("Runs `flux2 train` on a training config file (TOML, as `flux2 train --print-config` writes): "
                   "LoRA / LoKr / LoHa, full fine-tune or distillation, with the file's datasets, caches, samples "
                   "and checkpoints. Interrupting saves a training state; set `resume` to it to continue.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = RETURN_TYPES
    RETURN_NAMES = ("path", "loss")
    OUTPUT_TOOLTIPS = ("The saved file (the LoRA, or the DiT of a full fine-tune).", "The loss per step, as a chart.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "config_path": ("STRING", {"default": "", "tooltip": "A training TOML: a path in the input folder, or "
                                                                 "absolute (or relative to the working directory). "
                                                                 "Paths inside it are relative to the working "
                                                                 "directory, as with `flux2 train`."}),
            "overrides": ("STRING", {"default": "", "multiline": True, "tooltip": OVERRIDES_TOOLTIP}),
        }}

    def train(self, config_path: str, overrides: str) -> tuple[str, torch.Tensor]:
        node = "Flux2TrainFromConfig"
        path = _existing_path(config_path, f"{node}: config_path", "a training .toml file", input_directory())
        try:
            config = load_config(path)
        except Flux2Error as error:
            raise ValueError(f"{node}: config_path: {error}") from None
        config = config_from_mapping(parse_overrides(overrides, f"{node}: overrides"), config)
        return run_training(config, node)


class Flux2TrainLoRA:
    DESCRIPTION = ("Trains a LoRA / LoKr / LoHa on a FLUX.2 DiT with `flux2 train`'s trainer: the main options as "
                   "widgets (defaults as in a config file), any other in `more_options`. Files go to "
                   f"output/{TRAINING_FOLDER}/. Interrupting saves `<output_name>-state` there; set `resume` to it "
                   "to continue.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = (*RETURN_TYPES, "FLUX2_MODEL")
    RETURN_NAMES = ("lora_path", "loss", "model")
    OUTPUT_TOOLTIPS = ("The saved LoRA file.", "The loss per step, as a chart.",
                       "The `model` input with the trained LoRA applied (needs `model` connected).")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        d = DEFAULTS
        return {"required": {
            "dit": (model_files("diffusion_models"), {"tooltip": "The DiT to train on (klein base is the usual "
                                                                 "choice; distilled klein and dev train too)."}),
            "vae": (model_files("vae"), {"tooltip": "The FLUX.2 VAE: encodes the dataset's images (cached)."}),
            "text_encoder": (model_files("text_encoders"), {"tooltip": "The variant's text encoder: encodes the "
                                                                       "captions (cached)."}),
            "dataset": ("STRING", {"default": "", "tooltip": "A folder of images with .txt captions (a folder name "
                                                             "in the input folder, or an absolute path), or a "
                                                             "musubi-tuner dataset .toml (its own resolution and "
                                                             "batch size win over the widgets)."}),
            "model_version": (VARIANT_CHOICES, {"default": AUTO_VARIANT, "tooltip": "The variant; auto reads it "
                                                                                    "from the DiT file."}),
            "network_type": (list(NETWORK_TYPES), {"default": d.network_type, "tooltip": "LoRA, LoKr or LoHa."}),
            "network_dim": ("INT", {"default": d.network_dim, "min": 1, "max": 1024, "tooltip": "The rank."}),
            "network_alpha": ("FLOAT", {"default": d.network_alpha, "min": 0.0, "max": 1024.0, "step": 0.5,
                                        "tooltip": "Alpha: the update is scaled by alpha / rank."}),
            "learning_rate": ("FLOAT", {"default": d.learning_rate, "min": 0.0, "max": 1.0, "step": 1e-6,
                                        "round": False, "tooltip": "The learning rate."}),
            "optimizer_type": (list(OPTIMIZERS), {"default": d.optimizer_type, "tooltip": "adamw8bit needs a GPU."}),
            "max_train_steps": ("INT", {"default": d.max_train_steps, "min": 1, "max": 10_000_000,
                                        "tooltip": "Optimizer steps."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 1024,
                                   "tooltip": "Images per batch (for an image folder)."}),
            "resolution": ("INT", {"default": d.resolution, "min": 64, "max": 4096, "step": 16,
                                   "tooltip": "Training area is resolution^2 (for an image folder); aspect ratios "
                                              "are kept in buckets."}),
            "timestep_sampling": (list(TIMESTEP_SAMPLINGS), {"default": d.timestep_sampling,
                                                              "tooltip": "How noise levels are drawn."}),
            "gradient_checkpointing": ("BOOLEAN", {"default": d.gradient_checkpointing,
                                                   "tooltip": "Recompute block activations: less memory."}),
            "fp8_base": ("BOOLEAN", {"default": d.fp8_base, "tooltip": "Keep the frozen DiT in fp8 (LoRA only)."}),
            "blocks_to_swap": ("INT", {"default": d.blocks_to_swap, "min": 0, "max": 64,
                                       "tooltip": "Blocks streamed from CPU memory (GPU only; self-checked)."}),
            "seed": ("INT", {"default": d.seed, "min": 0, "max": 2**63 - 1, "tooltip": "Noise, order, dropout."}),
            "save_every_n_steps": ("INT", {"default": d.save_every_n_steps, "min": 0, "max": 10_000_000,
                                           "tooltip": "Also save a LoRA every N steps; 0 = only at the end."}),
            "output_name": ("STRING", {"default": d.output_name, "tooltip": "File name of the LoRA (no extension)."}),
            "sample_prompt": ("STRING", {"default": "", "multiline": True,
                                         "tooltip": "Prompts to sample while training, one per line, with "
                                                    "`--w --h --s --d` options as in `flux2 train`'s prompt files; "
                                                    "pictures go to the `sample` folder."}),
            "sample_every_n_steps": ("INT", {"default": d.sample_every_n_steps, "min": 0, "max": 10_000_000,
                                             "tooltip": "Sample every N steps; 0 = never."}),
            "resume": ("STRING", {"default": "", "tooltip": "A training state folder to continue from (relative to "
                                                            f"output/{TRAINING_FOLDER}, or absolute); empty for a "
                                                            "new run."}),
        }, "optional": {
            "model": ("FLUX2_MODEL", {"tooltip": "A loaded model to return with the trained LoRA applied."}),
            "more_options": ("STRING", {"default": "", "multiline": True, "tooltip": OVERRIDES_TOOLTIP}),
        }}

    def train(self, model: PatchedModel | None = None, more_options: str = "", **widgets: Any) \
            -> tuple[str, torch.Tensor, PatchedModel | None]:
        node = "Flux2TrainLoRA"
        config = widget_config(widgets, node)
        config = config_from_mapping(parse_overrides(more_options, f"{node}: more_options"), config)
        lora_path, chart = run_training(config, node)
        return lora_path, chart, None if model is None else model.with_lora(lora_path, 1.0)


def widget_config(widgets: dict[str, Any], node: str) -> TrainConfig:
    """The TrainConfig of Flux2TrainLoRA's widgets; files are checked here so that errors name the widget."""
    folder = Path(output_directory()) / TRAINING_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    name = widgets["output_name"]
    if not name or Path(name).name != name:
        raise ValueError(f"{node}: output_name: expected a file name without folders, found {name!r}")
    dataset = _existing_path(widgets["dataset"], f"{node}: dataset", "an image folder or a dataset .toml",
                             input_directory())
    if dataset.is_dir():
        dataset = _folder_dataset(dataset, widgets["resolution"], widgets["batch_size"],
                                  folder / f"{name}-dataset.toml")
    copied = {key: widgets[key] for key in (
        "network_type", "network_dim", "network_alpha", "learning_rate", "optimizer_type", "max_train_steps",
        "resolution", "timestep_sampling", "gradient_checkpointing", "fp8_base", "blocks_to_swap", "seed",
        "save_every_n_steps", "output_name", "sample_every_n_steps")}
    config = dataclasses.replace(
        DEFAULTS, **copied, dit=model_path("diffusion_models", widgets["dit"], f"{node}: dit"),
        vae=model_path("vae", widgets["vae"], f"{node}: vae"),
        text_encoder=model_path("text_encoders", widgets["text_encoder"], f"{node}: text_encoder"),
        model_version="" if widgets["model_version"] == AUTO_VARIANT else widgets["model_version"],
        dataset_config=str(dataset), output_dir=str(folder), cache_directory=str(folder / "cache"))
    if widgets["resume"]:
        config.resume = str(_existing_path(widgets["resume"], f"{node}: resume", "a training state folder", folder))
    if widgets["sample_prompt"].strip():
        prompts = folder / f"{name}-sample-prompts.txt"
        prompts.write_text(widgets["sample_prompt"], encoding="utf-8")
        config.sample_prompts = str(prompts)
    elif widgets["sample_every_n_steps"]:
        raise ValueError(f"{node}: sample_prompt: expected a prompt to sample every {widgets['sample_every_n_steps']} "
                         "steps, found none")
    return config


def _existing_path(value: str, where: str, expected: str, relative_to: str | Path | None = None) -> Path:
    """`value` as a path (a relative one under `relative_to` when given and found there)."""
    path = Path(value.strip()).expanduser()
    if relative_to is not None and not path.is_absolute() and (Path(relative_to) / path).exists():
        path = Path(relative_to) / path
    if not value.strip() or not path.exists():
        place = f" (absolute, or relative to {relative_to})" if relative_to is not None else ""
        raise ValueError(f"{where}: expected {expected}{place}, found {value!r}")
    return path


def _folder_dataset(folder: Path, resolution: int, batch_size: int, toml: Path) -> Path:
    """A musubi dataset TOML for an image folder, carrying the widgets' resolution and batch size (a plain
    folder source has neither)."""
    escaped = str(folder.resolve()).replace("\\", "\\\\").replace('"', '\\"')
    toml.write_text(f'[general]\nresolution = {resolution}\nbatch_size = {batch_size}\nenable_bucket = true\n\n'
                    f'[[datasets]]\nimage_directory = "{escaped}"\n', encoding="utf-8")
    return toml


NODE_CLASS_MAPPINGS = {"Flux2TrainFromConfig": Flux2TrainFromConfig, "Flux2TrainLoRA": Flux2TrainLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"Flux2TrainFromConfig": "FLUX.2 Train LoRA (config file)",
                              "Flux2TrainLoRA": "FLUX.2 Train LoRA"}
