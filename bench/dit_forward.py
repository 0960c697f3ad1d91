"""Time one DiT forward: flux2_core's Flux2DiT vs diffusers' Flux2Transformer2DModel, same weights and inputs.

    python bench/dit_forward.py                      # CUDA + klein-4b at 1024^2 if a GPU is present, else CPU + tiny
    python bench/dit_forward.py --size small --device cpu --iters 5
    python bench/dit_forward.py --size klein-4b --dtype bf16 --warmup 3 --iters 10

The diffusers model borrows our weights (converted views, no second copy), so klein-4B needs ~8 GB in bf16.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass

import torch

from flux2_core.checkpoints.dit_keys import bfl_to_diffusers
from flux2_core.devices import resolve_device, resolve_dtype
from flux2_core.dit import Flux2DiT
from flux2_core.variants import FULL_SIZE_DIT, DiTConfig


@dataclass(frozen=True)
class BenchSize:
    config: DiTConfig
    image_grid: tuple[int, int]  # latent cells (H/16, W/16)
    text_tokens: int


SIZES = {
    "tiny": BenchSize(DiTConfig(hidden_size=256, num_heads=2, depth_double=2, depth_single=4, context_dim=384,
                                guidance_embed=False), (16, 16), 64),
    "small": BenchSize(DiTConfig(hidden_size=512, num_heads=4, depth_double=2, depth_single=4, context_dim=768,
                                 guidance_embed=False), (32, 32), 128),
    "klein-4b": BenchSize(FULL_SIZE_DIT["klein-4b"], (64, 64), 512),  # 1024x1024
}


def random_weights(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator, device=param.device)
            param.copy_(1 + 0.1 * noise if param.ndim == 1 else noise / math.sqrt(param.shape[1]))


def diffusers_twin(model: Flux2DiT):
    """diffusers' Flux2Transformer2DModel on our weights (imported here: diffusers is optional for bench/gpu.py)."""
    from diffusers import Flux2Transformer2DModel

    config = model.config
    with torch.device("meta"):
        twin = Flux2Transformer2DModel(
            num_layers=config.depth_double, num_single_layers=config.depth_single,
            attention_head_dim=config.head_dim, num_attention_heads=config.num_heads,
            joint_attention_dim=config.context_dim, axes_dims_rope=config.axes_dim,
            guidance_embeds=config.guidance_embed,
        )
    twin.load_state_dict(bfl_to_diffusers(model.state_dict()), strict=True, assign=True)
    return twin.eval()


def make_inputs(size: BenchSize, device: torch.device, dtype: torch.dtype):
    rows, cols = size.image_grid
    generator = torch.Generator(device=device).manual_seed(1)
    img = torch.randn(1, rows * cols, size.config.in_channels, generator=generator, device=device, dtype=dtype)
    txt = torch.randn(1, size.text_tokens, size.config.context_dim, generator=generator, device=device, dtype=dtype)
    i, j = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    img_ids = torch.stack((torch.zeros_like(i), i, j, torch.zeros_like(i)), dim=-1).reshape(-1, 4).float()
    txt_ids = torch.zeros(size.text_tokens, 4, device=device)
    txt_ids[:, 3] = torch.arange(size.text_tokens, device=device)
    timesteps = torch.tensor([0.7], device=device)
    guidance = torch.tensor([4.0], device=device) if size.config.guidance_embed else None
    return img, img_ids, txt, txt_ids, timesteps, guidance


def time_interleaved(candidates: dict, device: torch.device, warmup: int, iters: int) -> dict:
    """Name -> (median ms per call, last output). The candidates take turns, so background load hits all alike."""
    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1000, out

    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in candidates}
    outputs = {}
    for _ in range(iters):
        for name, fn in candidates.items():
            elapsed, outputs[name] = timed(fn)
            times[name].append(elapsed)
    return {name: (statistics.median(times[name]), outputs[name]) for name in candidates}


def forward_tflop(config: DiTConfig, tokens: int) -> float:
    """Matmul work of one forward (reference section 10): per block 2*13*H^2*N linear + 4*N^2*H attention."""
    hidden, blocks = config.hidden_size, config.depth_double + config.depth_single
    return blocks * (26 * hidden**2 * tokens + 4 * tokens**2 * hidden) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default=None,
                        help="default: klein-4b on CUDA, tiny elsewhere")
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    parser.add_argument("--dtype", default=None, help="fp32, bf16 or fp16; default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    args = parser.parse_args()

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    size_name = args.size or ("klein-4b" if device.type == "cuda" else "tiny")
    size = SIZES[size_name]
    if args.threads:
        torch.set_num_threads(args.threads)

    # Built on meta then filled once, skipping nn.Linear's default init (slow at full size).
    ours = Flux2DiT(size.config, device="meta", dtype=dtype).to_empty(device=device).eval()
    random_weights(ours, seed=0)
    theirs = diffusers_twin(ours)
    img, img_ids, txt, txt_ids, timesteps, guidance = make_inputs(size, device, dtype)

    with torch.inference_mode():
        results = time_interleaved(
            {
                "ours": lambda: ours(img, img_ids[None], txt, txt_ids[None], timesteps, guidance),
                "diffusers": lambda: theirs(hidden_states=img, encoder_hidden_states=txt, timestep=timesteps,
                                            img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0],
            },
            device, args.warmup, args.iters,
        )
    (ours_ms, ours_out), (theirs_ms, theirs_out) = results["ours"], results["diffusers"]
    difference = ((ours_out.float() - theirs_out.float()).abs().max() / theirs_out.float().abs().max()).item()

    tokens = img.shape[1] + txt.shape[1]
    tflop = forward_tflop(size.config, tokens)
    header = ("size", "device", "dtype", "tokens img+txt", "ours ms", "diffusers ms", "ours/diffusers",
              "ours TFLOP/s", "max rel diff")
    row = (size_name, str(device), str(dtype).removeprefix("torch."), f"{img.shape[1]}+{txt.shape[1]}",
           f"{ours_ms:.1f}", f"{theirs_ms:.1f}", f"{ours_ms / theirs_ms:.3f}", f"{tflop / (ours_ms / 1000):.3g}",
           f"{difference:.1e}")
    widths = [max(len(h), len(c)) for h, c in zip(header, row)]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print(" | ".join("-" * w for w in widths))
    print(" | ".join(c.ljust(w) for c, w in zip(row, widths)))


if __name__ == "__main__":
    main()
