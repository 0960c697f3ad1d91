"""The full-size DiTs, built on the meta device: real tensor names, counts, shapes, and the diffusers layout."""

from __future__ import annotations

import pytest
import torch
from diffusers import Flux2Transformer2DModel

from flux2_core.checkpoints.dit_keys import bfl_to_diffusers
from flux2_core.dit import Flux2DiT
from flux2_core.variants import FULL_SIZE_DIT, DiTConfig

# Published checkpoint facts (tensor count, parameter count).
EXPECTED = {
    "dev": (299, 32_223_281_152),
    "klein-9b": (201, 9_078_581_248),
    "klein-4b": (149, 3_875_544_576),
}

# diffusers' constructor arguments for the published models.
DIFFUSERS_ARGS = {
    "dev": dict(num_layers=8, num_single_layers=48, num_attention_heads=48, joint_attention_dim=15360,
                guidance_embeds=True),
    "klein-9b": dict(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288,
                     guidance_embeds=False),
    "klein-4b": dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                     guidance_embeds=False),
}


def meta_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}


@pytest.mark.parametrize("variant", list(FULL_SIZE_DIT))
def test_full_size_dit_structure(variant):
    config = FULL_SIZE_DIT[variant]
    model = Flux2DiT(config, device="meta", dtype=torch.bfloat16)
    shapes = meta_shapes(model)
    hidden, context = config.hidden_size, config.context_dim

    tensors, parameters = EXPECTED[variant]
    assert len(shapes) == tensors
    assert sum(p.numel() for p in model.parameters()) == parameters

    # Spot checks against the published BFL layout.
    assert shapes["img_in.weight"] == (hidden, 128)
    assert shapes["txt_in.weight"] == (hidden, context)
    assert shapes["time_in.in_layer.weight"] == (hidden, 256)
    assert shapes["double_stream_modulation_img.lin.weight"] == (6 * hidden, hidden)
    assert shapes["single_stream_modulation.lin.weight"] == (3 * hidden, hidden)
    assert shapes["double_blocks.0.img_attn.qkv.weight"] == (3 * hidden, hidden)
    assert shapes["double_blocks.0.txt_attn.norm.key_norm.scale"] == (128,)
    assert shapes["double_blocks.0.img_mlp.0.weight"] == (6 * hidden, hidden)
    assert shapes["double_blocks.0.txt_mlp.2.weight"] == (hidden, 3 * hidden)
    assert shapes["single_blocks.0.linear1.weight"] == (9 * hidden, hidden)
    assert shapes["single_blocks.0.linear2.weight"] == (hidden, 4 * hidden)
    assert shapes["final_layer.adaLN_modulation.1.weight"] == (2 * hidden, hidden)
    assert shapes["final_layer.linear.weight"] == (128, hidden)
    assert ("guidance_in.in_layer.weight" in shapes) == config.guidance_embed
    assert not any(name.endswith(".bias") for name in shapes)

    assert DiTConfig.from_shapes(shapes) == config

    with torch.device("meta"):
        reference = Flux2Transformer2DModel(**DIFFUSERS_ARGS[variant])
    converted = {name: tuple(t.shape) for name, t in bfl_to_diffusers(model.state_dict()).items()}
    assert converted == meta_shapes(reference)
