"""Time and peak memory of loading a DiT checkpoint, against the file's size.

    python bench/load.py --size small                       # write a small random DiT, load it, print the table
    python bench/load.py --size medium --dir /tmp/f2bench   # klein-4B widths, fewer blocks (~1.6 GB file)
    python bench/load.py --write-klein-4b DIR               # full-size random klein-4B BFL bf16 file (7.75 GB)
    python bench/load.py --file PATH [--device cuda] [--dtype bf16] [--weight-dtype fp8_e4m3fn]

Each load runs in a fresh subprocess that reports its peak resident memory (VmHWM) and its resident memory
after importing torch (the baseline), so the numbers are the loader's and nothing else's. Seconds are with
the file in the page cache (it was just written).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from flux2_core.dit import Flux2DiT
from flux2_core.variants import FULL_SIZE_DIT, DiTConfig

_SAFETENSORS_CODES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}

SIZES: dict[str, DiTConfig] = {
    "small": DiTConfig(hidden_size=512, num_heads=4, depth_double=2, depth_single=4, context_dim=1024,
                       guidance_embed=False),
    "medium": replace(FULL_SIZE_DIT["klein-4b"], depth_double=1, depth_single=3),
    "klein-4b": FULL_SIZE_DIT["klein-4b"],
}


def write_random_dit(path: Path, config: DiTConfig, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> int:
    """Write a random BFL-named DiT one tensor at a time (the writer holds one tensor in memory). Returns bytes."""
    shapes = {name: tuple(t.shape) for name, t in Flux2DiT(config, device="meta").state_dict().items()}
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header so tensor data stays 8-byte aligned
    generator = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape in shapes.items():
            fan_in = shape[-1] if len(shape) > 1 else 1
            tensor = (torch.randn(shape, generator=generator) / fan_in**0.5).to(dtype)
            if len(shape) == 1:
                tensor += 1  # norm scales around 1
            f.write(memoryview(tensor.view(torch.uint8).numpy().reshape(-1)))
    return path.stat().st_size


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child_load(path: str, device: str, dtype: str, weight_dtype: str | None) -> None:
    """Runs in the subprocess: load once, print one JSON line."""
    from flux2_core.checkpoints import load_dit

    baseline = _vm_kib("VmRSS") * 1024
    start = time.perf_counter()
    model = load_dit(path, device=device, dtype=dtype, weight_dtype=weight_dtype)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(json.dumps({"seconds": seconds, "peak_rss": _vm_kib("VmHWM") * 1024, "baseline_rss": baseline,
                      "model_bytes": model_bytes}))


def measure(path: Path, device: str, dtype: str, weight_dtype: str | None) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", str(path), "--device", device, "--dtype", dtype]
    if weight_dtype:
        command += ["--weight-dtype", weight_dtype]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_table(rows: list[tuple[str, int, dict[str, float]]]) -> None:
    header = f"{'file':<28} {'file bytes':>15} {'model bytes':>15} {'peak RSS':>15} {'RSS - baseline':>15} " \
             f"{'peak/file':>9} {'seconds':>8}"
    print(header)
    print("-" * len(header))
    for label, size, m in rows:
        print(f"{label:<28} {size:>15,} {int(m['model_bytes']):>15,} {int(m['peak_rss']):>15,} "
              f"{int(m['peak_rss'] - m['baseline_rss']):>15,} {m['peak_rss'] / size:>9.3f} {m['seconds']:>8.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), help="write a random DiT of this size, then load it")
    parser.add_argument("--write-klein-4b", metavar="DIR", help="write a full-size random klein-4B bf16 file and stop")
    parser.add_argument("--file", help="load this existing checkpoint")
    parser.add_argument("--dir", default="/tmp/flux2-bench", help="where --size writes its file")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bf16", help="compute dtype (bf16 keeps model bytes = file bytes)")
    parser.add_argument("--weight-dtype", default=None, help="e.g. fp8_e4m3fn")
    parser.add_argument("--child", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        child_load(args.child, args.device, args.dtype, args.weight_dtype)
        return 0
    if args.write_klein_4b:
        path = Path(args.write_klein_4b) / "flux-2-klein-4b.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        size = write_random_dit(path, SIZES["klein-4b"])
        print(f"wrote {path}: {size:,} bytes in {time.perf_counter() - start:.1f} s")
        return 0
    if args.size:
        path = Path(args.dir) / f"flux2-bench-{args.size}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_random_dit(path, SIZES[args.size])
    elif args.file:
        path = Path(args.file)
    else:
        parser.error("give --size, --file or --write-klein-4b")
    label = path.name if not args.weight_dtype else f"{path.name} -> {args.weight_dtype}"
    print_table([(label, path.stat().st_size, measure(path, args.device, args.dtype, args.weight_dtype))])
    return 0


if __name__ == "__main__":
    sys.exit(main())
