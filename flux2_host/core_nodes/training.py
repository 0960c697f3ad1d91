"""ComfyUI's training nodes (comfy_extras/nodes_train.py) under their ids, inputs, defaults and widget order,
training with `flux2_core.train` on the latents and conditioning the graph hands over.

LORA_MODEL carries a `Flux2LoRA` (ComfyUI: a state dict), LOSS_MAP `{"loss": [float per step]}`. The data
arrive as ComfyUI passes them: LATENT dicts (each [B, 128, h, w]) and CONDITIONINGs whose entries, taken in
order over all of them, are one for all latents or one per latent (MakeTrainingDataset's lists, or one
CLIPTextEncode). Differences from ComfyUI, each either mapped or refused with an error naming the input:
- the loss is our trainer's flow-matching velocity MSE (ComfyUI: MSE on the x0 prediction); loss_function
  other than MSE, optimizer SGD / RMSprop, algorithm OFT, quantized_backward, offloading and checkpoint_depth
  other than 1 are refused;
- optimizer Adam is AdamW with weight decay 0; rank r trains with alpha 1 (ComfyUI's fixed alpha, scale 1/r);
  adapters are always fp32 (lora_dtype is accepted and not used); training_dtype fp32 computes in fp32, bf16 and
  none use bf16 autocast on a GPU (CPU always fp32); bypass_mode is accepted: our LoRAs always run as hooks;
- latents of several sizes are trained in batches of one size (ComfyUI: one sample at a time); bucket_mode
  (ResolutionBucket's output) keeps each given LATENT a bucket of its own: a batch is drawn from one bucket
  (ComfyUI picks a bucket with probability by size each step; here each epoch visits every batch once);
- existing_lora continues a LoRA file of models/loras (a plain LoRA on whole layers, one rank for all; its rank
  replaces the `rank` input, and the layers it patches are trained besides ours); the steps output adds the
  count in its name (`..._<N>_steps_...`, 0 if none), as ComfyUI does; norm / bias differences in
  ComfyUI-trained files are not continued;
- TrainLoraNode also returns the MODEL with the trained LoRA applied, as a fourth output after ComfyUI's
  lora, loss_map and steps (ComfyUI returns no model);
- progress is reported per optimizer step, with the loss as a `flux2.training` message and, a few times per run,
  a sample drawn with the LoRA so far as the step's preview image (`flux2_core.train.preview_samples`);
  `/interrupt` stops the run and leaves a resumable state in output/training/; queueing the same training (same
  settings and data) again continues from that state.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from pathlib import Path

import torch
from flux2_core.comfy_layouts import latent_samples, pil_to_image
from flux2_core.lora import Flux2LoRA, load_lora
from flux2_core.lora.apply import check_lora_fits
from flux2_core.patched_model import PatchedModel
from flux2_core.errors import Interrupted
from flux2_core.progress import TRAINING_EVENT, clear_interrupt, interrupt_requested, report_event, report_progress
from flux2_core.train.checkpointing import atomic_save_lora
from flux2_core.train.config import TrainConfig
from flux2_core.train.in_memory import train_in_memory
from flux2_core.train.loss_chart import loss_chart
from flux2_core.train.preview_samples import preview_due, preview_latent
from flux2_core.train.trainer import StepInfo

from .. import folders
from .images import PreviewImage

log = logging.getLogger(__name__)

NO_LORA = "[None]"
OPTIMIZERS = ["AdamW", "Adam", "SGD", "RMSprop"]
LOSS_FUNCTIONS = ["MSE", "L1", "Huber", "SmoothL1"]
TRAINING_DTYPES = ["bf16", "fp32", "none"]
LORA_DTYPES = ["bf16", "fp32"]
ALGORITHMS = {"LoRA": "lora", "LoHa": "loha", "LoKr": "lokr", "OFT": None}


def _refuse(field: str, value, allowed: str) -> None:
    raise ValueError(f"TrainLoraNode: {field}: {allowed} (this host's trainer), found {value!r}")


def _first(values: list, field: str):
    """INPUT_IS_LIST gives every input as a list; widgets are lists of one value."""
    if not values:
        raise ValueError(f"TrainLoraNode: {field}: no value given")
    return values[0]


class TrainLoraNode:
    DESCRIPTION = "Trains a LoRA on the given latents and conditioning; returns the model with it applied."
    CATEGORY = "training"
    FUNCTION = "train"
    EXPERIMENTAL = True
    INPUT_IS_LIST = True
    # ComfyUI's three outputs in its order (so its workflows' links hold), then the trained MODEL.
    RETURN_TYPES = ("LORA_MODEL", "LOSS_MAP", "INT", "MODEL")
    RETURN_NAMES = ("lora", "loss_map", "steps", "model")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to train the LoRA on."}),
            "latents": ("LATENT", {"tooltip": "The latents to train on (the dataset)."}),
            "positive": ("CONDITIONING", {"tooltip": "The conditioning: one for all latents or one per latent."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 10000, "tooltip": "Samples per batch."}),
            "grad_accumulation_steps": ("INT", {"default": 1, "min": 1, "max": 1024,
                                                "tooltip": "Batches per optimizer step."}),
            "steps": ("INT", {"default": 16, "min": 1, "max": 100000, "tooltip": "Optimizer steps."}),
            "learning_rate": ("FLOAT", {"default": 0.0005, "min": 0.0000001, "max": 1.0, "step": 0.0000001,
                                        "tooltip": "The learning rate."}),
            "rank": ("INT", {"default": 8, "min": 1, "max": 128, "tooltip": "The LoRA rank."}),
            "optimizer": (OPTIMIZERS, {"default": "AdamW", "tooltip": "AdamW, or Adam (AdamW without decay)."}),
            "loss_function": (LOSS_FUNCTIONS, {"default": "MSE", "tooltip": "MSE only on this host."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "Noise and order."}),
            "training_dtype": (TRAINING_DTYPES, {"default": "bf16", "tooltip": "Compute dtype on a GPU."}),
            "lora_dtype": (LORA_DTYPES, {"default": "bf16", "tooltip": "Adapters are fp32 on this host."}),
            "quantized_backward": ("BOOLEAN", {"default": False, "tooltip": "Not supported on this host."}),
            "algorithm": (list(ALGORITHMS), {"default": "LoRA", "tooltip": "The adapter type."}),
            "gradient_checkpointing": ("BOOLEAN", {"default": True, "tooltip": "Recompute block activations."}),
            "checkpoint_depth": ("INT", {"default": 1, "min": 1, "max": 5, "tooltip": "1: per block (only)."}),
            "offloading": ("BOOLEAN", {"default": False, "tooltip": "Not supported on this host."}),
            "existing_lora": ([*folders.get_filename_list("loras"), NO_LORA], {"default": NO_LORA,
                              "tooltip": "A LoRA in models/loras to continue training; [None] for a new one."}),
            "bucket_mode": ("BOOLEAN", {"default": False,
                                        "tooltip": "Each latents input is a bucket (from Resolution Bucket)."}),
            "bypass_mode": ("BOOLEAN", {"default": False, "tooltip": "LoRAs always run as hooks here."}),
        }}

    def train(self, model, latents, positive, batch_size, grad_accumulation_steps, steps, learning_rate, rank,
              optimizer, loss_function, seed, training_dtype, lora_dtype, quantized_backward, algorithm,
              gradient_checkpointing, checkpoint_depth, offloading, existing_lora, bucket_mode, bypass_mode):
        model: PatchedModel = _first(model, "model")
        widgets = {name: _first(value, name) for name, value in dict(
            batch_size=batch_size, grad_accumulation_steps=grad_accumulation_steps, steps=steps,
            learning_rate=learning_rate, rank=rank, optimizer=optimizer, loss_function=loss_function, seed=seed,
            training_dtype=training_dtype, algorithm=algorithm, gradient_checkpointing=gradient_checkpointing,
            checkpoint_depth=checkpoint_depth, quantized_backward=quantized_backward, offloading=offloading,
            existing_lora=existing_lora, bucket_mode=bucket_mode).items()}
        samples = [latent_samples(latent, "TrainLoraNode: latents") for latent in latents]
        contexts = _contexts(positive, sum(len(tensor) for tensor in samples))
        initial_lora, earlier_steps = existing_lora_file(widgets["existing_lora"])
        if initial_lora is not None:
            check_lora_fits(model.diffusion_model, initial_lora)
            widgets.update(rank=_single_rank(initial_lora), algorithm="LoRA")  # the file's kind and rank
        config = training_config(widgets, model.variant, _digest(samples + contexts))
        if initial_lora is not None:
            # ComfyUI trains every linear layer, so its files may patch layers beyond ours: those train too.
            config.target_modules = "|".join([f"(?:{config.target_modules})",
                                              *(re.escape(module) for module in sorted(initial_lora.targets))])
        state = Path(config.output_dir) / f"{config.output_name}-state"
        if state.is_dir():
            config.resume = str(state)  # the same training was interrupted before: continue it
        try:
            # LoRAs already on the MODEL stay in effect while training: the new one learns on top of them.
            with model.patches_applied() as dit:
                lora, losses, done = train_in_memory(
                    config, dit, samples, contexts, widgets["batch_size"],
                    on_step=_reporter(dit, tuple(samples[0].shape[1:]), contexts[0], widgets["seed"]),
                    cancel=interrupt_requested, buckets=widgets["bucket_mode"], initial_lora=initial_lora)
        except Interrupted:
            clear_interrupt()  # handled here: the state is saved, the flag must not stop the next prompt
            raise
        shutil.rmtree(state, ignore_errors=True)
        return lora, {"loss": losses}, done + earlier_steps, model.with_lora(lora, 1.0)


def _reporter(dit: torch.nn.Module, latent_shape: tuple[int, int, int], context: torch.Tensor, seed: int):
    """Each optimizer step: a live loss message (TRAINING_EVENT) and the node's progress, which carries a sample
    drawn with the LoRA as trained so far at the steps `preview_due` picks (the host shows it as the node's
    preview image)."""
    def report(info: StepInfo) -> None:
        report_event(TRAINING_EVENT, {"step": info.step, "total": info.total, "loss": info.loss, "lr": info.lr})
        preview = preview_latent(dit, latent_shape, context, seed) if preview_due(info.step, info.total) else None
        report_progress(info.step, info.total, preview)

    return report


def _digest(tensors: list[torch.Tensor]) -> str:
    """A content hash of the training data (latents are small: 128 x H/16 x W/16 floats per image)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(repr(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def training_config(widgets: dict, variant: str, data_digest: str = "") -> TrainConfig:
    """The TrainConfig for TrainLoraNode's widget values; refuses what our trainer cannot do."""
    if widgets["loss_function"] != "MSE":
        _refuse("loss_function", widgets["loss_function"], "expected 'MSE'")
    if widgets["optimizer"] not in ("AdamW", "Adam"):
        _refuse("optimizer", widgets["optimizer"], "expected 'AdamW' or 'Adam'")
    if ALGORITHMS.get(widgets["algorithm"]) is None:
        _refuse("algorithm", widgets["algorithm"], "expected 'LoRA', 'LoHa' or 'LoKr'")
    for flag in ("quantized_backward", "offloading"):
        if widgets[flag]:
            _refuse(flag, True, "expected False")
    if widgets["checkpoint_depth"] != 1:
        _refuse("checkpoint_depth", widgets["checkpoint_depth"], "expected 1 (per block)")
    # The state folder is named by the settings and data, so queueing the same training again finds it.
    fingerprint = hashlib.sha256(repr((sorted(widgets.items()), variant, data_digest)).encode()).hexdigest()[:12]
    return TrainConfig(
        model_version=variant, network_type=ALGORITHMS[widgets["algorithm"]], network_dim=widgets["rank"],
        network_alpha=1.0, max_train_steps=widgets["steps"], learning_rate=widgets["learning_rate"],
        optimizer_type="adamw", weight_decay=0.0 if widgets["optimizer"] == "Adam" else 0.01,
        gradient_accumulation_steps=widgets["grad_accumulation_steps"], seed=widgets["seed"],
        mixed_precision="fp32" if widgets["training_dtype"] == "fp32" else "bf16",
        gradient_checkpointing=widgets["gradient_checkpointing"], save_state=True,
        output_dir=str(Path(folders.get_output_directory()) / "training"), output_name=f"train_lora_{fingerprint}")


def _contexts(positive: list, latent_count: int) -> list[torch.Tensor]:
    """The text embeddings of every entry of every CONDITIONING given, in order (ComfyUI's flattening):
    one for all latents or one per latent."""
    contexts = []
    for index, conditioning in enumerate(positive):
        if not isinstance(conditioning, list):
            raise ValueError(f"TrainLoraNode: positive[{index}]: expected a CONDITIONING (a list of [embeddings, "
                             f"options]), found {type(conditioning).__name__}")
        for embeddings, options in conditioning:
            if options.get("reference_latents"):
                raise ValueError("TrainLoraNode: positive: reference latents (edit training) are not supported in "
                                 "the graph; train edit pairs with `flux2 train`")
            contexts.append(embeddings)
    if len(contexts) not in (1, latent_count):
        raise ValueError(f"TrainLoraNode: positive: expected 1 conditioning entry or one per latent "
                         f"({latent_count}), found {len(contexts)}")
    return contexts


def existing_lora_file(name: str) -> tuple[Flux2LoRA | None, int]:
    """The LoRA `existing_lora` names in models/loras and the step count in its name (`_<N>_steps_`, as SaveLoRA
    writes it; 0 when the name has none); (None, 0) for [None]."""
    if name == NO_LORA:
        return None, 0
    try:
        path = folders.get_full_path_or_raise("loras", name)
    except FileNotFoundError as error:
        raise ValueError(f"TrainLoraNode: existing_lora: {error}") from None
    lora = load_lora(path)
    if lora.unmatched_keys:
        log.warning("TrainLoraNode: existing_lora %s: %d keys are not LoRA factors of DiT layers and are not "
                    "continued (e.g. %s)", name, len(lora.unmatched_keys), lora.unmatched_keys[0])
    counted = re.search(r"(\d+)_steps_", name)
    return lora, int(counted.group(1)) if counted else 0


def _single_rank(lora: Flux2LoRA) -> int:
    if len(lora.ranks) != 1:
        raise ValueError(f"TrainLoraNode: existing_lora: expected one rank for all layers, found ranks "
                         f"{sorted(rank for rank in lora.ranks if rank)} in {lora.name}")
    return next(iter(lora.ranks))


class LoraModelLoader:
    DESCRIPTION = "Applies a trained LoRA (LORA_MODEL) to a model."
    CATEGORY = "loaders"
    FUNCTION = "load_lora_model"
    EXPERIMENTAL = True
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model the LoRA is applied to."}),
            "lora": ("LORA_MODEL", {"tooltip": "The LoRA to apply."}),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                         "tooltip": "How strongly to apply it."}),
            "bypass": ("BOOLEAN", {"default": False, "tooltip": "LoRAs always run as hooks on this host."}),
        }}

    def load_lora_model(self, model: PatchedModel, lora: Flux2LoRA, strength_model: float,
                        bypass: bool = False) -> tuple[PatchedModel]:
        if strength_model == 0:
            return (model,)
        return (model.with_lora(lora, strength_model),)


class SaveLoRA:
    DESCRIPTION = "Saves a trained LoRA to the output folder (ComfyUI's key layout)."
    CATEGORY = "loaders"
    FUNCTION = "save"
    EXPERIMENTAL = True
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "lora": ("LORA_MODEL", {"tooltip": "The LoRA to save."}),
            "prefix": ("STRING", {"default": "loras/ComfyUI_trained_lora", "tooltip": "The file name prefix."}),
        }, "optional": {
            "steps": ("INT", {"tooltip": "Training steps, written into the file name."}),
        }}

    def save(self, lora: Flux2LoRA, prefix: str, steps: int | None = None) -> dict:
        if steps is not None:
            prefix = f"{prefix}_{steps}_steps"
        output = folders.get_output_directory()
        folder, filename, counter, subfolder, _ = folders.get_save_image_path(prefix, output)
        path = Path(folder) / f"{filename}_{counter:05}_.safetensors"
        atomic_save_lora(lora, path, "comfyui")
        return {"ui": {"lora": [{"filename": path.name, "subfolder": subfolder, "type": "output"}]}}


class LossGraphNode(PreviewImage):
    DESCRIPTION = "Plots the training loss per step and shows it as a preview image."
    CATEGORY = "training"
    FUNCTION = "plot_loss"
    EXPERIMENTAL = True
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "loss": ("LOSS_MAP", {"default": {}, "tooltip": "The loss map from TrainLoraNode."}),
            "filename_prefix": ("STRING", {"default": "loss_graph", "tooltip": "The file name prefix."}),
        }, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def plot_loss(self, loss: dict, filename_prefix: str, prompt: dict | None = None,
                  extra_pnginfo: dict | None = None) -> dict:
        values = [float(value) for value in loss.get("loss", [])]
        image = pil_to_image(loss_chart(values))
        return self.save_images(image, filename_prefix, prompt, extra_pnginfo)


NODE_CLASS_MAPPINGS = {"TrainLoraNode": TrainLoraNode, "LoraModelLoader": LoraModelLoader, "SaveLoRA": SaveLoRA,
                       "LossGraphNode": LossGraphNode}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainLoraNode": "Train LoRA", "LoraModelLoader": "Load LoRA Model",
                              "SaveLoRA": "Save LoRA Weights", "LossGraphNode": "Plot Loss Graph"}
