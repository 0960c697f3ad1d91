"""Tiled against whole-image VAE decode and encode: max error and peak working memory, on the CPU.

    python bench/vae_tiling.py                                   # tiny VAE at 2048x2048, decode and encode
    python bench/vae_tiling.py --vae full --sizes 512,1024       # the full-size architecture, random weights
    python bench/vae_tiling.py --tile 512 --overlap 64 --ops decode

Weights are random (`demo_models.random_vae`), the latent is unit Gaussian noise and the image uniform noise in
[-1, 1]. Peak memory is the process's peak resident memory during the call minus its resident memory before
(Linux: VmHWM reset through /proc/self/clear_refs), so it counts the VAE's working memory and its output,
not the weights. Errors are max |tiled - whole| and that divided by max |whole| (random weights see far:
see README, "GGUF and tiled VAE").
"""

from __future__ import annotations

import argparse
import time

import torch

from flux2_core.demo_models import DEMO_VAE, random_vae
from flux2_core.vae import VAEConfig
from flux2_core.vae_tiling import VAETiling, decode_tiled, decode_working_bytes, encode_tiled

ARCHITECTURES = {"tiny": DEMO_VAE, "full": VAEConfig()}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measured(fn, *args) -> tuple[torch.Tensor, float, int]:
    """(result, seconds, peak bytes above the resident memory at the call)."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current resident size
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    result = fn(*args)
    seconds = time.perf_counter() - start
    return result, seconds, (_status_kib("VmHWM") - before) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", choices=sorted(ARCHITECTURES), nargs="+", default=["tiny"])
    parser.add_argument("--sizes", default="2048", help="square image sizes in pixels, comma separated")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--ops", default="decode,encode")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tiling = VAETiling(args.tile, args.overlap)

    print(f"tile {tiling.tile} px, overlap {tiling.overlap} px, float32, CPU ({torch.get_num_threads()} threads)")
    print("| VAE | size | op | whole s | tiled s | whole peak MB | tiled peak MB | estimate MB | max err | max err / max |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.vae:
        config = ARCHITECTURES[name]
        vae = random_vae(config, seed=0)
        cell = config.downsample_factor
        # One small call of each kind first, so one-time allocations (kernels, thread pools) are not measured.
        vae.encode(vae.decode(torch.zeros(1, config.latent_channels, 2, 2)))
        for size in (int(s) for s in args.sizes.split(",")):
            generator = torch.Generator().manual_seed(size)
            for op in args.ops.split(","):
                if op == "decode":
                    x = torch.randn(1, config.latent_channels, size // cell, size // cell, generator=generator)
                    whole_fn, tiled_fn = vae.decode, lambda x: decode_tiled(vae, x, tiling)
                    estimate = f"{decode_working_bytes(size, size, 1, config) / 2**20:.0f}"
                else:
                    x = torch.rand(1, 3, size, size, generator=generator) * 2 - 1
                    whole_fn, tiled_fn = vae.encode, lambda x: encode_tiled(vae, x, tiling)
                    estimate = ""
                tiled, tiled_s, tiled_peak = measured(tiled_fn, x)
                whole, whole_s, whole_peak = measured(whole_fn, x)
                error = (tiled - whole).abs().max().item()
                print(f"| {name} | {size}x{size} | {op} | {whole_s:.1f} | {tiled_s:.1f} | {whole_peak / 2**20:.0f} | "
                      f"{tiled_peak / 2**20:.0f} | {estimate} | {error:.3g} | {error / whole.abs().max().item():.3g} |",
                      flush=True)
                del tiled, whole


if __name__ == "__main__":
    main()
