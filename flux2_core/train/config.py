"""Every training option in one dataclass, read from TOML and from musubi-tuner style command-line names.

Field names are musubi-tuner's where it has the option (`network_dim`, `timestep_sampling`, `fp8_base`,
`blocks_to_swap`, ...), so its command lines and config files carry over. `defaults_for(variant)` gives the
per-variant defaults `flux2 train --print-config VARIANT` writes out.
"""

from __future__ import annotations

import dataclasses
import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Flux2Error
from ..variants import VARIANTS

log = logging.getLogger(__name__)

# musubi-tuner's --model_version names -> this project's variant names.
MODEL_VERSIONS = {"dev": "flux2-dev", "flux2-dev": "flux2-dev", "klein-4b": "klein-4b", "klein-9b": "klein-9b",
                  "klein-base-4b": "klein-base-4b", "klein-base-9b": "klein-base-9b"}

NETWORK_TYPES = ("lora", "lokr", "loha")
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
TIMESTEP_SAMPLINGS = ("flux2_shift", "shift", "sigmoid", "uniform", "logit_normal", "diffsynth")
WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "cosmap")
DISTRIBUTED_STRATEGIES = ("ddp", "fsdp")

# Every linear layer of the double and single blocks (BFL names): musubi-tuner's FLUX.2 LoRA targets.
# The embedders, modulations and final layer stay frozen, as in both peer tools.
BLOCK_LINEARS = (r"(double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02])"
                 r"|single_blocks\.\d+\.linear[12])")


@dataclass
class TrainConfig:
    # models
    dit: str = ""
    vae: str = ""
    text_encoder: str = ""
    model_version: str = ""  # musubi's --model_version; "" = from the DiT file (name, metadata, shapes)
    preview_dit: str = ""  # optional second DiT the samples are drawn with (e.g. distilled klein)
    # data
    dataset_config: str = ""  # musubi dataset TOML, a DiffSynth metadata file, or a folder of images + .txt
    caption_extension: str = ".txt"
    resolution: int = 1024  # training area is resolution^2 unless the dataset says otherwise
    caption_dropout_rate: float = 0.0
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0  # leading caption parts kept in place when shuffling
    cache_directory: str = ""  # default: <output_dir>/cache
    skip_existing: bool = True
    # output
    output_dir: str = "output"
    output_name: str = "flux2-lora"
    save_every_n_steps: int = 0
    save_every_n_epochs: int = 0
    save_state: bool = False
    resume: str = ""
    logging_dir: str = ""  # TensorBoard + CSV; default: <output_dir>/logs
    # network
    network_type: str = "lora"
    network_dim: int = 16
    network_alpha: float = 16.0
    network_dropout: float = 0.0
    use_rslora: bool = False
    lokr_factor: int = -1
    target_modules: str = BLOCK_LINEARS
    # optimisation
    max_train_steps: int = 1000
    max_train_epochs: int = 0
    learning_rate: float = 1e-4
    optimizer_type: str = "adamw"
    weight_decay: float = 0.01
    # LoRA+ (kohya's / musubi's network_args name): the B matrices learn this many times faster than the A
    # matrices (0 = off, every adapter weight at learning_rate); 4-16 is the range the LoRA+ paper recommends.
    loraplus_lr_ratio: float = 0.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    seed: int = 42
    # objective
    timestep_sampling: str = "flux2_shift"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    weighting_scheme: str = "none"
    guidance_scale: float = 1.0  # the dev DiT's guidance input during training
    # precision and memory
    device: str = ""  # default: cuda if available
    mixed_precision: str = "bf16"  # autocast dtype on GPU; CPU always computes fp32
    fp8_base: bool = False
    gradient_checkpointing: bool = False
    offload_activations: bool = False  # keep saved activations in (pinned) CPU memory during the backward pass
    blocks_to_swap: int = 0
    # samples
    sample_prompts: str = ""
    sample_every_n_steps: int = 0
    sample_every_n_epochs: int = 0
    sample_at_first: bool = False
    # --- part 2 hook: full fine-tuning and differential LoRA (train/full_finetune.py, train/differential.py) ---
    training_mode: str = "lora"  # "lora": adapters; "full": the DiT's own weights; "distill": adapters, few-step
    full_train_params: str = ""  # full: regex searched in parameter names (e.g. "single_blocks"); empty = all
    optimizer_on_cpu: bool = False  # full: fp32 master weights, their gradients and the optimizer state on the CPU
    save_dtype: str = "bf16"  # full: stored dtype of the saved DiT ("bf16", "fp16", "fp32")
    save_fp8: str = ""  # full: "" or an fp8 layout for the saved DiT ("bfl-fp8", "comfyui-fp8-mixed")
    preset_lora: str = ""  # differential LoRA: merged into the base before training, not saved with the result
    preset_lora_strength: float = 1.0
    distill_teacher: str = ""  # distill: the teacher DiT (default: `dit` itself, before the adapters)
    distill_teacher_lora: str = ""  # distill: a LoRA the teacher runs with
    distill_teacher_lora_strength: float = 1.0
    distill_teacher_steps: int = 50
    distill_teacher_cfg: float = 4.0
    distill_student_steps: int = 4
    distill_seeds: int = 8  # distill: seeds 0..n-1 per caption get teacher targets
    fp8_scale: str = "tensor"  # fp8_base: one scale per weight ("tensor") or per output row ("row")
    # fp8 layers: scaled fp8 matmuls in forward and input gradient where the GPU has fp8 tensor cores, else
    # dequantize-then-matmul (train/fp8_training.py). Off by default: it quantizes activations and gradients too.
    fp8_matmul: bool = False
    # several processes (train/distributed.py): "ddp" replicates the DiT on every process; "fsdp" (full fine-tunes)
    # shards its weights, gradients and optimizer state over them (train/fsdp.py)
    distributed_strategy: str = "ddp"
    # --- end of part 2 hook ---
    extra: dict[str, Any] = field(default_factory=dict)  # unknown TOML keys, kept for the metadata

    @property
    def variant(self) -> str | None:
        """This project's variant name, or None when it is to be read from the DiT file."""
        return MODEL_VERSIONS[self.model_version] if self.model_version else None

    def validate(self) -> TrainConfig:
        choices = {"model_version": MODEL_VERSIONS, "network_type": NETWORK_TYPES, "optimizer_type": OPTIMIZERS,
                   "lr_scheduler": LR_SCHEDULERS, "timestep_sampling": TIMESTEP_SAMPLINGS,
                   "weighting_scheme": WEIGHTING_SCHEMES, "distributed_strategy": DISTRIBUTED_STRATEGIES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed and not (name == "model_version" and self.model_version == ""):
                raise Flux2Error(f"train config {name}: expected one of {sorted(allowed)}, found {getattr(self, name)!r}")
        for name in ("dit", "vae", "text_encoder", "dataset_config"):
            if not getattr(self, name):
                raise Flux2Error(f"train config {name}: a path is required")
        if self.network_dim < 1 or self.max_train_steps < 1 or self.gradient_accumulation_steps < 1:
            raise Flux2Error("train config: network_dim, max_train_steps and gradient_accumulation_steps must be >= 1")
        if self.mixed_precision not in ("bf16", "fp32"):
            raise Flux2Error(f"train config mixed_precision: expected 'bf16' or 'fp32', found {self.mixed_precision!r}")
        if self.loraplus_lr_ratio < 0:
            raise Flux2Error(f"train config loraplus_lr_ratio: expected 0 (off) or a positive ratio, found "
                             f"{self.loraplus_lr_ratio}")
        if self.loraplus_lr_ratio and self.training_mode == "full":
            raise Flux2Error("train config loraplus_lr_ratio: LoRA+ applies to adapters; a full fine-tune "
                             "(training_mode = 'full') trains the DiT's own weights (set loraplus_lr_ratio = 0)")
        if self.loraplus_lr_ratio and self.network_type != "lora":
            raise Flux2Error(f"train config loraplus_lr_ratio: LoRA+ sets the learning rate of LoRA's B matrices; "
                             f"network_type {self.network_type!r} has none (use network_type = 'lora' or "
                             f"loraplus_lr_ratio = 0)")
        if not 0.0 <= self.caption_dropout_rate <= 1.0:
            raise Flux2Error(f"train config caption_dropout_rate: expected 0..1, found {self.caption_dropout_rate}")
        return self

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}


FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(TrainConfig) if f.name != "extra"}


def defaults_for(variant: str) -> TrainConfig:
    """The defaults written out for a variant: every variant trains at 1024^2 with gradient checkpointing; dev
    with an fp8 base (block swap stays 0: it trades speed for memory, so it is asked for, not assumed)."""
    if variant not in MODEL_VERSIONS:
        raise Flux2Error(f"variant: expected one of {sorted(MODEL_VERSIONS)}, found {variant!r}")
    config = TrainConfig(model_version=variant, gradient_checkpointing=True)
    if MODEL_VERSIONS[variant] == "flux2-dev":
        config.fp8_base = True
    if VARIANTS[MODEL_VERSIONS[variant]].steps == 4:
        # Distilled models: LoRAs trained on them tend to grey out; a low LR limits the damage.
        config.learning_rate = 5e-5
    return config


def coerce(name: str, value: Any) -> Any:
    """A TOML or command-line value converted to the field's type (names the field when it cannot be)."""
    kind = FIELD_TYPES[name]
    try:
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes")
            return bool(value)
        return {"int": int, "float": float, "str": str}[kind](value)
    except (ValueError, TypeError):
        raise Flux2Error(f"train config {name}: expected a value of type {kind}, found {value!r}") from None


def config_from_mapping(values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    config = dataclasses.replace(base) if base is not None else TrainConfig()
    for name, value in values.items():
        if name in FIELD_TYPES:
            setattr(config, name, coerce(name, value))
        else:
            log.warning("train config: unknown option %r ignored", name)
            config.extra[name] = value
    return config


def load_config(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
    """A training TOML: top-level keys are TrainConfig fields (tables are flattened, so [network] etc. may group
    them); relative paths stay relative to the working directory, as in musubi-tuner."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise Flux2Error(f"{path}: cannot read the training config: {error}") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return config_from_mapping(flat, base)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_to_toml(config: TrainConfig) -> str:
    lines = [f"# flux2 train config ({config.model_version}); every option with its value"]
    lines += [f"{name} = {_toml_value(value)}" for name, value in config.as_dict().items()]
    return "\n".join(lines) + "\n"
