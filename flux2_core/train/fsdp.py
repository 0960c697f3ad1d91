"""Full fine-tunes sharded over several processes with PyTorch FSDP2 (`distributed_strategy = "fsdp"`):

    flux2 train CONFIG.toml --training_mode full --distributed_strategy fsdp --num-processes 8

DDP (the default) keeps the whole DiT, its gradients and its optimizer state on every process; FSDP keeps 1/N of
each. Every double and single block is one FSDP unit (`torch.distributed.fsdp.fully_shard`), the weights outside
the blocks (embedders, modulations, final layer) are the root's unit: a unit's weights are all-gathered just
before its forward and its backward and freed after, its gradient is reduce-scattered so each process keeps the
average of its own shard, and the optimizer steps the shards. The sharded weights are fp32 and are the master
weights; on CUDA with `mixed_precision = "bf16"` each unit is gathered in bf16 and its gradients reduced in fp32
(`MixedPrecisionPolicy`), on the CPU everything is fp32.

We call FSDP2 directly rather than through accelerate's FSDP plugin: accelerate (1.16) turns its plugin off on
the CPU and gives the model DDP instead, while `fully_shard` runs the same code on gloo (CPU) and NCCL (GPUs), so
the CPU tests exercise what a GPU run does. accelerate still starts the processes, joins them, shards the
micro-batches and reduces the logged loss (distributed.py).

Gradients are reduce-scattered after every micro-batch, not only after the last of a step as DDP does: skipping
the reduction would keep an unsharded fp32 gradient of every weight until the step ends, as much memory as DDP.

Files: the DiT (BFL single file) and the training state are gathered whole into rank 0's CPU memory
(`get_model_state_dict` / `get_optimizer_state_dict` with full_state_dict), every process taking part, and
written by rank 0 in the format one process writes (the optimizer state numbered as `Optimizer.state_dict`
numbers it), so a state resumes with any process count, FSDP or not; on resume every process reads the file
and keeps its shard. Each process reads the DiT file into CPU memory and converts one block at a time to fp32
before sharding it, so a run needs the DiT's size in CPU memory per process.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import Flux2Error
from .checkpointing import save_training_state
from .config import TrainConfig
from .distributed import DistributedFullFineTuner
from .fp8_training import load_training_dit
from .full_finetune import FullTrainable


def _full_state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Whole tensors, gathered into rank 0's CPU memory (the other ranks get an empty dict).
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_dit(dit: nn.Module, device: torch.device, compute_dtype: torch.dtype) -> int:
    """Shard `dit` (in CPU memory) over every process of the default process group, each block its own unit and
    the rest the root's, onto `device`; returns the number of blocks. The weights become fp32 shards; with a
    lower `compute_dtype` they are gathered in it and their gradients reduced in fp32."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                                  reduce_dtype=torch.float32)
    blocks = [*dit.double_blocks, *dit.single_blocks]
    for block in blocks:
        block.to(torch.float32)  # one block at a time: the CPU holds the file's dtype plus one fp32 block
        fully_shard(block, mesh=mesh, mp_policy=policy)
    dit.to(torch.float32)
    # The root's weights are needed again as soon as backward starts: keep them gathered between the two.
    fully_shard(dit, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return len(blocks)


class ShardedFullTrainable(FullTrainable):
    """`FullTrainable` over a sharded DiT: its state is gathered whole from the shards (a collective: every
    process calls it; rank 0 gets the tensors, the others an empty dict), and loaded into them from whole
    tensors every process holds."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(self.dit, options=_full_state_options())
        return {name: full[name].float() for name in self.weights} if full else {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        self.check_names(tensors)
        set_model_state_dict(self.dit, tensors, options=StateDictOptions(full_state_dict=True, strict=False))


def _renamed(optimizer_state: dict[str, Any], key_of: dict) -> dict[str, Any]:
    """An optimizer state dict with its parameter keys mapped through `key_of`: torch's numbering (what one
    process saves) <-> weight names (what the full-state helpers of torch.distributed.checkpoint use)."""
    return {"state": {key_of[key]: value for key, value in optimizer_state["state"].items()},
            "param_groups": [{**group, "params": [key_of[key] for key in group["params"]]}
                             for group in optimizer_state["param_groups"]]}


def _check_config(config: TrainConfig) -> None:
    if config.training_mode != "full":
        raise Flux2Error(f"train config distributed_strategy 'fsdp': shards a full fine-tune (training_mode = "
                         f"\"full\"), found training_mode {config.training_mode!r}; adapters train with 'ddp'")
    if config.optimizer_type != "adamw":
        raise Flux2Error(f"train config optimizer_type {config.optimizer_type!r} with distributed_strategy 'fsdp': "
                         f"only 'adamw' steps sharded weights here (8-bit, factored and Prodigy states are not "
                         f"sharding-aware)")
    if config.optimizer_on_cpu:
        raise Flux2Error("train config optimizer_on_cpu with distributed_strategy 'fsdp': FSDP already divides the "
                         "optimizer state by the process count; set optimizer_on_cpu = false")
    if config.sample_prompts and (config.sample_every_n_steps or config.sample_every_n_epochs
                                  or config.sample_at_first):
        raise Flux2Error("train config sample_prompts with distributed_strategy 'fsdp': samples are not drawn from "
                         "a sharded DiT; draw them from the saved DiT file (save_every_n_steps)")


class FsdpFullFineTuner(DistributedFullFineTuner):
    """A full fine-tune whose DiT is sharded over the processes (see the module's docstring)."""

    trainable_class = ShardedFullTrainable

    def __init__(self, config: TrainConfig, **kwargs: Any):
        _check_config(config)
        super().__init__(config, **kwargs)

    def load_model(self) -> None:
        c = self.config
        # Read into CPU memory; `shard_dit` moves each unit's shard to this process's device.
        self.dit = load_training_dit(c, self.device, self.dtype, self.log_stream, torch.device("cpu"),
                                     shards=self.process_count)
        self.variant = self.dit.variant
        blocks = shard_dit(self.dit, self.device, self.dtype)
        print(f"fsdp: {blocks} blocks + the root sharded over {self.process_count} processes (fp32 shards"
              f"{', gathered in ' + str(self.dtype).removeprefix('torch.') if self.dtype != torch.float32 else ''})",
              file=self.log_stream)
        self.trainable = self.make_trainable()

    def wrap_model(self) -> nn.Module | None:
        return None  # sharded in place: the DiT itself is the module the objective calls

    def gradient_sync(self, last: bool):
        return contextlib.nullcontext()  # reduce-scatter after every micro-batch (see the module's docstring)

    def _optimizer_names(self) -> list[str]:
        """The trained weights' names in the optimizer's parameter order (how `Optimizer.state_dict` numbers them)."""
        name_of = {id(param): name for name, param in zip(self.trainable.weights, self.trainable.parameters())}
        return [name_of[id(param)] for group in self.optimizer.param_groups for param in group["params"]]

    def optimizer_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        full = get_optimizer_state_dict(self.dit, self.optimizer, options=_full_state_options())
        if not full:
            return {}
        return _renamed(full, {name: number for number, name in enumerate(self._optimizer_names())})

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        named = _renamed(state, dict(enumerate(self._optimizer_names())))
        set_optimizer_state_dict(self.dit, self.optimizer, named, options=StateDictOptions(full_state_dict=True))

    def save_lora(self, path: Path) -> Path:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(self.dit, options=_full_state_options())  # every process takes part
        return self.write_dit(path, state) if self.is_main else path

    def save_state(self, directory: Path) -> Path:
        tensors, state = self.training_state()  # gathered: every process takes part
        return save_training_state(directory, tensors, state) if self.is_main else directory

    def run(self) -> Path:
        """Ctrl-C stops the run at the next step, as SIGTERM does: the processes must agree on the step whose state
        they gather, and an interrupt inside a collective would leave the others waiting in it."""
        if threading.current_thread() is not threading.main_thread():
            return super().run()

        def stop(signum, frame):
            self._stop_signal = True

        previous = signal.signal(signal.SIGINT, stop)
        try:
            return super().run()
        finally:
            signal.signal(signal.SIGINT, previous)
