"""What a MODEL socket carries: a loaded DiT plus the per-graph changes nodes ask for.

Like ComfyUI's ModelPatcher, but minimal. Loading a DiT is expensive and the executor caches the loader's
output, so nodes never mutate the shared `Flux2DiT`: a node that wants a change (a LoRA, the reference KV
cache) returns a new `PatchedModel` that records it, and the change is applied only for the duration of a
sampling call (`patches_applied`).

ComfyUI node packs patch a model through ModelPatcher's API, which this class also offers: `clone()`, the
mutable `model_options` dict (its "transformer_options" and "sampler_post_cfg_function"), the setters
`set_model_attn1_patch`, `set_model_attn1_output_patch`, `set_model_sampler_post_cfg_function`, and
`model.diffusion_model` (the DiT, with ComfyUI's `params`). The calls follow ComfyUI's (model_patches).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch

from .checkpoints.loaders import load_dit
from .dit import Flux2DiT
from .errors import Flux2Error
from .lora.apply import attach_loras, check_lora_fits
from .lora.dialects import Flux2LoRA, load_lora
from .memory import residency
from .memory.estimate import step_working_bytes
from .model_patches import (ATTN1_OUTPUT_PATCH, ATTN1_PATCH, POST_CFG_FUNCTIONS, TRANSFORMER_OPTIONS, PostCfgFunction,
                            SamplingPatches, add_transformer_patch, clone_model_options, post_cfg_functions)
from .sampling import sample
from .variants import VARIANTS, VariantDefaults

# Option: run the reference tokens once and reuse their keys/values at every step (FluxKVCache); the KV variant
# (klein-9b-kv) does this without the option.
REFERENCE_KV_CACHE = "reference_kv_cache"
# Option: regional torch.compile of the DiT's blocks while sampling (the "FLUX.2 Compile Model" node).
COMPILE_BLOCKS = "compile_blocks"


@dataclasses.dataclass(frozen=True)
class DiffusionModelHolder:
    """What ComfyUI's ModelPatcher.model (a BaseModel) is to packs: the holder of `diffusion_model`."""
    diffusion_model: Flux2DiT


@dataclasses.dataclass(frozen=True, eq=False)
class PatchedModel:
    diffusion_model: Flux2DiT
    variant: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # (lora, strength) in the order the LoRA loaders were chained.
    lora_patches: tuple[tuple[Flux2LoRA, float], ...] = ()
    # ComfyUI's ModelPatcher.model_options, which packs change in place on their clone.
    model_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise Flux2Error(f"PatchedModel: variant must be one of {sorted(VARIANTS)}, found {self.variant!r}")
        # Read-only so that a clone can never be changed behind the back of the node that made it.
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        # Every copy (clone, with_option, with_lora) gets its own containers, as ModelPatcher.clone() does.
        object.__setattr__(self, "model_options", clone_model_options(self.model_options))

    @classmethod
    def load(cls, path: str | os.PathLike, weight_dtype: str = "default") -> PatchedModel:
        """A DiT file or folder loaded as a MODEL of the variant `load_dit` recognises (what the loader nodes do),
        registered with the process's memory manager (clones and LoRA-patched copies share this one DiT)."""
        dit = residency.load_managed(load_dit, path, name=f"DiT {os.path.basename(path)}", weight_dtype=weight_dtype)
        return cls(dit, dit.variant)

    @property
    def defaults(self) -> VariantDefaults:
        """The variant's sampling defaults (steps, guidance, cfg)."""
        return VARIANTS[self.variant]

    @property
    def uses_reference_kv_cache(self) -> bool:
        return bool(self.options.get(REFERENCE_KV_CACHE)) or self.defaults.reference_kv_cache

    def clone(self) -> PatchedModel:
        """A copy sharing the DiT, with its own options (ModelPatcher.clone)."""
        return dataclasses.replace(self)

    @property
    def model(self) -> DiffusionModelHolder:
        return DiffusionModelHolder(self.diffusion_model)

    def set_model_attn1_patch(self, patch: Any) -> None:
        """ModelPatcher.set_model_attn1_patch: patch(q, k, v, pe=, attn_mask=, extra_options=) -> dict, run on
        q, k, v before every block's attention (model_patches)."""
        add_transformer_patch(self.model_options, ATTN1_PATCH, patch)

    def set_model_attn1_output_patch(self, patch: Any) -> None:
        """ModelPatcher.set_model_attn1_output_patch: patch(attn, extra_options) -> attn after every attention."""
        add_transformer_patch(self.model_options, ATTN1_OUTPUT_PATCH, patch)

    def set_model_sampler_post_cfg_function(self, function: PostCfgFunction,
                                            disable_cfg1_optimization: bool = False) -> None:
        """ModelPatcher.set_model_sampler_post_cfg_function: function(args) -> denoised after CFG. The engine
        runs no skipped negative pass at cfg 1 either way, so the second argument changes nothing."""
        self.model_options[POST_CFG_FUNCTIONS] = [*post_cfg_functions(self.model_options), function]

    def with_option(self, key: str, value: Any) -> PatchedModel:
        return dataclasses.replace(self, options={**self.options, key: value})

    def with_lora(self, lora: Flux2LoRA | str | os.PathLike, strength: float) -> PatchedModel:
        """This model with `lora` (a `Flux2LoRA`, or a LoRA file, read here once rather than at every sampling
        call) added at `strength`. A LoRA that does not fit the DiT is refused here, so the error belongs to
        the LoRA loader node rather than to the sampler that would apply it."""
        if not isinstance(lora, Flux2LoRA):
            lora = load_lora(lora)
        check_lora_fits(self.diffusion_model, lora)
        return dataclasses.replace(self, lora_patches=(*self.lora_patches, (lora, float(strength))))

    @contextlib.contextmanager
    def patches_applied(self) -> Iterator[Flux2DiT]:
        """The DiT with this model's LoRA patches in effect, restored on exit.

        LoRAs run on the fly (forward hooks): the shared DiT's weights are never written, so other graphs
        holding it, fp8 weights and offloaded weights are unaffected, and an error mid-sampling leaves
        nothing to undo.
        """
        with contextlib.ExitStack() as stack:
            if self.options.get(COMPILE_BLOCKS):
                stack.enter_context(self.diffusion_model.blocks_compiled())
            if self.lora_patches:
                stack.enter_context(attach_loras(self.diffusion_model, self.lora_patches))
            yield self.diffusion_model

    def sample(self, noise: torch.Tensor, sigmas: torch.Tensor, context: torch.Tensor, *,
               guidance: float | None = None, negative_reference_latents: Sequence[torch.Tensor] | None = None,
               **sample_args: Any) -> torch.Tensor:
        """`flux2_core.sampling.sample` on this model, with its patches and options in effect.

        `sample_args`: the other keyword arguments of `sample` (negative_context, cfg, latent_image,
        reference_latents, callback, cancel, sampler, seed); `reference_kv_cache` comes from `uses_reference_kv_cache`.
        `guidance` is dropped for DiTs without a guidance embedding (klein), so callers can pass whatever
        their conditioning carries; a DiT that has one (dev) gets the variant default when it is None.
        `negative_reference_latents`: the negative prompt's own references (None: the positive's); different ones
        make the CFG passes run one after the other, each with its prompt's references, as in ComfyUI.
        """
        reference_latents = sample_args.get("reference_latents", ())
        if self.diffusion_model.config.guidance_embed:
            guidance = self.defaults.guidance if guidance is None else guidance
        else:
            guidance = None
        cfg = sample_args.get("cfg", 1.0) if sample_args.get("negative_context") is not None else 1.0
        working = step_working_bytes(self.diffusion_model, noise.shape, cfg, reference_latents,
                                     self.uses_reference_kv_cache)
        with residency.use(self.diffusion_model, working), self.patches_applied() as model:
            return sample(model, noise, sigmas, context, guidance=guidance,
                          reference_kv_cache=self.uses_reference_kv_cache, patches=self.sampling_patches(),
                          negative_reference_latents=negative_reference_latents, **sample_args)

    def sampling_patches(self) -> SamplingPatches | None:
        """The ComfyUI patches in `model_options` for `sample` (None when there are none)."""
        transformer_options = self.model_options.get(TRANSFORMER_OPTIONS) or {}
        functions = post_cfg_functions(self.model_options)
        if not transformer_options and not functions:
            return None
        # ComfyUI's cond / uncond are its conditioning lists, which the engine does not build.
        extras = {"model": self.model, "model_options": self.model_options, "cond": None, "uncond": None}
        return SamplingPatches(transformer_options, functions, extras)


