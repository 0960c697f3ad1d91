"""ComfyUI's ModelPatcher patch API on PatchedModel: a small pack written here uses it the way ComfyUI packs do
(clone, set_model_attn1_patch, set_model_attn1_output_patch, model_options["sampler_post_cfg_function"],
model.model.diffusion_model.params), checked against expectations computed independently on a tiny DiT."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import dit_config

from flux2_core.demo_models import random_dit
from flux2_core.errors import Flux2Error
from flux2_core.model_patches import ATTN1_OUTPUT_PATCH, ATTN1_PATCH, ComfyFluxParams
from flux2_core.patched_model import REFERENCE_KV_CACHE, PatchedModel
from flux2_core.references import image_position_ids, reference_position_ids, text_position_ids
from flux2_core.sampling import pack_latents, sample, unpack_latents

BATCH, TXT_LEN, GRID, REF_GRID = 1, 5, (2, 3), (2, 2)
CONTEXT_DIM = 48
# ComfyUI's samplers.cfg_function passes exactly these to a post-CFG function.
COMFY_POST_CFG_ARGS = {"denoised", "cond", "uncond", "cond_scale", "model", "uncond_denoised", "cond_denoised",
                       "sigma", "model_options", "input"}


def tiny_model(dtype: torch.dtype = torch.float32, seed: int = 3) -> PatchedModel:
    config = dit_config(False, context_dim=CONTEXT_DIM, head_dim=16, num_heads=2)
    return PatchedModel(random_dit(config, seed, dtype), "klein-4b")


def dit_inputs(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """One forward's inputs: image then reference tokens, text, ids, timestep."""
    generator = torch.Generator().manual_seed(seed)
    tokens = GRID[0] * GRID[1] + REF_GRID[0] * REF_GRID[1]
    img_ids = torch.cat([image_position_ids(*GRID, BATCH), reference_position_ids([REF_GRID], BATCH)], dim=1)
    return {"img": torch.randn(BATCH, tokens, 128, generator=generator).to(dtype), "img_ids": img_ids,
            "txt": torch.randn(BATCH, TXT_LEN, CONTEXT_DIM, generator=generator).to(dtype),
            "txt_ids": text_position_ids(BATCH, TXT_LEN), "timesteps": torch.full((BATCH,), 0.7)}


def options_of(model: PatchedModel, **extra: object) -> dict:
    """The transformer_options a sampler step would pass (the model's, plus the sampler's entries)."""
    return {**model.model_options["transformer_options"], "sigmas": torch.full((BATCH,), 0.7),
            "reference_image_num_tokens": [REF_GRID[0] * REF_GRID[1]], **extra}


# --- the pack: ComfyUI-style patches, as third-party packs write them ---------------------------------------

def reference_weight_patch(weight: float):
    """Scales the last reference's keys, the way reference-weight nodes do (reference_image_num_tokens)."""
    def patch(q, k, v, pe=None, attn_mask=None, extra_options=None):
        count = extra_options["reference_image_num_tokens"][-1]
        k = k.clone()
        k[:, :, -count:] *= weight
        return {"q": q, "k": k, "v": v}
    return patch


def unchanged_patch(q, k, v, pe=None, attn_mask=None, extra_options=None):
    return {"q": q, "k": k, "v": v, "pe": pe, "attn_mask": attn_mask}


def unchanged_output_patch(attn, extra_options):
    return attn


def apply_pack(model: PatchedModel, *patches, output_patches=()) -> PatchedModel:
    patched = model.clone()
    for patch in patches:
        patched.set_model_attn1_patch(patch)
    for patch in output_patches:
        patched.set_model_attn1_output_patch(patch)
    return patched


# --- tests ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patches_that_change_nothing_give_bit_identical_outputs(dtype: torch.dtype) -> None:
    model = tiny_model(dtype)
    inputs = dit_inputs(dtype=dtype)
    plain = model.diffusion_model(**inputs)
    patched = apply_pack(model, unchanged_patch, output_patches=[unchanged_output_patch])
    assert torch.equal(model.diffusion_model(**inputs, transformer_options=options_of(patched)), plain)


def hide_references_patch(q, k, v, pe=None, attn_mask=None, extra_options=None):
    """A boolean key mask (True = may attend) hiding every reference token, as masking packs return it."""
    allow = torch.ones(k.shape[0], 1, 1, k.shape[2], dtype=torch.bool)
    allow[..., -sum(extra_options["reference_image_num_tokens"]):] = False
    return {"attn_mask": allow}


@pytest.mark.parametrize("masked", [False, True])
def test_attn1_patch_gives_attention_computed_by_hand(masked: bool) -> None:
    """At every block the attention handed to the output patch equals softmax(rope(q) rope(k')^T / sqrt(d)) v,
    computed here in float64 from the q, k, v, pe the input patch saw, with k' the keys scaled by the reference
    weight patch (and, masked, the reference keys left out)."""
    seen: dict = {}

    def record_inputs(q, k, v, pe=None, attn_mask=None, extra_options=None):
        seen[(extra_options["block_type"], extra_options["block_index"])] = [q, k, v, pe]
        return {}

    def record_output(attn, extra_options):
        seen[(extra_options["block_type"], extra_options["block_index"])].append(attn)
        return attn

    weight = 0.25
    patches = [record_inputs, reference_weight_patch(weight)] + ([hide_references_patch] if masked else [])
    patched = apply_pack(tiny_model(), *patches, output_patches=[record_output])
    patched.diffusion_model(**dit_inputs(), transformer_options=options_of(patched))
    assert sorted(seen) == [("double", 0), ("double", 1), ("single", 0), ("single", 1)]
    refs = REF_GRID[0] * REF_GRID[1]
    for q, k, v, pe, attn in seen.values():
        k = k.double().clone()
        k[:, :, -refs:] *= weight
        q, k = rotate(q.double(), pe), rotate(k, pe)
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if masked:
            logits[..., -refs:] = -math.inf
        expected = (torch.softmax(logits, dim=-1) @ v.double()).transpose(1, 2).flatten(2)
        torch.testing.assert_close(attn.double(), expected, rtol=1e-5, atol=1e-5)


def rotate(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """RoPE from its definition: x [B, heads, L, D], pe [B, L, 1, D/2, (cos, sin)]; pairs (a, b) ->
    (a cos - b sin, a sin + b cos)."""
    cos, sin = pe[..., 0].transpose(1, 2).double(), pe[..., 1].transpose(1, 2).double()
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


def test_extra_options_carry_comfyui_block_entries() -> None:
    calls: list[dict] = []

    def record(q, k, v, pe=None, attn_mask=None, extra_options=None):
        calls.append({"shape": tuple(q.shape), **{key: extra_options.get(key) for key in (
            "block_type", "block_index", "total_blocks", "img_slice", "reference_image_num_tokens")}})
        return {"q": q, "k": k, "v": v}

    patched = apply_pack(tiny_model(), record)
    patched.diffusion_model(**dit_inputs(), transformer_options=options_of(patched))
    tokens = TXT_LEN + GRID[0] * GRID[1] + REF_GRID[0] * REF_GRID[1]
    assert calls == [{"shape": (BATCH, 2, tokens, 16), "block_type": kind, "block_index": index, "total_blocks": 2,
                      "img_slice": [TXT_LEN, tokens], "reference_image_num_tokens": [4]}
                     for kind in ("double", "single") for index in range(2)]


def test_output_patch_that_zeroes_attention_equals_a_dit_without_attention_projections() -> None:
    model = tiny_model()
    inputs = dit_inputs()
    patched = apply_pack(model, output_patches=[lambda attn, extra_options: torch.zeros_like(attn)])
    ours = model.diffusion_model(**inputs, transformer_options=options_of(patched))
    # The independent expectation: the same DiT with the weights that read the attention output zeroed.
    reference = tiny_model()
    hidden = reference.diffusion_model.config.hidden_size
    with torch.no_grad():
        for block in reference.diffusion_model.double_blocks:
            block.img_attn.proj.weight.zero_()
            block.txt_attn.proj.weight.zero_()
        for block in reference.diffusion_model.single_blocks:
            block.linear2.weight[:, :hidden] = 0
    torch.testing.assert_close(ours, reference.diffusion_model(**inputs), rtol=1e-6, atol=1e-6)


def test_clone_shares_the_dit_and_copies_the_options() -> None:
    model = tiny_model()
    first = apply_pack(model, unchanged_patch)
    second = apply_pack(first, unchanged_patch, output_patches=[unchanged_output_patch])
    # A pack appending to its clone's list in place, as ComfyUI packs do with model_options.
    third = second.clone()
    third.model_options["sampler_post_cfg_function"] = [*third.model_options.get("sampler_post_cfg_function", []),
                                                        lambda args: args["denoised"]]
    assert model.model_options == {}
    assert first.model_options["transformer_options"]["patches"] == {ATTN1_PATCH: [unchanged_patch]}
    assert second.model_options["transformer_options"]["patches"] == {
        ATTN1_PATCH: [unchanged_patch, unchanged_patch], ATTN1_OUTPUT_PATCH: [unchanged_output_patch]}
    assert "sampler_post_cfg_function" not in second.model_options
    assert third.with_option(REFERENCE_KV_CACHE, True).model_options["sampler_post_cfg_function"]
    assert third.model.diffusion_model is second.model.diffusion_model is model.diffusion_model


def test_diffusion_model_params_use_comfyui_names() -> None:
    dit = tiny_model().model.diffusion_model
    assert dit.params == ComfyFluxParams(
        in_channels=128, out_channels=128, context_in_dim=CONTEXT_DIM, hidden_size=32, mlp_ratio=3.0, num_heads=2,
        depth=2, depth_single_blocks=2, axes_dim=[4, 4, 4, 4], theta=2000, guidance_embed=False)
    assert len(dit.double_blocks) == 2 and len(dit.single_blocks) == 2


def one_step(model: PatchedModel, **options: object) -> torch.Tensor:
    """One Euler step of `model.sample` from seeded noise, 2x3 latent, a 2x2 reference."""
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(BATCH, 128, *GRID, generator=generator)
    context = torch.randn(BATCH, TXT_LEN, CONTEXT_DIM, generator=generator)
    negative = torch.randn(BATCH, TXT_LEN, CONTEXT_DIM, generator=generator)
    reference = torch.randn(1, 128, *REF_GRID, generator=generator)
    return model.sample(noise, torch.tensor([0.8, 0.0]), context, negative_context=negative,
                        reference_latents=[reference], **options)


def test_post_cfg_function_gets_comfyui_arguments_and_its_result_is_used() -> None:
    model = tiny_model()
    seen: list[dict] = []

    def keep_cond(args):
        seen.append(args)
        return args["cond_denoised"]

    patched = model.clone()
    patched.set_model_sampler_post_cfg_function(keep_cond)
    ours = one_step(patched, cfg=4.0)
    # Returning the positive prediction makes CFG a no-op: the same step as cfg 1.
    torch.testing.assert_close(ours, one_step(model, cfg=1.0), rtol=1e-5, atol=1e-5)
    [args] = seen
    assert set(args) == COMFY_POST_CFG_ARGS
    assert args["cond_scale"] == 4.0 and args["model"].diffusion_model is model.diffusion_model
    assert args["sigma"].shape == (BATCH,) and float(args["sigma"][0]) == pytest.approx(0.8)
    cfg_result = args["uncond_denoised"] + 4.0 * (args["cond_denoised"] - args["uncond_denoised"])
    torch.testing.assert_close(args["denoised"], cfg_result)


def test_attention_patches_run_in_sampling_with_the_reference_token_counts() -> None:
    model = tiny_model()
    patched = apply_pack(model, reference_weight_patch(0.0))
    assert not torch.allclose(one_step(patched, cfg=3.0), one_step(model, cfg=3.0))
    # The patch that changes nothing changes no bit of the sampled latent either.
    assert torch.equal(one_step(apply_pack(model, unchanged_patch), cfg=3.0), one_step(model, cfg=3.0))


def test_negative_prompt_without_references_runs_its_own_pass() -> None:
    """ComfyUI runs the negative conditioning with its own references (none here): the step equals
    v = v_neg + cfg (v_pos - v_neg), with v_pos from [image, reference] tokens and v_neg from the image alone."""
    model = tiny_model()
    dit = model.diffusion_model
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(BATCH, 128, *GRID, generator=generator)
    context = torch.randn(BATCH, TXT_LEN, CONTEXT_DIM, generator=generator)
    negative = torch.randn(BATCH, TXT_LEN, CONTEXT_DIM, generator=generator)
    reference = torch.randn(1, 128, *REF_GRID, generator=generator)
    cfg, sigma = 2.5, 0.8
    ours = model.sample(noise, torch.tensor([sigma, 0.0]), context, negative_context=negative, cfg=cfg,
                        reference_latents=[reference], negative_reference_latents=[])

    image_tokens, txt_ids, timestep = GRID[0] * GRID[1], text_position_ids(BATCH, TXT_LEN), torch.tensor([sigma])
    with_reference = torch.cat([pack_latents(noise), pack_latents(reference)], dim=1)
    ids = torch.cat([image_position_ids(*GRID, BATCH), reference_position_ids([REF_GRID], BATCH)], dim=1)
    v_pos = dit(with_reference, ids, context, txt_ids, timestep)[:, :image_tokens]
    v_neg = dit(pack_latents(noise), image_position_ids(*GRID, BATCH), negative, txt_ids, timestep)
    v = unpack_latents(v_neg + cfg * (v_pos - v_neg), *GRID)
    torch.testing.assert_close(ours, noise - sigma * v, rtol=1e-5, atol=1e-5)


def test_attention_patches_with_the_reference_kv_cache_are_refused() -> None:
    patched = apply_pack(tiny_model(), unchanged_patch).with_option(REFERENCE_KV_CACHE, True)
    with pytest.raises(Flux2Error, match="attention patches .* reference K/V cache"):
        one_step(patched)


def test_sample_without_patches_passes_no_transformer_options() -> None:
    """A model with no patch set runs the DiT exactly as before (no extra argument reaches it)."""
    calls: list[dict] = []
    model = tiny_model()
    dit = model.diffusion_model

    def forward(*args, **kwargs):
        calls.append(kwargs)
        return type(dit).forward(dit, *args, **kwargs)

    dit.forward = forward
    generator = torch.Generator().manual_seed(1)
    sample(dit, torch.randn(BATCH, 128, *GRID, generator=generator), torch.tensor([0.5, 0.0]),
           torch.randn(BATCH, TXT_LEN, CONTEXT_DIM, generator=generator))
    assert calls == [{}]
