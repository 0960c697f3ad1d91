"""Whole generations on tiny random models in fp32: Flux2Pipeline vs diffusers' FLUX.2 pipelines.

Ours loads real files (BFL DiT, BFL VAE, HF text-encoder folder) through `Flux2Pipeline.from_files`; diffusers
gets the same tensors converted to its names, the same text-encoder folder and tokenizer, and a
FlowMatchEulerDiscreteScheduler as its pipelines expect. Both draw the initial noise from a CPU generator
with the same seed. Checked: the final latent (max |ours - diffusers| / max |diffusers| <= 1e-4) and the
decoded 8-bit images (within one level).

diffusers has no plain FLUX.2 img2img pipeline. img2img is checked twice: against Flux2KleinInpaintPipeline
with an all-white mask (which is img2img with the source image also given as a reference), and without
references against the flow formula x = (1 - sigma) * x0 + sigma * noise written out here, denoised by
diffusers' Flux2KleinPipeline on the remaining sigmas.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from diffusers import Flux2Pipeline as DiffusersFlux2Pipeline
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from diffusers.pipelines.flux2.pipeline_flux2_klein_inpaint import Flux2KleinInpaintPipeline
from PIL import Image
from tiny_models import (
    HEIGHT,
    PROMPT,
    WIDTH,
    assert_same_generation,
    diffusers_pipeline,
    diffusers_transformer,
    diffusers_vae,
    dit_config,
    flux2_scheduler,
    generator,
    hf_text_encoder,
    ours,
    random_image,
    reference_images,
    theirs,
    write_dit,
    write_text_encoder,
    write_vae,
)
from transformers import Qwen3ForCausalLM

from flux2_core import Flux2Pipeline, load_dit
from flux2_core.references import DIFFUSERS_REFERENCE_PIXEL_CAP

NEGATIVE = "blurry, grey, low detail"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parity_models")
    paths = {
        "klein": root / "flux-2-klein-4b.safetensors",
        "klein_base": root / "flux-2-klein-base-4b.safetensors",
        "dev": root / "flux2-dev.safetensors",
        "vae": root / "ae.safetensors",
        "qwen3": root / "qwen3",
        "mistral3": root / "mistral3",
    }
    for seed, key in enumerate(("klein", "klein_base", "dev")):
        write_dit(paths[key], guidance_embed=key == "dev", seed=seed)
    write_vae(paths["vae"], seed=3)
    for seed, kind in enumerate(("qwen3", "mistral3"), start=4):
        write_text_encoder(kind, paths[kind], seed=seed)
    return paths


@dataclass
class Klein:
    distilled: Flux2Pipeline
    base: Flux2Pipeline
    text_encoder: Qwen3ForCausalLM
    tokenizer: object
    vae: AutoencoderKLFlux2
    distilled_transformer: Flux2Transformer2DModel
    base_transformer: Flux2Transformer2DModel
    embeddings: dict[str, torch.Tensor]

    def pipeline(self, distilled: bool = True, scheduler=None, cls=Flux2KleinPipeline):
        return cls(scheduler=scheduler or flux2_scheduler(), vae=self.vae, text_encoder=self.text_encoder,
                   tokenizer=self.tokenizer, is_distilled=distilled,
                   transformer=self.distilled_transformer if distilled else self.base_transformer)


@pytest.fixture(scope="module")
def klein(files) -> Klein:
    distilled = Flux2Pipeline.from_files(files["klein"], files["vae"], files["qwen3"], device="cpu",
                                         dtype=torch.float32)
    # The second pipeline is built from loaded models and shares the VAE and text encoder.
    base = Flux2Pipeline(load_dit(files["klein_base"], device="cpu", dtype=torch.float32), distilled.vae,
                         distilled.text_encoder)
    text_encoder, tokenizer = hf_text_encoder("qwen3", files["qwen3"])
    # diffusers' own prompt encoder, run once per prompt (its pipelines accept the result as prompt_embeds).
    embeddings = {prompt: Flux2KleinPipeline._get_qwen3_prompt_embeds(text_encoder, tokenizer, prompt)
                  for prompt in (PROMPT, NEGATIVE)}
    return Klein(distilled, base, text_encoder, tokenizer, diffusers_vae(files["vae"]),
                 diffusers_transformer(files["klein"], dit_config(False)),
                 diffusers_transformer(files["klein_base"], dit_config(False)), embeddings)


def test_variants_come_from_file_names(klein):
    assert klein.distilled.variant == "klein-4b"
    assert klein.base.variant == "klein-base-4b"


def test_klein_distilled_defaults_match_diffusers(klein):
    mine = ours(klein.distilled, PROMPT, seed=11)  # variant defaults: 4 steps, no CFG
    reference = theirs(klein.pipeline(distilled=True), prompt_embeds=klein.embeddings[PROMPT],
                       num_inference_steps=4, generator=generator(11))
    assert_same_generation(mine, reference)


def test_klein_base_cfg_with_negative_prompt_and_batch_matches_diffusers(klein):
    mine = ours(klein.base, PROMPT, negative_prompt=NEGATIVE, steps=6, seed=12, batch_size=2)  # default cfg 4
    reference = theirs(klein.pipeline(distilled=False), prompt_embeds=klein.embeddings[PROMPT],
                       negative_prompt_embeds=klein.embeddings[NEGATIVE], guidance_scale=4.0,
                       num_inference_steps=6, num_images_per_prompt=2, generator=generator(12))
    assert_same_generation(mine, reference)
    assert not torch.equal(mine.latent[0], mine.latent[1])


@pytest.mark.parametrize("count", [1, 2])
def test_reference_images_match_diffusers(klein, count):
    references = reference_images(count)
    mine = ours(klein.distilled, PROMPT, steps=3, seed=13, reference_images=references,
                reference_pixel_cap=DIFFUSERS_REFERENCE_PIXEL_CAP)
    reference = theirs(klein.pipeline(distilled=True), image=references, prompt_embeds=klein.embeddings[PROMPT],
                       num_inference_steps=3, generator=generator(13))
    assert_same_generation(mine, reference)


def test_img2img_with_source_reference_matches_diffusers_inpaint_with_full_mask(klein):
    source = random_image(WIDTH, HEIGHT, seed=3)
    mine = ours(klein.distilled, PROMPT, steps=5, seed=14, image=source, denoise=0.6, reference_images=[source])
    reference = theirs(klein.pipeline(distilled=True, cls=Flux2KleinInpaintPipeline), image=source,
                       mask_image=Image.new("L", (WIDTH, HEIGHT), 255), strength=0.6,
                       prompt_embeds=klein.embeddings[PROMPT], num_inference_steps=5, generator=generator(14))
    assert_same_generation(mine, reference)


def test_img2img_matches_the_flow_formula_on_diffusers_loop(klein):
    steps, denoise, seed = 5, 0.6, 15
    source = random_image(WIDTH, HEIGHT, seed=4)
    mine = ours(klein.distilled, PROMPT, steps=steps, seed=seed, image=source, denoise=denoise)

    schedule = flux2_scheduler()
    schedule.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps),
                           mu=compute_empirical_mu((WIDTH // 16) * (HEIGHT // 16), steps))
    remaining = schedule.sigmas[int(steps - steps * denoise):]  # diffusers' strength rule; ends with 0
    pipe = klein.pipeline(distilled=True, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0))  # sigmas as given
    clean = pipe._encode_vae_image(pipe.image_processor.preprocess(source, HEIGHT, WIDTH), generator=None)
    noise = torch.randn(clean.shape, generator=generator(seed))
    start = (1 - remaining[0]) * clean + remaining[0] * noise
    reference = theirs(pipe, latents=start, sigmas=remaining[:-1].tolist(), num_inference_steps=len(remaining) - 1,
                       prompt_embeds=klein.embeddings[PROMPT])
    assert_same_generation(mine, reference)


def test_latent_output_is_the_final_latent(klein):
    latent = klein.distilled(PROMPT, width=WIDTH, height=HEIGHT, steps=2, seed=16, output_type="latent")
    mine = ours(klein.distilled, PROMPT, steps=2, seed=16)
    assert latent.dtype == torch.float32 and latent.shape == (1, 128, HEIGHT // 16, WIDTH // 16)
    assert torch.equal(latent, mine.latent)


def test_dev_embedded_guidance_with_mistral_matches_diffusers(files):
    pipe = Flux2Pipeline.from_files(files["dev"], files["vae"], files["mistral3"], device="cpu", dtype=torch.float32)
    assert pipe.variant == "flux2-dev"
    mine = ours(pipe, PROMPT, steps=4, seed=17)  # variant default: embedded guidance 4, no CFG

    reference_pipe = diffusers_pipeline(DiffusersFlux2Pipeline, files["dev"], files["vae"], files["mistral3"],
                                        "mistral3", guidance_embed=True)
    reference = theirs(reference_pipe, prompt=PROMPT, guidance_scale=4.0, num_inference_steps=4,
                       generator=generator(17))
    assert_same_generation(mine, reference)
