"""Latent and text-embedding caches: encode once, free the encoders, train from files.

Each cache file is named by a hash of everything its content depends on, so a changed image, caption, model
file or setting gets a new file and nothing stale is reused; files that already exist are skipped
(`skip_existing`, musubi's default):
- latents: `latents/<sha256(image bytes, control images' bytes, bucket size, VAE identity, version)>.safetensors`
  with `latent` [1, 128, h, w] and `control_<i>` (each reference encoded like inference does it);
- text: `text/<sha256(caption, text encoder identity, version)>.safetensors` with `context` [1, 512, C].
A model's identity is its size plus a hash of its first and last MiB (the safetensors header and data).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file

from ..checkpoints.loaders import load_text_encoder, load_vae
from ..errors import Flux2Error
from ..references import pil_to_tensor, preprocess_reference, reference_pixel_cap
from .buckets import assign_bucket, fit_to_bucket
from .checkpointing import atomic_save_file
from .datasets import DatasetSpec, DataReport, ImageItem

CACHE_VERSION = "flux2-train-cache-1"
_EDGE = 1 << 20


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_identity(path: str | os.PathLike) -> str:
    """Size + first and last MiB of every weight file (a folder: all of them, sorted)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as handle:
            digest.update(handle.read(_EDGE))
            handle.seek(max(0, size - _EDGE))
            digest.update(handle.read(_EDGE))
    return digest.hexdigest()


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts]).encode()).hexdigest()


@dataclass
class CachedItem:
    item: ImageItem
    dataset: int
    bucket: tuple[int, int]  # (width, height) in pixels
    latent_file: Path
    text_files: tuple[Path, ...]  # one per caption variant (several with shuffled caption parts)


def caption_variants(caption: str, shuffle: bool, separator: str, keep: int, count: int, seed: int) -> list[str]:
    """The caption, or `count` seeded shuffles of its parts (the first `keep` parts stay in place)."""
    if not shuffle:
        return [caption]
    parts = [p.strip() for p in caption.split(separator) if p.strip()]
    rng = random.Random(f"{seed}:{caption}")
    variants = []
    for _ in range(count):
        tail = parts[keep:]
        rng.shuffle(tail)
        variants.append(f"{separator} ".join(parts[:keep] + tail))
    return variants


def text_file(directory: Path, caption: str, text_encoder_id: str) -> Path:
    return directory / "text" / f"{_key(caption, text_encoder_id)}.safetensors"


def plan_cache(specs: Sequence[DatasetSpec], cache_directory: Path, vae_id: str, text_encoder_id: str,
               report: DataReport, captions: Callable[[str], list[str]] = lambda caption: [caption]) -> list[CachedItem]:
    """Check every item (image readable, big enough, controls readable) and name its cache files."""
    planned = []
    for dataset_index, spec in enumerate(specs):
        directory = Path(spec.cache_directory) if spec.cache_directory else cache_directory
        for item in spec.items:
            try:
                with Image.open(item.image) as image:
                    size = image.size
                bucket = assign_bucket(size, spec.resolution, spec.enable_bucket, spec.bucket_no_upscale)
                digests = [file_digest(item.image)] + [file_digest(c) for c in item.controls]
            except (OSError, UnidentifiedImageError, Flux2Error) as error:
                report.skip(str(item.image), str(error))
                continue
            latent = directory / "latents" / f"{_key(digests, bucket, vae_id)}.safetensors"
            texts = tuple(text_file(directory, c, text_encoder_id) for c in captions(item.caption))
            planned.append(CachedItem(item, dataset_index, bucket, latent, texts))
    return planned


def _free(model: torch.nn.Module | None) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def cache_latents(items: list[CachedItem], vae_path: str, device: torch.device, dtype: torch.dtype,
                  skip_existing: bool, report: DataReport) -> list[CachedItem]:
    """Encode missing latents (the VAE is loaded only if one is missing, and freed after); returns the items
    that have a latent file (images that fail to decode are reported and dropped)."""
    todo = [c for c in items if not (skip_existing and c.latent_file.is_file())]
    if not todo:
        return items
    vae = load_vae(vae_path, device=device, dtype=dtype)
    failed = set()
    for cached in todo:
        try:
            with Image.open(cached.item.image) as image:
                pixels = pil_to_tensor(fit_to_bucket(image, cached.bucket))
            tensors = {"latent": vae.encode(pixels.to(device, dtype)).float().cpu()}
            cap = reference_pixel_cap(len(cached.item.controls))
            for index, control in enumerate(cached.item.controls):
                with Image.open(control) as image:
                    reference = preprocess_reference(image, cap)
                tensors[f"control_{index}"] = vae.encode(reference.to(device, dtype)).float().cpu()
        except (OSError, UnidentifiedImageError, Flux2Error) as error:
            report.skip(str(cached.item.image), f"cannot encode: {error}")
            failed.add(id(cached))
            continue
        cached.latent_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_file(tensors, cached.latent_file, {"image": str(cached.item.image)})
    _free(vae)
    return [c for c in items if id(c) not in failed]


@torch.no_grad()
def cache_text(captions: dict[Path, str], text_encoder_path: str, device: torch.device, dtype: torch.dtype,
               skip_existing: bool) -> None:
    """Encode every caption whose file is missing; the text encoder is loaded only if needed and freed after."""
    todo = {path: caption for path, caption in captions.items() if not (skip_existing and path.is_file())}
    if not todo:
        return
    encoder = load_text_encoder(text_encoder_path, device=device, dtype=dtype)
    for path, caption in todo.items():
        context = encoder.encode([caption]).float().cpu()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_file({"context": context}, path, {"caption": caption[:1000]})
    _free(encoder)


def read_cache(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own error types besides OSError
        raise Flux2Error(f"{path}: cannot read the cache file ({error}); delete it to re-encode") from None
