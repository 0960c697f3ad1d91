"""Data-parallel training over several processes with accelerate:

    accelerate launch --multi_gpu --num_processes 2 -m flux2_host.cli train CONFIG.toml
    flux2 train CONFIG.toml --num-processes 2      (the line above, on GPUs or on the CPU)

The launcher starts the processes and sets the torch.distributed variables (WORLD_SIZE, RANK, MASTER_ADDR...);
`make_trainer` sees WORLD_SIZE > 1 and builds a `DistributedTrainer`, whose `accelerate.Accelerator` joins the
process group (NCCL on GPUs, gloo on the CPU) and prepares the DiT (DistributedDataParallel: it starts every
process from rank 0's weights and averages the trained weights' gradients in backward) and the micro-batch
loader (accelerate's batch-sampler sharding: process r takes the run's micro-batches g with g mod N = r). The
run's micro-batch order and random draws are global (`dataloader.micro_batch_loader`), gradients are
synchronised only on the last micro-batch of a step and the loss is divided by the accumulation, so N processes
with accumulation A compute what one process with accumulation N * A computes, up to summation order, and a
state saved with one process count resumes with another.

Caches are filled by rank 0 while the others wait at a barrier, then read by all. Files (LoRA / DiT, states,
samples) come from rank 0 only; each other rank logs its losses into `logs/rank-<r>/`. LoRA / LoKr / LoHa and
full fine-tunes train this way (DDP); distillation runs on one process. A full fine-tune with
`distributed_strategy = "fsdp"` shards the DiT instead (fsdp.py, FSDP2 called directly: accelerate 1.16 enables
its FSDP plugin on GPUs only). DeepSpeed ZeRO is not driven: a launch that asks for accelerate's FSDP plugin or
for DeepSpeed is refused rather than trained in another mode than asked.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.util
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import Flux2Error
from .config import FIELD_TYPES, TrainConfig
from .full_finetune import FullFineTuner
from .trainer import Trainer

CACHE_WAIT_HOURS = 12


def launched_distributed() -> bool:
    """True inside a multi-process launch (accelerate launch / torchrun set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _refuse_unsupported_launch() -> None:
    """accelerate launch --use_fsdp / --use_deepspeed set these; say what happens instead of training otherwise."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        if importlib.util.find_spec("deepspeed") is None:
            raise Flux2Error("accelerate launch --use_deepspeed: DeepSpeed ZeRO needs the `deepspeed` package, which "
                             "is not installed (pip install deepspeed), and this trainer does not drive it yet; "
                             "launch with --multi_gpu for DDP")
        raise Flux2Error("accelerate launch --use_deepspeed: this trainer does not drive DeepSpeed ZeRO yet; "
                         "launch with --multi_gpu for DDP")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise Flux2Error("accelerate launch --use_fsdp: this trainer shards with its own FSDP rather than "
                         "accelerate's plugin (which is GPU-only); launch with --multi_gpu and set "
                         "distributed_strategy = \"fsdp\" (full fine-tunes)")


class DistributedTrainer(Trainer):
    """`Trainer` whose processes are joined by accelerate (`Trainer`'s part 2 hooks, filled in)."""

    def __init__(self, config: TrainConfig, **kwargs: Any):
        from accelerate import Accelerator, InitProcessGroupKwargs

        if config.training_mode == "distill":
            raise Flux2Error("training_mode 'distill': distillation runs on one process; launch it without "
                             "--num-processes / accelerate launch")
        if config.blocks_to_swap:
            raise Flux2Error("blocks_to_swap over several processes: DDP needs every weight on the process's GPU; "
                             "use fp8_base / gradient_checkpointing, or train on one process")
        _refuse_unsupported_launch()
        # Mixed precision stays the trainer's own autocast (bf16 on GPUs, fp32 on the CPU). The other ranks wait
        # at a barrier while rank 0 fills the caches (hours for a large data set): a long collective timeout.
        self.accelerator = Accelerator(cpu=config.device == "cpu", mixed_precision="no", kwargs_handlers=[
            InitProcessGroupKwargs(timeout=datetime.timedelta(hours=CACHE_WAIT_HOURS))])
        self.process_count = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        if not self.is_main:
            base = Path(config.logging_dir) if config.logging_dir else Path(config.output_dir) / "logs"
            config = dataclasses.replace(config, logging_dir=str(base / f"rank-{self.rank}"))
        super().__init__(config, **kwargs)
        if config.device != "cpu":
            self.device = self.accelerator.device  # one GPU per process
        if not self.is_main:
            self.log_stream = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the trainer)
        self.wrapped = None

    def prepare_caches(self, latents: bool = True, text: bool = True) -> list:
        """Rank 0 fills the caches; the others then find every file in place."""
        if self.is_main:
            items = super().prepare_caches(latents, text)
        self.accelerator.wait_for_everyone()
        if not self.is_main:
            items = super().prepare_caches(latents, text)
        return items

    def prepare(self) -> None:
        super().prepare()
        self.wrapped = self.wrap_model()

    def wrap_model(self) -> torch.nn.Module | None:
        """The module the objective calls, wrapping the DiT (None: the DiT itself). The DiT stays where the trainer
        put it (device_placement=False); building DDP broadcasts rank 0's parameters, adapters included, so every
        process starts from the same weights."""
        return self.accelerator.prepare_model(self.dit, device_placement=False)

    @property
    def model(self) -> torch.nn.Module:
        return self.wrapped if self.wrapped is not None else self.dit

    def micro_batch_loader(self, start: int, count: int):
        return self.accelerator.prepare_data_loader(super().micro_batch_loader(start, count), device_placement=False)

    def _cancelled(self) -> bool:
        """Stop when any process was asked to (SIGTERM, cancel): all stop at the same step, since one left
        behind in a step's collective would wait for the others until the timeout."""
        asked = torch.tensor(float(super()._cancelled()), device=self.accelerator.device)
        return bool(self.accelerator.reduce(asked, "sum") > 0)

    def gradient_sync(self, last: bool):
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.wrapped)

    def mean_over_processes(self, value: float) -> float:
        return float(self.accelerator.reduce(torch.tensor(value, device=self.accelerator.device), "mean"))

    def save_lora(self, path: Path) -> Path:
        return super().save_lora(path) if self.is_main else path

    def save_state(self, directory: Path) -> Path:
        return super().save_state(directory) if self.is_main else directory

    def samples(self) -> list[Path]:
        return super().samples() if self.is_main else []

    def close(self) -> None:
        """Every process together: drop the model and optimizer first (DDP's buckets and FSDP's shards hold the
        process group; one left alive past it aborted a rank at exit), wait for all (rank 0 hosts the rendezvous
        store, which must outlive the others' use of it), then destroy the process group."""
        self.wrapped = self.dit = self.trainable = self.optimizer = self.scheduler = self.stream = None
        self.accelerator.free_memory()  # accelerate's own references to the prepared model and loaders
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()


class DistributedFullFineTuner(DistributedTrainer, FullFineTuner):
    """A full fine-tune (`FullFineTuner`) over several processes, DDP like the adapters. DDP averages the trained
    weights' gradients at the end of backward, so bf16 weights keep their gradients until the step is complete
    and only then hand them to their fp32 masters (one process moves each micro-batch's gradient at once)."""

    move_gradients_in_backward = False

    def gradients_ready(self) -> None:
        self.trainable.move_gradients()


def make_distributed_trainer(config: TrainConfig, **kwargs: Any) -> Trainer:
    if config.distributed_strategy == "fsdp":
        from .fsdp import FsdpFullFineTuner

        return FsdpFullFineTuner(config, **kwargs)
    return (DistributedFullFineTuner if config.training_mode == "full" else DistributedTrainer)(config, **kwargs)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(args: argparse.Namespace) -> int:
    """`flux2 train --num-processes N ...`: the same command in N processes through `accelerate launch
    --multi_gpu` (one process per GPU; on a machine without GPUs accelerate runs the N processes on the CPU
    with gloo; its `--cpu` flag would start a single process). The rendezvous port is a free one, so several
    runs can share a machine."""
    options = [f"--{name}={getattr(args, name)}" for name in FIELD_TYPES if name in vars(args)]
    launcher = ["accelerate.commands.launch", "--multi_gpu", "--num_processes", str(args.num_processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port())]
    command = [sys.executable, "-m", *launcher, "-m", "flux2_host.cli", "train",
               *([args.config] if args.config else []), *options]
    launch = subprocess.Popen(command)
    # SIGTERM (a scheduler stopping the job) goes on to the launcher, which passes it to every process: they
    # agree on the step to stop at and rank 0 saves a resumable state. (Ctrl-C reaches them all directly.)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: launch.send_signal(signal.SIGTERM))
    try:
        while True:
            try:
                return launch.wait()
            except KeyboardInterrupt:
                continue  # the processes save their state and exit; wait for them
    finally:
        signal.signal(signal.SIGTERM, previous)
