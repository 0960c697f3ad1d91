"""FLUX.2 VAE names: BFL (`ae.safetensors`, ComfyUI `flux2-vae.safetensors`) <-> diffusers `AutoencoderKLFlux2`.

Differences: diffusers says down_blocks/resnets/downsamplers.0 where BFL says down/block/downsample, numbers the
decoder levels in execution order (BFL numbers them by resolution, so up.{b} <-> up_blocks.{levels-1-b}), keeps
quant_conv/post_quant_conv at the top level, and stores the attention projections as Linear [C,C] where BFL has
1x1 convolutions [C,C,1,1]. Tensors are only reshaped (views for contiguous tensors), so meta tensors convert too.
"""

import re
from collections.abc import Iterable, Mapping

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
_DIFFUSERS_RESNET_LAYERS = {diffusers: bfl for bfl, diffusers in _RESNET_LAYERS.items()}
_DIFFUSERS_ATTENTION_LAYERS = {diffusers: bfl for bfl, diffusers in _ATTENTION_LAYERS.items()}

# Names spelled the same in both layouts.
_SHARED_NAME = re.compile(
    r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)|bn\.(running_mean|running_var|num_batches_tracked)"
)


def is_diffusers_vae(keys: Iterable[str]) -> bool:
    """True for diffusers `AutoencoderKLFlux2` names, False for BFL names."""
    return any(key.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.")) for key in keys)


def bfl_vae_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a BFL VAE state dict to diffusers names; attention projections become [C,C] views."""
    decoder_levels = _count_levels(sd, r"decoder\.up\.(\d+)\.")
    converted = {}
    for name, tensor in sd.items():
        new_name = _bfl_to_diffusers_name(name, decoder_levels)
        if new_name is None:
            raise _unknown_name("BFL", name)
        if re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight", name):
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])
        converted[new_name] = tensor
    return converted


def diffusers_vae_to_bfl(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a diffusers `AutoencoderKLFlux2` state dict to BFL names; attention projections become [C,C,1,1] views."""
    decoder_levels = _count_levels(sd, r"decoder\.up_blocks\.(\d+)\.")
    converted = {}
    for name, tensor in sd.items():
        new_name = _diffusers_to_bfl_name(name, decoder_levels)
        if new_name is None:
            raise _unknown_name("diffusers", name)
        if re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight", name):
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1], 1, 1)
        converted[new_name] = tensor
    return converted


def _count_levels(keys: Iterable[str], pattern: str) -> int:
    regex = re.compile(pattern)
    indices = [int(match[1]) for key in keys if (match := regex.match(key))]
    return max(indices) + 1 if indices else 0


def _unknown_name(layout: str, name: str) -> CheckpointError:
    return CheckpointError(f"VAE state dict: expected only FLUX.2 VAE tensors in {layout} naming, found {name!r}")


def _bfl_to_diffusers_name(name: str, decoder_levels: int) -> str | None:
    if _SHARED_NAME.fullmatch(name):
        return name
    if m := re.fullmatch(r"(encoder|decoder)\.norm_out\.(weight|bias)", name):
        return f"{m[1]}.conv_norm_out.{m[2]}"
    if m := re.fullmatch(r"encoder\.quant_conv\.(weight|bias)", name):
        return f"quant_conv.{m[1]}"
    if m := re.fullmatch(r"decoder\.post_quant_conv\.(weight|bias)", name):
        return f"post_quant_conv.{m[1]}"
    resnet = r"block\.(\d+)\.(\w+)\.(weight|bias)"
    if (m := re.fullmatch(rf"encoder\.down\.(\d+)\.{resnet}", name)) and m[3] in _RESNET_LAYERS:
        return f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_RESNET_LAYERS[m[3]]}.{m[4]}"
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)", name):
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    if (m := re.fullmatch(rf"decoder\.up\.(\d+)\.{resnet}", name)) and m[3] in _RESNET_LAYERS:
        return f"decoder.up_blocks.{decoder_levels - 1 - int(m[1])}.resnets.{m[2]}.{_RESNET_LAYERS[m[3]]}.{m[4]}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)", name):
        return f"decoder.up_blocks.{decoder_levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    if (m := re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(\w+)\.(weight|bias)", name)) and (
        m[3] in _RESNET_LAYERS
    ):
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_RESNET_LAYERS[m[3]]}.{m[4]}"
    if (m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)", name)) and m[2] in _ATTENTION_LAYERS:
        return f"{m[1]}.mid_block.attentions.0.{_ATTENTION_LAYERS[m[2]]}.{m[3]}"
    return None


def _diffusers_to_bfl_name(name: str, decoder_levels: int) -> str | None:
    if _SHARED_NAME.fullmatch(name):
        return name
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(weight|bias)", name):
        return f"{m[1]}.norm_out.{m[2]}"
    if m := re.fullmatch(r"quant_conv\.(weight|bias)", name):
        return f"encoder.quant_conv.{m[1]}"
    if m := re.fullmatch(r"post_quant_conv\.(weight|bias)", name):
        return f"decoder.post_quant_conv.{m[1]}"
    resnet = r"resnets\.(\d+)\.(\w+)\.(weight|bias)"
    if (m := re.fullmatch(rf"encoder\.down_blocks\.(\d+)\.{resnet}", name)) and m[3] in _DIFFUSERS_RESNET_LAYERS:
        return f"encoder.down.{m[1]}.block.{m[2]}.{_DIFFUSERS_RESNET_LAYERS[m[3]]}.{m[4]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", name):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if (m := re.fullmatch(rf"decoder\.up_blocks\.(\d+)\.{resnet}", name)) and m[3] in _DIFFUSERS_RESNET_LAYERS:
        return f"decoder.up.{decoder_levels - 1 - int(m[1])}.block.{m[2]}.{_DIFFUSERS_RESNET_LAYERS[m[3]]}.{m[4]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", name):
        return f"decoder.up.{decoder_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if (m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)\.(weight|bias)", name)) and (
        m[3] in _DIFFUSERS_RESNET_LAYERS
    ):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_DIFFUSERS_RESNET_LAYERS[m[3]]}.{m[4]}"
    attention = r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)"
    if m := re.fullmatch(attention, name):
        return f"{m[1]}.mid.attn_1.{_DIFFUSERS_ATTENTION_LAYERS[m[2]]}.{m[3]}"
    return None
