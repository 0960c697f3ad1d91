"""The memory plan (train/memory_plan.py): sizes from the checkpoint header against counts made here from the
model's parameters, and the refusal with advice before anything large is loaded."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from flux2_core.checkpoints.loaders import load_dit
from flux2_core.checkpoints.quant import is_block_linear
from flux2_core.errors import Flux2Error
from flux2_core.train.config import TrainConfig
from flux2_core.train.memory_plan import check_memory_plan, plan_memory

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dit_path(demo_models_dir):
    return demo_models_dir / "diffusion_models" / "flux-2-klein-base-4b.safetensors"


def test_weights_and_trained_parameters_follow_the_model(dit_path) -> None:
    model = load_dit(dit_path, dtype=torch.float32)
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    block_linears = sum(p.numel() for n, p in params.items() if p.dim() == 2 and is_block_linear(n))
    lora = plan_memory(TrainConfig(dit=str(dit_path), network_dim=4), CPU)
    assert lora.weights == 4 * total
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and is_block_linear(n + ".weight")}
    assert lora.trained_parameters == sum(4 * (m.in_features + m.out_features) for m in linears.values())
    fp8 = plan_memory(TrainConfig(dit=str(dit_path), fp8_base=True), CPU)
    assert fp8.weights == 4 * (total - block_linears) + block_linears
    full = plan_memory(TrainConfig(dit=str(dit_path), training_mode="full", full_train_params="single_blocks"), CPU)
    assert full.trained_parameters == sum(p.numel() for n, p in params.items() if "single_blocks" in n)
    offloaded = plan_memory(TrainConfig(dit=str(dit_path), training_mode="full", optimizer_on_cpu=True), CPU)
    assert offloaded.trainable == 0 and offloaded.host > 0
    checkpointed = plan_memory(TrainConfig(dit=str(dit_path), gradient_checkpointing=True), CPU)
    assert checkpointed.activations < lora.activations


def test_fsdp_plan_holds_a_shard_of_the_fp32_weights_plus_two_whole_blocks(dit_path) -> None:
    model = load_dit(dit_path, dtype=torch.float32)
    blocks = [*model.double_blocks, *model.single_blocks]
    block_sizes = sorted(sum(p.numel() for p in block.parameters()) for block in blocks)
    outside = sum(p.numel() for p in model.parameters()) - sum(block_sizes)
    config = TrainConfig(dit=str(dit_path), training_mode="full")
    whole, sharded = plan_memory(config, CPU), plan_memory(config, CPU, shards=4)
    assert sharded.weights == whole.weights / 4 + 4 * (outside + sum(block_sizes[-2:]))
    assert sharded.trainable == whole.trainable / 4  # no masters on the CPU: gradient + AdamW state, a quarter
    assert sharded.lines()[0].endswith("(per process, sharded over 4)")


def test_a_plan_that_does_not_fit_is_refused_with_advice(dit_path) -> None:
    log = io.StringIO()
    with pytest.raises(Flux2Error, match="memory plan: this run needs .* fp8_base = true.*gradient_checkpointing"):
        check_memory_plan(TrainConfig(dit=str(dit_path)), CPU, log, free_bytes=1024)
    assert log.getvalue().startswith("memory plan: weights")
    check_memory_plan(TrainConfig(dit=str(dit_path)), CPU, log, free_bytes=2**40)
