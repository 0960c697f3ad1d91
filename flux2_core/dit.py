"""The FLUX.2 diffusion transformer, with the parameter names of the official (BFL) checkpoints.

Every linear layer is a plain bias-free `nn.Linear`, so fp8 storage (`checkpoints.quant.Fp8Linear`) can replace
it in place and LoRA forward hooks can attach to it. Blocks hold no modulation weights: three model-wide
modulation linears turn the timestep vector into (shift, scale, gate) sets shared by every block.

Activations are computed in the dtype of the parameters that storage formats never touch (the QK-norm scales);
QK RMSNorm, RoPE and the timestep sinusoid are computed in fp32.

Reference K/V cache (klein 9B KV): `cache_reference_kv` runs the reference tokens on their own, as clean images
(timestep 0) that attend only to each other, and keeps their keys and values at every block. Since nothing else
flows into them, they are the same at every step: `forward(..., reference_kv=cache)` lets the text and image
tokens attend to [txt, img, cached references] without running the reference tokens again.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import attention
from .errors import Flux2Error, IncompatibleModelsError
from .model_patches import ComfyFluxParams, block_options, has_attention_patches, patched_attention
from . import progress
from .progress import check_interrupt
from .variants import TIMESTEP_EMBED_DIM, VARIANTS, DiTConfig

EPS = 1e-6
TIME_FACTOR = 1000.0  # timesteps and guidance arrive as sigma in [0, 1]; the embedding sees 1000 * sigma
MAX_PERIOD = 10000.0

DeviceLike = torch.device | str | None


def timestep_embedding(t: Tensor, dim: int = TIMESTEP_EMBED_DIM) -> Tensor:
    """[B] values in [0, 1] -> [B, dim] fp32 sinusoid of 1000 * t, cosine half first."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * TIME_FACTOR)[:, None] * freqs[None]
    return torch.cat((torch.cos(args), torch.sin(args)), dim=-1)


def rope_rotations(ids: Tensor, axes_dim: tuple[int, ...], theta: float) -> Tensor:
    """Position ids [B, N, axes] -> rotations [B, N, 1, head_dim / 2, 2] holding (cos, sin) in fp32.

    Each axis owns a contiguous run of head dims and rotates adjacent pairs (2j, 2j + 1) by pos * theta^(-2j/dim).
    Real cos/sin rather than complex numbers: torch.compile's inductor generates no code for complex ops.
    """
    if ids.shape[-1] != len(axes_dim):
        raise Flux2Error(f"position ids: expected {len(axes_dim)} axes (t, h, w, l) in the last dim, found {ids.shape[-1]}")
    # Positions reach the hundreds, where fp32 angles would be off by ~1e-5 rad; MPS has no fp64.
    angle_dtype = torch.float32 if ids.device.type == "mps" else torch.float64
    angles = torch.cat(
        [
            ids[..., axis, None].to(angle_dtype)
            * theta ** (-torch.arange(0, dim, 2, dtype=angle_dtype, device=ids.device) / dim)
            for axis, dim in enumerate(axes_dim)
        ],
        dim=-1,
    )
    return torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1).to(torch.float32).unsqueeze(2)


def apply_rope(x: Tensor, rotations: Tensor) -> Tensor:
    """x [B, L, heads, head_dim] -> same dtype, adjacent pairs (a, b) rotated: (a cos - b sin, a sin + b cos).

    Under torch.compile the real form, which inductor fuses into one kernel. In eager mode the same product as
    one complex multiply over views of the same memory: the real form costs six elementwise passes over q and k
    in fp32, and that made a klein-4B forward 11% slower on an H200 (80.8 ms against 72.6 ms complex)."""
    pairs = x.unflatten(-1, (-1, 2))
    if not torch.compiler.is_compiling() and x.dtype == rotations.dtype == torch.float32:
        return torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(rotations)).flatten(-2)
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = rotations[..., 0], rotations[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


def modulate(x: Tensor, shift: Tensor, scale_plus_one: Tensor) -> Tensor:
    return torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], eps=EPS), scale_plus_one)


def swiglu(x: Tensor) -> Tensor:
    gate, value = x.chunk(2, dim=-1)
    return F.silu(gate) * value


class SwiGLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x)


class ModulationSet(NamedTuple):
    """One (shift, scale, gate) set, each [B, 1, H]; the scale is stored as 1 + scale since that is what is used."""

    shift: Tensor
    scale_plus_one: Tensor
    gate: Tensor

    def modulate(self, x: Tensor) -> Tensor:
        return modulate(x, self.shift, self.scale_plus_one)

    def add_gated(self, residual: Tensor, update: Tensor) -> Tensor:
        return torch.addcmul(residual, self.gate, update)


class Modulation(nn.Module):
    def __init__(self, hidden_size: int, num_sets: int, device: DeviceLike = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.lin = nn.Linear(hidden_size, 3 * num_sets * hidden_size, bias=False, device=device, dtype=dtype)

    def forward(self, vec: Tensor) -> tuple[ModulationSet, ...]:
        chunks = self.lin(F.silu(vec))[:, None, :].chunk(self.lin.out_features // self.lin.in_features, dim=-1)
        return tuple(
            ModulationSet(shift, 1 + scale, gate) for shift, scale, gate in zip(chunks[0::3], chunks[1::3], chunks[2::3])
        )


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_size: int, device: DeviceLike = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_size, bias=False, device=device, dtype=dtype)
        self.out_layer = nn.Linear(hidden_size, hidden_size, bias=False, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, device: DeviceLike = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        """Any dtype in, fp32 out: the result goes straight into RoPE, which is also applied in fp32."""
        return F.rms_norm(x.float(), self.scale.shape, self.scale.float(), EPS)


class QKNorm(nn.Module):
    def __init__(self, head_dim: int, device: DeviceLike = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.query_norm = RMSNorm(head_dim, device=device, dtype=dtype)
        self.key_norm = RMSNorm(head_dim, device=device, dtype=dtype)

    def forward(self, qkv: Tensor, rotations: Tensor) -> tuple[Tensor, Tensor]:
        """qkv [B, L, 3, heads, head_dim] -> normalized and rotated q, k [B, L, heads, head_dim] in qkv's dtype.

        Norm and rotation run in fp32 on one upcast copy and round once at the end (a bf16 RoPE would lose
        ~3 bits on the rotated pairs; the parity tests hold at fp32 precision)."""
        q = apply_rope(self.query_norm(qkv[:, :, 0]), rotations).to(qkv.dtype)
        k = apply_rope(self.key_norm(qkv[:, :, 1]), rotations).to(qkv.dtype)
        return q, k


class KV(NamedTuple):
    """Keys and values of some tokens at one block, each [B, L, heads, head_dim]; keys after QK norm and RoPE."""

    keys: Tensor
    values: Tensor

    def for_batch(self, batch: int) -> KV:
        """Batch 1 is broadcast (a view); a batch dividing `batch` is tiled, as the CFG passes tile theirs."""
        have = self.keys.shape[0]
        if have == batch:
            return self
        if have == 1:
            return KV(self.keys.expand(batch, -1, -1, -1), self.values.expand(batch, -1, -1, -1))
        if batch % have:
            raise Flux2Error(f"reference K/V cache: built for batch {have}, which does not divide batch {batch}")
        return KV(self.keys.repeat(batch // have, 1, 1, 1), self.values.repeat(batch // have, 1, 1, 1))


@dataclass(frozen=True)
class ReferenceKVCache:
    """The reference tokens' keys and values at every block, from `Flux2DiT.cache_reference_kv`.

    Made once per sampling call and owned by it: the DiT keeps no reference to it, so it is freed with the call.
    """

    double: tuple[KV, ...]
    single: tuple[KV, ...]


def split_heads(qkv: Tensor, head_dim: int) -> Tensor:
    """[B, L, 3 * H] laid out [q | k | v], heads major -> [B, L, 3, heads, head_dim] (a view)."""
    return qkv.unflatten(-1, (3, -1, head_dim))


def joint_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q, k, v [B, L, heads, head_dim] -> [B, L, heads * head_dim]."""
    return attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))


class SelfAttention(nn.Module):
    def __init__(self, hidden_size: int, head_dim: int, device: DeviceLike = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False, device=device, dtype=dtype)
        self.norm = QKNorm(head_dim, device=device, dtype=dtype)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=False, device=device, dtype=dtype)

    def qkv_heads(self, x: Tensor) -> Tensor:
        return split_heads(self.qkv(x), self.norm.query_norm.scale.shape[0])


def add_attention_and_mlp(x: Tensor, attn_out: Tensor, proj: nn.Module, mlp: nn.Module,
                          mods: tuple[ModulationSet, ModulationSet]) -> Tensor:
    """One double-block stream after attention: gated projection of the attention output, then the gated MLP."""
    attn_mod, mlp_mod = mods
    x = attn_mod.add_gated(x, proj(attn_out))
    return mlp_mod.add_gated(x, mlp(mlp_mod.modulate(x)))


def mlp(hidden_size: int, mlp_hidden: int, device: DeviceLike = None, dtype: torch.dtype | None = None) -> nn.Sequential:
    """Indices 0 and 2 are the BFL names of the two linears."""
    return nn.Sequential(
        nn.Linear(hidden_size, 2 * mlp_hidden, bias=False, device=device, dtype=dtype),
        SwiGLU(),
        nn.Linear(mlp_hidden, hidden_size, bias=False, device=device, dtype=dtype),
    )


class DoubleStreamBlock(nn.Module):
    """Separate weights for the image and text streams, one attention over [txt, img]."""

    def __init__(self, hidden_size: int, head_dim: int, mlp_hidden: int, device: DeviceLike = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.img_attn = SelfAttention(hidden_size, head_dim, device=device, dtype=dtype)
        self.img_mlp = mlp(hidden_size, mlp_hidden, device=device, dtype=dtype)
        self.txt_attn = SelfAttention(hidden_size, head_dim, device=device, dtype=dtype)
        self.txt_mlp = mlp(hidden_size, mlp_hidden, device=device, dtype=dtype)

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        rotations: Tensor,
        img_mod: tuple[ModulationSet, ModulationSet],
        txt_mod: tuple[ModulationSet, ModulationSet],
        reference_kv: KV | None = None,
        transformer_options: dict | None = None,
    ) -> tuple[Tensor, Tensor]:
        """`reference_kv`: cached reference keys/values that text and image tokens also attend to.
        `transformer_options`: ComfyUI attention patches to run (model_patches.patched_attention)."""
        txt_len, joint_len = txt.shape[1], txt.shape[1] + img.shape[1]
        img_qkv = self.img_attn.qkv_heads(img_mod[0].modulate(img))
        txt_qkv = self.txt_attn.qkv_heads(txt_mod[0].modulate(txt))
        if transformer_options is not None:
            # Patches see q and k before RoPE: the patched path normalizes here and rotates after them.
            norms = (self.txt_attn.norm, self.img_attn.norm)
            q = torch.cat([norm.query_norm(qkv[:, :, 0]) for norm, qkv in zip(norms, (txt_qkv, img_qkv))], dim=1)
            k = torch.cat([norm.key_norm(qkv[:, :, 1]) for norm, qkv in zip(norms, (txt_qkv, img_qkv))], dim=1)
            v = torch.cat((txt_qkv[:, :, 2], img_qkv[:, :, 2]), dim=1)
            out = patched_attention(q, k, v, rotations, txt_len, transformer_options, apply_rope, img_qkv.dtype)
            img = add_attention_and_mlp(img, out[:, txt_len:], self.img_attn.proj, self.img_mlp, img_mod)
            txt = add_attention_and_mlp(txt, out[:, :txt_len], self.txt_attn.proj, self.txt_mlp, txt_mod)
            return img, txt

        # The q and k of each stream are written straight into the joint [txt, img, ref] buffers: no extra concat.
        cached_len = 0 if reference_kv is None else reference_kv.keys.shape[1]
        heads = img_qkv.shape[3:]
        q = img_qkv.new_empty((img.shape[0], joint_len, *heads))
        k = img_qkv.new_empty((img.shape[0], joint_len + cached_len, *heads))
        q[:, :txt_len], k[:, :txt_len] = self.txt_attn.norm(txt_qkv, rotations[:, :txt_len])
        q[:, txt_len:], k[:, txt_len:joint_len] = self.img_attn.norm(img_qkv, rotations[:, txt_len:])
        values = [txt_qkv[:, :, 2], img_qkv[:, :, 2]]
        if reference_kv is not None:
            k[:, joint_len:] = reference_kv.keys
            values.append(reference_kv.values)
        out = joint_attention(q, k, torch.cat(values, dim=1))

        img = add_attention_and_mlp(img, out[:, txt_len:], self.img_attn.proj, self.img_mlp, img_mod)
        txt = add_attention_and_mlp(txt, out[:, :txt_len], self.txt_attn.proj, self.txt_mlp, txt_mod)
        return img, txt

    def reference_forward(
        self, ref: Tensor, rotations: Tensor, ref_mod: tuple[ModulationSet, ModulationSet]
    ) -> tuple[Tensor, KV]:
        """Reference tokens alone in the image stream, attending only to each other -> (new ref, their K/V)."""
        qkv = self.img_attn.qkv_heads(ref_mod[0].modulate(ref))
        q, k = self.img_attn.norm(qkv, rotations)
        # contiguous(): the cached values must not keep the whole qkv output alive.
        kv = KV(k, qkv[:, :, 2].contiguous())
        out = joint_attention(q, kv.keys, kv.values)
        return add_attention_and_mlp(ref, out, self.img_attn.proj, self.img_mlp, ref_mod), kv


class SingleStreamBlock(nn.Module):
    """Attention and MLP in parallel on [txt, img]: linear1 makes [qkv | mlp in], linear2 takes [attn | mlp out]."""

    def __init__(self, hidden_size: int, head_dim: int, mlp_hidden: int, device: DeviceLike = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + 2 * mlp_hidden, bias=False, device=device, dtype=dtype)
        self.linear2 = nn.Linear(hidden_size + mlp_hidden, hidden_size, bias=False, device=device, dtype=dtype)
        self.norm = QKNorm(head_dim, device=device, dtype=dtype)

    def forward(self, x: Tensor, rotations: Tensor, mod: ModulationSet, reference_kv: KV | None = None,
                transformer_options: dict | None = None) -> Tensor:
        """`reference_kv`: cached reference keys/values that every token of `x` also attends to.
        `transformer_options`: ComfyUI attention patches to run (model_patches.patched_attention), with the
        text token count in its "img_slice"."""
        if transformer_options is not None:
            qkv, mlp_in = self._qkv_and_mlp_in(x, mod)
            q, k = self.norm.query_norm(qkv[:, :, 0]), self.norm.key_norm(qkv[:, :, 1])
            attn = patched_attention(q, k, qkv[:, :, 2], rotations, transformer_options["img_slice"][0],
                                     transformer_options, apply_rope, qkv.dtype)
            return self._output(x, attn, mlp_in, mod)
        q, kv, mlp_in = self._attention_inputs(x, rotations, mod)
        if reference_kv is not None:
            kv = KV(torch.cat((kv.keys, reference_kv.keys), dim=1), torch.cat((kv.values, reference_kv.values), dim=1))
        return self._output(x, joint_attention(q, *kv), mlp_in, mod)

    def reference_forward(self, ref: Tensor, rotations: Tensor, mod: ModulationSet) -> tuple[Tensor, KV]:
        """Reference tokens alone, attending only to each other -> (new ref, their K/V)."""
        q, kv, mlp_in = self._attention_inputs(ref, rotations, mod)
        # contiguous(): the cached values must not keep the whole linear1 output alive.
        kv = KV(kv.keys, kv.values.contiguous())
        return self._output(ref, joint_attention(q, *kv), mlp_in, mod), kv

    def _attention_inputs(self, x: Tensor, rotations: Tensor, mod: ModulationSet) -> tuple[Tensor, KV, Tensor]:
        """-> q, (k, v) in the activation dtype, and the MLP input."""
        qkv, mlp_in = self._qkv_and_mlp_in(x, mod)
        q, k = self.norm(qkv, rotations)
        return q, KV(k, qkv[:, :, 2]), mlp_in

    def _qkv_and_mlp_in(self, x: Tensor, mod: ModulationSet) -> tuple[Tensor, Tensor]:
        """-> qkv [B, L, 3, heads, head_dim] and the MLP input."""
        qkv_width = 3 * x.shape[-1]
        qkv, mlp_in = self.linear1(mod.modulate(x)).split((qkv_width, self.linear1.out_features - qkv_width), dim=-1)
        return split_heads(qkv, self.norm.query_norm.scale.shape[0]), mlp_in

    def _output(self, x: Tensor, attn_out: Tensor, mlp_in: Tensor, mod: ModulationSet) -> Tensor:
        return mod.add_gated(x, self.linear2(torch.cat((attn_out, swiglu(mlp_in)), dim=-1)))


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int, device: DeviceLike = None, dtype: torch.dtype | None = None):
        super().__init__()
        # Index 1 is the BFL name; rows are [shift ; scale].
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=False, device=device, dtype=dtype)
        )
        self.linear = nn.Linear(hidden_size, out_channels, bias=False, device=device, dtype=dtype)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(x, shift, 1 + scale))


_compile_by_default = False


def set_compile_by_default(enabled: bool) -> None:
    """Make `load_dit` compile the blocks of every DiT it loads unless told otherwise (`flux2 --compile`)."""
    global _compile_by_default
    _compile_by_default = bool(enabled)


def compile_by_default() -> bool:
    return _compile_by_default


class Flux2DiT(nn.Module):
    compiled = False

    def __init__(self, config: DiTConfig, device: DeviceLike = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        hidden, head_dim, mlp_hidden = config.hidden_size, config.head_dim, config.mlp_hidden
        factory = {"device": device, "dtype": dtype}

        self.img_in = nn.Linear(config.in_channels, hidden, bias=False, **factory)
        self.txt_in = nn.Linear(config.context_dim, hidden, bias=False, **factory)
        self.time_in = MLPEmbedder(TIMESTEP_EMBED_DIM, hidden, **factory)
        self.guidance_in = MLPEmbedder(TIMESTEP_EMBED_DIM, hidden, **factory) if config.guidance_embed else None
        self.double_stream_modulation_img = Modulation(hidden, 2, **factory)
        self.double_stream_modulation_txt = Modulation(hidden, 2, **factory)
        self.single_stream_modulation = Modulation(hidden, 1, **factory)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(hidden, head_dim, mlp_hidden, **factory) for _ in range(config.depth_double)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(hidden, head_dim, mlp_hidden, **factory) for _ in range(config.depth_single)
        )
        self.final_layer = LastLayer(hidden, config.in_channels, **factory)

    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        """The double then the single blocks with their name prefixes, in the order `forward` runs them."""
        return ([(f"double_blocks.{i}.", block) for i, block in enumerate(self.double_blocks)]
                + [(f"single_blocks.{i}.", block) for i, block in enumerate(self.single_blocks)])

    def compile_blocks(self, **options: object) -> Flux2DiT:
        """Regional compile: every block's `forward` goes through `torch.compile(**options)`. Blocks of one class
        share the compiled code (parameters are graph inputs), so compiling costs two block graphs, not one per
        block; hooks (block streaming, LoRA, interrupt checks) stay eager around the compiled forwards. Opt-in:
        the first call compiles (~30 s for klein-4B on an H200; minutes on a small CPU)."""
        for _, block in self.named_blocks():
            block.forward = torch.compile(block.forward, **options)
        self.compiled = True
        return self

    def uncompile_blocks(self) -> Flux2DiT:
        """Back to eager blocks (the compiled code stays in torch's cache: compiling again is quick)."""
        for _, block in self.named_blocks():
            block.__dict__.pop("forward", None)
        self.compiled = False
        return self

    @contextlib.contextmanager
    def blocks_compiled(self) -> Iterator[Flux2DiT]:
        """`compile_blocks` for the duration (a no-op when the blocks already are compiled)."""
        if self.compiled:
            yield self
            return
        self.compile_blocks()
        try:
            yield self
        finally:
            self.uncompile_blocks()

    @property
    def params(self) -> ComfyFluxParams:
        """The sizes under ComfyUI's names (`model.model.diffusion_model.params` in ComfyUI node packs)."""
        variant = VARIANTS.get(getattr(self, "variant", None))
        return ComfyFluxParams.from_config(self.config, variant is not None and variant.reference_kv_cache)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The QK-norm scales are never stored in fp8, so their dtype is the one activations are computed in."""
        return next(module.scale.dtype for module in self.modules() if isinstance(module, RMSNorm))

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        guidance: Tensor | None = None,
        reference_kv: ReferenceKVCache | None = None,
        transformer_options: dict | None = None,
    ) -> Tensor:
        """img [B, L, 128] (generated and reference tokens), txt [B, T, context_dim], ids [B, *, 4] (t, h, w, l),
        timesteps [B] sigma in [0, 1], guidance [B] (dev only; ignored by klein) -> [B, L, 128].

        reference_kv: references from `cache_reference_kv` (batch 1 or dividing B), which text and image tokens
        attend to at every block; such references are not part of `img`.
        transformer_options: ComfyUI's transformer_options (model_patches); its attention patches run in every
        block. Without any, the blocks run their unpatched code.
        """
        self._check_inputs(img, txt, guidance)
        batch = img.shape[0]
        double_kv, single_kv = self._reference_kv_per_block(reference_kv, batch)
        if not has_attention_patches(transformer_options):
            transformer_options = None
        elif reference_kv is not None:
            raise Flux2Error("attention patches (attn1_patch / attn1_output_patch) with the reference K/V cache: the "
                             "cached references are not among the patched tokens; sample without the cache")
        per_pass = self._batch_per_pass(img, txt, double_kv[0] if double_kv else None)
        if per_pass >= batch:
            return self._forward(img, img_ids, txt, txt_ids, timesteps, guidance, double_kv, single_kv,
                                 transformer_options)

        # A huge batch on a CPU: one block over all of it runs for seconds, so it goes through the blocks in
        # sub-batches, each with the checks between blocks. Batch-1 inputs (ids) are shared by every part.
        def part(tensor: Tensor | None, rows: slice) -> Tensor | None:
            return tensor[rows] if tensor is not None and tensor.dim() > 0 and tensor.shape[0] == batch else tensor

        def part_kv(kvs: list[KV | None], rows: slice) -> list[KV | None]:
            return [kv if kv is None else KV(kv.keys[rows], kv.values[rows]) for kv in kvs]

        outputs = []
        for start in range(0, batch, per_pass):
            rows = slice(start, start + per_pass)
            outputs.append(self._forward(*(part(t, rows) for t in (img, img_ids, txt, txt_ids, timesteps, guidance)),
                                         part_kv(double_kv, rows), part_kv(single_kv, rows), transformer_options))
        return torch.cat(outputs)

    def _batch_per_pass(self, img: Tensor, txt: Tensor, reference: KV | None) -> int:
        """Samples per pass through the blocks so that one block's multiply-adds stay within
        `progress.macs_between_checks` (the whole batch where there is no limit, or one sample exceeds it)."""
        budget = progress.macs_between_checks(img.device)
        if budget is None:
            return img.shape[0]
        hidden, mlp_hidden = self.config.hidden_size, self.config.mlp_hidden
        tokens = img.shape[1] + txt.shape[1]
        attended = tokens + (0 if reference is None else reference.keys.shape[1])
        # Projections (q, k, v, out: 4 h^2), the gated MLP (3 h * mlp) and attention (scores and values: 2 h per key).
        per_sample = tokens * (4 * hidden * hidden + 3 * hidden * mlp_hidden + 2 * attended * hidden)
        return max(1, budget // per_sample)

    def _forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor,
                 guidance: Tensor | None, double_kv: list[KV | None], single_kv: list[KV | None],
                 transformer_options: dict | None = None) -> Tensor:
        dtype = self.compute_dtype
        vec = self._time_vector(timesteps, guidance)
        img_mod = self.double_stream_modulation_img(vec)
        txt_mod = self.double_stream_modulation_txt(vec)
        (single_mod,) = self.single_stream_modulation(vec)
        rotations = rope_rotations(torch.cat((txt_ids, img_ids), dim=1), self.config.axes_dim, self.config.rope_theta)

        img = self.img_in(img.to(dtype))
        txt = self.txt_in(txt.to(dtype))
        # Between blocks, a stop request (the server's /interrupt) ends the call within one block's time.
        if transformer_options is not None:
            # A copy per call that the loops below update in place, as ComfyUI's FLUX forward does.
            transformer_options = dict(transformer_options)
        for index, (block, kv) in enumerate(zip(self.double_blocks, double_kv)):
            check_interrupt()
            if transformer_options is None:
                img, txt = block(img, txt, rotations, img_mod, txt_mod, kv)
            else:
                block_options(transformer_options, "double", index, len(self.double_blocks))
                img, txt = block(img, txt, rotations, img_mod, txt_mod, kv, transformer_options)

        txt_len = txt.shape[1]
        x = torch.cat((txt, img), dim=1)
        if transformer_options is not None:
            transformer_options["img_slice"] = [txt_len, x.shape[1]]
        for index, (block, kv) in enumerate(zip(self.single_blocks, single_kv)):
            check_interrupt()
            if transformer_options is None:
                x = block(x, rotations, single_mod, kv)
            else:
                block_options(transformer_options, "single", index, len(self.single_blocks))
                x = block(x, rotations, single_mod, kv, transformer_options)
        return self.final_layer(x[:, txt_len:], vec)

    def cache_reference_kv(self, ref: Tensor, ref_ids: Tensor, guidance: Tensor | None = None) -> ReferenceKVCache:
        """ref [B, R, 128] reference tokens, ref_ids [B, R, 4], guidance [B] (dev only) -> their keys and values
        at every block, for `forward(..., reference_kv=...)`.

        As klein 9B KV was trained: references are clean images (timestep 0 modulation) that attend only to each
        other. Nothing from the text or the generated image reaches them, so one pass serves every step.
        """
        self._check_inputs(ref, None, guidance)
        vec = self._time_vector(torch.zeros(ref.shape[0], device=ref.device), guidance)
        double_mod = self.double_stream_modulation_img(vec)
        (single_mod,) = self.single_stream_modulation(vec)
        rotations = rope_rotations(ref_ids, self.config.axes_dim, self.config.rope_theta)

        x = self.img_in(ref.to(self.compute_dtype))
        double, single = [], []
        for block in self.double_blocks:
            x, kv = block.reference_forward(x, rotations, double_mod)
            double.append(kv)
        for block in self.single_blocks:
            x, kv = block.reference_forward(x, rotations, single_mod)
            single.append(kv)
        return ReferenceKVCache(tuple(double), tuple(single))

    def _time_vector(self, timesteps: Tensor, guidance: Tensor | None) -> Tensor:
        dtype = self.compute_dtype
        vec = self.time_in(timestep_embedding(timesteps).to(dtype))
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance).to(dtype))
        return vec

    def _reference_kv_per_block(
        self, cache: ReferenceKVCache | None, batch: int
    ) -> tuple[list[KV | None], list[KV | None]]:
        if cache is None:
            return [None] * len(self.double_blocks), [None] * len(self.single_blocks)
        if (len(cache.double), len(cache.single)) != (len(self.double_blocks), len(self.single_blocks)):
            raise Flux2Error(
                f"reference K/V cache: expected {len(self.double_blocks)} double + {len(self.single_blocks)} single "
                f"blocks' entries, found {len(cache.double)} + {len(cache.single)} (made by another DiT)")
        return [kv.for_batch(batch) for kv in cache.double], [kv.for_batch(batch) for kv in cache.single]

    def _check_inputs(self, img: Tensor, txt: Tensor | None, guidance: Tensor | None) -> None:
        if img.shape[-1] != self.config.in_channels:
            raise Flux2Error(
                f"DiT image input: expected {self.config.in_channels} channels (packed 2x2 latent), found {img.shape[-1]}"
            )
        if txt is not None and txt.shape[-1] != self.config.context_dim:
            raise IncompatibleModelsError(
                f"text conditioning is {txt.shape[-1]} wide but this DiT's txt_in expects {self.config.context_dim}: "
                "the text encoder does not belong to this DiT"
            )
        if self.guidance_in is not None and guidance is None:
            raise Flux2Error("this DiT embeds guidance (FLUX.2-dev): expected a guidance tensor [B], found None")
