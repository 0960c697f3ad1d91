"""Which FLUX.2 linear layer a LoRA module name points at, in every naming a tool writes.

A LoRA file names a layer in one of two namespaces, BFL (`double_blocks.0.img_attn.qkv`) or diffusers
(`transformer_blocks.0.attn.to_q`), either dotted or with dots turned into underscores (kohya's
`lora_unet_double_blocks_0_img_attn_qkv`, LyCORIS/SimpleTuner's `lycoris_transformer_blocks_0_attn_to_q`).
Every name resolves to a `Target`: the BFL module, and for split names the rows of the fused BFL weight it
covers, in units of the hidden size H (all fused FLUX.2 weights take H inputs: qkv is [3H, H], linear1 [9H, H]).

The list of linear layers and their widths comes from `Flux2DiT` itself, the diffusers names from
`checkpoints.dit_keys`; this module only adds the names LoRA tools use beyond the model's own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

from torch import nn

from ..checkpoints.dit_keys import bfl_name_to_diffusers
from ..dit import Flux2DiT
from ..variants import DiTConfig

_BLOCK_INDEX = re.compile(r"^((?:double|single)_blocks|(?:single_)?transformer_blocks)\.0\.")


@dataclass(frozen=True)
class LinearSpec:
    """A linear layer of the DiT by BFL template ("{i}" = block index) and how its sizes follow H.

    `out_per_hidden` / `in_per_hidden` are the multiples of H, or None for sizes fixed by the architecture
    (128 latent channels, 256 timestep features) or by the text encoder (context width).
    """

    template: str
    out_per_hidden: int | None
    in_per_hidden: int | None


@dataclass(frozen=True)
class Target:
    """Where a LoRA module lands: a BFL module and, for a split name, the rows of its fused weight."""

    module: str
    spec: LinearSpec
    piece: tuple[int, int] | None  # (first row, row count) in units of H; None: the whole weight
    swap_halves: bool  # diffusers' final-layer rows are [scale ; shift], BFL's [shift ; scale]


def _linear_sizes(hidden_size: int) -> dict[str, tuple[int, int]]:
    config = DiTConfig(hidden_size=hidden_size, num_heads=hidden_size // 128, depth_double=1, depth_single=1,
                       context_dim=40, guidance_embed=True)
    model = Flux2DiT(config, device="meta")
    return {_BLOCK_INDEX.sub(r"\1.{i}.", name): (module.out_features, module.in_features)
            for name, module in model.named_modules() if isinstance(module, nn.Linear)}


@cache
def linear_specs() -> dict[str, LinearSpec]:
    """BFL template -> LinearSpec for every linear layer of a FLUX.2 DiT (dev has them all)."""
    # Two widths tell which sizes follow H (they grow by 3/2) and which are fixed.
    small, large = _linear_sizes(256), _linear_sizes(384)

    def multiple(a: int, b: int) -> int | None:
        return a // 256 if 2 * b == 3 * a else None

    return {template: LinearSpec(template, multiple(small[template][0], large[template][0]),
                                 multiple(small[template][1], large[template][1]))
            for template in small}


@dataclass(frozen=True)
class _NameRule:
    pattern: re.Pattern[str]
    bfl_template: str
    piece: tuple[int, int] | None
    swap_halves: bool
    namespace: str  # "bfl" or "diffusers"


def _compile(template: str, underscored: bool) -> re.Pattern[str]:
    text = template.replace(".", "_") if underscored else template
    return re.compile(re.escape(text).replace(re.escape("{i}"), r"(\d+)"))


# BFL fused qkv -> diffusers' fused projection, for LoRAs that cannot be split by rows (LoKr); diffusers'
# LoKr converter targets them too.
FUSED_DIFFUSERS_NAMES = {
    "double_blocks.{i}.img_attn.qkv": "transformer_blocks.{i}.attn.to_qkv",
    "double_blocks.{i}.txt_attn.qkv": "transformer_blocks.{i}.attn.to_added_qkv",
}

# Names LoRA tools write beyond the model's own diffusers names: diffusers' fused projections, split
# single-block q/k/v/mlp (older diffusers-style exports, as ComfyUI maps them), the FLUX.1-era single-block
# output name, and ComfyUI's linear1_qkv (the first 3H rows of linear1).
_EXTRA_NAMES: tuple[tuple[str, str, tuple[int, int] | None, str], ...] = (
    *((name, bfl, None, "diffusers") for bfl, name in FUSED_DIFFUSERS_NAMES.items()),
    ("single_transformer_blocks.{i}.attn.to_q", "single_blocks.{i}.linear1", (0, 1), "diffusers"),
    ("single_transformer_blocks.{i}.attn.to_k", "single_blocks.{i}.linear1", (1, 1), "diffusers"),
    ("single_transformer_blocks.{i}.attn.to_v", "single_blocks.{i}.linear1", (2, 1), "diffusers"),
    ("single_transformer_blocks.{i}.proj_mlp", "single_blocks.{i}.linear1", (3, 6), "diffusers"),
    ("single_transformer_blocks.{i}.proj_out", "single_blocks.{i}.linear2", None, "diffusers"),
    ("single_blocks.{i}.linear1_qkv", "single_blocks.{i}.linear1", (0, 3), "bfl"),
)


def diffusers_names(bfl_template: str) -> tuple[tuple[str, ...], bool]:
    """(diffusers module templates of the equal row slices of a BFL module template, halves swapped)."""
    names, swap = bfl_name_to_diffusers(bfl_template.format(i=0) + ".weight")
    return tuple(_BLOCK_INDEX.sub(r"\1.{i}.", name.removesuffix(".weight")) for name in names), swap


@cache
def _rules(underscored: bool) -> tuple[_NameRule, ...]:
    rules = []
    for template, spec in linear_specs().items():
        rules.append(_NameRule(_compile(template, underscored), template, None, False, "bfl"))
        names, swap = diffusers_names(template)
        for index, name in enumerate(names):
            piece = None if len(names) == 1 else (index * spec.out_per_hidden // len(names),
                                                  spec.out_per_hidden // len(names))
            rules.append(_NameRule(_compile(name, underscored), template, piece, swap, "diffusers"))
    for name, template, piece, namespace in _EXTRA_NAMES:
        rules.append(_NameRule(_compile(name, underscored), template, piece, False, namespace))
    return tuple(rules)


# Aliases some exporters write for diffusers prefixes (a truncated "transformer_blocks", FLUX.1's embedder).
_ALIASES = (("sformer_blocks.", "transformer_blocks."), ("time_text_embed.", "time_guidance_embed."))


def resolve(module: str, underscored: bool = False) -> tuple[Target, str] | None:
    """A module path as a LoRA file writes it (prefix already removed) -> (Target, "bfl" | "diffusers")."""
    if not underscored:
        for alias, name in _ALIASES:
            if module.startswith(alias):
                module = name + module[len(alias):]
    for rule in _rules(underscored):
        match = rule.pattern.fullmatch(module)
        if match:
            bfl = rule.bfl_template.format(i=match.group(1) if match.groups() else None)
            spec = linear_specs()[rule.bfl_template]
            return Target(bfl, spec, rule.piece, rule.swap_halves), rule.namespace
    return None


def spec_of(bfl_module: str) -> LinearSpec:
    """The LinearSpec of a concrete BFL module path ("double_blocks.3.img_attn.qkv")."""
    found = resolve(bfl_module)
    if found is None or found[1] != "bfl" or found[0].piece is not None:
        raise KeyError(bfl_module)
    return found[0].spec


def template_of(bfl_module: str) -> tuple[str, str | None]:
    """("double_blocks.{i}.img_attn.qkv", "3") for "double_blocks.3.img_attn.qkv"; (name, None) outside blocks."""
    match = re.match(r"^((?:double|single)_blocks)\.(\d+)\.", bfl_module)
    if match is None:
        return bfl_module, None
    return f"{match.group(1)}.{{i}}.{bfl_module[match.end():]}", match.group(2)
