"""The FLUX.2 autoencoder with BFL parameter names, and the latent packing the DiT works on.

Pixels [B,3,H,W] in [-1,1] -> encoder mean [B,32,H/8,W/8] -> 2x2 patchify [B,128,H/16,W/16]
-> per-channel normalization with the stored batch-norm statistics. Decoding runs the same path backwards.
Layer layout follows the LDM autoencoder the official code uses: ResNet blocks with GroupNorm(32) + SiLU,
a single-head attention block in the middle, stride-2 convolutions down and nearest-neighbour upsampling up.
"""

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import CheckpointError
from . import progress
from .progress import check_interrupt

NORM_GROUPS = 32
GROUP_NORM_EPS = 1e-6
LATENT_NORM_EPS = 1e-4


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_multipliers: tuple[int, ...] = (1, 2, 4, 4)
    # Widths of decoder.up.{i}; the "small decoder" checkpoint is narrower than the encoder here.
    decoder_channels: tuple[int, ...] = (128, 256, 512, 512)
    encoder_blocks_per_level: int = 2
    decoder_blocks_per_level: int = 3
    z_channels: int = 32
    patch_size: int = 2

    @property
    def encoder_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_multipliers)

    @property
    def latent_channels(self) -> int:
        """Channels of the packed, normalized latent the DiT sees (128 for FLUX.2)."""
        return self.z_channels * self.patch_size**2

    @property
    def downsample_factor(self) -> int:
        """Pixels per packed-latent cell along each side (16 for FLUX.2)."""
        return 2 ** (len(self.channel_multipliers) - 1) * self.patch_size

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple]) -> "VAEConfig":
        """Read the architecture from tensor shapes keyed by BFL names (as in `ae.safetensors`)."""

        def shape(name: str) -> tuple[int, ...]:
            if name not in shapes:
                raise CheckpointError(
                    f"VAE checkpoint: expected tensor {name!r} (BFL naming) but it is missing; "
                    f"found {len(shapes)} tensors, e.g. {sorted(shapes)[:3]}"
                )
            return tuple(shapes[name])

        encoder_levels = _indices(shapes, r"encoder\.down\.(\d+)\.")
        decoder_levels = _indices(shapes, r"decoder\.up\.(\d+)\.")
        if not encoder_levels or encoder_levels != decoder_levels:
            raise CheckpointError(
                "VAE checkpoint: expected the same number of encoder.down.{i} and decoder.up.{i} levels "
                f"(4 for FLUX.2), found {len(encoder_levels)} and {len(decoder_levels)}"
            )

        base_channels = shape("encoder.conv_in.weight")[0]
        encoder_channels = [shape(f"encoder.down.{i}.block.0.conv2.weight")[0] for i in encoder_levels]
        if any(width % base_channels for width in encoder_channels):
            raise CheckpointError(
                "VAE checkpoint: expected encoder level widths that are multiples of conv_in's "
                f"{base_channels} channels, found {encoder_channels}"
            )
        decoder_channels = tuple(shape(f"decoder.up.{i}.block.0.conv2.weight")[0] for i in decoder_levels)
        if shape("decoder.conv_in.weight")[0] != decoder_channels[-1]:
            raise CheckpointError(
                f"VAE checkpoint: expected decoder.conv_in to output the top level's {decoder_channels[-1]} channels, "
                f"found {shape('decoder.conv_in.weight')[0]}"
            )

        z_channels = shape("decoder.post_quant_conv.weight")[0]
        moments = shape("encoder.conv_out.weight")[0]
        if moments != 2 * z_channels:
            raise CheckpointError(
                "VAE checkpoint: expected encoder.conv_out to output mean and log-variance "
                f"({2 * z_channels} channels), found {moments}"
            )
        latent_channels = shape("bn.running_mean")[0]
        patch_size = math.isqrt(latent_channels // z_channels)
        if patch_size**2 * z_channels != latent_channels:
            raise CheckpointError(
                f"VAE checkpoint: expected bn.running_mean to hold z_channels * patch^2 values ({z_channels} * 4 = "
                f"{4 * z_channels} for FLUX.2), found {latent_channels}"
            )

        return cls(
            in_channels=shape("encoder.conv_in.weight")[1],
            out_channels=shape("decoder.conv_out.weight")[0],
            base_channels=base_channels,
            channel_multipliers=tuple(width // base_channels for width in encoder_channels),
            decoder_channels=decoder_channels,
            encoder_blocks_per_level=len(_indices(shapes, r"encoder\.down\.0\.block\.(\d+)\.")),
            decoder_blocks_per_level=len(_indices(shapes, r"decoder\.up\.0\.block\.(\d+)\.")),
            z_channels=z_channels,
            patch_size=patch_size,
        )


def _indices(names: Mapping[str, tuple], pattern: str) -> list[int]:
    """Sorted distinct integers captured by `pattern` at the start of any name."""
    regex = re.compile(pattern)
    return sorted({int(match[1]) for name in names if (match := regex.match(name))})


# ---------------------------------------------------------------------------------------------------------------------
# Latent packing, shared with the sampler and the nodes.


def patchify_latent(latent: Tensor, patch_size: int = 2) -> Tensor:
    """[B,C,H,W] -> [B,C*p*p,H/p,W/p]; packed channel = c*p*p + pi*p + pj."""
    batch, channels, height, width = latent.shape
    p = patch_size
    latent = latent.reshape(batch, channels, height // p, p, width // p, p)
    return latent.permute(0, 1, 3, 5, 2, 4).reshape(batch, channels * p * p, height // p, width // p)


def unpatchify_latent(packed: Tensor, patch_size: int = 2) -> Tensor:
    """Inverse of `patchify_latent`: [B,C*p*p,h,w] -> [B,C,h*p,w*p]."""
    batch, packed_channels, height, width = packed.shape
    p = patch_size
    packed = packed.reshape(batch, packed_channels // (p * p), p, p, height, width)
    return packed.permute(0, 1, 4, 2, 5, 3).reshape(batch, packed_channels // (p * p), height * p, width * p)


def _latent_std(running_var: Tensor, like: Tensor) -> Tensor:
    # The 128 statistics are tiny: take the square root in fp32 even when the latent is bf16.
    return torch.sqrt(running_var.float() + LATENT_NORM_EPS).to(like).view(1, -1, 1, 1)


def normalize_latent(packed: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """(z - mean) / sqrt(var + 1e-4) per packed channel: the space the DiT samples in."""
    return (packed - running_mean.to(packed).view(1, -1, 1, 1)) / _latent_std(running_var, packed)


def denormalize_latent(latent: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """Inverse of `normalize_latent`."""
    return latent * _latent_std(running_var, latent) + running_mean.to(latent).view(1, -1, 1, 1)


# ---------------------------------------------------------------------------------------------------------------------
# Layers. Every constructor takes device and dtype so the whole model can be built on the meta device.


def _group_norm(channels: int, device, dtype) -> nn.GroupNorm:
    return nn.GroupNorm(NORM_GROUPS, channels, eps=GROUP_NORM_EPS, device=device, dtype=dtype)


# Passes over each value that a GroupNorm + SiLU makes (statistics, normalise, affine, activation), counted as
# multiply-adds against `progress.macs_between_checks`.
NORM_SILU_OPS_PER_VALUE = 8


def _norm_silu(norm: nn.GroupNorm, x: Tensor) -> Tensor:
    """SiLU(GroupNorm(x)). Over the interrupt budget (a full-resolution activation on a CPU takes about a second)
    a few whole groups at a time, with a check between them: each group's statistics are its own, so the slices
    give the same values as one call."""
    budget = progress.macs_between_checks(x.device)
    if budget is None or x.numel() * NORM_SILU_OPS_PER_VALUE <= budget:
        # The norm output is a fresh tensor, so the activation can overwrite it instead of allocating another.
        return F.silu(norm(x), inplace=True)
    per_group = x.numel() // norm.num_groups
    groups = max(1, budget // (per_group * NORM_SILU_OPS_PER_VALUE))
    width = norm.num_channels // norm.num_groups
    out = torch.empty_like(x)
    for first in range(0, norm.num_groups, groups):
        check_interrupt()
        count = min(groups, norm.num_groups - first)
        channels = slice(first * width, (first + count) * width)
        out[:, channels] = F.silu(F.group_norm(x[:, channels], count, norm.weight[channels], norm.bias[channels],
                                               norm.eps), inplace=True)
    return out


def conv_in_bands(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """`conv(x)` for the square, zero-padded, ungrouped convolutions of this VAE, with interrupt checks inside
    when one call would exceed `progress.macs_between_checks` (a 3x3 convolution at 2048x2048 runs for seconds
    on a CPU): a batch is convolved a few whole images at a time, and an image too large for one call in
    bands of output rows, each from exactly the input rows it reads. Every output value sums the same
    products as in one call, and nothing is computed twice.

    Row bands run channels-last: there a band of rows is one contiguous block that the CPU convolution reads
    without reordering (it prefers that layout anyway), so the bands cost no more than one call in the
    default layout. The result is then channels-last, and so are the activations computed from it."""
    kernel, stride, pad = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    batch, _, height, width = x.shape
    out_height = (height + 2 * pad - kernel) // stride + 1
    out_width = (width + 2 * pad - kernel) // stride + 1
    budget = progress.macs_between_checks(x.device)
    macs_per_row = out_width * conv.out_channels * conv.in_channels * kernel * kernel  # of one image
    if budget is None or batch * out_height * macs_per_row <= budget:
        return conv(x)
    images = budget // (out_height * macs_per_row)
    if images >= 1:
        parts = []
        for start in range(0, batch, images):
            check_interrupt()
            parts.append(conv(x[start:start + images]))
        return torch.cat(parts)

    rows = max(1, budget // macs_per_row)
    x = x.contiguous(memory_format=torch.channels_last)
    out = torch.empty(batch, conv.out_channels, out_height, out_width, dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    for image in range(batch):
        for start in range(0, out_height, rows):
            check_interrupt()
            stop = min(start + rows, out_height)
            # Output rows [start, stop) read input rows [first, last); rows outside the image are zeros.
            first, last = start * stride - pad, (stop - 1) * stride - pad + kernel
            band = x[image:image + 1, :, max(first, 0):min(last, height)]
            if first < 0 or last > height:
                band = F.pad(band, (0, 0, max(-first, 0), max(last - height, 0)))
            out[image:image + 1, :, start:stop] = F.conv2d(band, conv.weight, conv.bias, stride, (0, pad))
    return out


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, device=None, dtype=None):
        super().__init__()
        self.norm1 = _group_norm(in_channels, device, dtype)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, device=device, dtype=dtype)
        self.norm2 = _group_norm(out_channels, device, dtype)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, device=device, dtype=dtype)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, device=device, dtype=dtype) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        h = conv_in_bands(self.conv1, _norm_silu(self.norm1, x))
        h = conv_in_bands(self.conv2, _norm_silu(self.norm2, h))
        shortcut = x if self.nin_shortcut is None else conv_in_bands(self.nin_shortcut, x)
        return h.add_(shortcut)


# Query positions per attention call, chosen so one call's scores stay within this many values (256 MiB in
# fp32): a 2048x2048 image has 65536 positions at the mid block, 4.3e9 scores at once. /interrupt is checked
# between calls, so a huge decode stops within one of them. Splitting queries leaves each softmax row whole.
ATTENTION_SCORES_PER_CALL = 1 << 26


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions; projections are 1x1 convolutions."""

    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        self.norm = _group_norm(channels, device, dtype)
        self.q = nn.Conv2d(channels, channels, 1, device=device, dtype=dtype)
        self.k = nn.Conv2d(channels, channels, 1, device=device, dtype=dtype)
        self.v = nn.Conv2d(channels, channels, 1, device=device, dtype=dtype)
        self.proj_out = nn.Conv2d(channels, channels, 1, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)

        def tokens(projection: nn.Conv2d) -> Tensor:  # [B,C,H,W] -> [B,1,H*W,C]
            # Contiguous, so attention runs in a fused kernel: on a transposed view torch falls back to the
            # math path, which holds the (H*W)^2 score matrix (17 GB in float32 for a 2048x2048 image).
            return projection(h).flatten(2).transpose(1, 2).contiguous().unsqueeze(1)

        q, k, v = tokens(self.q), tokens(self.k), tokens(self.v)
        positions = height * width
        per_call = max(1, ATTENTION_SCORES_PER_CALL // (batch * positions))
        if per_call >= positions:
            h = F.scaled_dot_product_attention(q, k, v)
        else:
            h = torch.empty_like(q)
            for start in range(0, positions, per_call):
                check_interrupt()
                h[:, :, start:start + per_call] = F.scaled_dot_product_attention(q[:, :, start:start + per_call], k, v)
        h = h.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)
        return self.proj_out(h).add_(x)


class Downsample(nn.Module):
    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        # Asymmetric padding (right and bottom only) is what the weights were trained with.
        return conv_in_bands(self.conv, F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        check_interrupt()
        return conv_in_bands(self.conv, x)


class MidBlock(nn.Module):
    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, device, dtype)
        self.attn_1 = AttnBlock(channels, device, dtype)
        self.block_2 = ResnetBlock(channels, channels, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn_1(self.block_1(x))
        check_interrupt()
        return self.block_2(x)


def _resnet_blocks(in_channels: int, out_channels: int, count: int, device, dtype) -> nn.ModuleList:
    widths = [in_channels] + [out_channels] * count
    return nn.ModuleList(ResnetBlock(widths[j], widths[j + 1], device, dtype) for j in range(count))


class DownLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, downsample: bool, device=None, dtype=None):
        super().__init__()
        self.block = _resnet_blocks(in_channels, out_channels, num_blocks, device, dtype)
        self.downsample = Downsample(out_channels, device, dtype) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            check_interrupt()  # a block on a huge image takes long: /interrupt is honoured between blocks
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, upsample: bool, device=None, dtype=None):
        super().__init__()
        self.block = _resnet_blocks(in_channels, out_channels, num_blocks, device, dtype)
        self.upsample = Upsample(out_channels, device, dtype) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            check_interrupt()
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """Pixels -> mean and log-variance [B, 2*z, H/8, W/8] (after quant_conv, which BFL stores in the encoder)."""

    def __init__(self, config: VAEConfig, device=None, dtype=None):
        super().__init__()
        widths = config.encoder_channels
        top = len(widths) - 1
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1, device=device, dtype=dtype)
        self.down = nn.ModuleList(
            DownLevel(widths[max(i - 1, 0)], widths[i], config.encoder_blocks_per_level, i < top, device, dtype)
            for i in range(len(widths))
        )
        self.mid = MidBlock(widths[top], device, dtype)
        self.norm_out = _group_norm(widths[top], device, dtype)
        moments = 2 * config.z_channels
        self.conv_out = nn.Conv2d(widths[top], moments, 3, padding=1, device=device, dtype=dtype)
        self.quant_conv = nn.Conv2d(moments, moments, 1, device=device, dtype=dtype)

    def forward(self, pixels: Tensor) -> Tensor:
        h = conv_in_bands(self.conv_in, pixels)
        for level in self.down:
            h = level(h)
        check_interrupt()
        h = self.conv_out(_norm_silu(self.norm_out, self.mid(h)))
        return self.quant_conv(h).contiguous()  # banded convolutions leave it channels-last


class Decoder(nn.Module):
    """Latent [B, z, h, w] -> pixels [B, 3, 8h, 8w]. `up.{i}` is stored by resolution, highest first, and runs last."""

    def __init__(self, config: VAEConfig, device=None, dtype=None):
        super().__init__()
        widths = config.decoder_channels
        top = len(widths) - 1
        z = config.z_channels
        self.post_quant_conv = nn.Conv2d(z, z, 1, device=device, dtype=dtype)
        self.conv_in = nn.Conv2d(z, widths[top], 3, padding=1, device=device, dtype=dtype)
        self.mid = MidBlock(widths[top], device, dtype)
        self.up = nn.ModuleList(
            UpLevel(widths[min(i + 1, top)], widths[i], config.decoder_blocks_per_level, i > 0, device, dtype)
            for i in range(len(widths))
        )
        self.norm_out = _group_norm(widths[0], device, dtype)
        self.conv_out = nn.Conv2d(widths[0], config.out_channels, 3, padding=1, device=device, dtype=dtype)

    def forward(self, latent: Tensor) -> Tensor:
        h = self.conv_in(self.post_quant_conv(latent))
        check_interrupt()
        h = self.mid(h)
        for level in reversed(self.up):
            h = level(h)
        h = _norm_silu(self.norm_out, h)
        check_interrupt()
        return conv_in_bands(self.conv_out, h).contiguous()  # banded convolutions leave it channels-last


class Flux2VAE(nn.Module):
    def __init__(self, config: VAEConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config, device, dtype)
        self.decoder = Decoder(config, device, dtype)
        # Only the running statistics are used (never batch statistics); a BatchNorm2d keeps the checkpoint's
        # names, including the optional bn.num_batches_tracked. They stay fp32 so a bf16 model keeps exact stats.
        self.bn = nn.BatchNorm2d(
            config.latent_channels,
            eps=LATENT_NORM_EPS,
            affine=False,
            track_running_stats=True,
            device=device,
            dtype=torch.float32,
        )

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """Pixels [B,3,H,W] in [-1,1], H and W multiples of 16 -> normalized packed latent [B,128,H/16,W/16]."""
        factor = self.config.downsample_factor
        if pixels.ndim != 4 or pixels.shape[-2] % factor or pixels.shape[-1] % factor:
            raise ValueError(f"expected pixels [B,C,H,W] with H and W multiples of {factor}, got {tuple(pixels.shape)}")
        weight = self.encoder.conv_in.weight
        moments = self.encoder(pixels.to(device=weight.device, dtype=weight.dtype))
        # The posterior mean; FLUX.2 never samples from the distribution.
        mean = moments[:, : self.config.z_channels]
        packed = patchify_latent(mean, self.config.patch_size)
        return normalize_latent(packed, self.bn.running_mean, self.bn.running_var)

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        """Normalized packed latent [B,128,h,w] -> pixels [B,3,16h,16w], nominally in [-1,1] (not clamped)."""
        if latent.ndim != 4 or latent.shape[1] != self.config.latent_channels:
            raise ValueError(f"expected latent [B,{self.config.latent_channels},h,w], got {tuple(latent.shape)}")
        weight = self.decoder.conv_in.weight
        latent = latent.to(device=weight.device, dtype=weight.dtype)
        packed = denormalize_latent(latent, self.bn.running_mean, self.bn.running_var)
        return self.decoder(unpatchify_latent(packed, self.config.patch_size))
