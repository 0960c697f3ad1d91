"""LoRA for the text encoder: the CLIP part of a LoRA file (ComfyUI's LoraLoader strength_clip).

Text-encoder tensors are recognised by their key prefix (kohya `lora_te_` / `lora_te1_`, diffusers / PEFT
`text_encoder.`, ComfyUI `text_encoders.`), with kohya (`lora_down` / `lora_up` / `alpha`) or PEFT (`lora_A` /
`lora_B`) suffixes. The rest of a key names a linear layer of the transformers model, dotted or with underscores,
possibly under extra leading parts (`model.`, `qwen3_4b.transformer.model.`); it is matched against the end of the
model's own linear-layer names. The delta is applied on the fly (forward hooks, `x @ down.T @ up.T * alpha / rank *
strength`), so the shared text encoder's weights are never written. Layers FLUX.2 never runs (those after the last
tapped hidden state) are ignored; keys that match no layer at all are logged once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from ..checkpoints.reader import open_checkpoint

log = logging.getLogger(__name__)

TEXT_ENCODER_PREFIXES = ("lora_te1_", "lora_te2_", "lora_te_", "text_encoders.", "text_encoder.")
_SUFFIXES = {".lora_down.weight": "down", ".lora_A.weight": "down", ".lora_up.weight": "up",
             ".lora_B.weight": "up", ".alpha": "alpha"}


def text_encoder_keys(keys: Sequence[str]) -> list[str]:
    """The keys of a LoRA file that belong to a text encoder."""
    return [key for key in keys if key.startswith(TEXT_ENCODER_PREFIXES)]


@dataclasses.dataclass(frozen=True)
class LayerPatch:
    down: torch.Tensor  # [rank, in]
    up: torch.Tensor  # [out, rank]
    scale: float  # alpha / rank (1 without alpha)


def _split(key: str) -> tuple[str, str] | None:
    """(layer stem without the text-encoder prefix, "down" / "up" / "alpha"), or None for other tensors."""
    prefix = next((p for p in TEXT_ENCODER_PREFIXES if key.startswith(p)), None)
    suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
    if prefix is None or suffix is None:
        return None
    return key[len(prefix):-len(suffix)], _SUFFIXES[suffix]


def _match_layer(stem: str, layers: Mapping[str, nn.Module]) -> str | None:
    """The longest linear-layer name the stem ends with (dotted, or with underscores for kohya names)."""
    best = None
    for name in layers:
        for form, separator in ((name, "."), (name.replace(".", "_"), "_")):
            if (stem == form or stem.endswith(separator + form)) and (best is None or len(name) > len(best)):
                best = name
    return best


def text_encoder_patches(tensors: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, LayerPatch]:
    """The text-encoder part of a LoRA state dict as patches for `model`'s linear layers, by module name."""
    layers = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        split = _split(key)
        if split is not None:
            parts.setdefault(split[0], {})[split[1]] = tensor
    patches, unmatched = {}, []
    for stem, found in parts.items():
        if "down" not in found or "up" not in found:
            continue
        layer = _match_layer(stem, layers)
        if layer is None:
            unmatched.append(stem)
            continue
        rank = found["down"].shape[0]
        scale = float(found["alpha"]) / rank if "alpha" in found else 1.0
        patches[layer] = LayerPatch(found["down"].float(), found["up"].float(), scale)
    if unmatched:
        log.warning("text-encoder LoRA: %d layer(s) match no layer this text encoder runs (e.g. %s); ignored",
                    len(unmatched), unmatched[0])
    return patches


def _delta_hook(patch: LayerPatch, strength: float):
    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        down, up = patch.down.to(x.device, x.dtype), patch.up.to(x.device, x.dtype)
        return output + (x @ down.T @ up.T) * (patch.scale * strength)
    return hook


@contextlib.contextmanager
def text_encoder_loras_applied(model: nn.Module, loras: Sequence[tuple[Mapping[str, LayerPatch], float]]
                               ) -> Iterator[None]:
    """`model` with the LoRA patches (each with its strength) added to its linear layers' outputs, removed on exit."""
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(_delta_hook(patch, strength))
               for patches, strength in loras for name, patch in patches.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class LoRATextEncoder:
    """A text encoder (CLIP socket) with text-encoder LoRAs applied while it encodes; everything else (kind,
    output_dim, to, offload, ...) is the wrapped encoder's."""

    def __init__(self, base, loras: Sequence[tuple[Mapping[str, LayerPatch], float]] = ()):
        self.base = base.base if isinstance(base, LoRATextEncoder) else base
        self.loras = (*(base.loras if isinstance(base, LoRATextEncoder) else ()), *loras)

    def with_lora_file(self, path: str, strength: float) -> LoRATextEncoder:
        source = open_checkpoint(path)
        tensors = {key: source.get(key) for key in text_encoder_keys(list(source.keys()))}
        return LoRATextEncoder(self, [(text_encoder_patches(tensors, self.base.model), strength)])

    def encode(self, prompts: str | list[str]) -> torch.Tensor:
        with text_encoder_loras_applied(self.base.model, self.loras):
            return self.base.encode(prompts)

    def __getattr__(self, name: str):
        return getattr(self.base, name)
