"""The custom-sampling nodes the FLUX.2 templates use: noise, sampler choice, schedule, guiders and
SamplerCustomAdvanced, plus the FluxKVCache model patch. They hand the engine exactly what the pack's
FLUX.2 Sampler hands it, so both routes give the same latent for the same settings."""

from __future__ import annotations

import dataclasses

import torch

from flux2_core.comfy_layouts import latent_samples, pixels_input
from flux2_core.patched_model import REFERENCE_KV_CACHE, PatchedModel
from flux2_core.samplers import MAX_SEED, SAMPLER_NAMES
from flux2_core.sampling import (LATENT_CHANNELS, DifferentialMask, PromptEntry, flux2_sigmas_for_tokens, make_noise,
                                 same_tensors)
from flux2_core.schedulers import (
    FLUX2_SHIFT,
    MODEL_SAMPLING_SHIFT,
    SCHEDULER_NAMES,
    FlowModelSampling,
    beta_sigmas,
    karras_sigmas,
    flux_shift_for_size,
    sigmas_for_steps,
)

from .conditioning import Conditioning

SAMPLERS = SAMPLER_NAMES  # ComfyUI's names, euler first
# The PatchedModel option DifferentialDiffusion sets (its strength); the sampler nodes read it.
DIFFERENTIAL_DIFFUSION = "differential_diffusion"
# ComfyUI's whole sampler list (comfy.samplers.SAMPLER_NAMES): KSampler's combo offers it so that shared workflows
# validate; a sampler outside SAMPLERS fails when it runs, with an error naming it.
COMFY_SAMPLER_NAMES = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2", "dpm_2_ancestral",
    "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu",
    "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep",
    "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
    "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc",
    "uni_pc_bh2"]
DISCARD_PENULTIMATE_SIGMA_SAMPLERS = {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"}
# What ComfyUI's Flux models use when no FluxGuidance node set a guidance value.
COMFY_DEFAULT_GUIDANCE = 3.5


@dataclasses.dataclass(frozen=True)
class Noise:
    seed: int

    def generate(self, latent: torch.Tensor) -> torch.Tensor:
        return make_noise(self.seed, latent.shape)


@dataclasses.dataclass(frozen=True)
class EmptyNoise(Noise):
    """No noise (DisableNoise, add_noise off): sampling continues from the latent as it is. The seed still seeds
    the ancestral samplers, as in ComfyUI."""

    def generate(self, latent: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(latent)


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


class _NoiseNode:
    CATEGORY = "sampling/custom_sampling/noise"
    FUNCTION = "get_noise"
    RETURN_TYPES = ("NOISE",)


class RandomNoise(_NoiseNode):
    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"noise_seed": ("INT", {
            "default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
            "tooltip": "Seed of the CPU float32 noise (the same seed gives ComfyUI's noise)."})}}

    def get_noise(self, noise_seed: int) -> tuple[Noise]:
        return (Noise(noise_seed),)


class DisableNoise(_NoiseNode):
    DESCRIPTION = "No noise: for continuing from a latent that still has its noise."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {}}

    def get_noise(self) -> tuple[Noise]:
        return (EmptyNoise(0),)


class KSamplerSelect:
    CATEGORY = "sampling/custom_sampling/samplers"
    FUNCTION = "get_sampler"
    RETURN_TYPES = ("SAMPLER",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"sampler_name": (SAMPLERS, {"tooltip": "The sampling method (euler is the FLUX.2 reference; the ancestral ones add noise seeded from the noise seed)."})}}

    def get_sampler(self, sampler_name: str) -> tuple[Sampler]:
        return (Sampler(sampler_name),)


def _model_input() -> tuple:
    return ("MODEL", {"tooltip": "The diffusion model."})


def _steps_input(maximum: int = 10000) -> tuple:
    return ("INT", {"default": 20, "min": 1, "max": maximum, "tooltip": "Denoising steps."})


class _SchedulerNode:
    """A node that makes a SIGMAS schedule."""
    CATEGORY = "sampling/custom_sampling/schedulers"
    FUNCTION = "get_sigmas"
    RETURN_TYPES = ("SIGMAS",)


class Flux2Scheduler(_SchedulerNode):
    DESCRIPTION = "The FLUX.2 sigma schedule, shifted for the image size."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "steps": _steps_input(maximum=4096),
            "width": pixels_input(1024, "Width of the generated image in pixels.", minimum=16),
            "height": pixels_input(1024, "Height of the generated image in pixels.", minimum=16),
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
        return {"required": {"model": _model_input(), **cls.INPUTS}}


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
        return run_guider(guider, sampler.name, sigmas, latent_image, noise, "SamplerCustomAdvanced")


def check_sampler(name: str, where: str) -> None:
    if name not in SAMPLERS:
        raise ValueError(f"{where}: expected one of {SAMPLERS} (the ComfyUI samplers this host implements), "
                         f"found {name!r}")


def flux2_latent(latent: dict, where: str) -> torch.Tensor:
    """The LATENT's samples as a FLUX.2 latent. An all-zero latent of another channel count (EmptyLatentImage) is
    widened to 128 channels, as ComfyUI does for empty latents."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if isinstance(samples, torch.Tensor) and samples.ndim == 4 and samples.shape[1] != LATENT_CHANNELS \
            and not samples.any():
        latent = {**latent, "samples": torch.zeros(samples.shape[0], LATENT_CHANNELS, *samples.shape[2:])}
    return latent_samples(latent, where)


def _prompts(conditioning: Conditioning, sampling: FlowModelSampling, where: str) -> tuple[list[PromptEntry], dict]:
    """A CONDITIONING's entries for the engine (strength, timestep range as sigmas) and the first entry's options.
    The engine runs one set of references and one guidance value, so entries must agree on their references."""
    if not isinstance(conditioning, list) or not conditioning:
        raise ValueError(f"{where}: expected a CONDITIONING with at least one entry, found {conditioning!r}")
    first_options = conditioning[0][1]
    entries = []
    for embeddings, options in conditioning:
        if not same_tensors(options.get("reference_latents", []), first_options.get("reference_latents", [])):
            raise NotImplementedError(f"{where}: combined conditioning entries with different reference latents; "
                                      "this host samples all entries with the same references")
        entries.append(PromptEntry(embeddings, float(options.get("strength", 1.0)),
                                   sampling.percent_to_sigma(options.get("start_percent", 0.0)),
                                   sampling.percent_to_sigma(options.get("end_percent", 1.0))))
    return entries, first_options


def run_guider(guider: Guider, sampler_name: str, sigmas: torch.Tensor, latent: dict, noise: Noise,
               where: str) -> tuple[dict, dict]:
    """What every ComfyUI-style sampler node does: noise (or none), the latent's noise_mask, the guider's model and
    prompts, `sigmas`; returns (output, denoised_output) LATENTs carrying the input latent's other keys.

    As in ComfyUI, no sigmas return the latent unchanged, and a run that stops above sigma 0 (leftover noise) divides
    the result by 1 - the last sigma (the flow model's inverse noise scaling)."""
    check_sampler(sampler_name, f"{where}: sampler")
    start = flux2_latent(latent, f"{where}: latent_image")
    if len(sigmas) < 2:
        return ({**latent, "samples": start}, {**latent, "samples": start})
    sampling = model_sampling(guider.model)
    context, options = _prompts(guider.positive, sampling, f"{where}: positive")
    negative_context = negative_references = None
    if guider.negative is not None and guider.cfg != 1.0:
        negative_context, negative_options = _prompts(guider.negative, sampling, f"{where}: negative")
        negative_references = negative_options.get("reference_latents", [])

    # denoised_output is the model's clean-image prediction at the last step, as in ComfyUI.
    last_x0: list[torch.Tensor] = []

    def keep_last_x0(step: int, total: int, x0: torch.Tensor) -> None:
        last_x0[:] = [x0]

    samples = guider.model.sample(
        noise.generate(start), sigmas, context, negative_context=negative_context, cfg=guider.cfg,
        guidance=options.get("guidance", COMFY_DEFAULT_GUIDANCE), latent_image=start,
        reference_latents=options.get("reference_latents", []), negative_reference_latents=negative_references,
        callback=keep_last_x0, sampler=sampler_name, seed=noise.seed, mask=latent.get("noise_mask"),
        differential=_differential(guider.model, sampling))
    if float(sigmas[-1]) > 0.0:
        samples = samples / (1.0 - float(sigmas[-1]))
    output = {**latent, "samples": samples.cpu()}
    denoised = {**latent, "samples": last_x0[0].cpu()} if last_x0 else output
    return (output, denoised)


def _differential(model: PatchedModel, sampling: FlowModelSampling) -> DifferentialMask | None:
    strength = model.options.get(DIFFERENTIAL_DIFFUSION)
    return None if strength is None else DifferentialMask(strength, sampling.sigma_min)


def model_sampling(model: PatchedModel) -> FlowModelSampling:
    """The flow model sampling the named schedulers use: FLUX.2's, or what ModelSamplingFlux set."""
    return FlowModelSampling(model.options.get(MODEL_SAMPLING_SHIFT, FLUX2_SHIFT))


def ksampler_sigmas(model: PatchedModel, scheduler: str, steps: int, denoise: float, sampler_name: str) -> torch.Tensor:
    """KSampler's schedule: dpm_2-style samplers compute one step more and drop the next-to-last sigma."""
    if sampler_name in DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
        sigmas = sigmas_for_steps(scheduler, steps + 1, denoise, model_sampling(model))
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas_for_steps(scheduler, steps, denoise, model_sampling(model))


def _seed_input() -> tuple:
    return ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                    "tooltip": "The random seed used for creating the noise."})


def _cfg_input() -> tuple:
    return ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                      "tooltip": "Classifier-free guidance scale; 1 = one model pass per step (distilled klein)."})


class KSampler:
    DESCRIPTION = "Uses the provided model, positive and negative conditioning to denoise the latent image."
    CATEGORY = "sampling"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model used for denoising the input latent."}),
            "seed": _seed_input(),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "The number of denoising steps."}),
            "cfg": _cfg_input(),
            "sampler_name": (COMFY_SAMPLER_NAMES, {"tooltip": "The sampling algorithm (ComfyUI's list; the host "
                                                              f"runs {', '.join(SAMPLERS)})."}),
            "scheduler": (SCHEDULER_NAMES, {"tooltip": "How the noise levels are spaced (flow model sampling)."}),
            "positive": ("CONDITIONING", {"tooltip": "The prompt."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt (unused when cfg is 1)."}),
            "latent_image": ("LATENT", {"tooltip": "The latent image to denoise."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "The amount of denoising; lower keeps more of the input latent."}),
        }}

    def sample(self, model: PatchedModel, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
               positive: Conditioning, negative: Conditioning, latent_image: dict,
               denoise: float = 1.0) -> tuple[dict]:
        check_sampler(sampler_name, "KSampler: sampler_name")
        sigmas = ksampler_sigmas(model, scheduler, steps, denoise, sampler_name)
        guider = Guider(model, positive, negative, cfg)
        return (run_guider(guider, sampler_name, sigmas, latent_image, Noise(seed), "KSampler")[0],)


class KSamplerAdvanced:
    DESCRIPTION = "KSampler over a slice of the schedule, with or without fresh noise (for multi-pass sampling)."
    CATEGORY = "sampling"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        required = KSampler.INPUT_TYPES()["required"]
        return {"required": {
            "model": required["model"],
            "add_noise": (["enable", "disable"], {"tooltip": "disable: continue from a latent with leftover noise."}),
            "noise_seed": _seed_input(),
            "steps": required["steps"],
            "cfg": required["cfg"],
            "sampler_name": required["sampler_name"],
            "scheduler": required["scheduler"],
            "positive": required["positive"],
            "negative": required["negative"],
            "latent_image": required["latent_image"],
            "start_at_step": ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip": "First step to run."}),
            "end_at_step": ("INT", {"default": 10000, "min": 0, "max": 10000, "tooltip": "Step to stop at."}),
            "return_with_leftover_noise": (["disable", "enable"], {"tooltip": "enable: stop above sigma 0."}),
        }}

    def sample(self, model: PatchedModel, add_noise: str, noise_seed: int, steps: int, cfg: float,
               sampler_name: str, scheduler: str, positive: Conditioning, negative: Conditioning, latent_image: dict,
               start_at_step: int, end_at_step: int, return_with_leftover_noise: str,
               denoise: float = 1.0) -> tuple[dict]:
        check_sampler(sampler_name, "KSamplerAdvanced: sampler_name")
        sigmas = ksampler_sigmas(model, scheduler, steps, denoise, sampler_name)
        if end_at_step < len(sigmas) - 1:
            sigmas = sigmas[:end_at_step + 1].clone()
            if return_with_leftover_noise != "enable":
                sigmas[-1] = 0.0
        if start_at_step >= len(sigmas) - 1:
            return (latent_image,)
        sigmas = sigmas[start_at_step:]
        guider = Guider(model, positive, negative, cfg)
        noise = Noise(noise_seed) if add_noise == "enable" else EmptyNoise(noise_seed)
        return (run_guider(guider, sampler_name, sigmas, latent_image, noise, "KSamplerAdvanced")[0],)


class SamplerCustom:
    DESCRIPTION = "Samples with a SAMPLER and SIGMAS, CFG and an optional noise seed."
    CATEGORY = "sampling/custom_sampling"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("output", "denoised_output")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": _model_input(),
            "add_noise": ("BOOLEAN", {"default": True, "tooltip": "Off: continue from a latent with leftover noise."}),
            "noise_seed": _seed_input(),
            "cfg": _cfg_input(),
            "positive": ("CONDITIONING", {"tooltip": "The prompt."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt (unused when cfg is 1)."}),
            "sampler": ("SAMPLER", {"tooltip": "From KSamplerSelect."}),
            "sigmas": ("SIGMAS", {"tooltip": "From a scheduler node."}),
            "latent_image": ("LATENT", {"tooltip": "The starting latent."}),
        }}

    def sample(self, model: PatchedModel, add_noise: bool, noise_seed: int, cfg: float, positive: Conditioning,
               negative: Conditioning, sampler: Sampler, sigmas: torch.Tensor, latent_image: dict) -> tuple[dict, dict]:
        noise = Noise(noise_seed) if add_noise else EmptyNoise(noise_seed)
        return run_guider(Guider(model, positive, negative, cfg), sampler.name, sigmas, latent_image, noise,
                          "SamplerCustom")


class BasicScheduler(_SchedulerNode):
    DESCRIPTION = "A named ComfyUI schedule for the model's flow sampling (FLUX.2: mu 2.02, or ModelSamplingFlux's)."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": _model_input(),
            "scheduler": (SCHEDULER_NAMES, {"tooltip": "How the noise levels are spaced."}),
            "steps": _steps_input(),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "Below 1: the last steps of a longer schedule (img2img)."}),
        }}

    def get_sigmas(self, model: PatchedModel, scheduler: str, steps: int, denoise: float) -> tuple[torch.Tensor]:
        return (sigmas_for_steps(scheduler, steps, denoise, model_sampling(model)),)


class BetaSamplingScheduler(_SchedulerNode):
    DESCRIPTION = "The beta schedule with chosen distribution parameters, for the model's flow sampling."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        parameter = {"default": 0.6, "min": 0.0, "max": 50.0, "step": 0.01, "round": False}
        return {"required": {
            "model": _model_input(),
            "steps": _steps_input(),
            "alpha": ("FLOAT", {**parameter, "tooltip": "The beta distribution's alpha."}),
            "beta": ("FLOAT", {**parameter, "tooltip": "The beta distribution's beta."}),
        }}

    def get_sigmas(self, model: PatchedModel, steps: int, alpha: float, beta: float) -> tuple[torch.Tensor]:
        return (beta_sigmas(steps, alpha, beta, model_sampling(model)),)


class KarrasScheduler(_SchedulerNode):
    DESCRIPTION = "Karras et al.'s schedule between explicit sigma_max and sigma_min (for FLUX.2: at most 1)."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        sigma = {"min": 0.0, "max": 5000.0, "step": 0.01, "round": False}
        return {"required": {
            "steps": _steps_input(),
            "sigma_max": ("FLOAT", {"default": 14.614642, **sigma, "tooltip": "The first sigma."}),
            "sigma_min": ("FLOAT", {"default": 0.0291675, **sigma, "tooltip": "The last sigma before 0."}),
            "rho": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.01, "round": False,
                              "tooltip": "Higher: more steps at low noise."}),
        }}

    def get_sigmas(self, steps: int, sigma_max: float, sigma_min: float, rho: float) -> tuple[torch.Tensor]:
        return (karras_sigmas(steps, sigma_min, sigma_max, rho).to(torch.float32),)


class _SplitSigmasNode:
    """A node that cuts a SIGMAS schedule in two."""
    CATEGORY = "sampling/custom_sampling/sigmas"
    FUNCTION = "get_sigmas"
    RETURN_TYPES = ("SIGMAS", "SIGMAS")
    RETURN_NAMES = ("high_sigmas", "low_sigmas")


class SplitSigmasDenoise(_SplitSigmasNode):
    DESCRIPTION = "Splits a schedule so that low_sigmas holds the last round(steps * denoise) steps."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"sigmas": ("SIGMAS", {"tooltip": "The schedule."}),
                             "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                                   "tooltip": "The share of steps for low_sigmas."})}}

    def get_sigmas(self, sigmas: torch.Tensor, denoise: float) -> tuple[torch.Tensor, torch.Tensor]:
        low_steps = round(max(len(sigmas) - 1, 0) * denoise)
        # ComfyUI slices [:-low_steps], which is empty for low_steps 0.
        return (sigmas[:-low_steps], sigmas[-(low_steps + 1):])


class SplitSigmas(_SplitSigmasNode):
    DESCRIPTION = "Splits a schedule at a step: high_sigmas up to it, low_sigmas from it."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"sigmas": ("SIGMAS", {"tooltip": "The schedule."}),
                             "step": ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip": "Where to split."})}}

    def get_sigmas(self, sigmas: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (sigmas[:step + 1], sigmas[step:])


class ModelSamplingFlux:
    DESCRIPTION = ("Sets the flow shift the named schedulers use (KSampler, BasicScheduler): linear in the token "
                   "count width * height / 256, base_shift at 256 tokens and max_shift at 4096.")
    CATEGORY = "advanced/model"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": _model_input(),
            "max_shift": ("FLOAT", {"default": 1.15, "min": 0.0, "max": 100.0, "step": 0.01,
                                    "tooltip": "Shift at 4096 tokens (1024 x 1024)."}),
            "base_shift": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 100.0, "step": 0.01,
                                     "tooltip": "Shift at 256 tokens (256 x 256)."}),
            "width": pixels_input(1024, "Image width in pixels.", minimum=16, step=8),
            "height": pixels_input(1024, "Image height in pixels.", minimum=16, step=8),
        }}

    def patch(self, model: PatchedModel, max_shift: float, base_shift: float, width: int,
              height: int) -> tuple[PatchedModel]:
        return (model.with_option(MODEL_SAMPLING_SHIFT, flux_shift_for_size(width, height, max_shift, base_shift)),)


class DifferentialDiffusion:
    DESCRIPTION = ("Inpainting with a soft mask: each masked pixel is regenerated from the step its mask value "
                   "reaches, so grey mask areas change less than white ones.")
    CATEGORY = "_for_testing"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    EXPERIMENTAL = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"model": _model_input()},
                "optional": {"strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                                    "tooltip": "Below 1: blend with the plain soft mask."})}}

    def apply(self, model: PatchedModel, strength: float = 1.0) -> tuple[PatchedModel]:
        return (model.with_option(DIFFERENTIAL_DIFFUSION, strength),)


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
    "KSampler": KSampler,
    "KSamplerAdvanced": KSamplerAdvanced,
    "SamplerCustom": SamplerCustom,
    "BasicScheduler": BasicScheduler,
    "SplitSigmas": SplitSigmas,
    "SplitSigmasDenoise": SplitSigmasDenoise,
    "BetaSamplingScheduler": BetaSamplingScheduler,
    "KarrasScheduler": KarrasScheduler,
    "DisableNoise": DisableNoise,
    "ModelSamplingFlux": ModelSamplingFlux,
    "RandomNoise": RandomNoise,
    "KSamplerSelect": KSamplerSelect,
    "Flux2Scheduler": Flux2Scheduler,
    "BasicGuider": BasicGuider,
    "CFGGuider": CFGGuider,
    "SamplerCustomAdvanced": SamplerCustomAdvanced,
    "FluxKVCache": FluxKVCache,
    "DifferentialDiffusion": DifferentialDiffusion,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DifferentialDiffusion": "Differential Diffusion",
    "KSampler": "KSampler",
    "KSamplerAdvanced": "KSampler (Advanced)",
    "FluxKVCache": "Flux KV Cache",
}
