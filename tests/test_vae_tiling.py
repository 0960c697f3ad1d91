"""Tiled VAE: the tile layout and blend (exact for a function that sees no further than the dropped margins),
the tiny random VAE within the stated tolerance, the automatic choice, and ComfyUI's VAEDecodeTiled /
VAEEncodeTiled nodes.

Stated tolerance (tiny random VAE below, 128x192 px, 128 px tiles with 64 px overlap): decode max error <= 0.30
and mean error <= 0.025 of max |whole|; encode max <= 0.12 and mean <= 0.02. Random VAE weights see across the
whole image at these sizes (the group norms' statistics, the middle attention block and a receptive field of
about 5 latent cells), which no tiling reproduces; the exact-blend test below is what pins the seams."""

import pytest
import torch
import torch.nn.functional as F

from flux2_core.comfy_layouts import decode_latent, encode_image
from flux2_core.demo_models import DEMO_VAE, random_vae
from flux2_core.vae import VAEConfig
from flux2_core.vae_tiling import (AUTO_TILE_PIXELS, VAETiling, choose_vae_tiling, decode_auto, decode_tiled,
                                   decode_working_bytes, encode_tiled, tile_spans, tiled_map)
from flux2_host.core_nodes import NODE_CLASS_MAPPINGS as CORE
from flux2_host.core_nodes.vae_tiled import node_tiling

# One block per level and 32 channels everywhere: the FLUX.2 VAE's layers and names, small enough for a test.
TEST_VAE = VAEConfig(base_channels=32, channel_multipliers=(1, 1, 1, 1), decoder_channels=(32, 32, 32, 32),
                     encoder_blocks_per_level=1, decoder_blocks_per_level=1)


@pytest.fixture(scope="module")
def vae():
    return random_vae(TEST_VAE, seed=0)


def relative_errors(tiled: torch.Tensor, whole: torch.Tensor) -> tuple[float, float]:
    scale = whole.abs().max().item()
    difference = (tiled - whole).abs()
    return difference.max().item() / scale, difference.mean().item() / scale


@pytest.mark.parametrize("length, tile, overlap", [(8, 8, 2), (5, 8, 2), (12, 8, 4), (32, 8, 2), (33, 7, 3), (10, 4, 0)])
def test_tile_spans_cover_evenly_with_the_overlap(length, tile, overlap):
    spans = tile_spans(length, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(stop - start == min(tile, length) for start, stop in spans)
    shared = [previous[1] - current[0] for previous, current in zip(spans, spans[1:])]
    assert all(s >= overlap for s in shared)
    assert max(shared, default=0) - min(shared, default=0) <= 1
    if len(spans) > 1:  # no more tiles than needed
        assert len(tile_spans(length, tile, overlap)) - 1 < (length - overlap) / (tile - overlap)
    with pytest.raises(ValueError, match="overlap"):
        tile_spans(length, tile, tile)


def local_decoder(seed: int):
    """Nearest 16x upsampling then two 3x3 convolutions: each output pixel sees 2 px around it."""
    generator = torch.Generator().manual_seed(seed)
    w1, w2 = torch.randn(8, 4, 3, 3, generator=generator), torch.randn(3, 8, 3, 3, generator=generator)
    return lambda x: F.conv2d(F.conv2d(F.interpolate(x, scale_factor=16), w1, padding=1), w2, padding=1)


def local_encoder(seed: int):
    """16x16 average pooling then a 3x3 convolution: each output cell sees 1 cell around it."""
    weight = torch.randn(5, 3, 3, 3, generator=torch.Generator().manual_seed(seed))
    return lambda x: F.conv2d(F.avg_pool2d(x, 16), weight, padding=1)


def test_blend_is_exact_where_tiles_see_their_whole_context():
    # 2 shared cells = 32 px: each tile drops 8 px at its edge, more than the 2 px the decoder looks around.
    latent = torch.randn(2, 4, 9, 14, generator=torch.Generator().manual_seed(0))
    decode = local_decoder(1)
    torch.testing.assert_close(tiled_map(decode, latent, 4, 2, 16), decode(latent), rtol=1e-5, atol=1e-5)
    # 4 shared cells: each tile drops 1 cell, the encoder's reach.
    pixels = torch.randn(1, 3, 144, 208, generator=torch.Generator().manual_seed(2))
    encode = local_encoder(3)
    torch.testing.assert_close(tiled_map(encode, pixels, 96, 64, 1 / 16, step=16), encode(pixels), rtol=1e-5, atol=1e-5)
    # Without overlap the seams show: the test above would notice a blend that ignores them.
    assert (tiled_map(decode, latent, 4, 0, 16) - decode(latent)).abs().max() > 1e-2


def test_one_tile_is_the_whole_image(vae):
    generator = torch.Generator().manual_seed(4)
    latent = torch.randn(1, 128, 4, 6, generator=generator)
    assert torch.equal(decode_tiled(vae, latent, VAETiling(96, 32)), vae.decode(latent))
    pixels = torch.rand(1, 3, 64, 96, generator=generator) * 2 - 1
    assert torch.equal(encode_tiled(vae, pixels, VAETiling(128, 32)), vae.encode(pixels))


def test_tiny_vae_tiled_within_tolerance(vae):
    generator = torch.Generator().manual_seed(5)
    latent = torch.randn(1, 128, 8, 12, generator=generator)
    pixels = torch.rand(1, 3, 128, 192, generator=generator) * 2 - 1
    tiling = VAETiling(128, 64)
    decode_max, decode_mean = relative_errors(decode_tiled(vae, latent, tiling), vae.decode(latent))
    assert decode_max <= 0.30 and decode_mean <= 0.025
    encode_max, encode_mean = relative_errors(encode_tiled(vae, pixels, tiling), vae.encode(pixels))
    assert encode_max <= 0.12 and encode_mean <= 0.02


def test_automatic_choice():
    assert choose_vae_tiling(1024, 1024) is None
    assert choose_vae_tiling(2048, 2048) is None and choose_vae_tiling(2048, 2064) == VAETiling()
    assert AUTO_TILE_PIXELS == 2048 * 2048
    whole = decode_working_bytes(1024, 1024)
    assert decode_working_bytes(2048, 2048) == 4 * whole
    # half the bytes per value, plus cuDNN's larger convolution workspace (2.5 more maps of 128 channels)
    assert decode_working_bytes(1024, 1024, dtype=torch.bfloat16) == whole // 2 + int(2.5 * 128 * 1024**2) * 2
    assert choose_vae_tiling(1024, 1024, budget_bytes=whole) is None
    tight = choose_vae_tiling(1024, 1024, budget_bytes=whole // 8)
    assert tight is not None and tight.tile % 16 == 0 and decode_working_bytes(tight.tile, tight.tile) <= whole // 8
    assert 0 < tight.overlap < tight.tile


def test_auto_decode_tiles_when_the_budget_is_tight(vae):
    latent = torch.randn(1, 128, 8, 12, generator=torch.Generator().manual_seed(6))
    config = vae.config
    assert torch.equal(decode_auto(vae, latent, budget_bytes=1 << 40), vae.decode(latent))
    budget = decode_working_bytes(128, 128, config=config)
    tiling = choose_vae_tiling(192, 128, budget_bytes=budget, config=config)
    assert tiling is not None and tiling.tile <= 128
    assert torch.equal(decode_auto(vae, latent, budget_bytes=budget), decode_tiled(vae, latent, tiling))


def test_nodes_declare_comfyui_inputs():
    decode = CORE["VAEDecodeTiled"].INPUT_TYPES()["required"]
    encode = CORE["VAEEncodeTiled"].INPUT_TYPES()["required"]
    assert list(decode) == ["samples", "vae", "tile_size", "overlap", "temporal_size", "temporal_overlap"]
    assert list(encode) == ["pixels", "vae", "tile_size", "overlap", "temporal_size", "temporal_overlap"]
    widget = lambda spec: {k: spec[1][k] for k in ("default", "min", "max", "step")}
    assert widget(decode["tile_size"]) == {"default": 512, "min": 64, "max": 4096, "step": 32}
    assert widget(encode["tile_size"]) == {"default": 512, "min": 64, "max": 4096, "step": 64}
    for spec in (decode, encode):
        assert widget(spec["overlap"]) == {"default": 64, "min": 0, "max": 4096, "step": 32}
        assert widget(spec["temporal_size"]) == {"default": 64, "min": 8, "max": 4096, "step": 4}
        assert widget(spec["temporal_overlap"]) == {"default": 8, "min": 4, "max": 4096, "step": 4}
    assert CORE["VAEDecodeTiled"].RETURN_TYPES == ("IMAGE",) and CORE["VAEEncodeTiled"].RETURN_TYPES == ("LATENT",)
    assert node_tiling(512, 64) == VAETiling(512, 64) and node_tiling(128, 64) == VAETiling(128, 32)


def test_nodes_equal_the_engine_and_stay_close_to_untiled():
    vae = random_vae(DEMO_VAE, seed=1)
    generator = torch.Generator().manual_seed(7)
    samples = torch.randn(1, 128, 8, 12, generator=generator)
    image = CORE["VAEDecodeTiled"]().decode(vae, {"samples": samples}, 128, 64, 64, 8)[0]
    assert torch.equal(image, decode_latent(vae, samples, VAETiling(128, 32)))
    whole = CORE["VAEDecode"]().decode(vae, {"samples": samples})[0]
    assert image.shape == whole.shape == (1, 128, 192, 3)
    assert (image - whole).abs().mean() <= 0.03

    latent = CORE["VAEEncodeTiled"]().encode(vae, whole, 128, 64, 64, 8)[0]["samples"]
    assert torch.equal(latent, encode_image(vae, whole, VAETiling(128, 32)))
    untiled = CORE["VAEEncode"]().encode(vae, whole)[0]["samples"]
    encode_max, encode_mean = relative_errors(latent, untiled)
    assert latent.shape == untiled.shape and encode_mean <= 0.02


def test_auto_decode_asks_the_memory_manager_how_much_room_is_left(vae):
    from flux2_core.memory import residency
    from flux2_core.memory.residency import MemoryManager

    latent = torch.randn(1, 128, 8, 12, generator=torch.Generator().manual_seed(7))
    room = decode_working_bytes(128, 128, config=vae.config)  # less than the whole 192x128 image needs
    previous = residency.default_manager()
    try:
        roomy = residency.set_default_manager(MemoryManager(device="cpu", total_bytes=1 << 40, reserve_bytes=0))
        assert roomy.working_room("cpu") == 1 << 40
        assert torch.equal(decode_auto(vae, latent), vae.decode(latent))
        tight = residency.set_default_manager(MemoryManager(device="cpu", total_bytes=room, reserve_bytes=0))
        assert tight.working_room("cpu") == room
        tiling = choose_vae_tiling(192, 128, budget_bytes=room, config=vae.config)
        assert tiling is not None and torch.equal(decode_auto(vae, latent), decode_tiled(vae, latent, tiling))
    finally:
        residency.set_default_manager(previous)
