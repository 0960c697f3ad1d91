"""`flux2 demo-models`: tiny random models in the real file formats, under the names ComfyUI's templates use.

They make every code path runnable without the real weights (tens of GB): a template that loads
`flux-2-klein-4b.safetensors`, `qwen_3_4b.safetensors` and `flux2-vae.safetensors` runs unchanged and
produces a (meaningless) image in a second. Files are written into ComfyUI's folder layout
(diffusion_models/, text_encoders/, vae/), are the same on every run (seeded), and existing files are
never overwritten.

Each DiT's context width equals 3 x the hidden size of the text encoder it pairs with in the templates:
klein 4B and dev read 96-wide prompts (Qwen3 / Mistral with hidden 32), klein 9B reads 144 (Qwen3 hidden 48).
The set covers every file the official `image_flux2*` templates name, the dev templates' Turbo LoRAs too.
Every file carries the DEMO_MARKER metadata (a Qwen3 tokenizer folder a marker file), so `flux2 info`,
`flux2 serve` and the tokenizer lookup can tell demo files from real ones.
"""

from __future__ import annotations

import argparse
import math
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoints.detect import DEMO_MARKER
from .checkpoints.quant import quantize_state_dict
from .dit import Flux2DiT
from .text_encoders import TEXT_ENCODER_SPECS
from .vae import Flux2VAE, VAEConfig
from .variants import DiTConfig

DEMO_HEAD_DIM = 32
DEMO_HEADS = 2
# Four VAE levels keep the real 16x reduction; widths are multiples of the 32 GroupNorm groups.
DEMO_VAE = VAEConfig(base_channels=32, channel_multipliers=(1, 2, 2, 2), decoder_channels=(32, 64, 64, 64))
DEMO_VAE_SMALL_DECODER = VAEConfig(base_channels=32, channel_multipliers=(1, 2, 2, 2),
                                   decoder_channels=(32, 32, 64, 32))
COMFYUI_DIT_PREFIX = "model.diffusion_model."


@dataclass(frozen=True)
class DemoTextEncoder:
    file: str
    kind: str  # "qwen3" | "mistral3"
    hidden: int
    quantization: str | None = None  # write_tiny_text_encoder's "fp8mixed"

    @property
    def output_dim(self) -> int:
        return len(TEXT_ENCODER_SPECS[self.kind].layer_taps) * self.hidden


@dataclass(frozen=True)
class DemoDiT:
    file: str
    text_encoder: DemoTextEncoder
    guidance_embed: bool
    layout: str  # "bfl" (plain bf16) or a quant.quantize_state_dict layout
    key_prefix: str = ""


QWEN3_4B = DemoTextEncoder("qwen_3_4b.safetensors", "qwen3", hidden=32)
QWEN3_8B = DemoTextEncoder("qwen_3_8b_fp8mixed.safetensors", "qwen3", hidden=48, quantization="fp8mixed")
MISTRAL3 = DemoTextEncoder("mistral_3_small_flux2_bf16.safetensors", "mistral3", hidden=32)
MISTRAL3_FP8 = DemoTextEncoder("mistral_3_small_flux2_fp8.safetensors", "mistral3", hidden=32, quantization="fp8mixed")
DEMO_TEXT_ENCODERS = (QWEN3_4B, QWEN3_8B, MISTRAL3, MISTRAL3_FP8)

DEMO_DITS = (
    DemoDiT("flux-2-klein-4b.safetensors", QWEN3_4B, guidance_embed=False, layout="bfl"),
    DemoDiT("flux-2-klein-base-4b.safetensors", QWEN3_4B, guidance_embed=False, layout="bfl"),
    DemoDiT("flux-2-klein-4b-fp8.safetensors", QWEN3_4B, guidance_embed=False, layout="bfl-fp8"),
    DemoDiT("flux-2-klein-base-4b-fp8.safetensors", QWEN3_4B, guidance_embed=False, layout="bfl-fp8"),
    DemoDiT("flux-2-klein-9b-fp8.safetensors", QWEN3_8B, guidance_embed=False, layout="bfl-fp8"),
    DemoDiT("flux-2-klein-base-9b-fp8.safetensors", QWEN3_8B, guidance_embed=False, layout="bfl-fp8"),
    DemoDiT("flux-2-klein-9b-kv-fp8.safetensors", QWEN3_8B, guidance_embed=False, layout="bfl-fp8"),
    DemoDiT("flux2_dev_fp8mixed.safetensors", MISTRAL3, guidance_embed=True, layout="comfyui-fp8-mixed",
            key_prefix=COMFYUI_DIT_PREFIX),
)
DEMO_VAES = (("flux2-vae.safetensors", DEMO_VAE), ("full_encoder_small_decoder.safetensors", DEMO_VAE_SMALL_DECODER))
# The Turbo LoRAs of the dev templates (image_flux2, image_flux2_text_to_image; image_flux2_fp8): random low-rank
# changes on every block layer of the dev demo DiT, in ComfyUI's dialect.
DEMO_LORAS = ("Flux_2-Turbo-LoRA_comfyui.safetensors", "Flux2TurboComfyv2.safetensors")
DEMO_LORA_RANK = 4


def demo_dit_config(context_dim: int, guidance_embed: bool) -> DiTConfig:
    return DiTConfig(hidden_size=DEMO_HEAD_DIM * DEMO_HEADS, num_heads=DEMO_HEADS, depth_double=1, depth_single=1,
                     context_dim=context_dim, guidance_embed=guidance_embed, head_dim=DEMO_HEAD_DIM,
                     axes_dim=(DEMO_HEAD_DIM // 4,) * 4)


def random_dit(config: DiTConfig, seed: int, dtype: torch.dtype = torch.float32) -> Flux2DiT:
    """Every weight random (fan-in scaled), norm scales near 1, so activations stay in a sane range."""
    model = Flux2DiT(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.3 * noise if param.ndim == 1 else noise / math.sqrt(param.shape[1]))
    return model.to(dtype).eval()


def random_vae(config: VAEConfig, seed: int) -> Flux2VAE:
    """Every tensor random, GroupNorm affines and batch-norm statistics included (running_var positive)."""
    model = Flux2VAE(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name == "bn.num_batches_tracked":
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name == "bn.running_var":
                tensor.copy_(0.5 + noise.abs())
            elif tensor.ndim > 1:
                tensor.copy_(noise / math.sqrt(tensor[0].numel()))
            elif name.endswith("weight"):
                tensor.copy_(1.0 + 0.2 * noise)
            else:
                tensor.copy_(0.2 * noise)
    return model.eval()


def _write_dit(spec: DemoDiT, path: Path, seed: int) -> None:
    config = demo_dit_config(spec.text_encoder.output_dim, spec.guidance_embed)
    weights = {spec.key_prefix + name: tensor.contiguous()
               for name, tensor in random_dit(config, seed, torch.bfloat16).state_dict().items()}
    metadata: dict[str, str] = {}
    if spec.layout != "bfl":
        weights, metadata = quantize_state_dict(weights, spec.layout)
    save_file(weights, str(path), metadata={**metadata, **DEMO_MARKER})


def _write_vae(config: VAEConfig, path: Path, seed: int) -> None:
    save_file({name: t.contiguous() for name, t in random_vae(config, seed).state_dict().items()}, str(path),
              metadata=DEMO_MARKER)


def _write_text_encoder(spec: DemoTextEncoder, path: Path, seed: int) -> None:
    # Imported here: transformers is slow to import and only text encoders need it.
    from .demo_tokenizers import write_tiny_text_encoder

    write_tiny_text_encoder(spec.kind, path, seed=seed, hidden=spec.hidden, quantization=spec.quantization, demo=True)


def _write_lora(path: Path, seed: int) -> None:
    from .lora import lora_from_state_dict, save_lora

    dev = next(spec for spec in DEMO_DITS if spec.guidance_embed)
    dit = Flux2DiT(demo_dit_config(dev.text_encoder.output_dim, dev.guidance_embed), device="meta")
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, layer in dit.named_modules():
        if isinstance(layer, torch.nn.Linear) and name.startswith(("double_blocks.", "single_blocks.")):
            down = torch.randn(DEMO_LORA_RANK, layer.in_features, generator=generator) / math.sqrt(layer.in_features)
            tensors[f"diffusion_model.{name}.lora_A.weight"] = down
            tensors[f"diffusion_model.{name}.lora_B.weight"] = 0.1 * torch.randn(layer.out_features, DEMO_LORA_RANK,
                                                                                 generator=generator)
    save_lora(lora_from_state_dict(tensors, DEMO_MARKER, name=str(path)), path, "comfyui")


def write_demo_models(directory: str | Path) -> list[Path]:
    """Write the demo models into `directory` (a ComfyUI models folder); returns the files written now."""
    directory = Path(directory)
    jobs = [(directory / "diffusion_models" / spec.file, partial(_write_dit, spec)) for spec in DEMO_DITS]
    jobs += [(directory / "text_encoders" / spec.file, partial(_write_text_encoder, spec))
             for spec in DEMO_TEXT_ENCODERS]
    jobs += [(directory / "vae" / file, partial(_write_vae, config)) for file, config in DEMO_VAES]
    jobs += [(directory / "loras" / file, _write_lora) for file in DEMO_LORAS]
    written = []
    for path, write in jobs:
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        # Seeded by file name: the same bytes on every run, whatever other files the table lists.
        write(path, zlib.crc32(path.name.encode("utf-8")))
        written.append(path)
    return written


def demo_models_command(args: argparse.Namespace) -> int:
    """`flux2 demo-models [--dir models]`."""
    written = write_demo_models(args.dir)
    for path in written:
        print(f"wrote {path}")
    print(f"{len(written)} demo model file(s) written to {args.dir} (existing files are kept)")
    return 0
