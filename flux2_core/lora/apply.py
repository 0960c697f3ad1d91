"""Putting LoRAs into a DiT: merged into the weights, or on the fly through forward hooks.

Both take a list of (LoRA or path, strength); each LoRA adds strength * scale * delta to the rows of the BFL
weight its patches name. A LoRA listed twice (same content, whatever the file) takes effect once, with the
last strength given, and a LoRA already in effect on a DiT is not applied to it again.

- `attach_loras` hooks the patched linear layers: out[..., rows] += strength * scale * delta(x). The weights
  are never touched, so it works the same for `nn.Linear`, `Fp8Linear`, `GGUFLinear` and weights that move between devices,
  and switching LoRAs or strengths is instant.
- `merge_loras` adds the deltas to the weights (computed in fp32, rounded once to the weight's dtype; fp8
  weights are dequantized, merged and re-quantized with a fresh scale). `unmerge` restores the original
  bytes it kept (exact), or, with keep_original=False, subtracts the same deltas again (fp32 exact up to
  rounding, bf16 within one ulp of the merged value, fp8 re-quantized).
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..checkpoints.gguf import GGUFLinear
from ..checkpoints.quant import Fp8Linear, quantize_weight
from ..dit import Flux2DiT
from ..errors import IncompatibleModelsError
from .deltas import Delta
from .dialects import Flux2LoRA, LoRAPatch, family_of_width, load_lora

log = logging.getLogger(__name__)

LoRAEntry = tuple[Flux2LoRA | str | os.PathLike, float]

# DiT -> fingerprints of the LoRAs in effect on it (merged or attached).
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()


def prepare_loras(loras: Iterable[LoRAEntry]) -> list[tuple[Flux2LoRA, float]]:
    """Load paths and keep each LoRA once (by content), at its first place with its last strength."""
    chosen: dict[str, tuple[Flux2LoRA, float]] = {}
    for item, strength in loras:
        lora = item if isinstance(item, Flux2LoRA) else load_lora(item)
        if lora.fingerprint in chosen:
            log.warning("LoRA %s is listed more than once (same content as %s); applying it once with "
                            "strength %g", lora.name, chosen[lora.fingerprint][0].name, strength)
        chosen[lora.fingerprint] = (chosen.get(lora.fingerprint, (lora,))[0], float(strength))
    return list(chosen.values())


@dataclass
class _LayerPlan:
    """Everything one linear layer receives: (patch, strength * scale) from every LoRA, in order."""

    module: nn.Module
    entries: list[tuple[LoRAPatch, float]] = field(default_factory=list)

    def total_delta(self) -> Tensor:
        """The summed dense delta in fp32, on the weight's device."""
        weight = self.module.weight
        total = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for patch, multiplier in self.entries:
            rows = slice(*patch.rows) if patch.rows else slice(None)
            total[rows] += multiplier * patch.delta.to(weight.device, torch.float32).matrix()
        return total


def _plan(dit: Flux2DiT, loras: Iterable[LoRAEntry]) -> tuple[dict[str, _LayerPlan], list[str]]:
    """Check every LoRA fits the DiT and group their patches by layer; also the fingerprints applied."""
    plans: dict[str, _LayerPlan] = {}
    fingerprints = []
    active = _ACTIVE.get(dit, set())
    for lora, strength in prepare_loras(loras):
        if lora.fingerprint in active or lora.fingerprint in fingerprints:
            log.warning("LoRA %s is already in effect on this model; not applying it again", lora.name)
            continue
        if strength == 0.0:
            continue
        check_lora_fits(dit, lora)
        fingerprints.append(lora.fingerprint)
        for patch in lora.patches:
            plan = plans.setdefault(patch.module, _LayerPlan(dit.get_submodule(patch.module)))
            plan.entries.append((patch, strength * patch.scale))
    return plans, fingerprints


def check_lora_fits(dit: Flux2DiT, lora: Flux2LoRA) -> None:
    """IncompatibleModelsError naming the LoRA, the layer and both widths when `lora` cannot patch `dit`."""
    config = dit.config
    if lora.hidden_size != config.hidden_size:
        raise IncompatibleModelsError(
            f"{lora.name}: this LoRA is for a FLUX.2 DiT of width {lora.hidden_size} ({family_of_width(lora.hidden_size)}), "
            f"but the model's width is {config.hidden_size} ({family_of_width(config.hidden_size)}): expected a LoRA "
            f"of width {config.hidden_size}")
    for module_name, patches in lora.targets.items():
        try:
            layer = dit.get_submodule(module_name)
        except AttributeError:
            raise IncompatibleModelsError(
                f"{lora.name}: targets {module_name}, which this DiT does not have ({config.depth_double} double and "
                f"{config.depth_single} single blocks, guidance embedding: {config.guidance_embed})") from None
        for patch in patches:
            out, inputs = patch.delta.shape
            start, stop = patch.rows or (0, layer.out_features)
            if inputs != layer.in_features or out != stop - start or stop > layer.out_features:
                raise IncompatibleModelsError(
                    f"{lora.name}: {patch.source} is a [{out}, {inputs}] change at rows {start}:{stop}, but "
                    f"{module_name} is [{layer.out_features}, {layer.in_features}] in this model")


def _register(dit: nn.Module, fingerprints: list[str]) -> None:
    _ACTIVE.setdefault(dit, set()).update(fingerprints)


def _unregister(dit: nn.Module, fingerprints: list[str]) -> None:
    _ACTIVE.get(dit, set()).difference_update(fingerprints)


class _Hook:
    """The forward hook of one layer: adds each patch's update to its rows of the layer's output."""

    def __init__(self, entries: list[tuple[LoRAPatch, float]]):
        self.entries = entries
        self._deltas: dict[tuple[torch.device, torch.dtype], list[Delta]] = {}

    def deltas(self, device: torch.device, dtype: torch.dtype) -> list[Delta]:
        key = (device, dtype)
        if key not in self._deltas:
            self._deltas[key] = [patch.delta.to(device, dtype) for patch, _ in self.entries]
        return self._deltas[key]

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        x = args[0]
        for (patch, multiplier), delta in zip(self.entries, self.deltas(x.device, x.dtype)):
            update = delta.apply(x).mul_(multiplier).to(output.dtype)
            if patch.rows is None:
                output += update
            else:
                output[..., patch.rows[0]:patch.rows[1]] += update
        return output


class AttachedLoRAs:
    """LoRAs running on the fly on a DiT; `detach()` (or leaving the `with` block) removes them."""

    def __init__(self, dit: Flux2DiT, loras: Iterable[LoRAEntry]):
        self.dit = dit
        plans, self.fingerprints = _plan(dit, loras)
        self._handles = [plan.module.register_forward_hook(_Hook(plan.entries)) for plan in plans.values()]
        self.layers = len(plans)
        _register(dit, self.fingerprints)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        _unregister(self.dit, self.fingerprints)

    def __enter__(self) -> AttachedLoRAs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


def attach_loras(dit: Flux2DiT, loras: Iterable[LoRAEntry]) -> AttachedLoRAs:
    """Run `loras` [(LoRA or path, strength), ...] on the fly on `dit` until `.detach()`."""
    return AttachedLoRAs(dit, loras)


def _add_to_weight(module: nn.Module, delta: Tensor) -> None:
    if isinstance(module, Fp8Linear):
        merged = module.dequantized_weight(torch.float32) + delta
        weight, scale = quantize_weight(merged, module.weight.dtype, per_channel=module.weight_scale.dim() > 0)
        module.weight.data.copy_(weight)
        module.weight_scale.copy_(scale)
    else:
        weight = module.weight.data
        weight.copy_((weight.float() + delta).to(weight.dtype))


@dataclass
class _Original:
    """The bytes of a layer before merging, kept on the CPU."""

    weight: Tensor
    scale: Tensor | None

    @classmethod
    def of(cls, module: nn.Module) -> _Original:
        scale = module.weight_scale.to("cpu", copy=True) if isinstance(module, Fp8Linear) else None
        return cls(module.weight.data.to("cpu", copy=True), scale)

    def restore(self, module: nn.Module) -> None:
        module.weight.data.copy_(self.weight)
        if self.scale is not None:
            module.weight_scale.copy_(self.scale)


class MergedLoRAs:
    """LoRAs merged into a DiT's weights; `unmerge()` (or leaving the `with` block) takes them out."""

    def __init__(self, dit: Flux2DiT, loras: Iterable[LoRAEntry], keep_original: bool = True):
        self.dit = dit
        self._plans, self.fingerprints = _plan(dit, loras)
        quantized = [name for name, plan in self._plans.items() if isinstance(plan.module, GGUFLinear)]
        if quantized:
            raise IncompatibleModelsError(f"{quantized[0]} keeps GGUF-quantized weights, which a LoRA cannot be "
                                          f"merged into; expected attach_loras (on the fly) for a GGUF model")
        self._originals: dict[str, _Original] = {}
        with torch.no_grad():
            for name, plan in self._plans.items():
                if keep_original:
                    self._originals[name] = _Original.of(plan.module)
                _add_to_weight(plan.module, plan.total_delta())
        self.layers = len(self._plans)
        _register(dit, self.fingerprints)

    def unmerge(self) -> None:
        with torch.no_grad():
            for name, plan in self._plans.items():
                if name in self._originals:
                    self._originals[name].restore(plan.module)
                else:
                    _add_to_weight(plan.module, plan.total_delta().neg_())
        self._plans, self._originals = {}, {}
        _unregister(self.dit, self.fingerprints)

    def __enter__(self) -> MergedLoRAs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmerge()


def merge_loras(dit: Flux2DiT, loras: Iterable[LoRAEntry], keep_original: bool = True) -> MergedLoRAs:
    """Merge `loras` [(LoRA or path, strength), ...] into `dit`'s weights until `.unmerge()`.

    keep_original: keep a CPU copy of every changed weight so unmerging restores it bit for bit; without it,
    unmerging subtracts the deltas (no extra memory, rounding as described in the module docstring).
    """
    return MergedLoRAs(dit, loras, keep_original)
