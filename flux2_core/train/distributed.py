"""Data-parallel LoRA training over several processes, launched by accelerate:

    accelerate launch --multi_gpu --num_processes 2 -m flux2_host.cli train CONFIG.toml
    flux2 train CONFIG.toml --num-processes 2      (the line above; on the CPU through torch.distributed.run)

The launcher starts the processes and accelerate's `PartialState` joins them into one process group (NCCL on GPUs,
gloo on the CPU), each on its own device. The run is split by micro-batch: micro-batch g (counted over the
whole run) is the g-th batch of the seeded batch order and draws its noise and sigmas from its own generator,
seeded by (seed, g); at step s rank r takes micro-batches (s * accumulation + k) * world + r. After backward the
adapter gradients are averaged over the ranks with an all-reduce (what DDP does; the adapters are small, so one
reduce per step after accumulation is cheap), then every rank clips and steps identically. So N processes with
accumulation A compute exactly what one process with accumulation N * A computes, up to summation order.

Caches are filled by rank 0 while the others wait, then read by all. Files (LoRA, states, samples) come from
rank 0 only; each other rank logs into `logs/rank-<r>/`. Full fine-tuning and distillation run on one process.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..errors import Flux2Error
from .config import FIELD_TYPES, TrainConfig
from .trainer import Trainer


def launched_distributed() -> bool:
    """True inside a multi-process launch (accelerate / torchrun set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class DistributedTrainer(Trainer):
    def __init__(self, config: TrainConfig, **kwargs: Any):
        from accelerate import PartialState

        if config.training_mode != "lora":
            raise Flux2Error(f"training_mode {config.training_mode!r}: several processes train adapters only; "
                             f"run it as one process")
        self.state = PartialState(cpu=config.device == "cpu")
        self.rank, self.world = self.state.process_index, self.state.num_processes
        if not self.state.is_main_process:
            base = Path(config.logging_dir) if config.logging_dir else Path(config.output_dir) / "logs"
            config = dataclasses.replace(config, logging_dir=str(base / f"rank-{self.rank}"))
        super().__init__(config, **kwargs)
        if config.device != "cpu":
            self.device = self.state.device
        if not self.state.is_main_process:
            self.log_stream = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the trainer)

    def prepare_caches(self, latents: bool = True, text: bool = True) -> list:
        """Rank 0 fills the caches; the others then find every file in place."""
        if self.state.is_main_process:
            items = super().prepare_caches(latents, text)
            self.state.wait_for_everyone()
            return items
        self.state.wait_for_everyone()
        return super().prepare_caches(latents, text)

    def load_model(self) -> None:
        """Every rank starts from rank 0's adapter weights (as DDP does at construction), sent once they are on
        the device (with blocks_to_swap they are made in CPU memory, which NCCL cannot send)."""
        super().load_model()
        if self.world > 1:
            with torch.no_grad():
                for param in self.trainable.parameters():
                    dist.broadcast(param.data, src=0)

    def _micro_batch(self, index: int) -> tuple[list[int], torch.Generator]:
        # Every epoch has the same number of batches (the buckets are fixed); only their order changes.
        self.epoch, position = divmod(index, len(self.data.epoch(0)))
        batches = self.data.epoch(self.epoch)
        self.position = position + 1
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + index)
        return batches[position], generator

    def train_step(self) -> tuple[float, float]:
        c = self.config
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros(())
        accumulation = c.gradient_accumulation_steps
        for k in range(accumulation):
            indices, generator = self._micro_batch((self.step * accumulation + k) * self.world + self.rank)
            batch = self.data.load(indices, generator)
            with self._autocast():
                per_sample, _ = self.objective(self.dit, batch, generator)
            loss = per_sample.mean() / accumulation
            loss.backward()
            total += loss.detach().cpu()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.world > 1:
            for param in params:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                dist.all_reduce(param.grad)
                param.grad /= self.world
            total = total.to(self.device)
            dist.all_reduce(total)
            total = total.cpu() / self.world
        if c.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        self.optimizer.step()
        self.scheduler.step()
        return float(total), grad_norm

    def save_lora(self, path: Path) -> Path:
        return super().save_lora(path) if self.state.is_main_process else path

    def save_state(self, directory: Path) -> Path:
        return super().save_state(directory) if self.state.is_main_process else directory

    def samples(self) -> list[Path]:
        return super().samples() if self.state.is_main_process else []


def launch_command(args: argparse.Namespace) -> int:
    """`flux2 train --num-processes N ...`: the same command in N processes: `accelerate launch --multi_gpu` on
    GPUs; on the CPU torch's own launcher (`torch.distributed.run`), since `accelerate launch --cpu` starts a
    single process without a config file."""
    options = [f"--{name}={getattr(args, name)}" for name in FIELD_TYPES if name in vars(args)]
    cpu = getattr(args, "device", "") == "cpu" or not torch.cuda.is_available()
    if cpu:
        launcher = ["torch.distributed.run", "--standalone", "--nproc_per_node", str(args.num_processes)]
    else:
        launcher = ["accelerate.commands.launch", "--multi_gpu", "--num_processes", str(args.num_processes),
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command = [sys.executable, "-m", *launcher, "-m", "flux2_host.cli", "train",
               *([args.config] if args.config else []), *options]
    return subprocess.call(command)
