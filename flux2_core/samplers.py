"""Update rules for the sampling loop: the samplers ComfyUI offers, in their flow-matching (CONST) form.

Each sampler walks `sigmas` [n + 1] (down to 0) and asks `denoise(x, sigma)` for the model's prediction at a
point; it never sees the model, the prompt or the references (flux2_core.sampling owns those). A prediction
carries both views of the one model output: `v`, the velocity dx/dsigma the DiT predicts, and
`x0 = x - sigma * v`, ComfyUI's `denoised` for CONST models. Where ComfyUI's k-diffusion code writes
`to_d(x, sigma, denoised)` = (x - denoised) / sigma, which is `v` up to rounding, these rules use `v` itself,
so that Euler is exactly `x + (sigma_next - sigma) * v`, the FLUX.2 reference update.

Formulas follow ComfyUI's comfy/k_diffusion/sampling.py (sample_euler, sample_heun, sample_dpm_2,
sample_dpmpp_2m, and, because ComfyUI switches to them for CONST model sampling, the rectified-flow variants
sample_euler_ancestral_RF, sample_dpm_2_ancestral_RF, sample_dpmpp_2s_ancestral_RF), with s_churn 0,
eta 1 and s_noise 1 as its KSamplerSelect uses them. Samplers that need an SDE / Brownian tree or scipy
(dpmpp_sde, *_sde, lms, dpm_fast, dpm_adaptive) are not offered.

Ancestral noise follows ComfyUI's default_noise_sampler with the seed ComfyUI passes as extra_args["seed"]
(RandomNoise's noise_seed / KSampler's seed): one torch.Generator on the latent's device, seeded `seed + 1`
on the CPU and `seed` on any other device, and one standard-normal draw of the latent's full shape
[B, 128, h, w] in float32 each time noise is added. CPU runs therefore reproduce ComfyUI's CPU runs; like in
ComfyUI, a GPU run draws from that GPU's generator and differs from a CPU run. Seeds are 64-bit unsigned
(0..MAX_SEED, the range the seed widgets offer); `seed + 1` wraps to 0 past the maximum, as a torch generator
seed does.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .errors import Flux2Error


class Prediction(NamedTuple):
    """The model at (x, sigma), float32 in x's layout: x0 = x - sigma * v."""
    x0: torch.Tensor
    v: torch.Tensor


# The largest seed the seed widgets offer (ComfyUI's 0xffffffffffffffff); generator seeds are taken modulo 2**64.
MAX_SEED = 0xFFFFFFFFFFFFFFFF

Denoiser = Callable[[torch.Tensor, torch.Tensor], Prediction]
# on_step(i, x0) once per step (i from 0), with the step's first prediction, before x is updated (ComfyUI's
# callback point).
StepHook = Callable[[int, torch.Tensor], None]
# noise() -> a fresh standard-normal tensor shaped like the latent.
NoiseSampler = Callable[[], torch.Tensor]


def prediction_from_x0(x: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor) -> Prediction:
    """A Prediction from a clean-image guess (for denoisers that predict x0 rather than v)."""
    return Prediction(x0, (x - x0) / sigma)


def comfy_noise_sampler(like: torch.Tensor, seed: int) -> NoiseSampler:
    """ComfyUI's default_noise_sampler for `seed` (see the module docstring)."""
    generator = torch.Generator(device=like.device)
    generator.manual_seed((seed + 1 if like.device.type == "cpu" else seed) & MAX_SEED)
    return lambda: torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)


def _no_step_hook(i: int, x0: torch.Tensor) -> None:
    pass


# --- deterministic -------------------------------------------------------------------------------------------

def euler(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, on_step: StepHook,
          noise: NoiseSampler) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        pred = denoise(x, sigma)
        on_step(i, pred.x0)
        x = x + (sigma_next - sigma) * pred.v
    return x


def _two_evaluation_steps(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, on_step: StepHook,
                          second_step: Callable[[Denoiser, torch.Tensor, Prediction, torch.Tensor, torch.Tensor],
                                                torch.Tensor]) -> torch.Tensor:
    """The loop heun and dpm_2 share: `second_step` spends a second model call per step, except on the last
    step (to sigma 0), which is plain Euler as in ComfyUI."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        pred = denoise(x, sigma)
        on_step(i, pred.x0)
        if sigma_next == 0:
            x = x + pred.v * (sigma_next - sigma)
        else:
            x = second_step(denoise, x, pred, sigma, sigma_next)
    return x


def _heun_step(denoise: Denoiser, x: torch.Tensor, pred: Prediction, sigma: torch.Tensor,
               sigma_next: torch.Tensor) -> torch.Tensor:
    """Euler predictor, trapezoid corrector."""
    dt = sigma_next - sigma
    v_next = denoise(x + pred.v * dt, sigma_next).v
    return x + (pred.v + v_next) / 2 * dt


def _log_midpoint(sigma: torch.Tensor, sigma_to: torch.Tensor) -> torch.Tensor:
    """The geometric mean of two sigmas, computed as ComfyUI does (lerp of the logs)."""
    return sigma.log().lerp(sigma_to.log(), 0.5).exp()


def _dpm_2_step(denoise: Denoiser, x: torch.Tensor, pred: Prediction, sigma: torch.Tensor,
                sigma_next: torch.Tensor) -> torch.Tensor:
    """Midpoint rule with the midpoint at the geometric mean of the sigmas."""
    sigma_mid = _log_midpoint(sigma, sigma_next)
    x_mid = x + pred.v * (sigma_mid - sigma)
    return x + denoise(x_mid, sigma_mid).v * (sigma_next - sigma)


def heun(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, on_step: StepHook,
         noise: NoiseSampler) -> torch.Tensor:
    return _two_evaluation_steps(denoise, x, sigmas, on_step, _heun_step)


def dpm_2(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, on_step: StepHook,
          noise: NoiseSampler) -> torch.Tensor:
    return _two_evaluation_steps(denoise, x, sigmas, on_step, _dpm_2_step)


def dpmpp_2m(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, on_step: StepHook,
             noise: NoiseSampler) -> torch.Tensor:
    """DPM-Solver++(2M) in t = -log(sigma): the first and the last step are first order, the others
    extrapolate x0 linearly from this step's and the previous step's predictions."""
    previous_x0 = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        pred = denoise(x, sigma)
        on_step(i, pred.x0)
        if sigma_next == 0:
            # ComfyUI's formula with t_next = inf: 0 * x + 1 * x0.
            x = pred.x0
        else:
            t, t_next = -sigma.log(), -sigma_next.log()
            h = t_next - t
            x0 = pred.x0
            if previous_x0 is not None:
                h_last = t + sigmas[i - 1].log()
                half_inv_r = 1 / (2 * (h_last / h))
                x0 = (1 + half_inv_r) * pred.x0 - half_inv_r * previous_x0
            x = (torch.exp(-t_next) / torch.exp(-t)) * x - torch.expm1(-h) * x0
        previous_x0 = pred.x0
    return x


# --- ancestral (rectified-flow form) --------------------------------------------------------------------------

class _RFAncestralStep(NamedTuple):
    sigma_down: torch.Tensor  # the deterministic step goes down to here ...
    alpha_ratio: torch.Tensor  # ... then x is rescaled by (1 - sigma_next) / (1 - sigma_down) ...
    renoise: torch.Tensor  # ... and this much fresh noise brings it back up to sigma_next.


def _rf_ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float) -> _RFAncestralStep:
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
    renoise = (sigma_next ** 2 - sigma_down ** 2 * alpha_next ** 2 / alpha_down ** 2) ** 0.5
    return _RFAncestralStep(sigma_down, alpha_next / alpha_down, renoise)


def _lerp_to_x0(x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, sigma_to: torch.Tensor) -> torch.Tensor:
    """Move x along the straight line to x0 from noise level sigma to sigma_to (an exact step for constant x0)."""
    ratio = sigma_to / sigma
    return ratio * x + (1 - ratio) * x0


def euler_ancestral(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, on_step: StepHook,
                    noise: NoiseSampler, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        pred = denoise(x, sigma)
        on_step(i, pred.x0)
        if sigma_next == 0:
            x = pred.x0
            continue
        step = _rf_ancestral_step(sigma, sigma_next, eta)
        x = _lerp_to_x0(x, pred.x0, sigma, step.sigma_down)
        if eta > 0:
            x = step.alpha_ratio * x + noise() * s_noise * step.renoise
    return x


def dpm_2_ancestral(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, on_step: StepHook,
                    noise: NoiseSampler, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        pred = denoise(x, sigma)
        step = _rf_ancestral_step(sigma, sigma_next, eta)
        on_step(i, pred.x0)
        if step.sigma_down == 0:
            x = x + pred.v * (step.sigma_down - sigma)
            continue
        x = _dpm_2_step(denoise, x, pred, sigma, step.sigma_down)
        # ComfyUI draws (and scales by renoise, 0 at eta 0) here whatever eta is.
        x = step.alpha_ratio * x + noise() * s_noise * step.renoise
    return x


def _half_log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """lambda = log((1 - sigma) / sigma), the flow model's half log signal-to-noise ratio."""
    return ((1 - sigma) / sigma).log()


def dpmpp_2s_ancestral(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, on_step: StepHook,
                       noise: NoiseSampler, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(2S): a second prediction halfway (in lambda) to sigma_down, then renoise."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        pred = denoise(x, sigma)
        step = _rf_ancestral_step(sigma, sigma_next, eta)
        on_step(i, pred.x0)
        if sigma_next == 0:
            x = x + pred.v * (step.sigma_down - sigma)
        else:
            if sigma == 1.0:
                # lambda is -inf at sigma 1; ComfyUI then takes 0.9999 as the intermediate level.
                sigma_s = torch.tensor(0.9999, dtype=sigma.dtype, device=sigma.device)
            else:
                lambda_i = _half_log_snr(sigma)
                lambda_s = lambda_i + 0.5 * (_half_log_snr(step.sigma_down) - lambda_i)
                sigma_s = 1 / (lambda_s.exp() + 1)
            x_s = _lerp_to_x0(x, pred.x0, sigma, sigma_s)
            x0_s = denoise(x_s, sigma_s).x0
            x = _lerp_to_x0(x, x0_s, sigma, step.sigma_down)
        if sigma_next > 0 and eta > 0:
            x = step.alpha_ratio * x + noise() * s_noise * step.renoise
    return x


# ComfyUI's names, in ComfyUI's order (KSAMPLER_NAMES); euler first, the default.
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": euler,
    "euler_ancestral": euler_ancestral,
    "heun": heun,
    "dpm_2": dpm_2,
    "dpm_2_ancestral": dpm_2_ancestral,
    "dpmpp_2s_ancestral": dpmpp_2s_ancestral,
    "dpmpp_2m": dpmpp_2m,
}
SAMPLER_NAMES: list[str] = list(SAMPLERS)
ANCESTRAL_SAMPLERS = frozenset({"euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral"})


def check_sampler_name(name: str) -> None:
    if name not in SAMPLERS:
        raise Flux2Error(f"sampler: expected one of {', '.join(SAMPLER_NAMES)}, found {name!r}")


def run_sampler(name: str, denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, seed: int = 0,
                on_step: StepHook | None = None, **options: float) -> torch.Tensor:
    """Sample `x` (float32, the noisy start at sigmas[0]) down `sigmas` with the sampler called `name`.

    `seed` seeds the ancestral samplers' noise (ComfyUI's convention); `options` are a sampler's own
    keyword arguments (eta, s_noise for the ancestral ones)."""
    check_sampler_name(name)
    return SAMPLERS[name](denoise, x, sigmas, on_step or _no_step_hook, comfy_noise_sampler(x, seed), **options)
