"""The reference K/V cache (FLUX.2 klein 9B KV) on a tiny random DiT with the real architecture, in fp32.

Parity reference: diffusers' Flux2KleinKVPipeline, where references get timestep-0 modulation, attend only to
each other, and their keys/values are stored at the first step and reused at the later ones. Ours runs the
references once before the first step (nothing else flows into them, so that is the same computation) and
every step attends to the cache. Checked: whole generations with one and two references (and a batch of 2)
against diffusers; variant detection from names and metadata; the FluxKVCache node graph against the
pipeline; the batch/CFG bookkeeping of the cache; that no cache outlives its call.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinKVPipeline
from tiny_models import (
    HEIGHT,
    MAX_RELATIVE_ERROR,
    PROMPT,
    TEXT_HIDDEN,
    WIDTH,
    assert_same_generation,
    diffusers_pipeline,
    dit_config,
    generator,
    ours,
    random_image,
    reference_images,
    theirs,
    write_dit,
    write_text_encoder,
    write_vae,
)

from flux2_core import Flux2Pipeline
from flux2_core.dit import ReferenceKVCache
from flux2_core.patched_model import PatchedModel
from flux2_core.references import DIFFUSERS_REFERENCE_PIXEL_CAP
from flux2_core.sampling import flux2_sigmas, make_noise, sample
from flux2_core.variants import FULL_SIZE_DIT, VARIANTS, guess_variant
from flux2_host import core_nodes

CORE = core_nodes.NODE_CLASS_MAPPINGS
KV_FILE = "flux-2-klein-9b-kv.safetensors"


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@dataclass
class KleinKV:
    pipe: Flux2Pipeline  # loaded from a "-kv" file name
    diffusers_pipe: Flux2KleinKVPipeline
    prompt_embeds: torch.Tensor  # diffusers' own encoding of PROMPT


@pytest.fixture(scope="module")
def klein_kv(tmp_path_factory) -> KleinKV:
    # The folder name is part of the variant hint: "models" says neither kv nor base.
    root = tmp_path_factory.mktemp("models")
    dit, vae, qwen3 = root / KV_FILE, root / "ae.safetensors", root / "qwen3"
    write_dit(dit, guidance_embed=False, seed=21)
    write_vae(vae, seed=22)
    write_text_encoder("qwen3", qwen3, seed=23)

    pipe = Flux2Pipeline.from_files(dit, vae, qwen3, device="cpu", dtype=torch.float32)
    diffusers_pipe = diffusers_pipeline(Flux2KleinKVPipeline, dit, vae, qwen3, "qwen3", guidance_embed=False)
    prompt_embeds = Flux2KleinKVPipeline._get_qwen3_prompt_embeds(diffusers_pipe.text_encoder,
                                                                  diffusers_pipe.tokenizer, PROMPT)
    return KleinKV(pipe, diffusers_pipe, prompt_embeds)


def test_kv_variant_comes_from_a_kv_word_in_the_name_or_metadata() -> None:
    kv = VARIANTS["klein-9b-kv"]
    assert (kv.family, kv.steps, kv.guidance, kv.cfg, kv.reference_kv_cache) == ("klein-9b", 4, None, 1.0, True)
    assert not any(v.reference_kv_cache for name, v in VARIANTS.items() if name != "klein-9b-kv")

    klein_9b, klein_4b = FULL_SIZE_DIT["klein-9b"], FULL_SIZE_DIT["klein-4b"]
    assert guess_variant(klein_9b, "diffusion_models/flux-2-klein-9b-kv-fp8.safetensors") == "klein-9b-kv"
    assert guess_variant(klein_9b, "FLUX.2-klein-9b-kv/transformer") == "klein-9b-kv"  # diffusers folder
    assert guess_variant(klein_9b, "flux2_klein_9b_kv.safetensors") == "klein-9b-kv"
    assert guess_variant(klein_9b, "", {"modelspec.title": "FLUX.2 [klein] 9B KV"}) == "klein-9b-kv"
    # Not a word of its own, or not a name: no KV.
    assert guess_variant(klein_9b, "flux-2-klein-9b-kvasir.safetensors") == "klein-9b"
    assert guess_variant(klein_9b, "flux-2-klein-9b.safetensors", {"modelspec.description": "no kv"}) == "klein-9b"
    # Only the 9B has a KV release; the tiny test DiT takes its size from the name.
    assert guess_variant(klein_4b, "flux-2-klein-4b-kv.safetensors") == "klein-4b"
    assert guess_variant(dit_config(guidance_embed=False), KV_FILE) == "klein-9b-kv"


def test_pipeline_loads_the_kv_file_as_the_kv_variant(klein_kv) -> None:
    assert klein_kv.pipe.variant == "klein-9b-kv"
    assert klein_kv.pipe.dit.variant == "klein-9b-kv"


@pytest.mark.parametrize("count, batch", [(1, 1), (2, 1), (2, 2)])
def test_generation_with_references_matches_diffusers_kv_pipeline(klein_kv, count: int, batch: int) -> None:
    images = reference_images(count)
    mine = ours(klein_kv.pipe, PROMPT, seed=13, batch_size=batch, reference_images=images,
                reference_pixel_cap=DIFFUSERS_REFERENCE_PIXEL_CAP)  # variant defaults: 4 steps, no CFG
    reference = theirs(klein_kv.diffusers_pipe, image=images, prompt_embeds=klein_kv.prompt_embeds,
                       num_inference_steps=4, num_images_per_prompt=batch, generator=generator(13))
    assert_same_generation(mine, reference)


def test_the_cache_changes_the_result_compared_with_plain_references(klein_kv) -> None:
    """The KV scheme is a different conditioning, not a speed trick: a real difference, far above the tolerance."""
    plain = Flux2Pipeline(klein_kv.pipe.dit, klein_kv.pipe.vae, klein_kv.pipe.text_encoder, variant="klein-9b")
    options = {"seed": 14, "reference_images": reference_images(1), "output_type": "latent"}
    cached = klein_kv.pipe(PROMPT, width=WIDTH, height=HEIGHT, **options)
    assert relative_difference(plain(PROMPT, width=WIDTH, height=HEIGHT, **options), cached) > 20 * MAX_RELATIVE_ERROR


def node_graph_latent(model: PatchedModel, clip, vae, images: list, seed: int, steps: int) -> torch.Tensor:
    """The klein 9B KV edit template's wiring: CLIPTextEncode -> ReferenceLatent per image -> CFGGuider(cfg 1,
    ConditioningZeroOut negative) -> SamplerCustomAdvanced with Flux2Scheduler and EmptyFlux2LatentImage."""
    conditioning = CORE["CLIPTextEncode"]().encode(clip, PROMPT)[0]
    for image in images:
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).unsqueeze(0)
        conditioning = CORE["ReferenceLatent"]().append(conditioning, CORE["VAEEncode"]().encode(vae, pixels)[0])[0]
    negative = CORE["ConditioningZeroOut"]().zero_out(conditioning)[0]
    guider = CORE["CFGGuider"]().get_guider(model, conditioning, negative, 1.0)[0]
    output, _ = CORE["SamplerCustomAdvanced"]().sample(
        CORE["RandomNoise"]().get_noise(seed)[0], guider, CORE["KSamplerSelect"]().get_sampler("euler")[0],
        CORE["Flux2Scheduler"]().get_sigmas(steps, WIDTH, HEIGHT)[0],
        CORE["EmptyFlux2LatentImage"]().generate(WIDTH, HEIGHT, 1)[0])
    return output["samples"]


def test_flux_kv_cache_node_graph_equals_the_pipeline(klein_kv) -> None:
    pipe, images = klein_kv.pipe, reference_images(2)
    expected = pipe(PROMPT, width=WIDTH, height=HEIGHT, seed=15, reference_images=images, output_type="latent")

    # A DiT loaded as plain klein 9B needs the node; one loaded as the KV variant caches without it.
    plain_model = PatchedModel(pipe.dit, "klein-9b")
    with_node = CORE["FluxKVCache"]().patch(plain_model)[0]
    for model in (with_node, PatchedModel(pipe.dit, "klein-9b-kv")):
        latent = node_graph_latent(model, pipe.text_encoder, pipe.vae, images, seed=15, steps=4)
        torch.testing.assert_close(latent, expected, rtol=1e-5, atol=1e-5)
    without_node = node_graph_latent(plain_model, pipe.text_encoder, pipe.vae, images, seed=15, steps=4)
    assert relative_difference(without_node, expected) > 20 * MAX_RELATIVE_ERROR


def test_sample_uses_the_cache_by_default_only_for_a_kv_dit(klein_kv) -> None:
    dit = klein_kv.pipe.dit
    noise, sigmas = make_noise(3, (1, 128, 4, 6)), flux2_sigmas(2, WIDTH, HEIGHT)
    context, reference_latents = torch.randn(1, 8, 3 * TEXT_HIDDEN), [torch.randn(1, 128, 3, 2)]

    def run(**options) -> torch.Tensor:
        return sample(dit, noise, sigmas, context, reference_latents=reference_latents, **options)

    assert dit.variant == "klein-9b-kv"
    assert torch.equal(run(), run(reference_kv_cache=True))
    assert not torch.allclose(run(), run(reference_kv_cache=False))


def test_cfg_batch_with_per_sample_references_equals_one_sample_at_a_time(klein_kv) -> None:
    """The cache is built at the references' batch: batch 1 is shared by all samples and both CFG passes,
    per-sample references are tiled for the passes. Each row must equal that sample run alone."""
    dit = klein_kv.pipe.dit
    noise, sigmas = make_noise(4, (2, 128, 4, 6)), flux2_sigmas(3, WIDTH, HEIGHT)
    context, negative = torch.randn(1, 8, 3 * TEXT_HIDDEN), torch.randn(1, 8, 3 * TEXT_HIDDEN)
    shared, per_sample = torch.randn(1, 128, 2, 3), torch.randn(2, 128, 3, 2)
    options = {"negative_context": negative, "cfg": 3.0, "reference_kv_cache": True}

    batched = sample(dit, noise, sigmas, context, reference_latents=[shared, per_sample], **options)
    for row in range(2):
        alone = sample(dit, noise[row:row + 1], sigmas, context,
                       reference_latents=[shared, per_sample[row:row + 1]], **options)
        torch.testing.assert_close(batched[row:row + 1], alone, rtol=1e-5, atol=1e-5)


def live_caches() -> int:
    gc.collect()
    return sum(type(thing) is ReferenceKVCache for thing in gc.get_objects())


def test_no_cache_outlives_its_call(klein_kv) -> None:
    pipe = klein_kv.pipe
    during: list[int] = []

    def generate(images: list, count_caches: bool = False) -> torch.Tensor:
        def callback(step: int, total: int, x0: torch.Tensor) -> None:
            if count_caches and step == 1:
                during.append(live_caches())

        return pipe(PROMPT, width=WIDTH, height=HEIGHT, steps=2, seed=16, reference_images=images,
                    callback=callback, output_type="latent")

    first = generate(reference_images(1), count_caches=True)
    assert during == [1] and live_caches() == 0
    other = generate([random_image(80, 64, seed=5)])
    # Another call in between, with another reference, leaves nothing behind that changes the first result.
    assert torch.equal(generate(reference_images(1)), first)
    assert not torch.allclose(other, first)
