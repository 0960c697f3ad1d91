"""Full fine-tuning: the DiT's own weights (all, or those whose names match `full_train_params`) are trained with
part 1's loop, data, caches, resume, samples and logs; the output is a whole DiT in the BFL single-file layout
(`checkpoints.writers.save_dit`, optionally fp8), which `load_dit` and ComfyUI's UNETLoader read.

Precision: bf16 weights get fp32 master copies. Each trained bf16 weight's gradient is moved into its fp32
master as soon as backward has accumulated it (a post-accumulate-grad hook, which also frees the bf16
gradient); the optimizer steps the masters; after each step the masters are rounded back into the bf16 weights
the forward pass uses. We chose masters over stochastic rounding because the update is then exact (an update
below bf16's resolution is not lost, and no second random stream is needed, so resume stays bit-exact) at the
cost of 4 bytes per trained parameter, which `optimizer_on_cpu` moves to the CPU together with the optimizer
state (the step then runs on the CPU). fp32 weights (CPU runs) are trained in place, without masters.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..checkpoints.quant import Fp8Linear
from ..checkpoints.writers import SAVE_FP8_LAYOUTS, dit_file_tensors
from ..devices import resolve_dtype
from ..errors import Flux2Error
from .checkpointing import atomic_save_file
from .config import TrainConfig
from .optimizers import make_optimizer
from .trainer import Trainer

TRAINING_MODES = ("lora", "full", "distill")


def _check_config(config: TrainConfig) -> None:
    if config.fp8_base:
        raise Flux2Error("train config fp8_base: fp8 weights cannot be trained; a full fine-tune "
                         "(training_mode = \"full\") needs bf16/fp32 weights (use fp8_base with LoRA training)")
    if config.preset_lora:
        raise Flux2Error("train config preset_lora: a differential preset applies to LoRA training; for a full "
                         "fine-tune merge it into the base first")
    if config.preview_dit:
        raise Flux2Error("train config preview_dit: samples of a full fine-tune are drawn with the trained DiT itself")
    if config.save_fp8 and config.save_fp8 not in SAVE_FP8_LAYOUTS:
        raise Flux2Error(f"train config save_fp8: expected \"\" or one of {SAVE_FP8_LAYOUTS}, found {config.save_fp8!r}")
    try:
        re.compile(config.full_train_params)
    except re.error as error:
        raise Flux2Error(f"train config full_train_params {config.full_train_params!r}: not a regex ({error})") from None


class FullTrainable:
    """The trained weights of a DiT with their fp32 masters; the trainable set `Trainer` drives."""

    def __init__(self, dit: nn.Module, pattern: str = "", master_device: torch.device | None = None,
                 move_in_backward: bool = True, weight_device: torch.device | None = None):
        """`weight_device`: where the weights will train (default: where they are now; the trainer builds the
        trainable set in CPU memory when blocks swap and moves the DiT afterwards). `master_device`: where the
        fp32 masters live (default: beside the weights)."""
        fp8 = [name for name, module in dit.named_modules() if isinstance(module, Fp8Linear)]
        if fp8:
            raise Flux2Error(f"full fine-tune: the DiT holds fp8 layers ({fp8[:3]}); load it in bf16/fp32")
        dit.requires_grad_(False)
        self.dit = dit
        self.weights = {name: param for name, param in dit.named_parameters() if re.search(pattern, name)}
        if not self.weights:
            raise Flux2Error(f"train config full_train_params {pattern!r} matches no parameter of the DiT "
                             f"(names look like {next(iter(dict(dit.named_parameters())))!r})")
        self.masters: dict[str, nn.Parameter] = {}
        for name, weight in self.weights.items():
            weight.requires_grad_(True)
            trains_on = weight_device or weight.device
            device = master_device or trains_on
            if weight.dtype != torch.float32 or device != trains_on:
                master = nn.Parameter(weight.detach().to(device, torch.float32, copy=True))
                self.masters[name] = master
                if move_in_backward:
                    weight.register_post_accumulate_grad_hook(self._gradient_mover(master))

    @staticmethod
    def _gradient_mover(master: nn.Parameter):
        def move(weight: torch.Tensor) -> None:
            gradient = weight.grad.to(master.device, torch.float32)
            master.grad = gradient if master.grad is None else master.grad.add_(gradient)
            weight.grad = None
        return move

    def move_gradients(self) -> None:
        """Without `move_in_backward` (DDP averages the weights' own gradients at the end of backward, after the
        hook would have run): the step's gradients, complete, into the masters."""
        for name, master in self.masters.items():
            weight = self.weights[name]
            if weight.grad is not None:
                master.grad = weight.grad.to(master.device, torch.float32)
                weight.grad = None

    @property
    def parameter_count(self) -> int:
        return sum(weight.numel() for weight in self.weights.values())

    def parameters(self) -> Iterator[nn.Parameter]:
        return (self.masters.get(name, weight) for name, weight in self.weights.items())

    @torch.no_grad()
    def copy_masters_to_weights(self) -> None:
        for name, master in self.masters.items():
            self.weights[name].copy_(master)

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        """Round the masters into the model's weights after every optimizer step."""
        if self.masters:
            optimizer.register_step_post_hook(lambda *_: self.copy_masters_to_weights())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: param.detach().float().cpu().clone() for name, param in zip(self.weights, self.parameters())}

    def check_names(self, tensors: dict[str, torch.Tensor]) -> None:
        """A training state's trained tensors must be this run's trained weights."""
        if set(tensors) != set(self.weights):
            missing, extra = sorted(set(self.weights) - set(tensors)), sorted(set(tensors) - set(self.weights))
            raise Flux2Error(f"training state: trained weights do not match this run's (missing {missing[:3]}, "
                             f"unexpected {extra[:3]})")

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.check_names(tensors)
        with torch.no_grad():
            for name, param in zip(self.weights, self.parameters()):
                param.copy_(tensors[name])
        self.copy_masters_to_weights()


class FullFineTuner(Trainer):
    """`Trainer` with the DiT's weights as the trainable set and a whole DiT as the output file."""

    def __init__(self, config: TrainConfig, **kwargs: Any):
        _check_config(config)
        super().__init__(config, **kwargs)

    move_gradients_in_backward = True  # several processes: after DDP's average (distributed.py)
    trainable_class = FullTrainable  # FSDP (fsdp.py): one whose state is gathered from the shards

    def make_trainable(self) -> FullTrainable:
        master_device = torch.device("cpu") if self.config.optimizer_on_cpu else None
        trainable = self.trainable_class(self.dit, self.config.full_train_params, master_device,
                                         self.move_gradients_in_backward, self.device)
        print(f"full fine-tune: {trainable.parameter_count:,} trained parameters in {len(trainable.weights)} tensors"
              f"{', fp32 masters' if trainable.masters else ''}"
              f"{' and optimizer on the CPU' if self.config.optimizer_on_cpu else ''}", file=self.log_stream)
        return trainable

    def make_optimizer(self, params: list[nn.Parameter]):
        device = torch.device("cpu") if self.config.optimizer_on_cpu else self.device
        optimizer = make_optimizer(self.config, params, device)
        self.trainable.bind(optimizer)
        return optimizer

    def metadata(self) -> dict[str, str]:
        c = self.config
        lora_only = ("ss_network_module", "ss_network_dim", "ss_network_alpha")
        metadata = {key: value for key, value in super().metadata().items() if key not in lora_only}
        metadata["modelspec.architecture"] = f"flux-2-{c.variant}"
        metadata["flux2_training_mode"] = json.dumps({"mode": "full", "params": c.full_train_params or "all",
                                                      "trained_parameters": self.trainable.parameter_count})
        return metadata

    def lora(self):
        raise Flux2Error("a full fine-tune has no LoRA; extract one with `flux2 lora extract BASE TUNED --rank R`")

    def save_lora(self, path: Path) -> Path:
        """Every save of the loop (step, epoch, final) writes the whole DiT, atomically."""
        return self.write_dit(path)

    def write_dit(self, path: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """The DiT file; `state`: its tensors gathered whole when the DiT itself holds only a shard of them."""
        c = self.config
        tensors, metadata = dit_file_tensors(self.dit, resolve_dtype(c.save_dtype, "cpu"), c.save_fp8 or None,
                                             metadata=self.metadata(), state=state)
        atomic_save_file(tensors, path, metadata)
        print(f"saved {path}", file=self.log_stream)
        return Path(path)


def make_trainer(config: TrainConfig, **kwargs: Any) -> Trainer:
    """The trainer for `config.training_mode`: `Trainer` (adapters), `FullFineTuner` or `distill.DistillTrainer`;
    `distributed.DistributedTrainer` inside a multi-process launch."""
    if config.training_mode not in TRAINING_MODES:
        raise Flux2Error(f"train config training_mode: expected one of {TRAINING_MODES}, found {config.training_mode!r}")
    from .distributed import launched_distributed, make_distributed_trainer

    if launched_distributed():
        return make_distributed_trainer(config, **kwargs)
    if config.training_mode == "distill":
        from .distill import DistillTrainer
        return DistillTrainer(config, **kwargs)
    return (FullFineTuner if config.training_mode == "full" else Trainer)(config, **kwargs)
