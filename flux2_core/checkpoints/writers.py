"""Writing a whole FLUX.2 DiT as one safetensors file in the BFL single-file layout (what a full fine-tune saves).

Keys are the model's own BFL names (`double_blocks.0.img_attn.qkv.weight` ...), unprefixed as in BFL's release
files, or under ComfyUI's `model.diffusion_model.` prefix when asked. With `fp8` the block linear weights are
quantized like the official fp8 files (`quant.quantize_state_dict`: "bfl-fp8" = per-row `weight_scale`,
"comfyui-fp8-mixed" adds ComfyUI's per-layer declaration); everything else keeps `dtype`. The variant name goes
into the metadata so a loader tells klein base from distilled by it (the weights alone cannot).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from safetensors.torch import save_file

from ..dit import Flux2DiT
from .quant import Fp8FileLayout, Fp8Linear, quantize_state_dict

SAVE_FP8_LAYOUTS: tuple[Fp8FileLayout, ...] = ("bfl-fp8", "comfyui-fp8-mixed", "scaled-fp8")


def dit_state_dict(model: Flux2DiT, dtype: torch.dtype = torch.bfloat16,
                   state: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """BFL-named float tensors of `model` in `dtype` on the CPU; fp8 layers are dequantized first. `state`: the
    model's tensors when its own state dict does not hold them whole (a sharded model's gathered full state)."""
    fp8_layers = {name for name, module in model.named_modules() if isinstance(module, Fp8Linear)}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in (model.state_dict() if state is None else state).items():
        layer, _, attr = key.rpartition(".")
        if layer in fp8_layers:
            if attr == "weight":
                value = model.get_submodule(layer).dequantized_weight(torch.float32)
            elif attr == "weight_scale":
                continue
        tensors[key] = value.detach().to("cpu", dtype).contiguous()
    return tensors


def dit_file_tensors(model: Flux2DiT, dtype: torch.dtype = torch.bfloat16, fp8: Fp8FileLayout | None = None,
                     key_prefix: str = "", metadata: Mapping[str, str] | None = None,
                     state: Mapping[str, torch.Tensor] | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of the single file `save_dit` writes (`state`: as in `dit_state_dict`)."""
    if fp8 is not None and fp8 not in SAVE_FP8_LAYOUTS:
        raise ValueError(f"fp8 layout: expected one of {SAVE_FP8_LAYOUTS} or None, found {fp8!r}")
    tensors = {key_prefix + key: value for key, value in dit_state_dict(model, dtype, state).items()}
    file_metadata: dict[str, str] = {}
    if fp8 is not None:
        tensors, file_metadata = quantize_state_dict(tensors, fp8)
    variant = getattr(model, "variant", None)
    if variant:
        file_metadata["variant"] = variant
    file_metadata.update(metadata or {})
    return tensors, file_metadata


def save_dit(model: Flux2DiT, path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
             fp8: Fp8FileLayout | None = None, key_prefix: str = "",
             metadata: Mapping[str, str] | None = None) -> None:
    """Write `model` as a single-file DiT that `load_dit` and ComfyUI's UNETLoader read."""
    tensors, file_metadata = dit_file_tensors(model, dtype, fp8, key_prefix, metadata)
    save_file(tensors, str(path), metadata=file_metadata)
