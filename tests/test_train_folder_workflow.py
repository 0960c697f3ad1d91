"""workflows/training/flux2_klein_base_train_lora_from_folder.json: a canvas file whose dataset comes from a
folder of captioned pictures (ComfyUI's dataset nodes), trained with TrainLoraNode and sampled with the
result in one graph; queued over HTTP on `flux2 serve --demo-models` it reports progress and loss on the
WebSocket, /interrupt leaves a state the next run continues from, samples drawn while training arrive as
preview images, and the LoRA file it saves lowers the training objective on that dataset."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pytest
import torch
from PIL import Image

from flux2_core.lora import load_lora
from flux2_core.patched_model import PatchedModel
from flux2_core.train.checkpointing import STATE_FILE
from flux2_core.train.config import TrainConfig
from flux2_core.train.objective import Batch, FlowMatchingObjective
from flux2_host import folders
from flux2_host.core_nodes.dataset_folders import LoadImageTextDataSetFromFolder
from flux2_host.core_nodes.dataset_images import CenterCropImages, ResizeImagesByShorterEdge
from flux2_host.core_nodes.loaders import CLIPLoader, VAELoader
from flux2_host.core_nodes.training_data import MakeTrainingDataset, ResolutionBucket
from flux2_host.demo_inputs import DEMO_DATASET, DEMO_DATASET_PICTURES, write_demo_dataset
from flux2_host.executor import validate_prompt
from flux2_host.registry import NodeRegistry
from flux2_host.workflow import to_api_prompt

WORKFLOW = (Path(__file__).resolve().parent.parent / "workflows" / "training" /
            "flux2_klein_base_train_lora_from_folder.json")
TRAIN_NODE, SAVE_LORA, LOSS_GRAPH, SAVE_IMAGE, SCHEDULER = "10", "11", "12", "23", "19"


def graph() -> dict:
    return json.loads(WORKFLOW.read_text(encoding="utf-8"))


def test_folder_workflow_is_a_canvas_file_that_validates(tmp_path, demo_models_dir) -> None:
    folders.configure(models=str(demo_models_dir), input_dir=str(tmp_path / "input"),
                      output_dir=str(tmp_path / "output"), temp_dir=str(tmp_path / "temp"))
    write_demo_dataset(tmp_path / "input")
    workflow = graph()
    nodes = {node["id"]: node for node in workflow["nodes"]}
    assert workflow["version"] == 0.4 and nodes[1]["type"] == "Note"
    for link_id, origin, origin_slot, target, target_slot, link_type in workflow["links"]:
        assert link_id in nodes[origin]["outputs"][origin_slot]["links"]
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
        assert nodes[origin]["outputs"][origin_slot]["type"] == link_type
    registry = NodeRegistry.default()
    prompt = to_api_prompt(workflow, registry)
    assert prompt["5"]["inputs"] == {"folder": DEMO_DATASET}
    assert prompt["9"]["class_type"] == "MakeTrainingDataset" and prompt["9"]["inputs"]["texts"] == ["8", 0]
    validation = validate_prompt(prompt, registry)
    assert validation.ok, validation.node_errors


def test_demo_dataset_is_captioned_pictures_of_several_sizes_written_once(tmp_path) -> None:
    written = write_demo_dataset(tmp_path)
    assert sorted(path.stem for path in written) == sorted(DEMO_DATASET_PICTURES)
    for path in written:
        size, _, caption = DEMO_DATASET_PICTURES[path.stem]
        assert path.with_suffix(".txt").read_text(encoding="utf-8") == caption
        with Image.open(path) as picture:
            assert picture.size == size and picture.mode == "RGB"
    (tmp_path / DEMO_DATASET / "mine.png").write_bytes(b"")
    assert write_demo_dataset(tmp_path) == [] and (tmp_path / DEMO_DATASET / "mine.png").exists()


def preview_images(run, node: str) -> list[Image.Image]:
    """The preview frames (ComfyUI's binary layout with metadata) a node sent."""
    pictures = []
    for frame in run.binary_frames:
        event_type, length = struct.unpack(">II", frame[:8])
        metadata = json.loads(frame[8:8 + length])
        if event_type == 4 and metadata["node_id"] == node:
            pictures.append(Image.open(io.BytesIO(frame[8 + length:])))
    return pictures


def dataset_batch(root: Path) -> Batch:
    """The workflow's training data made in-process with the same nodes: pictures resized to 64 px on the
    shorter edge, center-cropped to 64x64, captions with the trigger in front, encoded."""
    folders.configure(models=str(root / "models"), input_dir=str(root / "input"), output_dir=str(root / "output"),
                      temp_dir=str(root / "temp"))
    images, texts = LoadImageTextDataSetFromFolder().load(DEMO_DATASET)
    images = [CenterCropImages().process(ResizeImagesByShorterEdge().process(image, shorter_edge=64)[0],
                                         width=64, height=64)[0] for image in images]
    [vae] = VAELoader().load_vae("flux2-vae.safetensors")
    [clip] = CLIPLoader().load_clip("qwen_3_4b.safetensors", "flux2")
    latents, conditioning = MakeTrainingDataset().make(images, [vae], [clip], [f"sks style, {t}" for t in texts])
    return Batch(torch.cat([latent["samples"] for latent in latents]),
                 torch.cat([entries[0][0] for entries in conditioning]))


def objective(model: PatchedModel, batch: Batch) -> float:
    """The training objective on `batch` with fixed noise and sigmas (16 draws), without gradients."""
    loss = FlowMatchingObjective(TrainConfig(model_version="klein-base-4b"))
    generator = torch.Generator().manual_seed(123)
    with model.patches_applied() as dit, torch.no_grad():
        return float(torch.stack([loss(dit, batch, generator)[0] for _ in range(16)]).mean())


@pytest.mark.server
@pytest.mark.slow
def test_folder_workflow_trains_over_http_and_its_lora_file_lowers_the_loss(tmp_path) -> None:
    """Queued over HTTP: /interrupt at training step 3 leaves a state; queued again, training continues from it
    to step 20 with progress, loss messages and preview samples, then the LoRA is saved and sampled with."""
    from server_harness import FluxServer

    workflow = graph()
    prompt = to_api_prompt(workflow, NodeRegistry.default())
    prompt[TRAIN_NODE]["inputs"].update(steps=20, learning_rate=0.01)
    prompt[SCHEDULER]["inputs"]["steps"] = 4
    server = FluxServer(tmp_path, extra_args=("--demo-models",), extra_nodes="")
    write_demo_dataset(server.dirs["input"])  # the suite's dataset (serve --demo-models would draw the same)
    server.start()
    flags = {"supports_preview_metadata": True}
    try:
        def interrupt_at_step_three(event: str, data: dict) -> None:
            if event == "progress" and data["node"] == TRAIN_NODE and data["value"] == 3:
                assert server.post("/api/interrupt").status == 200

        first = server.run_prompt(prompt, timeout=600, feature_flags=flags, on_message=interrupt_at_step_three)
        assert first.events("execution_interrupted")[0]["node_id"] == TRAIN_NODE, server.log()[-3000:]
        [state] = (server.dirs["output"] / "training").glob("*-state")
        stopped_at = torch.load(state / STATE_FILE, weights_only=False)["step"]
        assert 3 <= stopped_at < 20

        run = server.run_prompt(prompt, timeout=600, feature_flags=flags)
        assert run.events("execution_success"), server.log()[-3000:]
        training = [data["value"] for data in run.events("progress") if data["node"] == TRAIN_NODE]
        assert training == list(range(stopped_at + 1, 21)) and not state.exists()
        losses = run.events("flux2.training")
        assert [data["step"] for data in losses] == training
        assert all(data["node"] == TRAIN_NODE and data["loss"] > 0 for data in losses)
        # samples drawn while training arrive as the training node's preview images (steps 5, 10, 15, 20)
        assert len(preview_images(run, TRAIN_NODE)) == len([s for s in (5, 10, 15, 20) if s > stopped_at])
        executed = {data["node"]: data["output"] for data in run.events("executed")}
        assert executed[LOSS_GRAPH]["images"] and executed[SAVE_IMAGE]["images"]
        [saved] = executed[SAVE_LORA]["lora"]
        assert saved["filename"] == "flux2_klein_base_folder_lora_20_steps_00001_.safetensors"
    finally:
        server.stop()
    lora = load_lora(server.dirs["output"] / saved["subfolder"] / saved["filename"])
    assert lora.patches and not lora.unmatched_keys
    assert {patch.delta.rank for patch in lora.patches} == {4}
    batch = dataset_batch(tmp_path)
    assert len(batch.latents) == len(DEMO_DATASET_PICTURES) and batch.latents.shape[-2:] == (4, 4)
    model = PatchedModel.load(server.dirs["models"] / "diffusion_models" / "flux-2-klein-base-4b.safetensors")
    assert objective(model.with_lora(lora, 1.0), batch) < 0.95 * objective(model, batch)


class _Silent:
    def send(self, event: str, data: dict) -> None:
        pass

    def send_preview(self, node_id: str, prompt_id: str, image) -> None:
        pass


def test_a_multi_size_folder_trains_in_resolution_buckets_through_the_executor(tmp_path, demo_models_dir) -> None:
    """Folder -> resize (no crop: four sizes) -> MakeTrainingDataset -> ResolutionBucket -> TrainLoraNode with
    bucket_mode, run by the host's executor (list outputs feeding list inputs): the LoRA file is saved with
    the steps in its name."""
    from flux2_host.executor import PromptExecutor

    folders.configure(models=str(demo_models_dir), input_dir=str(tmp_path / "input"),
                      output_dir=str(tmp_path / "output"), temp_dir=str(tmp_path / "temp"))
    write_demo_dataset(tmp_path / "input")
    train_widgets = {"batch_size": 2, "grad_accumulation_steps": 1, "steps": 3, "learning_rate": 0.001, "rank": 2,
                     "optimizer": "AdamW", "loss_function": "MSE", "seed": 0, "training_dtype": "bf16",
                     "lora_dtype": "bf16", "quantized_backward": False, "algorithm": "LoRA",
                     "gradient_checkpointing": True, "checkpoint_depth": 1, "offloading": False,
                     "existing_lora": "[None]", "bucket_mode": True, "bypass_mode": False}
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux-2-klein-base-4b.safetensors",
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "qwen_3_4b.safetensors", "type": "flux2",
                                                     "device": "default"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "flux2-vae.safetensors"}},
        "4": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": DEMO_DATASET}},
        "5": {"class_type": "ResizeImagesByShorterEdge", "inputs": {"images": ["4", 0], "shorter_edge": 40}},
        "6": {"class_type": "MakeTrainingDataset", "inputs": {"images": ["5", 0], "vae": ["3", 0], "clip": ["2", 0],
                                                              "texts": ["4", 1]}},
        "7": {"class_type": "ResolutionBucket", "inputs": {"latents": ["6", 0], "conditioning": ["6", 1]}},
        "8": {"class_type": "TrainLoraNode", "inputs": {"model": ["1", 0], "latents": ["7", 0],
                                                        "positive": ["7", 1], **train_widgets}},
        "9": {"class_type": "SaveLoRA", "inputs": {"lora": ["8", 0], "prefix": "loras/bucketed", "steps": ["8", 2]}},
    }
    registry = NodeRegistry.default()
    validation = validate_prompt(prompt, registry)
    assert validation.ok, validation.node_errors
    result = PromptExecutor(registry).execute(prompt, "bucketed", {}, validation.outputs, _Silent())
    assert result.status == "success", result.error
    assert result.outputs["9"]["lora"][0]["filename"] == "bucketed_3_steps_00001_.safetensors"
    # the buckets it trained on: 96x80, 80x96, 112x80, 96x96 at shorter edge 40 are 48x40, 40x48, 56x40 and 40x40
    # px, cropped to the 16 px grid: latents 2x3, 3x2, 2x3 and 2x2 (height x width)
    images = [ResizeImagesByShorterEdge().process(image, shorter_edge=40)[0]
              for image in LoadImageTextDataSetFromFolder().load(DEMO_DATASET)[0]]
    [vae], [clip] = VAELoader().load_vae("flux2-vae.safetensors"), CLIPLoader().load_clip("qwen_3_4b.safetensors")
    buckets, _ = ResolutionBucket().bucket(*MakeTrainingDataset().make(images, [vae], [clip]))
    assert sorted(tuple(bucket["samples"].shape) for bucket in buckets) == \
           [(1, 128, 2, 2), (1, 128, 3, 2), (2, 128, 2, 3)]
