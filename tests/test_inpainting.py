"""Inpainting as an engine feature: sample(mask=), Flux2Pipeline(mask=), the pack's sampler honouring a LATENT's
noise_mask. Outside the mask the result is the source: exactly in the latent, and in pixels up to what the VAE's
decoder mixes across the mask border (compared with a plain VAE round trip, away from the border)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import custom_nodes_flux2
from flux2_core.checkpoints.loaders import load_dit, load_vae
from flux2_core.comfy_layouts import decode_latent, encode_image
from flux2_core.patched_model import PatchedModel
from flux2_core.pipeline import Flux2Pipeline
from flux2_core.sampling import flux2_sigmas, latent_mask, make_noise, sample

KLEIN, QWEN, VAE = "flux-2-klein-4b.safetensors", "qwen_3_4b.safetensors", "flux2-vae.safetensors"
WIDTH, HEIGHT = 96, 64  # a 6 x 4 latent grid
PACK = custom_nodes_flux2.NODE_CLASS_MAPPINGS


def picture(seed: int = 0) -> Image.Image:
    """A smooth picture (so that the tiny VAE reproduces it reasonably)."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    rgb = np.stack([x / WIDTH, y / HEIGHT, 0.5 + 0.3 * np.sin((x + seed) / 9.0)], -1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def right_half_mask() -> torch.Tensor:
    """[1, H, W]: regenerate the right half (latent columns 3..5), keep the left half."""
    mask = torch.zeros(1, HEIGHT, WIDTH)
    mask[:, :, WIDTH // 2:] = 1.0
    return mask


@pytest.fixture(scope="module")
def models(demo_models_dir: Path) -> dict:
    return {"dit": load_dit(demo_models_dir / "diffusion_models" / KLEIN),
            "vae": load_vae(demo_models_dir / "vae" / VAE), "dir": demo_models_dir}


def as_image(pil: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).unsqueeze(0)


def test_latent_mask_is_bilinear_on_the_latent_grid() -> None:
    mask = right_half_mask()
    resized = latent_mask(mask, (2, 128, 4, 6))
    assert resized.shape == (2, 128, 4, 6)
    expected = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0]).expand(4, 6)
    assert torch.equal(resized[1, 7], expected)
    # A latent-resolution mask passes through unchanged.
    assert torch.equal(latent_mask(resized[:1, :1], (1, 128, 4, 6))[0, 0], expected)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_ancestral"])
def test_engine_keeps_the_unmasked_latent_and_changes_the_masked_one(models, sampler: str) -> None:
    source = encode_image(models["vae"], as_image(picture()))
    context = torch.randn(1, 512, 96, generator=torch.Generator().manual_seed(1))
    out = sample(models["dit"], make_noise(3, source.shape), flux2_sigmas(4, WIDTH, HEIGHT), context,
                 latent_image=source, mask=right_half_mask(), sampler=sampler, seed=3)
    torch.testing.assert_close(out[..., :3], source[..., :3], rtol=0, atol=1e-5)
    assert (out[..., 3:] - source[..., 3:]).abs().mean() > 0.1
    # Without the mask the whole latent is regenerated.
    unmasked = sample(models["dit"], make_noise(3, source.shape), flux2_sigmas(4, WIDTH, HEIGHT), context,
                      latent_image=source, sampler=sampler, seed=3)
    assert (unmasked[..., :3] - source[..., :3]).abs().mean() > 0.1


def test_engine_model_input_outside_the_mask_is_the_source_noised_to_sigma(models) -> None:
    """ComfyUI's rule: the model sees sigma * noise + (1 - sigma) * source where the mask is 0."""
    source = encode_image(models["vae"], as_image(picture()))
    noise = make_noise(3, source.shape)
    sigmas = flux2_sigmas(3, WIDTH, HEIGHT)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    model = models["dit"]
    original_forward = model.forward

    def recording_forward(img, img_ids, txt, txt_ids, timesteps, guidance, **kwargs):
        seen.append((img.detach().clone(), timesteps[0].clone()))
        return original_forward(img, img_ids, txt, txt_ids, timesteps, guidance, **kwargs)

    model.forward = recording_forward
    try:
        sample(model, noise, sigmas, torch.zeros(1, 512, 96), latent_image=source, mask=right_half_mask())
    finally:
        del model.forward
    assert len(seen) == 3
    for tokens, sigma in seen[1:]:
        model_input = tokens.transpose(1, 2).reshape(1, 128, 4, 6)
        expected = sigma * noise + (1 - sigma) * source
        torch.testing.assert_close(model_input[..., :3], expected[..., :3], rtol=0, atol=1e-5)


def test_pipeline_mask_changes_only_the_masked_region_after_a_vae_round_trip(models) -> None:
    """The latent outside the mask is the source's exactly. In pixels the tiny random VAE's decoder (GroupNorm
    statistics, mid-block attention) spreads every latent over the whole image, so outside the mask the pixels
    only stay much closer to the VAE round trip than inside it."""
    pipe = Flux2Pipeline.from_files(models["dir"] / "diffusion_models" / KLEIN, models["dir"] / "vae" / VAE,
                                    models["dir"] / "text_encoders" / QWEN)
    source = picture()
    mask = Image.new("L", (WIDTH, HEIGHT), 0)
    mask.paste(255, (WIDTH // 2, 0, WIDTH, HEIGHT))
    source_latent = encode_image(pipe.vae, as_image(source))
    latent = pipe("a lake", width=WIDTH, height=HEIGHT, image=source, mask=mask, seed=2, output_type="latent")
    torch.testing.assert_close(latent[..., :3], source_latent[..., :3], rtol=0, atol=1e-5)
    assert (latent[..., 3:] - source_latent[..., 3:]).abs().mean() > 0.1

    result = as_image(pipe("a lake", width=WIDTH, height=HEIGHT, image=source, mask=mask, seed=2)[0])
    round_trip = decode_latent(pipe.vae, source_latent)
    kept = (result - round_trip)[:, :, : WIDTH // 2].abs().mean()
    changed = (result - round_trip)[:, :, WIDTH // 2:].abs().mean()
    assert kept < 0.75 * changed
    with pytest.raises(Exception, match="mask: inpainting needs the `image`"):
        pipe("a lake", width=WIDTH, height=HEIGHT, mask=mask)


def test_pack_sampler_honours_the_latent_noise_mask(models) -> None:
    source = encode_image(models["vae"], as_image(picture()))
    positive = custom_nodes_flux2.conditioning.Flux2Conditioning(torch.randn(1, 512, 96), text_encoder=None)
    model = PatchedModel(models["dit"], "klein-4b")
    latent = {"samples": source, "noise_mask": right_half_mask().reshape(1, 1, HEIGHT, WIDTH)}
    out = PACK["Flux2Sampler"]().sample(model, positive, latent, 1, 4, 0.0, 0.0, 1.0, "euler")[0]
    torch.testing.assert_close(out["samples"][..., :3], source[..., :3], rtol=0, atol=1e-5)
    assert (out["samples"][..., 3:] - source[..., 3:]).abs().mean() > 0.1
    assert "noise_mask" in out  # the LATENT passes on its keys, like ComfyUI's samplers


def test_engine_combines_prompt_entries_weighted_by_strength(models) -> None:
    """Several entries: the strength-weighted mean of their x0 predictions; one Euler step from sigma 1 lands on
    the prediction, so the result is the weighted mean of the one-entry results."""
    from flux2_core.sampling import PromptEntry

    generator = torch.Generator().manual_seed(4)
    a, b = torch.randn(1, 512, 96, generator=generator), torch.randn(1, 512, 96, generator=generator)
    noise, sigmas = make_noise(1, (1, 128, 4, 6)), torch.tensor([1.0, 0.0])
    alone = [sample(models["dit"], noise, sigmas, c) for c in (a, b)]
    combined = sample(models["dit"], noise, sigmas, [PromptEntry(a, 1.0), PromptEntry(b, 3.0)])
    torch.testing.assert_close(combined, (alone[0] + 3 * alone[1]) / 4, rtol=1e-4, atol=1e-5)
    # CFG on the averaged predictions: cfg 2 with a two-entry negative.
    negative = [PromptEntry(a), PromptEntry(b)]
    with_cfg = sample(models["dit"], noise, sigmas, b, negative_context=negative, cfg=2.0)
    torch.testing.assert_close(with_cfg, (alone[0] + alone[1]) / 2 + 2 * (alone[1] - (alone[0] + alone[1]) / 2),
                               rtol=1e-4, atol=1e-4)


def test_differential_mask_thresholds_by_the_progress_of_sigma() -> None:
    from flux2_core.sampling import DifferentialMask

    mask = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    sigmas = torch.tensor([1.0, 0.6, 0.2, 0.0])
    rule = DifferentialMask(1.0, sigma_min=0.1)  # sigma_to = max(0, 0.1)
    # sigma 0.6: threshold (0.6 - 0.1) / (1 - 0.1) = 0.555...
    assert rule.at(mask, torch.tensor(0.6), sigmas).tolist() == [0, 0, 0, 1, 1]
    assert rule.at(mask, torch.tensor(1.0), sigmas).tolist() == [0, 0, 0, 0, 1]
    half = DifferentialMask(0.5, sigma_min=0.1).at(mask, torch.tensor(0.6), sigmas)
    torch.testing.assert_close(half, 0.5 * torch.tensor([0, 0, 0, 1.0, 1]) + 0.5 * mask)


def test_differential_diffusion_with_a_binary_mask_is_plain_inpainting(models) -> None:
    from flux2_core.sampling import DifferentialMask

    source = encode_image(models["vae"], as_image(picture()))
    context = torch.randn(1, 512, 96, generator=torch.Generator().manual_seed(1))
    args = (models["dit"], make_noise(3, source.shape), flux2_sigmas(4, WIDTH, HEIGHT), context)
    plain = sample(*args, latent_image=source, mask=right_half_mask())
    differential = sample(*args, latent_image=source, mask=right_half_mask(), differential=DifferentialMask(1.0, 7e-4))
    torch.testing.assert_close(differential, plain, rtol=0, atol=1e-6)
    # A grey mask: kept at the first steps, regenerated later: between the source and a full regeneration.
    grey = sample(*args, latent_image=source, mask=right_half_mask() * 0.5, differential=DifferentialMask(1.0, 7e-4))
    assert 0 < (grey[..., 3:] - source[..., 3:]).abs().mean() < (plain[..., 3:] - source[..., 3:]).abs().mean()
    torch.testing.assert_close(grey[..., :3], source[..., :3], rtol=0, atol=1e-5)
