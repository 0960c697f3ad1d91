"""fp8 weights: the layer that keeps them in fp8, the file layouts they arrive in, and writers for those layouts.

Layouts seen in FLUX.2 files (W = W8 * scale in every one):
- ComfyUI "mixed": `<layer>.weight` fp8 + `<layer>.weight_scale`, optional `<layer>.input_scale`, and the layer
  declared by a `<layer>.comfy_quant` uint8 tensor holding JSON and/or the `_quantization_metadata` metadata entry.
- old ComfyUI "scaled fp8": a `scaled_fp8` marker tensor + `<layer>.scale_weight` (+ `<layer>.scale_input`).
- BFL fp8: `<layer>.weight_scale` (+ `<layer>.input_scale`) with no ComfyUI declaration.
- plain fp8: fp8 weights with no scale at all (scale 1).
Input scales are static activation scales; the fp8 matmul path (`memory.fp8_matmul`) scales activations
dynamically per call instead, so they are read past.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..memory.fp8_matmul import scaled_linear, scaled_mm_applies
from .reader import CheckpointSource

FP8_DTYPES: dict[str, torch.dtype] = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}

# Loader-node spellings of the weight dtype ("fast" only changes the matmul kernel, not storage: see FAST_MATMUL).
WEIGHT_DTYPE_NAMES: dict[str, torch.dtype] = {
    "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fn_fast": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
    **FP8_DTYPES,
}

# Weight dtypes that also switch fp8-stored linears to scaled fp8 matmuls (`memory.fp8_matmul`), as in ComfyUI.
FAST_MATMUL_NAMES = frozenset({"fp8_e4m3fn_fast"})

Fp8FileLayout = Literal["comfyui-fp8-mixed", "scaled-fp8", "bfl-fp8", "fp8"]

_BLOCK_LINEAR = re.compile(r"(^|\.)(double_blocks|single_blocks)\.\d+\.")


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES.values()


def is_block_linear(name: str) -> bool:
    """True for a module (or `.weight`) inside a double or single block: the layers worth storing in fp8."""
    return bool(_BLOCK_LINEAR.search(name))


def dequantize_tensor(weight: torch.Tensor, scale: torch.Tensor | float | None, dtype: torch.dtype) -> torch.Tensor:
    """fp8 (or any) `weight` times its scale, in `dtype`. `scale` is a scalar or one value per output row."""
    out = weight.to(dtype)
    if scale is None:
        return out
    if not isinstance(scale, torch.Tensor):
        return out * scale
    if scale.numel() == 1:
        # A 0-dim float32 scale multiplies in float32 and rounds once to `dtype`, without a float32 copy.
        return out * scale.reshape(()).to(out.device)
    return out * scale.to(device=out.device, dtype=dtype).reshape(-1, *([1] * (weight.dim() - 1)))


def quantize_weight(weight: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
                    per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax scaling into the fp8 range: returns (fp8 weight, float32 scale) with weight ~= W8 * scale."""
    # In place on one float32 copy: quantizing while streaming a large layer must not hold several copies.
    w = weight.detach().to(torch.float32, copy=True)
    low, high = torch.aminmax(w, dim=1) if per_channel else torch.aminmax(w)
    fp8_max = torch.finfo(fp8_dtype).max
    scale = (torch.maximum(-low, high) / fp8_max).clamp(min=torch.finfo(torch.float32).tiny)
    w.div_(scale.unsqueeze(1) if per_channel else scale).clamp_(-fp8_max, fp8_max)
    return w.to(fp8_dtype), scale


def normalize_scale(scale: torch.Tensor, out_features: int, where: str) -> torch.Tensor:
    """A file's scale as 0-dim (per tensor) or [out_features] (per row), float32."""
    if scale.numel() == 1:
        return scale.reshape(()).float()
    if scale.numel() == out_features:
        return scale.reshape(out_features).float()
    raise CheckpointError(f"{where}: expected a weight scale with 1 or {out_features} values, found shape {list(scale.shape)}")


class Fp8Linear(nn.Module):
    """A bias-optional linear layer whose weight stays fp8 in memory and is dequantized on each call, or, with
    `use_scaled_mm` on a GPU with fp8 tensor cores, multiplied in fp8 (`memory.fp8_matmul.scaled_linear`, which
    also multiplies the input's gradient in fp8 when adapters train on this frozen layer).

    State-dict names match `nn.Linear` plus a `weight_scale` buffer, so BFL names are unchanged.
    """

    use_scaled_mm: bool = False
    scaled_mm_anywhere: bool = False  # also without fp8 tensor cores (`_scaled_mm`'s CPU kernel, for tests)

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 fp8_dtype: torch.dtype = torch.float8_e4m3fn, per_channel: bool = False,
                 device: torch.device | str | None = None):
        super().__init__()
        if not is_fp8(fp8_dtype):
            raise ValueError(f"fp8_dtype: expected one of {list(FP8_DTYPES.values())}, found {fp8_dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=fp8_dtype, device=device),
                                   requires_grad=False)
        scale_shape = (out_features,) if per_channel else ()
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        self.bias = (nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> Fp8Linear:
        """Wrap an already-quantized weight and its scale (0-dim or [out])."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias=False, fp8_dtype=weight.dtype, device="meta")
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.weight_scale = scale.to(device=weight.device, dtype=torch.float32)
        layer.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
                    per_channel: bool = False) -> Fp8Linear:
        weight, scale = quantize_weight(linear.weight, fp8_dtype, per_channel)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_weight(weight, scale, bias)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_tensor(self.weight, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_scaled_mm and scaled_mm_applies(x, self.weight, self.scaled_mm_anywhere):
            return scaled_linear(x, self.weight, self.weight_scale, self.bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        kind = "per-row" if self.weight_scale.dim() else "per-tensor"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self.weight.dtype} {kind} scale")


def quantize_linear_weights(model: nn.Module, fmt: str | torch.dtype = "fp8_e4m3fn",
                            only_blocks: bool = True, per_channel: bool = False) -> int:
    """Replace the model's `nn.Linear`s (by default only those inside double/single blocks) with `Fp8Linear`
    (one scale per tensor, or per output row with `per_channel`), one layer at a time so the float copy of only
    one layer exists beside the fp8 one. Returns how many."""
    fp8_dtype = fp8_dtype_of(fmt)
    targets = [name for name, module in model.named_modules()
               if type(module) is nn.Linear and (not only_blocks or is_block_linear(name))]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Fp8Linear.from_linear(getattr(parent, child), fp8_dtype, per_channel))
    return len(targets)


def fp8_dtype_of(fmt: str | torch.dtype) -> torch.dtype:
    if isinstance(fmt, torch.dtype) and is_fp8(fmt):
        return fmt
    if isinstance(fmt, str) and fmt in WEIGHT_DTYPE_NAMES:
        return WEIGHT_DTYPE_NAMES[fmt]
    raise ValueError(f"fp8 format: expected one of {sorted(WEIGHT_DTYPE_NAMES)}, found {fmt!r}")


# ---------------------------------------------------------------------------------------------------------------
# Reading: which tensors of a file are fp8 weights, and where their scales are.

@dataclass(frozen=True)
class QuantizedWeight:
    """One fp8 weight in a file: its key, the key of its scale (None = scale 1) and its fp8 dtype."""

    weight_key: str
    scale_key: str | None
    fp8_dtype: torch.dtype


@dataclass
class Fp8Layout:
    """The fp8 layout of a file: its format name, its fp8 weights, and the helper tensors a loader skips."""

    format: Fp8FileLayout
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    auxiliary_keys: set[str] = field(default_factory=set)


def detect_fp8_layout(source: CheckpointSource) -> Fp8Layout | None:
    """The fp8 layout of `source`, or None when it holds no fp8 weights and no quantization markers."""
    keys = source.keys()
    declared = _comfy_declared_formats(source)
    scaled_marker = next((k for k in keys if k == "scaled_fp8" or k.endswith(".scaled_fp8")), None)
    has_fp8 = any(is_fp8(source.dtype(k)) for k in keys if k.endswith(".weight"))
    if not declared and scaled_marker is None and not has_fp8:
        return None

    if declared:
        layout = Fp8Layout("comfyui-fp8-mixed")
    elif scaled_marker is not None:
        layout = Fp8Layout("scaled-fp8")
    elif any(k.endswith(".weight_scale") for k in keys):
        layout = Fp8Layout("bfl-fp8")
    else:
        layout = Fp8Layout("fp8")
    if scaled_marker is not None:
        layout.auxiliary_keys.add(scaled_marker)

    for key in keys:
        for suffix in (".comfy_quant", ".input_scale", ".scale_input"):
            if key.endswith(suffix):
                layout.auxiliary_keys.add(key)
        if not key.endswith(".weight"):
            continue
        layer = key[: -len(".weight")]
        fmt = declared.get(key)
        if fmt is None and not is_fp8(source.dtype(key)):
            continue
        fp8_dtype = _declared_fp8_dtype(source, key, fmt) if fmt is not None else source.dtype(key)
        scale_key = next((f"{layer}{s}" for s in (".weight_scale", ".scale_weight") if f"{layer}{s}" in source), None)
        if scale_key is not None:
            layout.auxiliary_keys.add(scale_key)
        layout.weights[key] = QuantizedWeight(key, scale_key, fp8_dtype)
    return layout


def _comfy_declared_formats(source: CheckpointSource) -> dict[str, str]:
    """weight key -> declared format, from `.comfy_quant` tensors and the `_quantization_metadata` entry."""
    declared: dict[str, str] = {}
    for key in source.keys():
        if key.endswith(".comfy_quant"):
            config = _parse_quant_config(bytes(source.get(key).tolist()), f"{source.path}: tensor {key!r}")
            declared[key[: -len(".comfy_quant")] + ".weight"] = config
    raw_metadata = source.metadata.get("_quantization_metadata")
    if raw_metadata is not None:
        where = f"{source.path}: metadata '_quantization_metadata'"
        try:
            layers = json.loads(raw_metadata)["layers"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{where}: expected JSON with a 'layers' object, found {raw_metadata[:120]!r}") from None
        weight_keys = [k for k in source.keys() if k.endswith(".weight")]
        for layer, config in layers.items():
            weight_key = _weight_key_of_layer(layer, weight_keys)
            if weight_key is None:
                raise CheckpointError(f"{where}: declares layer {layer!r}, found no tensor {layer}.weight in the file")
            fmt = config if isinstance(config, str) else _parse_quant_config(json.dumps(config).encode(), where)
            declared.setdefault(weight_key, fmt)
    return declared


def _weight_key_of_layer(layer: str, weight_keys: list[str]) -> str | None:
    # Some tools write layer names without the file's key prefix (e.g. "model.diffusion_model.").
    if f"{layer}.weight" in weight_keys:
        return f"{layer}.weight"
    matches = [k for k in weight_keys if k.endswith(f".{layer}.weight")]
    return matches[0] if len(matches) == 1 else None


def _parse_quant_config(raw: bytes, where: str) -> str:
    try:
        config = json.loads(raw.decode("utf-8"))
        fmt = config["format"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{where}: expected a quantization config like {{\"format\": \"float8_e4m3fn\"}}, "
                              f"found {raw[:120]!r}") from None
    return fmt


def _declared_fp8_dtype(source: CheckpointSource, weight_key: str, fmt: str) -> torch.dtype:
    if fmt not in FP8_DTYPES:
        raise CheckpointError(f"{source.path}: layer {weight_key[: -len('.weight')]!r} is quantized as {fmt!r}; "
                              f"this runtime reads {sorted(FP8_DTYPES)} only")
    stored = source.dtype(weight_key)
    if stored.itemsize != 1:
        raise CheckpointError(f"{source.path}: {weight_key!r} is declared {fmt} but stored as {stored}; expected "
                              f"1-byte storage")
    return FP8_DTYPES[fmt]


def read_quantized_weight(source: CheckpointSource, q: QuantizedWeight,
                          device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scale as 0-dim or [out]) for one fp8 weight of `source`."""
    weight = source.get(q.weight_key, device=device)
    if weight.dtype != q.fp8_dtype:
        weight = weight.view(q.fp8_dtype)  # uint8 containers declared as fp8 by ComfyUI
    if q.scale_key is None:
        return weight, torch.ones((), dtype=torch.float32, device=device)
    scale = source.get(q.scale_key, device=device)
    return weight, normalize_scale(scale, weight.shape[0], f"{source.path}: {q.scale_key}")


# ---------------------------------------------------------------------------------------------------------------
# Writing: produce each layout from a float state dict (tests and `flux2 demo-models`).

def quantize_state_dict(state_dict: Mapping[str, torch.Tensor], layout: Fp8FileLayout,
                        fp8_dtype: torch.dtype = torch.float8_e4m3fn,
                        comfy_marker: Literal["tensor", "metadata"] = "tensor") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Quantize the block linear weights of a (BFL-named, optionally prefixed) state dict into `layout`.

    Returns (tensors, safetensors metadata) ready for `safetensors.torch.save_file`.
    """
    tensors: dict[str, torch.Tensor] = {}
    declared: dict[str, dict[str, str]] = {}
    fmt = next(name for name, dtype in FP8_DTYPES.items() if dtype == fp8_dtype)
    for key, value in state_dict.items():
        if not (key.endswith(".weight") and value.dim() == 2 and is_block_linear(key)):
            tensors[key] = value
            continue
        layer = key[: -len(".weight")]
        if layout == "fp8":
            tensors[key] = value.float().to(fp8_dtype)
            continue
        weight, scale = quantize_weight(value, fp8_dtype)
        tensors[key] = weight
        if layout == "scaled-fp8":
            tensors[f"{layer}.scale_weight"] = scale.reshape(1)
            tensors[f"{layer}.scale_input"] = torch.ones(1)
            continue
        tensors[f"{layer}.weight_scale"] = scale
        tensors[f"{layer}.input_scale"] = torch.ones(())
        if layout == "comfyui-fp8-mixed":
            declared[layer] = {"format": fmt}
            if comfy_marker == "tensor":
                tensors[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)
    metadata: dict[str, str] = {}
    if layout == "scaled-fp8":
        tensors["scaled_fp8"] = torch.empty(0, dtype=fp8_dtype)
    if layout == "comfyui-fp8-mixed" and comfy_marker == "metadata":
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": declared})
    return tensors, metadata
