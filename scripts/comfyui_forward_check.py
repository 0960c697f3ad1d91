"""The DiT's output in real ComfyUI, without and with one of our LoRA files, against our engine's.

Run from a ComfyUI folder with its Python (this project installed there), as scripts/check_in_comfyui.sh does:
    cd ComfyUI && python /path/to/scripts/comfyui_forward_check.py DIT_NAME LORA_NAME [LORA_NAME ...]
DIT_NAME is a file of models/diffusion_models, each LORA_NAME one of models/loras. ComfyUI loads the DiT with
its UNETLoader code and patches it with the LoraLoaderModelOnly node; we run its FLUX.2 model on one fixed
random latent, prompt and timestep, and our Flux2DiT on the same inputs (LoRA merged by flux2_core.lora).
Prints one line per model; exits non-zero when a LoRA leaves ComfyUI's output unchanged or the two disagree.
"""

from __future__ import annotations

import os
import sys

NAMES = sys.argv[1:]
sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI parses sys.argv as its own command line
sys.path.insert(0, os.getcwd())  # the ComfyUI folder
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402
import folder_paths  # noqa: E402
import nodes  # noqa: E402
import torch  # noqa: E402

from flux2_core.checkpoints.loaders import load_dit  # noqa: E402
from flux2_core.lora import merge_loras  # noqa: E402
from flux2_core.references import image_position_ids, text_position_ids  # noqa: E402

HEIGHT, WIDTH, TEXT = 4, 6, 7  # latent cells and prompt tokens
TOLERANCE = 1e-4  # max |difference| / max |output|, fp32 both sides


def comfy_output(patcher, latent: torch.Tensor, context: torch.Tensor, sigma: torch.Tensor,
                 guidance: torch.Tensor | None) -> torch.Tensor:
    comfy.model_management.load_models_gpu([patcher])  # applies the LoRA patches to the weights
    with torch.no_grad():
        return patcher.model.diffusion_model(latent, sigma, context, guidance=guidance).float()


def our_output(dit_path: str, lora_path: str | None, latent: torch.Tensor, context: torch.Tensor,
               sigma: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
    dit = load_dit(dit_path, device="cpu", dtype=torch.float32)
    if lora_path is not None:
        merge_loras(dit, [(lora_path, 1.0)], keep_original=False)
    tokens = latent.flatten(2).transpose(1, 2)  # [B, H*W, 128], row-major as ComfyUI's FLUX.2 packs them
    with torch.no_grad():
        out = dit(tokens, image_position_ids(HEIGHT, WIDTH), context, text_position_ids(1, TEXT), sigma, guidance)
    return out.transpose(1, 2).reshape(latent.shape)


def main() -> int:
    dit_name, lora_names = NAMES[0], NAMES[1:]
    dit_path = folder_paths.get_full_path_or_raise("diffusion_models", dit_name)
    base = comfy.sd.load_diffusion_model(dit_path)
    generator = torch.Generator().manual_seed(0)
    context_dim = base.model.diffusion_model.txt_in.weight.shape[1]
    latent = torch.randn(1, 128, HEIGHT, WIDTH, generator=generator)
    context = torch.randn(1, TEXT, context_dim, generator=generator)
    sigma = torch.tensor([0.6])
    # dev's embedded guidance, as both take it (the embedding multiplies it by 1000, as the timestep)
    guidance = torch.tensor([4.0]) if base.model.diffusion_model.params.guidance_embed else None
    reference = comfy_output(base, latent, context, sigma, guidance)
    failed = False
    for name, patcher in [("(none)", base)] + [
            (lora, nodes.LoraLoaderModelOnly().load_lora_model_only(base, lora, 1.0)[0]) for lora in lora_names]:
        theirs = comfy_output(patcher, latent, context, sigma, guidance)
        lora_path = None if patcher is base else folder_paths.get_full_path_or_raise("loras", name)
        ours = our_output(dit_path, lora_path, latent, context, sigma, guidance)
        change = float((theirs - reference).abs().max() / reference.abs().max())
        disagreement = float((theirs - ours).abs().max() / theirs.abs().max())
        print(f"LoRA {name}: ComfyUI output changed by {change:.3g} (max |diff| / max |out|); "
              f"ComfyUI vs flux2_core: {disagreement:.2e}")
        failed |= disagreement > TOLERANCE or (patcher is not base and change == 0.0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
