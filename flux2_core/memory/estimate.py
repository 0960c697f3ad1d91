"""Predicted peak memory of a request, phase by phase: text encoding, denoising, VAE decoding.

Each phase needs its model's weights plus working memory (activations). Weights are counted from the
model's tensors (or a file's header: shapes and stored dtypes). Working memory is counted from the token
counts and the widths the tensors give, following what the engine's code keeps alive at its peak:

- DiT step: the single-stream block is the peak (measured and derived: it is never below the double block's).
  Per token of [text 512 | image | references]: the block input and its two sources (2H), linear1's output
  (9H: qkv and the MLP input), q and k after norm and RoPE (2H), the attention output (H), SwiGLU's output (3H)
  and the concatenation linear2 reads (4H): 21 H values, plus the RoPE rotations (head_dim / 2 complex64).
  The sampler adds the prompt embeddings and the packed latent per pass. CFG doubles the batch (both passes run
  as one batch); a reference image of w x h pixels adds (w/16)(h/16) tokens (4096 for 1 MP). With the
  reference K/V cache (klein 9B KV) the references run once on their own, and their keys and values stay for
  the whole call; that pass can be the peak.
- Text encoder: transformers keeps every hidden state (layers kept + 1) for the three taps, plus the larger of
  the last layer's MLP (3 x intermediate + 2H) and attention (3 q + 3 kv widths + H) working set, plus the 4-D
  padding mask (bool and compute dtype, 512 x 512 per prompt), plus the concatenated output (3H).
- VAE decode: the full-resolution level dominates: a resnet block holds its input (C_in channels) and three
  C-channel maps at once; the convolutions add about two C-channel maps of one image as workspace.

Measured against torch's CPU allocator on tiny models in tests/test_memory_estimate.py. On CUDA the kernels'
own workspaces (cuBLAS, cuDNN) come on top and are covered by the manager's reserve.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..devices import resolve_device, resolve_dtype
from ..errors import Flux2Error
from ..sampling import PIXELS_PER_LATENT_CELL
from ..variants import DiTConfig
from ..vae import VAEConfig

TEXT_TOKENS = 512  # prompts are padded to 512 tokens (text_encoders.MAX_TOKENS)
LATENT_CHANNELS = 128
GB = 1e9

# Values per token the DiT's single-stream block keeps alive at its peak, in units of the hidden size (see above).
DIT_VALUES_PER_TOKEN = 21
# Maps of C channels a decoder resnet block holds beside its input at its peak.
VAE_MAPS_PER_BLOCK = 3
# Maps of C channels of one image that CPU convolutions use as workspace.
VAE_CONV_WORKSPACE_MAPS = 2
# With half-precision compute (the engine's CUDA default), cuDNN's convolutions take more: an H200 decoding
# 1024x1024 in bf16 peaked 0.68 GB (2.5 maps of 128 channels) above the CPU-calibrated 1.88 GB.
VAE_CUDNN_WORKSPACE_MAPS = 4.5


class InsufficientMemoryError(Flux2Error):
    """A request needs more memory than the device has."""


# --- what the estimate reads from a model ---------------------------------------------------------------------

@dataclass(frozen=True)
class DiTShape:
    config: DiTConfig
    weight_bytes: int
    reference_kv_cache: bool = False  # klein 9B KV: references run once, their K/V kept for every step


@dataclass(frozen=True)
class TextEncoderShape:
    hidden_size: int
    intermediate_size: int
    query_width: int  # heads x head_dim
    key_value_width: int  # kv heads x head_dim
    layers_kept: int  # the encoder is cut after its last tapped layer
    weight_bytes: int


@dataclass(frozen=True)
class VAEShape:
    config: VAEConfig
    weight_bytes: int


@dataclass(frozen=True)
class MemoryRequest:
    """What a generation asks for. `references`: (width, height) in pixels of each reference image, after the
    pixel cap; `cfg` != 1 runs the negative prompt as a second pass."""

    width: int = 1024
    height: int = 1024
    batch_size: int = 1
    cfg: float = 1.0
    references: tuple[tuple[int, int], ...] = ()

    @property
    def passes(self) -> int:
        return 2 if self.cfg != 1.0 else 1

    @property
    def image_tokens(self) -> int:
        return (self.width // PIXELS_PER_LATENT_CELL) * (self.height // PIXELS_PER_LATENT_CELL)

    @property
    def reference_tokens(self) -> int:
        return sum((w // PIXELS_PER_LATENT_CELL) * (h // PIXELS_PER_LATENT_CELL) for w, h in self.references)


@dataclass(frozen=True)
class PhaseEstimate:
    name: str
    weight_bytes: int
    working_bytes: int

    @property
    def peak_bytes(self) -> int:
        return self.weight_bytes + self.working_bytes


@dataclass(frozen=True)
class MemoryPlan:
    request: MemoryRequest
    compute_dtype: torch.dtype
    phases: tuple[PhaseEstimate, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def peak_bytes(self) -> int:
        """The most any phase needs with only its own model on the device (the manager evicts the others)."""
        return max(phase.peak_bytes for phase in self.phases)

    @property
    def all_resident_bytes(self) -> int:
        """Every model on the device at once, plus the largest working memory."""
        return sum(p.weight_bytes for p in self.phases) + max(p.working_bytes for p in self.phases)

    def phase(self, name: str) -> PhaseEstimate:
        return next(p for p in self.phases if p.name == name)

    def table(self) -> str:
        r = self.request
        rows = [f"request: {r.width}x{r.height}, batch {r.batch_size}, cfg {r.cfg:g}, "
                f"{len(r.references)} reference image(s) ({r.reference_tokens} tokens), compute {self.compute_dtype}",
                f"{'phase':<14}{'weights GB':>12}{'working GB':>12}{'peak GB':>10}"]
        rows += [f"{p.name:<14}{p.weight_bytes / GB:>12.3f}{p.working_bytes / GB:>12.3f}{p.peak_bytes / GB:>10.3f}"
                 for p in self.phases]
        rows.append(f"peak, one model on the device at a time: {self.peak_bytes / GB:.3f} GB")
        rows.append(f"peak, all models resident:              {self.all_resident_bytes / GB:.3f} GB")
        rows += [f"note: {note}" for note in self.notes]
        return "\n".join(rows)

    def as_dict(self) -> dict[str, Any]:
        return {"phases": {p.name: {"weight_bytes": p.weight_bytes, "working_bytes": p.working_bytes,
                                    "peak_bytes": p.peak_bytes} for p in self.phases},
                "peak_bytes": self.peak_bytes, "all_resident_bytes": self.all_resident_bytes}


# --- working memory of each phase -----------------------------------------------------------------------------

def dit_step_working_bytes(dit: DiTShape, request: MemoryRequest, compute_dtype: torch.dtype) -> int:
    """Activations of one sampling step (one DiT forward over every pass, plus the sampler's tensors)."""
    config, a = dit.config, _itemsize(compute_dtype)
    batch = request.batch_size * request.passes
    image_tokens = request.image_tokens
    references = request.reference_tokens
    in_forward = TEXT_TOKENS + image_tokens + (0 if dit.reference_kv_cache else references)
    rotation_bytes = config.head_dim // 2 * 8  # complex64 per rotated pair
    per_token = DIT_VALUES_PER_TOKEN * config.hidden_size * a + rotation_bytes
    forward = batch * in_forward * per_token
    sampler = batch * (TEXT_TOKENS * config.context_dim + (image_tokens + references) * LATENT_CHANNELS) * a
    if not (dit.reference_kv_cache and references):
        return forward + sampler
    # KV cache: the references run once on their own first (a forward over their tokens), leaving keys and
    # values of every block for the whole call; each step joins one block's cached keys and values to its own.
    cached_kv = 2 * (config.depth_double + config.depth_single) * references * config.hidden_size * a
    reference_pass = references * per_token + cached_kv
    step = forward + cached_kv + 2 * batch * references * config.hidden_size * a
    return max(reference_pass, step) + sampler


def text_encode_working_bytes(encoder: TextEncoderShape, prompts: int, compute_dtype: torch.dtype) -> int:
    """Activations of encoding `prompts` prompts in one batch."""
    a, h = _itemsize(compute_dtype), encoder.hidden_size
    kept_states = encoder.layers_kept * h
    last_layer = max(h + 3 * h,  # the last hidden state and the output concatenation
                     3 * encoder.intermediate_size + 2 * h,
                     # q, k, v, q and k rotated, RoPE's temporary
                     3 * encoder.query_width + 3 * encoder.key_value_width + h)
    mask = TEXT_TOKENS * (1 + a)  # the boolean padding mask and its additive form, per token
    return prompts * TEXT_TOKENS * ((kept_states + last_layer) * a + mask)


def vae_decode_working_bytes(vae: VAEShape, request: MemoryRequest, compute_dtype: torch.dtype) -> int:
    """Activations of decoding the batch at full size; each level of the decoder runs at its own resolution."""
    a = _itemsize(compute_dtype)
    config = vae.config
    channels = config.decoder_channels  # up.0 (full resolution) ... up.n (lowest)
    pixels = request.width * request.height
    peak = 0
    for level, width in enumerate(channels):
        level_pixels = pixels // 4 ** level
        below = channels[level + 1] if level + 1 < len(channels) else width  # the first block's input
        peak = max(peak, request.batch_size * level_pixels * (below + VAE_MAPS_PER_BLOCK * width))
    maps = VAE_CONV_WORKSPACE_MAPS if compute_dtype == torch.float32 else VAE_CUDNN_WORKSPACE_MAPS
    workspace = int(maps * channels[0] * pixels)
    return (peak + workspace) * a


def step_working_bytes(dit: Any, noise_shape: Sequence[int], cfg: float = 1.0,
                       reference_latents: Sequence[torch.Tensor] = (), reference_kv_cache: bool = False) -> int:
    """`dit_step_working_bytes` for a sampling call about to run: noise [B, 128, h, w], references [1, 128, h, w]
    (what the pipeline and the sampler nodes pass to `MemoryManager.use` so activations find room too)."""
    cell = PIXELS_PER_LATENT_CELL
    batch, _channels, height, width = noise_shape
    request = MemoryRequest(width * cell, height * cell, batch, cfg,
                            tuple((r.shape[-1] * cell, r.shape[-2] * cell) for r in reference_latents))
    shape = dit_shape(dit)
    if reference_kv_cache != shape.reference_kv_cache:
        shape = DiTShape(shape.config, shape.weight_bytes, reference_kv_cache)
    return dit_step_working_bytes(shape, request, dit.compute_dtype)


def decode_working_bytes(vae: Any, latent_shape: Sequence[int]) -> int:
    """`vae_decode_working_bytes` for decoding latents of `latent_shape` [B, 128, h, w] with a loaded VAE."""
    cell = PIXELS_PER_LATENT_CELL
    batch, _channels, height, width = latent_shape
    dtype = next(vae.parameters()).dtype
    return vae_decode_working_bytes(vae_shape(vae), MemoryRequest(width * cell, height * cell, batch), dtype)


def estimate(request: MemoryRequest, dit: DiTShape, text_encoder: TextEncoderShape | None = None,
             vae: VAEShape | None = None, compute_dtype: torch.dtype = torch.bfloat16) -> MemoryPlan:
    """The plan for `request`: one phase per model given."""
    check_request(request)
    phases = []
    if text_encoder is not None:
        phases.append(PhaseEstimate("text encode", text_encoder.weight_bytes,
                                    text_encode_working_bytes(text_encoder, request.passes, compute_dtype)))
    phases.append(PhaseEstimate("denoise", dit.weight_bytes, dit_step_working_bytes(dit, request, compute_dtype)))
    if vae is not None:
        phases.append(PhaseEstimate("VAE decode", vae.weight_bytes,
                                    vae_decode_working_bytes(vae, request, compute_dtype)))
    notes = ()
    if request.references and vae is not None:
        notes = ("reference images are VAE-encoded before denoising; the VAE's encoder needs less than its decode",)
    return MemoryPlan(request, compute_dtype, tuple(phases), notes)


def check_request(request: MemoryRequest) -> None:
    for name, value in (("width", request.width), ("height", request.height)):
        if value < PIXELS_PER_LATENT_CELL or value % PIXELS_PER_LATENT_CELL:
            raise Flux2Error(f"{name}: expected a multiple of {PIXELS_PER_LATENT_CELL} px, found {value}")
    if request.batch_size < 1:
        raise Flux2Error(f"batch_size: expected an integer >= 1, found {request.batch_size}")


# --- refusing what cannot fit ---------------------------------------------------------------------------------

def check_fits(plan: MemoryPlan, available_bytes: int | None = None, what: str = "this request") -> None:
    """Raise `InsufficientMemoryError` ("needs 41.2 GB, 23.0 GB available") when the plan's largest phase does
    not fit in `available_bytes` (default: the memory manager's weight budget on its device; unlimited on the
    CPU). Block streaming, where available, can run a phase whose weights do not fit; this check does not
    count on it."""
    if available_bytes is None:
        from .residency import default_manager

        available_bytes = default_manager().budget_bytes
    if available_bytes is None or plan.peak_bytes <= available_bytes:
        return
    worst = max(plan.phases, key=lambda p: p.peak_bytes)
    raise InsufficientMemoryError(
        f"{what} needs {plan.peak_bytes / GB:.1f} GB, {available_bytes / GB:.1f} GB available "
        f"({worst.name}: {worst.weight_bytes / GB:.1f} GB of weights + {worst.working_bytes / GB:.1f} GB working "
        f"memory); use a smaller size or batch, fp8 weights, or --lowvram")


# --- shapes from loaded models --------------------------------------------------------------------------------

def dit_shape(model: Any) -> DiTShape:
    from ..variants import VARIANTS
    from .residency import model_size_bytes

    variant = getattr(model, "variant", None)
    kv = bool(variant in VARIANTS and VARIANTS[variant].reference_kv_cache)
    return DiTShape(model.config, model_size_bytes(model), kv)


def text_encoder_shape(encoder: Any) -> TextEncoderShape:
    """From a `Flux2TextEncoder` (already cut after its last tapped layer)."""
    from .residency import model_size_bytes

    layer = encoder.model.layers[0]
    return TextEncoderShape(
        hidden_size=encoder.model.config.hidden_size,
        intermediate_size=layer.mlp.gate_proj.out_features,
        query_width=layer.self_attn.q_proj.out_features,
        key_value_width=layer.self_attn.k_proj.out_features,
        layers_kept=len(encoder.model.layers),
        weight_bytes=model_size_bytes(encoder))


def vae_shape(model: Any) -> VAEShape:
    from .residency import model_size_bytes

    return VAEShape(model.config, model_size_bytes(model))


# --- shapes from files ----------------------------------------------------------------------------------------

def dit_shape_from_file(path: Any, compute_dtype: torch.dtype, weight_dtype: str | None = None) -> DiTShape:
    """The DiT's config and its weight bytes once loaded: fp8 tensors stay one byte, an fp8 `weight_dtype`
    stores the block linears in one byte, everything else takes the compute dtype."""
    from ..checkpoints.detect import describe_source
    from ..checkpoints.reader import open_checkpoint
    from ..variants import VARIANTS

    with open_checkpoint(path) as source:
        info = describe_source(source)
        _require(info, "dit", path)
        quantize = isinstance(weight_dtype, str) and weight_dtype.startswith("fp8")
        total = 0
        for key in source.keys():
            if not key.startswith(info.key_prefix):
                continue
            numel = math.prod(source.shape(key))
            stored = source.dtype(key)
            name = key[len(info.key_prefix):]
            block_linear = name.endswith(".weight") and len(source.shape(key)) == 2 and "blocks." in name
            if stored.itemsize == 1 and stored.is_floating_point or quantize and block_linear:
                total += numel
            elif stored.is_floating_point:
                total += numel * _itemsize(compute_dtype)
        return DiTShape(info.config, total, bool(info.variant in VARIANTS and VARIANTS[info.variant].reference_kv_cache))


_LAYER = re.compile(r"layers\.(\d+)\.")


def text_encoder_shape_from_file(path: Any, compute_dtype: torch.dtype) -> TextEncoderShape:
    """Widths from the first layer's tensors; weights of the layers the encoder keeps, in the compute dtype
    (fp8 text encoders are dequantized when loaded)."""
    from ..checkpoints.detect import describe_source
    from ..checkpoints.reader import open_checkpoint
    from ..text_encoders import TEXT_ENCODER_SPECS

    with open_checkpoint(path) as source:
        info = describe_source(source)
        _require(info, "text_encoder", path)
        kind = "mistral3" if info.family == "mistral3" else "qwen3"
        kept = TEXT_ENCODER_SPECS[kind].layers_needed
        shapes = {key: source.shape(key) for key in source.keys()}

    def width(suffix: str, axis: int) -> int:
        key = next((k for k in shapes if k.endswith(suffix) and "vision" not in k), None)
        if key is None:
            raise Flux2Error(f"{path}: expected a text encoder tensor ending in {suffix!r}, found none")
        return shapes[key][axis]

    total = 0
    for key, shape in shapes.items():
        layer = _LAYER.search(key)
        if "lm_head" in key or "vision" in key or "multi_modal" in key or (layer and int(layer[1]) >= kept):
            continue
        if key.endswith(("weight", "bias")):
            total += math.prod(shape) * _itemsize(compute_dtype)
    return TextEncoderShape(hidden_size=width("embed_tokens.weight", 1),
                            intermediate_size=width("layers.0.mlp.gate_proj.weight", 0),
                            query_width=width("layers.0.self_attn.q_proj.weight", 0),
                            key_value_width=width("layers.0.self_attn.k_proj.weight", 0),
                            layers_kept=kept, weight_bytes=total)


def vae_shape_from_file(path: Any, compute_dtype: torch.dtype) -> VAEShape:
    from ..checkpoints.detect import describe_source
    from ..checkpoints.reader import open_checkpoint

    with open_checkpoint(path) as source:
        info = describe_source(source)
        _require(info, "vae", path)
        numel = sum(math.prod(source.shape(k)) for k in source.keys()
                    if k.startswith(info.key_prefix) and source.dtype(k).is_floating_point)
    return VAEShape(info.config, numel * _itemsize(compute_dtype))


def plan_for_files(request: MemoryRequest, dit: Any, text_encoder: Any = None, vae: Any = None,
                   device: torch.device | str | None = None, dtype: torch.dtype | str | None = None,
                   weight_dtype: str | None = None) -> MemoryPlan:
    """`estimate` for model files, in the compute dtype the loaders would use on `device` (bf16 when planning
    for CUDA on a machine without it)."""
    device = resolve_device(device)
    planning_elsewhere = dtype is None and device.type == "cuda" and not torch.cuda.is_available()
    compute_dtype = torch.bfloat16 if planning_elsewhere else resolve_dtype(dtype, device)
    return estimate(request, dit_shape_from_file(dit, compute_dtype, weight_dtype),
                    None if text_encoder is None else text_encoder_shape_from_file(text_encoder, compute_dtype),
                    None if vae is None else vae_shape_from_file(vae, compute_dtype), compute_dtype)


def _require(info: Any, kind: str, path: Any) -> None:
    if info.kind != kind:
        raise Flux2Error(f"{path}: expected a {kind.replace('_', ' ')} file, found {info.describes()}")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# --- flux2 info --plan ----------------------------------------------------------------------------------------

def plan_command(args: argparse.Namespace) -> int:
    """`flux2 info --plan --dit FILE [--text-encoder FILE] [--vae FILE] --width W --height H ...`."""
    import json

    if not args.dit:
        print("flux2 info --plan: expected --dit FILE (and optionally --text-encoder / --vae)", file=sys.stderr)
        return 2
    try:
        request = MemoryRequest(args.width, args.height, args.batch_size, args.cfg,
                                tuple(_parse_size(text) for text in args.reference))
        plan = plan_for_files(request, args.dit, args.text_encoder, args.vae, device=args.device, dtype=args.dtype,
                              weight_dtype=args.weight_dtype)
    except (Flux2Error, OSError, ValueError) as exc:
        print(f"flux2 info --plan: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan.as_dict(), indent=2) if args.json else plan.table())
    return 0


def _parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)[xX](\d+)", text.strip())
    if not match:
        raise ValueError(f"--reference: expected WIDTHxHEIGHT in pixels such as 1024x1024, found {text!r}")
    return int(match[1]), int(match[2])
