"""Differential LoRA (train/differential.py): a preset LoRA merged into the base before training; the saved file
holds only the new adapter, and base + preset + saved adapter reproduces what was trained."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from train_configs import demo_train_config

from flux2_core.checkpoints.loaders import load_dit
from flux2_core.errors import Flux2Error
from flux2_core.lora import Flux2LoRA, LoRAPatch, LowRank, load_lora, merge_loras, save_lora
from flux2_core.train.config import TrainConfig
from flux2_core.train.full_finetune import make_trainer

PRESET_MODULES = ("img_in", "double_blocks.0.img_attn.qkv")  # img_in is not a training target
STRENGTH = 0.7


def _write_preset(dit, path) -> None:
    generator = torch.Generator().manual_seed(9)
    patches = []
    for module in PRESET_MODULES:
        out_features, in_features = dit.get_submodule(module).weight.shape
        delta = LowRank(torch.randn(out_features, 2, generator=generator) * 0.2,
                        torch.randn(2, in_features, generator=generator) * 0.2)
        patches.append(LoRAPatch(module, None, delta, 2.0, module))
    save_lora(Flux2LoRA("preset", "bfl", tuple(patches), dit.config.hidden_size), path, "comfyui")


def test_trained_adapter_is_saved_alone_and_stacks_on_the_preset(demo_models_dir, tmp_path) -> None:
    dit_path = demo_models_dir / "diffusion_models" / "flux-2-klein-base-4b.safetensors"
    base = load_dit(dit_path, dtype=torch.float32)
    preset = tmp_path / "preset.safetensors"
    _write_preset(base, preset)
    config = demo_train_config(demo_models_dir, tmp_path, output_name="diff", max_train_steps=3,
                               learning_rate=1e-2, network_dim=4, network_alpha=4.0, seed=1,
                               preset_lora=str(preset), preset_lora_strength=STRENGTH)
    trainer = make_trainer(config)
    path = trainer.run()

    saved = load_lora(path)
    assert {patch.module for patch in saved.patches} == set(trainer.trainable.layers)
    assert "img_in" not in {patch.module for patch in saved.patches}
    assert all(".lora_A." in k or ".lora_B." in k or k.endswith(".alpha") for k in load_file(str(path)))

    # base + preset (merged as in training) + the saved adapter == the trained model, layer by layer
    rebuilt = load_dit(dit_path, dtype=torch.float32)
    merge_loras(rebuilt, [(preset, STRENGTH)])
    torch.testing.assert_close(rebuilt.img_in.weight, trainer.dit.img_in.weight)
    merge_loras(rebuilt, [(saved, 1.0)])
    x = torch.randn(3, base.config.hidden_size, generator=torch.Generator().manual_seed(0))
    compared = 0
    with torch.no_grad():
        for module in saved.targets:
            trained_layer = trainer.dit.get_submodule(module)
            if trained_layer.base_layer.in_features != x.shape[1]:
                continue
            torch.testing.assert_close(rebuilt.get_submodule(module)(x), trained_layer(x), atol=1e-5, rtol=1e-5)
            compared += 1
    assert compared >= 4
    # and the adapter differs from the preset: without the preset the qkv layer does not match
    alone = load_dit(dit_path, dtype=torch.float32)
    merge_loras(alone, [(saved, 1.0)])
    with torch.no_grad():
        qkv = "double_blocks.0.img_attn.qkv"
        assert not torch.allclose(alone.get_submodule(qkv)(x), trainer.dit.get_submodule(qkv)(x), atol=1e-3)


def test_missing_preset_is_named(demo_models_dir, tmp_path) -> None:
    from flux2_core.train.differential import merge_preset_lora

    config = TrainConfig(preset_lora=str(tmp_path / "nope.safetensors"))
    with pytest.raises(Flux2Error, match="nope.safetensors"):
        merge_preset_lora(nn.Linear(2, 2), config)
