"""Schedule, noise, packing, position ids and reference preprocessing, checked against diffusers' Flux2 code."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline as DiffusersFlux2Pipeline
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from diffusers.pipelines.flux2.pipeline_flux2_klein_inpaint import Flux2KleinInpaintPipeline
from diffusers.utils.torch_utils import randn_tensor

from flux2_core.demo_models import demo_dit_config, random_dit
from flux2_core.errors import Flux2Error, Interrupted
from flux2_core.progress import progress_handler, request_interrupt
from flux2_core.references import (
    DIFFUSERS_REFERENCE_PIXEL_CAP,
    image_position_ids,
    preprocess_reference,
    reference_pixel_cap,
    reference_position_ids,
    text_position_ids,
)
from flux2_core.sampling import (
    empirical_mu,
    flux2_sigmas,
    make_noise,
    latent_shape,
    pack_latents,
    sample,
    sigmas_for_denoise,
    unpack_latents,
)


def flux2_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # The scheduler settings the FLUX.2 repositories ship (dynamic, exponential time shift).
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential",
        base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


@pytest.mark.parametrize("size, expected", [
    (1024, [1.0, 0.967384, 0.908144, 0.767200, 0.0]),
    (512, [1.0, 0.958085, 0.883982, 0.717497, 0.0]),
])
def test_four_step_schedule_matches_published_values(size, expected):
    sigmas = flux2_sigmas(4, size, size)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (5,)
    torch.testing.assert_close(sigmas, torch.tensor(expected), atol=1e-6, rtol=0)


@pytest.mark.parametrize("tokens", [16, 1024, 4096, 4301, 9000])
@pytest.mark.parametrize("steps", [1, 4, 20, 50])
def test_empirical_mu_matches_diffusers(tokens, steps):
    assert empirical_mu(tokens, steps) == pytest.approx(compute_empirical_mu(tokens, steps), abs=1e-12)


@pytest.mark.parametrize("width, height, steps", [(64, 64, 2), (768, 1360, 28), (2048, 2048, 50)])
def test_schedule_matches_diffusers_scheduler(width, height, steps):
    scheduler = flux2_scheduler()
    mu = compute_empirical_mu((width // 16) * (height // 16), steps)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    torch.testing.assert_close(flux2_sigmas(steps, width, height), scheduler.sigmas, atol=1e-6, rtol=0)


@pytest.mark.parametrize("steps, denoise", [(4, 1.0), (4, 0.5), (4, 0.6), (10, 0.35), (50, 0.8), (3, 0.34)])
def test_denoise_skips_the_steps_diffusers_skips(steps, denoise):
    scheduler = flux2_scheduler()
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=empirical_mu(64, steps))
    skipped_to, remaining = Flux2KleinInpaintPipeline.get_timesteps(
        _WithScheduler(scheduler), steps, denoise, "cpu")
    ours = sigmas_for_denoise(flux2_sigmas(steps, 128, 128), denoise)
    assert len(ours) - 1 == remaining
    torch.testing.assert_close(ours[:-1] * 1000, skipped_to, atol=1e-3, rtol=0)


class _WithScheduler:
    """The one attribute diffusers' `get_timesteps` reads from its pipeline."""

    def __init__(self, scheduler):
        self.scheduler = scheduler


def test_denoise_keeps_at_least_one_step_and_rejects_out_of_range():
    assert len(sigmas_for_denoise(flux2_sigmas(4, 64, 64), 0.01)) == 2
    for bad in (0.0, 1.5):
        with pytest.raises(Flux2Error, match="denoise"):
            sigmas_for_denoise(flux2_sigmas(4, 64, 64), bad)


def test_size_not_multiple_of_16_is_an_error():
    with pytest.raises(Flux2Error, match="width"):
        flux2_sigmas(4, 100, 64)


def test_noise_is_cpu_randn_in_comfyui_layout():
    noise = make_noise(1234, (2, 128, 5, 3))
    expected = torch.randn((2, 128, 5, 3), generator=torch.Generator("cpu").manual_seed(1234))
    assert noise.dtype == torch.float32
    assert torch.equal(noise, expected)
    # diffusers draws its initial latents the same way from a CPU generator.
    same_in_diffusers = randn_tensor((2, 128, 5, 3), generator=torch.Generator("cpu").manual_seed(1234))
    assert torch.equal(noise, same_in_diffusers)


def test_packing_matches_diffusers_and_round_trips():
    latent = torch.randn(2, 128, 3, 5)
    tokens = pack_latents(latent)
    assert torch.equal(tokens, DiffusersFlux2Pipeline._pack_latents(latent))
    ids = DiffusersFlux2Pipeline._prepare_latent_ids(latent)
    assert torch.equal(unpack_latents(tokens, 3, 5), DiffusersFlux2Pipeline._unpack_latents_with_ids(tokens, ids))


def test_text_ids_match_diffusers():
    embeds = torch.zeros(3, 512, 8)
    ours = text_position_ids(3, 512)
    assert torch.equal(ours, DiffusersFlux2Pipeline._prepare_text_ids(embeds))
    assert ours[0, 7].tolist() == [0, 0, 0, 7]


def test_image_ids_match_diffusers():
    latent = torch.zeros(2, 128, 3, 5)
    ours = image_position_ids(3, 5, batch=2)
    assert torch.equal(ours, DiffusersFlux2Pipeline._prepare_latent_ids(latent))
    assert ours[0, 5 * 2 + 4].tolist() == [0, 2, 4, 0]


def test_reference_ids_match_diffusers():
    references = [torch.zeros(1, 128, 4, 6), torch.zeros(1, 128, 5, 3), torch.zeros(1, 128, 2, 2)]
    expected = DiffusersFlux2Pipeline._prepare_image_ids(references)
    ours = reference_position_ids([(4, 6), (5, 3), (2, 2)], batch=1)
    assert torch.equal(ours, expected)
    assert ours[0, 24].tolist() == [20, 0, 0, 0]
    assert ours[0, -1].tolist() == [30, 1, 1, 0]


def diffusers_reference_tensor(image: Image.Image) -> torch.Tensor:
    """The reference preprocessing lines of diffusers' Flux2(Klein)Pipeline.__call__, step 4."""
    processor = Flux2ImageProcessor(vae_scale_factor=16)
    processor.check_image_input(image)
    if image.width * image.height > 1024 * 1024:
        image = processor._resize_to_target_area(image, 1024 * 1024)
    width, height = image.width // 16 * 16, image.height // 16 * 16
    return processor.preprocess(image, height=height, width=width, resize_mode="crop")


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


@pytest.mark.parametrize("width, height", [(100, 150), (1100, 1000), (64, 64), (1500, 700)])
def test_reference_preprocessing_matches_diffusers(width, height):
    image = random_image(width, height)
    ours = preprocess_reference(image, DIFFUSERS_REFERENCE_PIXEL_CAP)
    expected = diffusers_reference_tensor(image)
    assert ours.shape == expected.shape
    assert ours.shape[-1] % 16 == 0 and ours.shape[-2] % 16 == 0
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


def test_single_reference_keeps_up_to_2024_squared_pixels():
    assert reference_pixel_cap(1) == 2024 * 2024 and reference_pixel_cap(3) == 1024 * 1024
    image = random_image(1100, 1000)
    single = preprocess_reference(image, reference_pixel_cap(1))
    assert single.shape == (1, 3, 992, 1088)  # only cropped to multiples of 16
    several = preprocess_reference(image, reference_pixel_cap(2))
    assert several.shape[-1] * several.shape[-2] <= 1024 * 1024


def test_reference_preprocessing_converts_to_rgb_and_maps_to_minus_one_one():
    image = Image.new("RGBA", (80, 64), (255, 0, 128, 10))
    ours = preprocess_reference(image, reference_pixel_cap(1))
    assert ours.shape == (1, 3, 64, 80)
    torch.testing.assert_close(ours[0, :, 0, 0], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]))


@pytest.mark.parametrize("width, height, field", [(63, 200, "64 px"), (64, 600, "aspect ratio")])
def test_reference_size_limits(width, height, field):
    with pytest.raises(Flux2Error, match=field):
        preprocess_reference(random_image(width, height), reference_pixel_cap(1))


def tiny_sampling_inputs():
    model = random_dit(demo_dit_config(context_dim=16, guidance_embed=False), seed=0)
    noise = make_noise(0, latent_shape(1, 64, 32))
    return model, noise, flux2_sigmas(4, 64, 32), torch.randn(1, 8, 16)


def test_interrupt_request_stops_before_the_next_step():
    model, noise, sigmas, context = tiny_sampling_inputs()
    steps = []
    request_interrupt()
    with pytest.raises(Interrupted):
        sample(model, noise, sigmas, context, callback=lambda step, total, x0: steps.append(step))
    assert steps == []
    # The request is consumed: the next run goes through.
    assert sample(model, noise, sigmas, context).shape == noise.shape


def test_cancel_callable_is_checked_between_steps():
    model, noise, sigmas, context = tiny_sampling_inputs()
    steps = []
    with pytest.raises(Interrupted):
        sample(model, noise, sigmas, context, callback=lambda step, total, x0: steps.append(step),
               cancel=lambda: len(steps) == 2)
    assert steps == [1, 2]


def test_every_step_reports_progress_with_an_x0_preview():
    model, noise, sigmas, context = tiny_sampling_inputs()
    reports = []
    with progress_handler(lambda step, total, preview: reports.append((step, total, preview))):
        final = sample(model, noise, sigmas, context)
    assert [(step, total) for step, total, _ in reports] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all(preview.shape == noise.shape for _, _, preview in reports)
    # At the last step sigma_next is 0, so the x0 prediction is the result itself.
    assert torch.equal(reports[-1][2], final)


class ConstantVelocity(torch.nn.Module):
    """A bf16 "DiT" predicting the same velocity at every step, recording the dtype of what it is fed."""

    compute_dtype = torch.bfloat16

    def __init__(self, velocity: torch.Tensor):
        super().__init__()
        self.velocity = torch.nn.Parameter(velocity.to(torch.bfloat16), requires_grad=False)
        self.fed: list[torch.dtype] = []

    def forward(self, img, img_ids, txt, txt_ids, timesteps, guidance, reference_kv=None):
        self.fed += [img.dtype, txt.dtype]
        return self.velocity.expand(img.shape[0], -1, -1)


def test_sampler_state_stays_float32_with_a_bf16_model():
    noise = make_noise(3, latent_shape(1, 64, 48))
    sigmas = flux2_sigmas(8, 64, 48)
    velocity = torch.randn(1, 12, 128, generator=torch.Generator().manual_seed(4))
    model = ConstantVelocity(velocity)
    result = sample(model, noise, sigmas, torch.randn(1, 8, 16))
    assert result.dtype == torch.float32 and set(model.fed) == {torch.bfloat16}

    v = model.velocity.float()
    x32, x16 = pack_latents(noise), pack_latents(noise).to(torch.bfloat16)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x32 = x32 + (sigma_next - sigma) * v
        x16 = x16 + (sigma_next - sigma) * model.velocity
    assert torch.equal(result, unpack_latents(x32, 3, 4))
    assert not torch.equal(result, unpack_latents(x16.float(), 3, 4))  # a bf16 state would have been caught


def test_importing_the_engine_does_not_import_transformers_or_diffusers():
    """`flux2 info` and the sampler must stay cheap to import: transformers is only for text encoders."""
    code = ("import sys, flux2_core, flux2_core.sampling, flux2_core.checkpoints.loaders, flux2_core.checkpoints.detect, "
            "flux2_core.patched_model, flux2_core.lora; "
            "print(sorted(m for m in ('transformers', 'diffusers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr
