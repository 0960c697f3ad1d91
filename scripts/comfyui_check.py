"""Helpers of scripts/check_in_comfyui.sh: checks of the node pack and of our LoRA files against a real ComfyUI.

Run with the Python of that ComfyUI (this project installed into it). Nothing here imports ComfyUI: the checks
talk to a running ComfyUI server over its HTTP API (/object_info, /prompt, /history) and read the files it
writes. Each subcommand prints one result line per check and exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from flux2_core.checkpoints.detect import DEMO_MARKER
from flux2_core.checkpoints.loaders import load_dit
from flux2_core.demo_models import QWEN3_4B, random_dit
from flux2_core.lora import load_lora, merge_loras
from flux2_core.variants import DiTConfig

# ComfyUI derives a FLUX.2 DiT's heads as hidden_size // 128 (its rope axes are fixed at 4 x 32), so the demo DiTs
# (head width 32) do not load there; this one has the real head width: one head of 128, one block of each kind,
# reading the demo Qwen3-4B text encoder's 96-wide prompts.
COMFYUI_SHAPED_DIT = DiTConfig(hidden_size=128, num_heads=1, depth_double=1, depth_single=1,
                               context_dim=QWEN3_4B.output_dim, guidance_embed=False)
COMFYUI_DIT_PREFIX = "model.diffusion_model."  # ModelSave's key prefix


def write_dit(args: argparse.Namespace) -> int:
    """A tiny klein-base-4b-shaped DiT (dev-shaped with --guidance) in the BFL layout (bf16), with the real head
    width."""
    config = dataclasses.replace(COMFYUI_SHAPED_DIT, guidance_embed=args.guidance)
    weights = {name: tensor.contiguous()
               for name, tensor in random_dit(config, seed=11, dtype=torch.bfloat16).state_dict().items()}
    Path(args.path).parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, args.path, metadata=DEMO_MARKER)
    print(f"wrote {args.path}: {sum(t.numel() for t in weights.values())} parameters, head width 128")
    return 0


def _request(url: str, payload: dict | None = None) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return json.load(answer)
    except urllib.error.HTTPError as error:
        raise SystemExit(f"{url}: HTTP {error.code}: {error.read().decode()[:3000]}") from None


def object_info(args: argparse.Namespace) -> int:
    """Every node type the pack declares is listed by the server, from the pack's module."""
    info = _request(f"{args.server}/object_info")
    ours = sorted(name for name, entry in info.items()
                  if entry.get("python_module", "").endswith(args.module))
    print(f"object_info: {len(info)} node types, {len(ours)} from {args.module}: {ours}")
    return 0 if len(ours) == args.expect else 1


def prompt_of(path: str) -> dict:
    """An API prompt from a .json file or from a PNG's `prompt` chunk (as SaveImage writes it)."""
    if path.endswith(".png"):
        return json.loads(Image.open(path).text["prompt"])
    return json.loads(Path(path).read_text())


def post(args: argparse.Namespace) -> int:
    """Queue a prompt and wait for it; prints its outputs as JSON on the last line."""
    prompt = prompt_of(args.prompt)
    for assignment in args.set or []:
        target, value = assignment.split("=", 1)
        node, name = target.split(".", 1)
        prompt[node]["inputs"][name] = json.loads(value)
    prompt_id = _request(f"{args.server}/prompt", {"prompt": prompt, "client_id": "flux2-check"})["prompt_id"]
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        entry = _request(f"{args.server}/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            status = entry["status"]
            print(f"prompt {prompt_id}: {status.get('status_str')}")
            if status.get("status_str") != "success":
                print(json.dumps(status.get("messages"))[:4000])
                return 1
            print(json.dumps(entry["outputs"]))
            return 0
        time.sleep(1)
    print(f"prompt {prompt_id}: not finished after {args.timeout} s")
    return 1


def lora_prompt(args: argparse.Namespace) -> int:
    """An API prompt: ComfyUI's UNETLoader, its model saved as is (`<prefix>/base`) and, for each LoRA, through
    LoraLoaderModelOnly (`<prefix>/<LoRA file stem>`). ModelSave writes the weights with the LoRA merged."""
    prompt = {"unet": {"class_type": "UNETLoader", "inputs": {"unet_name": args.unet, "weight_dtype": "default"}},
              "save_base": {"class_type": "ModelSave",
                            "inputs": {"model": ["unet", 0], "filename_prefix": f"{args.prefix}/base"}}}
    for index, name in enumerate(args.lora):
        prompt[f"lora{index}"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["unet", 0], "lora_name": name, "strength_model": args.strength}}
        prompt[f"save{index}"] = {"class_type": "ModelSave", "inputs": {
            "model": [f"lora{index}", 0], "filename_prefix": f"{args.prefix}/{Path(name).stem}"}}
    print(json.dumps(prompt, indent=1))
    return 0


def compare_images(args: argparse.Namespace) -> int:
    a = np.asarray(Image.open(args.a).convert("RGB"), dtype=np.int16)
    b = np.asarray(Image.open(args.b).convert("RGB"), dtype=np.int16)
    if a.shape != b.shape:
        print(f"images: shapes differ {a.shape} vs {b.shape}")
        return 1
    difference = np.abs(a - b)
    print(f"images {a.shape}: max |difference| {difference.max()} (8-bit levels), "
          f"{int((difference > 0).sum())} of {difference.size} channel values differ")
    return 0 if difference.max() <= args.tolerance else 1


def compare_lora(args: argparse.Namespace) -> int:
    """ComfyUI's patched weights (ModelSave after LoraLoaderModelOnly) against the unpatched ones and against our
    own loader's merge of the same LoRA into the same file."""
    base = load_file(args.comfy_base)
    patched = load_file(args.comfy_patched)
    lora = load_lora(args.lora)
    ours = load_dit(args.dit, device="cpu", dtype=torch.float32)
    merge_loras(ours, [(lora, args.strength)], keep_original=False)
    ours_state = ours.state_dict()
    targets = sorted(f"{module}.weight" for module in lora.targets)
    changed, worst = 0, 0.0
    for name in targets:
        key = COMFYUI_DIT_PREFIX + name
        if key not in patched:
            print(f"{name}: missing from ComfyUI's saved model")
            return 1
        comfy_delta = patched[key].float() - base[key].float()
        our_delta = ours_state[name].float() - base[key].float()
        changed += bool(comfy_delta.abs().max() > 0)
        # relative to the delta's size: both sides round the merged weight to the file's bf16
        error = float((comfy_delta - our_delta).abs().max() / our_delta.abs().max().clamp_min(1e-12))
        worst = max(worst, error)
    untouched = [key for key in base if key.removeprefix(COMFYUI_DIT_PREFIX) not in targets
                 and not torch.equal(base[key], patched[key])]
    print(f"LoRA {Path(args.lora).name}: {len(targets)} target layers, {changed} changed by ComfyUI, "
          f"{len(untouched)} other tensors changed; ComfyUI's weight change vs ours: worst max|diff| / max|delta| "
          f"= {worst:.2e}")
    return 0 if changed == len(targets) and not untouched and worst <= args.tolerance else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("write-dit")
    command.add_argument("path")
    command.add_argument("--guidance", action="store_true", help="with dev's guidance embedder")
    command.set_defaults(run=write_dit)
    command = commands.add_parser("object-info")
    command.add_argument("--server", required=True)
    command.add_argument("--module", default="custom_nodes_flux2")
    command.add_argument("--expect", type=int, required=True)
    command.set_defaults(run=object_info)
    command = commands.add_parser("post")
    command.add_argument("prompt", help="API prompt .json, or a PNG with a prompt chunk")
    command.add_argument("--server", required=True)
    command.add_argument("--set", action="append", help="NODE.INPUT=JSON_VALUE")
    command.add_argument("--timeout", type=float, default=600)
    command.set_defaults(run=post)
    command = commands.add_parser("lora-prompt")
    command.add_argument("--unet", required=True)
    command.add_argument("--lora", action="append", required=True)
    command.add_argument("--prefix", default="flux2_check")
    command.add_argument("--strength", type=float, default=1.0)
    command.set_defaults(run=lora_prompt)
    command = commands.add_parser("compare-images")
    command.add_argument("a")
    command.add_argument("b")
    command.add_argument("--tolerance", type=int, default=0)
    command.set_defaults(run=compare_images)
    command = commands.add_parser("compare-lora")
    for name in ("--comfy-base", "--comfy-patched", "--dit", "--lora"):
        command.add_argument(name, required=True)
    command.add_argument("--strength", type=float, default=1.0)
    command.add_argument("--tolerance", type=float, default=0.02)
    command.set_defaults(run=compare_lora)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
