"""Samples while training in memory (the node graph): a few Euler steps from seeded noise, drawn with the DiT
and its adapters as they are at that step, returned as a latent the host shows as the step's preview image.

A graph has no VAE or prompt file for the trainer, so a preview is drawn at the size of the first training
latent with the first training caption's embeddings, without CFG, and decoding is left to the host (its
latent preview). `PREVIEWS` samples spread over a run, the last one at the final step, keep the cost at
`PREVIEWS * PREVIEW_STEPS` DiT forwards (a few training steps' worth).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..progress import progress_handler
from ..sampling import flux2_sigmas_for_tokens, make_noise, sample

PREVIEWS = 4
PREVIEW_STEPS = 4


def preview_due(step: int, total: int, previews: int = PREVIEWS) -> bool:
    """Every ceil(total / previews) steps, and at the last step."""
    return step % max(1, math.ceil(total / previews)) == 0 or step == total


def preview_latent(dit: nn.Module, latent_shape: tuple[int, int, int], context: torch.Tensor, seed: int,
                   steps: int = PREVIEW_STEPS) -> torch.Tensor:
    """[1, 128, h, w]: `steps` Euler steps with FLUX.2's schedule for that size from `make_noise(seed)`, text
    embeddings `context` [1, T, C], no CFG. The DiT is put in eval mode for it (adapter dropout off) and back in
    training mode after; the sampler's own progress reports are not passed on (they are not training steps)."""
    _, height, width = latent_shape
    dit.eval()
    try:
        with torch.no_grad(), progress_handler(None):
            return sample(dit, make_noise(seed, (1, *latent_shape)), flux2_sigmas_for_tokens(steps, height * width),
                          context[:1])
    finally:
        dit.train()
