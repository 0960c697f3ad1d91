"""ComfyUI's named schedulers for FLUX.2's flow model sampling, against values derived here from the formulas
(sigma(t) = e^mu / (e^mu + 1/t - 1), mu = 2.02, tabulated at t = i / 10000)."""

from __future__ import annotations

import math

import pytest
import torch

from flux2_core.errors import Flux2Error
from flux2_core.schedulers import (
    FLUX2_SHIFT,
    SCHEDULER_NAMES,
    FlowModelSampling,
    _regularized_incomplete_beta,
    beta_quantile,
    flux_shift_for_size,
    scheduler_sigmas,
    sigmas_for_steps,
)

MU = 2.02


def sigma(t: float, mu: float = MU) -> float:
    return math.exp(mu) / (math.exp(mu) + 1 / t - 1)


SIGMA_MIN = sigma(1e-4)


def close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)


def test_comfyui_scheduler_names_in_comfyui_order() -> None:
    assert SCHEDULER_NAMES == ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                               "linear_quadratic", "kl_optimal"]
    assert FLUX2_SHIFT == MU


def test_simple_takes_every_nth_table_entry_from_the_top() -> None:
    # 4 steps over 10000 timesteps: t = 1, 0.75, 0.5, 0.25.
    close(scheduler_sigmas("simple", 4), [1.0, sigma(0.75), sigma(0.5), sigma(0.25), 0.0])


def test_normal_and_sgm_uniform_feed_evenly_spaced_sigmas_back_through_sigma() -> None:
    points = [1.0 + (SIGMA_MIN - 1.0) * i / 3 for i in range(4)]
    close(scheduler_sigmas("normal", 4), [sigma(p) for p in points] + [0.0])
    points = [1.0 + (SIGMA_MIN - 1.0) * i / 4 for i in range(4)]
    close(scheduler_sigmas("sgm_uniform", 4), [sigma(p) for p in points] + [0.0])


def test_karras_exponential_and_kl_optimal_between_the_table_ends() -> None:
    rho = 7.0
    karras = [(1.0 + i / 3 * (SIGMA_MIN ** (1 / rho) - 1.0)) ** rho for i in range(4)]
    close(scheduler_sigmas("karras", 4), karras + [0.0])
    close(scheduler_sigmas("exponential", 4), [math.exp(i / 3 * math.log(SIGMA_MIN)) for i in range(4)] + [0.0])
    kl = [math.tan(i / 3 * math.atan(SIGMA_MIN) + (1 - i / 3) * math.atan(1.0)) for i in range(4)]
    close(scheduler_sigmas("kl_optimal", 4), kl + [0.0])


def test_ddim_uniform_starts_below_one_and_may_add_steps() -> None:
    # Table entry i holds sigma((i + 1) / 10000); entries 1, 2501, 5001, 7501, reversed.
    close(scheduler_sigmas("ddim_uniform", 4), [sigma(7502e-4), sigma(5002e-4), sigma(2502e-4), sigma(2e-4), 0.0])
    # 10000 // 7 = 1428 does not divide 9999: ComfyUI's loop picks 8 entries.
    assert len(scheduler_sigmas("ddim_uniform", 7)) == 9


def test_linear_quadratic_is_mochis_schedule() -> None:
    # 4 steps: linear 0, 0.0125; then the quadratic through (2, 0.025) and (4, 1).
    q_coef = (2 - 0.025 * 4) / (2 * 2 ** 2)
    l_coef = 0.025 / 2 - 2 * (2 - 0.025 * 4) / 2 ** 2
    const = q_coef * 4
    noise = [0.0, 0.0125, q_coef * 4 + l_coef * 2 + const, q_coef * 9 + l_coef * 3 + const, 1.0]
    close(scheduler_sigmas("linear_quadratic", 4), [1 - n for n in noise])
    close(scheduler_sigmas("linear_quadratic", 1), [1.0, 0.0])


def test_incomplete_beta_and_its_quantile_match_closed_forms() -> None:
    for x in (0.1, 0.37, 0.5, 0.9):
        assert _regularized_incomplete_beta(x, 1.0, 1.0) == pytest.approx(x, abs=1e-12)
        assert _regularized_incomplete_beta(x, 2.0, 1.0) == pytest.approx(x * x, abs=1e-12)
        # beta(1/2, 1/2) is the arcsine distribution.
        assert _regularized_incomplete_beta(x, 0.5, 0.5) == pytest.approx(2 / math.pi * math.asin(math.sqrt(x)),
                                                                         abs=1e-10)
    assert beta_quantile(0.5, 0.6, 0.6) == pytest.approx(0.5, abs=1e-12)
    assert beta_quantile(0.2, 0.6, 0.6) == pytest.approx(1 - beta_quantile(0.8, 0.6, 0.6), abs=1e-12)
    assert beta_quantile(0.3, 0.5, 0.5) == pytest.approx(math.sin(0.3 * math.pi / 2) ** 2, abs=1e-12)


def test_beta_picks_table_entries_at_the_beta_quantiles() -> None:
    indices = [round(beta_quantile(1 - i / 4, 0.6, 0.6) * 9999) for i in range(4)]
    close(scheduler_sigmas("beta", 4), [sigma((index + 1) / 10000) for index in indices] + [0.0])
    assert indices[0] == 9999 and indices[2] == 5000  # the quantiles at 1 and 0.5


def test_model_sampling_flux_shift_and_a_patched_mu() -> None:
    assert flux_shift_for_size(1024, 1024) == pytest.approx(1.15)
    assert flux_shift_for_size(256, 256) == pytest.approx(0.5 + (1.15 - 0.5) / 3840 * (256 - 256))
    assert flux_shift_for_size(512, 512, max_shift=2.0, base_shift=1.0) == pytest.approx(1.0 + 768 / 3840)
    close(scheduler_sigmas("simple", 2, FlowModelSampling(0.5)), [1.0, sigma(0.5, 0.5), 0.0])
    assert FlowModelSampling().percent_to_sigma(0.0) == 1.0
    assert FlowModelSampling().percent_to_sigma(0.25) == pytest.approx(sigma(0.75))


def test_denoise_keeps_the_tail_of_a_longer_schedule() -> None:
    # denoise 0.5 over 3 steps: int(3 / 0.5) = 6 steps, the last 4 sigmas.
    close(sigmas_for_steps("simple", 3, 0.5), scheduler_sigmas("simple", 6)[-4:].tolist())
    assert sigmas_for_steps("simple", 3, 0.0).numel() == 0


def test_bad_names_and_steps_are_refused() -> None:
    with pytest.raises(Flux2Error, match="scheduler: expected one of simple"):
        scheduler_sigmas("turbo", 4)
    with pytest.raises(Flux2Error, match="steps: expected an integer >= 1"):
        scheduler_sigmas("simple", 0)
