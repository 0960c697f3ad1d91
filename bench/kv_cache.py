"""Time a whole `sample()` call with the reference K/V cache (klein 9B KV) against plain references.

    python bench/kv_cache.py                                      # CPU, small random DiT, 4 steps, 1 reference
    python bench/kv_cache.py --refs 2 --steps 8
    python bench/kv_cache.py --size klein-9b --device cuda --dtype bf16   # full-size random klein 9B, 1024^2

Plain references run through the DiT at every step; with the cache they run once (timestep 0, attending only to
each other) and every step attends to their stored keys/values. Same DiT, noise, text and references for both.
The two modes are different conditionings (the KV model is trained for the cached one), so only time is compared.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
from dit_forward import random_weights  # bench/ is on sys.path when this file runs as a script

from flux2_core.devices import resolve_device, resolve_dtype
from flux2_core.dit import Flux2DiT
from flux2_core.sampling import flux2_sigmas, make_noise, sample
from flux2_core.variants import FULL_SIZE_DIT, DiTConfig


@dataclass(frozen=True)
class BenchSize:
    config: DiTConfig
    image_grid: tuple[int, int]  # latent cells (H/16, W/16) of the generated image and of each reference
    text_tokens: int


SIZES = {
    "small": BenchSize(DiTConfig(hidden_size=256, num_heads=2, depth_double=2, depth_single=4, context_dim=384,
                                 guidance_embed=False), (24, 24), 128),  # 384x384 image and references
    "klein-9b": BenchSize(FULL_SIZE_DIT["klein-9b"], (64, 64), 512),  # 1024x1024 image and references
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_sample(model: torch.nn.Module, inputs: dict, kv_cache: bool, warmup: int, iters: int) -> list[float]:
    device = next(model.parameters()).device
    times = []
    for i in range(warmup + iters):
        synchronize(device)
        start = time.perf_counter()
        sample(model, **inputs, reference_kv_cache=kv_cache)
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="compute dtype (default: the device's default)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--refs", type=int, default=1, help="number of reference images, each the image's size")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()

    size = SIZES[args.size]
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    model = Flux2DiT(size.config, device=device, dtype=dtype).eval()
    random_weights(model, seed=0)
    rows, cols = size.image_grid
    inputs = {
        "noise": make_noise(0, (1, 128, rows, cols)),
        "sigmas": flux2_sigmas(args.steps, cols * 16, rows * 16),
        "context": torch.randn(1, size.text_tokens, size.config.context_dim),
        "reference_latents": [torch.randn(1, 128, rows, cols) for _ in range(args.refs)],
    }

    print(f"{args.size} DiT on {device} ({dtype}), {args.steps} steps, {rows * cols} image tokens, "
          f"{args.refs} x {rows * cols} reference tokens, {size.text_tokens} text tokens")
    medians = {}
    for name, kv_cache in (("plain references", False), ("reference K/V cache", True)):
        times = time_sample(model, inputs, kv_cache, args.warmup, args.iters)
        medians[name] = statistics.median(times)
        print(f"  {name:20s} median {medians[name] * 1000:9.1f} ms  (min {min(times) * 1000:.1f} ms, {len(times)} runs)")
    print(f"  speed-up: {medians['plain references'] / medians['reference K/V cache']:.2f}x")


if __name__ == "__main__":
    with torch.no_grad():
        main()
