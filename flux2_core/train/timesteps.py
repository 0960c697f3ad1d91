"""Training noise levels (sigma in (0, 1), x_t = (1 - sigma) x0 + sigma noise) and per-sample loss weights.

| mode          | sigma                                                                  |
|---------------|------------------------------------------------------------------------|
| uniform       | U(0, 1)                                                                |
| sigmoid       | sigmoid(sigmoid_scale * N(0, 1))                                       |
| logit_normal  | sigmoid(logit_mean + logit_std * N(0, 1))                              |
| shift         | shift(sigmoid(sigmoid_scale * N), discrete_flow_shift)                 |
| flux2_shift   | shift(sigmoid(sigmoid_scale * N), e^mu), mu = 0.5 + 0.65 (hw - 256) / 3840, hw = latent cells (musubi-tuner) |
| diffsynth     | one of 1000 grid points of linspace(1, 0.001) shifted by e^0.8, uniform (DiffSynth-Studio) |

with shift(t, s) = s t / (1 + (s - 1) t). Loss weights: none; sigma_sqrt = sigma^-2 (SD3's name);
cosmap = 2 / (pi (1 - 2 sigma + 2 sigma^2)); diffsynth mode always weights with DiffSynth's bell around
sigma 0.5 (exp(-2 ((1000 sigma - 500) / 1000)^2) minus its minimum, normalised to mean 1 over the grid).
All draws come from the caller's generator, so a run is reproducible and resumable.
"""

from __future__ import annotations

import math

import torch

from ..errors import Flux2Error

DIFFSYNTH_MU = 0.8
DIFFSYNTH_GRID = 1000
FLUX2_SHIFT_TOKENS = (256, 4096)
FLUX2_SHIFT_MU = (0.5, 1.15)


def shift_sigmas(t: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * t / (1 + (shift - 1) * t)


def flux2_shift_mu(latent_cells: int) -> float:
    (low, high), (mu_low, mu_high) = FLUX2_SHIFT_TOKENS, FLUX2_SHIFT_MU
    return mu_low + (mu_high - mu_low) * (latent_cells - low) / (high - low)


def diffsynth_grid() -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas [1000], weights [1000]) of the fixed-mu schedule."""
    t = torch.linspace(1.0, 1.0 / DIFFSYNTH_GRID, DIFFSYNTH_GRID, dtype=torch.float64)
    sigmas = shift_sigmas(t, math.exp(DIFFSYNTH_MU))
    timesteps = sigmas * DIFFSYNTH_GRID
    bell = torch.exp(-2 * ((timesteps - DIFFSYNTH_GRID / 2) / DIFFSYNTH_GRID) ** 2)
    bell = bell - bell.min()
    return sigmas.float(), (bell * (DIFFSYNTH_GRID / bell.sum())).float()


def sample_sigmas(mode: str, batch: int, generator: torch.Generator, *, latent_cells: int = 4096,
                  sigmoid_scale: float = 1.0, shift: float = 3.0, logit_mean: float = 0.0,
                  logit_std: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sigmas [batch] float32, the mode's own loss weights [batch] or None), drawn on the CPU."""
    if mode == "uniform":
        return torch.rand(batch, generator=generator), None
    if mode == "diffsynth":
        sigmas, weights = diffsynth_grid()
        index = torch.randint(0, DIFFSYNTH_GRID, (batch,), generator=generator)
        return sigmas[index], weights[index]
    normal = torch.randn(batch, generator=generator)
    if mode == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * normal), None
    t = torch.sigmoid(sigmoid_scale * normal)
    if mode == "sigmoid":
        return t, None
    if mode == "shift":
        return shift_sigmas(t, shift), None
    if mode == "flux2_shift":
        return shift_sigmas(t, math.exp(flux2_shift_mu(latent_cells))), None
    raise Flux2Error(f"timestep_sampling: unknown mode {mode!r}")


def loss_weights(scheme: str, sigmas: torch.Tensor) -> torch.Tensor | None:
    """Per-sample weights of the velocity MSE, or None for equal weights."""
    if scheme == "none":
        return None
    if scheme == "sigma_sqrt":
        return sigmas.clamp_min(1e-4) ** -2.0
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    raise Flux2Error(f"weighting_scheme: unknown scheme {scheme!r}")
