"""The Python API: text (plus optional reference images or a start image) to images.

    pipe = Flux2Pipeline.from_files(dit="models/diffusion_models/flux-2-klein-4b.safetensors",
                                    vae="models/vae/flux2-vae.safetensors",
                                    text_encoder="models/text_encoders/qwen_3_4b.safetensors")
    image = pipe("a red fox in the snow", width=1024, height=1024, seed=7)[0]

Steps, guidance and CFG default to the variant's values (`variants.VARIANTS`): distilled klein 4 steps
without CFG, klein base 50 steps with CFG 4, dev 50 steps with embedded guidance 4; klein 9B KV runs its
reference images once and reuses their cached keys/values at every step. Noise is drawn like
ComfyUI's (`sampling.make_noise`), so a seed gives the same latent as there.

The text encoder is the largest model next to the DiT and is needed once per call: when given as a path it is
loaded on first use. Where each model lives is the process's memory manager's business
(`flux2_core.memory.residency`): models stay on the GPU while they fit, and the least recently used one makes
room when another is needed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence, Union

import torch
from PIL import Image

from .checkpoints.detect import inspect_checkpoint
from .checkpoints.loaders import load_dit, load_text_encoder, load_vae
from .comfy_layouts import decode_latent, image_to_pils
from .dit import Flux2DiT
from .errors import Flux2Error, IncompatibleModelsError
from .lora import Flux2LoRA, attach_loras, prepare_loras
from .lora import load_lora as read_lora_file
from .memory import residency
from .memory.estimate import step_working_bytes
from .references import pil_to_tensor, preprocess_reference, reference_pixel_cap
from .samplers import check_sampler_name
from .sampling import (
    StepCallback,
    check_image_size,
    flux2_sigmas,
    latent_shape,
    make_noise,
    sample,
    sigmas_for_denoise,
)
from .text_encoder_files import text_encoder_output_dim
from .text_encoders import Flux2TextEncoder
from .vae import Flux2VAE
from .variants import VARIANTS, guess_variant

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
OUTPUT_TYPES = ("pil", "latent")


def check_text_width(context_dim: int, text_width: int, text_encoder: object) -> None:
    if context_dim != text_width:
        raise IncompatibleModelsError(
            f"text_encoder: the DiT's txt_in expects {context_dim}-wide prompt embeddings, but {text_encoder} "
            f"produces {text_width} (klein 4B pairs with Qwen3-4B, klein 9B with Qwen3-8B, dev with Mistral 3)")


def check_files_fit(dit: PathLike, text_encoder: PathLike) -> None:
    """Compare the DiT's context width with the text encoder's output width from file headers alone."""
    context_dim = inspect_checkpoint(dit).details.get("context_dim")
    if context_dim is not None:
        check_text_width(context_dim, text_encoder_output_dim(text_encoder), text_encoder)


def fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale `image` to cover width x height (LANCZOS, aspect kept) and center-crop the overflow."""
    image = image.convert("RGB")
    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    covered = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                           Image.Resampling.LANCZOS)
    left, top = (covered.width - width) // 2, (covered.height - height) // 2
    return covered.crop((left, top, left + width, top + height))


def pixel_mask(mask: Image.Image | torch.Tensor, width: int, height: int) -> torch.Tensor:
    """An inpainting mask as a float tensor; a PIL mask is fitted to width x height like the image (`fit_image`)."""
    if isinstance(mask, torch.Tensor):
        return mask.float()
    fitted = fit_image(mask.convert("L").convert("RGB"), width, height)
    return pil_to_tensor(fitted)[:, :1].squeeze(1) * 0.5 + 0.5


class Flux2Pipeline:
    """A DiT, the VAE and a text encoder (loaded, or a path to load it from when first needed)."""

    def __init__(self, dit: Flux2DiT, vae: Flux2VAE, text_encoder: Flux2TextEncoder | PathLike,
                 variant: str | None = None, text_encoder_dtype: torch.dtype | str | None = None):
        self.dit = residency.manage(dit, "DiT")
        self.vae = residency.manage(vae, "VAE")
        # Where the models compute; the manager may move their weights to the CPU between calls.
        self._device = residency.compute_device(dit)
        self.variant = variant or getattr(dit, "variant", None) or guess_variant(dit.config)
        if self.variant not in VARIANTS:
            raise Flux2Error(f"variant: expected one of {sorted(VARIANTS)}, found {self.variant!r}")
        if isinstance(text_encoder, Flux2TextEncoder):
            check_text_width(dit.config.context_dim, text_encoder.output_dim, f"the {text_encoder.kind} text encoder")
            self._text_encoder: Flux2TextEncoder | None = residency.manage(text_encoder, "text encoder")
            self._text_encoder_path: Path | None = None
        else:
            check_text_width(dit.config.context_dim, text_encoder_output_dim(text_encoder), text_encoder)
            self._text_encoder, self._text_encoder_path = None, Path(text_encoder)
        self._text_encoder_dtype = text_encoder_dtype
        self._text_encoder_streaming: dict[str, object] = {}  # offload / vram_budget_gb from `from_files`
        self._last_prompts: tuple[list[str], torch.Tensor] | None = None
        self.loras: list[tuple[Flux2LoRA, float]] = []  # applied on the fly to every call

    @classmethod
    def from_files(cls, dit: PathLike, vae: PathLike, text_encoder: PathLike,
                   device: torch.device | str | None = None, dtype: torch.dtype | str | None = None,
                   offload: str | None = None, vram_budget_gb: float | None = None, weight_dtype: str | None = None,
                   fp8_matmul: bool | None = None, compile: bool | None = None) -> Flux2Pipeline:
        """Load DiT and VAE now (files or folders); the text encoder is loaded on the first call.

        offload / vram_budget_gb: block streaming of the DiT and the text encoder (`load_dit`); weight_dtype,
        fp8_matmul and compile apply to the DiT."""
        check_files_fit(dit, text_encoder)
        streaming = {"offload": offload, "vram_budget_gb": vram_budget_gb}
        pipe = cls(residency.load_managed(load_dit, dit, name="DiT", device=device, dtype=dtype,
                                          weight_dtype=weight_dtype, fp8_matmul=fp8_matmul, compile=compile,
                                          **streaming),
                   residency.load_managed(load_vae, vae, name="VAE", device=device, dtype=dtype),
                   text_encoder, text_encoder_dtype=dtype)
        pipe._text_encoder_streaming = streaming
        return pipe

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def text_encoder(self) -> Flux2TextEncoder:
        if self._text_encoder is None:
            self._text_encoder = residency.load_managed(load_text_encoder, self._text_encoder_path,
                                                        name="text encoder", device=self.device,
                                                        dtype=self._text_encoder_dtype,
                                                        **self._text_encoder_streaming)
        return self._text_encoder

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """[len(prompts), 512, context_dim] on the DiT's device. The encoder stays on the device afterwards
        while the memory manager has room for it.

        The last result is kept: calls that only change seed, size or steps skip the text encoder.
        """
        if self._last_prompts is not None and self._last_prompts[0] == prompts:
            return self._last_prompts[1]
        with residency.use(self.text_encoder) as encoder:
            embeddings = encoder.encode(prompts).to(self.device)
        self._last_prompts = (list(prompts), embeddings)
        return embeddings

    def load_lora(self, lora: Flux2LoRA | PathLike, strength: float = 1.0) -> Flux2LoRA:
        """Use a LoRA (any dialect) in every following call; loading one again only changes its strength."""
        loaded = lora if isinstance(lora, Flux2LoRA) else read_lora_file(lora)
        self.loras = prepare_loras([*self.loras, (loaded, strength)])
        return loaded

    def unload_loras(self) -> None:
        self.loras = []

    def encode_references(self, images: Sequence[Image.Image], pixel_cap: int | None = None) -> list[torch.Tensor]:
        """Each reference as its own latent [1, 128, h, w]; `pixel_cap` None means the official caps."""
        cap = reference_pixel_cap(len(images)) if pixel_cap is None else pixel_cap
        if not images:
            return []
        with residency.use(self.vae) as vae:
            return [vae.encode(preprocess_reference(image, cap)) for image in images]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        width: int = 1024,
        height: int = 1024,
        steps: int | None = None,
        guidance: float | None = None,
        cfg: float | None = None,
        negative_prompt: str = "",
        seed: int = 0,
        reference_images: Sequence[Image.Image] = (),
        image: Image.Image | None = None,
        denoise: float = 1.0,
        callback: StepCallback | None = None,
        cancel: Callable[[], bool] | None = None,
        batch_size: int = 1,
        output_type: str = "pil",
        reference_pixel_cap: int | None = None,
        loras: Sequence[tuple[Flux2LoRA | PathLike, float]] | None = None,
        sampler: str = "euler",
        mask: Image.Image | torch.Tensor | None = None,
    ) -> list[Image.Image] | torch.Tensor:
        """Generate `batch_size` images of width x height (multiples of 16).

        reference_images: PIL images to edit from / combine (official preprocessing; `reference_pixel_cap`
        overrides the official per-reference pixel cap, e.g. 1024**2 for diffusers' behaviour).
        image + denoise < 1: img2img from `image` (scaled to cover the size, then center-cropped); the first
        int(steps * (1 - denoise)) steps are skipped, as in diffusers. cfg != 1 runs real CFG with
        `negative_prompt`. guidance only applies to DiTs with a guidance embedding (dev).
        output_type "latent" returns the normalized packed latent [B, 128, h, w] (float32) instead of images.
        loras: [(LoRA or path, strength), ...] for this call instead of the ones from `load_lora`.
        sampler: one of `flux2_core.samplers.SAMPLER_NAMES` (ComfyUI's names); the ancestral ones seed their
        fresh noise from `seed`, as ComfyUI does.
        mask: inpainting / outpainting of `image`: white (1) is regenerated, black (0) kept as `image`. A PIL mask
        is scaled and cropped like `image`; a tensor ([H, W] or [B, H, W], 0..1) is used as given. Sampling
        keeps the unmasked region on the (noised) source latent at every step, like ComfyUI's noise_mask.
        """
        check_sampler_name(sampler)
        check_image_size(width, height)
        if output_type not in OUTPUT_TYPES:
            raise Flux2Error(f"output_type: expected one of {OUTPUT_TYPES}, found {output_type!r}")
        if batch_size < 1:
            raise Flux2Error(f"batch_size: expected an integer >= 1, found {batch_size}")
        if image is None and denoise != 1.0:
            raise Flux2Error(f"denoise: {denoise} needs a start `image`; without one only 1.0 makes sense")
        if mask is not None and image is None:
            raise Flux2Error("mask: inpainting needs the `image` to inpaint, found image=None")
        defaults = VARIANTS[self.variant]
        steps = defaults.steps if steps is None else steps
        cfg = defaults.cfg if cfg is None else cfg
        guidance = self._embedded_guidance(guidance, defaults.guidance)

        use_cfg = cfg != 1.0
        embeddings = self.encode_prompts([prompt, negative_prompt] if use_cfg else [prompt])
        references = self.encode_references(reference_images, reference_pixel_cap)
        latent_image = None
        if image is not None:
            with residency.use(self.vae) as vae:
                latent_image = vae.encode(pil_to_tensor(fit_image(image, width, height)))
        sigmas = sigmas_for_denoise(flux2_sigmas(steps, width, height), denoise)

        noise = make_noise(seed, latent_shape(batch_size, width, height))
        working = step_working_bytes(self.dit, noise.shape, cfg, references, defaults.reference_kv_cache)
        with residency.use(self.dit, working), attach_loras(self.dit, self.loras if loras is None else loras):
            latent = sample(
                self.dit, noise, sigmas, embeddings[:1],
                negative_context=embeddings[1:] if use_cfg else None, cfg=cfg, guidance=guidance,
                latent_image=latent_image, reference_latents=references,
                reference_kv_cache=defaults.reference_kv_cache, callback=callback, cancel=cancel,
                sampler=sampler, seed=seed, mask=None if mask is None else pixel_mask(mask, width, height))
        if output_type == "latent":
            return latent
        return image_to_pils(decode_latent(self.vae, latent))

    def _embedded_guidance(self, guidance: float | None, default: float | None) -> float | None:
        if self.dit.config.guidance_embed:
            return default if guidance is None else guidance
        if guidance is not None:
            log.warning("guidance=%s ignored: %s has no guidance embedding (use cfg for klein base)",
                        guidance, self.variant)
        return None
