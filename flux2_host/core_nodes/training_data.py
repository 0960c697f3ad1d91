"""ComfyUI's training-data nodes (comfy_extras/nodes_dataset.py, category dataset) under their ids, inputs,
defaults and widget order: images and captions encoded into the LATENT list and CONDITIONING list TrainLoraNode
trains on, saved to / loaded from output/<folder>, and grouped into resolution buckets.

MakeTrainingDataset VAE-encodes each image (one LATENT [1, 128, H/16, W/16] per image, center-cropped to the
16 px grid) and text-encodes each caption (one CONDITIONING per caption; one caption is used for all images,
none means the empty prompt). ResolutionBucket stacks the latents of equal latent size into one LATENT per
size, with a CONDITIONING holding one entry per stacked latent, which TrainLoraNode reads with `bucket_mode`.
SaveTrainingDataset writes `shard_NNNN.pkl` files (torch.save of {"latents", "conditioning"}) and
metadata.json as ComfyUI does; LoadTrainingDataset reads them with torch's weights-only loader.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from flux2_core.comfy_layouts import encode_image, encode_prompt, latent_samples

from .. import folders
from .dataset_folders import output_folder

log = logging.getLogger(__name__)


class TrainingDataNode:
    """A dataset node whose outputs are a LATENT list and a CONDITIONING list, one entry per sample."""

    CATEGORY = "dataset"
    EXPERIMENTAL = True
    RETURN_TYPES = ("LATENT", "CONDITIONING")
    RETURN_NAMES = ("latents", "conditioning")
    OUTPUT_IS_LIST = (True, True)
    OUTPUT_TOOLTIPS = ("List of latent dicts", "List of conditioning lists")


class MakeTrainingDataset(TrainingDataNode):
    DESCRIPTION = "Encodes images with the VAE and captions with the text encoder into a training dataset."
    FUNCTION = "make"
    INPUT_IS_LIST = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "images": ("IMAGE", {"tooltip": "List of images to encode."}),
            "vae": ("VAE", {"tooltip": "VAE model for encoding images to latents."}),
            "clip": ("CLIP", {"tooltip": "CLIP model for encoding text to conditioning."}),
        }, "optional": {
            "texts": ("STRING", {"tooltip": "List of text captions. Can be length n (matching images), 1 (repeated "
                                            "for all), or omitted (uses empty string)."}),
        }}

    def make(self, images: list[torch.Tensor], vae: list, clip: list,
             texts: list[str] | None = None) -> tuple[list[dict], list]:
        if not images:
            raise ValueError("MakeTrainingDataset: images: expected at least one image, found none")
        texts = list(texts) if texts else [""]
        if len(texts) == 1:
            texts = texts * len(images)
        if len(texts) != len(images):
            raise ValueError(f"MakeTrainingDataset: texts: expected {len(images)} captions (one per image), 1 or "
                             f"none, found {len(texts)}")
        latents = [{"samples": encode_image(vae[0], image)} for image in images]
        embeddings: dict[str, torch.Tensor] = {}  # a caption shared by several images is encoded once
        for text in texts:
            if text not in embeddings:
                embeddings[text] = encode_prompt(clip[0], text)
        return latents, [[[embeddings[text], {}]] for text in texts]


class ResolutionBucket(TrainingDataNode):
    DESCRIPTION = "Groups latents and their conditioning by latent size into batched buckets."
    FUNCTION = "bucket"
    INPUT_IS_LIST = True
    OUTPUT_TOOLTIPS = ("List of batched latent dicts, one per resolution bucket.",
                       "List of condition lists, one per resolution bucket.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "latents": ("LATENT", {"tooltip": "List of latent dicts to bucket by resolution."}),
            "conditioning": ("CONDITIONING", {"tooltip": "List of conditioning lists (must match latents length)."}),
        }}

    def bucket(self, latents: list[dict], conditioning: list) -> tuple[list[dict], list]:
        """Each LATENT's samples [B, ...] take the B entries of its CONDITIONING, in order; buckets come in the
        order their size first appears."""
        if len(latents) != len(conditioning):
            raise ValueError(f"ResolutionBucket: conditioning: expected one per latent ({len(latents)}), found "
                             f"{len(conditioning)}")
        buckets: dict[tuple[int, ...], tuple[list, list]] = {}
        for index, (latent, entries) in enumerate(zip(latents, conditioning)):
            samples = latent_samples(latent, f"ResolutionBucket: latents[{index}]")
            if len(entries) != samples.shape[0]:
                raise ValueError(f"ResolutionBucket: conditioning[{index}]: expected {samples.shape[0]} entries "
                                 f"(one per latent of its batch), found {len(entries)}")
            for sample, entry in zip(samples, entries):
                members = buckets.setdefault(tuple(sample.shape[-2:]), ([], []))
                members[0].append(sample)
                members[1].append(entry)
        for (height, width), (samples, _) in buckets.items():
            log.info("ResolutionBucket: %dx%d latents: %d samples", height, width, len(samples))
        return ([{"samples": torch.stack(samples)} for samples, _ in buckets.values()],
                [entries for _, entries in buckets.values()])


class SaveTrainingDataset:
    DESCRIPTION = "Saves an encoded training dataset (latents + conditioning) in shards to output/."
    CATEGORY = "dataset"
    FUNCTION = "save"
    EXPERIMENTAL = True
    OUTPUT_NODE = True
    INPUT_IS_LIST = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "latents": ("LATENT", {"tooltip": "List of latent dicts from MakeTrainingDataset."}),
            "conditioning": ("CONDITIONING", {"tooltip": "List of conditioning lists from MakeTrainingDataset."}),
            "folder_name": ("STRING", {"default": "training_dataset",
                                       "tooltip": "Name of folder to save dataset (inside output directory)."}),
            "shard_size": ("INT", {"default": 1000, "min": 1, "max": 100000, "advanced": True,
                                   "tooltip": "Number of samples per shard file."}),
        }}

    def save(self, latents: list[dict], conditioning: list, folder_name: list[str], shard_size: list[int]) -> dict:
        if len(latents) != len(conditioning):
            raise ValueError(f"SaveTrainingDataset: conditioning: expected one per latent ({len(latents)}), found "
                             f"{len(conditioning)}")
        directory = output_folder("SaveTrainingDataset", folder_name[0])
        size = shard_size[0]
        shards = math.ceil(len(latents) / size)
        for shard in range(shards):
            part = slice(shard * size, (shard + 1) * size)
            torch.save({"latents": latents[part], "conditioning": conditioning[part]},
                       directory / f"shard_{shard:04d}.pkl")
        metadata = {"num_samples": len(latents), "num_shards": shards, "shard_size": size}
        (directory / "metadata.json").write_text(json.dumps(metadata, indent=2), encoding="utf-8")
        return {"ui": {"text": [f"saved {len(latents)} samples in {shards} shards to {directory}"]}}


class LoadTrainingDataset(TrainingDataNode):
    DESCRIPTION = "Loads an encoded training dataset saved by Save Training Dataset from output/."
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "folder_name": ("STRING", {"default": "training_dataset",
                                       "tooltip": "Name of folder containing the saved dataset (inside output "
                                                  "directory)."}),
        }}

    def load(self, folder_name: str) -> tuple[list[dict], list]:
        root = Path(folders.get_output_directory()).resolve()
        directory = (root / folder_name).resolve()
        if root not in directory.parents or not directory.is_dir():
            raise ValueError(f"LoadTrainingDataset: folder_name: {folder_name!r} is not a folder in the output "
                             f"folder {folders.get_output_directory()}")
        shards = sorted(directory.glob("shard_*.pkl"))
        if not shards:
            raise ValueError(f"LoadTrainingDataset: folder_name: expected shard_NNNN.pkl files in {directory}, "
                             "found none")
        latents, conditioning = [], []
        for shard in shards:
            try:
                data = torch.load(shard, weights_only=True)
                latents += data["latents"]
                conditioning += data["conditioning"]
            except Exception as error:  # a truncated or foreign file: name it
                raise ValueError(f"LoadTrainingDataset: folder_name: {shard} is not a training dataset shard "
                                 f"({type(error).__name__}: {error})") from None
        return latents, conditioning


NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (
    MakeTrainingDataset, SaveTrainingDataset, LoadTrainingDataset, ResolutionBucket)}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MakeTrainingDataset": "Make Training Dataset",
    "SaveTrainingDataset": "Save Training Dataset",
    "LoadTrainingDataset": "Load Training Dataset",
    "ResolutionBucket": "Resolution Bucket",
}
