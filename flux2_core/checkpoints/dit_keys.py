"""DiT tensor names: BFL (official single files, ComfyUI) <-> diffusers (`Flux2Transformer2DModel`).

BFL fuses q, k and v of each double-block stream into one `qkv` linear whose rows are [q | k | v]; diffusers
keeps three linears, so one BFL tensor maps to three diffusers tensors, each a third of the rows. The final
layer's modulation rows are [shift ; scale] in BFL and [scale ; shift] in diffusers. Everything else is a rename.

The conversions only slice, concatenate and rename, so they work on meta tensors too. Split pieces are views of
the fused tensor (no copy): clone them before saving them to a safetensors file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..errors import CheckpointError

_BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


@dataclass(frozen=True)
class _Rule:
    bfl: str  # "{i}" stands for a block index
    diffusers: tuple[str, ...]  # equal row slices of the BFL tensor, in order
    swap_halves: bool = False


def _double_block(bfl_stream: str, q: str, k: str, v: str, norm_q: str, norm_k: str, out: str, ff: str) -> list[_Rule]:
    bfl, diff = f"double_blocks.{{i}}.{bfl_stream}", "transformer_blocks.{i}"
    return [
        _Rule(f"{bfl}_attn.qkv.weight", (f"{diff}.attn.{q}.weight", f"{diff}.attn.{k}.weight", f"{diff}.attn.{v}.weight")),
        _Rule(f"{bfl}_attn.norm.query_norm.scale", (f"{diff}.attn.{norm_q}.weight",)),
        _Rule(f"{bfl}_attn.norm.key_norm.scale", (f"{diff}.attn.{norm_k}.weight",)),
        _Rule(f"{bfl}_attn.proj.weight", (f"{diff}.attn.{out}.weight",)),
        _Rule(f"{bfl}_mlp.0.weight", (f"{diff}.{ff}.linear_in.weight",)),
        _Rule(f"{bfl}_mlp.2.weight", (f"{diff}.{ff}.linear_out.weight",)),
    ]


_RULES = [
    _Rule("img_in.weight", ("x_embedder.weight",)),
    _Rule("txt_in.weight", ("context_embedder.weight",)),
    _Rule("time_in.in_layer.weight", ("time_guidance_embed.timestep_embedder.linear_1.weight",)),
    _Rule("time_in.out_layer.weight", ("time_guidance_embed.timestep_embedder.linear_2.weight",)),
    _Rule("guidance_in.in_layer.weight", ("time_guidance_embed.guidance_embedder.linear_1.weight",)),
    _Rule("guidance_in.out_layer.weight", ("time_guidance_embed.guidance_embedder.linear_2.weight",)),
    _Rule("double_stream_modulation_img.lin.weight", ("double_stream_modulation_img.linear.weight",)),
    _Rule("double_stream_modulation_txt.lin.weight", ("double_stream_modulation_txt.linear.weight",)),
    _Rule("single_stream_modulation.lin.weight", ("single_stream_modulation.linear.weight",)),
    *_double_block("img", "to_q", "to_k", "to_v", "norm_q", "norm_k", "to_out.0", "ff"),
    *_double_block("txt", "add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k", "to_add_out",
                   "ff_context"),
    _Rule("single_blocks.{i}.linear1.weight", ("single_transformer_blocks.{i}.attn.to_qkv_mlp_proj.weight",)),
    _Rule("single_blocks.{i}.linear2.weight", ("single_transformer_blocks.{i}.attn.to_out.weight",)),
    _Rule("single_blocks.{i}.norm.query_norm.scale", ("single_transformer_blocks.{i}.attn.norm_q.weight",)),
    _Rule("single_blocks.{i}.norm.key_norm.scale", ("single_transformer_blocks.{i}.attn.norm_k.weight",)),
    _Rule("final_layer.linear.weight", ("proj_out.weight",)),
    _Rule("final_layer.adaLN_modulation.1.weight", ("norm_out.linear.weight",), swap_halves=True),
]


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(\d+)"))


def _fill(template: str, match: re.Match[str]) -> str:
    return template.format(i=match.group(1) if match.groups() else None)


_BY_BFL = [(_pattern(rule.bfl), rule) for rule in _RULES]
_BY_DIFFUSERS = [(_pattern(name), rule, index) for rule in _RULES for index, name in enumerate(rule.diffusers)]


class BflTarget(NamedTuple):
    """Where a diffusers tensor lives in the BFL layout."""

    bfl_name: str
    row_slice: int | None  # which of `num_slices` equal row blocks of the BFL tensor; None: the whole tensor
    num_slices: int
    swap_halves: bool  # the two row halves are in the opposite order (final-layer [shift ; scale])


def strip_bfl_prefix(name: str) -> str:
    """Drop the "model.diffusion_model." (ComfyUI) or "diffusion_model." prefix of a BFL tensor name."""
    for prefix in _BFL_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _match_diffusers(name: str) -> BflTarget | None:
    for pattern, rule, index in _BY_DIFFUSERS:
        match = pattern.fullmatch(name)
        if match:
            num_slices = len(rule.diffusers)
            return BflTarget(_fill(rule.bfl, match), index if num_slices > 1 else None, num_slices, rule.swap_halves)
    return None


def diffusers_name_to_bfl(name: str) -> BflTarget:
    """A diffusers tensor name, or a linear layer's module path (for LoRA), -> its place in the BFL layout.

    E.g. "transformer_blocks.0.attn.to_k" -> ("double_blocks.0.img_attn.qkv", 1, 3, False): rows [H:2H].
    """
    target = _match_diffusers(name)
    if target is not None:
        return target
    # A module path: linears carry ".weight" on both sides.
    target = _match_diffusers(name + ".weight")
    if target is not None and target.bfl_name.endswith(".weight"):
        return target._replace(bfl_name=target.bfl_name.removesuffix(".weight"))
    raise CheckpointError(f"{name!r}: expected a FLUX.2 DiT tensor or linear layer in diffusers naming, found no match")


def bfl_name_to_diffusers(name: str) -> tuple[tuple[str, ...], bool]:
    """A BFL tensor name (prefix allowed) -> (diffusers names of its equal row slices in order, halves swapped)."""
    stripped = strip_bfl_prefix(name)
    for pattern, rule in _BY_BFL:
        match = pattern.fullmatch(stripped)
        if match:
            return tuple(_fill(template, match) for template in rule.diffusers), rule.swap_halves
    raise CheckpointError(f"{name!r}: expected a FLUX.2 DiT tensor in BFL naming, found no match")


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat((second, first), dim=0)


def bfl_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        names, swap = bfl_name_to_diffusers(name)
        if tensor.shape[0] % len(names):
            raise CheckpointError(f"{name}: expected rows divisible by {len(names)} (fused q, k, v), found {tuple(tensor.shape)}")
        if swap:
            tensor = _swap_halves(tensor)
        converted.update(zip(names, tensor.chunk(len(names), dim=0)))
    return converted


def diffusers_to_bfl(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    slices: dict[str, list[torch.Tensor | None]] = {}
    swapped: set[str] = set()
    for name, tensor in state_dict.items():
        target = diffusers_name_to_bfl(name)
        if target.swap_halves:
            swapped.add(target.bfl_name)
        slots = slices.setdefault(target.bfl_name, [None] * target.num_slices)
        slots[target.row_slice or 0] = tensor

    converted: dict[str, torch.Tensor] = {}
    for bfl_name, slots in slices.items():
        if any(piece is None for piece in slots):
            names, _ = bfl_name_to_diffusers(bfl_name)
            missing = [names[index] for index, piece in enumerate(slots) if piece is None]
            raise CheckpointError(f"{bfl_name}: expected all of {list(names)} to fuse it, missing {missing}")
        tensor = torch.cat(slots, dim=0) if len(slots) > 1 else slots[0]
        converted[bfl_name] = _swap_halves(tensor) if bfl_name in swapped else tensor
    return converted
