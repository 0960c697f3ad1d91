"""One loader per model kind. Each builds its model on the meta device from header shapes, then streams the
file's tensors into it one at a time (cast and moved on the way), so loading needs about one model's worth of
memory on the target device and a single tensor of staging on the CPU.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch
from torch import nn

from ..devices import resolve_device, resolve_dtype
from ..dit import Flux2DiT, compile_by_default
from ..errors import CheckpointError
from ..progress import check_interrupt
from ..memory.fp8_matmul import set_fp8_matmul
from ..memory.streaming import BlockStreamer, Offload, StoredTensor, StreamPlan, plan_streaming, stream_loaded_blocks
from ..vae import Flux2VAE
from ..variants import FULL_SIZE_DIT, VARIANTS, DiTConfig, guess_variant
from .detect import CheckpointInfo, component_path, describe_source, variant_name_hint
from .dit_keys import diffusers_to_bfl
from .gguf import GGUFLinear, GGUFSource
from .quant import (FAST_MATMUL_NAMES, WEIGHT_DTYPE_NAMES, Fp8Layout, Fp8Linear, QuantizedWeight,
                    dequantize_tensor, is_block_linear, is_fp8, quantize_weight, read_quantized_weight)
from .reader import CheckpointSource, open_checkpoint
from .vae_keys import diffusers_vae_to_bfl

log = logging.getLogger(__name__)

# Where each kind of file belongs, for "you gave me the wrong file" messages.
_KIND_HOME = {
    "dit": "a diffusion model (models/diffusion_models)",
    "vae": "a VAE (models/vae)",
    "text_encoder": "a text encoder (models/text_encoders)",
    "lora": "a LoRA (models/loras)",
}

# A diffusers DiT tensor's block: the unit converted (q/k/v fused) and streamed together.
_DIFFUSERS_BLOCK = re.compile(r"^((?:single_)?transformer_blocks\.\d+)\.")


@dataclass(frozen=True)
class StoragePlan:
    """How tensors are kept in memory: compute dtype, whether fp8 stays fp8, whether to quantize block linears."""

    compute_dtype: torch.dtype
    keep_fp8: bool  # fp8 (and GGUF-quantized) weights stay quantized in memory
    quantize_to: torch.dtype | None


def storage_plan(dtype: torch.dtype | str | None, weight_dtype: torch.dtype | str | None,
                 device: torch.device) -> StoragePlan:
    """`weight_dtype` as in ComfyUI's UNETLoader: None/"default" keeps the file's storage (fp8 stays fp8),
    "fp8_e4m3fn"/"fp8_e4m3fn_fast"/"fp8_e5m2" stores block linears in fp8, a float dtype dequantizes everything
    into plain weights of that dtype (which then is also the compute dtype)."""
    if weight_dtype in (None, "default"):
        return StoragePlan(resolve_dtype(dtype, device), keep_fp8=True, quantize_to=None)
    fp8_dtype = WEIGHT_DTYPE_NAMES.get(weight_dtype) if isinstance(weight_dtype, str) else weight_dtype
    if isinstance(fp8_dtype, torch.dtype) and is_fp8(fp8_dtype):
        return StoragePlan(resolve_dtype(dtype, device), keep_fp8=True, quantize_to=fp8_dtype)
    plain = resolve_dtype(weight_dtype, device)
    if dtype is not None and resolve_dtype(dtype, device) != plain:
        raise ValueError(f"weight_dtype {weight_dtype!r} stores plain weights, so the compute dtype must match it; "
                         f"found dtype={dtype!r}")
    return StoragePlan(plain, keep_fp8=False, quantize_to=None)


# ---------------------------------------------------------------------------------------------------------------
# DiT

def load_dit(path: str | os.PathLike, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None,
             weight_dtype: torch.dtype | str | None = None, offload: Offload | None = None,
             vram_budget_gb: float | None = None, variant: str | None = None, fp8_matmul: bool | None = None,
             compile: bool | None = None) -> Flux2DiT:
    """A FLUX.2 DiT from a BFL/ComfyUI single file (any fp8 layout), a GGUF file (quantized linears stay
    quantized: `GGUFLinear`), a diffusers `transformer/` folder, a diffusers-named single file, or a pipeline
    folder. Sets `model.variant` and `model.source_path`.

    offload / vram_budget_gb: block streaming (`memory.streaming.plan_streaming` says when); "disk" streams
    from the file and needs a BFL/ComfyUI single file. fp8_matmul: scaled fp8 matmuls for fp8-stored linears
    (default: only with weight_dtype "fp8_e4m3fn_fast"). compile: regional `torch.compile` of the blocks
    (default: `dit.compile_by_default()`, set by `flux2 serve|run --compile`).
    """
    path = component_path(path, "transformer")
    device = resolve_device(device)
    plan = storage_plan(dtype, weight_dtype, device)
    with open_checkpoint(path) as source:
        stream = _dit_stream_plan(source, describe_source(source).key_prefix, device, offload, vram_budget_gb)
    if stream.offload == "cpu":
        # The whole model into CPU memory first, resident (no second plan: it would stream again).
        model = _load_dit_file(path, torch.device("cpu"), plan, StreamPlan(None, 0), variant)
        model.block_streamer = stream_loaded_blocks([b for _, b in model.named_blocks()], device, stream,
                                                    methods=("reference_forward",))
        model = model.to(device)
    else:
        model = _load_dit_file(path, device, plan, stream, variant)
    set_fp8_matmul(model, weight_dtype in FAST_MATMUL_NAMES if fp8_matmul is None else fp8_matmul)
    return model.compile_blocks() if (compile_by_default() if compile is None else compile) else model


def _dit_stream_plan(source: CheckpointSource, prefix: str, device: torch.device, offload: Offload | None,
                     vram_budget_gb: float | None) -> StreamPlan:
    """Streaming plan from the blocks' sizes as stored in the file (fp8 blocks count one byte per weight)."""
    block_of = re.compile(re.escape(prefix) + r"(double_blocks|single_blocks)\.(\d+)\.")
    sizes: dict[tuple[str, int], int] = {}
    other = 0
    for key in source.keys():
        match = block_of.match(key)
        if match:
            block = (match.group(1), int(match.group(2)))
            sizes[block] = sizes.get(block, 0) + source.entry(key).nbytes
        else:
            other += source.entry(key).nbytes
    ordered = [sizes[k] for k in sorted(sizes, key=lambda k: (k[0] != "double_blocks", k[1]))]
    return plan_streaming(ordered, other, device, offload, vram_budget_gb)


def _load_dit_file(path: Path, device: torch.device, plan: StoragePlan, stream: StreamPlan,
                   variant: str | None) -> Flux2DiT:
    with open_checkpoint(path) as source:
        info = describe_source(source)
        _require_kind(info, "dit", "a FLUX.2 diffusion model (DiT)")
        if info.family == "flux1":
            raise CheckpointError(f"{path}: expected a FLUX.2 diffusion model, found a FLUX.1 one (per-block "
                                  f"modulation weights); FLUX.1 models do not run in this runtime")
        fp8, config = info.fp8, info.config
        weights = [k for k in source.keys() if k.startswith(info.key_prefix) and not (fp8 and k in fp8.auxiliary_keys)]
        model = Flux2DiT(config, device="meta", dtype=plan.compute_dtype)
        streamed = [prefix for prefix, _ in model.named_blocks()[stream.resident_blocks:]] if stream.offload else []
        loader = _Streamer(model, source, device, plan, streamed)
        if streamed and isinstance(source, GGUFSource):
            raise CheckpointError(f"{path}: offload='disk' streams safetensors files; a GGUF file streams with "
                                  f"offload='cpu' (its quantized blocks are read into CPU memory once)")
        if info.format == "diffusers":
            if streamed:
                raise CheckpointError(f"{path}: offload='disk' streams a BFL/ComfyUI single file; found diffusers "
                                      f"naming (q/k/v stored apart). Use offload='cpu' for this folder")
            if fp8 is not None:
                raise CheckpointError(f"{path}: fp8 weights in diffusers naming are not supported; expected a "
                                      f"bf16/fp32 diffusers folder or a BFL/ComfyUI fp8 single file")
            loader.load_diffusers_dit(weights, info.key_prefix)
        else:
            loader.load_named({k[len(info.key_prefix):]: k for k in weights}, fp8)
        loader.finish("FLUX.2 DiT")
        model.variant = _pick_variant(variant, config, path, source)
    if streamed:
        blocks = dict(model.named_blocks())
        model.block_streamer = BlockStreamer([blocks[p] for p in streamed], [loader.deferred[p] for p in streamed],
                                             device, "disk", methods=("reference_forward",))
    model.source_path = str(path)
    return model.eval().requires_grad_(False)


def _pick_variant(variant: str | None, config: DiTConfig, path: Path, source: CheckpointSource) -> str:
    if variant is None:
        return guess_variant(config, variant_name_hint(path), source.metadata)
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {sorted(VARIANTS)}, found {variant!r}")
    architecture = FULL_SIZE_DIT[VARIANTS[variant].family]
    if config in FULL_SIZE_DIT.values() and config != architecture:
        raise ValueError(f"variant {variant!r} has the {VARIANTS[variant].family} architecture, but {path} holds "
                         f"a model with hidden size {config.hidden_size} and {config.depth_double}+{config.depth_single} blocks")
    return variant


# ---------------------------------------------------------------------------------------------------------------
# VAE

def load_vae(path: str | os.PathLike, device: torch.device | str | None = None,
             dtype: torch.dtype | str | None = None) -> Flux2VAE:
    """The FLUX.2 VAE (full or small decoder) from `ae.safetensors`/`flux2-vae.safetensors`, a diffusers `vae/`
    folder, or a pipeline folder."""
    path = component_path(path, "vae")
    device = resolve_device(device)
    plan = StoragePlan(resolve_dtype(dtype, device), keep_fp8=False, quantize_to=None)
    with open_checkpoint(path) as source:
        info = describe_source(source)
        _require_kind(info, "vae", "the FLUX.2 VAE")
        if not info.family.startswith("flux2-vae"):
            raise CheckpointError(f"{path}: expected the FLUX.2 VAE (32 latent channels + batch-norm statistics), "
                                  f"found {info.describes()}")
        prefix = info.key_prefix
        names = [k[len(prefix):] for k in source.keys() if k.startswith(prefix)]
        model = Flux2VAE(info.config, device="meta", dtype=plan.compute_dtype)
        loader = _Streamer(model, source, device, plan)
        if info.format == "diffusers":
            # Renames need every name at once (decoder levels are counted); the VAE is small (~336 MB fp32).
            loader.place_all(diffusers_vae_to_bfl({name: source.get(prefix + name) for name in names}))
        else:
            loader.load_named({name: prefix + name for name in names}, None)
        loader.finish("FLUX.2 VAE")
    model.source_path = str(path)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------
# Text encoder

def load_text_encoder(path: str | os.PathLike, tokenizer: object = None, device: torch.device | str | None = None,
                      dtype: torch.dtype | str | None = None, offload: Offload | None = None,
                      vram_budget_gb: float | None = None):
    """`text_encoder_files.load_text_encoder`, refusing other kinds of model (named) on the same open."""
    # Imported here so loading a DiT or VAE never pays for transformers.
    from ..text_encoder_files import load_text_encoder as load_text_encoder_file

    def check(source: CheckpointSource) -> None:
        _require_kind(describe_source(source), "text_encoder", "a FLUX.2 text encoder (Qwen3 or Mistral 3)")

    return load_text_encoder_file(path, tokenizer=tokenizer, device=device, dtype=dtype, check=check,
                                  offload=offload, vram_budget_gb=vram_budget_gb)


def _require_kind(info: CheckpointInfo, kind: str, wanted: str) -> None:
    if info.kind == kind:
        return
    where = f"; load it as {_KIND_HOME[info.kind]}" if info.kind in _KIND_HOME else ""
    raise CheckpointError(f"{info.path}: expected {wanted}, found {info.describes()}{where}")


# ---------------------------------------------------------------------------------------------------------------
# Streaming tensors into a meta-built model

class _Streamer:
    """Fills a model built on the meta device, tensor by tensor, with the dtype each parameter was built in.

    Tensors under a `deferred_prefixes` block are not read: `deferred[prefix]` records how to read them later
    (disk block streaming) and the model keeps meta tensors of their final shapes and dtypes.
    """

    def __init__(self, model: nn.Module, source: CheckpointSource, device: torch.device, plan: StoragePlan,
                 deferred_prefixes: list[str] = ()):
        self.model = model
        self.source = source
        self.device = device
        self.plan = plan
        self.unexpected: list[str] = []
        self.deferred: dict[str, list[StoredTensor]] = {prefix: [] for prefix in deferred_prefixes}

    def load_named(self, names: dict[str, str], fp8: Fp8Layout | None) -> None:
        """`names`: model name -> file key, read one at a time; fp8 weights become Fp8Linear or are dequantized."""
        for name, key in names.items():
            check_interrupt()  # loading a large model takes a while: /interrupt is honoured between tensors
            quantized = fp8.weights.get(key) if fp8 else None
            prefix = next((p for p in self.deferred if name.startswith(p)), None)
            if prefix is not None:
                self._defer(prefix, name, key, quantized)
            elif quantized is not None:
                self._place_quantized(name, quantized)
            elif isinstance(self.source, GGUFSource) and self.source.is_quantized(key):
                self._place_gguf(name, key)
            else:
                self._place_read(name, key)

    def load_diffusers_dit(self, weights: list[str], prefix: str) -> None:
        """Convert and place one block at a time: q/k/v of a block must be read together to be fused."""
        groups: dict[str, list[str]] = {}
        for key in weights:
            match = _DIFFUSERS_BLOCK.match(key[len(prefix):])
            groups.setdefault(match.group(1) if match else "", []).append(key)
        for keys in groups.values():
            check_interrupt()
            group = {key[len(prefix):]: self.source.get(key, device=self.device) for key in keys}
            self.place_all(diffusers_to_bfl(group))

    def place_all(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            target = self._target(name, tuple(tensor.shape))
            if target is not None:
                self._set(target, name, tensor)

    def _place_read(self, name: str, key: str) -> None:
        target = self._target(name, self.source.shape(key))
        if target is None:
            return
        module, attr, meta = target
        if self.plan.quantize_to is not None and attr == "weight" and type(module) is nn.Linear and is_block_linear(name):
            weight = self.source.get(key, device=self.device)
            self._replace(name, Fp8Linear.from_weight(*quantize_weight(weight, self.plan.quantize_to)))
            return
        self._set(target, name, self.source.get(key, device=self.device, dtype=meta.dtype))

    def _place_quantized(self, name: str, quantized: QuantizedWeight) -> None:
        target = self._target(name, self.source.shape(quantized.weight_key))
        if target is None:
            return
        module, attr, meta = target
        if attr != "weight" or not isinstance(module, nn.Linear):
            raise CheckpointError(f"{self.source.path}: {quantized.weight_key!r} is stored in fp8 but the model's "
                                  f"{name!r} is not a linear layer weight; expected fp8 only on linear layers")
        weight, scale = read_quantized_weight(self.source, quantized, self.device)
        if self.plan.keep_fp8:
            self._replace(name, Fp8Linear.from_weight(weight, scale))
        else:
            self._set(target, name, dequantize_tensor(weight, scale, meta.dtype))

    def _defer(self, prefix: str, name: str, key: str, quantized: QuantizedWeight | None) -> None:
        """Record how block `prefix` reads `name` at each use: the same reads and conversions as the resident
        path (`_place_read` / `_place_quantized`), the conversions run on the compute device after the copy."""
        target = self._target(name, self.source.shape(quantized.weight_key if quantized else key))
        if target is None:
            return
        module, attr, meta = target
        source, local = self.source, name[len(prefix):]
        layer = local.rpartition(".")[0]
        nbytes = source.entry(key).nbytes
        if quantized is not None:
            if attr != "weight" or not isinstance(module, nn.Linear):
                raise CheckpointError(f"{source.path}: {key!r} is stored in fp8 but the model's {name!r} is not a "
                                      f"linear layer weight; expected fp8 only on linear layers")
            read = lambda: read_quantized_weight(source, quantized)  # noqa: E731
            if self.plan.keep_fp8:
                scale_values = source.entry(quantized.scale_key).shape if quantized.scale_key else ()
                per_row = math.prod(scale_values) > 1
                self._replace_meta(name, Fp8Linear(module.in_features, module.out_features,
                                                   fp8_dtype=quantized.fp8_dtype, per_channel=per_row, device="meta"))
                finish = lambda parts: {f"{layer}.weight": parts[0], f"{layer}.weight_scale": parts[1]}  # noqa: E731
            else:
                finish = lambda parts: {local: dequantize_tensor(*parts, meta.dtype)}  # noqa: E731
        elif (self.plan.quantize_to is not None and attr == "weight" and type(module) is nn.Linear
              and is_block_linear(name)):
            fp8_dtype = self.plan.quantize_to
            self._replace_meta(name, Fp8Linear(module.in_features, module.out_features, fp8_dtype=fp8_dtype,
                                               device="meta"))
            read = lambda: (source.get(key),)  # noqa: E731
            finish = lambda parts: dict(zip((f"{layer}.weight", f"{layer}.weight_scale"),  # noqa: E731
                                            quantize_weight(parts[0], fp8_dtype)))
        else:
            read = lambda: (source.get(key),)  # noqa: E731
            finish = lambda parts: {local: parts[0].to(meta.dtype)}  # noqa: E731
        self.deferred[prefix].append(StoredTensor(read, finish, nbytes=nbytes))

    def _replace_meta(self, name: str, layer: Fp8Linear) -> None:
        parent_name, _, child = name.rpartition(".")[0].rpartition(".")
        setattr(self.model.get_submodule(parent_name), child, layer)

    def _place_gguf(self, name: str, key: str) -> None:
        """A GGUF-quantized linear weight stays in its blocks (GGUFLinear) unless a plain weight dtype was asked."""
        target = self._target(name, self.source.shape(key))
        if target is None:
            return
        module, attr, meta = target
        if self.plan.keep_fp8 and attr == "weight" and isinstance(module, nn.Linear):
            out_features, in_features = meta.shape
            blocks = self.source.read_blocks(key, self.device)
            self._replace(name, GGUFLinear(blocks, self.source.quant_type(key), out_features, in_features))
        else:
            self._set(target, name, self.source.get(key, device=self.device, dtype=meta.dtype))

    def _target(self, name: str, shape: tuple[int, ...]) -> tuple[nn.Module, str, torch.Tensor] | None:
        module_name, _, attr = name.rpartition(".")
        try:
            module = self.model.get_submodule(module_name)
        except AttributeError:
            module = None
        meta = getattr(module, attr, None) if module is not None else None
        if not isinstance(meta, torch.Tensor):
            self.unexpected.append(name)
            return None
        if tuple(meta.shape) != tuple(shape):
            raise CheckpointError(f"{self.source.path}: tensor {name!r} has shape {list(shape)}, expected "
                                  f"{list(meta.shape)} from the other tensors' sizes (mixed or corrupt checkpoint)")
        return module, attr, meta

    def _set(self, target: tuple[nn.Module, str, torch.Tensor], name: str, tensor: torch.Tensor) -> None:
        module, attr, meta = target
        tensor = tensor.to(device=self.device, dtype=meta.dtype)
        if attr in module._parameters:
            module.register_parameter(attr, nn.Parameter(tensor, requires_grad=False))
        else:
            module.register_buffer(attr, tensor)

    def _replace(self, name: str, layer: Fp8Linear | GGUFLinear) -> None:
        module_name = name.rpartition(".")[0]
        parent_name, _, child = module_name.rpartition(".")
        setattr(self.model.get_submodule(parent_name), child, layer.to(self.device))

    def finish(self, what: str) -> None:
        """Raise for tensors the file lacked; BatchNorm's optional step counter starts at 0 when absent."""
        for module in self.model.modules():
            counter = getattr(module, "num_batches_tracked", None) if isinstance(module, nn.BatchNorm2d) else None
            if counter is not None and counter.is_meta:
                module.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long, device=self.device))
        missing = [name for name, t in chain(self.model.named_parameters(), self.model.named_buffers())
                   if t.is_meta and not any(name.startswith(prefix) for prefix in self.deferred)]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise CheckpointError(f"{self.source.path}: expected every {what} tensor, missing {missing[:5]}{more} "
                                  f"(incomplete or mixed checkpoint)")
        if self.unexpected:
            log.warning("%s: ignored %d tensors the %s does not use, e.g. %s", self.source.path, len(self.unexpected),
                        what, self.unexpected[:3])
