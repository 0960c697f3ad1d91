"""The memory plan printed before a run loads its DiT, and the refusal (with advice) when it cannot fit.

Everything comes from the checkpoint's header (shapes, no tensor read) and the config: weights at their stored
training precision (fp8 block linears with `fp8_base`), the trainable parameters with gradients and optimizer
state, and activations. Activations are an estimate: with gradient checkpointing each block keeps its input
(tokens x hidden) and one block at a time holds its full working set (~ tokens x (12 hidden + 3 mlp) values);
without it every block holds its working set. Swapped blocks (`blocks_to_swap`: the last ones, musubi's count) leave the
device except two in flight, and only with gradient checkpointing (without it autograd keeps every block's
weights for the backward pass). Only a CUDA device has a budget to check against (its free memory); elsewhere the plan is printed only.
Sharded over N processes (FSDP, `distributed_strategy = "fsdp"`), each process holds 1/N of the fp32 weights
(they are the masters), of the gradients and of the optimizer state, plus the weights outside the blocks and two
whole blocks (the running one and the prefetched next) in the compute dtype.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoints.detect import describe_source
from ..checkpoints.quant import is_block_linear
from ..memory.streaming import training_swap_split
from ..checkpoints.reader import open_checkpoint
from ..dit import Flux2DiT
from ..errors import Flux2Error
from .config import TrainConfig

GIB = 2**30
TEXT_TOKENS = 512
# bytes per trained parameter beyond the weight: fp32 gradient + optimizer state
_OPTIMIZER_BYTES = {"adamw": 4 + 8, "adamw8bit": 4 + 2, "adafactor": 4 + 1, "prodigy": 4 + 16}


@dataclass(frozen=True)
class MemoryPlan:
    weights: float  # bytes on the device
    trainable: float  # trained parameters (+ fp32 masters), gradients, optimizer state on the device
    host: float  # bytes kept in CPU memory (swapped blocks, offloaded optimizer)
    activations: float
    trained_parameters: int
    shards: int = 1  # processes the weights, gradients and optimizer state are sharded over (FSDP)

    @property
    def device_total(self) -> float:
        return self.weights + self.trainable + self.activations

    def lines(self) -> list[str]:
        return [f"memory plan: weights {self.weights / GIB:.2f} GiB, trained {self.trained_parameters:,} parameters "
                f"+ gradients + optimizer {self.trainable / GIB:.2f} GiB, activations ~{self.activations / GIB:.2f} "
                f"GiB; device total ~{self.device_total / GIB:.2f} GiB, CPU {self.host / GIB:.2f} GiB"
                + (f" (per process, sharded over {self.shards})" if self.shards > 1 else "")]


def plan_memory(config: TrainConfig, device: torch.device, shards: int = 1) -> MemoryPlan:
    """`shards`: processes an FSDP run shards the DiT over (1: every process holds all of it)."""
    with open_checkpoint(config.dit) as source:
        info = describe_source(source)
    if info.config is None:
        raise Flux2Error(f"{config.dit}: expected a FLUX.2 DiT, found {info.kind}")
    model = Flux2DiT(info.config, device="meta")
    compute_bytes = 2 if device.type == "cuda" else 4
    blocks = [*model.double_blocks, *model.single_blocks]
    doubles, singles = len(model.double_blocks), len(model.single_blocks)
    swap_double, swap_single = training_swap_split(doubles, singles, config.blocks_to_swap)  # the last ones
    swapped = {*range(doubles - swap_double, doubles), *range(len(blocks) - swap_single, len(blocks))}

    def stored_bytes(name: str, param: nn.Parameter) -> int:
        fp8 = config.fp8_base and name.endswith(".weight") and param.dim() == 2 and is_block_linear(name)
        return param.numel() * (1 if fp8 else compute_bytes)

    block_of = {}
    for index, block in enumerate(blocks):
        prefix = "double_blocks" if index < len(model.double_blocks) else "single_blocks"
        number = index if index < len(model.double_blocks) else index - len(model.double_blocks)
        for name, _ in block.named_parameters():
            block_of[f"{prefix}.{number}.{name}"] = index
    weights = host = outside = 0.0
    swapped_sizes: dict[int, int] = {}
    gathered_sizes: dict[int, int] = {}  # each block in the compute dtype (what FSDP gathers)
    for name, param in model.named_parameters():
        size, index = stored_bytes(name, param), block_of.get(name)
        if index is None:
            outside += param.numel() * compute_bytes
        else:
            gathered_sizes[index] = gathered_sizes.get(index, 0) + param.numel() * compute_bytes
        if index in swapped:
            host += size
            swapped_sizes[index] = swapped_sizes.get(index, 0) + size
        else:
            weights += size
    if config.gradient_checkpointing:
        weights += sum(sorted(swapped_sizes.values())[-2:])  # two swapped blocks in flight on the device
    else:
        weights += sum(swapped_sizes.values())  # autograd keeps each block's weights until its backward
    per_parameter = _OPTIMIZER_BYTES.get(config.optimizer_type, 12)
    if config.training_mode == "full":
        trained = sum(p.numel() for n, p in model.named_parameters() if re.search(config.full_train_params, n))
        master = 4 if compute_bytes == 2 else 0
        trainable = trained * (master + per_parameter)
        if config.optimizer_on_cpu:
            host, trainable = host + trainable, 0.0
    else:
        pattern = re.compile(config.target_modules)
        trained = sum(config.network_dim * (module.in_features + module.out_features)
                      for name, module in model.named_modules()
                      if isinstance(module, nn.Linear) and pattern.fullmatch(name))
        trainable = trained * (4 + per_parameter)
    if shards > 1:
        total = sum(p.numel() for p in model.parameters())
        weights = total * 4 / shards + outside + sum(sorted(gathered_sizes.values())[-2:])
        trainable = trained * per_parameter / shards
    tokens = (config.resolution // 16) ** 2 + TEXT_TOKENS
    hidden, mlp = info.config.hidden_size, info.config.mlp_hidden
    working_set = tokens * (12 * hidden + 3 * mlp) * compute_bytes
    if config.gradient_checkpointing:
        activations = len(blocks) * tokens * hidden * compute_bytes + working_set
    else:
        activations = len(blocks) * working_set
    if config.training_mode == "distill":
        activations *= config.distill_student_steps
    return MemoryPlan(weights, trainable, host, activations, trained, shards)


def check_memory_plan(config: TrainConfig, device: torch.device, log_stream,
                      free_bytes: float | None = None, shards: int = 1) -> MemoryPlan:
    """Print the plan; on CUDA (or with `free_bytes` given) refuse with advice when it does not fit."""
    plan = plan_memory(config, device, shards)
    for line in plan.lines():
        print(line, file=log_stream)
    if free_bytes is None and device.type == "cuda":
        free_bytes = torch.cuda.mem_get_info(device)[0]
    if free_bytes is not None and plan.device_total > free_bytes:
        advice = []
        if not config.fp8_base and config.training_mode != "full":
            advice.append("fp8_base = true (halves the base weights)")
        if not config.gradient_checkpointing:
            advice.append("gradient_checkpointing = true")
        if config.training_mode != "full":
            advice.append("blocks_to_swap = N (streams N blocks from CPU memory)")
        elif not config.optimizer_on_cpu:
            advice.append("optimizer_on_cpu = true, or a regex subset in full_train_params")
        advice.append("a lower resolution")
        raise Flux2Error(f"memory plan: this run needs ~{plan.device_total / GIB:.2f} GiB on {device} but "
                         f"{free_bytes / GIB:.2f} GiB are free; try {'; '.join(advice)}")
    return plan
