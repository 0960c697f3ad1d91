"""The training loop on the tiny demo models: adapters against peft, caches, exact resume, edit training,
interrupts, the pinned CLI and the saved file's interop (our loader, ComfyUI's key names, diffusers)."""

from __future__ import annotations

import copy
import io
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flux2_core.checkpoints.loaders import load_dit, load_text_encoder, load_vae
from flux2_core.checkpoints.quant import Fp8Linear, quantize_linear_weights
from flux2_core.demo_models import random_dit
from flux2_core.errors import Flux2Error, Interrupted
from flux2_core.lora import attach_loras, load_lora
from flux2_core.pipeline import Flux2Pipeline
from flux2_core.references import pil_to_tensor
from flux2_core.train import TrainConfig, Trainer, load_config
from flux2_core.train.adapters import AdapterSet
from flux2_core.train.buckets import fit_to_bucket
from flux2_core.train.cache import read_cache
from flux2_core.train.config import BLOCK_LINEARS
from flux2_core.train.objective import Batch, FlowMatchingObjective
from flux2_core.train.samples import parse_prompt_line
from flux2_core.variants import DiTConfig
from train_data import write_shapes_dataset

ROOT = Path(__file__).resolve().parents[1]


def demo_config(models: Path, dataset: Path, out: Path, **overrides) -> TrainConfig:
    options = dict(dit=str(models / "diffusion_models" / "flux-2-klein-base-4b.safetensors"),
                   vae=str(models / "vae" / "flux2-vae.safetensors"),
                   text_encoder=str(models / "text_encoders" / "qwen_3_4b.safetensors"),
                   dataset_config=str(dataset), output_dir=str(out), output_name="t", max_train_steps=4,
                   network_dim=4, network_alpha=2.0, learning_rate=1e-3, seed=7, cache_directory=str(out.parent / "cache"))
    options.update(overrides)
    return TrainConfig(**options)


def quiet(config: TrainConfig, **kwargs) -> Trainer:
    return Trainer(config, log_stream=io.StringIO(), **kwargs)


@pytest.fixture()
def dataset(tmp_path) -> Path:
    return write_shapes_dataset(tmp_path / "data", count=2, batch_size=1)


# --------------------------------------------------------------------------------------------------------------
# adapters: the exported LoRA applied by flux2_core.lora equals peft's own forward

def tiny_dit() -> torch.nn.Module:
    config = DiTConfig(hidden_size=64, num_heads=2, depth_double=1, depth_single=1, context_dim=32,
                       guidance_embed=False, head_dim=32, axes_dim=(8, 8, 8, 8))
    return random_dit(config, seed=3)


def dit_call(dit):
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(1, 12, 128, generator=g), torch.randn(1, 5, 32, generator=g)
    from flux2_core.references import image_position_ids, text_position_ids
    with torch.no_grad():
        return dit(img, image_position_ids(3, 4), txt, text_position_ids(1, 5), torch.tensor([0.4]))


@pytest.mark.parametrize("network_type,rslora,fp8", [("lora", False, False), ("lora", True, False),
                                                     ("loha", False, False), ("lokr", False, False),
                                                     ("lora", False, True)])
def test_exported_adapters_match_peft_forward(network_type, rslora, fp8):
    base = tiny_dit()
    if fp8:  # the engine's fp8 storage as the frozen base (fp8_base)
        assert quantize_linear_weights(base, "fp8_e4m3fn") > 0
    trained = copy.deepcopy(base)
    config = TrainConfig(network_type=network_type, network_dim=4, network_alpha=3.0, use_rslora=rslora,
                         target_modules=r".*(qkv|proj|mlp\.[02]|linear[12]|final_layer\.linear)")
    adapters = AdapterSet(trained, config)
    assert all(p.dtype == torch.float32 for p in adapters.parameters())
    assert isinstance(trained.get_submodule("double_blocks.0.img_attn.qkv").base_layer, Fp8Linear) == fp8
    assert "double_blocks.0.img_attn.qkv" in adapters.layers and "final_layer.linear" in adapters.layers
    with torch.no_grad():  # peft initialises the adapters as a no-op: give them values
        g = torch.Generator().manual_seed(1)
        for p in adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    trained.eval()
    expected = dit_call(trained)
    lora = adapters.to_lora("x", {})
    assert lora.algorithm == network_type
    with attach_loras(base, [(lora, 1.0)]):
        ours = dit_call(base)
    assert not torch.allclose(expected, dit_call(base), atol=1e-3)  # the adapters do change the output
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_lycoris_adapters_refuse_an_fp8_base():
    base = tiny_dit()
    quantize_linear_weights(base, "fp8_e4m3fn")
    with pytest.raises(Flux2Error, match="fp8"):
        AdapterSet(base, TrainConfig(network_type="loha"))


def test_target_regex_that_selects_nothing_is_an_error():
    with pytest.raises(Flux2Error, match="target_modules"):
        AdapterSet(tiny_dit(), TrainConfig(target_modules="nothing_here"))


# --------------------------------------------------------------------------------------------------------------
# the loop

def test_cached_first_step_loss_equals_encoding_the_images_directly(demo_models_dir, dataset, tmp_path):
    trainer = quiet(demo_config(demo_models_dir, dataset, tmp_path / "out"))
    trainer.prepare()
    assert trainer.variant == "klein-base-4b"  # no model_version given: read from the DiT file
    first = trainer.data.epoch(0)[0]
    generator = torch.Generator().manual_seed(99)
    cached_batch = trainer.data.load(first, torch.Generator().manual_seed(5))
    with torch.no_grad():
        cached = trainer.objective(trainer.dit, cached_batch, generator)[0]
    # Uncached: the VAE and the text encoder run on the images and captions now.
    vae = load_vae(trainer.config.vae)
    encoder = load_text_encoder(trainer.config.text_encoder)
    entries = [trainer.data.entries[i] for i in first]
    from PIL import Image
    pixels = torch.cat([pil_to_tensor(fit_to_bucket(Image.open(e.item.image), e.bucket)) for e in entries])
    with torch.no_grad():
        direct_batch = Batch(vae.encode(pixels), encoder.encode([e.item.caption for e in entries]))
        direct = trainer.objective(trainer.dit, direct_batch, torch.Generator().manual_seed(99))[0]
    assert torch.equal(cached, direct)


def test_resume_is_bit_equal(demo_models_dir, dataset, tmp_path):
    options = dict(max_train_steps=6, save_state=True, save_every_n_steps=3, network_dropout=0.1,
                   caption_dropout_rate=0.3, lr_scheduler="cosine", lr_warmup_steps=2, gradient_accumulation_steps=2)
    straight = quiet(demo_config(demo_models_dir, dataset, tmp_path / "a", **options))
    straight.run()
    assert (tmp_path / "a" / "t-step00000003-state").is_dir() and (tmp_path / "a" / "t-state").is_dir()
    resumed = quiet(demo_config(demo_models_dir, dataset, tmp_path / "b", resume=str(tmp_path / "a" / "t-step00000003-state"),
                                **options))
    resumed.run()
    assert resumed.losses == straight.losses[3:]
    a, b = straight.trainable.state_dict(), resumed.trainable.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "t.safetensors").read_bytes() != b""
    with safe_open(str(tmp_path / "a" / "t.safetensors"), "pt") as f1, \
            safe_open(str(tmp_path / "b" / "t.safetensors"), "pt") as f2:
        assert all(torch.equal(f1.get_tensor(k), f2.get_tensor(k)) for k in f1.keys())


def test_sigterm_saves_a_state_and_stops(demo_models_dir, dataset, tmp_path):
    def on_step(info):
        if info.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer = quiet(demo_config(demo_models_dir, dataset, tmp_path / "out", max_train_steps=10), on_step=on_step)
    with pytest.raises(Interrupted):
        trainer.run()
    state = torch.load(tmp_path / "out" / "t-state" / "state.pt", weights_only=False)
    assert state["step"] == 2


def test_cancel_flag_stops_the_run(demo_models_dir, dataset, tmp_path):
    steps = []
    trainer = quiet(demo_config(demo_models_dir, dataset, tmp_path / "out", max_train_steps=10),
                    on_step=lambda info: steps.append(info.step), cancel=lambda: len(steps) >= 3)
    with pytest.raises(Interrupted):
        trainer.run()
    assert steps == [1, 2, 3]


def test_edit_training_loss_uses_target_tokens_only(demo_models_dir, tmp_path):
    dataset = write_shapes_dataset(tmp_path / "data", count=2, controls=True)
    trainer = quiet(demo_config(demo_models_dir, dataset, tmp_path / "out"))
    trainer.prepare()
    batch = trainer.data.load([0], torch.Generator().manual_seed(0))
    assert len(batch.controls) == 1 and batch.controls[0].shape == (1, 128, 4, 4)
    target_tokens = batch.latents.shape[-2] * batch.latents.shape[-1]
    dit = trainer.dit.eval()

    def loss(model, b):
        with torch.no_grad():
            return FlowMatchingObjective(trainer.config)(model, b, torch.Generator().manual_seed(3))[0]

    seen = {}

    class ChangedReferenceOutputs(torch.nn.Module):
        """The same DiT, but whatever it outputs at the reference tokens is replaced by garbage."""

        def __init__(self):
            super().__init__()
            self.inner, self.config = dit, dit.config

        def forward(self, img, img_ids, txt, txt_ids, timesteps, guidance=None):
            out = dit(img, img_ids, txt, txt_ids, timesteps, guidance)
            seen["tokens"], seen["times"] = img.shape[1], img_ids[0, :, 0].unique().tolist()
            return torch.cat([out[:, :target_tokens], 1e3 * torch.randn_like(out[:, target_tokens:])], dim=1)

    reference = loss(dit, batch)
    assert torch.equal(loss(ChangedReferenceOutputs(), batch), reference)
    assert seen["tokens"] == target_tokens + 16 and seen["times"] == [0, 10]  # references at t = 10, as at inference
    # The control image does condition the target tokens (through attention).
    other = Batch(batch.latents, batch.context, [torch.randn_like(batch.controls[0])])
    assert not torch.equal(loss(dit, other), reference)


@pytest.mark.parametrize("dit_file,text_encoder,version", [
    ("flux-2-klein-base-4b.safetensors", "qwen_3_4b.safetensors", "klein-base-4b"),
    ("flux-2-klein-4b.safetensors", "qwen_3_4b.safetensors", "klein-4b"),
    ("flux-2-klein-base-9b-fp8.safetensors", "qwen_3_8b_fp8mixed.safetensors", "klein-base-9b"),
    ("flux2_dev_fp8mixed.safetensors", "mistral_3_small_flux2_bf16.safetensors", "dev"),
])
def test_every_variant_trains_and_samples_with_a_preview_dit(demo_models_dir, dataset, tmp_path, dit_file,
                                                             text_encoder, version):
    m = demo_models_dir
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 2 --g 2.0 --d 1\n")
    preview = "flux-2-klein-4b.safetensors" if version == "klein-base-4b" else ""
    trainer = quiet(demo_config(m, dataset, tmp_path / "out", dit=str(m / "diffusion_models" / dit_file),
                                text_encoder=str(m / "text_encoders" / text_encoder), model_version=version,
                                max_train_steps=2, sample_prompts=str(prompts), sample_every_n_steps=2,
                                preview_dit=str(m / "diffusion_models" / preview) if preview else ""))
    trainer.run()
    assert all(p.dtype == torch.float32 for p in trainer.trainable.parameters())
    assert trainer.dit.config.guidance_embed == (version == "dev")
    assert [p.name for p in (tmp_path / "out" / "sample").iterdir()] == ["t_00000002_00.png"]
    assert load_lora(tmp_path / "out" / "t.safetensors").metadata["ss_base_model_version"] == \
        {"dev": "flux2-dev"}.get(version, version)


def test_adamw8bit_needs_a_gpu_and_block_swap_needs_enough_blocks(demo_models_dir, dataset, tmp_path):
    with pytest.raises(Flux2Error, match="CUDA"):
        quiet(demo_config(demo_models_dir, dataset, tmp_path / "a", optimizer_type="adamw8bit")).prepare()
    # the demo DiT has one double and one single block: two of each kind stay on the device, so none can swap
    with pytest.raises(Flux2Error, match=r"blocks_to_swap 2: this DiT \(1 double, 1 single blocks\) allows none"):
        quiet(demo_config(demo_models_dir, dataset, tmp_path / "b", blocks_to_swap=2)).prepare()


@pytest.mark.parametrize("optimizer", ["adafactor", "prodigy"])
def test_other_optimizers_and_gradient_checkpointing_train(demo_models_dir, dataset, tmp_path, optimizer):
    config = demo_config(demo_models_dir, dataset, tmp_path / "out", optimizer_type=optimizer,
                         gradient_checkpointing=True, learning_rate=1.0 if optimizer == "prodigy" else 1e-3)
    trainer = quiet(config)
    trainer.prepare()
    before = trainer.trainable.state_dict()  # copies
    trainer.run()
    after = trainer.trainable.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_loraplus_first_adam_step_moves_b_by_ratio_times_the_learning_rate(demo_models_dir, dataset, tmp_path):
    # Adam's first step, with its bias corrections, moves a weight by -lr * g / (|g| + eps). LoRA's B starts at
    # zero, so A's first gradient is zero (A stays put) and B lands at -(lr * ratio) * g / (|g| + eps).
    # Weight decay and clipping are off so nothing else moves the weights.
    ratio, lr, eps = 16.0, 1e-3, 1e-8
    config = demo_config(demo_models_dir, dataset, tmp_path / "out", max_train_steps=1, learning_rate=lr,
                         loraplus_lr_ratio=ratio, weight_decay=0.0, max_grad_norm=0.0)
    trainer = quiet(config)
    trainer.prepare()
    before = trainer.trainable.state_dict()
    gradients = {}
    for name, param in trainer.trainable.named_parameters():
        param.register_post_accumulate_grad_hook(lambda p, name=name: gradients.__setitem__(name, p.grad.clone()))
    trainer.run()
    after = trainer.trainable.state_dict()
    b_names = [name for name in after if ".lora_B." in name]
    assert b_names and len(b_names) * 2 == len(after)
    for name, value in after.items():
        grad = gradients[name]
        if name in b_names:
            torch.testing.assert_close(value, -(lr * ratio) * grad / (grad.abs() + eps), rtol=1e-5, atol=1e-9)
        else:
            assert not grad.any() and torch.equal(value, before[name])


def test_loraplus_settings_that_cannot_apply_are_refused(demo_models_dir, dataset, tmp_path):
    for wrong, message in [(dict(network_type="loha"), "network_type 'loha' has none"),
                           (dict(training_mode="full"), "full fine-tune"),
                           (dict(), "expected 0 .off. or a positive ratio")]:
        ratio = -1.0 if not wrong else 4.0
        with pytest.raises(Flux2Error, match=message):
            demo_config(demo_models_dir, dataset, tmp_path / "out", loraplus_lr_ratio=ratio, **wrong).validate()
    # a state saved without LoRA+ (one parameter group) cannot continue with it (two)
    options = dict(max_train_steps=1, save_state=True)
    quiet(demo_config(demo_models_dir, dataset, tmp_path / "a", **options)).run()
    resumed = quiet(demo_config(demo_models_dir, dataset, tmp_path / "b", resume=str(tmp_path / "a" / "t-state"),
                                loraplus_lr_ratio=4.0, max_train_steps=2))
    with pytest.raises(Flux2Error, match="loraplus_lr_ratio"):
        resumed.prepare()


def test_gradient_checkpointing_and_activation_offload_give_the_same_gradients(demo_models_dir, dataset, tmp_path):
    from flux2_core.train.memory import activation_offload

    grads = []
    for checkpointing, offload in ((False, False), (True, False), (True, True)):
        trainer = quiet(demo_config(demo_models_dir, dataset, tmp_path / f"o{checkpointing}{offload}",
                                    gradient_checkpointing=checkpointing, offload_activations=offload))
        trainer.prepare()
        batch = trainer.data.load([0], torch.Generator().manual_seed(0))
        with activation_offload(offload, trainer.device):
            loss = trainer.objective(trainer.dit, batch, torch.Generator().manual_seed(1))[0].mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in trainer.dit.named_parameters() if p.requires_grad})
    for other in grads[1:]:
        assert all(torch.allclose(grads[0][k], other[k], atol=1e-6) for k in grads[0])


def test_fp8_base_trains_fp32_adapters_on_fp8_layers(demo_models_dir, dataset, tmp_path):
    trainer = quiet(demo_config(demo_models_dir, dataset, tmp_path / "out", fp8_base=True, max_train_steps=3))
    trainer.run()
    qkv = trainer.dit.get_submodule("double_blocks.0.img_attn.qkv")
    assert isinstance(qkv.base_layer, Fp8Linear) and qkv.base_layer.weight.dtype == torch.float8_e4m3fn
    assert all(p.dtype == torch.float32 for p in trainer.trainable.parameters())
    assert all(math.isfinite(loss) for loss in trainer.losses)
    assert load_lora(tmp_path / "out" / "t.safetensors").rank == 4


# --------------------------------------------------------------------------------------------------------------
# the pinned CLI, the saved file, samples

def test_sample_prompt_line_format():
    sample = parse_prompt_line("a red fox, snow --w 512 --h 256 --s 8 --g 3.5 --d 9 --n blurry, dark --ci a.png --ci b.png")
    assert (sample.prompt, sample.width, sample.height, sample.steps, sample.guidance, sample.seed) == \
        ("a red fox, snow", 512, 256, 8, 3.5, 9)
    assert sample.negative_prompt == "blurry, dark" and sample.control_images == ["a.png", "b.png"]
    assert parse_prompt_line("# comment") is None
    with pytest.raises(Flux2Error, match="--q"):
        parse_prompt_line("x --q 1")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "flux2_host.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_pinned_cli_writes_checkpoints_samples_and_a_lora_that_loads_everywhere(demo_models_dir, dataset, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a white background --w 64 --h 64 --s 2 --d 1\n")
    m = demo_models_dir
    result = run_cli("train", "--dit", str(m / "diffusion_models" / "flux-2-klein-base-4b.safetensors"),
                     "--vae", str(m / "vae" / "flux2-vae.safetensors"),
                     "--text_encoder", str(m / "text_encoders" / "qwen_3_4b.safetensors"),
                     "--dataset_config", str(dataset), "--output_dir", str(tmp_path / "out"), "--output_name", "shapes",
                     "--max_train_steps", "4", "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-3",
                     "--save_every_n_steps", "2", "--seed", "1", "--model_version", "klein-base-4b",
                     "--sample_prompts", str(prompts), "--sample_every_n_steps", "2", "--save_state", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    losses = re.findall(r"step (\d+)/4 loss ([0-9.]+)", result.stderr)
    assert [int(step) for step, _ in losses] == [1, 2, 3, 4]
    out = tmp_path / "out"
    assert (out / "shapes.safetensors").is_file() and (out / "shapes-step00000002.safetensors").is_file()
    assert (out / "shapes-state" / "state.pt").is_file()
    assert sorted(p.name for p in (out / "sample").iterdir()) == \
        ["shapes_00000002_00.png", "shapes_00000004_00.png"]
    assert (out / "logs" / "shapes-loss.csv").read_text().count("\n") == 5

    info = run_cli("lora", "info", str(out / "shapes.safetensors"), "--json", cwd=tmp_path)
    assert info.returncode == 0 and '"dialect": "bfl"' in info.stdout and '"rank": 4' in info.stdout
    lora = load_lora(out / "shapes.safetensors")
    assert lora.metadata["flux2_base_model_file"] == "flux-2-klein-base-4b.safetensors"
    assert lora.metadata["ss_network_dim"] == "4" and len(lora.metadata["flux2_base_model_sha256"]) == 64
    with safe_open(str(out / "shapes.safetensors"), "pt") as handle:
        keys = list(handle.keys())
        assert all(handle.get_tensor(k).dtype == torch.float32 for k in keys)
    # ComfyUI's native FLUX.2 LoRA keys: diffusion_model.<BFL module>.lora_A/.lora_B.weight + .alpha
    assert all(re.fullmatch(r"diffusion_model\.(double|single)_blocks\.\d+\.[a-z_0-9.]+\.(lora_A\.weight|lora_B\.weight|alpha)", k)
               for k in keys), keys[:5]


def test_cache_commands_skip_existing_and_re_encode_what_changed(demo_models_dir, dataset, tmp_path):
    m = demo_models_dir
    config = tmp_path / "train.toml"
    config.write_text(f'dit = "{m / "diffusion_models" / "flux-2-klein-base-4b.safetensors"}"\n'
                      f'vae = "{m / "vae" / "flux2-vae.safetensors"}"\n'
                      f'text_encoder = "{m / "text_encoders" / "qwen_3_4b.safetensors"}"\n'
                      f'dataset_config = "{dataset}"\ncache_directory = "{tmp_path / "cache"}"\n')
    for kind in ("latents", "text"):
        result = run_cli("cache", kind, str(config), cwd=tmp_path)
        assert result.returncode == 0 and "ready for 2 images" in result.stdout, result.stderr
    latents = sorted((tmp_path / "cache" / "latents").iterdir())
    texts = sorted((tmp_path / "cache" / "text").iterdir())
    assert len(latents) == 2 and len(texts) == 3  # two captions + the empty one (caption dropout)
    stamps = {p: p.stat().st_mtime_ns for p in latents + texts}
    # Unchanged data: nothing is re-encoded. A changed caption and a changed image get new files.
    (dataset.parent / "images" / "red_circle.txt").write_text("a different caption")
    from train_data import shape_image
    shape_image((0, 0, 0), "square").save(dataset.parent / "images" / "blue_square.png")
    trainer = quiet(TrainConfig(**{**load_config(config).as_dict(), "output_dir": str(tmp_path / "o")}))
    trainer.prepare_caches()
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items())
    assert len(list((tmp_path / "cache" / "latents").iterdir())) == 3
    assert len(list((tmp_path / "cache" / "text").iterdir())) == 4


# --------------------------------------------------------------------------------------------------------------
# interop of a trained file: our loader, a stand-in of ComfyUI's key mapping, diffusers after conversion

def comfyui_merge(dit: torch.nn.Module, path: Path) -> torch.nn.Module:
    """What ComfyUI's LoraLoaderModelOnly does with a FLUX.2 LoRA, reduced to its key mapping and formula:
    `diffusion_model.<weight name minus .weight>` names a model weight; W += (alpha / rank) * up @ down with
    up/down from `.lora_B.weight`/`.lora_A.weight` (or lora_up/lora_down). Keys it cannot map are ignored, so
    the test also checks that every key was mapped."""
    key_map = {f"diffusion_model.{name[:-len('.weight')]}": name for name in dit.state_dict() if name.endswith(".weight")}
    merged = copy.deepcopy(dit)
    weights = dict(merged.named_parameters())
    used = set()
    with safe_open(str(path), "pt") as handle:
        keys = set(handle.keys())
        for prefix, weight_name in key_map.items():
            up_key = next((f"{prefix}.{n}" for n in ("lora_B.weight", "lora_up.weight") if f"{prefix}.{n}" in keys), None)
            if up_key is None:
                continue
            down_key = up_key.replace("lora_B", "lora_A").replace("lora_up", "lora_down")
            up, down = handle.get_tensor(up_key), handle.get_tensor(down_key)
            alpha = handle.get_tensor(f"{prefix}.alpha").item() if f"{prefix}.alpha" in keys else down.shape[0]
            with torch.no_grad():
                weights[weight_name] += (alpha / down.shape[0]) * (up @ down).to(weights[weight_name].dtype)
            used |= {up_key, down_key, f"{prefix}.alpha"}
    assert keys <= used, sorted(keys - used)[:5]
    return merged


def test_trained_lora_same_output_in_ours_comfyui_mapping_and_diffusers(demo_models_dir, dataset, tmp_path):
    from test_lora_parity import diffusers_final_latent, klein_pipeline, ours_final_latent

    trainer = quiet(demo_config(demo_models_dir, dataset, tmp_path / "out", max_train_steps=3, learning_rate=5e-2))
    trained = trainer.run()
    base = load_dit(trainer.config.dit)  # the untouched base, from its file
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 128, 3, 4, generator=g)
    context = torch.randn(1, 6, base.config.context_dim, generator=g)

    pipe = klein_pipeline(base)
    converted = tmp_path / "diffusers.safetensors"
    result = run_cli("lora", "convert", str(trained), str(converted), "--to", "diffusers", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    pipe.load_lora_weights(str(converted))
    expected, sigmas = diffusers_final_latent(pipe, noise, context)

    with attach_loras(base, [(load_lora(trained), 1.0)]):
        ours = ours_final_latent(base, noise, context, sigmas)
    without = ours_final_latent(base, noise, context, sigmas)
    comfy = ours_final_latent(comfyui_merge(base, trained), noise, context, sigmas)
    assert float((ours - without).abs().max()) > 1e-3  # the trained LoRA changes the output
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(comfy, ours, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# overfit: a few hundred steps on two generated images

# What is measured: the training objective (same timestep sampler, same velocity MSE) on a fixed evaluation set,
# 8 (sigma, noise) pairs per training image drawn once from a fixed seed, before and after training. The per-step
# training loss draws a new sigma and noise every step, so its ratio mixes learning with sampling noise.
#
# The issue asks for 10x in a few hundred steps. Measured (evaluation loss before -> after; 2 images, hidden 256,
# rank 128, cosine schedule, shift 20; "ends" = adapters on img_in + final_layer.linear, "blocks" = every block
# linear, the default targets; LoRA+ r = B matrices at r x the learning rate):
#   ends, lr 1e-2, 300 steps (the previous test)                                    2.59 -> 0.41  6.3x
#   ends, 1000 steps / hidden 384 / 2 + 2 blocks                                    6.5x / 6.7x / 6.5x
#   ends, LoRA+ 16, lr 1e-3, 300 steps                                               6.4x
#   ends + blocks, lr 1e-2 / 3e-3, 300 steps, no LoRA+                               2.0x / 3.0x
#   ends + blocks, lr 3e-3, 600 steps, no LoRA+                                      5.1x
#   THIS TEST: ends + blocks, LoRA+ 16, lr 1e-3: 300 / 600 / 1000 steps              6.0x / 8.5x / 11.8x
#     (1000 steps: 2.59 -> 0.22; the pipeline's latent MSE to the image 2.46 without the LoRA, 0.31 with it)
#   ends + blocks, LoRA+ 32 / lr 2e-3 / + modulation linears (600, 300, 600 steps)  7.1x / 3.9x / 7.7x
# Why the ends alone stall near 0.4: the target is v = noise - x0. The ends carry x_t's noise through (img_in ->
# residual stream -> final_layer), which takes the loss from 2.6 to ~1; the rest is x0, and at sigma near 1 (most
# draws, shift 20) x_t shows little of it, so it must come from the caption and the token's position, and position
# reaches a FLUX.2 token only through RoPE attention. The cached latents' variance over positions is 0.26 of their
# 0.52 mean square: a model blind to position could reach ~10x at best. Adapters inside the blocks can learn
# position, but with one learning rate they learn slowly, or at lr 1e-2 swamp the residual stream that carries x_t
# (loss ~1.35 at every sigma, what a constant output scores). LoRA+ lets B move 16x faster than A at a small base
# rate: the block adapters learn without the blow-up, and the loss keeps falling past the ends' floor.
OVERFIT_STEPS, OVERFIT_LR, OVERFIT_SAMPLING, OVERFIT_SHIFT, OVERFIT_FACTOR = 1000, 1e-3, "shift", 20.0, 10.0
OVERFIT_RANK, OVERFIT_TARGETS, OVERFIT_LORAPLUS = 128, r"(img_in|final_layer\.linear|" + BLOCK_LINEARS + ")", 16.0
OVERFIT_DIT = DiTConfig(hidden_size=256, num_heads=4, depth_double=1, depth_single=1, context_dim=96,
                        guidance_embed=False, head_dim=64, axes_dim=(16, 16, 16, 16))
EVALUATION_DRAWS = 8


def evaluation_loss(trainer: Trainer) -> float:
    """The training objective on a fixed evaluation set: `EVALUATION_DRAWS` (sigma, noise) pairs per training image
    from the run's own sampler, drawn from a fixed seed, so before and after are measured on the same pairs."""
    generator = torch.Generator().manual_seed(123)
    objective = FlowMatchingObjective(trainer.config)
    losses = []
    with torch.no_grad():
        for index in range(len(trainer.data.entries)):
            for _ in range(EVALUATION_DRAWS):
                batch = trainer.data.load([index], generator)
                losses.append(float(objective(trainer.dit, batch, generator)[0].mean()))
    return sum(losses) / len(losses)


@pytest.mark.slow
def test_overfit_two_shapes_lowers_the_loss_and_pulls_generations_towards_the_images(demo_models_dir, tmp_path):
    # 256 wide: the residual stream carries all 128 latent channels of x_t with room beside them for the frozen
    # blocks' caption and position features (128 wide: 4.7x; the 64-wide demo DiT cannot carry x_t at all).
    dit_path = tmp_path / "flux-2-klein-base-4b-tiny.safetensors"
    save_file(random_dit(OVERFIT_DIT, seed=5).state_dict(), str(dit_path))
    dataset = write_shapes_dataset(tmp_path / "data", count=2)
    config = demo_config(demo_models_dir, dataset, tmp_path / "out", dit=str(dit_path), max_train_steps=OVERFIT_STEPS,
                         network_dim=OVERFIT_RANK, network_alpha=float(OVERFIT_RANK), learning_rate=OVERFIT_LR,
                         lr_scheduler="cosine", lr_warmup_steps=10, timestep_sampling=OVERFIT_SAMPLING,
                         discrete_flow_shift=OVERFIT_SHIFT, target_modules=OVERFIT_TARGETS,
                         loraplus_lr_ratio=OVERFIT_LORAPLUS)
    trainer = quiet(config)
    trainer.prepare()
    before = evaluation_loss(trainer)
    lora_path = trainer.run()
    after = evaluation_loss(trainer)
    first, last = trainer.losses[:10], trainer.losses[-10:]
    print(f"evaluation loss {before:.4f} -> {after:.4f} ({before / after:.1f}x); per-step training loss, mean of the "
          f"first / last 10 steps: {sum(first) / 10:.4f} -> {sum(last) / 10:.4f}")
    assert after * OVERFIT_FACTOR <= before

    # The pipeline, given a training caption, lands nearer that image's latent with the LoRA than without.
    entry = next(e for e in trainer.data.entries if "red" in e.item.caption)
    target = read_cache(entry.latent_file)["latent"]
    pipe = Flux2Pipeline(load_dit(dit_path), load_vae(config.vae), config.text_encoder)
    options = dict(width=64, height=64, steps=20, cfg=1.0, seed=3, output_type="latent")
    without = pipe(entry.item.caption, **options)
    pipe.load_lora(lora_path)
    with_lora = pipe(entry.item.caption, **options)
    mse_without, mse_with = float(((without - target) ** 2).mean()), float(((with_lora - target) ** 2).mean())
    print(f"latent MSE to the training image: without LoRA {mse_without:.4f}, with {mse_with:.4f}")
    assert mse_with < 0.75 * mse_without


def test_validation_after_training_reproduces_the_last_sample(demo_models_dir, dataset, tmp_path):
    """The saved LoRA through the pipeline (a fresh DiT, LoRA applied on the fly) gives the last sample."""
    import numpy as np
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a white background --w 64 --h 64 --s 3 --l 2.5 --d 4 --n blurry\n")
    config = demo_config(demo_models_dir, dataset, tmp_path / "out", max_train_steps=2, learning_rate=5e-2,
                         max_train_epochs=2, sample_prompts=str(prompts), sample_every_n_epochs=1)
    trainer = quiet(config)
    lora_path = trainer.run()
    assert trainer.step == 4  # 2 epochs of 2 single-image batches: epochs win over max_train_steps
    last = np.asarray(Image.open(tmp_path / "out" / "sample" / "t_00000004_00.png"), dtype=np.int16)
    pipe = Flux2Pipeline.from_files(config.dit, config.vae, config.text_encoder)
    pipe.load_lora(lora_path)
    again = pipe("a red circle on a white background", width=64, height=64, steps=3, cfg=2.5, seed=4,
                 negative_prompt="blurry")[0]
    assert np.abs(np.asarray(again, dtype=np.int16) - last).max() <= 1


def test_caption_dropout_uses_the_empty_caption_and_repeats_multiply_items(demo_models_dir, tmp_path):
    dataset = write_shapes_dataset(tmp_path / "data", count=2)
    dataset.write_text(dataset.read_text().replace("num_repeats = 1", "num_repeats = 3"))
    trainer = quiet(demo_config(demo_models_dir, dataset, tmp_path / "out", caption_dropout_rate=1.0))
    trainer.prepare()
    assert len(trainer.data.entries) == 6 and sum(len(b) for b in trainer.data.epoch(0)) == 6
    empty = read_cache(trainer.empty_caption_file)["context"]
    batch = trainer.data.load([0, 1], torch.Generator().manual_seed(0))
    assert torch.equal(batch.context, torch.cat([empty, empty]))
    kept = quiet(demo_config(demo_models_dir, dataset, tmp_path / "out2", caption_dropout_rate=0.0))
    kept.prepare()
    assert not torch.equal(kept.data.load([0], torch.Generator().manual_seed(0)).context, empty)
