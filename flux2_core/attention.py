"""The one attention entry point of the engine, so a faster kernel can be swapped in at a single place.

FLUX.2 attention is plain softmax attention with scale 1/sqrt(head_dim) and no mask (padded text tokens are
attended to, as in the reference implementation).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import progress
from .errors import Flux2Error
from .progress import check_interrupt

# A backend takes q, k, v [B, heads, L, head_dim] and returns [B, heads, L, head_dim].
AttentionBackend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

BACKENDS: dict[str, AttentionBackend] = {"sdpa": F.scaled_dot_product_attention}
_active_backend = "sdpa"


def set_attention_backend(name: str) -> None:
    global _active_backend
    if name not in BACKENDS:
        raise Flux2Error(f"attention backend: expected one of {sorted(BACKENDS)}, found {name!r}")
    _active_backend = name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v [B, heads, L, head_dim] -> [B, L, heads * head_dim].

    Over `progress.macs_between_checks` (the CPU at very large images: one DiT block's attention over 65k tokens
    runs for seconds) the queries go in chunks with an interrupt check between them; each query row attends
    to every key on its own, so the chunks give the same rows as one call."""
    backend = BACKENDS[_active_backend]
    budget = progress.macs_between_checks(q.device)
    macs_per_query = 2 * q.shape[0] * q.shape[1] * k.shape[2] * q.shape[3]  # QK^T and the weighted sum of V
    if budget is None or macs_per_query * q.shape[2] <= budget:
        out = backend(q, k, v)
    else:
        rows = max(1, budget // macs_per_query)
        chunks = []
        for start in range(0, q.shape[2], rows):
            check_interrupt()
            chunks.append(backend(q[:, :, start:start + rows], k, v))
        out = torch.cat(chunks, dim=2)
    # Fused kernels already lay the result out as [B, L, heads, head_dim], so this is usually a free view.
    return out.transpose(1, 2).flatten(2)
