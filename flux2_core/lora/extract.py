"""A LoRA from a fine-tune: the truncated SVD of (tuned - base) on every linear layer of the DiT.

For each linear weight W, delta = W_tuned - W_base = U S V^T; the best rank-r approximation (Eckart-Young) is
U[:, :r] S[:r] V[:r]^T, written as up = U[:, :r] * sqrt(S[:r]), down = sqrt(S[:r]) V[:r] (the square root splits
the magnitude evenly, so neither factor is tiny when stored in bf16) with alpha = r, so ComfyUI's scale
alpha / rank is 1 and the LoRA at strength 1 adds exactly the approximation. A difference of rank <= r is
reproduced to float precision.

Only linear weights can be carried by a LoRA; tensors that differ elsewhere (norm scales, embeddings of a
full fine-tune) are listed in the result so the caller can say what the LoRA leaves out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoints.loaders import load_dit
from ..checkpoints.quant import Fp8Linear
from ..dit import Flux2DiT
from ..errors import IncompatibleModelsError
from .convert import save_lora
from .deltas import LowRank
from .dialects import Flux2LoRA, LoRAPatch


@dataclass(frozen=True)
class Extraction:
    """The extracted LoRA, and per layer how much of the difference the rank kept."""

    lora: Flux2LoRA
    kept_energy: dict[str, float]  # module -> sum of kept S^2 / sum of all S^2 (1.0: exact)
    unchanged_layers: tuple[str, ...]  # linear layers whose weights are identical (no patch written)
    uncaptured_tensors: tuple[str, ...]  # non-linear tensors that differ (a LoRA cannot carry them)


def _linear_weight(module: nn.Module) -> torch.Tensor:
    if isinstance(module, Fp8Linear):
        return module.dequantized_weight(torch.float32)
    return module.weight.float()


def _linears(model: Flux2DiT) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if isinstance(module, (nn.Linear, Fp8Linear))}


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up [out, r], down [r, in], kept energy) of the best rank-`rank` approximation of `delta` (fp32)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    total = float((s * s).sum())
    kept = float((s[:r] * s[:r]).sum()) / total if total > 0 else 1.0
    return u[:, :r] * root, root[:, None] * vh[:r], kept


@torch.no_grad()
def extract_lora_from_models(base: Flux2DiT, tuned: Flux2DiT, rank: int, name: str = "<extracted>",
                             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Extraction:
    """The rank-`rank` LoRA that turns `base` into (approximately) `tuned`; factors stored in `dtype`."""
    if rank < 1:
        raise ValueError(f"rank: expected a positive integer, found {rank}")
    if base.config != tuned.config:
        raise IncompatibleModelsError(f"lora extract: the base and tuned DiTs differ in architecture "
                                      f"({base.config} vs {tuned.config}); expected the same model fine-tuned")
    base_linears, tuned_linears = _linears(base), _linears(tuned)
    patches, kept, unchanged = [], {}, []
    for module, layer in base_linears.items():
        delta = _linear_weight(tuned_linears[module]).to(device) - _linear_weight(layer).to(device)
        if not bool(delta.any()):
            unchanged.append(module)
            continue
        up, down, kept[module] = low_rank_factors(delta, rank)
        patches.append(LoRAPatch(module, None, LowRank(up.to("cpu", dtype), down.to("cpu", dtype)),
                                 float(up.shape[1]), module))
    linear_tensors = {f"{module}.{suffix}" for module in base_linears for suffix in ("weight", "weight_scale", "bias")}
    tuned_state = tuned.state_dict()
    uncaptured = tuple(key for key, value in base.state_dict().items()
                       if key not in linear_tensors and not torch.equal(value, tuned_state[key]))
    lora = Flux2LoRA(name, "bfl", tuple(patches), base.config.hidden_size,
                     metadata={"flux2.extracted_rank": str(rank)})
    return Extraction(lora, kept, tuple(unchanged), uncaptured)


def extract_lora(base_path: str | os.PathLike, tuned_path: str | os.PathLike, rank: int,
                 out_path: str | os.PathLike | None = None, fmt: str = "comfyui",
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16) -> Extraction:
    """Load both DiTs (any layout `load_dit` reads; fp8 weights are dequantized), extract, optionally save.

    Memory: both models are held in fp32 on the CPU (SVDs run on `device`, one layer at a time).
    """
    base = load_dit(base_path, device="cpu", dtype=torch.float32, weight_dtype=torch.float32)
    tuned = load_dit(tuned_path, device="cpu", dtype=torch.float32, weight_dtype=torch.float32)
    extraction = extract_lora_from_models(base, tuned, rank, name=str(out_path or tuned_path), device=device,
                                          dtype=dtype)
    if out_path is not None:
        save_lora(extraction.lora, out_path, fmt)
    return extraction
