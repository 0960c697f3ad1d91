"""ComfyUI's model patch conventions on the engine: attention patches and the post-CFG function.

ComfyUI node packs change a model by putting callables into the ModelPatcher's `model_options` dict:

    model_options["transformer_options"]["patches"]["attn1_patch"]         list of p(q, k, v, pe=, attn_mask=,
                                                                            extra_options=) -> dict
    model_options["transformer_options"]["patches"]["attn1_output_patch"]  list of p(attn, extra_options) -> attn
    model_options["sampler_post_cfg_function"]                             list of fn(args) -> denoised

This module holds those names, the copy a clone makes, and the calls, with ComfyUI's arguments, which the DiT
(`Flux2DiT.forward(..., transformer_options=)`) and `sampling.sample(..., post_cfg=)` make. As in ComfyUI's
FLUX blocks (comfy/ldm/flux/layers.py):

- every block runs on `extra_options = transformer_options.copy()`, where the DiT has set `block_type`
  ("double" / "single"), `block_index`, `total_blocks`, `img_slice` = [text tokens, all tokens], and the
  sampler `sigmas` (the timesteps [B]), `sample_sigmas` (the schedule), `cond_or_uncond` (0 per positive pass,
  1 per negative pass) and `reference_image_num_tokens` (one token count per reference image);
- the input patches get q, k, v [B, heads, tokens, head_dim] over [text, image, references] after QK norm and
  before RoPE, with `pe` the rotations and `attn_mask` None; each returns a dict whose "q", "k", "v", "pe",
  "attn_mask" entries replace the current ones. Differences from ComfyUI: q and k arrive in fp32 (the engine
  applies RoPE in fp32 after the patches, so a patch that changes nothing leaves the output bit-identical),
  and `pe` is the engine's rotation tensor [B, tokens, 1, head_dim / 2, 2] of (cos, sin), not ComfyUI's
  rotation matrices: a patch may pass it on or slice it along tokens, not build its own;
- the output patches get the attention output [B, tokens, heads * head_dim] before the output projection.

`attn_mask`, when a patch sets one, follows ComfyUI's attention: boolean (True = may attend) or additive float,
[keys], [queries, keys], [B, queries, keys] or [B, heads | 1, queries, keys].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import attention
from .errors import Flux2Error
from .variants import DiTConfig

TRANSFORMER_OPTIONS = "transformer_options"
PATCHES = "patches"
ATTN1_PATCH = "attn1_patch"
ATTN1_OUTPUT_PATCH = "attn1_output_patch"
POST_CFG_FUNCTIONS = "sampler_post_cfg_function"

PostCfgFunction = Callable[[dict[str, Any]], Tensor]


def clone_model_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The copy `ModelPatcher.clone()` makes: nested dicts and lists are new containers (adding a patch to a
    clone never reaches the original), the callables and tensors in them are shared."""
    def copy(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {key: copy(item) for key, item in value.items()}
        if isinstance(value, list):
            return [copy(item) for item in value]
        return value
    return copy(options)


def add_transformer_patch(options: dict[str, Any], name: str, patch: Callable[..., Any]) -> None:
    """ModelPatcher.set_model_patch: append `patch` to transformer_options["patches"][name] (a new list)."""
    transformer_options = options.setdefault(TRANSFORMER_OPTIONS, {})
    patches = transformer_options.setdefault(PATCHES, {})
    patches[name] = [*patches.get(name, []), patch]


def has_attention_patches(transformer_options: Mapping[str, Any] | None) -> bool:
    if not transformer_options:
        return False
    patches = transformer_options.get(PATCHES) or {}
    return bool(patches.get(ATTN1_PATCH) or patches.get(ATTN1_OUTPUT_PATCH))


def post_cfg_functions(options: Mapping[str, Any]) -> tuple[PostCfgFunction, ...]:
    return tuple(options.get(POST_CFG_FUNCTIONS) or ())


@dataclasses.dataclass(frozen=True)
class ComfyFluxParams:
    """The DiT's sizes under the names of ComfyUI's FluxParams (`diffusion_model.params`), which packs read to
    recognise FLUX.2 (hidden_size, num_heads, context_in_dim ...). FLUX.2 latents come patchified by the VAE,
    so the DiT's own patch size is 1."""
    in_channels: int
    out_channels: int
    context_in_dim: int
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int
    depth_single_blocks: int
    axes_dim: list[int]
    theta: int
    guidance_embed: bool
    patch_size: int = 1
    qkv_bias: bool = False
    global_modulation: bool = True
    mlp_silu_act: bool = True
    default_ref_method: str = "index"

    @classmethod
    def from_config(cls, config: DiTConfig, reference_kv_cache: bool = False) -> ComfyFluxParams:
        # ComfyUI names the KV variant's reference method "index_timestep_zero" (references at timestep 0).
        return cls(in_channels=config.in_channels, out_channels=config.in_channels,
                   context_in_dim=config.context_dim, hidden_size=config.hidden_size, mlp_ratio=config.mlp_ratio,
                   num_heads=config.num_heads, depth=config.depth_double, depth_single_blocks=config.depth_single,
                   axes_dim=list(config.axes_dim), theta=int(config.rope_theta),
                   guidance_embed=config.guidance_embed,
                   default_ref_method="index_timestep_zero" if reference_kv_cache else "index")


def block_options(transformer_options: dict[str, Any], block_type: str, index: int, total: int) -> None:
    """What ComfyUI's FLUX forward sets in transformer_options before each block (in place, as it does)."""
    transformer_options["total_blocks"] = total
    transformer_options["block_type"] = block_type
    transformer_options["block_index"] = index


def patched_attention(q: Tensor, k: Tensor, v: Tensor, rotations: Tensor, txt_len: int,
                      transformer_options: Mapping[str, Any],
                      apply_rope: Callable[[Tensor, Tensor], Tensor], dtype: torch.dtype) -> Tensor:
    """Joint attention with the attn1 patches of `transformer_options` around it.

    q, k: [B, L, heads, head_dim] after QK norm, before RoPE (fp32); v [B, L, heads, head_dim]; rotations for
    the L tokens; txt_len the text tokens in front -> [B, L, heads * head_dim] in `dtype`."""
    patches = transformer_options.get(PATCHES) or {}
    extra_options = dict(transformer_options)
    extra_options["img_slice"] = [txt_len, q.shape[1]]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    pe: Tensor = rotations
    attn_mask: Tensor | None = None
    for patch in patches.get(ATTN1_PATCH, ()):
        out = patch(q, k, v, pe=pe, attn_mask=attn_mask, extra_options=extra_options)
        q, k, v = out.get("q", q), out.get("k", k), out.get("v", v)
        pe, attn_mask = out.get("pe", pe), out.get("attn_mask", attn_mask)
    q = _rotate_heads(q, pe, apply_rope).to(dtype)
    k = _rotate_heads(k, pe, apply_rope).to(dtype)
    attn = _attention(q, k, v.to(dtype), attn_mask)
    for patch in patches.get(ATTN1_OUTPUT_PATCH, ()):
        attn = patch(attn, extra_options)
    return attn


def _rotate_heads(x: Tensor, rotations: Tensor, apply_rope: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """[B, heads, L, head_dim] -> the same with RoPE applied (in the engine's [B, L, heads, head_dim] layout)."""
    if rotations.shape[1] != x.shape[2]:
        raise Flux2Error(f"attn1_patch: pe covers {rotations.shape[1]} tokens but k/q have {x.shape[2]}; a patch "
                         "that adds or removes tokens must return a pe sliced to match")
    return apply_rope(x.transpose(1, 2), rotations).transpose(1, 2)


def _attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """q, k, v [B, heads, L, D] -> [B, L, heads * D]; the engine's attention unless a patch set a mask."""
    if mask is None:
        return attention(q, k, v)
    # ComfyUI's attention reads a 2-D mask as [queries, keys] and a 3-D one as [B, queries, keys].
    if mask.ndim == 1:
        mask = mask[None, None, None, :]
    elif mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[:, None]
    if mask.is_floating_point():
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)


def run_post_cfg(functions: Sequence[PostCfgFunction], extras: Mapping[str, Any], *, denoised: Tensor,
                 cond_denoised: Tensor, uncond_denoised: Tensor, cond_scale: float, sigma: Tensor,
                 latent: Tensor) -> Tensor:
    """ComfyUI's samplers.cfg_function tail: each function gets the CFG result (x0 prediction) and returns the
    new one. `extras`: the entries the engine cannot know ("model", "model_options", "cond", "uncond")."""
    for function in functions:
        denoised = function({**extras, "denoised": denoised, "cond_denoised": cond_denoised,
                             "uncond_denoised": uncond_denoised, "cond_scale": cond_scale, "sigma": sigma,
                             "input": latent})
    return denoised


@dataclasses.dataclass(frozen=True)
class SamplingPatches:
    """What `sampling.sample` needs of a model's ComfyUI patches.

    transformer_options: model_options["transformer_options"] (attention patches and whatever packs put there);
    post_cfg: model_options["sampler_post_cfg_function"]; post_cfg_extras: the post-CFG arguments only the
    caller knows ("model", "model_options", "cond", "uncond")."""
    transformer_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    post_cfg: tuple[PostCfgFunction, ...] = ()
    post_cfg_extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def step_options(self, base: Mapping[str, Any], timesteps: Tensor, cond_or_uncond: list[int]) -> dict | None:
        """transformer_options for one model evaluation (None without attention patches: the unpatched DiT).
        `base`: the per-call entries (sample_sigmas, reference_image_num_tokens)."""
        if not has_attention_patches(self.transformer_options):
            return None
        return {**self.transformer_options, **base, "sigmas": timesteps, "cond_or_uncond": cond_or_uncond}
