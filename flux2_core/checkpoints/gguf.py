"""GGUF files (llama.cpp's format; ComfyUI-GGUF's quantized FLUX.2 DiTs): reading, torch dequantization, and the
linear layer that keeps its weight quantized in memory.

Facts about the files this reads (city96's converter and its patched llama-quantize, which the city96 / orabazes
FLUX.2 dev and klein GGUFs come from):
- `general.architecture` is "flux" for FLUX.2 too (the converter recognises the BFL names of both generations);
  tensors keep their BFL names without a "model.diffusion_model." prefix. What the model is, is decided from
  the tensor names and shapes, as for every other file.
- GGUF lists dimensions fastest-first (ggml's ne[0] is the row length), so the torch shape is the reversed list.
  ComfyUI-GGUF may store a tensor's original torch shape in `comfy.gguf.orig_shape.<name>` (only for
  architectures it reshapes, never for flux); when present it wins.
- img_in, txt_in, time_in, guidance_in and final_layer stay F16/BF16/F32, 1-D tensors stay F32; the block and
  modulation linears carry the quantized types.

Quantized data are rows of blocks: each block holds `elements` values in `bytes` bytes (scales, then packed
integers). Dequantization below follows the block layouts of ggml (the same ones `gguf.quants` decodes with
numpy) with the same float32 operations in the same order, so both give bit-identical float32 values.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError
from .reader import CheckpointSource, TensorEntry

# Values decoded per call when dequantizing a large weight, so the float32 temporaries of a 340M-value layer
# (dev's single-block linear1) never exist all at once beside the result.
_CHUNK_VALUES = 1 << 24


# ---------------------------------------------------------------------------------------------------------------
# Block decoders: uint8 blocks [n, bytes] -> float32 values [n, elements].

def _f16(blocks: Tensor, at: int) -> Tensor:
    """The float16 stored at byte `at` of each block, as float32 [n, 1]."""
    return blocks[:, at:at + 2].contiguous().view(torch.float16).float()


def _shifted(packed: Tensor, shifts: range, mask: int, dim: int) -> Tensor:
    """`(packed >> s) & mask` for each shift, stacked along a new dimension `dim` (no device constants)."""
    return torch.stack([(packed >> s) & mask for s in shifts], dim=dim)


def _nibbles(packed: Tensor, groups: int, width: int) -> Tensor:
    """[n, groups*width] bytes -> [n, groups, 2, width] 4-bit values: the low nibbles of a group of `width`
    bytes are its first `width` values, the high nibbles the next `width`."""
    return _shifted(packed.reshape(packed.shape[0], groups, width), range(0, 8, 4), 0x0F, dim=2)


def _crumbs(packed: Tensor, groups: int) -> Tensor:
    """[n, groups*32] bytes -> [n, groups, 4, 32] 2-bit values, bits 0-1 of 32 bytes first, then bits 2-3, ..."""
    return _shifted(packed.reshape(packed.shape[0], groups, 32), range(0, 8, 2), 0x03, dim=2)


def _bits(packed: Tensor) -> Tensor:
    """[n, B] bytes -> [n, 8, B] single bits: row k holds bit k of every byte."""
    return _shifted(packed, range(8), 0x01, dim=1)


def _high_bits_32(qh: Tensor) -> Tensor:
    """Q5_0/Q5_1's 4 bytes of fifth bits, read as one little-endian uint32: value j gets bit j -> [n, 32]."""
    return _bits(qh).transpose(1, 2).reshape(qh.shape[0], 32)


def _q8_0(b: Tensor) -> Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b, 0)


def _q4_0(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 2:], 1, 16).reshape(b.shape[0], 32).to(torch.int8) - 8
    return _f16(b, 0) * q.float()


def _q4_1(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 4:], 1, 16).reshape(b.shape[0], 32).float()
    return (_f16(b, 0) * q).add_(_f16(b, 2))


def _q5_0(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 6:], 1, 16).reshape(b.shape[0], 32) | (_high_bits_32(b[:, 2:6]) << 4)
    return _f16(b, 0) * (q.to(torch.int8) - 16).float()


def _q5_1(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 8:], 1, 16).reshape(b.shape[0], 32) | (_high_bits_32(b[:, 4:8]) << 4)
    return (_f16(b, 0) * q.float()).add_(_f16(b, 2))


def _q2_k(b: Tensor) -> Tensor:
    # scales[16] (low nibble: scale, high nibble: min), qs[64], d, dmin
    n = b.shape[0]
    scales = b[:, :16]
    scale = (_f16(b, 80) * (scales & 0x0F).float()).view(n, 16, 1)
    low = (_f16(b, 82) * (scales >> 4).float()).view(n, 16, 1)
    q = _crumbs(b[:, 16:80], 2).reshape(n, 16, 16).float()
    return (scale * q).sub_(low).reshape(n, 256)


def _q3_k(b: Tensor) -> Tensor:
    # hmask[32], qs[64], scales[12] (sixteen 6-bit signed scales), d
    n = b.shape[0]
    packed = b[:, 96:108]
    low = _nibbles(packed[:, :8], 1, 8).reshape(n, 16)
    high = _crumbs_of_4(packed[:, 8:12])
    scales = ((low | (high << 4)).to(torch.int8) - 32).float()
    scale = (_f16(b, 108) * scales).view(n, 16, 1)
    q_low = _crumbs(b[:, 32:96], 2).reshape(n, 16, 16)
    # A cleared hmask bit means "subtract 4".
    q_high = (_bits(b[:, :32]).reshape(n, 16, 16) ^ 1) << 2
    q = (q_low.to(torch.int8) - q_high.to(torch.int8)).float()
    return (scale * q).reshape(n, 256)


def _crumbs_of_4(packed: Tensor) -> Tensor:
    """4 bytes -> 16 2-bit values: bits 0-1 of the 4 bytes first, then bits 2-3, ... -> [n, 16]."""
    return _shifted(packed, range(0, 8, 2), 0x03, dim=1).reshape(packed.shape[0], 16)


def _k_scales_mins(packed: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins, as uint8 [n, 8] each. Bytes 0-3 hold
    scales 0-3 (low 6 bits) and the top bits of scales 4-7, bytes 4-7 the same for mins, bytes 8-11 the low
    nibbles of scales 4-7 (low half) and mins 4-7 (high half)."""
    s, m, sm = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([s & 0x3F, (sm & 0x0F) | ((s >> 2) & 0x30)], dim=1)
    mins = torch.cat([m & 0x3F, (sm >> 4) | ((m >> 2) & 0x30)], dim=1)
    return scales, mins


def _q4_k(b: Tensor) -> Tensor:
    # d, dmin, scales[12], qs[128]
    n = b.shape[0]
    scales, mins = _k_scales_mins(b[:, 4:16])
    scale = (_f16(b, 0) * scales.float()).view(n, 8, 1)
    low = (_f16(b, 2) * mins.float()).view(n, 8, 1)
    q = _nibbles(b[:, 16:], 4, 32).reshape(n, 8, 32).float()
    return (scale * q).sub_(low).reshape(n, 256)


def _q5_k(b: Tensor) -> Tensor:
    # d, dmin, scales[12], qh[32], qs[128]
    n = b.shape[0]
    scales, mins = _k_scales_mins(b[:, 4:16])
    scale = (_f16(b, 0) * scales.float()).view(n, 8, 1)
    low = (_f16(b, 2) * mins.float()).view(n, 8, 1)
    q = _nibbles(b[:, 48:], 4, 32).reshape(n, 8, 32) | (_bits(b[:, 16:48]) << 4)
    return (scale * q.float()).sub_(low).reshape(n, 256)


def _q6_k(b: Tensor) -> Tensor:
    # ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] int8, d
    n = b.shape[0]
    scale = (_f16(b, 208) * b[:, 192:208].contiguous().view(torch.int8).float()).view(n, 16, 1)
    low = _nibbles(b[:, :128], 2, 64).reshape(n, 8, 32)
    high = _crumbs(b[:, 128:192], 2).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (scale * q).reshape(n, 256)


@dataclass(frozen=True)
class QuantFormat:
    """One ggml block format: values per block, bytes per block, and its decoder."""

    name: str
    elements: int
    bytes: int
    decode: Callable[[Tensor], Tensor]


# The block formats of the FLUX.2 GGUFs people share, by ggml type id (`gguf.GGMLQuantizationType` values; the
# ids are fixed by the file format, so importing the package is left to files that are GGUF).
QUANT_FORMATS: dict[int, QuantFormat] = {
    8: QuantFormat("Q8_0", 32, 34, _q8_0),
    2: QuantFormat("Q4_0", 32, 18, _q4_0),
    3: QuantFormat("Q4_1", 32, 20, _q4_1),
    6: QuantFormat("Q5_0", 32, 22, _q5_0),
    7: QuantFormat("Q5_1", 32, 24, _q5_1),
    10: QuantFormat("Q2_K", 256, 84, _q2_k),
    11: QuantFormat("Q3_K", 256, 110, _q3_k),
    12: QuantFormat("Q4_K", 256, 144, _q4_k),
    13: QuantFormat("Q5_K", 256, 176, _q5_k),
    14: QuantFormat("Q6_K", 256, 210, _q6_k),
}
# Unquantized ggml types (type id -> name, torch dtype).
PLAIN_TYPES: dict[int, tuple[str, torch.dtype]] = {
    0: ("F32", torch.float32), 1: ("F16", torch.float16), 30: ("BF16", torch.bfloat16),
}
_FORMAT_BY_NAME = {f.name: f for f in QUANT_FORMATS.values()}


def quant_format(name: str) -> QuantFormat:
    try:
        return _FORMAT_BY_NAME[name]
    except KeyError:
        raise ValueError(f"GGUF quant type: expected one of {sorted(_FORMAT_BY_NAME)}, found {name!r}") from None


def dequantize(raw: Tensor, quant_type: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 blocks (any shape, row-major) of `quant_type` -> a `shape` tensor of `dtype` on the same device.

    Decoded in float32 (bit-identical to `gguf.quants.dequantize`), a bounded number of blocks at a time,
    each chunk rounded once into the result."""
    fmt = quant_format(quant_type)
    numel = 1
    for size in shape:
        numel *= size
    if numel % fmt.elements or raw.numel() != numel // fmt.elements * fmt.bytes:
        raise ValueError(f"{quant_type}: {list(shape)} holds {numel} values, which need "
                         f"{numel // fmt.elements * fmt.bytes} bytes in blocks of {fmt.elements}; found {raw.numel()} bytes")
    blocks = raw.reshape(-1, fmt.bytes)
    out = torch.empty(blocks.shape[0], fmt.elements, dtype=dtype, device=raw.device)
    step = max(1, _CHUNK_VALUES // fmt.elements)
    for start in range(0, blocks.shape[0], step):
        out[start:start + step] = fmt.decode(blocks[start:start + step])
    return out.reshape(shape)


# ---------------------------------------------------------------------------------------------------------------
# The layer

class GGUFLinear(nn.Module):
    """A bias-optional linear layer whose weight stays in its GGUF blocks and is dequantized on each call.

    `weight` is the uint8 block data [out_features, bytes per row], so state-dict names stay BFL names; forward
    hooks (on-the-fly LoRAs) see the same inputs and outputs as on `nn.Linear`."""

    def __init__(self, blocks: Tensor, quant_type: str, out_features: int, in_features: int,
                 bias: Tensor | None = None):
        super().__init__()
        fmt = quant_format(quant_type)
        if in_features % fmt.elements:
            raise ValueError(f"{quant_type} rows hold multiples of {fmt.elements} values; found {in_features}")
        self.quant_type = quant_type
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(blocks.reshape(out_features, in_features // fmt.elements * fmt.bytes),
                                   requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        return dequantize(self.weight, self.quant_type, (self.out_features, self.in_features), dtype)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self.quant_type}")


# ---------------------------------------------------------------------------------------------------------------
# The file

class GGUFSource(CheckpointSource):
    """A GGUF file as a `CheckpointSource`: names and torch shapes as the model sees them; `get` returns float
    tensors (quantized ones dequantized), `read_blocks` the raw blocks of a quantized tensor."""

    def __init__(self, path: Path, entries: dict[str, TensorEntry], metadata: dict[str, str],
                 quant_types: dict[str, str]):
        super().__init__(path, entries, metadata, [path])
        self.quant_types = quant_types

    def quant_type(self, name: str) -> str:
        """"Q4_K", "Q8_0", ... or "F32" / "F16" / "BF16"."""
        self.entry(name)
        return self.quant_types[name]

    def is_quantized(self, name: str) -> bool:
        return self.quant_type(name) in _FORMAT_BY_NAME

    def read_blocks(self, name: str, device: torch.device | str | None = None) -> Tensor:
        """The stored blocks of a quantized tensor, uint8 [rows, bytes per row]."""
        fmt = quant_format(self.quant_type(name))
        row_bytes = self.shape(name)[-1] // fmt.elements * fmt.bytes
        blocks = self.read_bytes(name).reshape(-1, row_bytes)
        return blocks if device is None else blocks.to(device)

    def get(self, name: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
        if not self.is_quantized(name):
            return super().get(name, device=device, dtype=dtype)
        return dequantize(self.read_blocks(name, device), self.quant_type(name), self.shape(name),
                          dtype or torch.float32)


def open_gguf(path: str | os.PathLike) -> GGUFSource:
    """Read a GGUF file's header (metadata, tensor names, types, shapes, offsets); tensor data stays on disk."""
    import gguf  # deferred: only GGUF files need the package

    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError) as error:
        raise CheckpointError(f"{path}: expected a readable GGUF file, found a damaged or truncated one ({error})") from None
    entries: dict[str, TensorEntry] = {}
    quant_types: dict[str, str] = {}
    for tensor in reader.tensors:
        code = int(tensor.tensor_type)
        shape = _torch_shape(reader, tensor.name, [int(n) for n in tensor.shape])
        if code in QUANT_FORMATS:
            fmt = QUANT_FORMATS[code]
            storage, type_name = torch.uint8, fmt.name
        elif code in PLAIN_TYPES:
            type_name, storage = PLAIN_TYPES[code]
        else:
            name = getattr(tensor.tensor_type, "name", str(code))
            raise CheckpointError(f"{path}: tensor {tensor.name!r} is stored as GGUF type {name}; this runtime reads "
                                  f"{sorted(_FORMAT_BY_NAME) + sorted(n for n, _ in PLAIN_TYPES.values())}")
        start = int(tensor.data_offset)
        entries[tensor.name] = TensorEntry(path, storage, shape, start, start + int(tensor.n_bytes))
        quant_types[tensor.name] = type_name
    size = path.stat().st_size
    end = max((e.end for e in entries.values()), default=0)
    if end > size:
        raise CheckpointError(f"{path}: truncated GGUF file: its tensors need {end} bytes, found {size} on disk "
                              f"(incomplete download?)")
    return GGUFSource(path, entries, _scalar_metadata(reader), quant_types)


def _torch_shape(reader, name: str, gguf_dims: list[int]) -> tuple[int, ...]:
    field = reader.get_field(f"comfy.gguf.orig_shape.{name}")
    if field is not None:
        return tuple(int(n) for n in field.contents())
    return tuple(reversed(gguf_dims))


def _scalar_metadata(reader) -> dict[str, str]:
    """Key -> value as text for the string and number fields (arrays such as vocabularies are left out)."""
    import gguf

    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key.startswith("comfy.gguf.orig_shape."):
            continue
        if field.types and field.types[0] != gguf.GGUFValueType.ARRAY:
            metadata[key] = str(field.contents())
    return metadata


def quant_type_counts(source: GGUFSource) -> dict[str, int]:
    """Quant type -> tensor count, most common first (what `flux2 info` reports)."""
    counts: dict[str, int] = {}
    for name in source.keys():
        counts[source.quant_type(name)] = counts.get(source.quant_type(name), 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))
