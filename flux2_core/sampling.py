"""Sampling: the FLUX.2 schedule, seeded noise, latent packing and the model evaluation the samplers step with.

Rectified flow: x_t = (1 - sigma) * x0 + sigma * noise; the DiT predicts v = noise - x0 and Euler steps
x <- x + (sigma_next - sigma) * v. The state is kept in float32 whatever the model's compute dtype. The update
rule is pluggable: `sample(..., sampler=name)` runs one of flux2_core.samplers' ComfyUI samplers (euler by
default) over the one model evaluation defined here (CFG, guidance, references, KV cache, interrupt).

Latents live as [B, 128, h, w] (h, w = pixels / 16), as in ComfyUI; the DiT sees them as tokens
[B, h*w, 128] in row-major order, followed by the reference tokens, which are sliced off its output.
With the reference K/V cache (klein 9B KV, FluxKVCache) the references instead run once, before the first
step, and every step attends to their cached keys and values.

img2img (`denoise` < 1) follows diffusers: the schedule is computed for all `steps`, the first
int(steps - steps * denoise) steps are skipped, and the start latent is mixed with the first remaining sigma.

Inpainting (`mask`) follows ComfyUI's KSampler with a LATENT noise_mask: the mask (1 = regenerate, 0 = keep) is
resized bilinearly to the latent grid; before every model evaluation the kept region of the model's input is
replaced by the source latent noised to the current sigma with the starting noise, sigma * noise +
(1 - sigma) * source, and the kept region of the model's clean-image prediction is replaced by the source. The
sampler steps with that prediction, so the last step (to sigma 0) lands on the source wherever the mask is 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch

from .errors import Flux2Error, Interrupted
from .model_patches import SamplingPatches, run_post_cfg
from .progress import check_interrupt, report_progress
from .references import PIXELS_PER_LATENT_CELL, image_position_ids, reference_position_ids, text_position_ids
from .samplers import Denoiser, Prediction, check_sampler_name, prediction_from_x0, run_sampler
from .variants import VARIANTS

LATENT_CHANNELS = 128

# Fitted by Black Forest Labs: mu as a linear function of the token count at 10 and at 200 steps.
_MU_SLOPE_10_STEPS, _MU_OFFSET_10_STEPS = 8.73809524e-05, 1.89833333
_MU_SLOPE_200_STEPS, _MU_OFFSET_200_STEPS = 0.00016927, 0.45666666
_MU_LARGE_IMAGE_TOKENS = 4300

# callback(step, total, x0_prediction [B, 128, h, w]) after each finished step (step counts from 1).
StepCallback = Callable[[int, int, torch.Tensor], None]


def empirical_mu(image_seq_len: int, steps: int) -> float:
    """The schedule shift for `image_seq_len` generated tokens and `steps` steps."""
    mu_200 = _MU_SLOPE_200_STEPS * image_seq_len + _MU_OFFSET_200_STEPS
    if image_seq_len > _MU_LARGE_IMAGE_TOKENS:
        return float(mu_200)
    mu_10 = _MU_SLOPE_10_STEPS * image_seq_len + _MU_OFFSET_10_STEPS
    slope = (mu_200 - mu_10) / 190.0
    return float(slope * steps + mu_200 - 200.0 * slope)


def check_image_size(width: int, height: int) -> None:
    """Both sides must be positive multiples of 16 px; the error names every side that is not."""
    wrong = {name: value for name, value in (("width", width), ("height", height))
             if value < PIXELS_PER_LATENT_CELL or value % PIXELS_PER_LATENT_CELL}
    if len(wrong) == 1:
        [(name, value)] = wrong.items()
        raise Flux2Error(f"{name}: expected a positive multiple of {PIXELS_PER_LATENT_CELL} px, found {value}")
    if wrong:
        raise Flux2Error(f"width and height: expected positive multiples of {PIXELS_PER_LATENT_CELL} px, "
                         f"found width {width} and height {height}")


def flux2_sigmas(steps: int, width: int, height: int) -> torch.Tensor:
    """float32 [steps + 1] from 1 down to 0, shifted for the image size (the official `get_schedule`)."""
    check_image_size(width, height)
    return flux2_sigmas_for_tokens(steps, (width // PIXELS_PER_LATENT_CELL) * (height // PIXELS_PER_LATENT_CELL))


def flux2_sigmas_for_tokens(steps: int, image_seq_len: int) -> torch.Tensor:
    """The schedule for `image_seq_len` generated tokens (ComfyUI's Flux2Scheduler counts them as
    round(width * height / 256), which also covers sizes that are not multiples of 16)."""
    if steps < 1:
        raise Flux2Error(f"steps: expected an integer >= 1, found {steps}")
    shift = math.exp(empirical_mu(image_seq_len, steps))
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    # t = 0 gives 1/t = inf and sigma = 0, which is the wanted end point.
    sigmas = shift / (shift + (1.0 / t - 1.0))
    return sigmas.to(torch.float32)


def sigmas_for_denoise(sigmas: torch.Tensor, denoise: float) -> torch.Tensor:
    """Drop the leading steps an img2img pass with strength `denoise` skips (diffusers' rule)."""
    if not 0.0 < denoise <= 1.0:
        raise Flux2Error(f"denoise: expected a value in (0, 1], found {denoise}")
    steps = len(sigmas) - 1
    # Any denoise > 0 keeps at least one step: int() floors steps * (1 - denoise) below steps.
    first = int(max(steps - min(steps * denoise, steps), 0))
    return sigmas[first:]


def make_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """float32 noise drawn on the CPU like ComfyUI, so a seed gives the same image on every device."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def latent_shape(batch: int, width: int, height: int) -> tuple[int, int, int, int]:
    check_image_size(width, height)
    return (batch, LATENT_CHANNELS, height // PIXELS_PER_LATENT_CELL, width // PIXELS_PER_LATENT_CELL)


def pack_latents(latent: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> tokens [B, h*w, C], row-major."""
    return latent.flatten(2).transpose(1, 2)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """tokens [B, h*w, C] -> [B, C, h, w] (height, width in latent cells)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the model runs and the dtype it computes in (Flux2DiT.compute_dtype; not the fp8 storage dtype)."""
    first = next(model.parameters())
    return first.device, getattr(model, "compute_dtype", first.dtype)


def _to_batch(x: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    if x.shape[0] == batch:
        return x
    if x.shape[0] == 1:
        return x.expand(batch, *x.shape[1:])
    raise Flux2Error(f"{what}: expected batch 1 or {batch}, found {x.shape[0]}")


def _reference_tokens(reference_latents: Sequence[torch.Tensor], batch: int, device: torch.device,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """All references as one token run [batch, R, 128] and their position ids [batch, R, 4]."""
    refs = [pack_latents(_to_batch(r, batch, f"reference_latents[{i}]")) for i, r in enumerate(reference_latents)]
    grids = [tuple(r.shape[-2:]) for r in reference_latents]
    return (torch.cat(refs, dim=1).to(device=device, dtype=dtype),
            reference_position_ids(grids, batch, device=device))


def same_tensors(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    if len(a) != len(b):
        return False
    return all(x is y or (x.shape == y.shape and torch.equal(x, y.to(x.device))) for x, y in zip(a, b))


def _is_kv_variant(model: torch.nn.Module) -> bool:
    variant = VARIANTS.get(getattr(model, "variant", None))
    return variant is not None and variant.reference_kv_cache


@dataclasses.dataclass(frozen=True)
class PromptEntry:
    """One entry of a conditioning with several (ComfyUI's ConditioningCombine, ConditioningSetTimestepRange).

    At every model evaluation each active entry gets its own pass; the clean-image predictions of the active entries
    are averaged, weighted by `strength` (0 when none is active), as ComfyUI does. An entry is active while
    sigma_end <= sigma <= sigma_start."""
    context: torch.Tensor  # [B or 1, T, C]
    strength: float = 1.0
    sigma_start: float = 1.0
    sigma_end: float = 0.0

    def active(self, sigma: float) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start


def _plain_context(prompt: torch.Tensor | Sequence[PromptEntry] | None) -> torch.Tensor | None:
    """The one context of `prompt` when it needs no per-entry passes (a tensor, or one full-range entry of strength
    > 0); None otherwise."""
    if prompt is None or isinstance(prompt, torch.Tensor):
        return prompt
    if len(prompt) == 1 and prompt[0].strength > 0 and prompt[0].sigma_start >= 1.0 and prompt[0].sigma_end <= 0.0:
        return prompt[0].context
    return None


def _as_entries(prompt: torch.Tensor | Sequence[PromptEntry]) -> list[PromptEntry]:
    return [PromptEntry(prompt)] if isinstance(prompt, torch.Tensor) else list(prompt)


def latent_mask(mask: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A mask ([H, W], [B, H, W] or [B, 1, H, W], any resolution, 1 = regenerate) as [B, C, h, w] for a latent of
    `shape`: bilinear resize to the latent grid, repeated over channels and batch (ComfyUI's reshape_mask)."""
    if mask.ndim not in (2, 3, 4) or (mask.ndim == 4 and mask.shape[1] != 1):
        raise Flux2Error(f"mask: expected [H, W], [B, H, W] or [B, 1, H, W], found {list(mask.shape)}")
    batch, channels, height, width = shape
    resized = torch.nn.functional.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]).float(), size=(height, width),
                                              mode="bilinear")
    repeats = -(-batch // resized.shape[0])  # ceil: a shorter mask batch is repeated, a longer one cut
    return resized.repeat(repeats, channels, 1, 1)[:batch]


@dataclasses.dataclass(frozen=True)
class DifferentialMask:
    """Differential diffusion (ComfyUI's DifferentialDiffusion node): a soft mask regenerates more of the image
    the longer it is on. At sigma the mask in effect is 1 where mask >= (sigma - sigma_to) / (sigma_from - sigma_to)
    (sigma_from the first sigma of the run, sigma_to the last one but at least `sigma_min`), else 0; a `strength`
    below 1 blends that binary mask with the soft one."""
    strength: float = 1.0
    sigma_min: float = 0.0

    def at(self, mask: torch.Tensor, sigma: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        sigma_to = max(float(sigmas[-1]), self.sigma_min)
        threshold = (float(sigma) - sigma_to) / (float(sigmas[0]) - sigma_to)
        binary = (mask >= threshold).to(mask.dtype)
        if 0 < self.strength < 1:
            return self.strength * binary + (1 - self.strength) * mask
        return binary


def _keep_unmasked(denoise: Denoiser, mask: torch.Tensor, source: torch.Tensor, noise: torch.Tensor,
                   sigmas: torch.Tensor, differential: DifferentialMask | None = None) -> Denoiser:
    """`denoise` for inpainting: where `mask` is 0 the model sees `source` noised to sigma with `noise`, and its
    clean-image prediction there is `source` itself (see the module docstring)."""

    def masked(latent: torch.Tensor, sigma: torch.Tensor) -> Prediction:
        mask_now = mask if differential is None else differential.at(mask, sigma, sigmas)
        keep = 1.0 - mask_now
        model_input = latent * mask_now + (sigma * noise + (1.0 - sigma) * source) * keep
        x0 = denoise(model_input, sigma).x0 * mask_now + source * keep
        return prediction_from_x0(latent, sigma, x0)

    return masked


def _check_cancel(cancel: Callable[[], bool] | None) -> None:
    check_interrupt()
    if cancel is not None and cancel():
        raise Interrupted("sampling cancelled by the caller")


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    context: torch.Tensor | Sequence[PromptEntry],
    *,
    negative_context: torch.Tensor | Sequence[PromptEntry] | None = None,
    cfg: float = 1.0,
    guidance: float | None = None,
    latent_image: torch.Tensor | None = None,
    reference_latents: Sequence[torch.Tensor] = (),
    reference_kv_cache: bool | None = None,
    callback: StepCallback | None = None,
    cancel: Callable[[], bool] | None = None,
    sampler: str = "euler",
    seed: int = 0,
    mask: torch.Tensor | None = None,
    differential: DifferentialMask | None = None,
    patches: SamplingPatches | None = None,
    negative_reference_latents: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Denoise `noise` [B, 128, h, w] along `sigmas` [n + 1]; returns the float32 latent [B, 128, h, w].

    context / negative_context: text embeddings [B or 1, T, C]. cfg != 1 runs real CFG, v = v_u + cfg * (v_c - v_u),
    with both halves in one batched forward; `negative_context` is then required and otherwise unused. `guidance` feeds
    the DiT's guidance embedding (dev). `latent_image` [B or 1, 128, h, w]: the clean start for img2img,
    mixed as (1 - sigmas[0]) * latent_image + sigmas[0] * noise. `reference_latents`: each [1 or B, 128, h', w'],
    appended after the image tokens with their own position ids; their outputs are dropped.
    `reference_kv_cache`: instead run the references once, as clean images (timestep 0) attending only to each
    other, and let every step attend to their cached keys/values (`Flux2DiT.cache_reference_kv`); None means on
    for DiTs loaded as a KV variant (`model.variant`, e.g. klein-9b-kv). The cache lives for this call only.
    `sampler`: the update rule, one of `flux2_core.samplers.SAMPLER_NAMES` (ComfyUI's names; "euler" is the
    FLUX.2 reference). `seed` seeds the ancestral samplers' fresh noise the way ComfyUI does (pass the noise
    seed); the deterministic samplers ignore it. `callback` / progress fire once per step, whatever the number
    of model evaluations a step takes; `cancel` is checked before every evaluation.
    `context` / `negative_context` may also be lists of `PromptEntry` (several conditioning entries, strengths,
    timestep ranges): then each active entry gets its own batched pass and the x0 predictions are averaged per
    prompt before CFG, as ComfyUI does (not with the reference K/V cache).
    `mask`: inpainting, 1 = regenerate, 0 = keep `latent_image` (zeros when None); [H, W], [B, H, W] or
    [B, 1, H, W] at any resolution (pixels or latent cells), resized to the latent grid as ComfyUI does.
    `differential`: with a mask, differential diffusion (`DifferentialMask`).
    `negative_reference_latents`: the negative prompt's own references (None: the positive's); where they differ,
    the CFG passes run one after the other, each with its prompt's references, as ComfyUI does.
    `patches`: ComfyUI model patches (model_patches.SamplingPatches): attention patches run in the DiT, post-CFG
    functions rewrite the x0 prediction after CFG at every evaluation, as in ComfyUI's cfg_function.
    """
    check_sampler_name(sampler)
    device, dtype = _model_device_dtype(model)
    batch, _, height, width = noise.shape
    sigmas = sigmas.to(device=device, dtype=torch.float32)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise Flux2Error(f"sigmas: expected a 1-D tensor with at least 2 values, found shape {tuple(sigmas.shape)}")

    x = initial_noise = noise.to(device=device, dtype=torch.float32)
    if latent_image is not None:
        start = _to_batch(latent_image, batch, "latent_image").to(device=device, dtype=torch.float32)
        x = (1.0 - sigmas[0]) * start + sigmas[0] * x
    image_tokens = height * width

    use_cfg = cfg != 1.0
    positive_entries = negative_entries = None
    if _plain_context(context) is None or (use_cfg and negative_context is not None
                                           and _plain_context(negative_context) is None):
        positive_entries = _as_entries(context)
        negative_entries = _as_entries(negative_context) if use_cfg and negative_context is not None else []
        context = positive_entries[0].context
        negative_context = negative_entries[0].context if negative_entries else negative_context
    else:
        context, negative_context = _plain_context(context), _plain_context(negative_context)
    if use_cfg and negative_context is None:
        raise Flux2Error(f"negative_context: cfg {cfg} needs the negative prompt's embeddings, found None "
                         "(cfg 1.0 runs a single pass without them)")
    contexts = [_to_batch(context, batch, "context")]
    if use_cfg:
        contexts.append(_to_batch(negative_context, batch, "negative_context"))
    txt = torch.cat(contexts).to(device=device, dtype=dtype)
    passes = len(contexts)
    image_ids = image_position_ids(height, width, batch, device=device)

    guidance_vec = None
    if guidance is not None:
        guidance_vec = torch.full((batch * passes,), float(guidance), device=device, dtype=torch.float32)

    if reference_kv_cache is None:
        reference_kv_cache = _is_kv_variant(model)
    # ComfyUI runs the negative pass with the negative conditioning's own references: where they differ from the
    # positive's, the two CFG passes cannot share one batch (their token counts may differ) and run one by one.
    split_references = (use_cfg and negative_reference_latents is not None
                        and not same_tensors(reference_latents, negative_reference_latents))
    if split_references and reference_kv_cache and (reference_latents or negative_reference_latents):
        raise Flux2Error("negative_reference_latents: CFG with different positive and negative references cannot "
                         "run with the reference K/V cache")
    reference_kv = None
    if reference_latents and reference_kv_cache:
        # One cache serves every sample and both CFG passes unless the references differ per sample.
        ref_batch = 1 if all(r.shape[0] == 1 for r in reference_latents) else batch
        reference_kv = model.cache_reference_kv(*_reference_tokens(reference_latents, ref_batch, device, dtype),
                                                guidance=None if guidance_vec is None else guidance_vec[:ref_batch])
    if positive_entries is not None and reference_kv is not None:
        raise Flux2Error("context: several conditioning entries cannot run with the reference K/V cache")

    # Each prompt's references (index 0 positive, 1 negative), their inline tokens [batch, R, 128] with ids, and
    # their token counts (what ComfyUI's patches read as reference_image_num_tokens).
    prompt_references = [reference_latents, negative_reference_latents if split_references else reference_latents]
    inline_refs: list[tuple[torch.Tensor, torch.Tensor] | None] = [None, None]
    ref_token_counts: list[list[int] | None] = [None, None]
    if reference_kv is None:
        for prompt in range(1 + split_references):
            if prompt_references[prompt]:
                inline_refs[prompt] = _reference_tokens(prompt_references[prompt], batch, device, dtype)
                ref_token_counts[prompt] = [r.shape[-2] * r.shape[-1] for r in prompt_references[prompt]]
        if not split_references:
            inline_refs[1], ref_token_counts[1] = inline_refs[0], ref_token_counts[0]

    def prompt_ids(prompt: int, count: int) -> torch.Tensor:
        """Position ids of `count` batches of prompt `prompt`'s image and reference tokens."""
        refs = inline_refs[prompt]
        ids = image_ids if refs is None else torch.cat([image_ids, refs[1]], dim=1)
        return ids.repeat(count, 1, 1)

    # The batched model inputs of one evaluation: one group holds every pass unless the references are split.
    groups = [range(passes)] if not split_references else [range(0, 1), range(1, 2)]
    ids_per_group = [prompt_ids(group[0], len(group)) for group in groups]
    txt_ids = text_position_ids(batch, txt.shape[1], device=device)

    total = len(sigmas) - 1
    patches = patches or SamplingPatches()

    def run_model(img: torch.Tensor, ids: torch.Tensor, txt_all: torch.Tensor, txt_ids_all: torch.Tensor,
                  timesteps: torch.Tensor, guidance_all: torch.Tensor | None,
                  cond_or_uncond: list[int]) -> torch.Tensor:
        """The DiT on one batch whose rows are prompts `cond_or_uncond` (0 positive, 1 negative)."""
        call_options: dict = {"sample_sigmas": sigmas}
        if ref_token_counts[cond_or_uncond[0]] is not None:
            call_options["reference_image_num_tokens"] = ref_token_counts[cond_or_uncond[0]]
        options = patches.step_options(call_options, timesteps, cond_or_uncond)
        # Only the arguments in use, so that any DiT-like module fits the unpatched calls.
        extra = {} if reference_kv is None else {"reference_kv": reference_kv}
        if options is not None:
            extra["transformer_options"] = options
        return model(img, ids, txt_all, txt_ids_all, timesteps, guidance_all, **extra)

    def post_cfg(latent: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor, x0_cond: torch.Tensor,
                 x0_uncond: torch.Tensor | None) -> Prediction:
        if x0_uncond is None:  # without CFG ComfyUI's uncond prediction is its empty accumulator: zeros
            x0_uncond = torch.zeros_like(x0)
        x0 = run_post_cfg(patches.post_cfg, patches.post_cfg_extras, denoised=x0, cond_denoised=x0_cond,
                          uncond_denoised=x0_uncond, cond_scale=cfg, sigma=sigma.expand(batch), latent=latent)
        return prediction_from_x0(latent, sigma, x0)

    def entry_passes(latent: torch.Tensor, sigma: torch.Tensor, entries: list[PromptEntry],
                     cond_or_uncond: int) -> torch.Tensor:
        """The strength-weighted mean x0 of the entries active at `sigma` (zeros when none is), one batched pass."""
        active = [entry for entry in entries if entry.active(float(sigma))]
        if not active:
            return torch.zeros_like(latent)
        count = len(active)
        txt_all = torch.cat([_to_batch(e.context, batch, "context") for e in active]).to(device=device, dtype=dtype)
        img = pack_latents(latent).to(dtype).repeat(count, 1, 1)
        refs = inline_refs[cond_or_uncond]
        if refs is not None:
            img = torch.cat([img, refs[0].repeat(count, 1, 1)], dim=1)
        ids = prompt_ids(cond_or_uncond, count)
        entry_guidance = None if guidance_vec is None else guidance_vec[:1].expand(batch * count)
        out = run_model(img, ids, txt_all, text_position_ids(batch * count, txt_all.shape[1], device=device),
                        sigma.expand(batch * count), entry_guidance, [cond_or_uncond] * count)
        v = unpack_latents(out[:, :image_tokens].float(), height, width).chunk(count)
        weights = [entry.strength for entry in active]
        x0 = sum(w * (latent - sigma * v_i) for w, v_i in zip(weights, v))
        return x0 / (sum(weights) + 1e-37)

    def denoise_entries(latent: torch.Tensor, sigma: torch.Tensor) -> Prediction:
        """One evaluation with per-entry passes; CFG on the averaged x0 predictions."""
        _check_cancel(cancel)
        x0_positive = x0 = entry_passes(latent, sigma, positive_entries, 0)
        x0_negative = None
        if use_cfg:
            x0_negative = entry_passes(latent, sigma, negative_entries, 1)
            x0 = x0_negative + cfg * (x0 - x0_negative)
        if patches.post_cfg:
            return post_cfg(latent, sigma, x0, x0_positive, x0_negative)
        return prediction_from_x0(latent, sigma, x0)

    def denoise(latent: torch.Tensor, sigma: torch.Tensor) -> Prediction:
        """One model evaluation at noise level `sigma` for the float32 latent [B, 128, h, w]."""
        _check_cancel(cancel)
        tokens = pack_latents(latent).to(dtype)
        outputs = []
        for group, ids in zip(groups, ids_per_group):
            img = tokens.repeat(len(group), 1, 1)
            refs = inline_refs[group[0]]
            if refs is not None:
                img = torch.cat([img, refs[0].repeat(len(group), 1, 1)], dim=1)
            rows = slice(group[0] * batch, (group[-1] + 1) * batch)
            group_guidance = None if guidance_vec is None else guidance_vec[rows]
            out = run_model(img, ids, txt[rows], txt_ids.repeat(len(group), 1, 1), sigma.expand(img.shape[0]),
                            group_guidance, list(group))
            outputs.append(out[:, :image_tokens])
        v = (outputs[0] if len(outputs) == 1 else torch.cat(outputs)).float()
        if patches.post_cfg:
            x0_parts = [latent - sigma * unpack_latents(part, height, width) for part in v.chunk(passes)]
            if not use_cfg:
                return post_cfg(latent, sigma, x0_parts[0], x0_parts[0], None)
            x0_positive, x0_negative = x0_parts
            return post_cfg(latent, sigma, x0_negative + cfg * (x0_positive - x0_negative), x0_positive, x0_negative)
        if use_cfg:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + cfg * (v_cond - v_uncond)
        v = unpack_latents(v, height, width)
        # x0 = x_t - sigma * v: the model's current guess of the clean image (ComfyUI's `denoised`).
        return Prediction(latent - sigma * v, v)

    def on_step(step: int, x0: torch.Tensor) -> None:
        if callback is not None:
            callback(step + 1, total, x0)
        report_progress(step + 1, total, x0)

    if positive_entries is not None:
        denoise = denoise_entries
    if mask is not None:
        source = start if latent_image is not None else torch.zeros_like(x)
        denoise = _keep_unmasked(denoise, latent_mask(mask, x.shape).to(device), source, initial_noise, sigmas,
                                 differential)
    return run_sampler(sampler, denoise, x, sigmas, seed=seed, on_step=on_step)
