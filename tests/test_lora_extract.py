"""`flux2 lora extract`: a LoRA from the SVD of (tuned - base), checked against a difference of known rank.

The tuned model is the base plus, on every linear layer, a random product B @ A of rank 3 built here; extracting
at rank 3 (and above) must give factors whose product is that difference, and the LoRA merged into the base
(flux2_core.lora.merge_loras, ComfyUI-dialect file read back) must give the tuned weights and the tuned output.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import dit_config
from torch import nn

from flux2_core.checkpoints.writers import save_dit
from flux2_core.demo_models import random_dit
from flux2_core.lora import load_lora, merge_loras, save_lora
from flux2_core.lora.extract import extract_lora_from_models, low_rank_factors
from flux2_host.cli import main as flux2_main

TRUE_RANK = 3


def _tuned_with_low_rank_difference(base, seed: int = 5):
    tuned = random_dit(base.config, 0)
    tuned.load_state_dict(base.state_dict())
    generator = torch.Generator().manual_seed(seed)
    expected = {}
    with torch.no_grad():
        for name, module in tuned.named_modules():
            if isinstance(module, nn.Linear) and "img_attn" not in name:  # some layers stay unchanged
                out_features, in_features = module.weight.shape
                b = torch.randn(out_features, TRUE_RANK, generator=generator) * 0.1
                a = torch.randn(TRUE_RANK, in_features, generator=generator) * 0.1
                expected[name] = b @ a
                module.weight += expected[name]
    return tuned, expected


def _inputs(config, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    img = torch.randn(1, 6, config.in_channels, generator=generator)
    txt = torch.randn(1, 5, config.context_dim, generator=generator)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.zeros(1), torch.arange(2.0), torch.arange(3.0),
                                         indexing="ij"), -1).reshape(1, 6, 4)
    txt_ids = torch.zeros(1, 5, 4)
    txt_ids[..., 3] = torch.arange(5.0)
    return img, img_ids, txt, txt_ids, torch.tensor([0.7])


def test_low_rank_factors_reproduce_a_known_rank_difference() -> None:
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(40, TRUE_RANK, generator=generator) @ torch.randn(TRUE_RANK, 24, generator=generator)
    up, down, kept = low_rank_factors(delta, TRUE_RANK)
    assert up.shape == (40, TRUE_RANK) and down.shape == (TRUE_RANK, 24)
    torch.testing.assert_close(up @ down, delta, atol=1e-5, rtol=1e-5)
    assert kept == pytest.approx(1.0, abs=1e-6)
    # a lower rank keeps the largest singular directions only: the error is the dropped singular value
    up2, down2, kept2 = low_rank_factors(delta, TRUE_RANK - 1)
    s = torch.linalg.svdvals(delta)
    assert torch.linalg.matrix_norm(delta - up2 @ down2).item() == pytest.approx(s[TRUE_RANK - 1].item(), rel=1e-4)
    assert kept2 < 1.0


@pytest.mark.parametrize("rank", [TRUE_RANK, TRUE_RANK + 2])
def test_extracted_lora_applied_to_base_equals_tuned(rank: int, tmp_path) -> None:
    config = dit_config(guidance_embed=False)
    base = random_dit(config, 1)
    tuned, expected = _tuned_with_low_rank_difference(base)
    extraction = extract_lora_from_models(base, tuned, rank, dtype=torch.float32)
    assert {patch.module for patch in extraction.lora.patches} == set(expected)
    assert all("img_attn" in name for name in extraction.unchanged_layers) and extraction.unchanged_layers
    assert extraction.uncaptured_tensors == ()
    for patch in extraction.lora.patches:
        torch.testing.assert_close(patch.scale * patch.delta.matrix(), expected[patch.module], atol=2e-6, rtol=1e-4)

    path = tmp_path / "extracted.safetensors"
    save_lora(extraction.lora, path, "comfyui")
    keys = set(load_file(str(path)))
    assert all(key.startswith("diffusion_model.") for key in keys)
    assert {key.rsplit(".", 2)[-2] if key.endswith(".weight") else key.rsplit(".", 1)[-1] for key in keys} == {
        "lora_A", "lora_B", "alpha"}
    merged = random_dit(config, 0)
    merged.load_state_dict(base.state_dict())
    merge_loras(merged, [(load_lora(path), 1.0)])
    for key, value in tuned.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[key], value, atol=2e-6, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(merged(*_inputs(config)), tuned(*_inputs(config)), atol=1e-5, rtol=1e-4)


def test_uncaptured_non_linear_differences_are_listed() -> None:
    config = dit_config(guidance_embed=False)
    base = random_dit(config, 1)
    tuned, _ = _tuned_with_low_rank_difference(base)
    norm_key = next(key for key in tuned.state_dict() if "norm" in key and "scale" in key)
    with torch.no_grad():
        tuned.state_dict()[norm_key].add_(0.5)
    assert extract_lora_from_models(base, tuned, TRUE_RANK).uncaptured_tensors == (norm_key,)


def test_cli_extracts_from_files(tmp_path, capsys) -> None:
    config = dit_config(guidance_embed=False)
    base = random_dit(config, 1)
    tuned, expected = _tuned_with_low_rank_difference(base)
    save_dit(base, tmp_path / "base.safetensors", dtype=torch.float32)
    save_dit(tuned, tmp_path / "tuned.safetensors", dtype=torch.float32)
    out = tmp_path / "lora.safetensors"
    assert flux2_main(["lora", "extract", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"),
                       "--rank", str(TRUE_RANK), "--out", str(out)]) == 0
    assert f"wrote {out}: rank {TRUE_RANK}, {len(expected)} layers changed" in capsys.readouterr().out
    lora = load_lora(out)
    assert lora.dialect == "bfl" and lora.rank == TRUE_RANK and lora.alpha == TRUE_RANK
    for patch in lora.patches:  # stored in bf16 by default
        torch.testing.assert_close(patch.scale * patch.delta.matrix(), expected[patch.module], atol=2e-3, rtol=2e-2)
    assert flux2_main(["lora", "extract", str(tmp_path / "base.safetensors"), str(tmp_path / "missing.safetensors"),
                       "--rank", "2", "--out", str(out)]) == 1
    assert "missing.safetensors" in capsys.readouterr().err
