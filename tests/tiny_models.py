"""Tiny random FLUX.2 models with the real architecture and the diffusers side of a parity check: the shared
helpers of the whole-generation tests (test_pipeline_parity, test_kv_cache).

Ours runs through `Flux2Pipeline`; diffusers gets the same tensors converted to its names. Both draw the initial
noise from a CPU generator with the same seed; `assert_same_generation` compares the final latents
(max |ours - diffusers| / max |diffusers|) and the decoded 8-bit images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
from PIL import Image
from safetensors.torch import load_file

from flux2_core import Flux2Pipeline
from flux2_core.checkpoints.dit_keys import bfl_to_diffusers
from flux2_core.checkpoints.vae_keys import bfl_vae_to_diffusers
from flux2_core.demo_models import DEMO_VAE
from flux2_core.sampling import unpack_latents
from flux2_core.variants import DiTConfig

WIDTH, HEIGHT = 96, 64  # a 6 x 4 latent grid: not square, so rows and columns cannot be swapped unnoticed
PROMPT = "a photo of a cat sitting on a red chair in the sun"
TEXT_HIDDEN = 32  # tiny Qwen3 / Mistral width: prompts are 3 * 32 = 96 wide
MAX_RELATIVE_ERROR = 1e-4


def dit_config(guidance_embed: bool) -> DiTConfig:
    return DiTConfig(hidden_size=64, num_heads=2, depth_double=2, depth_single=2, context_dim=3 * TEXT_HIDDEN,
                     guidance_embed=guidance_embed, head_dim=32, axes_dim=(8, 8, 8, 8))


def diffusers_transformer(path: Path, config: DiTConfig) -> Flux2Transformer2DModel:
    model = Flux2Transformer2DModel(
        in_channels=config.in_channels, num_layers=config.depth_double, num_single_layers=config.depth_single,
        attention_head_dim=config.head_dim, num_attention_heads=config.num_heads,
        joint_attention_dim=config.context_dim, mlp_ratio=config.mlp_ratio, axes_dims_rope=config.axes_dim,
        rope_theta=int(config.rope_theta), guidance_embeds=config.guidance_embed)
    model.load_state_dict(bfl_to_diffusers(load_file(str(path))), strict=True)
    return model.eval()


def diffusers_vae(path: Path) -> AutoencoderKLFlux2:
    vae = AutoencoderKLFlux2(block_out_channels=DEMO_VAE.encoder_channels,
                             decoder_block_out_channels=DEMO_VAE.decoder_channels,
                             layers_per_block=DEMO_VAE.encoder_blocks_per_level, latent_channels=DEMO_VAE.z_channels)
    vae.load_state_dict(bfl_vae_to_diffusers(load_file(str(path))), strict=True)
    return vae.eval()


def flux2_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # FLUX.2's scheduler config: the shift comes from the `mu` the pipelines compute (compute_empirical_mu).
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")


def random_image(width: int, height: int, seed: int) -> Image.Image:
    """Smooth random colours (a blurred noise field), closer to a photo than white noise."""
    coarse = np.random.default_rng(seed).integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse, "RGB").resize((width, height), Image.Resampling.BICUBIC)


def generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


@dataclass
class Generation:
    latent: torch.Tensor  # [B, 128, h, w], normalized packed
    images: list[Image.Image]


def ours(pipe: Flux2Pipeline, prompt: str, **options) -> Generation:
    """Our images, and the final latent from the last step callback (x0 at sigma 0 is the final latent)."""
    last = {}
    images = pipe(prompt, width=WIDTH, height=HEIGHT, callback=lambda step, total, x0: last.update(x0=x0), **options)
    return Generation(last["x0"], images)


def theirs(pipe, **options) -> Generation:
    """diffusers' images, and its final packed latent from the step-end callback, unpacked."""
    last = {}

    def keep_latents(_pipe, _step, _timestep, tensors):
        last["latents"] = tensors["latents"]
        return {}

    images = pipe(height=HEIGHT, width=WIDTH, callback_on_step_end=keep_latents, output_type="pil", **options).images
    return Generation(unpack_latents(last["latents"], HEIGHT // 16, WIDTH // 16), images)


def assert_same_generation(mine: Generation, reference: Generation) -> None:
    assert mine.latent.shape == reference.latent.shape
    error = ((mine.latent - reference.latent).abs().max() / reference.latent.abs().max()).item()
    assert error <= MAX_RELATIVE_ERROR, f"final latent: max relative error {error:.2e}"
    assert len(mine.images) == len(reference.images)
    for a, b in zip(mine.images, reference.images):
        assert a.size == b.size == (WIDTH, HEIGHT)
        levels = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max()
        assert levels <= 1, f"decoded image differs by {levels} levels"
