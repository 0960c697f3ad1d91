"""LoRA parity with diffusers: the same file through diffusers' own loader (PEFT) and through flux2_core.

Tiny random models with the real architecture; the LoRA files use the tools' real key names (written by
tests/test_lora.py's writers, not by flux2_core).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from flux2_core.demo_models import random_dit
from flux2_core.lora import attach_loras, load_lora, merge_loras, save_lora
from flux2_core.sampling import make_noise, pack_latents, sample
from test_lora import bfl_file, diffusers_file, dit_inputs, kohya_file, random_factors, relative_error, tiny_config
from tiny_models import diffusers_transformer

STEPS, GRID = 3, (3, 4)  # a 3 x 4 latent grid: 12 image tokens
TEXT_TOKENS = 6


def klein_pipeline(dit) -> Flux2KleinPipeline:
    # A two-level VAE (scale factor 2) only so the pipeline can size its latents; its decoder is not used.
    vae = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             block_out_channels=(32, 32), layers_per_block=1, latent_channels=32)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential",
        base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                              transformer=diffusers_transformer(dit.state_dict(), dit.config), is_distilled=True)


def lora_layers(model: torch.nn.Module) -> int:
    return sum(isinstance(module, LoraLayer) for module in model.modules())


def diffusers_final_latent(pipe: Flux2KleinPipeline, noise: torch.Tensor, context: torch.Tensor):
    """(packed latent after the last step, the sigmas diffusers used)."""
    captured = {}

    def keep_latents(pipeline, step, timestep, tensors):
        captured["latents"] = tensors["latents"]
        return {}

    with torch.no_grad():
        pipe(prompt_embeds=context, latents=noise, height=4 * GRID[0], width=4 * GRID[1],
             num_inference_steps=STEPS, output_type="latent", callback_on_step_end=keep_latents)
    return captured["latents"], pipe.scheduler.sigmas.clone()


def ours_final_latent(dit, noise, context, sigmas) -> torch.Tensor:
    with torch.no_grad():
        return pack_latents(sample(dit, noise, sigmas, context))


@pytest.fixture(scope="module")
def klein():
    return random_dit(tiny_config(guidance_embed=False), seed=40)


@pytest.fixture(scope="module")
def inputs(klein):
    noise = make_noise(7, (1, 128, *GRID))
    context = torch.randn(1, TEXT_TOKENS, klein.config.context_dim, generator=torch.Generator().manual_seed(8))
    return noise, context


def test_diffusers_lora_full_pipeline_parity_and_kohya_conversion(klein, inputs, tmp_path):
    noise, context = inputs
    path = tmp_path / "diffusers_lora.safetensors"
    file = diffusers_file(random_factors(klein, seed=41))
    save_file(file, str(path))
    strength = 0.75

    pipe = klein_pipeline(klein)
    base, sigmas = diffusers_final_latent(pipe, noise, context)
    pipe.load_lora_weights(str(path), adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[strength])
    assert lora_layers(pipe.transformer) == len(file) // 2  # every module in the file got its LoRA layer
    expected, _ = diffusers_final_latent(pipe, noise, context)
    assert relative_error(expected, base) > 1e-2

    lora = load_lora(path)
    with attach_loras(klein, [(lora, strength)]):
        on_the_fly = ours_final_latent(klein, noise, context, sigmas)
    merged_dit = copy.deepcopy(klein)
    merge_loras(merged_dit, [(lora, strength)])
    merged = ours_final_latent(merged_dit, noise, context, sigmas)
    print(f"final latent vs diffusers: on the fly {relative_error(on_the_fly, expected):.2e}, "
          f"merged {relative_error(merged, expected):.2e}")
    assert relative_error(on_the_fly, expected) <= 1e-5
    assert relative_error(merged, expected) <= 1e-5

    kohya_path = tmp_path / "as_kohya.safetensors"
    save_lora(lora, kohya_path, "kohya")
    kohya = load_lora(kohya_path)
    assert kohya.dialect == "kohya" and all(patch.rows is None for patch in kohya.patches)
    with attach_loras(klein, [(kohya, strength)]):
        again = ours_final_latent(klein, noise, context, sigmas)
    assert relative_error(again, expected) <= 1e-5


def test_diffusers_reads_our_kohya_and_diffusers_files_the_same(klein, inputs, tmp_path):
    """Block layers only: diffusers' kohya converter knows no modulation or final-layer modulation names."""
    noise, context = inputs
    blocks = [m for m in random_factors(klein) if m.startswith(("double_blocks", "single_blocks"))]
    source = load_lora(_saved(tmp_path / "musubi.safetensors", kohya_file(random_factors(klein, seed=42, modules=blocks),
                                                                          alpha=1.0)))
    for fmt in ("kohya", "diffusers"):
        path = tmp_path / f"ours_{fmt}.safetensors"
        save_lora(source, path, fmt)
        pipe = klein_pipeline(klein)
        pipe.load_lora_weights(str(path))
        expected, sigmas = diffusers_final_latent(pipe, noise, context)
        with attach_loras(klein, [(source, 1.0)]):
            ours = ours_final_latent(klein, noise, context, sigmas)
        assert relative_error(ours, expected) <= 1e-5, fmt


def test_peft_alpha_metadata_parity(klein, inputs, tmp_path):
    """A diffusers file whose LoraConfig (lora_alpha != r, one alpha_pattern) is in its metadata."""
    noise, context = inputs
    file = diffusers_file(random_factors(klein, seed=43))
    modules = sorted({key.removeprefix("transformer.").rsplit(".lora_", 1)[0] for key in file})
    config = {"r": 4, "lora_alpha": 12, "alpha_pattern": {"proj_out": 2}, "rank_pattern": {},
              "target_modules": modules}
    path = _saved(tmp_path / "with_alpha.safetensors", file,
                  {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})})
    pipe = klein_pipeline(klein)
    pipe.load_lora_weights(str(path))
    expected, sigmas = diffusers_final_latent(pipe, noise, context)
    with attach_loras(klein, [(path, 1.0)]):
        ours = ours_final_latent(klein, noise, context, sigmas)
    assert relative_error(ours, expected) <= 1e-5


@pytest.mark.parametrize("writer", ["diffusers", "ai-toolkit"])
def test_transformer_output_parity_with_guidance_layers(tmp_path, writer):
    """dev-like DiT (guidance embedding): every linear layer, through diffusers' loader for each file kind."""
    dit = random_dit(tiny_config(guidance_embed=True), seed=44)
    factors = random_factors(dit, seed=45)
    if writer == "ai-toolkit":
        # diffusers 0.42's BFL-name converter maps final_layer.adaLN_modulation.1 to norm_out.linear without
        # swapping the [shift ; scale] row halves (its weight converter does swap them), so diffusers itself
        # misapplies that one layer of such files; ours swaps, which the diffusers-file case checks.
        del factors["final_layer.adaLN_modulation.1"]
    file = diffusers_file(factors) if writer == "diffusers" else bfl_file(factors, alpha=None)
    path = _saved(tmp_path / f"{writer}.safetensors", file)
    twin = diffusers_transformer(dit.state_dict(), dit.config)
    state_dict = Flux2KleinPipeline.lora_state_dict(str(path))  # diffusers' own dialect conversion
    twin.load_lora_adapter(state_dict, prefix="transformer", adapter_name="x")
    assert lora_layers(twin) > 0
    img, img_ids, txt, txt_ids, timesteps, guidance = dit_inputs(dit.config)
    with torch.no_grad():
        expected = twin(hidden_states=img, encoder_hidden_states=txt, timestep=timesteps, img_ids=img_ids[0],
                        txt_ids=txt_ids[0], guidance=guidance).sample
        with attach_loras(dit, [(path, 1.0)]):
            ours = dit(img, img_ids, txt, txt_ids, timesteps, guidance)
    assert relative_error(ours, expected) <= 1e-5


def _saved(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata)
    return path
