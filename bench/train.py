"""Seconds per training step and peak memory: the Trainer's objective + backward + AdamW step on a DiT, for a
LoRA (bf16 / fp8 base, the fp8 base dequantized or with fp8 matmuls), a LoRA with the most blocks swapped the
DiT allows (memory.streaming.enable_training_block_swap) and a full fine-tune (train/full_finetune.FullTrainable:
fp32 masters for bf16 weights).

    python bench/train.py                       # CPU, tiny sizes
    python bench/train.py --size klein-4b       # CUDA: klein-base-4B, rank 32, 1024^2, batch 1, bf16,
                                                # gradient checkpointing; rows for a bf16 base, an fp8
                                                # base and an fp8 base with fp8 matmuls (fp8_matmul)

Weights are random (the speed and memory of a step do not depend on their values); text embeddings are
random tensors, as with a text cache. The FLOP column counts the matmuls of forward + backward (~3x the
forward's 2 * params * tokens + attention), so achieved TFLOP/s can be compared with the matmul peak.
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import time

import torch

from flux2_core.checkpoints.quant import quantize_linear_weights
from flux2_core.dit import Flux2DiT
from flux2_core.memory.fp8_matmul import set_fp8_matmul
from flux2_core.memory.streaming import enable_training_block_swap, max_training_blocks_to_swap
from flux2_core.train.adapters import AdapterSet
from flux2_core.train.full_finetune import FullTrainable
from flux2_core.train.config import TrainConfig
from flux2_core.train.memory import enable_gradient_checkpointing
from flux2_core.train.objective import Batch, FlowMatchingObjective
from flux2_core.train.optimizers import make_optimizer
from flux2_core.variants import FULL_SIZE_DIT, DiTConfig

SIZES = {
    "tiny": (DiTConfig(hidden_size=128, num_heads=2, depth_double=1, depth_single=2, context_dim=96,
                       guidance_embed=False, head_dim=64, axes_dim=(16, 16, 16, 16)), (8, 8), 32),
    "small": (DiTConfig(hidden_size=256, num_heads=2, depth_double=2, depth_single=4, context_dim=384,
                        guidance_embed=False), (16, 16), 64),
    "klein-4b": (FULL_SIZE_DIT["klein-4b"], (64, 64), 512),
    "klein-9b": (FULL_SIZE_DIT["klein-9b"], (64, 64), 512),
    "dev": (FULL_SIZE_DIT["dev"], (64, 64), 512),
}
# The frozen base: the compute dtype ("bf16": fp32 on the CPU), fp8 dequantized per call, or fp8 multiplied on
# fp8 tensor cores in forward and input gradient (train config fp8_matmul; dequantizes where there are none).
BASES = ("bf16", "fp8", "fp8-matmul")
# The GPU rows the training issues ask for: (size, method, base, optimizer).
GPU_ROWS = (("klein-4b", "lora", "bf16", "adamw"), ("klein-4b", "lora", "fp8", "adamw"),
            ("klein-4b", "lora", "fp8-matmul", "adamw"),
            ("klein-4b", "lora", "bf16", "adamw8bit"), ("klein-4b", "lora-swap", "fp8", "adamw"),
            ("klein-4b", "full", "bf16", "adamw"), ("klein-9b", "lora", "fp8", "adamw"),
            ("klein-9b", "lora", "bf16", "adamw"), ("dev", "lora-swap", "fp8", "adamw"))


def step_flops(config: DiTConfig, image_tokens: int, text_tokens: int) -> float:
    tokens = image_tokens + text_tokens
    hidden, mlp = config.hidden_size, config.mlp_hidden
    per_block = 3 * hidden * hidden + hidden * hidden + 2 * mlp * hidden + mlp * hidden
    linear = 2 * per_block * tokens * (config.depth_double + config.depth_single)
    attention = 4 * tokens * tokens * hidden * (config.depth_double + config.depth_single)
    return 3.0 * (linear + attention)


METHODS = ("lora", "lora-swap", "full")  # swap: the maximum blocks_to_swap (two blocks of each kind stay resident)


def bench(size: str, device: torch.device, base: str, rank: int, steps: int, warmup: int,
          method: str = "lora", optimizer_type: str = "adamw") -> dict:
    config, (h, w), text_tokens = SIZES[size]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    dit = Flux2DiT(config, device=device, dtype=dtype)
    with torch.no_grad():  # sane random values on the device (fresh parameters may hold garbage)
        for param in dit.parameters():
            if param.ndim == 1:
                param.fill_(1.0)
            else:
                param.normal_(0.0, param.shape[1] ** -0.5)
    if base != "bf16":
        quantize_linear_weights(dit, "fp8_e4m3fn")
        set_fp8_matmul(dit, base == "fp8-matmul")
    train_config = TrainConfig(network_dim=rank, network_alpha=rank, timestep_sampling="flux2_shift")
    trainable = FullTrainable(dit) if method == "full" else AdapterSet(dit, train_config)
    enable_gradient_checkpointing(dit)
    if method == "lora-swap":
        enable_training_block_swap(dit, max_training_blocks_to_swap(config.depth_double, config.depth_single), device)
    dit.train()
    optimizer = make_optimizer(TrainConfig(optimizer_type=optimizer_type, learning_rate=1e-4),
                               trainable.parameters(), device)
    if method == "full":
        trainable.bind(optimizer)
    objective = FlowMatchingObjective(train_config)
    batch = Batch(torch.randn(1, 128, h, w), torch.randn(1, text_tokens, config.context_dim))
    generator = torch.Generator().manual_seed(0)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for index in range(warmup + steps):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = objective(dit, batch, generator)[0].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index >= warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    flops = step_flops(config, h * w, text_tokens)
    return {"size": size, "method": method, "optimizer": optimizer_type, "base": base if base != "bf16" else ("bf16" if dtype == torch.bfloat16 else "fp32"),
            "device": device.type, "s/step": seconds, "steps/s": 1 / seconds, "peak GiB": peak,
            "TFLOP/step": flops / 1e12, "TFLOP/s": flops / seconds / 1e12}


def planned_rows(args: argparse.Namespace, device: torch.device) -> list[tuple[str, str, str, str]]:
    if device.type == "cuda" and not args.size and not args.method:
        return list(GPU_ROWS)
    rows = []
    for size in args.size or (["klein-4b"] if device.type == "cuda" else ["tiny", "small"]):
        for method in args.method or METHODS:
            config = SIZES[size][0]
            if method == "lora-swap" and not max_training_blocks_to_swap(config.depth_double, config.depth_single):
                continue  # too few blocks: two of each kind stay on the device
            # a full fine-tune trains the weights themselves, so it has no fp8 row
            for base in (BASES if device.type == "cuda" and method != "full" else ("bf16",)):
                rows.append((size, method, base, args.optimizer))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), action="append")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--method", choices=METHODS, action="append", help="default: all")
    parser.add_argument("--optimizer", choices=("adamw", "adamw8bit", "adafactor"), default="adamw")
    parser.add_argument("--minutes", type=float, default=None, help="rows that would start after this are skipped")
    args = parser.parse_args()
    device = torch.device(args.device)
    deadline = time.monotonic() + 60 * args.minutes if args.minutes else None
    rows = []
    for size, method, base, optimizer in planned_rows(args, device):
        row = {"size": size, "method": method, "optimizer": optimizer, "base": base,
               "device": device.type}
        if deadline is not None and time.monotonic() > deadline:
            row["note"] = "skipped: time budget"
        else:
            try:  # one failing row (out of memory, a missing package) is reported; the others still run
                row = bench(size, device, base, args.rank, args.steps, args.warmup, method, optimizer)
            except Exception as exc:  # noqa: BLE001
                row["note"] = f"ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        rows.append(row)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"[{len(rows)}] {row}", file=sys.stderr, flush=True)
    peak_note = "peak GiB = max CUDA allocated" if device.type == "cuda" else "peak GiB = process max RSS"
    print(f"| size | method | optimizer | base | device | s/step | steps/s | peak GiB | TFLOP/step | TFLOP/s | note |"
          f"   ({peak_note})")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "s/step" not in r:
            print(f"| {r['size']} | {r['method']} | {r['optimizer']} | {r['base']} | {r['device']} | - | - | - | - | - "
                  f"| {r['note']} |")
            continue
        print(f"| {r['size']} | {r['method']} | {r['optimizer']} | {r['base']} | {r['device']} | {r['s/step']:.4f} | "
              f"{r['steps/s']:.2f} | {r['peak GiB']:.2f} | {r['TFLOP/step']:.4f} | {r['TFLOP/s']:.3f} | |")


if __name__ == "__main__":
    main()
