"""LoRA dialects, merge / unmerge / on-the-fly application, conversion and the CLI, on tiny random DiTs.

Every LoRA file here is written by this test's own key tables (not by flux2_core.lora.convert), and the
expected change is computed here from the factors: W + strength * scale * delta on the BFL weight.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from functools import partial

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import dit_config

from flux2_core.checkpoints.quant import Fp8Linear, quantize_linear_weights
from flux2_core.demo_models import random_dit
from flux2_core.dit import Flux2DiT
from flux2_core.errors import CheckpointError, IncompatibleModelsError
from flux2_core.lora import (
    FORMATS,
    attach_loras,
    load_lora,
    lora_from_state_dict,
    merge_loras,
    save_lora,
)
from flux2_core.patched_model import PatchedModel
from flux2_core.variants import DiTConfig
from flux2_host.cli import main as flux2_main

RANK = 4

# diffusers names of the BFL linear layers, written out independently of flux2_core's key maps. A tuple
# means the BFL weight's rows are split evenly in that order; norm_out.linear has its row halves swapped.
DIFFUSERS_GLOBAL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
    "final_layer.linear": "proj_out",
}
DIFFUSERS_DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.linear_in",
    "img_mlp.2": "ff.linear_out",
    "txt_mlp.0": "ff_context.linear_in",
    "txt_mlp.2": "ff_context.linear_out",
}
DIFFUSERS_SINGLE = {"linear1": "attn.to_qkv_mlp_proj", "linear2": "attn.to_out"}


# The tiny DiTs here read 48-wide prompts and have guidance_in unless told otherwise.
tiny_config = partial(dit_config, guidance_embed=True, context_dim=48)


def linear_names(dit: Flux2DiT) -> list[str]:
    return [name for name, module in dit.named_modules() if isinstance(module, (torch.nn.Linear, Fp8Linear))]


def random_factors(dit: Flux2DiT, seed: int = 1, rank: int = RANK, modules=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """BFL module -> (B [out, r], A [r, in]), sized so that B @ A is about as large as the weight."""
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for name in modules or linear_names(dit):
        layer = dit.get_submodule(name)
        up = torch.randn(layer.out_features, rank, generator=generator) / math.sqrt(rank)
        down = torch.randn(rank, layer.in_features, generator=generator) / math.sqrt(layer.in_features)
        factors[name] = (up, down)
    return factors


def diffusers_pieces(module: str) -> tuple[str | tuple[str, ...], bool]:
    """(diffusers name or names of the row pieces, halves swapped) for a BFL module, from the tables above."""
    parts = module.split(".")
    if parts[0] == "double_blocks":
        return tuple(f"transformer_blocks.{parts[1]}.{n}" for n in _as_tuple(DIFFUSERS_DOUBLE[".".join(parts[2:])])), False
    if parts[0] == "single_blocks":
        return (f"single_transformer_blocks.{parts[1]}.{DIFFUSERS_SINGLE[parts[2]]}",), False
    return (DIFFUSERS_GLOBAL[module],), module == "final_layer.adaLN_modulation.1"


def _as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2)
    return torch.cat((second, first))


# ----------------------------------------------------------------------------------------------------------
# Writers of each dialect (the tools' key layouts).

def kohya_file(factors, alpha: float) -> dict[str, torch.Tensor]:
    out = {}
    for module, (up, down) in factors.items():
        name = "lora_unet_" + module.replace(".", "_")
        out.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                    f"{name}.alpha": torch.tensor(alpha)})
    return out


def bfl_file(factors, alpha: float | None, down_up: bool = False, prefix: str = "diffusion_model.") -> dict:
    a, b = ("lora_down", "lora_up") if down_up else ("lora_A", "lora_B")
    out = {}
    for module, (up, down) in factors.items():
        out.update({f"{prefix}{module}.{a}.weight": down, f"{prefix}{module}.{b}.weight": up})
        if alpha is not None:
            out[f"{prefix}{module}.alpha"] = torch.tensor(alpha)
    return out


def diffusers_file(factors, prefix: str = "transformer.", adapter: str = "", dtype=None) -> dict:
    """q/k/v split with A shared; the final layer's B rows swapped; no alpha."""
    out = {}
    for module, (up, down) in factors.items():
        names, swapped = diffusers_pieces(module)
        up = swap_halves(up) if swapped else up
        for name, piece in zip(names, up.chunk(len(names))):
            out[f"{prefix}{name}.lora_A{adapter}.weight"] = down.clone()
            out[f"{prefix}{name}.lora_B{adapter}.weight"] = piece.clone()
    return {k: v.to(dtype) for k, v in out.items()} if dtype else out


def split_single_file(factors) -> dict:
    """Single-block linear1 as separate to_q / to_k / to_v / proj_mlp pieces (older diffusers-style exports)."""
    out = {}
    for module, (up, down) in factors.items():
        block = module.split(".")[1]
        hidden = down.shape[1]
        bounds = {"attn.to_q": (0, hidden), "attn.to_k": (hidden, 2 * hidden), "attn.to_v": (2 * hidden, 3 * hidden),
                  "proj_mlp": (3 * hidden, 9 * hidden)}
        for name, (start, stop) in bounds.items():
            out[f"transformer.single_transformer_blocks.{block}.{name}.lora_A.weight"] = down.clone()
            out[f"transformer.single_transformer_blocks.{block}.{name}.lora_B.weight"] = up[start:stop].clone()
    return out


def expected_weights(dit: Flux2DiT, deltas: dict[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
    """module -> W + strength * delta, in float64."""
    return {m: dit.get_submodule(m).weight.double() + strength * d.double() for m, d in deltas.items()}


def low_rank_deltas(factors, scale: float) -> dict[str, torch.Tensor]:
    return {m: scale * (up.double() @ down.double()) for m, (up, down) in factors.items()}


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.double() - reference.double()).abs().max() / reference.double().abs().max()).item()


def assert_merged(dit: Flux2DiT, lora, deltas, strength: float = 0.7) -> None:
    merged = copy.deepcopy(dit)
    merge_loras(merged, [(lora, strength)])
    expected = expected_weights(dit, deltas, strength)
    for module, weight in expected.items():
        assert relative_error(merged.get_submodule(module).weight, weight) <= 1e-6, module
    untouched = set(linear_names(dit)) - set(deltas)
    for module in untouched:
        assert torch.equal(merged.get_submodule(module).weight, dit.get_submodule(module).weight)


def dit_inputs(config: DiTConfig, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(4.0), torch.zeros(1),
                                         indexing="ij"), dim=-1).reshape(1, -1, 4)
    txt_ids = torch.zeros(1, 5, 4)
    txt_ids[..., 3] = torch.arange(5.0)
    img = torch.randn(1, 12, 128, generator=generator)
    txt = torch.randn(1, 5, config.context_dim, generator=generator)
    guidance = torch.tensor([3.5]) if config.guidance_embed else None
    return img, img_ids, txt, txt_ids, torch.tensor([0.6]), guidance


def forward(dit: Flux2DiT, config: DiTConfig) -> torch.Tensor:
    with torch.no_grad():
        return dit(*dit_inputs(config))


# ----------------------------------------------------------------------------------------------------------
# Each dialect changes the DiT exactly as W + strength * scale * delta.

@pytest.fixture(scope="module")
def dit() -> Flux2DiT:
    return random_dit(tiny_config(), seed=0)


def test_kohya_musubi(dit):
    factors = random_factors(dit)
    lora = lora_from_state_dict(kohya_file(factors, alpha=1.0), {"ss_network_module": "networks.lora_flux_2"})
    assert (lora.dialect, lora.algorithm, lora.rank, lora.alpha) == ("kohya", "lora", RANK, 1.0)
    assert lora.metadata["ss_network_module"] == "networks.lora_flux_2"
    assert all(patch.rows is None for patch in lora.patches)  # fused qkv kept fused
    assert_merged(dit, lora, low_rank_deltas(factors, 1.0 / RANK))


@pytest.mark.parametrize("prefix, down_up, alpha", [
    ("diffusion_model.", False, 8.0),  # ai-toolkit / ComfyUI
    ("diffusion_model.", True, None),  # ai-toolkit with kohya parameter names, no alpha
    ("model.diffusion_model.", False, 2.0),
    ("", False, None),  # bare BFL names
])
def test_bfl_names(dit, prefix, down_up, alpha):
    factors = random_factors(dit, seed=2)
    lora = lora_from_state_dict(bfl_file(factors, alpha, down_up, prefix))
    assert lora.dialect == "bfl" and lora.alpha == alpha
    assert_merged(dit, lora, low_rank_deltas(factors, (alpha or RANK) / RANK))


@pytest.mark.parametrize("prefix, adapter, dialect", [
    ("transformer.", "", "diffusers"),
    ("base_model.model.", "", "peft"),
    ("base_model.model.", ".default", "peft"),
    ("", ".default", "diffsynth"),
])
def test_diffusers_peft_diffsynth_split_qkv(dit, prefix, adapter, dialect):
    factors = random_factors(dit, seed=3)
    lora = lora_from_state_dict(diffusers_file(factors, prefix, adapter))
    assert lora.dialect == dialect and lora.alpha is None
    qkv = lora.targets["double_blocks.1.txt_attn.qkv"]
    assert sorted(patch.rows for patch in qkv) == [(0, 64), (64, 128), (128, 192)]
    assert_merged(dit, lora, low_rank_deltas(factors, 1.0))


def test_diffsynth_bf16(dit):
    factors = {m: (up.bfloat16(), down.bfloat16()) for m, (up, down) in random_factors(dit, seed=4).items()}
    lora = lora_from_state_dict(diffusers_file(factors, "", ".default"))
    assert lora.dialect == "diffsynth"
    assert_merged(dit, lora, low_rank_deltas(factors, 1.0))


def test_diffusers_alpha_from_peft_metadata(dit):
    factors = random_factors(dit, seed=5)
    config = {"transformer.r": RANK, "transformer.lora_alpha": 2 * RANK,
              "transformer.alpha_pattern": {"proj_out": RANK / 2}}
    lora = lora_from_state_dict(diffusers_file(factors), {"lora_adapter_metadata": json.dumps(config)})
    deltas = low_rank_deltas(factors, 2.0)
    deltas["final_layer.linear"] = deltas["final_layer.linear"] / 4
    assert_merged(dit, lora, deltas)


def test_split_single_block_names(dit):
    factors = random_factors(dit, seed=6, modules=["single_blocks.0.linear1", "single_blocks.1.linear1"])
    lora = lora_from_state_dict(split_single_file(factors))
    assert sorted(p.rows for p in lora.targets["single_blocks.0.linear1"]) == [(0, 64), (64, 128), (128, 192), (192, 576)]
    assert_merged(dit, lora, low_rank_deltas(factors, 1.0))


def test_comfyui_linear1_qkv(dit):
    (up, down), = random_factors(dit, seed=7, modules=["single_blocks.1.linear1"]).values()
    up = up[:192]
    lora = lora_from_state_dict({"diffusion_model.single_blocks.1.linear1_qkv.lora_A.weight": down,
                                 "diffusion_model.single_blocks.1.linear1_qkv.lora_B.weight": up})
    delta = torch.zeros(576, 64, dtype=torch.float64)
    delta[:192] = up.double() @ down.double()
    assert_merged(dit, lora, {"single_blocks.1.linear1": delta})


def loha_factors(dit, modules, seed=8, rank=RANK):
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for module in modules:
        layer = dit.get_submodule(module)
        factors[module] = tuple(torch.randn(shape, generator=generator) * 0.3 for shape in (
            (layer.out_features, rank), (rank, layer.in_features), (layer.out_features, rank), (rank, layer.in_features)))
    return factors


def test_lycoris_loha(dit):
    modules = ["double_blocks.0.img_attn.qkv", "single_blocks.1.linear2", "txt_in"]
    factors = loha_factors(dit, modules)
    tensors = {}
    for module, (w1a, w1b, w2a, w2b) in factors.items():
        name = "lora_unet_" + module.replace(".", "_")
        tensors.update({f"{name}.hada_w1_a": w1a, f"{name}.hada_w1_b": w1b, f"{name}.hada_w2_a": w2a,
                        f"{name}.hada_w2_b": w2b, f"{name}.alpha": torch.tensor(2.0)})
    lora = lora_from_state_dict(tensors)
    assert (lora.dialect, lora.algorithm) == ("kohya", "loha")
    deltas = {m: (2.0 / RANK) * (w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double())
              for m, (w1a, w1b, w2a, w2b) in factors.items()}
    assert_merged(dit, lora, deltas)


def lokr_factors(dit, modules, seed=9, rank=2):
    """module -> (w1 [2, 4] full, w2_a, w2_b) with kron(w1, w2_a @ w2_b) of the layer's shape."""
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for module in modules:
        layer = dit.get_submodule(module)
        w1 = torch.randn(2, 4, generator=generator)
        w2_a = torch.randn(layer.out_features // 2, rank, generator=generator) * 0.2
        w2_b = torch.randn(rank, layer.in_features // 4, generator=generator) * 0.2
        factors[module] = (w1, w2_a, w2_b)
    return factors


def test_lycoris_lokr_kohya_names(dit):
    modules = ["double_blocks.1.txt_attn.qkv", "single_blocks.0.linear1", "final_layer.adaLN_modulation.1"]
    factors = lokr_factors(dit, modules)
    tensors = {}
    for module, (w1, w2_a, w2_b) in factors.items():
        name = "lora_unet_" + module.replace(".", "_")
        tensors.update({f"{name}.lokr_w1": w1, f"{name}.lokr_w2_a": w2_a, f"{name}.lokr_w2_b": w2_b,
                        f"{name}.alpha": torch.tensor(1.0)})
    lora = lora_from_state_dict(tensors)
    assert lora.algorithm == "lokr" and lora.rank == 2
    deltas = {m: 0.5 * torch.kron(w1.double(), w2_a.double() @ w2_b.double()) for m, (w1, w2_a, w2_b) in factors.items()}
    assert_merged(dit, lora, deltas)


def test_lycoris_lokr_diffusers_names(dit):
    """SimpleTuner's lycoris_ keys with diffusers names; diffusers' fused to_qkv; full factors (no alpha use)."""
    factors = lokr_factors(dit, ["double_blocks.0.img_attn.qkv", "double_blocks.0.img_mlp.2"], seed=10)
    full = {m: (w1, w2_a @ w2_b) for m, (w1, w2_a, w2_b) in factors.items()}
    tensors = {
        "lycoris_transformer_blocks_0_attn_to_qkv.lokr_w1": full["double_blocks.0.img_attn.qkv"][0],
        "lycoris_transformer_blocks_0_attn_to_qkv.lokr_w2": full["double_blocks.0.img_attn.qkv"][1],
        "lycoris_transformer_blocks_0_ff_linear_out.lokr_w1": full["double_blocks.0.img_mlp.2"][0],
        "lycoris_transformer_blocks_0_ff_linear_out.lokr_w2": full["double_blocks.0.img_mlp.2"][1],
        "lycoris_transformer_blocks_0_ff_linear_out.alpha": torch.tensor(16.0),
    }
    lora = lora_from_state_dict(tensors)
    assert lora.dialect == "lycoris"
    assert_merged(dit, lora, {m: torch.kron(w1.double(), w2.double()) for m, (w1, w2) in full.items()})


# ----------------------------------------------------------------------------------------------------------
# Applying: on the fly vs merged, stacking, unmerging, fp8, duplicates.

def test_on_the_fly_matches_merged_with_stacked_and_negative_strengths(dit):
    config = dit.config
    first = lora_from_state_dict(diffusers_file(random_factors(dit, seed=11)), name="first")
    loha = lora_from_state_dict({f"lora_unet_double_blocks_0_img_mlp_0.{k}": v for k, v in zip(
        ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
        loha_factors(dit, ["double_blocks.0.img_mlp.0"])["double_blocks.0.img_mlp.0"])}, name="loha")
    (w1, w2_a, w2_b), = lokr_factors(dit, ["single_blocks.1.linear1"]).values()
    lokr = lora_from_state_dict({"lora_unet_single_blocks_1_linear1.lokr_w1": w1,
                                 "lora_unet_single_blocks_1_linear1.lokr_w2_a": w2_a,
                                 "lora_unet_single_blocks_1_linear1.lokr_w2_b": w2_b}, name="lokr")
    stack = [(first, 0.8), (loha, -0.6), (lokr, 1.3)]
    base = forward(dit, config)

    with attach_loras(dit, stack):
        hooked = forward(dit, config)
    assert torch.equal(forward(dit, config), base)  # detached: the weights were never touched

    merged = copy.deepcopy(dit)
    merge_loras(merged, stack)
    expected = forward(merged, config)
    assert relative_error(hooked, base) > 1e-2  # the LoRAs do something
    assert relative_error(hooked, expected) <= 1e-5

    # Stacking adds the deltas, each with its own (possibly negative) strength.
    qkv = "double_blocks.0.img_attn.qkv"
    up, down = random_factors(dit, seed=11)[qkv]
    assert relative_error(merged.get_submodule(qkv).weight, dit.get_submodule(qkv).weight.double()
                          + 0.8 * up.double() @ down.double()) <= 1e-6
    w1a, w1b, w2a, w2b = loha_factors(dit, ["double_blocks.0.img_mlp.0"])["double_blocks.0.img_mlp.0"]
    factors = random_factors(dit, seed=11)["double_blocks.0.img_mlp.0"]
    expected_mlp = (dit.get_submodule("double_blocks.0.img_mlp.0").weight.double()
                    + 0.8 * factors[0].double() @ factors[1].double()
                    - 0.6 * (w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double()))
    assert relative_error(merged.get_submodule("double_blocks.0.img_mlp.0").weight, expected_mlp) <= 1e-6


def test_merge_then_unmerge_restores_weights():
    lora_dit = random_dit(tiny_config(), seed=12)
    lora = lora_from_state_dict(kohya_file(random_factors(lora_dit, seed=13), alpha=3.0))
    for dtype in (torch.float32, torch.bfloat16):
        dit = copy.deepcopy(lora_dit).to(dtype)
        original = copy.deepcopy(dit.state_dict())
        handle = merge_loras(dit, [(lora, 1.0)])
        assert not torch.equal(dit.double_blocks[0].img_attn.qkv.weight, original["double_blocks.0.img_attn.qkv.weight"])
        handle.unmerge()
        for name, tensor in dit.state_dict().items():
            assert torch.equal(tensor, original[name]), (dtype, name)  # kept bytes: exact

    fp32 = copy.deepcopy(lora_dit)
    original = copy.deepcopy(fp32.state_dict())
    merge_loras(fp32, [(lora, 1.0)], keep_original=False).unmerge()
    worst = max(relative_error(t, original[n]) for n, t in fp32.state_dict().items())
    assert worst <= 1e-6  # subtracting the same fp32 delta: exact up to fp32 rounding

    bf16 = copy.deepcopy(lora_dit).to(torch.bfloat16)
    original = copy.deepcopy(bf16.state_dict())
    handle = merge_loras(bf16, [(lora, 1.0)], keep_original=False)
    merged = copy.deepcopy(bf16.state_dict())
    handle.unmerge()
    for name, tensor in bf16.state_dict().items():
        magnitude = torch.maximum(original[name].float().abs(), merged[name].float().abs())
        one_ulp = torch.finfo(torch.bfloat16).eps * 2.0 ** torch.floor(torch.log2(magnitude.clamp(min=1e-30)))
        assert ((tensor.float() - original[name].float()).abs() <= one_ulp).all(), name


def dequantized_copy(fp8_dit: Flux2DiT, float_dit: Flux2DiT) -> Flux2DiT:
    """A float DiT holding exactly the values the fp8 DiT computes with."""
    twin = copy.deepcopy(float_dit)
    with torch.no_grad():
        for name, module in fp8_dit.named_modules():
            if isinstance(module, Fp8Linear):
                twin.get_submodule(name).weight.copy_(module.dequantized_weight(torch.float32))
    return twin


def test_fp8_on_the_fly_and_merged_agree_within_fp8_rounding():
    config = tiny_config()
    float_dit = random_dit(config, seed=14)
    lora = lora_from_state_dict(bfl_file(random_factors(float_dit, seed=15), alpha=RANK))
    fp8_dit = copy.deepcopy(float_dit)
    assert quantize_linear_weights(fp8_dit) > 0
    dequantized = dequantized_copy(fp8_dit, float_dit)

    # On the fly, the fp8 layers compute exactly dequantized W plus the LoRA.
    with attach_loras(fp8_dit, [(lora, 1.0)]):
        hooked = forward(fp8_dit, config)
    merge_loras(dequantized, [(lora, 1.0)])
    assert relative_error(hooked, forward(dequantized, config)) <= 1e-5

    # Merged, each fp8 layer holds W + delta re-quantized: off by at most half an fp8 step per value
    # (3 mantissa bits, and the subnormal step 2^-9 times the new scale near zero).
    original = copy.deepcopy(fp8_dit.state_dict())
    handle = merge_loras(fp8_dit, [(lora, 1.0)])
    for name, module in fp8_dit.named_modules():
        if isinstance(module, Fp8Linear):
            assert module.weight.dtype == torch.float8_e4m3fn
            exact = dequantized.get_submodule(name).weight
            error = (module.dequantized_weight(torch.float32) - exact).abs()
            assert (error <= exact.abs() * 2.0 ** -4 + module.weight_scale * 2.0 ** -10 + 1e-7).all(), name
    merged = forward(fp8_dit, config)
    # At the output that is the error fp8 storage of the merged weights causes anyway.
    fp8_of_merged = copy.deepcopy(dequantized)
    quantize_linear_weights(fp8_of_merged)
    storage_error = relative_error(forward(fp8_of_merged, config), forward(dequantized, config))
    assert relative_error(merged, hooked) <= 2 * storage_error

    handle.unmerge()
    for name, tensor in fp8_dit.state_dict().items():
        assert torch.equal(tensor.view(torch.uint8), original[name].view(torch.uint8)) if tensor.dtype.itemsize == 1 \
            else torch.equal(tensor, original[name]), name


def test_same_lora_twice_is_applied_once(dit, tmp_path, caplog):
    config = dit.config
    path = tmp_path / "style.safetensors"
    save_file(kohya_file(random_factors(dit, seed=16), alpha=RANK), str(path))
    once = copy.deepcopy(dit)
    merge_loras(once, [(path, 1.0)])
    expected = forward(once, config)

    with caplog.at_level(logging.WARNING):
        with attach_loras(dit, [(load_lora(path), 1.0), (str(path), 1.0)]):
            assert relative_error(forward(dit, config), expected) <= 1e-5
            with attach_loras(dit, [(path, 1.0)]) as again:  # already in effect on this DiT
                assert again.layers == 0
                assert relative_error(forward(dit, config), expected) <= 1e-5
    assert "more than once" in caplog.text and "already in effect" in caplog.text


def test_unmatched_keys_warn_once_listing_them(dit, caplog):
    tensors = kohya_file(random_factors(dit, seed=17, modules=["img_in"]), alpha=RANK)
    tensors["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(RANK, 8)
    tensors["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(8, RANK)
    tensors["lora_unet_img_in.dora_magnitude"] = torch.zeros(3)
    with caplog.at_level(logging.WARNING):
        lora = lora_from_state_dict(tensors, name="mixed.safetensors")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "mixed.safetensors" in message and "3 LoRA key(s)" in message
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight" in message
    assert "lora_unet_img_in.dora_magnitude" in message
    assert len(lora.unmatched_keys) == 3 and list(lora.targets) == ["img_in"]


def test_other_architectures_and_widths_are_errors(dit):
    flux1 = {"lora_unet_double_blocks_0_img_mod_lin.lora_down.weight": torch.zeros(RANK, 64),
             "lora_unet_double_blocks_0_img_mod_lin.lora_up.weight": torch.zeros(384, RANK),
             "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(RANK, 64),
             "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(192, RANK)}
    with pytest.raises(CheckpointError, match="flux1.safetensors: this is a FLUX.1 LoRA"):
        lora_from_state_dict(flux1, name="flux1.safetensors")

    flux1_mlp = {"diffusion_model.double_blocks.0.img_mlp.0.lora_A.weight": torch.zeros(RANK, 64),
                 "diffusion_model.double_blocks.0.img_mlp.0.lora_B.weight": torch.zeros(256, RANK)}
    with pytest.raises(CheckpointError, match=r"\[256, 64\] weight.*\[6H, H\].*another architecture"):
        lora_from_state_dict(flux1_mlp, name="flux1_mlp.safetensors")

    sdxl = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(RANK, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, RANK),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(4.0)}
    with pytest.raises(CheckpointError, match="sdxl.safetensors: expected LoRA weights for FLUX.2 DiT layers"):
        lora_from_state_dict(sdxl, name="sdxl.safetensors")

    wide = random_dit(tiny_config(num_heads=4), seed=18)  # hidden size 128
    lora = lora_from_state_dict(kohya_file(random_factors(dit, seed=19), alpha=RANK), name="klein64.safetensors")
    for apply in (attach_loras, merge_loras):
        with pytest.raises(IncompatibleModelsError, match=r"klein64.safetensors: .*width 64.*width is 128.*width 128"):
            apply(wide, [(lora, 1.0)])

    dev_only = lora_from_state_dict(bfl_file(random_factors(dit, seed=20, modules=["guidance_in.in_layer"]), None))
    klein = random_dit(tiny_config(guidance_embed=False), seed=0)
    with pytest.raises(IncompatibleModelsError, match="guidance_in.in_layer, which this DiT does not have"):
        attach_loras(klein, [(dev_only, 1.0)])


def test_unsupported_adapter_forms_are_errors(dit):
    (up, down), = random_factors(dit, seed=21, modules=["img_in"]).values()
    with pytest.raises(CheckpointError, match="DoRA"):
        lora_from_state_dict({"lora_unet_img_in.lora_down.weight": down, "lora_unet_img_in.lora_up.weight": up,
                              "lora_unet_img_in.dora_scale": torch.ones(64, 1)})
    with pytest.raises(CheckpointError, match="Tucker"):
        lora_from_state_dict({"lora_unet_img_in.hada_w1_a": up, "lora_unet_img_in.hada_w1_b": down,
                              "lora_unet_img_in.hada_w2_a": up, "lora_unet_img_in.hada_w2_b": down,
                              "lora_unet_img_in.hada_t1": torch.ones(RANK, RANK)})


def test_patched_model_applies_its_loras_only_while_sampling(dit, tmp_path):
    from flux2_core.sampling import flux2_sigmas_for_tokens, make_noise

    klein = random_dit(tiny_config(guidance_embed=False), seed=22)
    path = tmp_path / "klein.safetensors"
    save_file(diffusers_file(random_factors(klein, seed=23)), str(path))
    noise = make_noise(1, (1, 128, 3, 4))
    sigmas = flux2_sigmas_for_tokens(2, 12)
    context = torch.randn(1, 5, klein.config.context_dim, generator=torch.Generator().manual_seed(24))

    plain = PatchedModel(klein, "klein-4b")
    base = plain.sample(noise, sigmas, context)
    patched = plain.with_lora(load_lora(path), 0.9)
    with_lora = patched.sample(noise, sigmas, context)
    assert not any(m._forward_hooks for m in klein.modules())  # nothing left behind
    assert torch.equal(plain.sample(noise, sigmas, context), base)

    merged = copy.deepcopy(klein)
    merge_loras(merged, [(path, 0.9)])
    expected = PatchedModel(merged, "klein-4b").sample(noise, sigmas, context)
    assert relative_error(with_lora, expected) <= 1e-5
    assert relative_error(with_lora, base) > 1e-2


# ----------------------------------------------------------------------------------------------------------
# Conversion: every format reproduces every delta; A -> B -> A returns the original layout.

def dense_deltas(lora) -> dict[str, torch.Tensor]:
    """BFL module -> the summed scale * delta over its full rows, float64."""
    out = {}
    for module, patches in lora.targets.items():
        for patch in patches:
            start, stop = patch.rows or (0, patch.delta.shape[0])
            total = out.setdefault(module, {})
            total[(start, stop)] = total.get((start, stop), 0) + patch.scale * patch.delta.matrix().double()
    dense = {}
    for module, pieces in out.items():
        rows = max(stop for _, stop in pieces)
        matrix = torch.zeros(rows, next(iter(pieces.values())).shape[1], dtype=torch.float64)
        for (start, stop), value in pieces.items():
            matrix[start:stop] += value
        dense[module] = matrix
    return dense


def assert_same_deltas(a, b) -> None:
    first, second = dense_deltas(a), dense_deltas(b)
    assert first.keys() == second.keys()
    for module in first:
        assert relative_error(second[module], first[module]) <= 1e-6, module


def round_trip(lora, fmt, tmp_path, name=None):
    path = tmp_path / f"{name or fmt}.safetensors"
    save_lora(lora, path, fmt)
    return load_lora(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_from_every_dialect(dit, tmp_path, fmt):
    sources = {
        "kohya": lora_from_state_dict(kohya_file(random_factors(dit, seed=25), alpha=1.0)),
        "diffusers": lora_from_state_dict(diffusers_file(random_factors(dit, seed=26))),
        "split-single": lora_from_state_dict(split_single_file(random_factors(
            dit, seed=27, modules=["single_blocks.0.linear1"]))),
        "peft-alpha": lora_from_state_dict(diffusers_file(random_factors(dit, seed=28)), {
            "lora_adapter_metadata": json.dumps({"transformer.lora_alpha": 2, "transformer.r": RANK})}),
    }
    for label, lora in sources.items():
        converted = round_trip(lora, fmt, tmp_path, f"{label}-{fmt}")
        assert converted.dialect == {"comfyui": "bfl", "diffusers": "diffusers", "kohya": "kohya"}[fmt]
        assert_same_deltas(lora, converted)
        expected_split = fmt == "diffusers" and label != "split-single"
        assert any(p.rows is not None for p in converted.patches) == expected_split, label


def test_convert_round_trips_keep_layout_rank_and_metadata(dit, tmp_path):
    kohya = lora_from_state_dict(kohya_file(random_factors(dit, seed=29), alpha=1.0), {"ss_network_dim": "4"})
    back = round_trip(round_trip(kohya, "diffusers", tmp_path), "kohya", tmp_path, "back")
    assert_same_deltas(kohya, back)
    assert back.rank == RANK and set(back.ranks) == {RANK}  # the split's shared A is fused back, not stacked
    assert back.metadata["ss_network_dim"] == "4"
    assert all(patch.rows is None for patch in back.patches)

    diffusers = lora_from_state_dict(diffusers_file(random_factors(dit, seed=30)))
    back = round_trip(round_trip(diffusers, "comfyui", tmp_path), "diffusers", tmp_path, "back2")
    assert_same_deltas(diffusers, back)
    assert set(back.ranks) == {RANK}
    for original, returned in zip(sorted(diffusers.patches, key=lambda p: (p.module, p.rows)),
                                  sorted(back.patches, key=lambda p: (p.module, p.rows))):
        assert torch.allclose(returned.delta.down, original.delta.down)
        assert relative_error(returned.delta.up, original.delta.up) <= 1e-6


def test_convert_lycoris_keeps_its_algorithm(dit, tmp_path):
    modules = ["double_blocks.0.img_attn.qkv", "final_layer.adaLN_modulation.1"]
    tensors = {}
    for module, (w1a, w1b, w2a, w2b) in loha_factors(dit, modules).items():
        name = "lora_unet_" + module.replace(".", "_")
        tensors.update({f"{name}.hada_w1_a": w1a, f"{name}.hada_w1_b": w1b, f"{name}.hada_w2_a": w2a,
                        f"{name}.hada_w2_b": w2b, f"{name}.alpha": torch.tensor(1.0)})
    for module, (w1, w2_a, w2_b) in lokr_factors(dit, ["single_blocks.0.linear2", "double_blocks.1.txt_attn.qkv"]).items():
        name = "lora_unet_" + module.replace(".", "_")
        tensors.update({f"{name}.lokr_w1": w1, f"{name}.lokr_w2_a": w2_a, f"{name}.lokr_w2_b": w2_b,
                        f"{name}.alpha": torch.tensor(3.0)})
    lycoris = lora_from_state_dict(tensors)
    for fmt in FORMATS:
        converted = round_trip(lycoris, fmt, tmp_path)
        assert converted.algorithm == "loha+lokr"
        assert_same_deltas(lycoris, converted)


def test_cli_info_and_convert(dit, tmp_path, capsys):
    source = tmp_path / "musubi.safetensors"
    save_file(kohya_file(random_factors(dit, seed=31), alpha=1.0), str(source),
              {"ss_network_module": "networks.lora_flux_2", "ss_network_dim": "4"})
    assert flux2_main(["lora", "info", str(source), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["dialect"], info["algorithm"], info["rank"], info["alpha"]) == ("kohya", "lora", RANK, 1.0)
    assert info["hidden_size"] == 64 and info["target_layers"] == len(linear_names(dit))
    assert info["metadata"]["ss_network_module"] == "networks.lora_flux_2"

    output = tmp_path / "for_diffusers.safetensors"
    assert flux2_main(["lora", "convert", str(source), str(output), "--to", "diffusers"]) == 0
    assert flux2_main(["lora", "info", str(output)]) == 0
    report = capsys.readouterr().out
    assert "dialect:     diffusers" in report and "q/k/v split" in report
    assert_same_deltas(load_lora(source), load_lora(output))

    assert flux2_main(["lora", "info", str(tmp_path / "missing.safetensors")]) == 1
    assert "missing.safetensors" in capsys.readouterr().err


def test_lora_loader_model_only_node(tmp_path, monkeypatch):
    from flux2_core.sampling import flux2_sigmas_for_tokens, make_noise
    from flux2_host import folders
    from flux2_host.core_nodes.loaders import LoraLoaderModelOnly

    klein = random_dit(tiny_config(guidance_embed=False), seed=50)
    save_file(kohya_file(random_factors(klein, seed=51), alpha=RANK), str(tmp_path / "style.safetensors"))
    extensions = folders.folder_names_and_paths["loras"][1]
    monkeypatch.setitem(folders.folder_names_and_paths, "loras", ([str(tmp_path)], extensions))

    model = PatchedModel(klein, "klein-4b")
    node = LoraLoaderModelOnly()
    (once,) = node.load_lora_model_only(model, "style.safetensors", 0.8)
    (twice,) = node.load_lora_model_only(once, "style.safetensors", 0.8)  # the same LoRA chained twice
    assert model.lora_patches == () and len(twice.lora_patches) == 2

    noise, sigmas = make_noise(2, (1, 128, 3, 4)), flux2_sigmas_for_tokens(2, 12)
    context = torch.randn(1, 5, klein.config.context_dim, generator=torch.Generator().manual_seed(52))
    merged = copy.deepcopy(klein)
    merge_loras(merged, [(tmp_path / "style.safetensors", 0.8)])
    expected = PatchedModel(merged, "klein-4b").sample(noise, sigmas, context)
    assert relative_error(once.sample(noise, sigmas, context), expected) <= 1e-5
    assert relative_error(twice.sample(noise, sigmas, context), expected) <= 1e-5  # applied once


def test_pipeline_load_lora_and_per_call_loras(demo_models_dir, tmp_path):
    from flux2_core.demo_models import QWEN3_4B
    from flux2_core.pipeline import Flux2Pipeline

    pipe = Flux2Pipeline.from_files(demo_models_dir / "diffusion_models" / "flux-2-klein-4b.safetensors",
                                    demo_models_dir / "vae" / "flux2-vae.safetensors",
                                    demo_models_dir / "text_encoders" / QWEN3_4B.file, device="cpu",
                                    dtype=torch.float32)
    path = tmp_path / "klein_style.safetensors"
    save_file(kohya_file(random_factors(pipe.dit, seed=60), alpha=RANK), str(path))
    call = {"prompt": "a fox", "width": 32, "height": 32, "steps": 2, "seed": 1, "output_type": "latent"}
    base = pipe(**call)

    pipe.load_lora(path, 0.5)
    pipe.load_lora(path, 0.9)  # the same LoRA again: only its strength changes
    assert [strength for _, strength in pipe.loras] == [0.9]
    with_lora = pipe(**call)
    assert torch.equal(pipe(**call, loras=[]), base)

    pipe.unload_loras()
    with merge_loras(pipe.dit, [(path, 0.9)]):
        expected = pipe(**call)
    assert relative_error(with_lora, expected) <= 1e-5
    assert relative_error(with_lora, base) > 1e-2
    assert torch.equal(pipe(**call), base)


def test_diffusers_output_warns_of_the_layers_comfyui_skips(dit, tmp_path, caplog):
    """Real ComfyUI (0.12.1) maps FLUX.2's diffusers names of the blocks, embedders and final layer, but not those
    of the timestep / guidance embedders nor of the shared modulations ("lora key not loaded"); the comfyui and
    kohya formats load whole there (scripts/check_in_comfyui.sh)."""
    skipped = ["double_stream_modulation_img.lin", "guidance_in.out_layer", "single_stream_modulation.lin",
               "time_in.in_layer"]
    read = ["double_blocks.0.img_attn.qkv", "final_layer.adaLN_modulation.1", "img_in", "single_blocks.0.linear1"]
    lora = lora_from_state_dict(kohya_file(random_factors(dit, seed=31, modules=skipped + read), alpha=1.0),
                                name="mixed")
    with caplog.at_level(logging.WARNING, logger="flux2_core.lora.convert"):
        for fmt in FORMATS:
            save_lora(lora, tmp_path / f"mixed-{fmt}.safetensors", fmt)
    [warning] = [record.getMessage() for record in caplog.records]
    assert warning.startswith(f"mixed: ComfyUI does not read the diffusers names of {', '.join(skipped)} (")

    caplog.clear()
    blocks_only = lora_from_state_dict(kohya_file(random_factors(dit, seed=32, modules=read), alpha=1.0))
    with caplog.at_level(logging.WARNING, logger="flux2_core.lora.convert"):
        save_lora(blocks_only, tmp_path / "blocks.safetensors", "diffusers")
    assert not caplog.records
