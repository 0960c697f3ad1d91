"""ComfyUI's named schedulers (KSampler's and BasicScheduler's `scheduler`), computed for a flow model.

ComfyUI runs FLUX.2 with flow model sampling: sigma(t) = e^mu / (e^mu + 1/t - 1) for t in (0, 1], with mu (ComfyUI
calls it `shift`) 2.02 for FLUX.2 unless a ModelSamplingFlux node sets another. The named schedulers pick sigmas from
a table of that function at t = i / 10000 (i = 1..10000), or interpolate between its ends sigma_min = sigma(1e-4)
and sigma_max = sigma(1) = 1, then append 0:

- simple: every (10000 / steps)-th table entry from the top;
- normal: sigma() at `steps` evenly spaced points from sigma_max to sigma_min (for flow models ComfyUI's timestep of
  a sigma is the sigma itself, so the points are sigma values fed to sigma() again);
- sgm_uniform: the same with `steps + 1` points, the last one dropped;
- karras: Karras et al. 2022, eq. 5, rho 7, between sigma_min and sigma_max;
- exponential: evenly spaced in log sigma;
- ddim_uniform: the table entries 1, 1 + k, 1 + 2k, ... (k = 10000 // steps), reversed, then 0;
- beta: the table entries at the beta(0.6, 0.6) distribution's quantiles of 1 - i / steps (arXiv 2407.12173),
  repeated entries dropped;
- linear_quadratic: Mochi's schedule (linear for the first half, quadratic after), times sigma_max;
- kl_optimal: tan of a linear interpolation from atan(sigma_max) to atan(sigma_min) (arXiv 2404.09263).

`KSampler`-style step counting (`denoise` < 1 computes int(steps / denoise) steps and keeps the last steps + 1
sigmas) is `sigmas_for_steps`.
"""

from __future__ import annotations

import dataclasses
import math
from functools import cached_property

import torch

from .errors import Flux2Error

# ComfyUI's model sampling for FLUX.2 (supported_models: sampling_settings shift 2.02), i.e. mu in sigma(t).
FLUX2_SHIFT = 2.02
# The PatchedModel option ModelSamplingFlux sets: the mu the named schedulers use instead of FLUX2_SHIFT.
MODEL_SAMPLING_SHIFT = "model_sampling_shift"
# ComfyUI tabulates the flow model's sigmas at this many timesteps.
TIMESTEPS = 10000

SCHEDULER_NAMES = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                   "linear_quadratic", "kl_optimal"]


def flux_shift_for_size(width: int, height: int, max_shift: float = 1.15, base_shift: float = 0.5) -> float:
    """ModelSamplingFlux's mu: linear in the token count w * h / 256, base_shift at 256 tokens, max_shift at 4096."""
    slope = (max_shift - base_shift) / (4096 - 256)
    return base_shift + slope * (width * height / 256 - 256)


@dataclasses.dataclass(frozen=True)
class FlowModelSampling:
    """sigma(t) = e^shift / (e^shift + 1/t - 1), tabulated like ComfyUI's ModelSamplingFlux."""
    shift: float = FLUX2_SHIFT

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        scale = math.exp(self.shift)
        return scale / (scale + (1.0 / t - 1.0))

    @cached_property
    def table(self) -> torch.Tensor:
        """sigma(i / TIMESTEPS) for i = 1..TIMESTEPS, float64, increasing."""
        return self.sigma(torch.arange(1, TIMESTEPS + 1, dtype=torch.float64) / TIMESTEPS)

    @property
    def sigma_min(self) -> float:
        return float(self.table[0])

    @property
    def sigma_max(self) -> float:
        return float(self.table[-1])

    def percent_to_sigma(self, percent: float) -> float:
        """The sigma at `percent` of the way through sampling (ConditioningSetTimestepRange's start / end)."""
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return float(self.sigma(1.0 - percent))


def _with_zero(values: torch.Tensor) -> torch.Tensor:
    return torch.cat([values.to(torch.float64), torch.zeros(1, dtype=torch.float64)])


def _simple(ms: FlowModelSampling, steps: int) -> torch.Tensor:
    stride = len(ms.table) / steps
    return _with_zero(torch.stack([ms.table[-(1 + int(i * stride))] for i in range(steps)]))


def _normal(ms: FlowModelSampling, steps: int, sgm: bool = False) -> torch.Tensor:
    start, end = ms.sigma_max, ms.sigma_min  # a flow model's timestep of a sigma is the sigma
    if sgm:
        points = torch.linspace(start, end, steps + 1, dtype=torch.float64)[:-1]
    elif math.isclose(float(ms.sigma(end)), 0.0, abs_tol=1e-5):
        return ms.sigma(torch.linspace(start, end, steps + 1, dtype=torch.float64))
    else:
        points = torch.linspace(start, end, steps, dtype=torch.float64)
    return _with_zero(ms.sigma(points))


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: sigma_max to sigma_min evenly in sigma^(1/rho), then 0 (float64)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _with_zero((high + ramp * (low - high)) ** rho)


def _karras(ms: FlowModelSampling, steps: int) -> torch.Tensor:
    return karras_sigmas(steps, ms.sigma_min, ms.sigma_max)


def _exponential(ms: FlowModelSampling, steps: int) -> torch.Tensor:
    return _with_zero(torch.linspace(math.log(ms.sigma_max), math.log(ms.sigma_min), steps, dtype=torch.float64).exp())


def _ddim_uniform(ms: FlowModelSampling, steps: int) -> torch.Tensor:
    stride = max(len(ms.table) // steps, 1)
    picked = ms.table[1::stride]
    if math.isclose(float(ms.table[1]), 0.0, abs_tol=1e-5):
        return picked.flip(0)
    return _with_zero(picked.flip(0))


def _regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) by its continued fraction (Lentz's method), using the symmetry I_x(a,b) = 1 - I_{1-x}(b,a) where
    the fraction converges slowly."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _regularized_incomplete_beta(1.0 - x, b, a)
    log_front = a * math.log(x) + b * math.log1p(-x) - math.log(a) - (
        math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * fraction


def beta_quantile(q: float, a: float, b: float) -> float:
    """The beta(a, b) distribution's quantile function (inverse CDF), by bisection to double precision."""
    low, high = 0.0, 1.0
    for _ in range(200):
        middle = (low + high) / 2
        if _regularized_incomplete_beta(middle, a, b) < q:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def _beta(ms: FlowModelSampling, steps: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    last_index = len(ms.table) - 1
    picked, previous = [], None
    for i in range(steps):
        index = round(beta_quantile(1.0 - i / steps, alpha, beta) * last_index)
        if index != previous:
            picked.append(ms.table[index])
        previous = index
    return _with_zero(torch.stack(picked))


def beta_sigmas(steps: int, alpha: float = 0.6, beta: float = 0.6,
                sampling: FlowModelSampling | None = None) -> torch.Tensor:
    """The beta schedule with its distribution's parameters (BetaSamplingScheduler), float32."""
    if steps < 1:
        raise Flux2Error(f"steps: expected an integer >= 1, found {steps}")
    return _beta(sampling or FlowModelSampling(), steps, alpha, beta).to(torch.float32)


def _linear_quadratic(ms: FlowModelSampling, steps: int, threshold_noise: float = 0.025) -> torch.Tensor:
    if steps == 1:
        return torch.tensor([1.0, 0.0], dtype=torch.float64) * ms.sigma_max
    linear_steps = steps // 2
    quadratic_steps = steps - linear_steps
    step_difference = linear_steps - threshold_noise * steps
    quadratic_coef = step_difference / (linear_steps * quadratic_steps ** 2)
    linear_coef = threshold_noise / linear_steps - 2 * step_difference / quadratic_steps ** 2
    constant = quadratic_coef * linear_steps ** 2
    noise_levels = [i * threshold_noise / linear_steps for i in range(linear_steps)]
    noise_levels += [quadratic_coef * i ** 2 + linear_coef * i + constant for i in range(linear_steps, steps)]
    return (1.0 - torch.tensor(noise_levels + [1.0], dtype=torch.float64)) * ms.sigma_max


def _kl_optimal(ms: FlowModelSampling, steps: int) -> torch.Tensor:
    fraction = torch.arange(steps, dtype=torch.float64) / max(steps - 1, 1)
    angles = fraction * math.atan(ms.sigma_min) + (1 - fraction) * math.atan(ms.sigma_max)
    return _with_zero(angles.tan())


_SCHEDULERS = {
    "simple": _simple,
    "sgm_uniform": lambda ms, steps: _normal(ms, steps, sgm=True),
    "karras": _karras,
    "exponential": _exponential,
    "ddim_uniform": _ddim_uniform,
    "beta": _beta,
    "normal": _normal,
    "linear_quadratic": _linear_quadratic,
    "kl_optimal": _kl_optimal,
}


def scheduler_sigmas(name: str, steps: int, sampling: FlowModelSampling | None = None) -> torch.Tensor:
    """float32 sigmas of the scheduler called `name` for `steps` steps (usually steps + 1 values, ending at 0)."""
    if name not in _SCHEDULERS:
        raise Flux2Error(f"scheduler: expected one of {', '.join(SCHEDULER_NAMES)}, found {name!r}")
    if steps < 1:
        raise Flux2Error(f"steps: expected an integer >= 1, found {steps}")
    return _SCHEDULERS[name](sampling or FlowModelSampling(), steps).to(torch.float32)


def sigmas_for_steps(name: str, steps: int, denoise: float = 1.0,
                     sampling: FlowModelSampling | None = None) -> torch.Tensor:
    """BasicScheduler / KSampler: the schedule for int(steps / denoise) steps, of which the last steps + 1 sigmas
    are kept (an empty tensor for denoise 0)."""
    if denoise <= 0.0:
        return torch.zeros(0, dtype=torch.float32)
    total = steps if denoise >= 0.9999 else int(steps / denoise)
    return scheduler_sigmas(name, total, sampling)[-(steps + 1):]
