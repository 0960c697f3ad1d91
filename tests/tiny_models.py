"""Tiny random FLUX.2 models with the real architecture and the diffusers side of a parity check: the shared
helpers of the tests that compare with diffusers (test_dit, test_vae, test_lora, test_lora_parity) and of the
whole-generation tests (test_pipeline_parity, test_kv_cache).

Ours runs through `Flux2Pipeline`; diffusers gets the same tensors converted to its names. Both draw the initial
noise from a CPU generator with the same seed; `assert_same_generation` compares the final latents
(max |ours - diffusers| / max |diffusers|) and the decoded 8-bit images.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, Mistral3ForConditionalGeneration, Qwen3ForCausalLM

from flux2_core import Flux2Pipeline
from flux2_core.checkpoints.dit_keys import bfl_to_diffusers
from flux2_core.checkpoints.vae_keys import bfl_vae_to_diffusers
from flux2_core.demo_models import DEMO_VAE, random_dit, random_vae
from flux2_core.demo_tokenizers import write_tiny_text_encoder
from flux2_core.sampling import unpack_latents
from flux2_core.vae import VAEConfig
from flux2_core.variants import DiTConfig

WIDTH, HEIGHT = 96, 64  # a 6 x 4 latent grid: not square, so rows and columns cannot be swapped unnoticed
PROMPT = "a photo of a cat sitting on a red chair in the sun"
TEXT_HIDDEN = 32  # tiny Qwen3 / Mistral width: prompts are 3 * 32 = 96 wide
MAX_RELATIVE_ERROR = 1e-4


def dit_config(guidance_embed: bool, context_dim: int = 3 * TEXT_HIDDEN, head_dim: int = 32,
               num_heads: int = 2) -> DiTConfig:
    return DiTConfig(hidden_size=head_dim * num_heads, num_heads=num_heads, depth_double=2, depth_single=2,
                     context_dim=context_dim, guidance_embed=guidance_embed, head_dim=head_dim,
                     axes_dim=(head_dim // 4,) * 4)


def _bfl_weights(weights: Path | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    return load_file(str(weights)) if isinstance(weights, Path) else weights


def diffusers_transformer(weights: Path | Mapping[str, torch.Tensor], config: DiTConfig) -> Flux2Transformer2DModel:
    """diffusers' twin of a DiT: the same tensors (a safetensors file or a state dict, BFL names) under diffusers
    names."""
    model = Flux2Transformer2DModel(
        in_channels=config.in_channels, num_layers=config.depth_double, num_single_layers=config.depth_single,
        attention_head_dim=config.head_dim, num_attention_heads=config.num_heads,
        joint_attention_dim=config.context_dim, mlp_ratio=config.mlp_ratio, axes_dims_rope=config.axes_dim,
        rope_theta=int(config.rope_theta), guidance_embeds=config.guidance_embed)
    model.load_state_dict(bfl_to_diffusers(_bfl_weights(weights)), strict=True)
    return model.eval()


def diffusers_vae(weights: Path | Mapping[str, torch.Tensor], config: VAEConfig = DEMO_VAE) -> AutoencoderKLFlux2:
    """diffusers' twin of a VAE: the same tensors (a safetensors file or a state dict, BFL names) under diffusers
    names."""
    vae = AutoencoderKLFlux2(block_out_channels=config.encoder_channels,
                             decoder_block_out_channels=config.decoder_channels,
                             layers_per_block=config.encoder_blocks_per_level, latent_channels=config.z_channels)
    vae.load_state_dict(bfl_vae_to_diffusers(_bfl_weights(weights)), strict=True)
    return vae.eval()


def write_dit(path: Path, guidance_embed: bool, seed: int) -> None:
    save_file(random_dit(dit_config(guidance_embed), seed=seed).state_dict(), str(path))


def write_vae(path: Path, seed: int) -> None:
    save_file(random_vae(DEMO_VAE, seed=seed).state_dict(), str(path))


def write_text_encoder(kind: str, folder: Path, seed: int) -> None:
    """A tiny "qwen3" or "mistral3" Hugging Face folder, TEXT_HIDDEN wide, fp32."""
    write_tiny_text_encoder(kind, folder, layout="hf", seed=seed, hidden=TEXT_HIDDEN, dtype=torch.float32)


def hf_text_encoder(kind: str, folder: Path) -> tuple[torch.nn.Module, object]:
    """transformers' model and tokenizer for a `write_text_encoder` folder, as diffusers' pipelines take them."""
    model_class = Qwen3ForCausalLM if kind == "qwen3" else Mistral3ForConditionalGeneration
    model = model_class.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    # Without torchvision transformers cannot build Mistral's Pixtral processor; diffusers only calls the
    # tokenizer's apply_chat_template on it, which the bare tokenizer provides.
    return model, AutoTokenizer.from_pretrained(str(folder))


def flux2_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # FLUX.2's scheduler config: the shift comes from the `mu` the pipelines compute (compute_empirical_mu).
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")


def diffusers_pipeline(pipeline_class: type, dit: Path, vae: Path, text_encoder: Path, kind: str,
                       guidance_embed: bool):
    """A diffusers FLUX.2 pipeline on the files `Flux2Pipeline.from_files(dit, vae, text_encoder)` loads."""
    model, tokenizer = hf_text_encoder(kind, text_encoder)
    return pipeline_class(scheduler=flux2_scheduler(), vae=diffusers_vae(vae), text_encoder=model, tokenizer=tokenizer,
                          transformer=diffusers_transformer(dit, dit_config(guidance_embed)))


def random_image(width: int, height: int, seed: int) -> Image.Image:
    """Smooth random colours (a blurred noise field), closer to a photo than white noise."""
    coarse = np.random.default_rng(seed).integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse, "RGB").resize((width, height), Image.Resampling.BICUBIC)


def reference_images(count: int) -> list[Image.Image]:
    """Up to two reference images, multiples of 16 below every pixel cap (the pipeline and the VAEEncode node
    see the same pixels)."""
    return [random_image(112, 80, seed=1), random_image(64, 96, seed=2)][:count]


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
