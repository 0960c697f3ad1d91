"""The `flux2` command line. Each subcommand lives with the code it drives; this module only parses."""

from __future__ import annotations

import argparse
import importlib.util
import sys

# What the `host` extra installs (`pip install "flux2[host]"`), by import name; the base install is the engine
# and the node pack only, so `serve` and `run` check for these first.
HOST_MODULES = ("aiohttp", "yaml", "tqdm", "comfyui_frontend_package", "comfyui_workflow_templates")


def _add_dirs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models-dir", default=None, help="models folder (ComfyUI layout); default ./models")
    p.add_argument("--output-dir", default=None, help="where SaveImage writes; default ./output")
    p.add_argument("--input-dir", default=None, help="where LoadImage reads; default ./input")


def _add_device_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpu", action="store_true", help="compute on the CPU even when a GPU is present")
    p.add_argument("--dtype", default="default", choices=["default", "bf16", "fp16", "fp32"],
                   help="compute dtype of every model (default: fp32 on CPU, bf16 on CUDA); "
                        "checkpoint storage (fp8, bf16) is chosen on the loader nodes")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each DiT block class once (faster steps after a slow first run)")
    _add_memory_flags(p)


def _add_custom_nodes_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--custom-nodes-dir", action="append", default=[], metavar="DIR",
                   help="a folder of ComfyUI node packs (may be repeated); default: the folders in "
                        "$FLUX2_CUSTOM_NODES_DIR (os.pathsep-separated), else custom_nodes/ next to the models folder")


def _add_memory_flags(p: argparse.ArgumentParser) -> None:
    """ComfyUI's VRAM flags, with its meanings (flux2_core.memory.residency)."""
    p.add_argument("--reserve-vram", type=float, default=None, metavar="GB",
                   help="GPU memory kept free of model weights for the OS and other programs (default 1.2)")
    vram = p.add_mutually_exclusive_group()
    vram.add_argument("--gpu-only", dest="vram_mode", action="store_const", const="gpu_only",
                      help="store and run everything on the GPU; nothing is moved off to make room")
    vram.add_argument("--highvram", dest="vram_mode", action="store_const", const="highvram",
                      help="keep every model in GPU memory once loaded")
    vram.add_argument("--lowvram", dest="vram_mode", action="store_const", const="lowvram",
                      help="one model on the GPU at a time; a model that does not fit is streamed by blocks")
    vram.add_argument("--novram", dest="vram_mode", action="store_const", const="novram",
                      help="keep weights in CPU memory and stream every model block by block")
    p.set_defaults(vram_mode="normal")


def _add_plan_flags(p: argparse.ArgumentParser) -> None:
    """`flux2 info --plan` (flux2_core.memory.estimate)."""
    p.add_argument("--plan", action="store_true", help="print the predicted peak memory of each phase of a request")
    p.add_argument("--dit", help="--plan: the diffusion model file")
    p.add_argument("--text-encoder", help="--plan: the text encoder file")
    p.add_argument("--vae", help="--plan: the VAE file")
    p.add_argument("--width", type=int, default=1024, help="--plan: image width in px")
    p.add_argument("--height", type=int, default=1024, help="--plan: image height in px")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--cfg", type=float, default=1.0, help="--plan: a value other than 1 adds the negative pass")
    p.add_argument("--reference", action="append", default=[], metavar="WxH",
                   help="--plan: a reference image's size after the pixel cap (may be repeated)")
    p.add_argument("--weight-dtype", default=None, help="--plan: the DiT's storage as on UNETLoader, e.g. fp8_e4m3fn")
    p.add_argument("--device", default=None, help="--plan: cuda or cpu (default: cuda when present)")
    p.add_argument("--dtype", default=None, help="--plan: compute dtype (default: bf16 on CUDA, fp32 on CPU)")


def _add_service_flags(p: argparse.ArgumentParser) -> None:
    """Who may use `flux2 serve` and how much one request may ask (README: Running as a service)."""
    g = p.add_argument_group("access and limits")
    g.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a Host name this server answers to besides loopback and --host (may be repeated)")
    g.add_argument("--auth-token", default=None, help="require this token on every route and the WebSocket")
    g.add_argument("--auth-token-file", default=None, help="read the auth token from this file")
    g.add_argument("--tls-keyfile", default=None, help="serve HTTPS: the private key (PEM)")
    g.add_argument("--tls-certfile", default=None, help="serve HTTPS: the certificate chain (PEM)")
    g.add_argument("--max-json-bytes", type=int, default=32 * 1024 * 1024, help="largest JSON request body")
    g.add_argument("--max-json-depth", type=int, default=64, help="deepest nesting of a JSON request body")
    g.add_argument("--max-text-chars", type=int, default=1_000_000, help="longest string input of a prompt")
    g.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest width x height of one node")
    g.add_argument("--max-batch", type=int, default=64, help="largest batch_size of one node")
    g.add_argument("--memory-budget-gb", type=float, default=None, metavar="GB",
                   help="refuse prompts whose memory estimate needs more (default: the GPU's capacity less "
                        "--reserve-vram; no check when computing on the CPU)")
    g.add_argument("--ws-max-queued", type=int, default=1024,
                   help="messages waiting for one WebSocket client before it is dropped as not reading")
    g.add_argument("--queue", default="sqlite", metavar="sqlite|redis://HOST:PORT/DB",
                   help="where prompts wait: the embedded SQLite queue under the user folder (default), or Redis, "
                        "for `flux2 worker` processes to run")
    g.add_argument("--on-restart", choices=["requeue", "fail"], default="requeue",
                   help="a prompt that was running when the server stopped: run it again, or record it as failed")
    g.add_argument("--ws-send-timeout", type=float, default=10.0,
                   help="seconds one WebSocket send may take before that client is dropped")


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
    p.add_argument("--preview-method", default="auto", choices=["auto", "latent2rgb", "none"],
                   help="latent previews while sampling (ComfyUI's flag): auto and latent2rgb send cheap "
                        "false-colour previews, none turns them off; a prompt's own choice wins")
    _add_device_flags(p)
    _add_dirs(p)
    _add_service_flags(p)

    p = sub.add_parser("worker", help="run prompts from the Redis queue of `flux2 serve --queue redis://...`")
    p.add_argument("--queue", required=True, metavar="redis://HOST:PORT/DB")
    p.add_argument("--lease", type=float, default=10.0,
                   help="seconds a claimed prompt stays this worker's without a heartbeat (renewed every third)")
    p.add_argument("--worker-id", default=None, help="name in logs and leases; default a random id")
    p.add_argument("--temp-dir", default=None)
    p.add_argument("--extra-model-paths-config", action="append", default=[])
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

    p = sub.add_parser("info", help="say what a model file or folder is; --plan: predicted memory of a request")
    p.add_argument("path", nargs="?")
    p.add_argument("--json", action="store_true")
    _add_plan_flags(p)

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


def host_is_installed(command: str) -> bool:
    """False, with the one line that says what to install, when the `host` extra is missing."""
    missing = [name for name in HOST_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        print(f"flux2 {command}: the host is not installed (missing {', '.join(missing)}); "
              f"install it with: pip install \"flux2[host]\"", file=sys.stderr)
    return not missing


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("serve", "run") and not host_is_installed(args.command):
        return 2
    # Imports are deferred so `flux2 info` does not pay for aiohttp and `flux2 serve` starts fast.
    if args.command == "serve":
        from .server import serve_command
        return serve_command(args)
    if args.command == "worker":
        from .worker import worker_command
        return worker_command(args)
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
