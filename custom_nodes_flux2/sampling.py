"""The one-node sampler: seed, schedule, CFG / guidance and references in one place, with the variant's
defaults wherever a setting is left at 0."""

from __future__ import annotations

from flux2_core.comfy_layouts import latent_samples
from flux2_core.patched_model import PatchedModel
from flux2_core.samplers import MAX_SEED, SAMPLER_NAMES
from flux2_core.sampling import PIXELS_PER_LATENT_CELL, flux2_sigmas, make_noise, sigmas_for_denoise

from .comfy_bridge import sampling_hooks
from .conditioning import Flux2Conditioning

# ComfyUI's sampler names flux2_core implements, euler (the FLUX.2 reference) first.
SAMPLERS = SAMPLER_NAMES


class Flux2Sampler:
    DESCRIPTION = ("Generates a FLUX.2 latent: the FLUX.2 schedule for the image size, seeded noise, sampler steps "
                   "with embedded guidance (dev) or classifier-free guidance (base klein). Steps, guidance and cfg "
                   "at 0 use the model variant's defaults (distilled klein: 4 steps, no CFG; base klein: 50 steps, "
                   "cfg 4; dev: 50 steps, guidance 4).")
    CATEGORY = "FLUX.2/sampling"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The denoised latent; decode it with FLUX.2 VAE Decode.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("FLUX2_MODEL", {"tooltip": "From Load FLUX.2 Model."}),
                "positive": ("FLUX2_CONDITIONING", {"tooltip": "The prompt, with any reference images."}),
                "latent": ("LATENT", {"tooltip": "Empty latent for text-to-image, or an encoded image for "
                                                 "image-to-image (with denoise < 1). Its size sets the output size. "
                                                 "A noise_mask on it (SetLatentNoiseMask) inpaints: only the masked "
                                                 "region changes."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                                 "tooltip": "Noise seed; the same seed gives the same image as ComfyUI."}),
                "steps": ("INT", {"default": 0, "min": 0, "max": 10000,
                                  "tooltip": "Denoising steps; 0 = the variant's default."}),
                "guidance": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                       "tooltip": "Embedded guidance (FLUX.2-dev only; ignored by klein); "
                                                  "0 = the variant's default (4.0)."}),
                "cfg": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                  "tooltip": "Classifier-free guidance scale; 1 = off (one model pass per step); "
                                             "0 = the variant's default (base klein 4.0, others off)."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                      "tooltip": "1 = generate from pure noise; lower keeps more of the input "
                                                 "latent (image-to-image strength)."}),
                "sampler_name": (SAMPLERS, {"default": "euler", "tooltip": "The sampling method, with ComfyUI's names and update rules; ancestral ones add noise seeded from the seed."}),
            },
            "optional": {
                "negative": ("FLUX2_CONDITIONING", {
                    "tooltip": "Negative prompt for CFG; when absent the empty prompt is used. Its references, if "
                               "any, must be the positive's (both passes see the positive's references)."}),
            },
        }

    def sample(self, model: PatchedModel, positive: Flux2Conditioning, latent: dict, seed: int, steps: int,
               guidance: float, cfg: float, denoise: float, sampler_name: str,
               negative: Flux2Conditioning | None = None) -> tuple[dict]:
        if sampler_name not in SAMPLERS:
            raise ValueError(f"Flux2Sampler: sampler_name: expected one of {SAMPLERS}, found {sampler_name!r}")
        defaults = model.defaults
        steps = steps or defaults.steps
        cfg = cfg or defaults.cfg
        start = latent_samples(latent, "Flux2Sampler: latent")
        height, width = start.shape[-2] * PIXELS_PER_LATENT_CELL, start.shape[-1] * PIXELS_PER_LATENT_CELL
        sigmas = sigmas_for_denoise(flux2_sigmas(steps, width, height), denoise)

        negative_context = negative_references = None
        if cfg != 1.0:
            negative = negative or positive.empty_prompt()
            negative_context = negative.embeddings
            negative_references = negative.reference_latents if negative.references else None

        callback, cancel = sampling_hooks(len(sigmas) - 1)
        samples = model.sample(
            make_noise(seed, start.shape), sigmas, positive.embeddings,
            negative_context=negative_context, cfg=cfg, guidance=guidance or None, latent_image=start,
            reference_latents=positive.reference_latents, negative_reference_latents=negative_references,
            callback=callback, cancel=cancel, sampler=sampler_name, seed=seed, mask=latent.get("noise_mask"))
        return ({**latent, "samples": samples.cpu()},)


NODE_CLASS_MAPPINGS = {"Flux2Sampler": Flux2Sampler}
NODE_DISPLAY_NAME_MAPPINGS = {"Flux2Sampler": "FLUX.2 Sampler"}
