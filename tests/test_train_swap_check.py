"""The block-swap self-check (train/swap_check.py): a correct swap gives the same LoRA gradients as no swap, with
and without gradient checkpointing; a swap with an injected wrong-slot fault on the backward recompute is caught."""

from __future__ import annotations

import pytest
import torch
from tiny_models import dit_config

from flux2_core.demo_models import random_dit
from flux2_core.errors import Flux2Error
from flux2_core.train.adapters import AdapterSet
from flux2_core.train.config import TrainConfig
from flux2_core.train.memory import enable_gradient_checkpointing
from flux2_core.train.objective import Batch, model_inputs
from flux2_core.train.swap_check import BlockOffload, check_block_swap


def _setup(checkpointing: bool):
    dit = random_dit(dit_config(guidance_embed=False), 4)
    adapters = AdapterSet(dit, TrainConfig(network_dim=4, network_alpha=4.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in adapters.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    if checkpointing:
        enable_gradient_checkpointing(dit)
    latents = torch.randn(1, 128, 2, 3, generator=generator)
    batch = Batch(latents, torch.randn(1, 5, dit.config.context_dim, generator=generator))
    target = torch.randn(1, 6, 128, generator=generator)

    def loss():
        out = dit(**model_inputs(latents, batch, torch.device("cpu"), torch.float32),
                  timesteps=torch.tensor([0.5]), guidance=None)
        return ((out - target) ** 2).mean()

    return dit, adapters, loss


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_correct_swap_passes(checkpointing: bool) -> None:
    dit, adapters, loss = _setup(checkpointing)
    worst = check_block_swap(adapters.parameters(), loss, lambda: BlockOffload(dit.double_blocks, 2, "cpu"))
    assert worst <= 1e-6
    # the blocks hold real weights again afterwards
    assert not dit.double_blocks[0].img_attn.qkv.base_layer.weight.is_meta


def test_an_injected_fault_is_detected() -> None:
    dit, adapters, loss = _setup(checkpointing=True)
    with pytest.raises(Flux2Error, match="block swap self-check: the LoRA gradients with swapping differ"):
        check_block_swap(adapters.parameters(), loss, lambda: BlockOffload(dit.double_blocks, 2, "cpu", fault=True))


def test_weights_are_off_the_device_between_forwards() -> None:
    dit, _, loss = _setup(checkpointing=False)
    swap = BlockOffload(dit.double_blocks, 1, "cpu")
    assert dit.double_blocks[0].img_attn.qkv.base_layer.weight.is_meta
    assert not dit.double_blocks[1].img_attn.qkv.base_layer.weight.is_meta
    loss().backward()
    assert dit.double_blocks[0].img_attn.qkv.base_layer.weight.is_meta
    swap.remove()
