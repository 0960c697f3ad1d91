"""The `flux2` command line. Each subcommand lives with the code it drives; this module only parses."""

from __future__ import annotations

import argparse
import sys


def _add_dirs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models-dir", default=None, help="models folder (ComfyUI layout); default ./models")
    p.add_argument("--output-dir", default=None, help="where SaveImage writes; default ./output")
    p.add_argument("--input-dir", default=None, help="where LoadImage reads; default ./input")


def _add_device_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpu", action="store_true", help="compute on the CPU even when a GPU is present")
    p.add_argument("--dtype", default="default", choices=["default", "bf16", "fp16", "fp32"],
                   help="compute dtype of every model (default: fp32 on CPU, bf16 on CUDA); "
                        "checkpoint storage (fp8, bf16) is chosen on the loader nodes")


def _add_custom_nodes_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--custom-nodes-dir", action="append", default=[], metavar="DIR",
                   help="a folder of ComfyUI node packs (may be repeated); default: custom_nodes/ next to "
                        "the models folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux2", description="FLUX.2 runtime")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the ComfyUI-compatible server and web canvas")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8188)
    p.add_argument("--user-dir", default=None, help="user data (settings, saved workflows); default ./user")
    p.add_argument("--temp-dir", default=None)
    p.add_argument("--extra-model-paths-config", action="append", default=[],
                   help="an extra_model_paths.yaml (may be repeated)")
    p.add_argument("--demo-models", action="store_true",
                   help="write tiny demo models into the models folder first if it has no FLUX.2 weights")
    _add_custom_nodes_dir(p)
    _add_device_flags(p)
    _add_dirs(p)

    p = sub.add_parser("run", help="run a workflow file (API or UI format) headless")
    p.add_argument("workflow")
    p.add_argument("--set", action="append", default=[], metavar="NODE_ID.INPUT=VALUE",
                   help="override a node input before running (may be repeated)")
    p.add_argument("--json", action="store_true", help="print one JSON object with prompt_id and output files")
    _add_device_flags(p)
    p.add_argument("--extra-model-paths-config", action="append", default=[])
    _add_custom_nodes_dir(p)
    _add_dirs(p)

    p = sub.add_parser("info", help="say what a model file or folder is")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("demo-models", help="write tiny random models in the real formats")
    p.add_argument("--dir", default="models")

    p = sub.add_parser("lora", help="inspect and convert LoRA files")
    lora_sub = p.add_subparsers(dest="lora_command", required=True)
    q = lora_sub.add_parser("info", help="dialect, rank, targets, alpha and metadata of a LoRA file")
    q.add_argument("file")
    q.add_argument("--json", action="store_true")
    q = lora_sub.add_parser("convert", help="rewrite a LoRA in another tool's dialect")
    q.add_argument("input")
    q.add_argument("output")
    q.add_argument("--to", required=True, choices=["comfyui", "diffusers", "kohya"])
    q = lora_sub.add_parser("extract", help="a LoRA from a fine-tune: SVD of (TUNED - BASE) per linear layer")
    q.add_argument("base")
    q.add_argument("tuned")
    q.add_argument("--rank", type=int, required=True)
    q.add_argument("--out", help="output file (default: <tuned>_lora_r<rank>.safetensors here)")
    q.add_argument("--to", default="comfyui", choices=["comfyui", "diffusers", "kohya"])
    q.add_argument("--device", default="cpu", help="where the SVDs run (cpu, cuda)")

    from flux2_core.train.cli import add_train_parsers
    add_train_parsers(sub)  # `flux2 train` and `flux2 cache latents|text`
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imports are deferred so `flux2 info` does not pay for aiohttp and `flux2 serve` starts fast.
    if args.command == "serve":
        from .server import serve_command
        return serve_command(args)
    if args.command == "run":
        from .run import run_command
        return run_command(args)
    if args.command == "info":
        from flux2_core.checkpoints.detect import info_command
        return info_command(args)
    if args.command == "demo-models":
        from flux2_core.demo_models import demo_models_command
        return demo_models_command(args)
    if args.command == "lora":
        from flux2_core.lora.cli import lora_command
        return lora_command(args)
    if args.command in ("train", "cache"):
        from flux2_core.train.cli import cache_command, train_command
        return train_command(args) if args.command == "train" else cache_command(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
