"""ComfyUI's training nodes in the host (flux2_host/core_nodes/training.py) on the tiny demo klein base:
declarations as ComfyUI's nodes_train.py has them, a few steps lowering the loss, the shared MODEL left
unchanged, SaveLoRA's file read back by our loader, interrupt -> resumable state, and the workflow through
`flux2 run`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flux2_core.errors import Interrupted
from flux2_core.lora import load_lora
from flux2_core.patched_model import PatchedModel
from flux2_core.progress import clear_interrupt, progress_handler, request_interrupt
from flux2_core.train.checkpointing import STATE_FILE
from flux2_core.train.config import TrainConfig
from flux2_core.train.objective import Batch, FlowMatchingObjective
from flux2_core.train.in_memory import train_in_memory
from flux2_host import folders
from flux2_host.cli import main
from flux2_host.core_nodes.training import LoraModelLoader, LossGraphNode, SaveLoRA, TrainLoraNode
from flux2_host.registry import NodeRegistry
from flux2_host.executor import validate_prompt
from flux2_host.workflow import to_api_prompt

WORKFLOW = Path(__file__).resolve().parent.parent / "workflows" / "training" / "flux2_klein_base_train_lora.json"
TRAIN_WIDGETS = ["batch_size", "grad_accumulation_steps", "steps", "learning_rate", "rank", "optimizer",
                 "loss_function", "seed", "training_dtype", "lora_dtype", "quantized_backward", "algorithm",
                 "gradient_checkpointing", "checkpoint_depth", "offloading", "existing_lora", "bucket_mode",
                 "bypass_mode"]


@pytest.fixture()
def output(tmp_path: Path, demo_models_dir: Path) -> Path:
    folders.configure(models=str(demo_models_dir), input_dir=str(tmp_path / "input"),
                      output_dir=str(tmp_path / "output"), temp_dir=str(tmp_path / "temp"))
    folders.install_as_folder_paths()
    return tmp_path / "output"


@pytest.fixture()
def model(demo_models_dir: Path) -> PatchedModel:
    return PatchedModel.load(demo_models_dir / "diffusion_models" / "flux-2-klein-base-4b.safetensors")


def data(model: PatchedModel) -> tuple[list[dict], list]:
    """Two 64 px latents with a fixed pattern and one prompt embedding: a dataset the LoRA can fit."""
    torch.manual_seed(0)
    latents = {"samples": torch.randn(2, 128, 4, 4)}
    width = model.diffusion_model.txt_in.in_features
    conditioning = [[torch.randn(1, 16, width), {}]]
    return [latents], [conditioning]


def held_out_loss(model: PatchedModel) -> float:
    """The training objective on the training data with fixed noise and sigmas (16 draws), without gradients."""
    latents, [conditioning] = data(model)
    batch = Batch(latents[0]["samples"], conditioning[0][0].expand(2, -1, -1))
    objective = FlowMatchingObjective(TrainConfig(model_version="klein-base-4b"))
    generator = torch.Generator().manual_seed(123)
    with model.patches_applied() as dit, torch.no_grad():
        return float(torch.stack([objective(dit, batch, generator)[0] for _ in range(16)]).mean())


TRAIN_DEFAULTS = {"batch_size": 2, "grad_accumulation_steps": 1, "steps": 6, "learning_rate": 0.02, "rank": 4,
                  "optimizer": "AdamW", "loss_function": "MSE", "seed": 0, "training_dtype": "bf16",
                  "lora_dtype": "bf16", "quantized_backward": False, "algorithm": "LoRA",
                  "gradient_checkpointing": True, "checkpoint_depth": 1, "offloading": False,
                  "existing_lora": "[None]", "bucket_mode": False, "bypass_mode": False}


def train(model: PatchedModel, steps: int = 6, **overrides):
    latents, positive = data(model)
    widgets = {**TRAIN_DEFAULTS, "steps": steps, **overrides}
    return TrainLoraNode().train([model], latents, positive, **{k: [v] for k, v in widgets.items()})


def test_declarations_follow_comfyui(output) -> None:
    registry = NodeRegistry.default()
    train_info = registry.object_info_for("TrainLoraNode")
    assert list(train_info["input"]["required"]) == ["model", "latents", "positive", *TRAIN_WIDGETS]
    required = train_info["input"]["required"]
    assert [required[name][1]["default"] for name in ("batch_size", "steps", "learning_rate", "rank", "seed")] == \
           [1, 16, 0.0005, 8, 0]
    assert required["optimizer"][0] == ["AdamW", "Adam", "SGD", "RMSprop"]
    assert required["existing_lora"][0][-1] == "[None]" and required["existing_lora"][1]["default"] == "[None]"
    assert train_info["is_input_list"] is True
    assert train_info["output"] == ["LORA_MODEL", "LOSS_MAP", "INT", "MODEL"]
    loader = registry.object_info_for("LoraModelLoader")["input"]
    assert list(loader["required"]) == ["model", "lora", "strength_model", "bypass"]
    save = registry.object_info_for("SaveLoRA")
    assert list(save["input"]["required"]) == ["lora", "prefix"] and list(save["input"]["optional"]) == ["steps"]
    assert save["output_node"] is True
    assert save["input"]["required"]["prefix"][1]["default"] == "loras/ComfyUI_trained_lora"
    loss = registry.object_info_for("LossGraphNode")["input"]["required"]
    assert list(loss) == ["loss", "filename_prefix"] and loss["filename_prefix"][1]["default"] == "loss_graph"


def test_training_lowers_the_loss_and_leaves_the_shared_model_as_it_was(output, model) -> None:
    dit = model.diffusion_model
    before = {name: tensor.clone() for name, tensor in dit.state_dict().items()}
    modules = [name for name, _ in dit.named_modules()]
    progress = []
    with progress_handler(lambda step, total, preview: progress.append((step, total))):
        lora, loss_map, steps, trained = train(model, steps=30)
    assert steps == 30 and progress == [(i, 30) for i in range(1, 31)] and len(loss_map["loss"]) == 30
    assert held_out_loss(trained) < 0.9 * held_out_loss(model)
    assert [name for name, _ in dit.named_modules()] == modules and not dit.training
    assert all(torch.equal(before[name], tensor) for name, tensor in dit.state_dict().items())
    assert trained.lora_patches == ((lora, 1.0),) and model.lora_patches == ()
    assert {patch.module for patch in lora.patches} and all(p.scale == pytest.approx(1 / 4) for p in lora.patches)


def test_save_lora_writes_a_file_our_loader_reads(output, model) -> None:
    lora, _, steps, _ = train(model, steps=2)
    result = SaveLoRA().save(lora, "loras/test_lora", steps)
    [entry] = result["ui"]["lora"]
    path = output / entry["subfolder"] / entry["filename"]
    assert path.name == "test_lora_2_steps_00001_.safetensors"
    loaded = load_lora(path)
    ours = {patch.module: patch for patch in lora.patches}
    assert {patch.module for patch in loaded.patches} == set(ours)
    for patch in loaded.patches:
        expected = ours[patch.module]
        assert torch.allclose(patch.delta.matrix() * patch.scale, expected.delta.matrix() * expected.scale,
                              atol=1e-6)
    [applied] = LoraModelLoader().load_lora_model(model, loaded, 0.5)
    assert applied.lora_patches == ((loaded, 0.5),)
    chart = LossGraphNode().plot_loss({"loss": [3.0, 2.0, 1.0]}, "loss_graph")
    assert chart["ui"]["images"][0]["type"] == "temp"


def test_a_model_with_a_lora_trains_a_second_one_on_top(output, model) -> None:
    first, _, _, with_first = train(model, steps=2)
    second, _, steps, trained = train(with_first, steps=2, seed=1)
    assert steps == 2 and trained.lora_patches == ((first, 1.0), (second, 1.0))
    assert held_out_loss(trained) != held_out_loss(with_first)


def test_under_inference_mode_as_nodes_run_it_trains_the_same_lora(output, demo_models_dir) -> None:
    """The host, like ComfyUI, runs nodes under torch.inference_mode(): the DiT, a LoRA already on it and the
    latents then arrive as inference tensors, which autograd cannot use; the training is the same."""
    path = demo_models_dir / "diffusion_models" / "flux-2-klein-base-4b.safetensors"
    first, _, steps, _ = train(PatchedModel.load(path), steps=2)
    [entry] = SaveLoRA().save(first, "loras/first", steps)["ui"]["lora"]
    first_file = output / entry["subfolder"] / entry["filename"]

    def second_lora():
        return train(PatchedModel.load(path).with_lora(load_lora(first_file), 1.0), steps=2, seed=1)[0]

    expected = second_lora()
    with torch.inference_mode():
        got = second_lora()
    assert [p.module for p in got.patches] == [p.module for p in expected.patches]
    for ours, theirs in zip(got.patches, expected.patches):
        assert torch.equal(ours.delta.matrix(), theirs.delta.matrix()), ours.module


def test_unsupported_inputs_are_refused_by_name(output, model) -> None:
    for field, value in (("optimizer", "SGD"), ("loss_function", "L1"), ("algorithm", "OFT"),
                         ("offloading", True), ("checkpoint_depth", 2)):
        with pytest.raises(ValueError, match=f"TrainLoraNode: {field}"):
            train(model, **{field: value})


def test_interrupt_saves_a_state_and_the_same_training_continues_from_it(output, model) -> None:
    def interrupt_after_two(step, total, preview):
        if step == 2:
            request_interrupt()

    with progress_handler(interrupt_after_two), pytest.raises(Interrupted):
        train(model, steps=4)
    [state] = (output / "training").glob("*-state")
    assert torch.load(state / STATE_FILE, weights_only=False)["step"] == 2
    resumed, loss_map, steps, _ = train(model, steps=4)
    assert steps == 4 and len(loss_map["loss"]) == 2 and not state.exists()
    clear_interrupt()
    straight, _, _, _ = train(model, steps=4)
    for a, b in zip(resumed.patches, straight.patches):
        assert torch.allclose(a.delta.matrix(), b.delta.matrix(), atol=1e-5)


def test_in_memory_data_refuses_mismatched_conditioning(model) -> None:
    from flux2_core.errors import Flux2Error

    config = TrainConfig(model_version="klein-base-4b", max_train_steps=1, device="cpu")
    with pytest.raises(Flux2Error, match="one per latent"):
        train_in_memory(config, model.diffusion_model, [torch.zeros(3, 128, 2, 2)], [torch.zeros(2, 4, 96)])


def test_training_workflow_is_a_canvas_file_that_validates(output) -> None:
    graph = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    registry = NodeRegistry.default()
    nodes = {node["id"]: node for node in graph["nodes"]}
    assert graph["version"] == 0.4 and nodes[1]["type"] == "Note"
    for link_id, origin, origin_slot, target, target_slot, link_type in graph["links"]:
        assert link_id in nodes[origin]["outputs"][origin_slot]["links"]
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
        assert nodes[origin]["outputs"][origin_slot]["type"] == link_type
    validation = validate_prompt(to_api_prompt(graph, registry), registry)
    assert validation.ok, validation.node_errors


def test_training_workflow_runs_through_flux2_run(demo_models_dir, tmp_path, capsys) -> None:
    status = main(["run", str(WORKFLOW), "--json", "--models-dir", str(demo_models_dir),
                   "--input-dir", str(tmp_path / "input"), "--output-dir", str(tmp_path / "output")])
    captured = capsys.readouterr()
    assert status == 0, captured.err[-3000:]
    files = [Path(path) for path in json.loads(captured.out)["files"]]
    assert any(path.suffix == ".png" for path in files)
    [lora_file] = (tmp_path / "output" / "loras").glob("*.safetensors")
    assert load_lora(lora_file).patches


def test_training_over_http_and_websocket_reports_progress_and_an_interrupt_leaves_a_resumable_state(tmp_path):
    """`flux2 serve`: the training workflow queued over HTTP sends progress per training step on the WebSocket;
    /interrupt at step 3 stops it with a state in output/training; queueing it again continues to the end."""
    from server_harness import FluxServer

    prompt = to_api_prompt(json.loads(WORKFLOW.read_text(encoding="utf-8")), NodeRegistry.default())
    prompt["20"]["inputs"]["steps"] = 60
    server = FluxServer(tmp_path, extra_args=("--demo-models",), extra_nodes="").start()
    try:
        def interrupt_at_step_three(event: str, data: dict) -> None:
            if event == "progress" and data["node"] == "20" and data["value"] == 3:
                assert server.post("/api/interrupt").status == 200

        first = server.run_prompt(prompt, on_message=interrupt_at_step_three, timeout=300)
        training = [data for data in first.events("progress") if data["node"] == "20"]
        assert [data["value"] for data in training[:3]] == [1, 2, 3] and training[0]["max"] == 60
        assert first.events("execution_interrupted")[0]["node_id"] == "20"
        losses = first.events("flux2.training")
        assert [data["step"] for data in losses[:3]] == [1, 2, 3] and losses[0]["node"] == "20"
        assert all(isinstance(data["loss"], float) and data["loss"] > 0 for data in losses)
        [state] = (server.dirs["output"] / "training").glob("*-state")
        stopped_at = torch.load(state / STATE_FILE, weights_only=False)["step"]
        assert 3 <= stopped_at < 60

        second = server.run_prompt(prompt, timeout=300)
        assert second.events("execution_success")
        resumed = [data["value"] for data in second.events("progress") if data["node"] == "20"]
        assert resumed[0] == stopped_at + 1 and resumed[-1] == 60 and not state.exists()
        assert list((server.dirs["output"] / "loras").glob("flux2_klein_base_graph_lora_60_steps_*.safetensors"))
    finally:
        server.stop()


def test_bucket_mode_draws_each_batch_from_one_resolution_bucket(output, model, monkeypatch) -> None:
    """ResolutionBucket's output (a LATENT per size, a CONDITIONING with one entry per latent) trains with
    bucket_mode: every batch holds latents of one bucket, batch_size of them or the bucket's rest."""
    from flux2_core.train import in_memory
    from flux2_host.core_nodes.training_data import ResolutionBucket

    width = model.diffusion_model.txt_in.in_features
    torch.manual_seed(0)
    latents = [{"samples": torch.randn(1, 128, *size)} for size in ((2, 3), (3, 2), (2, 3), (2, 3), (3, 2))]
    conditioning = [[[torch.randn(1, 8, width), {}]] for _ in latents]
    buckets, bucket_conditioning = ResolutionBucket().bucket(latents, conditioning)
    batches = []
    load = in_memory.InMemoryData.load

    def recording_load(self, indices, generator):
        batch = load(self, indices, generator)
        batches.append((tuple(batch.latents.shape), [self.keys[i][0] for i in indices]))
        return batch

    monkeypatch.setattr(in_memory.InMemoryData, "load", recording_load)
    widgets = {**TRAIN_DEFAULTS, "rank": 2, "learning_rate": 0.01, "gradient_checkpointing": False,
               "bucket_mode": True}
    _, loss_map, steps, _ = TrainLoraNode().train([model], buckets, bucket_conditioning,
                                                  **{k: [v] for k, v in widgets.items()})
    assert steps == 6 and len(loss_map["loss"]) == 6
    # buckets: 3 latents of 2x3 (bucket 0), 2 of 3x2 (bucket 1): per epoch batches of 2 + 1 and one of 2
    assert sorted(shape for shape, _ in batches[:3]) == [(1, 128, 2, 3), (2, 128, 2, 3), (2, 128, 3, 2)]
    assert all(len(set(groups)) == 1 for _, groups in batches)
    assert all(shape[2:] == ((2, 3) if groups[0] == 0 else (3, 2)) for shape, groups in batches)


def test_one_conditioning_per_latent_and_a_count_that_fits_neither_is_refused(output, model) -> None:
    width = model.diffusion_model.txt_in.in_features
    latents = [{"samples": torch.randn(1, 128, 2, 2)}, {"samples": torch.randn(1, 128, 2, 2)}]
    per_latent = [[[torch.randn(1, 8, width), {}]], [[torch.randn(1, 8, width), {}]]]
    _, _, steps, _ = TrainLoraNode().train([model], latents, per_latent, **{
        k: [v] for k, v in {**TRAIN_DEFAULTS, "steps": 1}.items()})
    assert steps == 1
    with pytest.raises(ValueError, match=r"TrainLoraNode: positive: expected 1 conditioning entry or one per "
                                         r"latent \(2\), found 3"):
        TrainLoraNode().train([model], latents, per_latent + [per_latent[0]], **{
            k: [v] for k, v in {**TRAIN_DEFAULTS, "steps": 1}.items()})


def test_existing_lora_continues_a_saved_lora_and_adds_its_steps(output, model, tmp_path) -> None:
    """SaveLoRA's file, put in a loras folder, is where training continues: at a learning rate too small to
    move it, one more step gives back the same LoRA (same rank though `rank` asks another), and steps adds
    the 2 steps in the file name."""
    lora, _, steps, _ = train(model, steps=2)
    SaveLoRA().save(lora, "loras/continued", steps)
    folders.add_model_folder_path("loras", str(output / "loras"))
    name = "continued_2_steps_00001_.safetensors"
    continued, loss_map, total, _ = train(model, steps=1, existing_lora=name, rank=8, learning_rate=1e-7)
    assert total == 3 and len(loss_map["loss"]) == 1
    saved = {patch.module: patch for patch in lora.patches}
    assert {patch.module for patch in continued.patches} == set(saved)
    for patch in continued.patches:
        assert patch.delta.rank == 4
        expected = saved[patch.module]
        assert torch.allclose(patch.delta.matrix() * patch.scale, expected.delta.matrix() * expected.scale,
                              atol=1e-5)
    with pytest.raises(ValueError, match="TrainLoraNode: existing_lora: .*'absent.safetensors' not found"):
        train(model, steps=1, existing_lora="absent.safetensors")


def test_existing_lora_written_by_comfyui_on_more_layers_continues_on_all_of_them(output, model) -> None:
    """ComfyUI trains every linear layer: a file with a patch on txt_in (not one of our default targets) and
    an alpha other than 1 continues with that patch's change intact."""
    from flux2_core.lora import Flux2LoRA, LoRAPatch, LowRank, save_lora

    lora, _, _, _ = train(model, steps=1)
    torch.manual_seed(3)
    txt_in = model.diffusion_model.txt_in
    extra = LoRAPatch("txt_in", None, LowRank(torch.randn(txt_in.out_features, 4) * 0.01,
                                              torch.randn(4, txt_in.in_features) * 0.01), 2.0, "txt_in")
    wider = Flux2LoRA("wider", "bfl", (*lora.patches, extra), lora.hidden_size)
    (output / "loras").mkdir(parents=True, exist_ok=True)
    save_lora(wider, output / "loras" / "comfy_lora_7_steps_00001_.safetensors", "comfyui")
    folders.add_model_folder_path("loras", str(output / "loras"))
    continued, _, total, _ = train(model, steps=1, existing_lora="comfy_lora_7_steps_00001_.safetensors",
                                   learning_rate=1e-7, algorithm="LoKr")
    assert total == 8
    [patch] = [patch for patch in continued.patches if patch.module == "txt_in"]
    assert torch.allclose(patch.delta.matrix() * patch.scale, extra.delta.matrix() * extra.scale, atol=1e-5)


def test_training_progress_carries_samples_drawn_with_the_lora_so_far(output, model) -> None:
    """A few steps' progress reports carry a preview latent: at the last step it is the sample the trained
    MODEL output draws (same noise, schedule and caption), so the preview shows the LoRA as trained."""
    from flux2_core.sampling import flux2_sigmas_for_tokens, make_noise, sample
    from flux2_core.train.preview_samples import PREVIEW_STEPS

    previews = {}
    with progress_handler(lambda step, total, preview: previews.setdefault(step, preview)):
        _, _, _, trained = train(model, steps=8)
    assert [step for step, preview in previews.items() if preview is not None] == [2, 4, 6, 8]
    latents, [conditioning] = data(model)
    assert previews[8].shape == (1, *latents[0]["samples"].shape[1:])
    with trained.patches_applied() as dit, torch.no_grad():
        expected = sample(dit, make_noise(0, previews[8].shape), flux2_sigmas_for_tokens(PREVIEW_STEPS, 16),
                          conditioning[0][0])
    assert torch.allclose(previews[8], expected, atol=1e-4)
    assert not torch.allclose(previews[2], previews[8], atol=1e-3)
