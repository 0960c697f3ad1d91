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
    ids = torch.stack((torch.randint(0, 11, (300,), generator=generator), torch.randint(0, 128, (300,), generator=generator),
                       torch.randint(0, 128, (300,), generator=generator), torch.randint(0, 512, (300,), generator=generator)),
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
