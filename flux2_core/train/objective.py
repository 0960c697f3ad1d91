"""The training objective: rectified-flow velocity MSE on the target image's tokens, with the DiT called
exactly as `sampling.sample` calls it at inference.

x_t = (1 - sigma) x0 + sigma noise, target v = noise - x0. The DiT sees the packed noisy target tokens
followed by the clean reference (control) tokens with their inference position ids (time 10, 20, ...), the
text with its ids, sigma as timestep and, for dev, guidance 1.0; its output is cut back to the target tokens
before the loss, so reference tokens never contribute to it.

An objective is any callable (dit, batch, generator) -> (per-sample loss [B], sigmas [B]); part 2's distillation
or differential objectives plug in the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..references import image_position_ids, reference_position_ids, text_position_ids
from ..sampling import pack_latents
from .config import TrainConfig
from .timesteps import loss_weights, sample_sigmas


@dataclass
class Batch:
    latents: Tensor  # [B, 128, h, w] clean target latents
    context: Tensor  # [B, 512, C] text embeddings
    controls: list[Tensor] = field(default_factory=list)  # each [B, 128, h', w'] clean reference latents


def model_inputs(noisy: Tensor, batch: Batch, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    """The DiT's inputs for noisy target latents [B, 128, h, w] plus the batch's references and text."""
    size, _, height, width = noisy.shape
    img = pack_latents(noisy)
    img_ids = image_position_ids(height, width, size, device=device)
    if batch.controls:
        img = torch.cat([img, *(pack_latents(c.to(device)) for c in batch.controls)], dim=1)
        grids = [tuple(c.shape[-2:]) for c in batch.controls]
        img_ids = torch.cat([img_ids, reference_position_ids(grids, size, device=device)], dim=1)
    txt = batch.context.to(device=device, dtype=dtype)
    return {"img": img.to(device=device, dtype=dtype), "img_ids": img_ids, "txt": txt,
            "txt_ids": text_position_ids(size, txt.shape[1], device=device)}


class FlowMatchingObjective:
    def __init__(self, config: TrainConfig):
        self.config = config

    def sigmas(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        c = self.config
        height, width = batch.latents.shape[-2:]
        sigmas, mode_weights = sample_sigmas(c.timestep_sampling, batch.latents.shape[0], generator,
                                             latent_cells=height * width, sigmoid_scale=c.sigmoid_scale,
                                             shift=c.discrete_flow_shift, logit_mean=c.logit_mean,
                                             logit_std=c.logit_std)
        scheme = loss_weights(c.weighting_scheme, sigmas)
        weights = mode_weights if scheme is None else scheme if mode_weights is None else scheme * mode_weights
        return sigmas, weights

    def __call__(self, dit: torch.nn.Module, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        model = getattr(dit, "module", dit)  # a DDP wrapper (several processes) forwards calls, not attributes
        device = next(model.parameters()).device
        dtype = getattr(model, "compute_dtype", torch.float32)
        x0 = batch.latents.to(device=device, dtype=torch.float32)
        # Noise and sigmas from the run's CPU generator: the same on every device and resumable.
        noise = torch.randn(x0.shape, generator=generator).to(device)
        sigmas, weights = self.sigmas(batch, generator)
        sigmas = sigmas.to(device)
        noisy = (1 - sigmas[:, None, None, None]) * x0 + sigmas[:, None, None, None] * noise
        inputs = model_inputs(noisy, batch, device, dtype)
        guidance = None
        if model.config.guidance_embed:
            guidance = torch.full((x0.shape[0],), self.config.guidance_scale, device=device)
        out = dit(**inputs, timesteps=sigmas, guidance=guidance)
        target_tokens = x0.shape[-2] * x0.shape[-1]
        prediction = out[:, :target_tokens].float()
        target = pack_latents(noise - x0)
        per_sample = ((prediction - target) ** 2).mean(dim=(1, 2))
        if weights is not None:
            per_sample = per_sample * weights.to(device)
        return per_sample, sigmas
