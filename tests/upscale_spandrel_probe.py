"""Runs inside .venv-upscale (spandrel + torchvision) for test_upscale_spandrel.py, which cannot import spandrel.

    python upscale_spandrel_probe.py MODELS_DIR IMAGES.safetensors OUT.safetensors

For every file in MODELS_DIR/upscale_models and every IMAGE ([1, H, W, 3]) in IMAGES: our nodes' output
(UpscaleModelLoader -> ImageUpscaleWithModel, which tiles above 512 px) under "FILE/IMAGE/node", and the
reference under "FILE/IMAGE/reference": spandrel's own ModelLoader().load_from_file model called once on the whole
image, clamped to [0, 1] like an IMAGE. The descriptors' scale and architecture go in the metadata ("info")."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import spandrel
import torch
from safetensors.torch import load_file, save_file

from flux2_host import folders
from flux2_host.core_nodes.upscale import ImageUpscaleWithModel, UpscaleModelLoader


def main(models_dir: Path, images_file: Path, out_file: Path) -> None:
    torch.set_num_threads(1)  # as in conftest: tiny convolutions on shared cores
    scratch = out_file.parent
    folders.configure(models=str(models_dir), input_dir=str(scratch / "input"), output_dir=str(scratch / "output"),
                      temp_dir=str(scratch / "temp"))
    images = load_file(images_file)
    results: dict[str, torch.Tensor] = {}
    info: dict[str, dict] = {}
    for path in sorted((models_dir / "upscale_models").iterdir()):
        ours = UpscaleModelLoader().load_model(path.name)[0]
        reference = spandrel.ModelLoader().load_from_file(path).eval()
        info[path.name] = {"scale": reference.scale, "architecture": reference.architecture.id,
                           "our_scale": ours.scale, "our_architecture": ours.architecture.id}
        for key, image in images.items():
            results[f"{path.name}/{key}/node"] = ImageUpscaleWithModel().upscale(ours, image)[0].contiguous()
            with torch.no_grad():
                whole = reference(image.movedim(-1, 1))
            results[f"{path.name}/{key}/reference"] = whole.clamp(0, 1).movedim(1, -1).contiguous()
    save_file(results, str(out_file), metadata={"info": json.dumps(info)})


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
