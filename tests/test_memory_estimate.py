"""Memory estimates against what torch really allocates, on tiny models with the real architectures.

How memory is measured: torch's profiler with `profile_memory=True` records every allocation and free of torch's
CPU allocator together with its running total of bytes allocated since profiling started
(`total_allocated`). The largest running total during a phase is the phase's peak working memory: the weights
were allocated before profiling started, so they are not in it, and the estimate's working bytes are compared
with it alone (stricter than comparing weights + working, where the weights would hide errors). RSS deltas
would measure the C allocator's page reuse instead, and tracemalloc does not see torch's allocations.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from flux2_core.checkpoints.loaders import load_dit, load_text_encoder, load_vae
from flux2_core.dit import Flux2DiT
from flux2_core.memory.estimate import (DiTShape, InsufficientMemoryError, MemoryRequest, check_fits, dit_shape,
                                        estimate, plan_for_files, text_encoder_shape, vae_shape)
from flux2_core.memory.residency import model_size_bytes
from flux2_core.sampling import flux2_sigmas, latent_shape, make_noise, sample
from flux2_core.variants import DiTConfig
from flux2_host.cli import main as flux2_main

TOLERANCE = 0.15


def peak_allocated_bytes(run) -> int:
    """The peak of torch's CPU allocator's running total while `run()` executes (see the module docstring)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.no_grad():
            run()
    peak, pending = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        if event.tag == _EventType.Allocation:
            peak = max(peak, event.extra_fields.total_allocated)
    return peak


def assert_close(predicted: int, measured: int, what: str) -> None:
    error = (predicted - measured) / measured
    print(f"{what}: predicted {predicted:,} B, measured {measured:,} B ({error:+.1%})")
    assert abs(error) <= TOLERANCE, f"{what}: predicted {predicted:,} B, measured {measured:,} B ({error:.1%} off)"


def tiny_dit(hidden: int, heads: int) -> Flux2DiT:
    torch.manual_seed(0)
    head_dim = hidden // heads
    config = DiTConfig(hidden_size=hidden, num_heads=heads, depth_double=1, depth_single=2, context_dim=96,
                       guidance_embed=False, head_dim=head_dim, axes_dim=(head_dim // 4,) * 4)
    return Flux2DiT(config).eval()


@pytest.mark.parametrize("hidden, heads, request_, kv_cache", [
    (128, 4, MemoryRequest(256, 256), False),
    (128, 4, MemoryRequest(512, 384), False),
    (256, 4, MemoryRequest(256, 256, batch_size=2), False),
    (128, 2, MemoryRequest(256, 256, cfg=4.0), False),
    (128, 4, MemoryRequest(256, 256, references=((256, 256), (128, 192))), False),
    (128, 4, MemoryRequest(256, 256, references=((256, 256),)), True),  # the step's forward is the peak
    (128, 4, MemoryRequest(256, 256, references=((512, 512), (256, 256))), True),  # the references' own pass is
])
def test_denoise_step_estimate_matches_the_allocations(hidden: int, heads: int, request_: MemoryRequest,
                                                       kv_cache: bool) -> None:
    dit = tiny_dit(hidden, heads)
    noise = make_noise(0, latent_shape(request_.batch_size, request_.width, request_.height))
    context, negative = torch.randn(1, 512, 96), torch.randn(1, 512, 96)
    references = [torch.randn(1, 128, h // 16, w // 16) for w, h in request_.references]
    sigmas = flux2_sigmas(1, request_.width, request_.height)

    measured = peak_allocated_bytes(lambda: sample(
        dit, noise, sigmas, context, negative_context=negative if request_.cfg != 1 else None, cfg=request_.cfg,
        reference_latents=references, reference_kv_cache=kv_cache))
    shape = DiTShape(dit.config, model_size_bytes(dit), reference_kv_cache=kv_cache)
    predicted = estimate(request_, shape, compute_dtype=torch.float32).phase("denoise")
    assert predicted.weight_bytes == model_size_bytes(dit)
    assert_close(predicted.working_bytes, measured, f"denoise {request_}")


@pytest.mark.parametrize("encoder_file", ["qwen_3_4b.safetensors", "mistral_3_small_flux2_bf16.safetensors"])
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_text_encode_estimate_matches_the_allocations(demo_models_dir: Path, encoder_file: str, cfg: float) -> None:
    encoder = load_text_encoder(demo_models_dir / "text_encoders" / encoder_file, device="cpu")
    request_ = MemoryRequest(cfg=cfg)
    prompts = ["a red fox in the snow", ""][:request_.passes]  # the pipeline encodes prompt and negative together
    measured = peak_allocated_bytes(lambda: encoder.encode(prompts))
    shape = text_encoder_shape(encoder)
    predicted = estimate(request_, DiTShape(tiny_dit(64, 2).config, 0), text_encoder=shape,
                         compute_dtype=torch.float32).phase("text encode")
    assert predicted.weight_bytes == model_size_bytes(encoder)
    assert_close(predicted.working_bytes, measured, f"text encode {encoder_file} x{len(prompts)}")


@pytest.mark.parametrize("vae_file", ["flux2-vae.safetensors", "full_encoder_small_decoder.safetensors"])
@pytest.mark.parametrize("request_", [MemoryRequest(128, 128), MemoryRequest(256, 192), MemoryRequest(128, 128, 2)])
def test_vae_decode_estimate_matches_the_allocations(demo_models_dir: Path, vae_file: str,
                                                     request_: MemoryRequest) -> None:
    vae = load_vae(demo_models_dir / "vae" / vae_file, device="cpu")
    latent = torch.randn(latent_shape(request_.batch_size, request_.width, request_.height))
    measured = peak_allocated_bytes(lambda: vae.decode(latent))
    predicted = estimate(request_, DiTShape(tiny_dit(64, 2).config, 0), vae=vae_shape(vae),
                         compute_dtype=torch.float32).phase("VAE decode")
    assert_close(predicted.working_bytes, measured, f"VAE decode {vae_file} {request_}")


@pytest.mark.parametrize("dit_file, encoder_file, weight_dtype", [
    ("flux-2-klein-4b.safetensors", "qwen_3_4b.safetensors", None),
    ("flux-2-klein-9b-fp8.safetensors", "qwen_3_8b_fp8mixed.safetensors", None),  # fp8 stays fp8 in memory
    ("flux-2-klein-4b.safetensors", "qwen_3_4b.safetensors", "fp8_e4m3fn"),  # block linears quantized on load
])
def test_weights_counted_from_file_headers_equal_the_loaded_models(demo_models_dir: Path, dit_file: str,
                                                                   encoder_file: str, weight_dtype) -> None:
    files = (demo_models_dir / "diffusion_models" / dit_file, demo_models_dir / "text_encoders" / encoder_file,
             demo_models_dir / "vae" / "flux2-vae.safetensors")
    plan = plan_for_files(MemoryRequest(256, 256), *files, device="cpu", weight_dtype=weight_dtype)
    dit = load_dit(files[0], device="cpu", weight_dtype=weight_dtype)
    loaded = estimate(MemoryRequest(256, 256), dit_shape(dit),
                      text_encoder_shape(load_text_encoder(files[1], device="cpu")),
                      vae_shape(load_vae(files[2], device="cpu")), torch.float32)
    for from_file, from_model in zip(plan.phases, loaded.phases):
        assert from_file.working_bytes == from_model.working_bytes
        # Within 0.1%: loaded models also hold tiny buffers no file stores (RoPE inverse frequencies, a
        # batch-norm counter), and the text encoder's final norm is in the file but cut away on load.
        assert from_file.weight_bytes == pytest.approx(from_model.weight_bytes, rel=1e-3), from_file.name


def test_a_request_that_cannot_fit_is_refused_with_both_numbers() -> None:
    dit = DiTShape(tiny_dit(64, 2).config, weight_bytes=40 * 10 ** 9)
    plan = estimate(MemoryRequest(1024, 1024), dit, compute_dtype=torch.bfloat16)
    check_fits(plan, available_bytes=plan.peak_bytes)
    with pytest.raises(InsufficientMemoryError, match=r"needs 40\.\d GB, 23\.0 GB available \(denoise: 40\.0 GB"):
        check_fits(plan, available_bytes=23 * 10 ** 9)


def test_flux2_info_plan_prints_every_phase(demo_models_dir: Path, capsys) -> None:
    dit = demo_models_dir / "diffusion_models" / "flux-2-klein-4b.safetensors"
    encoder = demo_models_dir / "text_encoders" / "qwen_3_4b.safetensors"
    vae = demo_models_dir / "vae" / "flux2-vae.safetensors"
    common = ["info", "--plan", "--dit", str(dit), "--text-encoder", str(encoder), "--vae", str(vae),
              "--width", "512", "--height", "256", "--cfg", "4", "--reference", "1024x1024", "--device", "cpu"]
    assert flux2_main(common) == 0
    table = capsys.readouterr().out
    assert "512x256, batch 1, cfg 4, 1 reference image(s) (4096 tokens)" in table
    assert all(phase in table for phase in ("text encode", "denoise", "VAE decode"))
    assert flux2_main([*common, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    request_ = MemoryRequest(512, 256, cfg=4.0, references=((1024, 1024),))
    assert report["peak_bytes"] == plan_for_files(request_, dit, encoder, vae, device="cpu").peak_bytes
    assert flux2_main(["info", "--plan", "--width", "512"]) == 2  # no --dit
    assert "expected --dit FILE" in capsys.readouterr().err
