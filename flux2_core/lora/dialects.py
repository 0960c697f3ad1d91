"""Reading LoRA files of every tool into one form: per BFL linear layer, a list of patches.

A key is `<prefix><module><parameter>`. The prefix tells the dialect, the module resolves through
`names.resolve` to a BFL layer (and row band for split q/k/v names), the parameter tells the algorithm:

| dialect    | prefix                   | module names            | parameters                                   |
|------------|--------------------------|-------------------------|----------------------------------------------|
| kohya      | `lora_unet_`             | BFL, dots -> underscores | lora_down / lora_up / alpha, LyCORIS hada_* / lokr_* |
| lycoris    | `lycoris_`               | diffusers, underscores  | (SimpleTuner) LyCORIS or LoRA parameters      |
| onetrainer | `lora_transformer_`      | diffusers, underscores  | lora_down / lora_up / alpha                   |
| diffusers  | `transformer.`           | diffusers               | lora_A / lora_B, alpha in PEFT metadata or none |
| peft       | `base_model.model.`      | diffusers               | lora_A[.adapter] / lora_B[.adapter]           |
| bfl        | `diffusion_model.`, none | BFL (ai-toolkit, ComfyUI) | lora_A / lora_B or lora_down / lora_up (+ alpha) |
| diffsynth  | none                     | diffusers               | lora_A[.default] / lora_B[.default], no alpha |

Scale: alpha / rank with alpha from `<module>.alpha`, else from PEFT's `lora_adapter_metadata`, else 1.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from ..checkpoints.reader import open_checkpoint
from ..errors import CheckpointError
from ..variants import FULL_SIZE_DIT
from .deltas import Delta, Hadamard, Kronecker, LowRank
from .names import Target, resolve

log = logging.getLogger(__name__)

DIALECT_DESCRIPTIONS = {
    "kohya": "kohya / musubi-tuner (lora_unet_*)",
    "lycoris": "LyCORIS / SimpleTuner (lycoris_*)",
    "onetrainer": "OneTrainer (lora_transformer_*)",
    "diffusers": "diffusers (transformer.*)",
    "peft": "PEFT (base_model.model.*)",
    "bfl": "BFL names (ai-toolkit, ComfyUI: diffusion_model.*)",
    "diffsynth": "DiffSynth-Studio (unprefixed diffusers names)",
}

# (prefix, dialect, module names use underscores); the unprefixed entry comes last.
_PREFIXES = (
    ("lora_unet_", "kohya", True),
    ("lycoris_", "lycoris", True),
    ("lora_transformer_", "onetrainer", True),
    ("base_model.model.", "peft", False),
    ("model.diffusion_model.", "bfl", False),
    ("diffusion_model.", "bfl", False),
    ("transformer.", "diffusers", False),
    ("", "", False),
)

# Parameter suffix -> role. The optional segment after lora_A/lora_B is a PEFT adapter name (".default").
_PARAMETERS = (
    (re.compile(r"\.lora_(?:down|A)(?:\.[^.]+)?\.weight$"), "down"),
    (re.compile(r"\.lora_(?:up|B)(?:\.[^.]+)?\.weight$"), "up"),
    (re.compile(r"\.lora\.down\.weight$"), "down"),
    (re.compile(r"\.lora\.up\.weight$"), "up"),
    (re.compile(r"\.lora_A$"), "down"),
    (re.compile(r"\.lora_B$"), "up"),
    (re.compile(r"\.(alpha|dora_scale|lora_mid\.weight|hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?|lokr_t2)$"),
     None),
)

# Parameters of adapter forms whose math this runtime does not implement: refusing beats a wrong image.
_UNSUPPORTED = {
    "dora_scale": "DoRA (weight-decomposed LoRA)",
    "lora_mid.weight": "LoCon with a Tucker middle factor",
    "hada_t1": "LoHa with Tucker factors (hada_t1/hada_t2)",
    "hada_t2": "LoHa with Tucker factors (hada_t1/hada_t2)",
    "lokr_t2": "LoKr with a Tucker factor (lokr_t2)",
}

# Layers only FLUX.1 has (per-block modulation, pooled text vector, FLUX.1 diffusers MLP/norm names).
_FLUX1_LAYER = re.compile(r"img_mod|txt_mod|vector_in|text_embedder|norm1_context|norm1[._]linear|"
                          r"ff(?:_context)?[._]net|single_blocks[._]\d+[._]modulation|"
                          r"single_transformer_blocks[._]\d+[._]norm[._]linear")

_WIDTH_NAMES = {config.hidden_size: name for name, config in FULL_SIZE_DIT.items()}
_MAX_LISTED_KEYS = 50


@dataclass(frozen=True, eq=False)
class LoRAPatch:
    """One adapter on one BFL linear layer: weight[rows] += strength * scale * delta."""

    module: str  # BFL module path, e.g. "double_blocks.0.img_attn.qkv"
    rows: tuple[int, int] | None  # the band of output rows the delta covers; None: all rows
    delta: Delta
    alpha: float | None  # as the file stores it (None: absent, scale 1)
    source: str  # the module name as the file writes it, for messages

    @property
    def scale(self) -> float:
        rank = self.delta.rank
        return 1.0 if self.alpha is None or not rank else self.alpha / rank


@dataclass(frozen=True, eq=False)
class Flux2LoRA:
    """A LoRA for the FLUX.2 DiT, whatever tool wrote it, in BFL terms."""

    name: str  # the file path, or a label for an in-memory state dict
    dialect: str  # a key of DIALECT_DESCRIPTIONS
    patches: tuple[LoRAPatch, ...]
    hidden_size: int  # the DiT width it was trained for
    metadata: Mapping[str, str] = field(default_factory=dict)
    unmatched_keys: tuple[str, ...] = ()

    @property
    def algorithm(self) -> str:
        """"lora", "loha", "lokr", or several joined by "+"."""
        return "+".join(sorted({patch.delta.algorithm for patch in self.patches}))

    @property
    def targets(self) -> dict[str, tuple[LoRAPatch, ...]]:
        """BFL module path -> its patches (several for split q/k/v names of one fused weight)."""
        grouped: dict[str, list[LoRAPatch]] = {}
        for patch in self.patches:
            grouped.setdefault(patch.module, []).append(patch)
        return {module: tuple(patches) for module, patches in grouped.items()}

    @property
    def ranks(self) -> dict[int, int]:
        """rank -> number of patches with it (LoKr patches without a factored pair have no rank)."""
        return dict(Counter(p.delta.rank for p in self.patches if p.delta.rank is not None).most_common())

    @property
    def rank(self) -> int | None:
        """The most common rank."""
        return next(iter(self.ranks), None)

    @property
    def alpha(self) -> float | None:
        """The most common stored alpha (None when the file stores none: scale 1)."""
        alphas = Counter(p.alpha for p in self.patches if p.alpha is not None)
        return alphas.most_common(1)[0][0] if alphas else None

    @property
    def model_family(self) -> str:
        return family_of_width(self.hidden_size)

    @cached_property
    def fingerprint(self) -> str:
        """A digest of what the LoRA does (targets, rows, alphas, factors), for applying a LoRA only once."""
        digest = hashlib.sha256()
        for patch in self.patches:
            digest.update(f"{patch.module}|{patch.rows}|{patch.delta.algorithm}|{patch.alpha}".encode())
            for tensor in patch.delta.tensors():
                digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
                digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


def family_of_width(hidden_size: int) -> str:
    """The FLUX.2 model a DiT width belongs to ("klein-4b", "klein-9b", "dev"), or "custom"."""
    return _WIDTH_NAMES.get(hidden_size, "custom")


def load_lora(path: str | os.PathLike) -> Flux2LoRA:
    """Read a LoRA file (.safetensors) of any supported dialect."""
    with open_checkpoint(path) as source:
        tensors = {key: source.get(key) for key in source.keys()}
        metadata = dict(source.metadata)
    return lora_from_state_dict(tensors, metadata, name=str(path))


def lora_from_state_dict(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None,
                         name: str = "<state dict>") -> Flux2LoRA:
    """Interpret LoRA tensors (and their safetensors metadata) as a FLUX.2 LoRA; `name` appears in errors."""
    metadata = dict(metadata or {})
    groups, unmatched = _group_keys(tensors, name)
    peft_config = _peft_config(metadata, name)

    found: list[_Found] = []
    dialects: Counter[str] = Counter()
    for written, group in groups.items():
        resolved = resolve(group.module, group.underscored)
        if resolved is None or set(group.tensors) == {"alpha"}:
            unmatched.extend(group.keys)
            continue
        target, namespace = resolved
        dialects[_dialect(group, namespace)] += 1
        found.append(_found(target, written, group, peft_config, name))

    flux1 = [key for key in unmatched if _FLUX1_LAYER.search(key)]
    if flux1:
        raise CheckpointError(f"{name}: this is a FLUX.1 LoRA (it targets {flux1[0]!r}, a layer FLUX.2 does not "
                              "have); FLUX.1 LoRAs do not work on FLUX.2 models")
    if not found:
        raise CheckpointError(f"{name}: expected LoRA weights for FLUX.2 DiT layers, found none among "
                              f"{len(tensors)} tensors (first: {sorted(tensors)[:3]}); it may be a LoRA for "
                              "another model (SD, SDXL, FLUX.1) or for a text encoder only")
    widths = Counter(_hidden_size(item, name) for item in found)
    if len(widths) > 1:
        raise CheckpointError(f"{name}: expected every layer to belong to one DiT width, found widths "
                              f"{dict(widths)} (hidden size -> layers)")
    hidden = next(iter(widths))
    if unmatched:
        listed = sorted(unmatched)[:_MAX_LISTED_KEYS]
        more = len(unmatched) - len(listed)
        log.warning("%s: %d LoRA key(s) match no FLUX.2 DiT layer and are not applied: %s%s", name,
                        len(unmatched), ", ".join(listed), f" ... and {more} more" if more else "")
    return Flux2LoRA(name=name, dialect=dialects.most_common(1)[0][0],
                     patches=tuple(item.patch(hidden) for item in found), hidden_size=hidden,
                     metadata=metadata, unmatched_keys=tuple(sorted(unmatched)))


def dialect_of_keys(keys: Iterable[str]) -> str | None:
    """A LoRA file's dialect from its tensor names alone; None when no name is a FLUX.2 DiT layer."""
    groups, _ = _group_keys(dict.fromkeys(keys), "<keys>")
    dialects = Counter(_dialect(group, resolved[1]) for group in groups.values()
                       if (resolved := resolve(group.module, group.underscored)) is not None)
    return dialects.most_common(1)[0][0] if dialects else None


@dataclass
class _Group:
    """The tensors of one module as the file writes it."""

    dialect: str  # "" when the name has no prefix: the namespace decides
    module: str  # without the dialect prefix
    underscored: bool
    tensors: dict[str, Tensor] = field(default_factory=dict)  # role ("down", "up", "alpha", "hada_w1_a", ...)
    keys: list[str] = field(default_factory=list)


def _dialect(group: _Group, namespace: str) -> str:
    # Unprefixed names: diffusers names are DiffSynth-Studio's files, BFL names bare ai-toolkit/ComfyUI ones.
    return group.dialect or ("diffsynth" if namespace == "diffusers" else "bfl")


def _split_key(key: str) -> tuple[str, str] | None:
    for pattern, role in _PARAMETERS:
        match = pattern.search(key)
        if match:
            return key[:match.start()], role or match.group(1)
    return None


def _group_keys(tensors: Mapping[str, Tensor], name: str) -> tuple[dict[str, _Group], list[str]]:
    """Module as written -> its group; plus the keys that are no LoRA parameter at all."""
    groups: dict[str, _Group] = {}
    unparsed = []
    for key, tensor in tensors.items():
        split = _split_key(key)
        if split is None:
            unparsed.append(key)
            continue
        written, role = split
        prefix, dialect, underscored = next(entry for entry in _PREFIXES if written.startswith(entry[0]))
        module = written[len(prefix):]
        if not underscored:
            # Some exporters stack a second prefix ("base_model.model.transformer.").
            module = next((module[len(p):] for p, _, u in _PREFIXES[:-1] if not u and module.startswith(p)), module)
        group = groups.setdefault(written, _Group(dialect, module, underscored))
        if role in group.tensors:
            other = next(k for k in group.keys if _split_key(k)[1] == role)
            raise CheckpointError(f"{name}: expected one {role} tensor for {written}, found {other!r} and {key!r} "
                                  "(several PEFT adapters in one file?)")
        group.tensors[role] = tensor
        group.keys.append(key)
    return groups, unparsed


def _peft_config(metadata: Mapping[str, str], name: str) -> dict[str, Any]:
    """The LoraConfig diffusers stores in `lora_adapter_metadata` (keys may carry a "transformer." prefix)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError(f"{name}: metadata 'lora_adapter_metadata': expected JSON, found {raw[:120]!r}") from None
    return {key.removeprefix("transformer."): value for key, value in config.items()}


def _peft_alpha(config: Mapping[str, Any], module: str, rank: int) -> float | None:
    """PEFT's alpha for a module, as an alpha over the module's rank (rsLoRA's alpha / sqrt(r) included)."""
    if "lora_alpha" not in config:
        return None
    # PEFT matches a pattern against the end of the module path, at a dot boundary.
    patterns = config.get("alpha_pattern") or {}
    alpha = float(next((value for pattern, value in patterns.items() if re.match(rf"(.*\.)?({pattern})$", module)),
                       config["lora_alpha"]))
    return alpha * rank ** 0.5 if config.get("use_rslora") else alpha


def _delta(roles: Mapping[str, Tensor], where: str) -> Delta:
    for role, description in _UNSUPPORTED.items():
        if role in roles:
            raise CheckpointError(f"{where}: {description} is not supported; found {where}.{role}")
    try:
        if "down" in roles or "up" in roles:
            return LowRank(up=_matrix(roles, "up", where), down=_matrix(roles, "down", where))
        if any(role.startswith("hada_") for role in roles):
            return Hadamard(*(_matrix(roles, f"hada_{n}", where) for n in ("w1_a", "w1_b", "w2_a", "w2_b")))
        return Kronecker(**{n: roles.get(f"lokr_{n}") for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")})
    except ValueError as error:
        raise CheckpointError(f"{where}: {error}") from None


def _matrix(roles: Mapping[str, Tensor], role: str, where: str) -> Tensor:
    if role not in roles:
        raise CheckpointError(f"{where}: expected a {role} tensor next to {sorted(roles)}, found none")
    tensor = roles[role]
    if tensor.dim() == 4 and tensor.shape[2:] == (1, 1):
        tensor = tensor.flatten(1)  # 1x1 "conv" factors some trainers write for linear layers
    if tensor.dim() != 2:
        raise CheckpointError(f"{where}.{role}: expected a matrix, found shape {list(tensor.shape)}")
    return tensor


@dataclass(frozen=True)
class _Found:
    """A resolved module before the DiT width (and so the rows of split names) is known."""

    target: Target
    delta: Delta
    alpha: float | None
    source: str

    def patch(self, hidden: int) -> LoRAPatch:
        piece = self.target.piece
        rows = None if piece is None else (piece[0] * hidden, (piece[0] + piece[1]) * hidden)
        return LoRAPatch(self.target.module, rows, self.delta, self.alpha, self.source)


def _found(target: Target, written: str, group: _Group, peft_config: Mapping[str, Any], name: str) -> _Found:
    where = f"{name}: {written}"
    delta = _delta(group.tensors, where)
    alpha = float(group.tensors["alpha"].item()) if "alpha" in group.tensors else None
    if alpha is None and isinstance(delta, LowRank):
        alpha = _peft_alpha(peft_config, group.module, delta.rank)
    if target.swap_halves:
        try:
            delta = delta.swap_row_halves()
        except CheckpointError as error:
            raise CheckpointError(f"{where}: {error}") from None
    return _Found(target, delta, alpha, written)


def _hidden_size(item: _Found, name: str) -> int:
    """The DiT width H a module implies, after checking its shape fits the FLUX.2 layer it names."""
    target, (out, inputs) = item.target, item.delta.shape
    spec = target.spec
    out_multiple = target.piece[1] if target.piece else spec.out_per_hidden
    hidden = inputs // spec.in_per_hidden if spec.in_per_hidden else out // out_multiple
    expected = (out_multiple * hidden if out_multiple else out, spec.in_per_hidden * hidden if spec.in_per_hidden else inputs)
    if hidden <= 0 or (out, inputs) != expected:
        def size(multiple: int | None, actual: int) -> str:
            return "H" if multiple == 1 else f"{multiple}H" if multiple else str(actual)
        raise CheckpointError(
            f"{name}: {item.source} changes a [{out}, {inputs}] weight, but FLUX.2's {target.module} (of any width "
            f"H) is [{size(out_multiple, out)}, {size(spec.in_per_hidden, inputs)}]: this LoRA is for another "
            "architecture (FLUX.1 has a 4H MLP and no shared modulation)")
    return hidden
