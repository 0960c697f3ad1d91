"""Writing a FLUX.2 LoRA in the dialect another tool reads best.

| format   | keys                                              | layout of fused weights          | scale                 |
|----------|---------------------------------------------------|----------------------------------|-----------------------|
| comfyui  | `diffusion_model.<BFL>.lora_A/lora_B.weight`, `.alpha` | fused qkv / linear1         | alpha key             |
| kohya    | `lora_unet_<BFL, dots as _>.lora_down/lora_up.weight`, `.alpha` | fused              | alpha key             |
| diffusers| `transformer.<diffusers>.lora_A/lora_B.weight`    | q/k/v split, linear1 fused       | baked into the weights |

diffusers gets no alpha keys (its loader rejects them) and no PEFT alpha metadata, because ComfyUI and
DiffSynth read the same files without metadata; the scale is folded into lora_B so every reader sees the
same delta. ComfyUI (checked on 0.12.1) reads FLUX.2's diffusers names for the blocks, the embedders and the
final layer, not for the timestep / guidance embedders (it knows FLUX.1's `time_text_embed.*` there) nor the
shared modulations: a diffusers file that changes those gets a warning, the comfyui and kohya formats load whole. LyCORIS LoHa / LoKr keep their algorithm (hada_* / lokr_* parameters).

Every rewrite is exact: splitting a fused qkv LoRA shares A and cuts B by rows; fusing pieces (split q/k/v
into qkv, q/k/v/mlp into linear1) stacks the A's along the rank and places each B block-diagonally, or keeps
one A when the pieces share it (so fused -> split -> fused returns the original rank).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..errors import CheckpointError
from .deltas import Delta, Hadamard, Kronecker, LowRank
from .dialects import Flux2LoRA, LoRAPatch, load_lora
from .names import FUSED_DIFFUSERS_NAMES, diffusers_names, spec_of, template_of

FORMATS = ("comfyui", "diffusers", "kohya")

log = logging.getLogger(__name__)

# BFL layers whose FLUX.2 diffusers names ComfyUI skips with "lora key not loaded" (see the module docstring).
_COMFYUI_SKIPS_IN_DIFFUSERS = re.compile(r"(time_in|guidance_in)\.|(double_stream_modulation_(img|txt)"
                                         r"|single_stream_modulation)\.lin$")

# Metadata whose meaning the rewrite changes: the scale of a diffusers output is baked into its weights.
_DROPPED_METADATA = ("lora_adapter_metadata",)


@dataclass(frozen=True)
class _Unit:
    """One module of the output file: its name and the rows of the BFL weight it covers."""

    name: str
    rows: tuple[int, int]
    swap_halves: bool = False


def lora_to_state_dict(lora: Flux2LoRA, fmt: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of `lora` in `fmt` ("comfyui", "diffusers" or "kohya")."""
    if fmt not in FORMATS:
        raise ValueError(f"LoRA format: expected one of {FORMATS}, found {fmt!r}")
    tensors: dict[str, Tensor] = {}
    for module, patches in lora.targets.items():
        for unit in _units(module, patches, lora.hidden_size, fmt):
            patch = _unit_patch(unit, patches, lora.name)
            if patch is not None:
                tensors.update(_keys(patch, fmt))
    metadata = {key: value for key, value in lora.metadata.items() if key not in _DROPPED_METADATA}
    if fmt == "diffusers":
        _warn_of_layers_comfyui_skips(lora)
    return tensors, metadata


def _warn_of_layers_comfyui_skips(lora: Flux2LoRA) -> None:
    skipped = sorted(module for module in lora.targets if _COMFYUI_SKIPS_IN_DIFFUSERS.match(module))
    if skipped:
        log.warning("%s: ComfyUI does not read the diffusers names of %s (it loads the rest of the file); for "
                    "ComfyUI write the comfyui or kohya format", lora.name, ", ".join(skipped))


def save_lora(lora: Flux2LoRA, path: str | os.PathLike, fmt: str) -> None:
    tensors, metadata = lora_to_state_dict(lora, fmt)
    # safetensors refuses tensors that share memory (a shared lora_A, cut rows): give each its own storage.
    save_file({key: tensor.detach().contiguous().clone() for key, tensor in tensors.items()}, str(path), metadata)


def convert_lora(source: str | os.PathLike, destination: str | os.PathLike, fmt: str) -> Flux2LoRA:
    """Read a LoRA file of any dialect and write it in `fmt`; returns the LoRA read."""
    lora = load_lora(source)
    save_lora(lora, destination, fmt)
    return lora


def _units(module: str, patches: Sequence[LoRAPatch], hidden: int, fmt: str) -> list[_Unit]:
    spec = spec_of(module)
    out = spec.out_per_hidden * hidden if spec.out_per_hidden else patches[0].delta.shape[0]
    if fmt != "diffusers":
        return [_Unit(module, (0, out))]
    template, index = template_of(module)
    names, swap = diffusers_names(template)
    fill = [name.format(i=index) for name in names]
    if len(names) == 1:
        return [_Unit(fill[0], (0, out), swap)]
    # A LoKr on the whole fused qkv can only be cut by rows in special cases: diffusers' fused projection
    # (which its loader creates for such adapters) takes it whole.
    if template in FUSED_DIFFUSERS_NAMES and any(isinstance(p.delta, Kronecker) and p.rows is None for p in patches):
        return [_Unit(FUSED_DIFFUSERS_NAMES[template].format(i=index), (0, out))]
    step = out // len(names)
    return [_Unit(name, (k * step, (k + 1) * step)) for k, name in enumerate(fill)]


def _unit_patch(unit: _Unit, patches: Sequence[LoRAPatch], lora_name: str) -> LoRAPatch | None:
    """The one patch `unit` gets: a patch as it is, its rows, or pieces fused (all in unit coordinates)."""
    start, stop = unit.rows
    overlaps = []
    for patch in patches:
        first, last = patch.rows or (0, patch.delta.shape[0])
        low, high = max(first, start), min(last, stop)
        if low < high:
            overlaps.append((patch, first, low, high))
    if not overlaps:
        return None
    try:
        if len(overlaps) == 1 and overlaps[0][2:] == (start, stop):
            patch, first, low, high = overlaps[0]
            whole = (low, high) == (first, first + patch.delta.shape[0])
            delta = patch.delta if whole else patch.delta.rows(low - first, high - first)
            result = LoRAPatch(unit.name, None, delta, patch.alpha, patch.source)
        elif all(isinstance(patch.delta, LowRank) for patch, *_ in overlaps):
            result = _fuse(unit, overlaps)
        else:
            raise CheckpointError(f"{unit.name}: several LyCORIS (LoHa/LoKr) pieces cannot be combined into one "
                                  "layer exactly")
        if unit.swap_halves:
            result = LoRAPatch(result.module, None, result.delta.swap_row_halves(), result.alpha, result.source)
    except CheckpointError as error:
        raise CheckpointError(f"{lora_name}: cannot write {unit.name}: {error}") from None
    return result


def _fuse(unit: _Unit, overlaps: list[tuple[LoRAPatch, int, int, int]]) -> LoRAPatch:
    """Low-rank pieces over parts of the unit's rows -> one low-rank delta over all of them, exactly."""
    start, stop = unit.rows
    dtype = overlaps[0][0].delta.up.dtype
    scales = {patch.scale for patch, *_ in overlaps}
    common = scales.pop() if len(scales) == 1 else 1.0
    pieces = []  # (up rows scaled to the common scale, down, destination rows in the unit)
    for patch, first, low, high in overlaps:
        up = patch.delta.up[low - first:high - first].float() * (patch.scale / common)
        pieces.append((up, patch.delta.down, (low - start, high - start)))

    downs = [down for _, down, _ in pieces]
    shared = all(down.shape == downs[0].shape and torch.equal(down, downs[0]) for down in downs)
    rank = downs[0].shape[0] if shared else sum(down.shape[0] for down in downs)
    up = torch.zeros(stop - start, rank, dtype=torch.float32, device=downs[0].device)
    column = 0
    for piece_up, down, (low, high) in pieces:
        width = down.shape[0]
        up[low:high, column:column + width] += piece_up
        column += 0 if shared else width
    down = downs[0] if shared else torch.cat([d.to(dtype) for d in downs])
    any_alpha = any(patch.alpha is not None for patch, *_ in overlaps)
    alpha = common * rank if any_alpha or common != 1.0 else None
    return LoRAPatch(unit.name, None, LowRank(up.to(dtype), down.to(dtype)), alpha, overlaps[0][0].source)


_PARAMETER_NAMES = {
    "comfyui": {"down": "lora_A.weight", "up": "lora_B.weight"},
    "diffusers": {"down": "lora_A.weight", "up": "lora_B.weight"},
    "kohya": {"down": "lora_down.weight", "up": "lora_up.weight"},
}


def _parameters(delta: Delta, fmt: str) -> dict[str, Tensor]:
    if isinstance(delta, LowRank):
        names = _PARAMETER_NAMES[fmt]
        return {names["down"]: delta.down, names["up"]: delta.up}
    if isinstance(delta, Hadamard):
        return {"hada_w1_a": delta.w1_a, "hada_w1_b": delta.w1_b, "hada_w2_a": delta.w2_a, "hada_w2_b": delta.w2_b}
    assert isinstance(delta, Kronecker)
    return {f"lokr_{name}": tensor for name in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")
            if (tensor := getattr(delta, name)) is not None}


def _keys(patch: LoRAPatch, fmt: str) -> dict[str, Tensor]:
    if fmt == "diffusers":
        delta = patch.delta.scaled(patch.scale) if patch.scale != 1.0 else patch.delta
        return {f"transformer.{patch.module}.{name}": tensor for name, tensor in _parameters(delta, fmt).items()}
    prefix = f"diffusion_model.{patch.module}" if fmt == "comfyui" else f"lora_unet_{patch.module.replace('.', '_')}"
    keys = {f"{prefix}.{name}": tensor for name, tensor in _parameters(patch.delta, fmt).items()}
    rank = patch.delta.rank
    if rank is not None:
        # Written even when the source had none (scale 1 = alpha equal to the rank): readers disagree on
        # what a missing alpha means.
        alpha = patch.alpha if patch.alpha is not None else float(rank)
        keys[f"{prefix}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return keys
