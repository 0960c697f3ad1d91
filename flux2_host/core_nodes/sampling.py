"""The custom-sampling nodes the FLUX.2 templates use: noise, sampler choice, schedule, guiders and
SamplerCustomAdvanced, plus the FluxKVCache model patch. They hand the engine exactly what the pack's
FLUX.2 Sampler hands it, so both routes give the same latent for the same settings."""

from __future__ import annotations

import dataclasses

import torch

from flux2_core.comfy_layouts import latent_samples
from flux2_core.patched_model import REFERENCE_KV_CACHE, PatchedModel
from flux2_core.samplers import MAX_SEED, SAMPLER_NAMES
from flux2_core.sampling import flux2_sigmas_for_tokens, make_noise

from .conditioning import Conditioning, single_entry
from .latent import MAX_RESOLUTION

SAMPLERS = SAMPLER_NAMES  # ComfyUI's names, euler first
# What ComfyUI's Flux models use when no FluxGuidance node set a guidance value.
COMFY_DEFAULT_GUIDANCE = 3.5


@dataclasses.dataclass(frozen=True)
class Noise:
    seed: int

    def generate(self, latent: torch.Tensor) -> torch.Tensor:
        return make_noise(self.seed, latent.shape)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """What a SAMPLER socket carries: the name of a flux2_core.samplers update rule."""
    name: str


@dataclasses.dataclass(frozen=True, eq=False)
class Guider:
    model: PatchedModel
    positive: Conditioning
    negative: Conditioning | None = None
    cfg: float = 1.0


class RandomNoise:
    CATEGORY = "sampling/custom_sampling/noise"
    FUNCTION = "get_noise"
    RETURN_TYPES = ("NOISE",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"noise_seed": ("INT", {
            "default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
            "tooltip": "Seed of the CPU float32 noise (the same seed gives ComfyUI's noise)."})}}

    def get_noise(self, noise_seed: int) -> tuple[Noise]:
        return (Noise(noise_seed),)


class KSamplerSelect:
    CATEGORY = "sampling/custom_sampling/samplers"
    FUNCTION = "get_sampler"
    RETURN_TYPES = ("SAMPLER",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"sampler_name": (SAMPLERS, {"tooltip": "The sampling method (euler is the FLUX.2 reference; the ancestral ones add noise seeded from the noise seed)."})}}

    def get_sampler(self, sampler_name: str) -> tuple[Sampler]:
        return (Sampler(sampler_name),)


class Flux2Scheduler:
    DESCRIPTION = "The FLUX.2 sigma schedule, shifted for the image size."
    CATEGORY = "sampling/custom_sampling/schedulers"
    FUNCTION = "get_sigmas"
    RETURN_TYPES = ("SIGMAS",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "steps": ("INT", {"default": 20, "min": 1, "max": 4096, "tooltip": "Denoising steps."}),
            "width": ("INT", {"default": 1024, "min": 16, "max": MAX_RESOLUTION, "step": 1,
                              "tooltip": "Width of the generated image in pixels."}),
            "height": ("INT", {"default": 1024, "min": 16, "max": MAX_RESOLUTION, "step": 1,
                               "tooltip": "Height of the generated image in pixels."}),
        }}

    def get_sigmas(self, steps: int, width: int, height: int) -> tuple[torch.Tensor]:
        # ComfyUI counts tokens as round(w * h / 256), also for sizes that are not multiples of 16.
        return (flux2_sigmas_for_tokens(steps, round(width * height / 256)),)


class _GuiderNode:
    """A GUIDER from a MODEL and the subclass's INPUTS (ComfyUI's order: the model first)."""
    CATEGORY = "sampling/custom_sampling/guiders"
    FUNCTION = "get_guider"
    RETURN_TYPES = ("GUIDER",)
    INPUTS: dict = {}

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"model": ("MODEL", {"tooltip": "The diffusion model."}), **cls.INPUTS}}


class BasicGuider(_GuiderNode):
    INPUTS = {"conditioning": ("CONDITIONING", {"tooltip": "The prompt (one model pass per step, no CFG)."})}

    def get_guider(self, model: PatchedModel, conditioning: Conditioning) -> tuple[Guider]:
        return (Guider(model, conditioning),)


class CFGGuider(_GuiderNode):
    INPUTS = {
        "positive": ("CONDITIONING", {"tooltip": "The prompt."}),
        "negative": ("CONDITIONING", {"tooltip": "The negative prompt (unused when cfg is 1)."}),
        "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                          "tooltip": "Classifier-free guidance scale; 1 = a single pass per step."}),
    }

    def get_guider(self, model: PatchedModel, positive: Conditioning, negative: Conditioning,
                   cfg: float) -> tuple[Guider]:
        return (Guider(model, positive, negative, cfg),)


class SamplerCustomAdvanced:
    CATEGORY = "sampling/custom_sampling"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("output", "denoised_output")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "noise": ("NOISE", {"tooltip": "From RandomNoise."}),
            "guider": ("GUIDER", {"tooltip": "From BasicGuider or CFGGuider."}),
            "sampler": ("SAMPLER", {"tooltip": "From KSamplerSelect."}),
            "sigmas": ("SIGMAS", {"tooltip": "From Flux2Scheduler."}),
            "latent_image": ("LATENT", {"tooltip": "The starting latent (empty for text-to-image)."}),
        }}

    def sample(self, noise: Noise, guider: Guider, sampler: Sampler, sigmas: torch.Tensor,
               latent_image: dict) -> tuple[dict, dict]:
        if sampler.name not in SAMPLERS:
            raise ValueError(f"SamplerCustomAdvanced: sampler: expected one of {SAMPLERS}, found {sampler.name!r}")
        start = latent_samples(latent_image, "SamplerCustomAdvanced: latent_image")
        context, options = single_entry(guider.positive, "SamplerCustomAdvanced: guider positive")
        negative_context = negative_references = None
        if guider.negative is not None and guider.cfg != 1.0:
            negative_context, negative_options = single_entry(guider.negative, "SamplerCustomAdvanced: guider negative")
            negative_references = negative_options.get("reference_latents", [])

        # denoised_output is the model's clean-image prediction at the last step, as in ComfyUI.
        last_x0: list[torch.Tensor] = []

        def keep_last_x0(step: int, total: int, x0: torch.Tensor) -> None:
            last_x0[:] = [x0]

        samples = guider.model.sample(
            noise.generate(start), sigmas, context, negative_context=negative_context, cfg=guider.cfg,
            guidance=options.get("guidance", COMFY_DEFAULT_GUIDANCE), latent_image=start,
            reference_latents=options.get("reference_latents", []), negative_reference_latents=negative_references,
            callback=keep_last_x0, sampler=sampler.name, seed=noise.seed)
        output = {**latent_image, "samples": samples.cpu()}
        denoised = {**latent_image, "samples": last_x0[0].cpu()} if last_x0 else output
        return (output, denoised)


class FluxKVCache:
    DESCRIPTION = "Enables the reference-image KV cache (FLUX.2 klein 9B KV): reference keys/values are computed once."
    CATEGORY = "advanced/model_patches/flux"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with the KV cache switched on.",)
    EXPERIMENTAL = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"model": ("MODEL", {"tooltip": "The model to use the KV cache on."})}}

    def patch(self, model: PatchedModel) -> tuple[PatchedModel]:
        return (model.with_option(REFERENCE_KV_CACHE, True),)


NODE_CLASS_MAPPINGS = {
    "RandomNoise": RandomNoise,
    "KSamplerSelect": KSamplerSelect,
    "Flux2Scheduler": Flux2Scheduler,
    "BasicGuider": BasicGuider,
    "CFGGuider": CFGGuider,
    "SamplerCustomAdvanced": SamplerCustomAdvanced,
    "FluxKVCache": FluxKVCache,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxKVCache": "Flux KV Cache",
}
