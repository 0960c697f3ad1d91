"""The block-swap self-check (train/swap_check.py) against the engine's streaming: a correct swap gives the same
LoRA gradients as no swap, with and without gradient checkpointing; a swap whose checkpointing recompute loads
another block's weights (injected fault) is caught."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import dit_config

from flux2_core.demo_models import random_dit
from flux2_core.errors import Flux2Error
from flux2_core.memory.streaming import enable_training_block_swap
from flux2_core.train.adapters import AdapterSet
from flux2_core.train.config import TrainConfig
from flux2_core.train.memory import enable_gradient_checkpointing
from flux2_core.train.objective import Batch, model_inputs
from flux2_core.train.swap_check import check_block_swap, inject_wrong_block_fault

SWAP = 3  # with 4 double and 4 single blocks: the last 2 of each kind


def _setup(checkpointing: bool, device: str = "cpu"):
    dit = random_dit(dataclasses.replace(dit_config(guidance_embed=False), depth_double=4, depth_single=4), 4)
    dit.to(device)
    adapters = AdapterSet(dit, TrainConfig(network_dim=4, network_alpha=4.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in adapters.parameters():
            param.copy_(torch.randn(param.shape, generator=generator).to(device) * 0.05)
    if checkpointing:
        enable_gradient_checkpointing(dit)
    latents = torch.randn(1, 128, 2, 3, generator=generator)
    batch = Batch(latents, torch.randn(1, 5, dit.config.context_dim, generator=generator))
    target = torch.randn(1, 6, 128, generator=generator).to(device)

    def loss():
        out = dit(**model_inputs(latents, batch, torch.device(device), torch.float32),
                  timesteps=torch.tensor([0.5], device=device), guidance=None)
        return ((out - target) ** 2).mean()

    return dit, adapters, loss


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_correct_swap_passes(checkpointing: bool) -> None:
    dit, adapters, loss = _setup(checkpointing)
    streamer, worst = check_block_swap(adapters.parameters(), loss, lambda: enable_training_block_swap(dit, SWAP, "cpu"))
    assert worst == 0.0  # the same tensors come back on the CPU: bit-equal
    # swapping stays on: the last blocks' frozen weights are off the device between steps, the adapters are not
    layer = dit.double_blocks[-1].img_attn.qkv
    assert layer.base_layer.weight.is_meta and not layer.lora_A["default"].weight.is_meta
    assert not dit.double_blocks[1].img_attn.qkv.base_layer.weight.is_meta
    streamer.detach()
    assert not layer.base_layer.weight.is_meta


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: swapping to pinned memory with a side-stream prefetch")
def test_the_self_check_on_cuda() -> None:
    dit, adapters, loss = _setup(checkpointing=True, device="cuda")
    streamer, worst = check_block_swap(adapters.parameters(), loss,
                                       lambda: enable_training_block_swap(dit, SWAP, "cuda"))
    assert worst <= 1e-5  # the same bytes come back; CUDA attention backward may reorder sums
    assert dit.double_blocks[-1].img_attn.qkv.base_layer.weight.is_meta
    streamer.detach()
    dit, adapters, loss = _setup(checkpointing=True, device="cuda")

    def faulty_swap():
        streamer = enable_training_block_swap(dit, SWAP, "cuda")
        inject_wrong_block_fault(streamer)
        return streamer

    with pytest.raises(Flux2Error, match="block swap self-check"):
        check_block_swap(adapters.parameters(), loss, faulty_swap)


def test_an_injected_fault_is_detected() -> None:
    dit, adapters, loss = _setup(checkpointing=True)

    def faulty_swap():
        streamer = enable_training_block_swap(dit, SWAP, "cpu")
        inject_wrong_block_fault(streamer)
        return streamer

    with pytest.raises(Flux2Error, match="block swap self-check: the LoRA gradients with swapping differ"):
        check_block_swap(adapters.parameters(), loss, faulty_swap)


def test_weights_are_off_the_device_between_forwards() -> None:
    dit, adapters, loss = _setup(checkpointing=True)
    streamer = enable_training_block_swap(dit, SWAP, "cpu")
    loads: dict[int, int] = {}
    load = streamer.load

    def counted(index: int) -> None:
        loads[index] = loads.get(index, 0) + 1
        load(index)

    streamer.load = counted
    loss().backward()
    assert dit.single_blocks[-1].linear1.base_layer.weight.is_meta
    assert all(p.grad is not None for p in adapters.parameters())
    # every streamed module came in for the forward and again for the checkpointing recompute
    assert sorted(set(loads.values())) == [2] and len(loads) == len(streamer.blocks)
    streamer.detach()
