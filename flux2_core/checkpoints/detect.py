"""What a checkpoint is (DiT, VAE, text encoder, LoRA), which model family, which file layout; `flux2 info`.

Everything is decided from the header (names, shapes, dtypes), so inspecting any file is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping

import torch

from ..errors import CheckpointError, Flux2Error
from ..variants import FULL_SIZE_DIT, DiTConfig, guess_variant
from ..vae import VAEConfig
from .dit_keys import diffusers_to_bfl
from .gguf import GGUFSource, quant_type_counts
from .quant import Fp8Layout, detect_fp8_layout
from .reader import CheckpointSource, open_checkpoint
from .vae_keys import diffusers_vae_to_bfl, is_diffusers_vae

# One tensor that only a given kind of file has, and the prefix-free name it has there.
_DIT_BFL_MARKER = "single_stream_modulation.lin.weight"
_DIT_DIFFUSERS_MARKER = "single_stream_modulation.linear.weight"
_FLUX1_DIT_MARKER = "double_blocks.0.img_mod.lin.weight"
_VAE_MARKER = "decoder.conv_in.weight"
_TEXT_LAYER_MARKER = "layers.0.self_attn.q_proj.weight"
_LORA_WORDS = ("lora_down", "lora_up", "lora_A", "lora_B", ".lokr_", ".hada_")

_FAMILY_OF_FULL_SIZE = {"dev": "flux2-dev", "klein-9b": "klein-9b", "klein-4b": "klein-4b"}
_QWEN3_BY_WIDTH = {2560: "qwen3-4b", 4096: "qwen3-8b"}
_MISTRAL3_WIDTH = 5120  # Mistral-Small 3.x 24B, the FLUX.2-dev text encoder
# Component folders of a diffusers pipeline, in the order `flux2 info` describes them.
PIPELINE_COMPONENTS = ("transformer", "vae", "text_encoder")


# `flux2 demo-models` writes this into the metadata of every demo DiT and VAE, so `flux2 info` and
# `flux2 serve` can tell a user that a model folder still holds random stand-ins (whose images are noise).
DEMO_MARKER_KEY = "flux2_demo"
DEMO_MARKER = {DEMO_MARKER_KEY: "tiny random weights written by `flux2 demo-models`; images are noise"}


# ... and this file into the tokenizer folder it writes next to a demo Qwen3 text encoder, so the loader can
# refuse that tiny tokenizer for a real text encoder put in the demo file's place.
DEMO_TOKENIZER_FILE = "flux2_demo_tokenizer.txt"


def is_demo_model(metadata: Mapping[str, str]) -> bool:
    return DEMO_MARKER_KEY in metadata


def is_demo_tokenizer(folder: str | os.PathLike) -> bool:
    return (Path(folder) / DEMO_TOKENIZER_FILE).is_file()


@dataclass
class CheckpointInfo:
    path: str
    kind: str  # "dit" | "vae" | "text_encoder" | "lora" | "unknown"
    family: str  # "flux2-dev", "klein-4b", "klein-9b", "flux2-custom", "flux2-vae", "qwen3-4b", "mistral3", ...
    format: str  # "bfl", "comfyui", "diffusers", "comfyui-fp8-mixed", "scaled-fp8", "bfl-fp8", "fp8", "hf", "gguf", ...
    variant: str | None  # the VARIANTS key for a FLUX.2 DiT
    dtypes: dict[str, int]  # dtype name (GGUF: quant type, "Q4_K", "F32", ...) -> tensor count
    parameters: int  # weights only: fp8 scales and quantization markers are not counted
    tensors: int
    file_size: int
    key_prefix: str
    details: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # What the loaders build from, worked out while describing; not part of `flux2 info` (see `summary`).
    config: DiTConfig | VAEConfig | None = field(default=None, repr=False, compare=False)
    fp8: Fp8Layout | None = field(default=None, repr=False, compare=False)

    def summary(self) -> dict[str, object]:
        """The fields `flux2 info --json` prints."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.repr}

    def describes(self) -> str:
        """A few words for error messages: 'a VAE (flux2-vae, bfl)'."""
        words = {"dit": "a DiT diffusion model", "vae": "a VAE", "text_encoder": "a text encoder",
                 "lora": "a LoRA", "unknown": "no known model"}[self.kind]
        return f"{words} ({self.family}, {self.format})" if self.kind != "unknown" else words


def component_path(path: str | os.PathLike, component: str) -> Path:
    """The `component` folder of a diffusers pipeline folder; any other path unchanged."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / "model_index.json").exists() and (path / component).is_dir():
        return path / component
    return path


def inspect_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Describe a file or folder; a pipeline folder is described by its transformer (others listed in notes)."""
    path = Path(path).expanduser()
    pipeline_parts = [c for c in PIPELINE_COMPONENTS if (path / c).is_dir()] if (path / "model_index.json").exists() else []
    target = path / pipeline_parts[0] if pipeline_parts else path
    with open_checkpoint(target) as source:
        info = describe_source(source)
    if pipeline_parts:
        info.notes.insert(0, f"diffusers pipeline folder with {', '.join(pipeline_parts)}; described: {target.name}/")
    return info


def describe_source(source: CheckpointSource) -> CheckpointInfo:
    keys = source.keys()
    fp8 = detect_fp8_layout(source)
    auxiliary = fp8.auxiliary_keys if fp8 else set()
    weights = [k for k in keys if k not in auxiliary]
    info = CheckpointInfo(
        path=str(source.path), kind="unknown", family="unknown", format="unknown", variant=None,
        dtypes=dict(Counter(_dtype_name(source.dtype(k)) for k in keys).most_common()),
        parameters=sum(_numel(source.shape(k)) for k in weights),
        tensors=len(keys), file_size=source.file_size, key_prefix="", fp8=fp8,
    )
    for describe in (_describe_lora, _describe_dit, _describe_vae, _describe_text_encoder):
        try:
            described = describe(source, weights, info)
        except CheckpointError as error:
            # The config readers work on bare name -> shape maps and do not know the file.
            if str(source.path) in str(error):
                raise
            raise CheckpointError(f"{source.path}: {error}") from None
        if described:
            break
    else:
        info.notes.append(f"no FLUX.2 DiT, VAE, text encoder or LoRA tensor names; first names: {sorted(keys)[:3]}")
    if fp8 is not None and info.kind in ("dit", "text_encoder"):
        info.format = fp8.format
        info.details["fp8_layers"] = len(fp8.weights)
    if isinstance(source, GGUFSource):
        _describe_gguf(source, info)
    if is_demo_model(source.metadata):
        info.notes.insert(0, f"demo model: {source.metadata[DEMO_MARKER_KEY]}")
    return info


def _describe_gguf(source: GGUFSource, info: CheckpointInfo) -> None:
    """GGUF: tensor counts by quant type; BFL-named DiTs keep their blocks quantized (format "gguf")."""
    info.dtypes = quant_type_counts(source)
    info.details["quant_types"] = dict(info.dtypes)
    info.details["gguf_architecture"] = source.metadata.get("general.architecture", "none")
    if info.format in ("bfl", "comfyui"):
        info.format = "gguf"
    elif info.kind != "unknown":
        info.notes.append(f"GGUF with {info.format} names: quantized tensors are dequantized when loading")
        info.format = f"gguf-{info.format}"


def _describe_lora(source: CheckpointSource, weights: list[str], info: CheckpointInfo) -> bool:
    if not any(word in k for k in weights for word in _LORA_WORDS):
        return False
    # Deferred: flux2_core.lora reads files through this package.
    from ..lora.dialects import dialect_of_keys

    info.kind, info.family = "lora", "flux2" if _mentions_flux2_blocks(weights) else "unknown"
    info.format = dialect_of_keys(weights) or "lora"
    info.notes.append("see `flux2 lora info` for dialect, rank and targets")
    return True


def _mentions_flux2_blocks(keys: list[str]) -> bool:
    return any(word in k for k in keys for word in ("double_blocks", "single_blocks", "transformer_blocks",
                                                    "single_transformer_blocks"))


def _describe_dit(source: CheckpointSource, weights: list[str], info: CheckpointInfo) -> bool:
    marker = _find_suffix(weights, (_DIT_BFL_MARKER, _DIT_DIFFUSERS_MARKER, _FLUX1_DIT_MARKER))
    if marker is None:
        return False
    info.kind = "dit"
    if marker.endswith(_FLUX1_DIT_MARKER):
        info.family, info.format = "flux1", "bfl"
        info.key_prefix = marker[: -len(_FLUX1_DIT_MARKER)]
        info.notes.append("a FLUX.1 diffusion model (per-block modulation); FLUX.2 needs a FLUX.2 model")
        return True
    if marker.endswith(_DIT_DIFFUSERS_MARKER):
        info.format = "diffusers"
        info.key_prefix = marker[: -len(_DIT_DIFFUSERS_MARKER)]
    else:
        info.key_prefix = marker[: -len(_DIT_BFL_MARKER)]
        info.format = "comfyui" if info.key_prefix else "bfl"
    info.config = config = DiTConfig.from_shapes(_dit_bfl_shapes(source, weights, info.key_prefix,
                                                                diffusers=info.format == "diffusers"))
    info.family = next((_FAMILY_OF_FULL_SIZE[name] for name, full in FULL_SIZE_DIT.items() if full == config),
                       "flux2-custom")
    info.variant = guess_variant(config, variant_name_hint(source.path), source.metadata)
    info.details.update(hidden_size=config.hidden_size, num_heads=config.num_heads,
                        double_blocks=config.depth_double, single_blocks=config.depth_single,
                        context_dim=config.context_dim, guidance_embed=config.guidance_embed)
    if info.family.startswith("klein"):
        info.notes.append("klein base and distilled share shapes: the variant comes from the file name or metadata")
    return True


def _dit_bfl_shapes(source: CheckpointSource, weights: list[str], prefix: str, diffusers: bool) -> dict[str, tuple[int, ...]]:
    """BFL name -> shape of the DiT tensors among `weights` under `prefix`, from the header alone (diffusers names
    are converted on meta tensors)."""
    names = {k[len(prefix):]: k for k in weights if k.startswith(prefix)}
    if diffusers:
        meta = {name: torch.empty(source.shape(key), device="meta") for name, key in names.items()}
        return {name: tuple(t.shape) for name, t in diffusers_to_bfl(meta).items()}
    return {name: source.shape(key) for name, key in names.items()}


def variant_name_hint(path: Path) -> str:
    """The file name, with the parent folder for a diffusers `transformer/` folder (the repo name says base/klein)."""
    return f"{path.parent.name}/{path.name}"


def _describe_vae(source: CheckpointSource, weights: list[str], info: CheckpointInfo) -> bool:
    marker = _find_suffix(weights, (_VAE_MARKER,))
    if marker is None or _find_suffix(weights, ("encoder.conv_in.weight",)) is None:
        return False
    info.kind = "vae"
    info.key_prefix = marker[: -len(_VAE_MARKER)]
    names = [k[len(info.key_prefix):] for k in weights if k.startswith(info.key_prefix)]
    info.format = "diffusers" if is_diffusers_vae(names) else "bfl"
    z_channels = source.shape(marker)[1]
    info.details["z_channels"] = z_channels
    if z_channels != 32 or "bn.running_mean" not in names:
        info.family = {16: "flux1-vae", 4: "sd-vae"}.get(z_channels, "vae")
        info.notes.append(f"{z_channels} latent channels and no batch-norm statistics: not the FLUX.2 VAE (32 + bn)")
        return True
    info.config = config = _vae_config(source, info.key_prefix, names)
    small = config.decoder_channels != config.encoder_channels
    info.family = "flux2-vae-small-decoder" if small else "flux2-vae"
    info.details.update(encoder_channels=list(config.encoder_channels), decoder_channels=list(config.decoder_channels))
    return True


def _vae_config(source: CheckpointSource, prefix: str, names: list[str]) -> VAEConfig:
    shapes = {name: source.shape(prefix + name) for name in names}
    if is_diffusers_vae(names):
        meta = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
        shapes = {name: tuple(t.shape) for name, t in diffusers_vae_to_bfl(meta).items()}
    return VAEConfig.from_shapes(shapes)


def _describe_text_encoder(source: CheckpointSource, weights: list[str], info: CheckpointInfo) -> bool:
    layer_marker = _find_suffix(weights, (_TEXT_LAYER_MARKER,), avoid=("vision",))
    if layer_marker is None and "tekken_model" not in weights:
        return False
    info.kind = "text_encoder"
    info.format = "hf"
    embed = _find_suffix(weights, ("embed_tokens.weight",), avoid=("vision",))
    width = source.shape(embed)[1] if embed else None
    is_qwen3 = layer_marker is not None and layer_marker.replace("q_proj.weight", "q_norm.weight") in weights
    if is_qwen3:
        info.family = _QWEN3_BY_WIDTH.get(width, "qwen3")
    elif width == _MISTRAL3_WIDTH or "tekken_model" in weights:
        info.family = "mistral3"
    else:
        info.family = "unknown"
        info.notes.append(f"a transformer text model of width {width}; FLUX.2 uses Qwen3 (klein) or Mistral 3 (dev)")
    info.details["hidden_size"] = width
    info.details["layers"] = sum(1 for k in weights if k.endswith("self_attn.q_proj.weight") and "vision" not in k)
    if "tekken_model" in weights:
        info.notes.append("carries its tokenizer (tekken_model)")
    return True


def _find_suffix(keys: list[str], suffixes: tuple[str, ...], avoid: tuple[str, ...] = ()) -> str | None:
    """The shortest key that is one of `suffixes` behind an optional dotted prefix, skipping keys with `avoid`."""
    found = [k for k in keys for s in suffixes
             if (k == s or k.endswith("." + s)) and not any(word in k for word in avoid)]
    return min(found, key=len) if found else None


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------------------------
# `flux2 info PATH [--json]`

def info_command(args: argparse.Namespace) -> int:
    if getattr(args, "plan", False):
        from ..memory.estimate import plan_command
        return plan_command(args)
    if not args.path:
        print("flux2 info: expected a model file or folder (or --plan --dit FILE ...)", file=sys.stderr)
        return 2
    try:
        info = inspect_checkpoint(args.path)
    except Flux2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info.summary(), indent=2))
    else:
        print(format_info(info))
    return 0


def format_info(info: CheckpointInfo) -> str:
    rows = [
        ("path", info.path),
        ("kind", info.kind),
        ("family", info.family),
        ("format", info.format),
    ]
    if info.variant:
        rows.append(("variant", info.variant))
    rows += [
        ("parameters", f"{info.parameters:,}"),
        ("tensors", str(info.tensors)),
        ("dtypes", ", ".join(f"{name} x{count}" for name, count in info.dtypes.items())),
        ("file size", f"{info.file_size:,} bytes ({info.file_size / 1e9:.2f} GB)"),
    ]
    if info.key_prefix:
        rows.append(("key prefix", info.key_prefix))
    rows += [(name.replace("_", " "), _format_value(value)) for name, value in info.details.items()]
    rows += [("note", note) for note in info.notes]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _format_value(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict):  # counts, e.g. GGUF quant types
        return ", ".join(f"{k} x{v}" for k, v in value.items())
    return str(value)
