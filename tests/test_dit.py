"""Flux2DiT vs diffusers' Flux2Transformer2DModel on tiny random models, plus the BFL <-> diffusers key maps."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from tiny_models import diffusers_transformer, dit_config

from flux2_core.attention import attention, set_attention_backend
from flux2_core.checkpoints.dit_keys import (
    bfl_name_to_diffusers,
    bfl_to_diffusers,
    diffusers_name_to_bfl,
    diffusers_to_bfl,
    strip_bfl_prefix,
)
from flux2_core.demo_models import random_dit
from flux2_core.dit import Flux2DiT
from flux2_core.errors import CheckpointError, Flux2Error, IncompatibleModelsError
from flux2_core.variants import FULL_SIZE_DIT, VARIANTS, DiTConfig, guess_variant

TXT_LEN, IMG_GRID, REF_GRID = 7, (3, 4), (2, 3)


# The tiny DiTs here read 48-wide prompts: tiny_config(guidance_embed, head_dim=32, num_heads=2).
tiny_config = partial(dit_config, context_dim=48)


def position_ids() -> tuple[torch.Tensor, torch.Tensor]:
    """Text (0,0,0,k); image grid (0,i,j,0); one reference grid at t = 10, as the pipeline builds them."""
    txt_ids = torch.zeros(TXT_LEN, 4)
    txt_ids[:, 3] = torch.arange(TXT_LEN)
    grids = []
    for t, (rows, cols) in ((0, IMG_GRID), (10, REF_GRID)):
        i, j = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        grids.append(torch.stack((torch.full_like(i, t), i, j, torch.zeros_like(i)), dim=-1).reshape(-1, 4))
    return torch.cat(grids).float(), txt_ids


def inputs(config: DiTConfig, batch: int = 2, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    img_ids, txt_ids = position_ids()
    img = torch.randn(batch, img_ids.shape[0], config.in_channels, generator=generator)
    txt = torch.randn(batch, TXT_LEN, config.context_dim, generator=generator)
    timesteps = torch.tensor([0.93, 0.31])[:batch]
    guidance = torch.tensor([4.0, 2.5])[:batch] if config.guidance_embed else None
    return img, img_ids, txt, txt_ids, timesteps, guidance


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


@pytest.mark.parametrize(
    "config",
    [tiny_config(True), tiny_config(False), tiny_config(False, head_dim=128, num_heads=1)],
    ids=["dev-like", "klein-like", "head-dim-128"],
)
def test_forward_matches_diffusers_fp32(config):
    ours = random_dit(config, seed=0)
    reference = diffusers_transformer(ours.state_dict(), ours.config)
    img, img_ids, txt, txt_ids, timesteps, guidance = inputs(config)
    batch = img.shape[0]
    with torch.no_grad():
        out = ours(img, img_ids.expand(batch, -1, -1), txt, txt_ids.expand(batch, -1, -1), timesteps, guidance)
        expected = reference(
            hidden_states=img, encoder_hidden_states=txt, timestep=timesteps, img_ids=img_ids, txt_ids=txt_ids,
            guidance=guidance,
        ).sample
    assert out.shape == img.shape and out.dtype == torch.float32
    assert expected.abs().max() > 0.1  # a real signal, not a collapsed output
    assert relative_error(out, expected) <= 1e-5


def test_bf16_weights_compute_in_bf16_close_to_fp32_reference():
    config = tiny_config(True)
    ours = random_dit(config, seed=0)
    reference = diffusers_transformer(ours.state_dict(), ours.config)
    img, img_ids, txt, txt_ids, timesteps, guidance = inputs(config)
    ours.to(torch.bfloat16)
    assert ours.compute_dtype == torch.bfloat16
    with torch.no_grad():
        out = ours(img, img_ids[None], txt, txt_ids[None], timesteps, guidance)  # fp32 inputs are cast inside
        expected = reference(
            hidden_states=img, encoder_hidden_states=txt, timestep=timesteps, img_ids=img_ids, txt_ids=txt_ids,
            guidance=guidance,
        ).sample
    assert out.dtype == torch.bfloat16
    assert relative_error(out, expected) <= 3e-2


def test_batch_items_with_their_own_position_ids_match_single_forwards():
    config = tiny_config(False)
    model = random_dit(config, seed=0)
    img, img_ids, txt, txt_ids, timesteps, _ = inputs(config)
    shifted_ids = img_ids.clone()
    shifted_ids[:, 1:3] += 5
    batch_ids = torch.stack((img_ids, shifted_ids))
    with torch.no_grad():
        together = model(img, batch_ids, txt, txt_ids.expand(2, -1, -1), timesteps)
        apart = [model(img[b:b + 1], batch_ids[b:b + 1], txt[b:b + 1], txt_ids[None], timesteps[b:b + 1]) for b in range(2)]
    assert relative_error(together, torch.cat(apart)) <= 1e-6
    assert relative_error(apart[0], apart[1]) > 1e-3  # the ids matter


def test_input_errors_name_what_was_expected():
    dev = random_dit(tiny_config(True), seed=0)
    img, img_ids, txt, txt_ids, timesteps, guidance = inputs(dev.config, batch=1)
    with pytest.raises(Flux2Error, match="guidance"):
        dev(img, img_ids[None], txt, txt_ids[None], timesteps, None)
    with pytest.raises(IncompatibleModelsError, match="expects 48"):
        dev(img, img_ids[None], txt[..., :40], txt_ids[None], timesteps, guidance)


def test_bfl_diffusers_round_trip_is_exact():
    model = random_dit(tiny_config(True), seed=0)
    bfl = model.state_dict()
    diffusers_sd = bfl_to_diffusers(bfl)
    assert set(diffusers_sd) == set(diffusers_transformer(model.state_dict(), model.config).state_dict())
    back = diffusers_to_bfl(diffusers_sd)
    assert list(back) != [] and set(back) == set(bfl)
    assert all(torch.equal(back[name], bfl[name]) for name in bfl)


def test_prefixed_bfl_names_convert_like_plain_ones():
    bfl = random_dit(tiny_config(False), seed=0).state_dict()
    comfy = {f"model.diffusion_model.{name}": tensor for name, tensor in bfl.items()}
    plain, prefixed = bfl_to_diffusers(bfl), bfl_to_diffusers(comfy)
    assert set(plain) == set(prefixed) and all(torch.equal(plain[k], prefixed[k]) for k in plain)
    assert strip_bfl_prefix("diffusion_model.img_in.weight") == "img_in.weight"
    assert strip_bfl_prefix("model.diffusion_model.img_in.weight") == "img_in.weight"
    assert strip_bfl_prefix("img_in.weight") == "img_in.weight"


def test_name_map_places_every_diffusers_tensor_in_its_bfl_rows():
    """The pure-name map (for LoRA) agrees with the tensor conversion, for every tensor."""
    bfl = random_dit(tiny_config(True), seed=0).state_dict()
    for name, tensor in bfl_to_diffusers(bfl).items():
        target = diffusers_name_to_bfl(name)
        fused = bfl[target.bfl_name]
        if target.swap_halves:
            fused = torch.cat(fused.chunk(2)[::-1])
        expected = fused if target.row_slice is None else fused.chunk(target.num_slices)[target.row_slice]
        assert torch.equal(tensor, expected), name


def test_name_map_examples():
    hidden = 64
    assert tuple(diffusers_name_to_bfl("transformer_blocks.3.attn.to_k")) == ("double_blocks.3.img_attn.qkv", 1, 3, False)
    assert tuple(diffusers_name_to_bfl("transformer_blocks.0.attn.add_v_proj.weight")) == (
        "double_blocks.0.txt_attn.qkv.weight", 2, 3, False)
    assert tuple(diffusers_name_to_bfl("single_transformer_blocks.11.attn.to_qkv_mlp_proj")) == (
        "single_blocks.11.linear1", None, 1, False)
    assert diffusers_name_to_bfl("norm_out.linear.weight").swap_halves
    assert diffusers_name_to_bfl("transformer_blocks.1.ff_context.linear_out").bfl_name == "double_blocks.1.txt_mlp.2"
    # The to_k row slice of a fused qkv [3H, H] is rows H..2H.
    qkv = torch.arange(3 * hidden * 2.0).reshape(3 * hidden, 2)
    to_k = bfl_to_diffusers({"double_blocks.0.img_attn.qkv.weight": qkv})["transformer_blocks.0.attn.to_k.weight"]
    assert torch.equal(to_k, qkv[hidden:2 * hidden])
    names, swapped = bfl_name_to_diffusers("final_layer.adaLN_modulation.1.weight")
    assert names == ("norm_out.linear.weight",) and swapped


def test_key_map_errors():
    with pytest.raises(CheckpointError, match="no match"):
        diffusers_name_to_bfl("transformer_blocks.0.attn.to_z.weight")
    with pytest.raises(CheckpointError, match="no match"):
        bfl_to_diffusers({"double_blocks.0.img_mod.lin.weight": torch.zeros(6, 1)})
    with pytest.raises(CheckpointError, match=r"missing \['transformer_blocks.0.attn.to_v.weight'\]"):
        diffusers_to_bfl({"transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2),
                          "transformer_blocks.0.attn.to_k.weight": torch.zeros(2, 2)})


def test_config_from_shapes_recovers_tiny_config():
    for config in (tiny_config(True), tiny_config(False, head_dim=128, num_heads=1)):
        shapes = {name: tuple(t.shape) for name, t in Flux2DiT(config, device="meta").state_dict().items()}
        assert DiTConfig.from_shapes(shapes) == config


def test_config_from_shapes_errors():
    with pytest.raises(CheckpointError, match="diffusers naming"):
        DiTConfig.from_shapes({"x_embedder.weight": (64, 128)})
    with pytest.raises(CheckpointError, match=r"missing \['txt_in.weight'"):
        DiTConfig.from_shapes({"img_in.weight": (64, 128), "time_in.in_layer.weight": (64, 256)})


def test_variant_defaults_and_guess():
    assert (VARIANTS["flux2-dev"].steps, VARIANTS["flux2-dev"].guidance, VARIANTS["flux2-dev"].cfg) == (50, 4.0, 1.0)
    assert (VARIANTS["klein-4b"].steps, VARIANTS["klein-9b"].cfg) == (4, 1.0)
    assert (VARIANTS["klein-base-9b"].steps, VARIANTS["klein-base-4b"].cfg) == (50, 4.0)
    assert all(v.family in FULL_SIZE_DIT for v in VARIANTS.values())

    assert guess_variant(FULL_SIZE_DIT["dev"]) == "flux2-dev"
    assert guess_variant(FULL_SIZE_DIT["klein-4b"], "flux-2-klein-4b.safetensors") == "klein-4b"
    assert guess_variant(FULL_SIZE_DIT["klein-9b"], "flux-2-klein-base-9b.safetensors") == "klein-base-9b"
    assert guess_variant(FULL_SIZE_DIT["klein-4b"], "", {"modelspec.title": "FLUX.2 [klein] Base 4B"}) == "klein-base-4b"
    assert guess_variant(FULL_SIZE_DIT["klein-4b"], "", {"modelspec.description": "distilled from the base model"}) == "klein-4b"
    assert guess_variant(FULL_SIZE_DIT["klein-4b"], "my_database_model") == "klein-4b"
    assert guess_variant(tiny_config(False), "tiny_klein_base_9b") == "klein-base-9b"
    assert guess_variant(tiny_config(False)) == "klein-4b"


def test_attention_is_plain_softmax_attention():
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 5, 16, generator=generator) for _ in range(3))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(16), dim=-1)
    expected = (weights @ v).transpose(1, 2).reshape(2, 5, 3 * 16)
    assert relative_error(attention(q, k, v), expected) <= 1e-6
    with pytest.raises(Flux2Error, match="sdpa"):
        set_attention_backend("nonexistent")
