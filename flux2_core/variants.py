"""The one table of FLUX.2 variant facts: DiT sizes read from tensor shapes, and per-variant sampling defaults.

Base and distilled klein share one architecture, so shapes tell the size (and dev from klein), while only a
file name or metadata tells base from distilled.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import CheckpointError

# The sinusoidal timestep embedding width is fixed by the architecture (time_in.in_layer takes 256 features).
TIMESTEP_EMBED_DIM = 256


@dataclass(frozen=True)
class DiTConfig:
    hidden_size: int
    num_heads: int
    depth_double: int
    depth_single: int
    context_dim: int
    guidance_embed: bool
    in_channels: int = 128
    head_dim: int = 128
    mlp_ratio: float = 3.0
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)
    rope_theta: float = 2000.0

    def __post_init__(self) -> None:
        if self.num_heads * self.head_dim != self.hidden_size:
            raise ValueError(
                f"DiTConfig: num_heads * head_dim must equal hidden_size, found "
                f"{self.num_heads} * {self.head_dim} != {self.hidden_size}"
            )
        if self.depth_double + self.depth_single < 1:
            raise ValueError("DiTConfig: expected at least one double or single block, found none")
        if sum(self.axes_dim) != self.head_dim or any(d % 2 for d in self.axes_dim):
            raise ValueError(
                f"DiTConfig: axes_dim must be even sizes summing to head_dim {self.head_dim}, found {self.axes_dim}"
            )

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]]) -> DiTConfig:
        """Read every size from BFL-named tensor shapes (checkpoint prefix already stripped)."""
        required = ("img_in.weight", "txt_in.weight", "time_in.in_layer.weight")
        missing = [name for name in required if name not in shapes]
        if missing:
            hint = ""
            if "x_embedder.weight" in shapes:
                hint = " (the names look like diffusers naming: convert them with checkpoints.dit_keys.diffusers_to_bfl)"
            raise CheckpointError(
                f"not a FLUX.2 DiT state dict: expected BFL tensors {list(required)}, missing {missing}{hint}"
            )

        def shape(name: str) -> tuple[int, ...]:
            if name not in shapes:
                raise CheckpointError(f"incomplete FLUX.2 DiT state dict: expected tensor {name!r}, found it missing")
            return tuple(shapes[name])

        hidden_size, in_channels = shape("img_in.weight")
        context_dim = shape("txt_in.weight")[1]
        timestep_dim = shape("time_in.in_layer.weight")[1]
        if timestep_dim != TIMESTEP_EMBED_DIM:
            raise CheckpointError(
                f"time_in.in_layer.weight: expected {TIMESTEP_EMBED_DIM} input features, found {timestep_dim}"
            )

        depth_double = _count_blocks(shapes, "double_blocks.")
        depth_single = _count_blocks(shapes, "single_blocks.")
        if depth_double:
            head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
            mlp_hidden = shape("double_blocks.0.img_mlp.2.weight")[1]
        elif depth_single:
            head_dim = shape("single_blocks.0.norm.query_norm.scale")[0]
            # linear1 packs [3H qkv | 2 * mlp_hidden gate-and-value]
            mlp_hidden = (shape("single_blocks.0.linear1.weight")[0] - 3 * hidden_size) // 2
        else:
            raise CheckpointError("not a FLUX.2 DiT state dict: expected double_blocks.* or single_blocks.*, found neither")
        if hidden_size % head_dim or head_dim % 8:
            raise CheckpointError(
                f"query_norm.scale: expected a head size dividing hidden size {hidden_size} and a multiple of 8, "
                f"found {head_dim}"
            )

        return cls(
            hidden_size=hidden_size,
            num_heads=hidden_size // head_dim,
            depth_double=depth_double,
            depth_single=depth_single,
            context_dim=context_dim,
            guidance_embed="guidance_in.in_layer.weight" in shapes,
            in_channels=in_channels,
            head_dim=head_dim,
            mlp_ratio=mlp_hidden / hidden_size,
            # Four equal RoPE axes (t, h, w, l): 32 each for the real head size of 128.
            axes_dim=(head_dim // 4,) * 4,
        )


def _count_blocks(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> int:
    indices = {int(name[len(prefix):].split(".", 1)[0]) for name in shapes if name.startswith(prefix)}
    if indices != set(range(len(indices))):
        raise CheckpointError(f"{prefix}*: expected consecutive block indices from 0, found {sorted(indices)}")
    return len(indices)


FULL_SIZE_DIT = {
    "dev": DiTConfig(hidden_size=6144, num_heads=48, depth_double=8, depth_single=48, context_dim=15360,
                     guidance_embed=True),
    "klein-9b": DiTConfig(hidden_size=4096, num_heads=32, depth_double=8, depth_single=24, context_dim=12288,
                          guidance_embed=False),
    "klein-4b": DiTConfig(hidden_size=3072, num_heads=24, depth_double=5, depth_single=20, context_dim=7680,
                          guidance_embed=False),
}


@dataclass(frozen=True)
class VariantDefaults:
    name: str
    family: str  # the FULL_SIZE_DIT key of the architecture
    steps: int
    guidance: float | None  # embedded guidance (dev only); None where the DiT has no guidance input
    cfg: float  # real classifier-free guidance; 1.0 means a single forward per step
    # Trained to see references as clean images (timestep 0) attending only to each other, so their keys and
    # values are computed once per sampling call and reused at every step (klein 9B KV).
    reference_kv_cache: bool = False


VARIANTS = {
    "flux2-dev": VariantDefaults("flux2-dev", "dev", steps=50, guidance=4.0, cfg=1.0),
    "klein-4b": VariantDefaults("klein-4b", "klein-4b", steps=4, guidance=None, cfg=1.0),
    "klein-9b": VariantDefaults("klein-9b", "klein-9b", steps=4, guidance=None, cfg=1.0),
    "klein-base-4b": VariantDefaults("klein-base-4b", "klein-4b", steps=50, guidance=None, cfg=4.0),
    "klein-base-9b": VariantDefaults("klein-base-9b", "klein-9b", steps=50, guidance=None, cfg=4.0),
    "klein-9b-kv": VariantDefaults("klein-9b-kv", "klein-9b", steps=4, guidance=None, cfg=1.0,
                                   reference_kv_cache=True),
}

_KLEIN_SIZE_BY_WIDTH = {FULL_SIZE_DIT["klein-4b"].hidden_size: "4b", FULL_SIZE_DIT["klein-9b"].hidden_size: "9b"}
# "base" as a word of its own: matches "klein-base-4b" and "klein_base" but not "database".
_BASE_WORD = re.compile(r"(?<![a-z])base(?![a-z])")
# "kv" likewise: "flux-2-klein-9b-kv-fp8" but not "kvasir". Only the 9B has a KV release.
_KV_WORD = re.compile(r"(?<![a-z])kv(?![a-z])")
# Only metadata that names the model counts: descriptions may say "distilled from the base model".
_NAMING_METADATA = ("title", "name", "architecture", "variant")


def guess_variant(config: DiTConfig, name_hint: str = "", metadata: Mapping[str, str] | None = None) -> str:
    """The VARIANTS key for a DiT: dev by its guidance embedding, klein size by width, base or KV by name or
    metadata."""
    if config.guidance_embed:
        return "flux2-dev"
    hint = name_hint.lower()
    # Tiny test models have other widths: let the name decide, else use the 4B defaults.
    size = _KLEIN_SIZE_BY_WIDTH.get(config.hidden_size, "9b" if "9b" in hint else "4b")
    described_as = [hint] + [
        str(value).lower() for key, value in (metadata or {}).items()
        if any(word in key.lower() for word in _NAMING_METADATA)
    ]
    if size == "9b" and any(_KV_WORD.search(text) for text in described_as):
        return "klein-9b-kv"
    is_base = any(_BASE_WORD.search(text) for text in described_as)
    return f"klein-base-{size}" if is_base else f"klein-{size}"
