"""Where /interrupt is honoured inside long calls: the VAE's convolutions (in bands of rows), the DiT's huge
batches (in sub-batches), the text encoder (before each decoder layer) and model loading (between tensors).

Each test requests the interrupt while one piece of work runs and checks that the next check point raised,
with no further piece run. The cut work is also compared to the uncut call (same products, same result).
bench/interrupt_gaps.py measures the time between check points; tests assert no times.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from tiny_models import dit_config

from flux2_core import progress
from flux2_core import vae as vae_module
from flux2_core.checkpoints.loaders import load_dit, load_text_encoder, load_vae
from flux2_core.checkpoints.reader import CheckpointSource
from flux2_core.demo_models import DEMO_VAE, random_vae
from flux2_core.dit import Flux2DiT
from flux2_core.errors import Interrupted
from flux2_core.progress import clear_interrupt, request_interrupt
from flux2_core.vae import conv_in_bands

MAX_RELATIVE_ERROR = 1e-5


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


@pytest.fixture(autouse=True)
def no_interrupt_left_over():
    clear_interrupt()
    yield
    clear_interrupt()


def small_budget(monkeypatch: pytest.MonkeyPatch, macs: int) -> None:
    monkeypatch.setattr(progress, "CPU_MACS_BETWEEN_CHECKS", macs)


# ---------------------------------------------------------------------------------------------------------------------
# VAE convolutions in bands of rows


@pytest.mark.parametrize(("kernel", "stride", "padding"), [(3, 1, 1), (3, 2, 0), (1, 1, 0)])
def test_conv_in_bands_equals_one_call(monkeypatch, kernel, stride, padding):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, kernel, stride=stride, padding=padding)
    x = torch.randn(2, 4, 13, 11)
    with torch.no_grad():
        whole = conv(x)
        small_budget(monkeypatch, 2 * whole.shape[-1] * 6 * 4 * kernel * kernel * 3)  # 3 output rows a band
        banded = conv_in_bands(conv, x)
    assert banded.shape == whole.shape
    assert relative_error(banded, whole) <= MAX_RELATIVE_ERROR


def test_conv_in_bands_stops_between_bands(monkeypatch):
    conv = nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 12, 8)
    small_budget(monkeypatch, 8 * 4 * 4 * 9 * 2)  # 2 rows a band: 6 bands
    real_conv2d = F.conv2d
    bands = []

    def conv2d_interrupted_during_the_second_band(*args, **kwargs):
        bands.append(args[0].shape[2])
        if len(bands) == 2:
            request_interrupt()  # /interrupt arrives while the second band is computed
        return real_conv2d(*args, **kwargs)

    monkeypatch.setattr(vae_module.F, "conv2d", conv2d_interrupted_during_the_second_band)
    with torch.no_grad(), pytest.raises(Interrupted):
        conv_in_bands(conv, x)
    assert bands == [4, 4]  # output rows 0-1 read a zero row and input rows 0-2, rows 2-3 read 1-4; no third


@pytest.mark.parametrize("direction", ["decode", "encode"])
def test_vae_in_bands_equals_one_call(monkeypatch, direction):
    vae = random_vae(DEMO_VAE, seed=0)
    source = torch.randn(1, 128, 4, 4) if direction == "decode" else torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        whole = getattr(vae, direction)(source)
        small_budget(monkeypatch, 1 << 20)  # a 64x64 level then runs in bands of a few rows
        banded = getattr(vae, direction)(source)
    assert relative_error(banded, whole) <= MAX_RELATIVE_ERROR


def test_an_interrupt_inside_a_resnet_block_stops_before_its_second_convolution(monkeypatch):
    """The full-resolution resnet block of a 2048x2048 decode ran 6 s between checks on a CPU; its
    convolutions now check between bands, so an interrupt during conv1 stops before conv2."""
    vae = random_vae(DEMO_VAE, seed=0)
    block = vae.decoder.up[0].block[0]
    small_budget(monkeypatch, 1 << 20)
    conv1_inputs, conv2_ran = [], []
    real_conv2d = F.conv2d

    def conv2d_watching_the_block(band, weight, *args, **kwargs):
        if weight is block.conv1.weight:
            conv1_inputs.append(band.shape[2])
            request_interrupt()
        if weight is block.conv2.weight:
            conv2_ran.append(band.shape[2])
        return real_conv2d(band, weight, *args, **kwargs)

    monkeypatch.setattr(vae_module.F, "conv2d", conv2d_watching_the_block)
    with torch.no_grad(), pytest.raises(Interrupted):
        vae.decode(torch.randn(1, 128, 4, 4))
    assert len(conv1_inputs) == 1 and conv2_ran == []


# ---------------------------------------------------------------------------------------------------------------------
# DiT batches in sub-batches


def tiny_dit() -> Flux2DiT:
    torch.manual_seed(0)
    return Flux2DiT(dit_config(guidance_embed=False)).eval()


def dit_inputs(dit: Flux2DiT, batch: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    img_ids = torch.zeros(batch, 16, 4)
    img_ids[..., 1], img_ids[..., 2] = torch.arange(16) // 4, torch.arange(16) % 4
    return {"img": torch.randn(batch, 16, 128, generator=generator),
            "img_ids": img_ids,
            "txt": torch.randn(batch, 8, dit.config.context_dim, generator=generator),
            "txt_ids": torch.zeros(batch, 8, 4),
            "timesteps": torch.rand(batch, generator=generator)}


def test_dit_sub_batches_equal_one_pass(monkeypatch):
    dit = tiny_dit()
    inputs = dit_inputs(dit, 5)
    reference = torch.randn(1, 16, 128)
    with torch.no_grad():
        cache = dit.cache_reference_kv(reference, torch.ones(1, 16, 4))
        whole = dit(**inputs, reference_kv=cache)
        small_budget(monkeypatch, 1)  # one sample per pass
        parts = dit(**inputs, reference_kv=cache)
    assert parts.shape == whole.shape
    assert relative_error(parts, whole) <= MAX_RELATIVE_ERROR


def test_an_interrupt_during_one_sub_batch_stops_before_the_next(monkeypatch):
    dit = tiny_dit()
    small_budget(monkeypatch, 1)
    passes = []
    dit.double_blocks[0].register_forward_hook(lambda module, args, output: passes.append(args[0].shape[0]))
    dit.single_blocks[-1].register_forward_hook(lambda *_: request_interrupt())  # the last block of a pass
    with torch.no_grad(), pytest.raises(Interrupted):
        dit(**dit_inputs(dit, 3))
    assert passes == [1]  # one sample went through; the next sub-batch was not started


def test_the_dit_keeps_one_pass_where_the_batch_fits_the_budget():
    dit = tiny_dit()
    passes = []
    dit.double_blocks[0].register_forward_hook(lambda module, args, output: passes.append(args[0].shape[0]))
    with torch.no_grad():
        dit(**dit_inputs(dit, 3))
    assert passes == [3]


# ---------------------------------------------------------------------------------------------------------------------
# Text encoder layers and model loading


def test_an_interrupt_during_a_text_encoder_layer_stops_before_the_next(demo_models_dir):
    encoder = load_text_encoder(demo_models_dir / "text_encoders" / "qwen_3_4b.safetensors")
    layers = list(encoder.model.layers)
    ran = []
    for layer in layers:
        layer.register_forward_hook(lambda module, *_: ran.append(module))
    layers[0].register_forward_hook(lambda *_: request_interrupt())
    with pytest.raises(Interrupted):
        encoder.encode(["a fox", "a cat"])
    assert len(layers) > 1 and ran == [layers[0]]


@pytest.mark.parametrize(("load", "file"), [
    (load_dit, "diffusion_models/flux-2-klein-4b.safetensors"),
    (load_vae, "vae/flux2-vae.safetensors"),
    (load_text_encoder, "text_encoders/qwen_3_4b.safetensors"),
])
def test_an_interrupt_while_loading_stops_after_the_tensor_being_read(monkeypatch, demo_models_dir, load, file):
    real_read = CheckpointSource.read_bytes
    reads = []

    def read_then_interrupt(source: CheckpointSource, name: str) -> torch.Tensor:
        reads.append(name)
        request_interrupt()  # /interrupt arrives while the first weight is read
        return real_read(source, name)

    monkeypatch.setattr(CheckpointSource, "read_bytes", read_then_interrupt)
    with pytest.raises(Interrupted):
        load(demo_models_dir / file, device="cpu")
    assert len(reads) == 1


# ---------------------------------------------------------------------------------------------------------------------
# Attention over many tokens, in chunks of queries


def test_attention_in_query_chunks_equals_one_call_and_stops_between_chunks(monkeypatch):
    from flux2_core import attention as attention_module

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    whole = attention_module.attention(q, k, v)
    small_budget(monkeypatch, 2 * 2 * 40 * 8 * 7)  # 7 query rows a chunk: 6 chunks
    calls = []

    def counting_sdpa(*args):
        calls.append(args[0].shape[2])
        return F.scaled_dot_product_attention(*args)

    monkeypatch.setitem(attention_module.BACKENDS, "sdpa", counting_sdpa)
    chunked = attention_module.attention(q, k, v)
    assert calls == [7, 7, 7, 7, 7, 5]
    assert relative_error(chunked, whole) <= MAX_RELATIVE_ERROR

    def interrupting_sdpa(*args):
        calls.append(args[0].shape[2])
        request_interrupt()
        return F.scaled_dot_product_attention(*args)

    calls.clear()
    monkeypatch.setitem(attention_module.BACKENDS, "sdpa", interrupting_sdpa)
    with pytest.raises(Interrupted):
        attention_module.attention(q, k, v)
    assert calls == [7]  # the check before the second chunk stopped it


def test_norm_silu_in_groups_equals_one_call_and_stops_between_slices(monkeypatch):
    torch.manual_seed(0)
    norm = nn.GroupNorm(8, 32, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(1, 32, 12, 10).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        whole = vae_module._norm_silu(norm, x)
        small_budget(monkeypatch, x.numel() // 8 * vae_module.NORM_SILU_OPS_PER_VALUE * 3)  # 3 groups a slice
        sliced = vae_module._norm_silu(norm, x)
        assert relative_error(sliced, whole) <= MAX_RELATIVE_ERROR
        slices = []
        group_norm = F.group_norm

        def interrupting_group_norm(*args):
            slices.append(args[1])
            request_interrupt()
            return group_norm(*args)

        monkeypatch.setattr(vae_module.F, "group_norm", interrupting_group_norm)
        with pytest.raises(Interrupted):
            vae_module._norm_silu(norm, x)
    assert slices == [3]  # the check before the second slice of groups stopped it


# ---------------------------------------------------------------------------------------------------------------------
# SaveImage's PNG encoding, one compressed buffer at a time


def test_save_image_stops_between_png_buffers_and_writes_nothing(tmp_path, monkeypatch):
    from flux2_host import folders
    from flux2_host.core_nodes import images

    monkeypatch.setattr(folders, "output_directory", str(tmp_path))
    checks = []

    def interrupt_at_third_buffer() -> None:
        checks.append(1)
        if len(checks) == 3:
            request_interrupt()
        progress.check_interrupt()

    monkeypatch.setattr(images, "check_interrupt", interrupt_at_third_buffer)
    noise = torch.rand(1, 512, 512, 3, generator=torch.Generator().manual_seed(0))  # ~0.8 MB of PNG: many buffers
    with pytest.raises(Interrupted):
        images.SaveImage().save_images(noise, filename_prefix="big")
    assert len(checks) == 3 and not list(tmp_path.rglob("*.png"))


# The 8-bit conversion before any PNG is written, in bands of rows


@pytest.mark.parametrize("truncate", [False, True])
def test_image_to_pils_in_bands_equals_the_numpy_conversion_and_stops_between_bands(monkeypatch, truncate):
    import numpy as np

    from flux2_core import comfy_layouts

    image = torch.rand(2, 37, 24, 4, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1  # out of range too
    image[0, 0, :4, 0] = torch.tensor([0.5, 1.5, 2.5, 254.5]) / 255  # halves round to even, as numpy's round
    pixels = image[..., :3].numpy()
    # truncate: ComfyUI's SaveImage, `np.clip(255. * i, 0, 255).astype(np.uint8)`, verbatim
    expected = np.clip(255. * pixels, 0, 255).astype(np.uint8) if truncate else \
        (pixels * 255.0).round().clip(0, 255).astype(np.uint8)
    monkeypatch.setattr(comfy_layouts, "PIXELS_BETWEEN_CHECKS", 24 * 5)  # 5 rows a band: 8 bands per image
    pictures = comfy_layouts.image_to_pils(image, truncate=truncate)
    assert all(np.array_equal(np.asarray(picture), frame) for picture, frame in zip(pictures, expected))

    bands = []

    def interrupt_at_the_third_check() -> None:
        bands.append(1)
        if len(bands) == 3:
            request_interrupt()
        progress.check_interrupt()

    monkeypatch.setattr(comfy_layouts, "check_interrupt", interrupt_at_the_third_check)
    with pytest.raises(Interrupted):
        comfy_layouts.image_to_pils(image)
    assert len(bands) == 3
