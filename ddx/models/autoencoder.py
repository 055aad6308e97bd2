"""The KL autoencoder of latent diffusion (Stable Diffusion's VAE) in Flax linen.

The network is diffusers' `AutoencoderKL` (0.42) with DownEncoderBlock2D /
UpDecoderBlock2D blocks, written NHWC: an encoder of `len(block_out_channels)`
levels (each `layers_per_block` ResNet blocks, then a stride-2 conv except at
the last level), a mid block (ResNet, one-head self-attention, ResNet), a
GroupNorm-SiLU-conv head giving 2 * latent_channels moments, a 1x1
`quant_conv`; the decoder mirrors it (1x1 `post_quant_conv`, conv, mid block,
levels of `layers_per_block + 1` ResNet blocks and nearest-neighbour 2x
upsampling, GroupNorm-SiLU-conv). Every GroupNorm has epsilon 1e-6, as the
VAE fixes it. stabilityai/sd-vae-ft-ema and -ft-mse have block_out_channels
(128, 256, 512, 512), layers_per_block 2, latent_channels 4, 32 groups.

Submodules carry diffusers' names, so a parameter's diffusers state_dict key
follows from its Flax path alone (`torch_key`): a `_N` suffix is diffusers'
`.N` list index, kernel / scale become weight.
  encoder/down_blocks_0/resnets_1/conv1/kernel <-> encoder.down_blocks.0.resnets.1.conv1.weight
  decoder/mid_block/attentions_0/to_out_0/bias  <-> decoder.mid_block.attentions.0.to_out.0.bias

The encoder/decoder scaling (`scaling_factor`, `shift_factor`) is not part of
the network: `ddx.autoencoder` applies it.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddx.models.layers import Downsample, Upsample

# The VAE's GroupNorms (resnets, attention, the output norms) all use 1e-6.
VAE_EPSILON = 1e-6

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _norm(groups: int, dtype: Any, name: str) -> nn.GroupNorm:
  # Flax computes GroupNorm statistics in float32 even for a bf16 dtype.
  return nn.GroupNorm(num_groups=groups, epsilon=VAE_EPSILON, dtype=dtype, name=name)


def _conv(features: int, k: int, dtype: Any, name: str) -> nn.Conv:
  return nn.Conv(features, (k, k), padding="SAME" if k > 1 else "VALID",
                 dtype=dtype, name=name)


class ResnetBlock(nn.Module):
  """diffusers' ResnetBlock2D without time embedding (the VAE's).

  out = shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x)))))); the shortcut
  is a 1x1 conv when the channels change, else the identity.

  Attributes:
    out_channels: output channels.
    groups: GroupNorm groups (divides both channel counts).
    dtype: computation dtype.
  """
  out_channels: int
  groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C_in] -> [B, H, W, out_channels]."""
    h = nn.silu(_norm(self.groups, self.dtype, "norm1")(x))
    h = _conv(self.out_channels, 3, self.dtype, "conv1")(h)
    h = nn.silu(_norm(self.groups, self.dtype, "norm2")(h))
    h = _conv(self.out_channels, 3, self.dtype, "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
    return x + h


class Attention(nn.Module):
  """One-head self-attention over all H*W positions with a residual add.

  diffusers' `Attention` as the VAE's mid block builds it (heads = 1,
  dim_head = C, GroupNorm before the projections, biases on all four
  projections, softmax in float32).

  Attributes:
    groups: GroupNorm groups.
    dtype: computation dtype.
  """
  groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] -> [B, H, W, C]."""
    b, hgt, wid, c = x.shape
    h = _norm(self.groups, self.dtype, "group_norm")(x).reshape(b, hgt * wid, c)
    dense = lambda name: nn.Dense(c, dtype=self.dtype, name=name)
    q, k, v = dense("to_q")(h), dense("to_k")(h), dense("to_v")(h)
    logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) * (c ** -0.5)
    # Softmax in float32: bf16 logits lose too much over 4096 keys (64x64 latents).
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    h = jnp.einsum("bqk,bkc->bqc", weights, v)
    h = dense("to_out_0")(h)
    return x + h.reshape(b, hgt, wid, c)


class MidBlock(nn.Module):
  """diffusers' UNetMidBlock2D of the VAE: resnet, [attention], resnet."""
  groups: int = 32
  attention: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] -> [B, H, W, C]."""
    c = x.shape[-1]
    x = ResnetBlock(c, self.groups, self.dtype, name="resnets_0")(x)
    if self.attention:
      x = Attention(self.groups, self.dtype, name="attentions_0")(x)
    return ResnetBlock(c, self.groups, self.dtype, name="resnets_1")(x)


class _Level(nn.Module):
  """A DownEncoderBlock2D (resample="down") or UpDecoderBlock2D ("up")."""
  out_channels: int
  num_layers: int
  resample: str   # "down" | "up" | "" (the last level: none)
  groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{i}")(x)
    if self.resample == "down":
      # diffusers' Downsample2D with padding 0 pads (0, 1, 0, 1) before a
      # stride-2 conv: layers.Downsample's "bottom_right".
      x = Downsample(dtype=self.dtype, padding="bottom_right", name="downsamplers_0")(x)
    elif self.resample == "up":
      x = Upsample(dtype=self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """Images -> 2 * latent_channels moments, before quant_conv."""
  latent_channels: int
  block_out_channels: Sequence[int]
  layers_per_block: int
  groups: int
  attention: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C_in] -> [B, H/d, W/d, 2 * latent_channels], d = 2**(levels-1)."""
    boc = self.block_out_channels
    x = _conv(boc[0], 3, self.dtype, "conv_in")(x)
    for i, ch in enumerate(boc):
      x = _Level(ch, self.layers_per_block, "down" if i < len(boc) - 1 else "",
                 self.groups, self.dtype, name=f"down_blocks_{i}")(x)
    x = MidBlock(self.groups, self.attention, self.dtype, name="mid_block")(x)
    x = nn.silu(_norm(self.groups, self.dtype, "conv_norm_out")(x))
    return _conv(2 * self.latent_channels, 3, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
  """Latents (after post_quant_conv) -> images."""
  out_channels: int
  block_out_channels: Sequence[int]
  layers_per_block: int
  groups: int
  attention: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    """z: [B, h, w, latent_channels] -> [B, h*d, w*d, out_channels]."""
    rev = list(reversed(self.block_out_channels))
    x = _conv(rev[0], 3, self.dtype, "conv_in")(z)
    x = MidBlock(self.groups, self.attention, self.dtype, name="mid_block")(x)
    for i, ch in enumerate(rev):
      x = _Level(ch, self.layers_per_block + 1, "up" if i < len(rev) - 1 else "",
                 self.groups, self.dtype, name=f"up_blocks_{i}")(x)
    x = nn.silu(_norm(self.groups, self.dtype, "conv_norm_out")(x))
    return _conv(self.out_channels, 3, self.dtype, "conv_out")(x)


class AutoencoderKL(nn.Module):
  """diffusers' AutoencoderKL (DownEncoderBlock2D / UpDecoderBlock2D), NHWC.

  Attributes (diffusers' config names):
    in_channels, out_channels: image channels.
    latent_channels: latent channels (SD: 4).
    block_out_channels: widths per level (SD: (128, 256, 512, 512)); the
      latents are 2**(len - 1) times smaller along H and W.
    layers_per_block: ResNet blocks per encoder level (the decoder has one more).
    norm_num_groups: GroupNorm groups.
    use_quant_conv, use_post_quant_conv: the 1x1 convs around the latent.
    mid_block_add_attention: attention in the mid blocks.
    dtype: "float32" | "bfloat16" computation; parameters stay float32.
  """
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  dtype: str = "float32"

  def setup(self):
    if self.dtype not in DTYPES:
      raise ValueError(f"autoencoder dtype={self.dtype!r} is unknown; use one of "
                       f"{tuple(DTYPES)}")
    dt = DTYPES[self.dtype]
    common = dict(block_out_channels=tuple(self.block_out_channels),
                  layers_per_block=self.layers_per_block,
                  groups=self.norm_num_groups,
                  attention=self.mid_block_add_attention, dtype=dt)
    self.encoder = Encoder(self.latent_channels, **common)
    self.decoder = Decoder(self.out_channels, **common)
    if self.use_quant_conv:
      self.quant_conv = nn.Conv(2 * self.latent_channels, (1, 1), dtype=dt)
    if self.use_post_quant_conv:
      self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), dtype=dt)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The diagonal Gaussian posterior q(z | x).

    Args:
      x: [B, H, W, in_channels] images in [-1, 1]; H, W multiples of the downsample.
    Returns:
      (mean, logvar): each [B, H/d, W/d, latent_channels] float32, logvar
      clipped to [-30, 20] as diffusers' DiagonalGaussianDistribution does.
    """
    moments = self.encoder(x)
    if self.use_quant_conv:
      moments = self.quant_conv(moments)
    moments = moments.astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: jax.Array) -> jax.Array:
    """Latents (unscaled: the posterior's space) -> images.

    Args:
      z: [B, h, w, latent_channels].
    Returns:
      [B, h*d, w*d, out_channels] float32, not clipped.
    """
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Reconstruction from the posterior mean (used by `init`); x as in encode."""
    mean, _ = self.encode(x)
    return self.decode(mean)


_INDEX = re.compile(r"^(.*)_(\d+)$")
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def torch_key(path: Sequence[str]) -> str:
  """The diffusers state_dict key of the Flax parameter at `path`.

  Args:
    path: e.g. ("encoder", "down_blocks_0", "resnets_1", "conv1", "kernel").
  Returns:
    e.g. "encoder.down_blocks.0.resnets.1.conv1.weight".
  """
  *mods, leaf = path
  parts = []
  for m in mods:
    match = _INDEX.match(m)
    parts.append(f"{match.group(1)}.{match.group(2)}" if match else m)
  return ".".join(parts + [_LEAVES[leaf]])
