"""FLUX.2 VAE: our BFL-named model vs diffusers' AutoencoderKLFlux2 and the latent handling of its Flux2 pipelines."""

import pytest
import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
from tiny_models import diffusers_vae

from flux2_core.checkpoints.vae_keys import bfl_vae_to_diffusers, diffusers_vae_to_bfl, is_diffusers_vae
from flux2_core.demo_models import DEMO_VAE, DEMO_VAE_SMALL_DECODER, random_vae
from flux2_core.errors import CheckpointError
from flux2_core.vae import Flux2VAE, VAEConfig, patchify_latent, unpatchify_latent

FULL_SIZE_PARAMETERS = 84_046_115
MAX_RELATIVE_ERROR = 1e-5


def diffusers_pipeline(vae: AutoencoderKLFlux2) -> Flux2KleinPipeline:
    """A real Flux2 pipeline holding only the VAE: its own encode path is the reference."""
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=None
    )


def diffusers_decode(pipe: Flux2KleinPipeline, latent: torch.Tensor) -> torch.Tensor:
    """The pipeline's decode step after sampling (batch-norm inverse, unpatchify, VAE decode)."""
    vae = pipe.vae
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return vae.decode(pipe._unpatchify_latents(latent * std + mean), return_dict=False)[0]


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("config", [DEMO_VAE, DEMO_VAE_SMALL_DECODER], ids=["tiny", "tiny-small-decoder"])
def test_encode_decode_match_diffusers(config):
    ours = random_vae(config, seed=0)
    pipe = diffusers_pipeline(diffusers_vae(ours.state_dict(), ours.config))
    pixels = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1

    with torch.no_grad():
        latent = ours.encode(pixels)
        reference_latent = pipe._encode_vae_image(pixels, generator=None)
    assert latent.shape == (2, 128, 4, 3)
    assert relative_error(latent, reference_latent) <= MAX_RELATIVE_ERROR

    with torch.no_grad():
        image = ours.decode(latent)
        reference_image = diffusers_decode(pipe, latent)
    assert image.shape == (2, 3, 64, 48)
    assert relative_error(image, reference_image) <= MAX_RELATIVE_ERROR


def test_small_decoder_config_is_read_from_shapes():
    for config in (DEMO_VAE, DEMO_VAE_SMALL_DECODER, VAEConfig()):
        model = Flux2VAE(config, device="meta")
        shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
        assert VAEConfig.from_shapes(shapes) == config
    assert DEMO_VAE_SMALL_DECODER.encoder_channels == (32, 64, 64, 64)
    assert VAEConfig().latent_channels == 128 and VAEConfig().downsample_factor == 16


def test_full_size_model_on_meta_matches_diffusers_layout():
    model = Flux2VAE(VAEConfig(), device="meta")
    assert sum(p.numel() for p in model.parameters()) == FULL_SIZE_PARAMETERS
    assert all(t.is_meta for t in model.state_dict().values())

    with torch.device("meta"):
        reference = AutoencoderKLFlux2()
    reference_shapes = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    converted = bfl_vae_to_diffusers(model.state_dict())
    assert {name: tuple(t.shape) for name, t in converted.items()} == reference_shapes

    back = diffusers_vae_to_bfl(reference.state_dict())
    assert {name: tuple(t.shape) for name, t in back.items()} == {
        name: tuple(t.shape) for name, t in model.state_dict().items()
    }


def test_key_names_follow_bfl_and_diffusers_conventions():
    names = set(Flux2VAE(VAEConfig(), device="meta").state_dict())
    for expected in (
        "encoder.down.0.block.1.conv2.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.2.downsample.conv.bias",
        "encoder.mid.attn_1.proj_out.weight",
        "encoder.quant_conv.weight",
        "decoder.post_quant_conv.weight",
        "decoder.up.3.upsample.conv.weight",
        "decoder.up.0.block.2.norm2.bias",
        "bn.running_mean",
        "bn.running_var",
    ):
        assert expected in names
    assert "encoder.down.3.downsample.conv.weight" not in names
    assert "decoder.up.0.upsample.conv.weight" not in names

    converted = bfl_vae_to_diffusers(Flux2VAE(VAEConfig(), device="meta").state_dict())
    assert converted["decoder.up_blocks.3.resnets.0.conv_shortcut.weight"].shape == (128, 256, 1, 1)
    assert converted["encoder.mid_block.attentions.0.to_out.0.weight"].shape == (512, 512)
    assert is_diffusers_vae(converted) and not is_diffusers_vae(names)


def test_round_trip_bfl_diffusers_bfl_is_exact():
    sd = random_vae(DEMO_VAE_SMALL_DECODER, seed=2).state_dict()
    back = diffusers_vae_to_bfl(bfl_vae_to_diffusers(sd))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[name], sd[name]) for name in sd)


def test_checkpoint_without_num_batches_tracked_loads():
    # A plain dict, as safetensors returns it (no state-dict version metadata).
    sd = {name: t for name, t in random_vae(DEMO_VAE, seed=3).state_dict().items() if name != "bn.num_batches_tracked"}
    model = Flux2VAE(VAEConfig.from_shapes({k: tuple(v.shape) for k, v in sd.items()}))
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.bn.running_var, sd["bn.running_var"])


def test_unknown_tensors_are_rejected_with_their_name():
    with pytest.raises(CheckpointError, match="encoder.mystery.weight"):
        bfl_vae_to_diffusers({"encoder.mystery.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="double_blocks"):
        diffusers_vae_to_bfl({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="decoder.up"):
        VAEConfig.from_shapes({"encoder.conv_in.weight": (128, 3, 3, 3), "encoder.down.0.block.0.conv2.weight": (128,)})


def test_patchify_packs_channel_c4_pi2_pj_and_inverts():
    latent = torch.randn(2, 3, 6, 8)
    packed = patchify_latent(latent)
    assert packed.shape == (2, 12, 3, 4)
    for c in range(3):
        for pi in range(2):
            for pj in range(2):
                assert torch.equal(packed[:, c * 4 + pi * 2 + pj], latent[:, c, pi::2, pj::2])
    assert torch.equal(unpatchify_latent(packed), latent)
    assert torch.equal(packed, Flux2KleinPipeline._patchify_latents(latent))


def test_encode_rejects_sizes_that_are_not_multiples_of_16():
    with pytest.raises(ValueError, match="multiples of 16"):
        Flux2VAE(DEMO_VAE).encode(torch.zeros(1, 3, 40, 32))


def test_bfloat16_model_tracks_float32_and_keeps_exact_statistics():
    reference = random_vae(DEMO_VAE, seed=4)
    model = Flux2VAE(DEMO_VAE, dtype=torch.bfloat16)
    model.load_state_dict(reference.state_dict())
    assert model.encoder.conv_in.weight.dtype == torch.bfloat16 and model.bn.running_var.dtype == torch.float32
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1

    latent = model.encode(pixels)
    reference_latent = reference.encode(pixels)
    assert latent.dtype == torch.bfloat16
    assert relative_error(latent.float(), reference_latent) <= 3e-2

    image = model.decode(reference_latent)
    assert image.dtype == torch.bfloat16
    assert relative_error(image.float(), reference.decode(reference_latent)) <= 3e-2


@pytest.mark.parametrize("direction", ["decode", "encode"])
def test_an_interrupt_stops_encode_and_decode_between_blocks(direction):
    """/interrupt sets the flag while a huge image is in the VAE: the next block boundary raises, so no
    later block runs (on CPU each block of a 16384^2 image takes seconds)."""
    from flux2_core.errors import Interrupted
    from flux2_core.progress import clear_interrupt, request_interrupt

    vae = random_vae(DEMO_VAE, seed=0)
    coder = vae.decoder if direction == "decode" else vae.encoder
    levels = list(coder.up if direction == "decode" else coder.down)
    ran = []
    levels[0 if direction == "encode" else -1].block[0].register_forward_hook(lambda *_: request_interrupt())
    for level in levels:
        for block in level.block:
            block.register_forward_hook(lambda module, *_: ran.append(module))
    source = torch.randn(1, 128, 4, 4) if direction == "decode" else torch.rand(1, 3, 64, 64) * 2 - 1
    try:
        with pytest.raises(Interrupted):
            getattr(vae, direction)(source)
    finally:
        clear_interrupt()
    assert len(ran) == 1  # the block that asked, and not one more


def test_mid_block_attention_in_chunks_matches_one_call_and_stops_between_chunks(monkeypatch):
    """Huge images attend in chunks of queries (ATTENTION_SCORES_PER_CALL): the same result as one call, and
    /interrupt is honoured between chunks instead of after the whole mid-block attention."""
    from flux2_core import vae as vae_module
    from flux2_core.errors import Interrupted
    from flux2_core.progress import clear_interrupt, request_interrupt

    vae = random_vae(DEMO_VAE, seed=0)
    attention = vae.decoder.mid.attn_1
    x = torch.randn(2, attention.q.in_channels, 6, 5)
    with torch.no_grad():
        whole = attention(x)
        monkeypatch.setattr(vae_module, "ATTENTION_SCORES_PER_CALL", 2 * 30 * 7)  # 7 queries per call, 5 calls
        chunked = attention(x)
    assert relative_error(chunked, whole) <= MAX_RELATIVE_ERROR

    calls = []

    def attend_and_interrupt_during_the_second_call(q, k, v):
        calls.append(q.shape[2])
        if len(calls) == 2:
            request_interrupt()  # /interrupt arrives while the second chunk is computed
        return torch.zeros_like(q)

    monkeypatch.setattr(vae_module.F, "scaled_dot_product_attention", attend_and_interrupt_during_the_second_call)
    try:
        with pytest.raises(Interrupted):
            attention(x)
    finally:
        clear_interrupt()
    assert calls == [7, 7]  # stopped after the chunk that was running, not after all five


def test_encode_image_does_not_depend_on_the_image_layout():
    """An IMAGE [B, H, W, C] is contiguous from our nodes and a moved-dim view of [B, C, H, W] from ComfyUI's image
    nodes (ImageScaleToTotalPixels & co.); the same pixels must give the same latent. Before, one reached the
    convolutions channels-last and the other not: real ComfyUI 0.12.1 encoded the img2img workflow's picture 1.85
    away from the host (demo VAE, flat areas) and the sampled image differed by up to 5 levels."""
    from flux2_core.comfy_layouts import encode_image

    vae = random_vae(DEMO_VAE, seed=5)
    image = torch.rand(1, 48, 80, 3, generator=torch.Generator().manual_seed(0))
    image[:, :, :40] = 0.5  # a flat area, where group norms magnify rounding differences
    comfyui_layout = image.movedim(-1, 1).contiguous().movedim(1, -1)
    assert torch.equal(comfyui_layout, image) and comfyui_layout.stride() != image.stride()
    assert torch.equal(encode_image(vae, image), encode_image(vae, comfyui_layout))
