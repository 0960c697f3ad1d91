"""Real-valued RoPE against the complex-number formula it replaced, and the DiT's between-block interrupt."""

from __future__ import annotations

import pytest
import torch
from tiny_models import dit_config

from flux2_core.demo_models import random_dit
from flux2_core.dit import apply_rope, rope_rotations
from flux2_core.errors import Interrupted
from flux2_core.progress import clear_interrupt, request_interrupt
from flux2_core.variants import FULL_SIZE_DIT


def complex_rope(x: torch.Tensor, ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float) -> torch.Tensor:
    """The reference formula: pairs as complex numbers times unit rotations exp(i * pos * theta^(-2j/dim))."""
    angles = torch.cat([ids[..., axis, None].double() * theta ** (-torch.arange(0, dim, 2).double() / dim)
                        for axis, dim in enumerate(axes_dim)], dim=-1)
    rotations = torch.polar(torch.ones_like(angles), angles).to(torch.complex64).unsqueeze(2)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * rotations).flatten(-2)


def test_real_rope_equals_complex_rope_at_full_size_positions():
    config = FULL_SIZE_DIT["klein-4b"]
    generator = torch.Generator().manual_seed(0)
    # Text positions up to 511 on the l axis, image positions up to 127 on h and w, references at t = 10.
    ids = torch.stack([torch.randint(0, top, (300,), generator=generator) for top in (11, 128, 128, 512)],
                      dim=-1)[None].float()
    x = torch.randn(1, 300, 3, config.head_dim, generator=generator)
    ours = apply_rope(x, rope_rotations(ids, config.axes_dim, config.rope_theta))
    reference = complex_rope(x, ids, config.axes_dim, config.rope_theta)
    assert ours.dtype == torch.float32 and ours.shape == x.shape
    torch.testing.assert_close(ours, reference, rtol=0, atol=2e-6)


def test_rope_keeps_no_complex_tensor():
    rotations = rope_rotations(torch.zeros(1, 5, 4), (32, 32, 32, 32), 2000.0)
    assert not rotations.is_complex() and rotations.shape == (1, 5, 1, 64, 2)


def test_interrupt_stops_the_dit_between_blocks():
    config = dit_config(False)
    model = random_dit(config, seed=0)
    calls = []
    # The flag is raised while the first double block runs: the next block must not start.
    model.double_blocks[0].register_forward_hook(lambda *_: (calls.append(0), request_interrupt()))
    model.double_blocks[1].register_forward_hook(lambda *_: calls.append(1))
    img, txt = torch.randn(1, 4, config.in_channels), torch.randn(1, 3, config.context_dim)
    try:
        with pytest.raises(Interrupted):
            model(img, torch.zeros(1, 4, 4), txt, torch.zeros(1, 3, 4), torch.tensor([0.5]))
    finally:
        clear_interrupt()
    assert calls == [0]


def compile_inputs(config):
    generator = torch.Generator().manual_seed(2)
    return (torch.randn(1, 6, config.in_channels, generator=generator), torch.rand(1, 6, 4, generator=generator) * 8,
            torch.randn(1, 4, config.context_dim, generator=generator), torch.rand(1, 4, 4, generator=generator) * 8)


def test_regional_compile_captures_one_graph_per_block_class_without_breaks():
    from torch._dynamo.utils import counters

    config = dit_config(True)
    model = random_dit(config, seed=0)
    img, img_ids, txt, txt_ids = compile_inputs(config)
    with torch.no_grad():
        eager = model(img, img_ids, txt, txt_ids, torch.tensor([0.5]), torch.tensor([4.0]))
        torch._dynamo.reset()
        counters.clear()
        # fullgraph: a graph break (e.g. a complex op, a Python-side check) would raise here.
        model.compile_blocks(backend="eager", fullgraph=True)
        compiled = model(img, img_ids, txt, txt_ids, torch.tensor([0.5]), torch.tensor([4.0]))
    assert counters["stats"]["unique_graphs"] == 2  # double and single block class, each compiled once
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@pytest.mark.slow
def test_inductor_compiled_blocks_match_eager():
    """The real thing (inductor generating C++ here); about 100 s on a 2-core CPU."""
    config = dit_config(False)
    model = random_dit(config, seed=0)
    img, img_ids, txt, txt_ids = compile_inputs(config)
    with torch.no_grad():
        eager = model(img, img_ids, txt, txt_ids, torch.tensor([0.5]))
        torch._dynamo.reset()
        compiled = model.compile_blocks()(img, img_ids, txt, txt_ids, torch.tensor([0.5]))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_compile_model_node_compiles_blocks_only_while_sampling():
    import custom_nodes_flux2

    from flux2_core.patched_model import PatchedModel

    model = PatchedModel(random_dit(dit_config(False), seed=0), "klein-4b")
    (patched,) = custom_nodes_flux2.NODE_CLASS_MAPPINGS["Flux2CompileModel"]().patch(model)
    assert custom_nodes_flux2.NODE_DISPLAY_NAME_MAPPINGS["Flux2CompileModel"] == "FLUX.2 Compile Model"
    block = patched.diffusion_model.single_blocks[0]
    with patched.patches_applied() as dit:
        assert dit.compiled and "forward" in vars(block)  # the torch.compile wrapper (compiles on first call)
    assert not patched.diffusion_model.compiled and "forward" not in vars(block)
    with model.patches_applied() as dit:  # the unpatched MODEL shares the DiT and stays eager
        assert not dit.compiled


def test_load_dit_compile_flag_and_process_default(tmp_path):
    from safetensors.torch import save_file

    from flux2_core.checkpoints.loaders import load_dit
    from flux2_core.dit import set_compile_by_default

    path = tmp_path / "dit.safetensors"
    save_file(random_dit(dit_config(False), seed=0).state_dict(), str(path))
    assert load_dit(path, device="cpu", compile=True).compiled
    assert not load_dit(path, device="cpu").compiled
    set_compile_by_default(True)
    try:
        assert load_dit(path, device="cpu").compiled and not load_dit(path, device="cpu", compile=False).compiled
    finally:
        set_compile_by_default(False)


def test_compile_flag_on_serve_and_run():
    from flux2_host.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["run", "w.json", "--compile"]).compile
    assert parser.parse_args(["serve", "--compile"]).compile
    assert not parser.parse_args(["run", "w.json"]).compile
