"""`flux2 lora info FILE [--json]`, `flux2 lora convert IN OUT --to comfyui|diffusers|kohya` and
`flux2 lora extract BASE TUNED --rank R [--out FILE] [--to FORMAT]`."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import Flux2Error
from .convert import convert_lora
from .dialects import DIALECT_DESCRIPTIONS, Flux2LoRA, load_lora

_LONG_METADATA = 200  # characters of a metadata value shown in the text report


def describe_lora(lora: Flux2LoRA) -> dict[str, Any]:
    """What `flux2 lora info --json` prints."""
    blocks = Counter(patch.module.split(".")[0] if "blocks" in patch.module else "other" for patch in lora.patches)
    return {
        "path": lora.name,
        "dialect": lora.dialect,
        "dialect_description": DIALECT_DESCRIPTIONS[lora.dialect],
        "algorithm": lora.algorithm,
        "hidden_size": lora.hidden_size,
        "model_family": lora.model_family,
        "rank": lora.rank,
        "ranks": {str(rank): count for rank, count in lora.ranks.items()},
        "alpha": lora.alpha,
        "scales": sorted({patch.scale for patch in lora.patches}),
        "target_layers": len(lora.targets),
        "patches": len(lora.patches),
        "patches_by_part": dict(blocks),
        "split_qkv": any(patch.rows is not None for patch in lora.patches),
        "unmatched_keys": list(lora.unmatched_keys),
        "metadata": dict(lora.metadata),
    }


def _print_report(info: dict[str, Any]) -> None:
    print(f"file:        {info['path']}")
    print(f"dialect:     {info['dialect']} - {info['dialect_description']}")
    print(f"algorithm:   {info['algorithm']}")
    print(f"model:       FLUX.2 DiT of width {info['hidden_size']} ({info['model_family']})")
    ranks = ", ".join(f"{rank} x{count}" for rank, count in info["ranks"].items())
    print(f"rank:        {info['rank']} ({ranks or 'none'})")
    print(f"alpha:       {info['alpha'] if info['alpha'] is not None else 'none (scale 1)'}; "
          f"scales {', '.join(f'{scale:g}' for scale in info['scales'])}")
    parts = ", ".join(f"{part} {count}" for part, count in info["patches_by_part"].items())
    print(f"targets:     {info['target_layers']} layers, {info['patches']} patches ({parts})"
          f"{'; q/k/v split' if info['split_qkv'] else ''}")
    if info["unmatched_keys"]:
        print(f"unmatched:   {len(info['unmatched_keys'])} keys, e.g. {info['unmatched_keys'][:3]}")
    if info["metadata"]:
        print("metadata:")
        for key, value in sorted(info["metadata"].items()):
            shown = value if len(value) <= _LONG_METADATA else value[:_LONG_METADATA] + f"... ({len(value)} chars)"
            print(f"  {key}: {shown}")


def _extract(args: argparse.Namespace) -> int:
    from .extract import extract_lora  # loads two DiTs: imported only when asked for

    out = args.out or f"{Path(args.tuned).stem}_lora_r{args.rank}.safetensors"
    result = extract_lora(args.base, args.tuned, args.rank, out, fmt=args.to, device=args.device)
    energies = sorted(result.kept_energy.values())
    lowest = f"{energies[0]:.4f}" if energies else "n/a"
    print(f"wrote {out}: rank {args.rank}, {len(result.lora.patches)} layers changed "
          f"({len(result.unchanged_layers)} unchanged); kept energy of the difference: lowest {lowest}")
    if result.uncaptured_tensors:
        print(f"note: {len(result.uncaptured_tensors)} non-linear tensors differ and a LoRA cannot carry them, "
              f"e.g. {list(result.uncaptured_tensors[:3])}")
    return 0


def lora_command(args: argparse.Namespace) -> int:
    try:
        if args.lora_command == "info":
            info = describe_lora(load_lora(args.file))
            if args.json:
                print(json.dumps(info, indent=2))
            else:
                _print_report(info)
            return 0
        if args.lora_command == "convert":
            lora = convert_lora(args.input, args.output, args.to)
            print(f"wrote {args.output}: {len(lora.targets)} layers from {lora.dialect} to {args.to}")
            return 0
        if args.lora_command == "extract":
            return _extract(args)
    except Flux2Error as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"error: unknown lora command {args.lora_command!r}", file=sys.stderr)
    return 2
