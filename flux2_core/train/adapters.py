"""Trainable adapters on the DiT's linear layers (peft's LoRA, LoKr, LoHa), and their export as a `Flux2LoRA`.

peft wraps each selected layer (a regex matched in full against BFL module paths, e.g.
`double_blocks.0.img_attn.qkv`) in place, so module names stay BFL names. The adapter weights are kept in fp32
whatever the base's storage (bf16 or fp8): bf16 adapter weights lose small updates. The export reads the peft
factors back into `flux2_core.lora`'s delta types, so saving and converting use the one LoRA writer the
loaders are tested against, with the scale peft applied (alpha / r, or alpha / sqrt(r) for rank-stabilised
LoRA) written as the file's alpha.

`AdapterSet` is the trainable set the trainer drives: parameters, a state dict for training states, and
`to_lora()` for the output file. Full fine-tuning (part 2) provides the same four methods over other weights.
"""

from __future__ import annotations

import warnings
from typing import Iterator

import torch
from torch import nn

from ..checkpoints.quant import Fp8Linear
from ..errors import Flux2Error
from ..lora import Flux2LoRA, Hadamard, Kronecker, LoRAPatch, LowRank
from .config import TrainConfig

ADAPTER_NAME = "default"


def _peft_config(config: TrainConfig):
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    common = {"r": config.network_dim, "target_modules": config.target_modules}
    if config.use_rslora and config.network_type != "lora":
        raise Flux2Error(f"use_rslora: only LoRA has a rank-stabilised scale, found network_type "
                         f"{config.network_type!r}")
    if config.network_type == "lora":
        peft_config = LoraConfig(lora_alpha=config.network_alpha, lora_dropout=config.network_dropout,
                                 use_rslora=config.use_rslora, **common)
    elif config.network_type == "loha":
        peft_config = LoHaConfig(alpha=config.network_alpha, rank_dropout=config.network_dropout, **common)
    else:
        peft_config = LoKrConfig(alpha=config.network_alpha, rank_dropout=config.network_dropout,
                                 decompose_factor=config.lokr_factor, **common)
    if config.network_type == "lora":
        # fp8 base layers (the engine's Fp8Linear) are linears too: peft's LoRA Linear wrapper only calls them.
        # (peft's LoHa / LoKr have no registry for custom layers: fp8_base is refused for them in AdapterSet.)
        from peft.tuners.lora.layer import Linear as LoraLinear
        peft_config._register_custom_module({Fp8Linear: LoraLinear})
    return peft_config


class AdapterSet:
    """peft adapters injected into a DiT; the trainable set of a LoRA / LoKr / LoHa run."""

    def __init__(self, dit: nn.Module, config: TrainConfig):
        from peft import inject_adapter_in_model

        self.dit = dit
        self.algorithm = config.network_type
        dit.requires_grad_(False)
        if config.network_type != "lora" and any(isinstance(m, Fp8Linear) for m in dit.modules()):
            raise Flux2Error(f"network_type {config.network_type!r}: peft's LoHa / LoKr cannot wrap fp8 layers; "
                             "train LoHa / LoKr on a bf16 base (fp8_base = false) or use network_type = 'lora'")
        try:
            with warnings.catch_warnings():
                # peft warns about every layer type it does not know; Fp8Linear is registered on purpose.
                warnings.filterwarnings("ignore", message="Unsupported layer type .*Fp8Linear")
                inject_adapter_in_model(_peft_config(config), dit, adapter_name=ADAPTER_NAME)
        except ValueError as error:
            raise Flux2Error(f"target_modules {config.target_modules!r}: {error}") from None
        self.layers = {name: module for name, module in dit.named_modules() if _is_adapter_layer(module)}
        if not self.layers:
            raise Flux2Error(f"target_modules {config.target_modules!r} selects no linear layer of the DiT")
        for param in self.parameters():
            param.data = param.data.float()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((name, param) for name, param in self.dit.named_parameters() if param.requires_grad)

    def parameters(self) -> Iterator[nn.Parameter]:
        return (param for _, param in self.named_parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: param.detach().clone() for name, param in self.named_parameters()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        if set(params) != set(tensors):
            missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
            raise Flux2Error(f"training state: adapter weights do not match this run's adapters "
                             f"(missing {missing[:3]}, unexpected {extra[:3]})")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(tensors[name])

    def start_from(self, lora: Flux2LoRA) -> None:
        """Continue training `lora`: its up / down factors become the adapters' lora_B / lora_A, the up factor
        rescaled so that peft's scale times it equals the file's alpha / rank times it (the LoRA's change is
        kept exactly). Layers it has no patch for keep their fresh start (up = 0: no change)."""
        if self.algorithm != "lora":
            raise Flux2Error(f"{lora.name}: continuing a LoRA needs network_type 'lora', found {self.algorithm!r}")
        with torch.no_grad():
            for patch in lora.patches:
                layer = self.layers.get(patch.module)
                if not isinstance(patch.delta, LowRank) or patch.rows is not None or layer is None:
                    raise Flux2Error(f"{lora.name}: {patch.source}: expected a plain LoRA (up / down) on a whole "
                                     f"trained layer, found {patch.delta.algorithm} on "
                                     f"{patch.module if patch.rows is None else f'rows {patch.rows} of {patch.module}'}"
                                     f"{'' if layer is not None else ' (not a trained layer)'}")
                down, up = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
                if tuple(patch.delta.down.shape) != tuple(down.shape) or tuple(patch.delta.up.shape) != tuple(up.shape):
                    raise Flux2Error(f"{lora.name}: {patch.source}: expected up {tuple(up.shape)} and down "
                                     f"{tuple(down.shape)}, found {tuple(patch.delta.up.shape)} and "
                                     f"{tuple(patch.delta.down.shape)}")
                down.copy_(patch.delta.down)
                up.copy_(patch.delta.up.float() * (patch.scale / float(layer.scaling[ADAPTER_NAME])))

    def to_lora(self, name: str, metadata: dict[str, str]) -> Flux2LoRA:
        patches = [_patch(module_name, layer) for module_name, layer in self.layers.items()]
        return Flux2LoRA(name=name, dialect="bfl", patches=tuple(patches), hidden_size=self.dit.config.hidden_size,
                         metadata=metadata)


def _is_adapter_layer(module: nn.Module) -> bool:
    return any(hasattr(module, attr) for attr in ("lora_A", "hada_w1_a", "lokr_w1", "lokr_w1_a")) and \
        hasattr(module, "base_layer")


def _factor(layer: nn.Module, name: str) -> torch.Tensor | None:
    container = getattr(layer, name, None)
    if container is None or ADAPTER_NAME not in container:
        return None
    value = container[ADAPTER_NAME]
    return (value.weight if isinstance(value, nn.Module) else value).detach().float().cpu().clone()


def _patch(module: str, layer: nn.Module) -> LoRAPatch:
    """One peft layer as a LoRA patch whose `scale` equals peft's scaling."""
    scaling = float(layer.scaling[ADAPTER_NAME])
    if hasattr(layer, "lora_A"):
        delta = LowRank(up=_factor(layer, "lora_B"), down=_factor(layer, "lora_A"))
    elif hasattr(layer, "hada_w1_a"):
        delta = Hadamard(*(_factor(layer, f"hada_{n}") for n in ("w1_a", "w1_b", "w2_a", "w2_b")))
    else:
        delta = Kronecker(**{n: _factor(layer, f"lokr_{n}") for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")})
    if delta.rank is None:
        # A LoKr without factored pairs has no rank to divide an alpha by: the scale goes into the weights.
        return LoRAPatch(module, None, delta.scaled(scaling), None, module)
    return LoRAPatch(module, None, delta, scaling * delta.rank, module)
