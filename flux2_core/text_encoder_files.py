"""Loading FLUX.2 text encoders from the files people have.

Accepted: an HF model folder (config.json, safetensors shards, tokenizer files), a diffusers pipeline folder
(text_encoder/ + tokenizer/), or a ComfyUI single file (`qwen_3_4b.safetensors`,
`qwen_3_8b_fp8mixed.safetensors`, `mistral_3_small_flux2_bf16.safetensors` / `_fp8`). Single files carry no
config, so the transformers config is rebuilt from tensor shapes plus the published hyper-parameters of each
family. Tensors are streamed one at a time from the mmapped files into a model built on the meta device, so
peak memory stays about one copy of the weights; fp8 weights are dequantized to the compute dtype on the way.
"""

from __future__ import annotations

import json
import re
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    MistralConfig,
    MistralModel,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen3Config,
    Qwen3Model,
)

from flux2_core.devices import resolve_device, resolve_dtype
from flux2_core.errors import CheckpointError
from flux2_core.text_encoders import TEXT_ENCODER_SPECS, Flux2TextEncoder, truncate_after_last_tap

# Hyper-parameters a single file cannot tell from its shapes (Qwen3-4B/8B and Mistral Small 3.x configs).
FAMILY_DEFAULTS = {
    "qwen3": {"rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 40960},
    "mistral3": {"rope_theta": 1_000_000_000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
                 "sliding_window": None},
}
# Mistral has no per-head norm to read the head size from; every Mistral Small 3.x / Ministral uses 128.
MISTRAL_HEAD_DIM = 128
MODEL_CLASSES = {"qwen3": (Qwen3Config, Qwen3Model), "mistral3": (MistralConfig, MistralModel)}

# Where the decoder's tensors start; the prefix is whatever precedes this in the file.
_FIRST_LAYER_QUERY = "layers.0.self_attn.q_proj.weight"
_TEKKEN_TENSOR = "tekken_model"
_FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_HF_INDEX_FILE = "model.safetensors.index.json"

# Name fragments that identify other model kinds, to say what a wrong file is.
_OTHER_MODEL_MARKERS = (
    ("a FLUX diffusion model (DiT)", ("double_blocks.", "single_blocks.", "img_in.", "transformer_blocks.",
                                      "single_transformer_blocks.", "x_embedder.")),
    ("a VAE", ("decoder.conv_in.", "encoder.conv_in.", "decoder.up_blocks.", "decoder.up.", "bn.running_mean")),
    ("a LoRA", ("lora_A.", "lora_B.", "lora_down.", "lora_up.")),
)


class _TensorFiles:
    """Tensors spread over one or more safetensors files, read one by one from the mmapped files."""

    def __init__(self, paths: list[Path], stack: ExitStack):
        self._where: dict[str, object] = {}
        for path in paths:
            try:
                handle = stack.enter_context(safe_open(str(path), framework="pt"))
            except (SafetensorError, OSError) as error:
                raise CheckpointError(f"{path}: expected a readable safetensors file, found: {error}") from None
            for key in handle.keys():
                self._where[key] = handle

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key].get_slice(key).get_shape())

    def dtype_name(self, key: str) -> str:
        return self._where[key].get_slice(key).get_dtype()

    def get(self, key: str) -> torch.Tensor:
        return self._where[key].get_tensor(key)


@dataclass(frozen=True)
class _Located:
    """The files behind a text-encoder path."""

    path: Path
    weights: list[Path]
    config_dir: Path | None
    is_single_file: bool

    def tokenizer_dirs(self, kind: str) -> list[Path]:
        if self.is_single_file:
            parent, stem = self.path.parent, self.path.stem
            return [parent / f"{stem}_tokenizer", parent / "tokenizer", parent / f"{kind}_tokenizer"]
        model_dir = self.weights[0].parent
        return list(dict.fromkeys([self.path / "tokenizer", model_dir, self.path]))


def _locate(path: Path) -> _Located:
    if path.is_file():
        return _Located(path, [path], None, is_single_file=True)
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a text-encoder file or folder, found nothing at that path")
    model_dir = path / "text_encoder" if (path / "text_encoder").is_dir() else path
    index = model_dir / _HF_INDEX_FILE
    if index.is_file():
        shard_names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        weights = [model_dir / name for name in shard_names]
    else:
        weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise CheckpointError(
            f"{model_dir}: expected *.safetensors weights (an HF text-encoder folder or a diffusers pipeline "
            f"folder with text_encoder/), found {sorted(p.name for p in model_dir.iterdir())}"
        )
    config_dir = model_dir if (model_dir / "config.json").is_file() else None
    return _Located(path, weights, config_dir, is_single_file=False)


def _decoder_prefix(path: Path, tensors: _TensorFiles) -> str:
    """The name prefix of the decoder's tensors (`model.`, `model.language_model.`, ...), or a clear error."""
    for key in tensors.keys():
        if key.endswith(_FIRST_LAYER_QUERY):
            prefix = key[: -len(_FIRST_LAYER_QUERY)]
            if f"{prefix}embed_tokens.weight" in tensors:
                return prefix
    keys = tensors.keys()
    for description, markers in _OTHER_MODEL_MARKERS:
        if any(marker in key for key in keys for marker in markers):
            raise CheckpointError(
                f"{path}: expected a Qwen3 or Mistral 3 text encoder, found what looks like {description} "
                f"(tensors such as {next(k for k in keys if any(m in k for m in markers))!r})"
            )
    raise CheckpointError(
        f"{path}: expected a Qwen3 or Mistral 3 text encoder (tensors '*{_FIRST_LAYER_QUERY}' and "
        f"'*embed_tokens.weight'), found {len(keys)} tensors such as {sorted(keys)[:5]}"
    )


def _kind_of(tensors: _TensorFiles, prefix: str) -> str:
    # Qwen3 normalizes queries and keys per head; Mistral does not.
    return "qwen3" if f"{prefix}layers.0.self_attn.q_norm.weight" in tensors else "mistral3"


def _config_from_shapes(path: Path, tensors: _TensorFiles, prefix: str, kind: str) -> PretrainedConfig:
    vocab_size, hidden_size = tensors.shape(f"{prefix}embed_tokens.weight")
    layer_indices = {int(m.group(1)) for key in tensors.keys() if (m := re.match(re.escape(prefix) + r"layers\.(\d+)\.", key))}
    attention = f"{prefix}layers.0.self_attn."
    head_dim = tensors.shape(f"{attention}q_norm.weight")[0] if kind == "qwen3" else MISTRAL_HEAD_DIM
    query_width = tensors.shape(f"{attention}q_proj.weight")[0]
    key_width = tensors.shape(f"{attention}k_proj.weight")[0]
    if query_width % head_dim or key_width % head_dim:
        raise CheckpointError(
            f"{path}: expected q_proj/k_proj widths that are multiples of the head size {head_dim}, "
            f"found {query_width} and {key_width}"
        )
    config_class, _ = MODEL_CLASSES[kind]
    return config_class(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=max(layer_indices) + 1,
        num_attention_heads=query_width // head_dim,
        num_key_value_heads=key_width // head_dim,
        head_dim=head_dim,
        intermediate_size=tensors.shape(f"{prefix}layers.0.mlp.gate_proj.weight")[0],
        attention_bias=f"{attention}q_proj.bias" in tensors,
        **FAMILY_DEFAULTS[kind],
    )


def _config_from_folder(config_dir: Path, kind: str) -> PretrainedConfig:
    """The decoder config of an HF folder (the text part of a Mistral3 vision-language config)."""
    config = AutoConfig.from_pretrained(str(config_dir)).get_text_config()
    config_class, _ = MODEL_CLASSES[kind]
    if not isinstance(config, config_class):
        raise CheckpointError(
            f"{config_dir / 'config.json'}: expected a {config_class.model_type} text config to match the "
            f"{kind} weights, found model_type {config.model_type!r}"
        )
    return config


def tokenizer_from_tekken(tekken: bytes | str) -> PreTrainedTokenizerBase:
    """An HF tokenizer from the JSON of a tekken tokenizer (tekken.json, or ComfyUI's `tekken_model`)."""
    from transformers.integrations.mistral import convert_tekken_tokenizer

    data = tekken.encode("utf-8") if isinstance(tekken, str) else tekken
    # The converter reads a file; the temporary copy is only parsed, never kept.
    with tempfile.TemporaryDirectory() as folder:
        tekken_path = Path(folder) / "tekken.json"
        tekken_path.write_bytes(data)
        tokenizer = convert_tekken_tokenizer(str(tekken_path))
    tokenizer.init_kwargs.pop("vocab_file", None)
    return tokenizer


def _tokenizer_from_path(path: Path) -> PreTrainedTokenizerBase | None:
    if path.is_file():
        return tokenizer_from_tekken(path.read_bytes())
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(path))
    if (path / "tekken.json").is_file():
        return tokenizer_from_tekken((path / "tekken.json").read_bytes())
    return None


def _resolve_tokenizer(located: _Located, tensors: _TensorFiles, kind: str,
                       tokenizer: str | Path | PreTrainedTokenizerBase | None) -> PreTrainedTokenizerBase:
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if tokenizer is not None:
        found = _tokenizer_from_path(Path(tokenizer)) if Path(tokenizer).exists() else None
        if found is None:
            raise CheckpointError(
                f"{tokenizer}: expected a tokenizer folder (tokenizer.json / tokenizer_config.json, or tekken.json) "
                f"or a tekken.json file, found nothing usable"
            )
        return found
    if _TEKKEN_TENSOR in tensors:
        return tokenizer_from_tekken(tensors.get(_TEKKEN_TENSOR).numpy().tobytes())
    candidates = located.tokenizer_dirs(kind)
    for candidate in candidates:
        if candidate.is_dir() and (found := _tokenizer_from_path(candidate)) is not None:
            return found
    where = ", ".join(str(c) for c in candidates)
    if located.is_single_file:
        raise CheckpointError(
            f"{located.path}: this single-file {kind} text encoder carries no tokenizer. Put the HF tokenizer "
            f"files (tokenizer.json, tokenizer_config.json) in one of: {where}; or pass tokenizer=<folder>"
        )
    raise CheckpointError(
        f"{located.path}: expected tokenizer files (tokenizer.json / tokenizer_config.json, or tekken.json) in "
        f"one of: {where}; found none. Pass tokenizer=<folder>"
    )


def _read_weight(tensors: _TensorFiles, key: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One tensor on `device` in `dtype`; fp8 weights are multiplied by their per-tensor/row scale first."""
    stored = tensors.dtype_name(key)
    tensor = tensors.get(key).to(device)
    if stored in _FP8_DTYPES:
        layer = key.removesuffix(".weight")
        # ComfyUI "mixed" files name the scale weight_scale; older "scaled fp8" files scale_weight.
        scale_key = next((k for k in (f"{layer}.weight_scale", f"{layer}.scale_weight") if k in tensors), None)
        weight = tensor.to(torch.float32)
        if scale_key is not None:
            scale = tensors.get(scale_key).to(device, torch.float32)
            weight = weight * (scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(()))
        return weight.to(dtype)
    if not tensor.is_floating_point():
        raise CheckpointError(
            f"{key}: expected a float or float8 weight, found {stored} (a quantization this loader does not read)"
        )
    return tensor.to(dtype)


def _build_model(kind: str, config: PretrainedConfig) -> PreTrainedModel:
    """The decoder with every parameter on the meta device, cut after the last tapped layer."""
    _, model_class = MODEL_CLASSES[kind]
    with torch.device("meta"):
        model = model_class(config)
    return truncate_after_last_tap(model, kind)


def _stream_weights(model: PreTrainedModel, tensors: _TensorFiles, prefix: str, path: Path,
                    device: torch.device, dtype: torch.dtype) -> None:
    for name, param in list(model.named_parameters()):
        key = prefix + name
        if key not in tensors:
            raise CheckpointError(f"{path}: expected tensor {key!r} (text encoder weight {name}), not found")
        tensor = _read_weight(tensors, key, device, dtype)
        if tensor.shape != param.shape:
            raise CheckpointError(
                f"{path}: tensor {key!r}: expected shape {tuple(param.shape)}, found {tuple(tensor.shape)}"
            )
        owner_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(owner_name), attribute, nn.Parameter(tensor, requires_grad=False))
    # The rotary table is computed, not stored: build it on the CPU as transformers does, then move it.
    model.rotary_emb = type(model.rotary_emb)(config=model.config).to(device)


def load_text_encoder(path: str | Path, tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
                      device: torch.device | str | None = None,
                      dtype: torch.dtype | str | None = None) -> Flux2TextEncoder:
    """Load a Qwen3 (klein) or Mistral 3 (dev) text encoder from an HF/diffusers folder or a ComfyUI file.

    `tokenizer` overrides where the tokenizer comes from (a folder, a tekken.json, or a tokenizer object).
    Weights go straight to `device` in the compute dtype (`devices.resolve_dtype`).
    """
    path = Path(path)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    located = _locate(path)
    with ExitStack() as stack:
        tensors = _TensorFiles(located.weights, stack)
        prefix = _decoder_prefix(path, tensors)
        kind = _kind_of(tensors, prefix)
        text_tokenizer = _resolve_tokenizer(located, tensors, kind, tokenizer)
        if located.config_dir is not None:
            config = _config_from_folder(located.config_dir, kind)
        else:
            config = _config_from_shapes(path, tensors, prefix, kind)
        model = _build_model(kind, config)
        _stream_weights(model, tensors, prefix, path, device, dtype)
    return Flux2TextEncoder(kind, model, text_tokenizer, device=device)


def text_encoder_output_dim(path: str | Path) -> int:
    """Width of the prompt embeddings this text encoder would produce, read from tensor shapes only."""
    path = Path(path)
    with ExitStack() as stack:
        tensors = _TensorFiles(_locate(path).weights, stack)
        prefix = _decoder_prefix(path, tensors)
        hidden_size = tensors.shape(f"{prefix}embed_tokens.weight")[1]
        return len(TEXT_ENCODER_SPECS[_kind_of(tensors, prefix)].layer_taps) * hidden_size
