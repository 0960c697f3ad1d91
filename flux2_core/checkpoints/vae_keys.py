"""FLUX.2 VAE names: BFL (`ae.safetensors`, ComfyUI `flux2-vae.safetensors`) <-> diffusers `AutoencoderKLFlux2`.

Differences: diffusers says down_blocks/resnets/downsamplers.0 where BFL says down/block/downsample, numbers the
decoder levels in execution order (BFL numbers them by resolution, so up.{b} <-> up_blocks.{levels-1-b}), keeps
quant_conv/post_quant_conv at the top level, and stores the attention projections as Linear [C,C] where BFL has
1x1 convolutions [C,C,1,1]. Tensors are only reshaped (views for contiguous tensors), so meta tensors convert too.
"""

import re
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

from torch import Tensor

from ..errors import CheckpointError

# Layer names inside a ResNet block and inside the attention block, BFL -> diffusers.
_RESNET_LAYERS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}
_ATTENTION_LAYERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}

# Names spelled the same in both layouts.
_SHARED_NAME = re.compile(
    r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)|bn\.(running_mean|running_var|num_batches_tracked)"
)

_BFL, _DIFFUSERS = 0, 1  # index of a layout in the pairs below
_LAYOUT_NAMES = ("BFL", "diffusers")


class _Field(NamedTuple):
    """A variable part of a name: its pattern in each layout and how a value moves to the other layout."""

    patterns: tuple[str, str]
    convert: Callable[[str, int, int], str]  # (value, target layout, decoder levels) -> value


def _same(value: str, target: int, decoder_levels: int) -> str:
    return value


def _renamed(table: Mapping[str, str]) -> _Field:
    inverse = {diffusers: bfl for bfl, diffusers in table.items()}
    return _Field(("|".join(map(re.escape, table)), "|".join(map(re.escape, inverse))),
                  lambda value, target, levels: table[value] if target == _DIFFUSERS else inverse[value])


_FIELDS = {
    "side": _Field(("encoder|decoder", "encoder|decoder"), _same),
    "p": _Field(("weight|bias", "weight|bias"), _same),
    "level": _Field((r"\d+", r"\d+"), _same),
    "i": _Field((r"\d+", r"\d+"), _same),
    # Decoder levels: BFL numbers them by resolution, diffusers in execution order.
    "up": _Field((r"\d+", r"\d+"), lambda value, target, levels: str(levels - 1 - int(value))),
    # Mid-block ResNets: BFL block_1/block_2, diffusers resnets.0/resnets.1.
    "mid": _Field(("[12]", "[01]"), lambda value, target, levels: str(int(value) + (1 if target == _BFL else -1))),
    "resnet": _renamed(_RESNET_LAYERS),
    "attn": _renamed(_ATTENTION_LAYERS),
}

# The same tensor in both layouts, (BFL, diffusers); {field} stands for a `_FIELDS` entry.
_RULES = [
    ("{side}.norm_out.{p}", "{side}.conv_norm_out.{p}"),
    ("encoder.quant_conv.{p}", "quant_conv.{p}"),
    ("decoder.post_quant_conv.{p}", "post_quant_conv.{p}"),
    ("encoder.down.{level}.block.{i}.{resnet}.{p}", "encoder.down_blocks.{level}.resnets.{i}.{resnet}.{p}"),
    ("encoder.down.{level}.downsample.conv.{p}", "encoder.down_blocks.{level}.downsamplers.0.conv.{p}"),
    ("decoder.up.{up}.block.{i}.{resnet}.{p}", "decoder.up_blocks.{up}.resnets.{i}.{resnet}.{p}"),
    ("decoder.up.{up}.upsample.conv.{p}", "decoder.up_blocks.{up}.upsamplers.0.conv.{p}"),
    ("{side}.mid.block_{mid}.{resnet}.{p}", "{side}.mid_block.resnets.{mid}.{resnet}.{p}"),
    ("{side}.mid.attn_1.{attn}.{p}", "{side}.mid_block.attentions.0.{attn}.{p}"),
]
_FIELD_REF = re.compile(r"\{(\w+)\}")


def _template_pattern(template: str, layout: int) -> re.Pattern:
    pattern = ""
    for index, part in enumerate(_FIELD_REF.split(template)):  # literal, field, literal, ..., literal
        pattern += f"(?P<{part}>{_FIELDS[part].patterns[layout]})" if index % 2 else re.escape(part)
    return re.compile(pattern)


_COMPILED_RULES = [
    tuple((_template_pattern(templates[layout], layout), templates[1 - layout]) for layout in (_BFL, _DIFFUSERS))
    for templates in _RULES
]
# Where a decoder level is numbered, and the attention projections (1x1 convolutions in BFL, Linear in diffusers).
_DECODER_LEVEL = (re.compile(r"decoder\.up\.(\d+)\."), re.compile(r"decoder\.up_blocks\.(\d+)\."))
_ATTENTION_WEIGHT = (
    re.compile(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight"),
    re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight"),
)


def is_diffusers_vae(keys: Iterable[str]) -> bool:
    """True for diffusers `AutoencoderKLFlux2` names, False for BFL names."""
    return any(key.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.")) for key in keys)


def bfl_vae_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a BFL VAE state dict to diffusers names; attention projections become [C,C] views."""
    return _convert(sd, _BFL)


def diffusers_vae_to_bfl(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a diffusers `AutoencoderKLFlux2` state dict to BFL names; attention projections become [C,C,1,1] views."""
    return _convert(sd, _DIFFUSERS)


def _convert(sd: Mapping[str, Tensor], source: int) -> dict[str, Tensor]:
    decoder_levels = _count_levels(sd, _DECODER_LEVEL[source])
    converted = {}
    for name, tensor in sd.items():
        new_name = _rename(name, source, decoder_levels)
        if new_name is None:
            raise _unknown_name(_LAYOUT_NAMES[source], name)
        if _ATTENTION_WEIGHT[source].fullmatch(name):
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1], *((1, 1) if source == _DIFFUSERS else ()))
        converted[new_name] = tensor
    return converted


def _count_levels(keys: Iterable[str], regex: re.Pattern) -> int:
    indices = [int(match[1]) for key in keys if (match := regex.match(key))]
    return max(indices) + 1 if indices else 0


def _unknown_name(layout: str, name: str) -> CheckpointError:
    return CheckpointError(f"VAE state dict: expected only FLUX.2 VAE tensors in {layout} naming, found {name!r}")


def _rename(name: str, source: int, decoder_levels: int) -> str | None:
    """`name` in the other layout, or None where it is no FLUX.2 VAE tensor name."""
    if _SHARED_NAME.fullmatch(name):
        return name
    target = 1 - source
    for rule in _COMPILED_RULES:
        pattern, target_template = rule[source]
        if match := pattern.fullmatch(name):
            return target_template.format(**{
                field: _FIELDS[field].convert(value, target, decoder_levels)
                for field, value in match.groupdict().items()
            })
    return None
