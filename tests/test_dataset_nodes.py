"""ComfyUI's dataset nodes in the host (flux2_host/core_nodes/dataset_*.py, training_data.py): declarations as
ComfyUI's comfy_extras/nodes_dataset.py has them, and real outputs checked against PIL / numpy / the host's own
VAEEncode and CLIPTextEncode on the tiny demo models."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flux2_core.comfy_layouts import encode_prompt
from flux2_host import folders
from flux2_host.core_nodes import dataset_images, dataset_texts
from flux2_host.core_nodes.dataset_folders import (LoadImageDataSetFromFolder, LoadImageTextDataSetFromFolder,
                                                   SaveImageDataSetToFolder, SaveImageTextDataSetToFolder)
from flux2_host.core_nodes.latent import VAEEncode
from flux2_host.core_nodes.loaders import CLIPLoader, VAELoader
from flux2_host.core_nodes.training_data import (LoadTrainingDataset, MakeTrainingDataset, ResolutionBucket,
                                                 SaveTrainingDataset)
from flux2_host.registry import NodeRegistry

# ComfyUI's declarations (nodes_dataset.py): category, is_input_list, input names in widget order with the
# defaults of the widgets, outputs, output_is_list.
IMAGE_NODE = ("dataset/image", False)
TEXT_NODE = ("dataset/text", False)
COMFYUI = {
    "LoadImageDataSetFromFolder": ("dataset", False, {"folder": None}, ["IMAGE"], [True]),
    "LoadImageTextDataSetFromFolder": ("dataset", False, {"folder": None}, ["IMAGE", "STRING"], [True, True]),
    "SaveImageDataSetToFolder": ("dataset", True, {"images": None, "folder_name": "dataset",
                                                   "filename_prefix": "image", "mode": "overwrite"}, [], []),
    "SaveImageTextDataSetToFolder": ("dataset", True, {"images": None, "texts": None, "folder_name": "dataset",
                                                       "filename_prefix": "image", "mode": "overwrite"}, [], []),
    "ResizeImagesByShorterEdge": (*IMAGE_NODE, {"images": None, "shorter_edge": 512}, ["IMAGE"], [False]),
    "ResizeImagesByLongerEdge": (*IMAGE_NODE, {"images": None, "longer_edge": 1024}, ["IMAGE"], [False]),
    "CenterCropImages": (*IMAGE_NODE, {"images": None, "width": 512, "height": 512}, ["IMAGE"], [False]),
    "RandomCropImages": (*IMAGE_NODE, {"images": None, "width": 512, "height": 512, "seed": 0}, ["IMAGE"], [False]),
    "NormalizeImages": (*IMAGE_NODE, {"images": None, "mean": 0.5, "std": 0.5}, ["IMAGE"], [False]),
    "AdjustBrightness": (*IMAGE_NODE, {"images": None, "factor": 1.0}, ["IMAGE"], [False]),
    "AdjustContrast": (*IMAGE_NODE, {"images": None, "factor": 1.0}, ["IMAGE"], [False]),
    "ShuffleDataset": ("dataset/image", True, {"images": None, "seed": 0}, ["IMAGE"], [True]),
    "ShuffleImageTextDataset": ("dataset/image", True, {"images": None, "texts": None, "seed": 0},
                                ["IMAGE", "STRING"], [True, True]),
    "TextToLowercase": (*TEXT_NODE, {"texts": None}, ["STRING"], [False]),
    "TextToUppercase": (*TEXT_NODE, {"texts": None}, ["STRING"], [False]),
    "TruncateText": (*TEXT_NODE, {"texts": None, "max_length": 77}, ["STRING"], [False]),
    "AddTextPrefix": (*TEXT_NODE, {"texts": None, "prefix": ""}, ["STRING"], [False]),
    "AddTextSuffix": (*TEXT_NODE, {"texts": None, "suffix": ""}, ["STRING"], [False]),
    "ReplaceText": (*TEXT_NODE, {"texts": None, "find": "", "replace": ""}, ["STRING"], [False]),
    "StripWhitespace": (*TEXT_NODE, {"texts": None}, ["STRING"], [False]),
    "ImageDeduplication": ("dataset/image", True, {"images": None, "similarity_threshold": 0.95}, ["IMAGE"], [True]),
    "ImageGrid": ("dataset/image", True, {"images": None, "columns": 4, "cell_width": 256, "cell_height": 256,
                                          "padding": 4}, ["IMAGE"], [False]),
    "MergeImageLists": ("dataset/image", True, {"images": None}, ["IMAGE"], [True]),
    # ComfyUI declares no list output here, so its merged list reaches the next node as one value; the host
    # outputs the list (what the node is for).
    "MergeTextLists": ("dataset/text", True, {"texts": None}, ["STRING"], [True]),
    "MakeTrainingDataset": ("dataset", True, {"images": None, "vae": None, "clip": None}, ["LATENT", "CONDITIONING"],
                            [True, True]),
    "SaveTrainingDataset": ("dataset", True, {"latents": None, "conditioning": None, "folder_name": "training_dataset",
                                              "shard_size": 1000}, [], []),
    "LoadTrainingDataset": ("dataset", False, {"folder_name": "training_dataset"}, ["LATENT", "CONDITIONING"],
                            [True, True]),
    "ResolutionBucket": ("dataset", True, {"latents": None, "conditioning": None}, ["LATENT", "CONDITIONING"],
                         [True, True]),
}


@pytest.fixture()
def dirs(tmp_path: Path, demo_models_dir: Path) -> dict[str, Path]:
    paths = {"input": tmp_path / "input", "output": tmp_path / "output"}
    folders.configure(models=str(demo_models_dir), input_dir=str(paths["input"]), output_dir=str(paths["output"]),
                      temp_dir=str(tmp_path / "temp"))
    return paths


def random_picture(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def as_image(picture: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)[None]


def test_declarations_follow_comfyui(dirs) -> None:
    registry = NodeRegistry.default()
    for name, (category, input_list, inputs, outputs, output_lists) in COMFYUI.items():
        info = registry.object_info_for(name)
        required = info["input"]["required"]
        assert list(required) == list(inputs), name
        for field, default in inputs.items():
            if default is not None:
                assert required[field][1]["default"] == default, (name, field)
        assert (info["category"], info["is_input_list"], info["output"], info["output_is_list"]) == \
               (category, input_list, outputs, output_lists), name
        assert info["experimental"] is True
        assert info["output_node"] is (name.startswith("Save") and name != "SaveLoRA")
    assert list(registry.object_info_for("MakeTrainingDataset")["input"]["optional"]) == ["texts"]
    assert registry.object_info_for("SaveImageTextDataSetToFolder")["input"]["required"]["mode"][0] == \
           ["overwrite", "increment"]
    assert registry.display_names["LoadImageTextDataSetFromFolder"] == "Load Image and Text Dataset from Folder"


def write_dataset(folder: Path) -> None:
    """a.png (40x24) + caption, b.jpg without caption, a broken .png, a note, and kohya's 3_extra/ with c.png."""
    folder.mkdir(parents=True)
    random_picture(40, 24, 1).save(folder / "a.png")
    (folder / "a.txt").write_text("  a red circle \n", encoding="utf-8")
    random_picture(20, 30, 2).save(folder / "b.jpg")
    (folder / "broken.png").write_bytes(b"not a picture")
    (folder / "notes.md").write_text("ignored", encoding="utf-8")
    (folder / "3_extra").mkdir()
    random_picture(16, 16, 3).save(folder / "3_extra" / "c.png")
    (folder / "3_extra" / "c.txt").write_text("extra", encoding="utf-8")


def test_folder_loaders_read_pictures_captions_and_kohya_repeats_and_skip_unreadable_files(dirs, caplog) -> None:
    write_dataset(dirs["input"] / "shapes")
    registry = NodeRegistry.default()
    assert "shapes" in registry.object_info_for("LoadImageDataSetFromFolder")["input"]["required"]["folder"][0]
    with caplog.at_level(logging.WARNING):
        images, texts = LoadImageTextDataSetFromFolder().load("shapes")
    assert "LoadImageTextDataSetFromFolder: skipped" in caplog.text and "broken.png" in caplog.text
    assert texts == ["a red circle", "", "extra", "extra", "extra"]
    assert [tuple(image.shape) for image in images] == [(1, 24, 40, 3), (1, 30, 20, 3)] + [(1, 16, 16, 3)] * 3
    with Image.open(dirs["input"] / "shapes" / "b.jpg") as jpeg:
        assert torch.equal(images[1], as_image(jpeg.convert("RGB")))
    [only_top_level] = [LoadImageDataSetFromFolder().load("shapes")[0]]
    assert len(only_top_level) == 2 and torch.equal(only_top_level[0], images[0])
    before = LoadImageTextDataSetFromFolder.IS_CHANGED("shapes")
    assert LoadImageTextDataSetFromFolder.IS_CHANGED("shapes") == before
    (dirs["input"] / "shapes" / "3_extra" / "c.txt").write_text("edited caption", encoding="utf-8")
    assert LoadImageTextDataSetFromFolder.IS_CHANGED("shapes") != before  # a cached dataset is read again


def test_folder_loaders_refuse_bad_folders_by_node_and_field(dirs) -> None:
    (dirs["input"] / "empty").mkdir(parents=True)
    (dirs["input"] / "empty" / "broken.webp").write_bytes(b"\x00")
    with pytest.raises(ValueError, match="LoadImageDataSetFromFolder: folder: 'missing' is not a folder"):
        LoadImageDataSetFromFolder().load("missing")
    with pytest.raises(ValueError, match="LoadImageTextDataSetFromFolder: folder: expected a folder inside"):
        LoadImageTextDataSetFromFolder().load("../output")
    with pytest.raises(ValueError, match="LoadImageDataSetFromFolder: folder: expected .* found 1 unreadable"):
        LoadImageDataSetFromFolder().load("empty")
    random_picture(8, 8, 0).save(dirs["input"] / "empty" / "ok.png")
    (dirs["input"] / "empty" / "ok.txt").write_bytes(b"\xff\xfe caption in another encoding")
    with pytest.raises(ValueError, match="LoadImageTextDataSetFromFolder: folder: expected UTF-8 text in the "
                                         "caption .*ok.txt"):
        LoadImageTextDataSetFromFolder().load("empty")


def test_save_nodes_write_pngs_and_captions_that_the_loader_reads_back(dirs) -> None:
    images = [as_image(random_picture(24, 16, seed)) for seed in range(2)]
    SaveImageTextDataSetToFolder().save(images, ["one", "two"], ["saved"], ["image"], ["overwrite"])
    assert sorted(p.name for p in (dirs["output"] / "saved").iterdir()) == \
           ["image_00000.png", "image_00000.txt", "image_00001.png", "image_00001.txt"]
    folders.set_input_directory(str(dirs["output"]))  # read them back with the loader
    loaded, texts = LoadImageTextDataSetFromFolder().load("saved")
    assert texts == ["one", "two"] and all(torch.equal(a, b) for a, b in zip(loaded, images))
    with pytest.raises(ValueError, match="SaveImageDataSetToFolder: folder_name: expected a folder inside"):
        SaveImageDataSetToFolder().save(images, ["../escape"], ["pic"], ["overwrite"])
    SaveImageDataSetToFolder().save(images, ["plain"], ["pic"], ["increment"])
    SaveImageDataSetToFolder().save(images[:1], ["plain"], ["pic"], ["increment"])
    assert sorted(p.name for p in (dirs["output"] / "plain").iterdir()) == \
           ["pic_00001_00000.png", "pic_00001_00001.png", "pic_00002_00000.png"]


def lanczos_reference(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PIL's lanczos of the 8-bit picture (values truncated, as ComfyUI's tensor_to_pil converts)."""
    array = (image[0].numpy() * 255).clip(0, 255).astype(np.uint8)
    return as_image(Image.fromarray(array).resize(size, Image.Resampling.LANCZOS))


@pytest.mark.parametrize(("width", "height", "edge", "shorter", "longer"), [
    (40, 24, 12, (20, 12), (12, 7)),  # wide: 40 * 12 / 24 = 20; 24 * 12 / 40 = 7.2 -> 7
    (24, 41, 10, (10, 17), (5, 10)),  # tall: 41 * 10 / 24 = 17.08 -> 17; 24 * 10 / 41 = 5.85 -> 5
    (30, 30, 20, (20, 20), (20, 20)),  # square
])
def test_resize_by_edge_follows_comfyuis_formula_and_pils_lanczos(width, height, edge, shorter, longer) -> None:
    image = as_image(random_picture(width, height, 7))
    [by_shorter] = dataset_images.ResizeImagesByShorterEdge().process(image, shorter_edge=edge)
    [by_longer] = dataset_images.ResizeImagesByLongerEdge().process(image, longer_edge=edge)
    assert tuple(by_shorter.shape) == (1, shorter[1], shorter[0], 3)
    assert tuple(by_longer.shape) == (1, longer[1], longer[0], 3)
    assert torch.equal(by_shorter, lanczos_reference(image, shorter))
    assert torch.equal(by_longer, lanczos_reference(image, longer))


def test_crops_and_pixel_adjustments() -> None:
    image = as_image(random_picture(40, 24, 5))
    [center] = dataset_images.CenterCropImages().process(image, width=16, height=16)
    assert torch.equal(center, image[:, 4:20, 12:28])
    [too_big] = dataset_images.CenterCropImages().process(image, width=64, height=16)
    assert torch.equal(too_big, image[:, 4:20, :])
    [random_crop] = dataset_images.RandomCropImages().process(image, width=16, height=16, seed=2**32 + 4)
    np.random.seed((2**32 + 4) % (2**32 - 1))  # ComfyUI's draw: numpy's global generator, seeded per image
    left, top = np.random.randint(0, 25), np.random.randint(0, 9)
    assert torch.equal(random_crop, image[:, top:top + 16, left:left + 16])
    [normalized] = dataset_images.NormalizeImages().process(image, mean=0.25, std=0.5)
    assert torch.allclose(normalized, (image - 0.25) / 0.5)
    [brighter] = dataset_images.AdjustBrightness().process(image, factor=1.5)
    assert torch.equal(brighter, (image * 1.5).clamp(0, 1))
    [contrast] = dataset_images.AdjustContrast().process(image, factor=0.5)
    assert torch.allclose(contrast, (image - 0.5) * 0.5 + 0.5)


def test_list_nodes_shuffle_deduplicate_grid_and_merge() -> None:
    images = [as_image(random_picture(24, 16, seed)) for seed in range(4)]
    [shuffled] = dataset_images.ShuffleDataset().process(images, seed=[3])
    order = np.random.RandomState(3).permutation(4)
    assert all(torch.equal(a, images[i]) for a, i in zip(shuffled, order))
    pictures, texts = dataset_images.ShuffleImageTextDataset().shuffle(images, list("abcd"), [3])
    assert texts == [list("abcd")[i] for i in order] and torch.equal(pictures[0], images[order[0]])
    duplicated = [images[0], images[1], images[0].clone(), (images[1] * 0.98)]
    [unique] = dataset_images.ImageDeduplication().process(duplicated, similarity_threshold=[0.95])
    assert len(unique) == 2 and torch.equal(unique[1], images[1])
    [grid] = dataset_images.ImageGrid().process(images[:3], columns=[2], cell_width=[32], cell_height=[20],
                                                 padding=[4])
    assert tuple(grid.shape) == (1, 44, 68, 3)
    assert torch.equal(grid[:, 24:44, 0:32], lanczos_reference(images[2], (32, 20)))
    assert float(grid[:, :, 32:36].abs().sum()) == 0.0 and float(grid[:, 24:, 36:].abs().sum()) == 0.0
    [merged] = dataset_images.MergeImageLists().process(images)
    assert len(merged) == 4


def test_text_nodes() -> None:
    nodes = dataset_texts
    assert nodes.TextToLowercase().process("A Cat") == ("a cat",)
    assert nodes.TextToUppercase().process("a cat") == ("A CAT",)
    assert nodes.TruncateText().process("abcdef", max_length=3) == ("abc",)
    assert nodes.AddTextPrefix().process("cat", prefix="photo of ") == ("photo of cat",)
    assert nodes.AddTextSuffix().process("cat", suffix=", sks") == ("cat, sks",)
    assert nodes.ReplaceText().process("a cat", find="cat", replace="dog") == ("a dog",)
    assert nodes.StripWhitespace().process("  cat \n") == ("cat",)
    assert nodes.MergeTextLists().merge(["a", "b"]) == (["a", "b"],)


@pytest.fixture()
def encoders(dirs):
    [vae] = VAELoader().load_vae("flux2-vae.safetensors")
    [clip] = CLIPLoader().load_clip("qwen_3_4b.safetensors", "flux2")
    return vae, clip


def test_make_training_dataset_encodes_each_image_and_caption(encoders) -> None:
    vae, clip = encoders
    images = [as_image(random_picture(64, 48, 1)), as_image(random_picture(40, 35, 2))]
    latents, conditioning = MakeTrainingDataset().make(images, [vae], [clip], ["a cat", "a dog"])
    assert [tuple(latent["samples"].shape) for latent in latents] == [(1, 128, 3, 4), (1, 128, 2, 2)]
    [expected] = VAEEncode().encode(vae, images[1])
    assert torch.equal(latents[1]["samples"], expected["samples"])
    assert [len(entries) for entries in conditioning] == [1, 1]
    assert torch.equal(conditioning[1][0][0], encode_prompt(clip, "a dog")) and conditioning[1][0][1] == {}
    _, shared = MakeTrainingDataset().make(images, [vae], [clip], ["one caption"])
    assert len(shared) == 2 and torch.equal(shared[0][0][0], shared[1][0][0])
    _, unconditional = MakeTrainingDataset().make(images[:1], [vae], [clip])
    assert torch.equal(unconditional[0][0][0], encode_prompt(clip, ""))
    with pytest.raises(ValueError, match="MakeTrainingDataset: texts: expected 2 captions"):
        MakeTrainingDataset().make(images, [vae], [clip], ["a", "b", "c"])


def test_resolution_bucket_stacks_equal_sizes_with_their_conditioning() -> None:
    latents = [{"samples": torch.randn(1, 128, 3, 4)}, {"samples": torch.randn(2, 128, 2, 2)},
               {"samples": torch.randn(1, 128, 3, 4)}]
    entries = [[[torch.full((1, 4, 8), float(i)), {"n": i}]] for i in range(4)]
    conditioning = [entries[0], entries[1] + entries[2], entries[3]]
    buckets, bucket_conditioning = ResolutionBucket().bucket(latents, conditioning)
    assert [tuple(bucket["samples"].shape) for bucket in buckets] == [(2, 128, 3, 4), (2, 128, 2, 2)]
    assert torch.equal(buckets[0]["samples"][1], latents[2]["samples"][0])
    assert [[entry[1]["n"] for entry in bucket] for bucket in bucket_conditioning] == [[0, 3], [1, 2]]
    with pytest.raises(ValueError, match=r"ResolutionBucket: conditioning\[1\]: expected 2 entries"):
        ResolutionBucket().bucket(latents, [entries[0], entries[1], entries[3]])


def test_training_dataset_saves_in_shards_and_loads_back(dirs) -> None:
    latents = [{"samples": torch.randn(1, 128, 2, 2)} for _ in range(3)]
    conditioning = [[[torch.randn(1, 4, 8), {}]] for _ in range(3)]
    SaveTrainingDataset().save(latents, conditioning, ["set"], [2])
    directory = dirs["output"] / "set"
    assert sorted(p.name for p in directory.iterdir()) == ["metadata.json", "shard_0000.pkl", "shard_0001.pkl"]
    loaded_latents, loaded_conditioning = LoadTrainingDataset().load("set")
    assert all(torch.equal(a["samples"], b["samples"]) for a, b in zip(loaded_latents, latents))
    assert all(torch.equal(a[0][0], b[0][0]) for a, b in zip(loaded_conditioning, conditioning))
    with pytest.raises(ValueError, match="LoadTrainingDataset: folder_name: 'nothing' is not a folder"):
        LoadTrainingDataset().load("nothing")
