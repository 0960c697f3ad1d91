"""Loading FLUX.2 text encoders from the files people have.

Accepted: an HF model folder (config.json, safetensors shards, tokenizer files), a diffusers pipeline folder
(text_encoder/ + tokenizer/), or a ComfyUI single file (`qwen_3_4b.safetensors`,
`qwen_3_8b_fp8mixed.safetensors`, `mistral_3_small_flux2_bf16.safetensors` / `_fp8`). Single files carry no
config, so the transformers config is rebuilt from tensor shapes plus the published hyper-parameters of each
family. Tensors are read one at a time (`checkpoints.reader`) into a model built on the meta device, so peak
memory stays about one copy of the weights; fp8 weights are dequantized to the compute dtype on the way.
"""

from __future__ import annotations

import math

import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from flux2_core.checkpoints.detect import component_path, describe_source, is_demo_model, is_demo_tokenizer
from flux2_core.checkpoints.quant import Fp8Layout, dequantize_tensor, detect_fp8_layout, read_quantized_weight
from flux2_core.checkpoints.reader import CheckpointSource, open_checkpoint
from flux2_core.devices import resolve_device, resolve_dtype
from flux2_core.errors import CheckpointError
from flux2_core.progress import check_interrupt
from flux2_core.memory.streaming import BlockStreamer, Offload, StoredTensor, StreamPlan, plan_streaming
from flux2_core.text_encoders import TEXT_ENCODER_SPECS, Flux2TextEncoder, check_tokenizer, truncate_after_last_tap

# transformers takes seconds to import: it is imported where a text encoder or tokenizer is built, so reading
# shapes (`text_encoder_output_dim`) and starting the host do not pay for it.
if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Hyper-parameters a single file cannot tell from its shapes (Qwen3-4B/8B and Mistral Small 3.x configs).
FAMILY_DEFAULTS = {
    "qwen3": {"rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 40960},
    "mistral3": {"rope_theta": 1_000_000_000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
                 "sliding_window": None},
}
# Mistral has no per-head norm to read the head size from; every Mistral Small 3.x / Ministral uses 128.
MISTRAL_HEAD_DIM = 128


def model_classes(kind: str) -> tuple[type, type]:
    """(transformers config class, decoder class) of a text-encoder kind; only that kind's modeling module is
    imported (each takes seconds)."""
    if kind == "qwen3":
        from transformers import Qwen3Config, Qwen3Model

        return Qwen3Config, Qwen3Model
    from transformers import MistralConfig, MistralModel

    return MistralConfig, MistralModel


# Where the decoder's tensors start; the prefix is whatever precedes this in the file.
_FIRST_LAYER_QUERY = "layers.0.self_attn.q_proj.weight"
_TEKKEN_TENSOR = "tekken_model"


@dataclass(frozen=True)
class _Located:
    """Where the weights, config and tokenizer of a text-encoder path are."""

    path: Path
    weights: Path  # a single file, or the folder open_checkpoint reads shards from
    is_single_file: bool

    @property
    def config_dir(self) -> Path | None:
        return self.weights if (self.weights / "config.json").is_file() else None

    def tokenizer_dirs(self, kind: str) -> list[Path]:
        if self.is_single_file:
            parent, stem = self.path.parent, self.path.stem
            beside = [parent / f"{stem}_tokenizer", parent / "tokenizer", parent / f"{kind}_tokenizer"]
            return beside + (installed_qwen3_tokenizer_dirs(self.path) if kind == "qwen3" else [])
        return list(dict.fromkeys([self.path / "tokenizer", self.weights, self.path]))


# Hugging Face repositories whose snapshots carry the Qwen3 tokenizer (all Qwen3 sizes share one), and where.
_HF_QWEN3_TOKENIZER_REPOS = (("models--Qwen--Qwen3-*", ""), ("models--black-forest-labs--FLUX.2-klein-*", "tokenizer"))


def installed_qwen3_tokenizer_dirs(weights_file: Path) -> list[Path]:
    """Qwen3 tokenizers a user may already have, for ComfyUI's single files that carry none: the one a ComfyUI
    install bundles (found by walking up from the models folder, also through a symlink), then Hugging Face
    cache snapshots of the Qwen3 or FLUX.2 klein repositories."""
    found: list[Path] = []
    for start in dict.fromkeys([weights_file.absolute().parent, weights_file.resolve().parent]):
        found += [root / "comfy" / "text_encoders" / "qwen25_tokenizer"
                  for root in (start, *start.parents) if (root / "comfy" / "text_encoders").is_dir()]
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    for pattern, subfolder in _HF_QWEN3_TOKENIZER_REPOS:
        found += sorted(snapshot / subfolder for snapshot in hub.glob(f"{pattern}/snapshots/*"))
    return list(dict.fromkeys(found))


def _locate(path: str | os.PathLike) -> _Located:
    path = Path(path).expanduser()
    # A diffusers pipeline folder keeps the weights in text_encoder/ and the tokenizer in tokenizer/.
    weights = component_path(path, "text_encoder")
    return _Located(path, weights, is_single_file=path.is_file())


def _decoder_prefix(source: CheckpointSource) -> str:
    """The name prefix of the decoder's tensors (`model.`, `model.language_model.`, ...), or a clear error."""
    for key in source.keys():
        if key.endswith(_FIRST_LAYER_QUERY):
            prefix = key[: -len(_FIRST_LAYER_QUERY)]
            if f"{prefix}embed_tokens.weight" in source:
                return prefix
    raise CheckpointError(
        f"{source.path}: expected a Qwen3 or Mistral 3 text encoder (tensors '*{_FIRST_LAYER_QUERY}' and "
        f"'*embed_tokens.weight'), found {describe_source(source).describes()}"
    )


def _kind_of(source: CheckpointSource, prefix: str) -> str:
    # Qwen3 normalizes queries and keys per head; Mistral does not.
    return "qwen3" if f"{prefix}layers.0.self_attn.q_norm.weight" in source else "mistral3"


def _config_from_shapes(source: CheckpointSource, prefix: str, kind: str) -> PretrainedConfig:
    vocab_size, hidden_size = source.shape(f"{prefix}embed_tokens.weight")
    layer_pattern = re.compile(re.escape(prefix) + r"layers\.(\d+)\.")
    layer_count = 1 + max(int(m.group(1)) for key in source.keys() if (m := layer_pattern.match(key)))
    attention = f"{prefix}layers.0.self_attn."
    head_dim = source.shape(f"{attention}q_norm.weight")[0] if kind == "qwen3" else MISTRAL_HEAD_DIM
    query_width = source.shape(f"{attention}q_proj.weight")[0]
    key_width = source.shape(f"{attention}k_proj.weight")[0]
    if query_width % head_dim or key_width % head_dim:
        raise CheckpointError(
            f"{source.path}: expected q_proj/k_proj widths that are multiples of the head size {head_dim}, "
            f"found {query_width} and {key_width}"
        )
    # Only Qwen3 has the option of biased attention projections.
    bias = {"attention_bias": f"{attention}q_proj.bias" in source} if kind == "qwen3" else {}
    config_class, _ = model_classes(kind)
    return config_class(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=layer_count,
        num_attention_heads=query_width // head_dim,
        num_key_value_heads=key_width // head_dim,
        head_dim=head_dim,
        intermediate_size=source.shape(f"{prefix}layers.0.mlp.gate_proj.weight")[0],
        **bias,
        **FAMILY_DEFAULTS[kind],
    )


def _config_from_folder(config_dir: Path, kind: str) -> PretrainedConfig:
    """The decoder config of an HF folder (the text part of a Mistral3 vision-language config)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(config_dir)).get_text_config()
    config_class, _ = model_classes(kind)
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
    # tekken.json first: given one, AutoTokenizer would pick mistral-common's backend when that is installed,
    # which reads "[INST]" and the other template markers in text as plain words.
    if (path / "tekken.json").is_file():
        return tokenizer_from_tekken((path / "tekken.json").read_bytes())
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))
    return None


def check_tokenizer_fits(tokenizer: PreTrainedTokenizerBase, embedding_rows: int, where: str, weights: Path) -> None:
    """Refuse a tokenizer for another vocabulary than the text encoder's embedding table: token ids past the
    table, or a vocabulary far smaller than the table (another model's tokenizer, or the tiny demo one next to
    real weights). Real tables have a few padding rows beyond the tokenizer, never twice its size."""
    size = len(tokenizer)
    highest = max([size - 1, *tokenizer.all_special_ids])
    if highest >= embedding_rows:
        raise CheckpointError(
            f"{where}: expected token ids below the {embedding_rows} rows of the embedding table of {weights}, "
            f"found ids up to {highest} ({size} tokens): a tokenizer for another text encoder"
        )
    if size < embedding_rows // 2:
        raise CheckpointError(
            f"{where}: expected a tokenizer for the {embedding_rows}-row embedding table of {weights}, found only "
            f"{size} tokens: a tokenizer for another text encoder (or the tiny demo one)"
        )


def _resolve_tokenizer(located: _Located, source: CheckpointSource, kind: str,
                       tokenizer: str | Path | PreTrainedTokenizerBase | None,
                       embedding_rows: int) -> PreTrainedTokenizerBase:
    """The tokenizer to use, checked once before any weight is read: its template tokens (`check_tokenizer`)
    and its vocabulary against the embedding table (`check_tokenizer_fits`), naming where it came from."""
    from transformers import PreTrainedTokenizerBase

    def checked(found: PreTrainedTokenizerBase, where: str) -> PreTrainedTokenizerBase:
        check_tokenizer(kind, found, where)
        check_tokenizer_fits(found, embedding_rows, where, located.path)
        return found

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return checked(tokenizer, f"tokenizer {type(tokenizer).__name__}")
    if tokenizer is not None:
        found = _tokenizer_from_path(Path(tokenizer)) if Path(tokenizer).exists() else None
        if found is None:
            raise CheckpointError(
                f"{tokenizer}: expected a tokenizer folder (tokenizer.json / tokenizer_config.json, or tekken.json) "
                f"or a tekken.json file, found nothing usable"
            )
        return checked(found, str(tokenizer))
    if _TEKKEN_TENSOR in source:
        tekken = tokenizer_from_tekken(source.get(_TEKKEN_TENSOR).numpy().tobytes())
        return checked(tekken, f"{located.path}:{_TEKKEN_TENSOR}")
    candidates = located.tokenizer_dirs(kind)
    unsuitable = []
    for candidate in candidates:
        if candidate.is_dir() and is_demo_tokenizer(candidate) and not is_demo_model(source.metadata):
            reason = (f"{candidate}: the tiny demo tokenizer `flux2 demo-models` wrote, but {located.path.name} is "
                      f"not a demo text encoder; delete {candidate} or put the real tokenizer files there")
            log.warning("%s", reason)
            unsuitable.append(reason)
            continue
        if candidate.is_dir() and (found := _tokenizer_from_path(candidate)) is not None:
            try:
                return checked(found, str(candidate))
            except CheckpointError as exc:  # e.g. an older bundled tokenizer without Qwen3's <think> tokens
                unsuitable.append(str(exc))
    where = ", ".join(str(c) for c in candidates) + "".join(f"; skipped {reason}" for reason in unsuitable)
    if located.is_single_file:
        raise CheckpointError(
            f"{located.path}: this single-file {kind} text encoder carries no tokenizer. Put the HF tokenizer "
            f"files (tokenizer.json, tokenizer_config.json) in one of: {where}; or pass tokenizer=<folder>"
        )
    raise CheckpointError(
        f"{located.path}: expected tokenizer files (tokenizer.json / tokenizer_config.json, or tekken.json) in "
        f"one of: {where}; found none. Pass tokenizer=<folder>"
    )


def _stored_weight(source: CheckpointSource, key: str, name: str, fp8: Fp8Layout | None,
                   dtype: torch.dtype) -> StoredTensor:
    """How to read one tensor (`read`, on the CPU as stored) and finish it on the compute device in `dtype`:
    fp8 weights cross to the device in fp8 and are multiplied by their scale there."""
    if fp8 is not None and key in fp8.weights:
        return StoredTensor(read=lambda: read_quantized_weight(source, fp8.weights[key]),
                            finish=lambda parts: {name: dequantize_tensor(*parts, dtype)},
                            nbytes=source.entry(key).nbytes)
    if not source.dtype(key).is_floating_point:
        raise CheckpointError(
            f"{source.path}: tensor {key!r}: expected a float or fp8 weight, found {source.dtype(key)} "
            f"(a quantization this loader does not read)"
        )
    return StoredTensor(read=lambda: (source.get(key),), finish=lambda parts: {name: parts[0].to(dtype)},
                        nbytes=source.entry(key).nbytes)


def _build_model(kind: str, config: PretrainedConfig) -> PreTrainedModel:
    """The decoder with every parameter on the meta device, cut after the last tapped layer."""
    _, model_class = model_classes(kind)
    with torch.device("meta"):
        model = model_class(config)
    return truncate_after_last_tap(model, kind)


def _stream_weights(model: PreTrainedModel, source: CheckpointSource, prefix: str, device: torch.device,
                    dtype: torch.dtype, stream: StreamPlan) -> None:
    """Read the weights into the meta-built model; decoder layers from `stream.resident_blocks` on are left
    meta and handed to a `BlockStreamer` (`model.block_streamer`) when `stream.offload` is set."""
    fp8 = detect_fp8_layout(source)
    streamed_layers = range(stream.resident_blocks, len(model.layers)) if stream.offload else range(0)
    deferred: list[list[StoredTensor]] = [[] for _ in streamed_layers]
    for name, param in list(model.named_parameters()):
        check_interrupt()  # reading a large encoder takes a while: /interrupt is honoured between tensors
        key = prefix + name
        if key not in source:
            raise CheckpointError(f"{source.path}: expected tensor {key!r} (text encoder weight {name}), not found")
        stored_key = fp8.weights[key].weight_key if fp8 is not None and key in fp8.weights else key
        if tuple(source.shape(stored_key)) != tuple(param.shape):
            raise CheckpointError(f"{source.path}: tensor {key!r}: expected shape {tuple(param.shape)}, "
                                  f"found {tuple(source.shape(stored_key))}")
        layer = _layer_index(name)
        if layer in streamed_layers:
            local = name.split(".", 2)[2]  # the name inside its decoder layer
            deferred[layer - streamed_layers.start].append(_stored_weight(source, key, local, fp8, dtype))
            continue
        tensor = _stored_weight(source, key, name, fp8, dtype).to_device(device)[name]
        owner_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(owner_name), attribute, nn.Parameter(tensor, requires_grad=False))
    # The rotary table is computed, not stored: build it on the CPU as transformers does, then move it.
    model.rotary_emb = type(model.rotary_emb)(config=model.config).to(device)
    if stream.offload:
        model.block_streamer = BlockStreamer([model.layers[i] for i in streamed_layers], deferred, device,
                                             stream.offload)


def _layer_index(name: str) -> int | None:
    return int(name.split(".")[1]) if name.startswith("layers.") else None


def _text_encoder_stream_plan(source: CheckpointSource, prefix: str, layers: int, device: torch.device,
                              dtype: torch.dtype, offload: Offload | None, vram_budget_gb: float | None) -> StreamPlan:
    """Streaming plan from the sizes the decoder layers FLUX.2 uses take on the device: every weight there is
    in the compute dtype (fp8 weights cross as fp8 but are dequantized after the copy), so an fp8 file's layers
    count twice their stored bytes in bf16 and a bf16 file's count twice on an fp32 CPU."""
    sizes, other = [0] * layers, 0
    for key in source.keys():
        if not key.startswith(prefix):
            continue
        entry = source.entry(key)
        on_device = math.prod(entry.shape) * dtype.itemsize if entry.dtype.is_floating_point else entry.nbytes
        index = _layer_index(key[len(prefix):])
        if index is None:
            other += on_device
        elif index < layers:
            sizes[index] += on_device
    return plan_streaming(sizes, other, device, offload, vram_budget_gb)


def load_text_encoder(path: str | Path, tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
                      device: torch.device | str | None = None, dtype: torch.dtype | str | None = None,
                      check: Callable[[CheckpointSource], None] | None = None, offload: Offload | None = None,
                      vram_budget_gb: float | None = None) -> Flux2TextEncoder:
    """Load a Qwen3 (klein) or Mistral 3 (dev) text encoder from an HF/diffusers folder or a ComfyUI file.

    `tokenizer` overrides where the tokenizer comes from (a folder, a tekken.json, or a tokenizer object).
    Weights go straight to `device` in the compute dtype (`devices.resolve_dtype`). `check`, when given, sees
    the opened file before anything else is read (`checkpoints.loaders` refuses other kinds of model there).
    offload / vram_budget_gb: stream decoder layers from pinned CPU memory or from the file
    (`memory.streaming.plan_streaming` says when); fp8 files stream in fp8 and are dequantized on the device.
    """
    located = _locate(path)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    with open_checkpoint(located.weights) as source:
        if check is not None:
            check(source)
        prefix = _decoder_prefix(source)
        kind = _kind_of(source, prefix)
        embedding_rows = source.shape(f"{prefix}embed_tokens.weight")[0]
        text_tokenizer = _resolve_tokenizer(located, source, kind, tokenizer, embedding_rows)
        config_dir = located.config_dir
        config = _config_from_folder(config_dir, kind) if config_dir else _config_from_shapes(source, prefix, kind)
        model = _build_model(kind, config)
        stream = _text_encoder_stream_plan(source, prefix, len(model.layers), device, dtype, offload,
                                           vram_budget_gb)
        _stream_weights(model, source, prefix, device, dtype, stream)
    return Flux2TextEncoder(kind, model, text_tokenizer, device=device)


def text_encoder_output_dim(path: str | Path) -> int:
    """Width of the prompt embeddings this text encoder would produce, read from tensor shapes only."""
    with open_checkpoint(_locate(path).weights) as source:
        prefix = _decoder_prefix(source)
        hidden_size = source.shape(f"{prefix}embed_tokens.weight")[1]
        return len(TEXT_ENCODER_SPECS[_kind_of(source, prefix)].layer_taps) * hidden_size
