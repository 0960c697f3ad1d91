"""Refusing a prompt whose models and image size cannot fit in memory, before it is queued.

The memory estimate (flux2_core/memory/estimate.py) predicts each phase's peak from the model files' headers
and the request's size; `check_fits` compares the largest with what is available. Here that request is read
from an API prompt: the files or diffusers folders its loader nodes name, the largest image x batch its
latent nodes make, whether any sampler runs a negative pass (cfg != 1), and its reference images (each adds
its (w/16)(h/16) tokens to every step: 4096 for 1 MP).

Available memory: the server's `--memory-budget-gb` when given, else the memory manager's weight budget on
its device (the GPU's capacity less --reserve-vram). Computing on the CPU has no budget, so nothing is
refused there unless `--memory-budget-gb` sets one (which is also how the tests exercise this on the CPU).

Only file headers are read, once per file and modification time, so a POST /prompt stays cheap. A prompt
this cannot read (a missing file, a file of another kind) is left to validation and execution to report.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

from . import folders
from .limits import BATCH_INPUTS, HEIGHT_INPUTS, WIDTH_INPUTS, int_input

log = logging.getLogger("flux2.server")

# class_type -> (model folder kind, input naming the file); the host's ComfyUI loaders and the FLUX.2 pack's.
DIT_LOADERS = {"UNETLoader": "unet_name", "Flux2LoadModel": "model_name"}
TEXT_ENCODER_LOADERS = {"CLIPLoader": "clip_name", "Flux2LoadTextEncoder": "text_encoder_name"}
VAE_LOADERS = {"VAELoader": "vae_name", "Flux2LoadVAE": "vae_name"}


def memory_refusal(prompt: dict, budget_bytes: int | None = None) -> str | None:
    """The estimate's "needs X GB, Y GB available" message when `prompt` cannot fit, else None.
    `budget_bytes`: the server's --memory-budget-gb; None uses the memory manager's budget."""
    from flux2_core.devices import resolve_dtype
    from flux2_core.errors import Flux2Error
    from flux2_core.memory.estimate import InsufficientMemoryError, check_fits, estimate
    from flux2_core.memory.residency import default_manager

    manager = default_manager()
    available = budget_bytes if budget_bytes is not None else manager.budget_bytes
    if available is None:
        return None  # computing on the CPU without a configured budget
    dits = _loaded_files(prompt, DIT_LOADERS, "diffusion_models")
    if not dits:
        return None
    compute_dtype = resolve_dtype(None, manager.device)
    request = _memory_request(prompt)
    try:
        encoders = [_shape("text_encoder", path, compute_dtype) for path, _ in
                    _loaded_files(prompt, TEXT_ENCODER_LOADERS, "text_encoders")]
        vaes = [_shape("vae", path, compute_dtype) for path, _ in _loaded_files(prompt, VAE_LOADERS, "vae")]
        for path, node in dits:
            weight_dtype = node["inputs"].get("weight_dtype")
            dit = _shape("dit", path, compute_dtype, weight_dtype if isinstance(weight_dtype, str) else None)
            plan = estimate(request, dit, max(encoders, key=_weights, default=None),
                            max(vaes, key=_weights, default=None), compute_dtype)
            check_fits(plan, available, what=f"this prompt ({os.path.basename(path)})")
    except InsufficientMemoryError as exc:
        return str(exc)
    except (Flux2Error, OSError, ValueError) as exc:  # validation or the loader reports it with its node
        log.debug("memory estimate skipped: %s", exc)
    return None


def _loaded_files(prompt: dict, loaders: dict[str, str], kind: str) -> list[tuple[str, dict]]:
    """(full path, node) of every existing file the prompt's `loaders` name."""
    found = []
    for node in prompt.values():
        input_name = loaders.get(node.get("class_type")) if isinstance(node, dict) else None
        name = node.get("inputs", {}).get(input_name) if input_name else None
        path = folders.get_full_path(kind, name) if isinstance(name, str) else None
        if path is not None and (os.path.isfile(path) or os.path.isdir(path)):  # a file or a diffusers folder
            found.append((path, node))
    return found


def _memory_request(prompt: dict):
    """The largest image x batch any latent node makes (the smallest image when none does: an edit of an
    input image is still refused when the weights alone cannot fit), and cfg != 1 when any sampler says so."""
    from flux2_core.memory.estimate import MemoryRequest
    from flux2_core.sampling import PIXELS_PER_LATENT_CELL as CELL

    width = height = CELL
    batch, cfg = 1, 1.0
    for node in prompt.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            continue
        value = inputs.get("cfg")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value != 1:
            cfg = float(value)
        w, h, b = int_input(inputs, WIDTH_INPUTS), int_input(inputs, HEIGHT_INPUTS), int_input(inputs, BATCH_INPUTS)
        if "Latent" not in str(node.get("class_type")) or w is None or h is None:
            continue
        w, h, b = max(CELL, w - w % CELL), max(CELL, h - h % CELL), max(1, b or 1)
        if w * h * b > width * height * batch:
            width, height, batch = w, h, b
    return MemoryRequest(width, height, batch, cfg, references=_reference_sizes(prompt))


# Nodes that add a reference image -> the input it arrives on. Flux2ReferenceImage downscales to the official
# pixel cap first (one image: 2024^2, several: 1024^2 each), as flux2_core.references does.
REFERENCE_NODES = {"ReferenceLatent": "latent", "Flux2ReferenceLatent": "latent", "Flux2ReferenceImage": "image"}
CAPPED_REFERENCE_NODES = ("Flux2ReferenceImage",)
# A reference whose size the prompt does not tell (an image made by a node, not loaded): 1 MP, the usual size.
UNKNOWN_REFERENCE_SIZE = (1024, 1024)
UPSTREAM_HOPS = 16


def _reference_sizes(prompt: dict) -> tuple[tuple[int, int], ...]:
    """(width, height) in pixels of each reference image the prompt adds, multiples of 16."""
    from flux2_core.references import reference_pixel_cap
    from flux2_core.sampling import PIXELS_PER_LATENT_CELL as CELL

    found = [(node["class_type"], _source_size(prompt, node["inputs"].get(input_name)))
             for node in prompt.values() if isinstance(node, dict) and isinstance(node.get("inputs"), dict)
             and (input_name := REFERENCE_NODES.get(node.get("class_type"))) is not None]
    capped = sum(class_type in CAPPED_REFERENCE_NODES for class_type, _ in found)
    sizes = []
    for class_type, (width, height) in found:
        if class_type in CAPPED_REFERENCE_NODES and width * height > (cap := reference_pixel_cap(capped)):
            scale = (cap / (width * height)) ** 0.5
            width, height = int(width * scale), int(height * scale)
        sizes.append((max(CELL, width - width % CELL), max(CELL, height - height % CELL)))
    return tuple(sizes)


def _source_size(prompt: dict, link: Any) -> tuple[int, int]:
    """The pixel size of the image or latent arriving on `link`: the first node upstream that states one
    (width and height inputs, a megapixels target, or a LoadImage whose file header tells)."""
    for _ in range(UPSTREAM_HOPS):
        node = prompt.get(str(link[0])) if isinstance(link, list) and link else None
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            break
        width, height = int_input(inputs, WIDTH_INPUTS), int_input(inputs, HEIGHT_INPUTS)
        if width and height:
            return width, height
        megapixels = inputs.get("megapixels")
        if isinstance(megapixels, (int, float)) and megapixels > 0:
            side = int((megapixels * 1024 * 1024) ** 0.5)  # ComfyUI's ImageScaleToTotalPixels counts 1024^2
            return side, side
        if node.get("class_type") == "LoadImage":
            return _input_image_size(inputs.get("image"))
        link = next((value for value in inputs.values() if isinstance(value, list) and len(value) == 2
                     and isinstance(value[1], int)), None)
    return UNKNOWN_REFERENCE_SIZE


def _input_image_size(name: Any) -> tuple[int, int]:
    """The size in an input image's header (Pillow reads no pixels for it)."""
    from PIL import Image, UnidentifiedImageError

    path = folders.get_annotated_filepath(name) if isinstance(name, str) else None
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError, TypeError, UnidentifiedImageError):  # left to LoadImage to report
        return UNKNOWN_REFERENCE_SIZE


def _shape(kind: str, path: str, compute_dtype, weight_dtype: Any = None):
    return _cached_shape(kind, path, _modified_ns(path), compute_dtype, weight_dtype)


def _modified_ns(path: str) -> int:
    """A file's modification time; for a diffusers folder, the latest of the files in it and below."""
    if os.path.isfile(path):
        return os.stat(path).st_mtime_ns
    return max((os.stat(os.path.join(root, name)).st_mtime_ns for root, _, names in os.walk(path) for name in names),
               default=os.stat(path).st_mtime_ns)


# The component of a diffusers pipeline folder that each kind loads (a component folder is read as it is).
PIPELINE_COMPONENTS = {"dit": "transformer", "text_encoder": "text_encoder", "vae": "vae"}


@functools.lru_cache(maxsize=256)
def _cached_shape(kind: str, path: str, _mtime_ns: int, compute_dtype, weight_dtype: Any):
    """The estimate's view of one file or folder (headers only), kept until a file in it changes."""
    from flux2_core.checkpoints.detect import component_path
    from flux2_core.memory.estimate import dit_shape_from_file, text_encoder_shape_from_file, vae_shape_from_file

    path = component_path(path, PIPELINE_COMPONENTS[kind])
    if kind == "dit":
        return dit_shape_from_file(path, compute_dtype, weight_dtype)
    if kind == "text_encoder":
        return text_encoder_shape_from_file(path, compute_dtype)
    return vae_shape_from_file(path, compute_dtype)


def _weights(shape) -> int:
    return shape.weight_bytes
