"""The pluggable samplers (flux2_core.samplers): Euler unchanged, exact on straight flows, their convergence
orders, each update rule against a plain re-statement of ComfyUI's k-diffusion formulas (CONST / RF form),
ancestral seeding, and the same result through every node route."""

from __future__ import annotations

import math

import pytest
import torch

from flux2_core.demo_models import demo_dit_config, random_dit
from flux2_core.errors import Flux2Error
from flux2_core.references import image_position_ids, text_position_ids
from flux2_core.samplers import MAX_SEED, SAMPLER_NAMES, comfy_noise_sampler, prediction_from_x0, run_sampler
from flux2_core.sampling import flux2_sigmas, latent_shape, make_noise, pack_latents, sample, unpack_latents
import custom_nodes_flux2.sampling as pack_sampling
from flux2_host.core_nodes import sampling as core_sampling
from test_nodes import CORE, PACK, PROMPT, empty_latent, engine, host_dirs, nodes, pack_encode  # noqa: F401

DETERMINISTIC = ["euler", "heun", "dpm_2", "dpmpp_2m"]
ANCESTRAL = ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral"]


def test_the_sampler_table_lists_comfyui_names_with_euler_first() -> None:
    assert SAMPLER_NAMES[0] == "euler"
    assert sorted(SAMPLER_NAMES) == sorted(DETERMINISTIC + ANCESTRAL)
    assert core_sampling.SAMPLERS == pack_sampling.SAMPLERS == SAMPLER_NAMES
    assert CORE["KSamplerSelect"].INPUT_TYPES()["required"]["sampler_name"][0] == SAMPLER_NAMES
    assert PACK["Flux2Sampler"].INPUT_TYPES()["required"]["sampler_name"][0] == SAMPLER_NAMES


# --- (1) Euler through the new path is the old loop, bit for bit -------------------------------------------------

def old_euler_loop(model, noise, sigmas, context, negative_context=None, cfg=1.0):
    """flux2_core's Euler loop as it was before the samplers became pluggable (no references, no guidance)."""
    batch, _, height, width = noise.shape
    x = pack_latents(noise.float())
    contexts = [context] + ([negative_context] if cfg != 1.0 else [])
    txt = torch.cat(contexts)
    passes = len(contexts)
    txt_ids = text_position_ids(batch * passes, txt.shape[1])
    img_ids = image_position_ids(height, width, batch * passes)
    previews = []
    for step in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[step], sigmas[step + 1]
        out = model(x.repeat(passes, 1, 1), img_ids, txt, txt_ids, sigma.expand(batch * passes), None)
        v = out[:, :x.shape[1]].float()
        if cfg != 1.0:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + cfg * (v_cond - v_uncond)
        previews.append(unpack_latents(x - sigma * v, height, width))
        x = x + (sigma_next - sigma) * v
    return unpack_latents(x, height, width), previews


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_euler_is_bit_identical_to_the_old_loop(cfg: float) -> None:
    model = random_dit(demo_dit_config(context_dim=16, guidance_embed=False), seed=0)
    noise = make_noise(3, latent_shape(1, 64, 32))
    sigmas = flux2_sigmas(4, 64, 32)
    generator = torch.Generator().manual_seed(1)
    context, negative = torch.randn(1, 8, 16, generator=generator), torch.randn(1, 8, 16, generator=generator)
    previews = []
    ours = sample(model, noise, sigmas, context, negative_context=negative, cfg=cfg,
                  callback=lambda step, total, x0: previews.append(x0))
    expected, expected_previews = old_euler_loop(model, noise, sigmas, context, negative, cfg)
    assert torch.equal(ours, expected)
    assert len(previews) == len(expected_previews) == 4
    assert all(torch.equal(a, b) for a, b in zip(previews, expected_previews))


# --- (2) straight flows, (3) convergence orders ------------------------------------------------------------------

@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_a_constant_x0_prediction_is_reached_exactly(name: str) -> None:
    """Along a straight flow every sampler lands on x0 (the ancestral ones too: their last step is x0)."""
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 5, 3, 3, generator=generator)
    noise = torch.randn(2, 5, 3, 3, generator=generator)
    calls = []

    def denoise(x, sigma):
        calls.append(float(sigma))
        return prediction_from_x0(x, sigma, x0)

    out = run_sampler(name, denoise, noise, flux2_sigmas(6, 64, 64), seed=1)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-6)
    assert all(0.0 < sigma <= 1.0 for sigma in calls)  # never evaluated at sigma 0


def smooth_denoiser(x: torch.Tensor, sigma: torch.Tensor):
    """A smooth nonlinear x0-prediction that depends on both x and sigma."""
    return prediction_from_x0(x, sigma, 0.6 * torch.tanh(x) + 0.3 * sigma * torch.sin(2 * x) + 0.1)


def final_state(name: str, steps: int, start: torch.Tensor) -> torch.Tensor:
    sigmas = torch.linspace(1.0, 0.1, steps + 1, dtype=torch.float64)
    return run_sampler(name, smooth_denoiser, start, sigmas)


@pytest.mark.parametrize("name, order", [("euler", 1), ("heun", 2), ("dpm_2", 2), ("dpmpp_2m", 2)])
def test_convergence_order(name: str, order: int) -> None:
    start = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 1.5
    reference = final_state("heun", 4096, start)
    counts = [16, 32, 64]
    errors = [(final_state(name, n, start) - reference).abs().max().item() for n in counts]
    # Least-squares slope of log(error) against log(step size).
    logs_h = [math.log(1 / n) for n in counts]
    logs_e = [math.log(e) for e in errors]
    mean_h, mean_e = sum(logs_h) / 3, sum(logs_e) / 3
    slope = (sum((h - mean_h) * (e - mean_e) for h, e in zip(logs_h, logs_e))
             / sum((h - mean_h) ** 2 for h in logs_h))
    assert abs(slope - order) < 0.3, (name, errors, slope)


# --- (4) each update rule against a plain re-statement of ComfyUI's ----------------------------------------------

class ComfyStyleModel:
    """ComfyUI's view of a flow model: model(x, sigma) -> denoised, to_d(x, sigma, denoised) = (x - denoised) / sigma."""

    def __init__(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.a = torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64)
        self.b = torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64)

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return torch.tanh(self.a * x + sigma * self.b) + 0.2 * x

    def denoiser(self, x, sigma):  # the same model, in the samplers' interface
        return prediction_from_x0(x, sigma, self(x, float(sigma)))


def to_d(x, sigma, denoised):
    return (x - denoised) / sigma


def comfy_reference(name: str, model: ComfyStyleModel, x: torch.Tensor, sigmas: list[float], noise) -> torch.Tensor:
    """Two steps of ComfyUI's sample_<name> (RF variants for the ancestral ones; eta 1, s_noise 1) written out."""
    previous_denoised = None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, s)
        d = to_d(x, s, denoised)
        if name == "euler":
            x = x + d * (s_next - s)
        elif name == "heun":
            if s_next == 0:
                x = x + d * (s_next - s)
            else:
                x_2 = x + d * (s_next - s)
                d_2 = to_d(x_2, s_next, model(x_2, s_next))
                x = x + (d + d_2) / 2 * (s_next - s)
        elif name == "dpm_2":
            if s_next == 0:
                x = x + d * (s_next - s)
            else:
                s_mid = math.exp((math.log(s) + math.log(s_next)) / 2)
                x_2 = x + d * (s_mid - s)
                x = x + to_d(x_2, s_mid, model(x_2, s_mid)) * (s_next - s)
        elif name == "dpmpp_2m":
            if s_next == 0:
                x = denoised
            else:
                h = math.log(s) - math.log(s_next)
                mix = denoised
                if previous_denoised is not None:
                    r = (math.log(sigmas[i - 1]) - math.log(s)) / h
                    mix = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * previous_denoised
                x = (s_next / s) * x + (1 - math.exp(-h)) * mix
            previous_denoised = denoised
        else:  # the RF ancestral samplers: step down to s_down, rescale, add noise back up to s_next
            s_down = s_next * s_next / s  # eta 1
            rescale = (1 - s_next) / (1 - s_down)
            renoise = math.sqrt(s_next ** 2 - (s_down * rescale) ** 2)
            if name == "euler_ancestral":
                if s_next == 0:
                    x = denoised
                    continue
                x = (s_down / s) * x + (1 - s_down / s) * denoised
            elif name == "dpm_2_ancestral":
                if s_down == 0:
                    x = x + d * (s_down - s)
                    continue
                s_mid = math.sqrt(s * s_down)
                x_2 = x + d * (s_mid - s)
                x = x + to_d(x_2, s_mid, model(x_2, s_mid)) * (s_down - s)
            elif name == "dpmpp_2s_ancestral":
                if s_next == 0:
                    x = x + d * (s_down - s)
                    continue
                if s == 1.0:
                    s_mid = 0.9999
                else:
                    lam, lam_down = math.log((1 - s) / s), math.log((1 - s_down) / s_down)
                    s_mid = 1 / (math.exp((lam + lam_down) / 2) + 1)
                u = (s_mid / s) * x + (1 - s_mid / s) * denoised
                x = (s_down / s) * x + (1 - s_down / s) * model(u, s_mid)
            x = rescale * x + noise() * renoise
    return x


@pytest.mark.parametrize("sigmas", [[1.0, 0.6, 0.3], [0.9, 0.5, 0.0]], ids=["from-1", "to-0"])
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_update_rule_matches_comfyui(name: str, sigmas: list[float]) -> None:
    model = ComfyStyleModel(seed=4)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    generator = torch.Generator().manual_seed(7 + 1)  # ComfyUI: seed + 1 for a CPU latent
    expected = comfy_reference(name, model, x, sigmas,
                               lambda: torch.randn(x.shape, generator=generator, dtype=torch.float64))
    ours = run_sampler(name, model.denoiser, x, torch.tensor(sigmas, dtype=torch.float64), seed=7)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)


# --- (5) ancestral noise ------------------------------------------------------------------------------------------

def test_ancestral_noise_uses_comfyuis_default_noise_sampler_convention() -> None:
    like = torch.zeros(1, 128, 2, 3)
    draw = comfy_noise_sampler(like, seed=42)
    generator = torch.Generator().manual_seed(43)
    assert torch.equal(draw(), torch.randn(like.shape, generator=generator))
    assert torch.equal(draw(), torch.randn(like.shape, generator=generator))  # one stream across steps


def test_the_largest_seed_wraps_to_0_for_the_ancestral_noise_on_the_cpu() -> None:
    """ComfyUI seeds the CPU generator with seed + 1; past 2**64 - 1 that wraps to 0, as generator seeds do."""
    like = torch.zeros(1, 128, 2, 3)
    assert torch.equal(comfy_noise_sampler(like, seed=MAX_SEED)(),
                       torch.randn(like.shape, generator=torch.Generator().manual_seed(0)))


def test_euler_ancestral_is_seeded_and_equals_euler_at_eta_0() -> None:
    model = random_dit(demo_dit_config(context_dim=16, guidance_embed=False), seed=0)
    noise = make_noise(0, latent_shape(1, 64, 32))
    sigmas = flux2_sigmas(4, 64, 32)
    context = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(1))
    first = sample(model, noise, sigmas, context, sampler="euler_ancestral", seed=1)
    assert torch.equal(first, sample(model, noise, sigmas, context, sampler="euler_ancestral", seed=1))
    assert not torch.allclose(first, sample(model, noise, sigmas, context, sampler="euler_ancestral", seed=2))
    assert torch.equal(sample(model, noise, sigmas, context, seed=1), sample(model, noise, sigmas, context, seed=2))

    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sigmas64 = sigmas.double()
    torch.testing.assert_close(run_sampler("euler_ancestral", smooth_denoiser, x, sigmas64, seed=1, eta=0.0),
                               run_sampler("euler", smooth_denoiser, x, sigmas64), rtol=1e-12, atol=1e-12)


# --- (6) every node route gives the same latent -------------------------------------------------------------------

@pytest.mark.parametrize("seed", [6, MAX_SEED])
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_node_routes_equal_engine_sample(nodes, name: str, seed: int) -> None:
    model = nodes["klein"]
    positive = CORE["CLIPTextEncode"]().encode(nodes["qwen"], PROMPT)[0]
    negative = CORE["ConditioningZeroOut"]().zero_out(positive)[0]
    output, _ = CORE["SamplerCustomAdvanced"]().sample(
        CORE["RandomNoise"]().get_noise(seed)[0], CORE["CFGGuider"]().get_guider(model, positive, negative, 1.0)[0],
        CORE["KSamplerSelect"]().get_sampler(name)[0], CORE["Flux2Scheduler"]().get_sigmas(4, 64, 64)[0],
        CORE["EmptyFlux2LatentImage"]().generate(64, 64, 1)[0])
    conditioning = pack_encode(nodes["qwen"], PROMPT)
    pack = PACK["Flux2Sampler"]().sample(model, conditioning, empty_latent(), seed, 4, 0.0, 1.0, 1.0, name)[0]
    engine_latent = sample(model.diffusion_model, make_noise(seed, (1, 128, 4, 4)), flux2_sigmas(4, 64, 64),
                           conditioning.embeddings, sampler=name, seed=seed)
    assert torch.equal(output["samples"], pack["samples"])
    assert torch.equal(pack["samples"], engine_latent)
    if name != "euler":
        euler = sample(model.diffusion_model, make_noise(seed, (1, 128, 4, 4)), flux2_sigmas(4, 64, 64),
                       conditioning.embeddings)
        assert not torch.equal(engine_latent, euler)


# --- (7) unknown names --------------------------------------------------------------------------------------------

def test_unknown_sampler_names_list_the_supported_ones(nodes) -> None:
    model = random_dit(demo_dit_config(context_dim=16, guidance_embed=False), seed=0)
    with pytest.raises(Flux2Error, match=r"sampler: expected one of euler, euler_ancestral, .*dpmpp_2m, "
                                         r"found 'dpmpp_2m_sde'"):
        sample(model, make_noise(0, latent_shape(1, 32, 32)), flux2_sigmas(2, 32, 32), torch.zeros(1, 8, 16),
               sampler="dpmpp_2m_sde")
    with pytest.raises(ValueError, match="SamplerCustomAdvanced: sampler: expected one of .*'euler_ancestral'"):
        CORE["SamplerCustomAdvanced"]().sample(
            CORE["RandomNoise"]().get_noise(0)[0],
            CORE["BasicGuider"]().get_guider(nodes["klein"], CORE["CLIPTextEncode"]().encode(nodes["qwen"], "")[0])[0],
            core_sampling.Sampler("lms"), flux2_sigmas(2, 32, 32), empty_latent(32, 32))
