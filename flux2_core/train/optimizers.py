"""Optimizers and learning-rate schedules by name.

adamw: torch.optim.AdamW (fused kernels on CUDA); adamw8bit: bitsandbytes' AdamW8bit (CUDA only);
adafactor: transformers' Adafactor with a fixed learning rate; prodigy: prodigyopt's Prodigy (learning rate ~1).
Schedules are transformers' `get_scheduler` (constant, constant_with_warmup, linear, cosine, ...), stepped once
per optimizer step; "constant" with warmup steps means constant after a linear warmup.
"""

from __future__ import annotations

from typing import Iterable

import torch

from ..errors import Flux2Error
from .config import TrainConfig


def loraplus_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], learning_rate: float,
                    ratio: float) -> list[dict]:
    """LoRA+ (Hayou et al., 2024): two parameter groups, LoRA's B matrices at `ratio` x `learning_rate` and the
    rest at `learning_rate`. With B starting at zero, one learning rate for both is inefficient at large width:
    B's updates are what moves the output, and they stay small while A's are as large as they can safely be."""
    faster, rest = [], []
    for name, param in named_params:
        (faster if ".lora_B." in name else rest).append(param)
    if not faster:
        raise Flux2Error("loraplus_lr_ratio: the trained adapters have no LoRA B matrix (lora_B) to speed up")
    return [{"params": rest, "lr": learning_rate}, {"params": faster, "lr": learning_rate * ratio}]


def make_optimizer(config: TrainConfig, params: Iterable[torch.nn.Parameter] | list[dict], device: torch.device):
    """The named optimizer over `params`: parameters, or parameter groups (dicts with their own "lr")."""
    params = list(params)
    lr, decay = config.learning_rate, config.weight_decay
    name = config.optimizer_type
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=decay, fused=device.type == "cuda")
    if name == "adamw8bit":
        if device.type != "cuda":
            raise Flux2Error(f"optimizer_type adamw8bit: bitsandbytes' 8-bit AdamW runs on CUDA GPUs only, and this "
                             f"run's device is {device}; use adamw or adafactor on the CPU")
        try:
            import bitsandbytes
        except ImportError:
            raise Flux2Error("optimizer_type adamw8bit needs bitsandbytes (pip install bitsandbytes)") from None
        return bitsandbytes.optim.AdamW8bit(params, lr=lr, weight_decay=decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor
        return Adafactor(params, lr=lr, weight_decay=decay, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise Flux2Error("optimizer_type prodigy needs prodigyopt (pip install prodigyopt)") from None
        return Prodigy(params, lr=lr, weight_decay=decay)
    raise Flux2Error(f"optimizer_type: unknown optimizer {name!r}")


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer):
    from transformers import get_scheduler

    name = config.lr_scheduler
    if name == "constant" and config.lr_warmup_steps:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=config.lr_warmup_steps,
                         num_training_steps=config.max_train_steps)
