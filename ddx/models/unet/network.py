"""The DDPM U-Net (Ho et al. 2020), in Flax linen.

Architecture (channels-last, resolution = image height H):

  temb   = Dense(4ch) . SiLU . Dense(4ch) (sinusoidal embedding of t, size ch)
           [+ Embed(num_classes + 1, 4ch)(label) when num_classes > 0]
  h      = conv_in 3x3 -> ch;                           skips = [h]
  down   : for level l = 0 .. L-1 (L = len(ch_mult)):
             num_res_blocks x (ResBlock -> ch * ch_mult[l], then AttnBlock if
             the resolution is in attn_resolutions), each output pushed to
             skips;
             Downsample (pushed to skips) after every level but the last.
  middle : ResBlock, AttnBlock, ResBlock.
  up     : for level l = L-1 .. 0:
             (num_res_blocks + 1) x (ResBlock(concat[h, skips.pop()]) ->
             ch * ch_mult[l], then AttnBlock if at an attention resolution);
             Upsample after every level but level 0.
  out    : GroupNorm -> SiLU -> conv 3x3 -> C (initialised to zero, so the
           network outputs exactly zero at init).

Options that diffusers' `UNet2DModel` exposes (so its checkpoints convert,
ddx/convert/unet.py) default to DDPM's choices: the time embedding's order and
frequency spacing (flip_sin_to_cos, freq_shift), the downsampling conv's
padding, attention heads (attn_head_dim) and the GroupNorm epsilon
(norm_eps). None of them changes a parameter shape.

Every GroupNorm becomes a BatchNorm with norm="batch" (see layers.py: running
statistics live in the "batch_stats" collection and are used when
train=False).

Mixed precision: with dtype=bfloat16 every conv, dense layer, embedding and
attention product runs in bfloat16 while the parameters stay float32;
normalisation statistics and the attention softmax are computed in float32 and
the output is cast back to float32, so the loss is float32.

Resolutions of the levels are H, H/2, ..., H / 2**(L-1).

Timestep convention: `t` is the process's time input: for DDPM the array
index i in [0, T) of the diffusion step (not i + 1, not a continuous time in
[0, 1]), for EDM c_noise = ln(σ)/4, for flow 1000·t. It is multiplied by
time_scale and fed as float to the time embedding. Label convention: classes are 0 .. num_classes - 1, and
the extra index `num_classes` is the "null" label used for classifier-free
guidance; `labels=None` means every example gets the null label.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddx.models.base import check_inputs, count_params  # noqa: F401 (ddx.models.unet.count_params)
from ddx.models.layers import (GN_EPSILON, AttnBlock, Downsample, ResBlock, Upsample,
                               default_init, fourier_embedding, normalise, rematerialised,
                               scaled_time, sow_logvar, split_time, timestep_embedding,
                               zero_init)
from ddx.models.unet.spec import SPEC


class UNet(nn.Module):
  """DDPM U-Net predicting a tensor of the input's shape (e.g. the noise).

  The fields are the contract's (`ddx.models.base`) and the U-Net keys of
  `config.model` (`ddx.models.unet.spec`, whose checks it runs when traced).

  Attributes:
    ch: base channel count.
    ch_mult: channel multiplier per resolution level; its length is the number
      of levels, so the image is downsampled len(ch_mult) - 1 times.
    num_res_blocks: ResBlocks per level on the way down (one more on the way
      up).
    attn_resolutions: resolutions (feature-map heights) that get self-attention
      after each ResBlock; each must be one of the levels' resolutions.
    dropout: dropout rate inside the ResBlocks (active only with train=True).
    num_groups: GroupNorm groups; must divide ch * m for every m in ch_mult.
    resamp_with_conv: use 3x3 convs in Downsample/Upsample (else avg-pool /
      plain nearest-neighbour).
    num_classes: number of classes for label conditioning; 0 = unconditional.
    dtype: computation dtype, "float32" or "bfloat16" (a string, as in the
      config, or a jnp dtype); parameters stay float32.
    norm: "group" (GroupNorm, DDPM) or "batch" (BatchNorm with running
      statistics in the "batch_stats" collection).
    flip_sin_to_cos: time embedding as [cos, sin] instead of DDPM's
      [sin, cos].
    freq_shift: time-embedding frequencies 10000^(-k / (ch/2 - freq_shift)),
      k = 0 .. ch/2 - 1; DDPM's 1 ends exactly at 1/10000.
    time_embedding: "positional" (the sinusoidal table above, DDPM) or
      "fourier" (fixed random frequencies, layers.fourier_embedding).
    time_scale: factor on `t` before the embedding (1 = DDPM's).
    downsample_padding: "bottom_right" (DDPM, TensorFlow's SAME) or
      "symmetric" (PyTorch's padding=1) for the stride-2 downsampling conv.
    attn_head_dim: channels per attention head; 0 = one head over all
      channels (DDPM). Must divide the channels of every attention block.
    norm_eps: GroupNorm epsilon (DDPM 1e-6, diffusers' default 1e-5).
    attention: attention implementation, "xla" | "auto" | "cudnn" |
      "tpu_flash" (`ddx.models.attention`); the same function either way.
    norm_kernel: "xla" (nn.GroupNorm, then nn.silu) or "pallas" (each
      GroupNorm and its SiLU as one Pallas kernel, `ddx.models.fused_norm`);
      the same function and parameters either way.
    remat: what the backward pass recomputes in each ResBlock and AttnBlock,
      "none" | "dots" | "full" (`layers.rematerialised`; the trainer sets it
      from training.remat). Changes memory and time, not the gradients.
    second_time: the network takes a second time (t of shape [B, 2]; a
      process with two times, e.g. MeanFlow, shortcut models), embedded like
      the first through its own MLP whose last layer starts at zero, so the
      network starts as the one-time network with the same weights.
    logvar: a learned log-variance head on the time features
      (`layers.sow_logvar`; adaptive loss weighting).
  """
  ch: int = 32
  ch_mult: Sequence[int] = (1, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (4,)
  dropout: float = 0.0
  num_groups: int = 8
  resamp_with_conv: bool = True
  num_classes: int = 0
  dtype: Any = jnp.float32
  norm: str = "group"
  flip_sin_to_cos: bool = False
  freq_shift: int = 1
  time_embedding: str = "positional"
  time_scale: float = 1.0
  downsample_padding: str = "bottom_right"
  attn_head_dim: int = 0
  norm_eps: float = GN_EPSILON
  attention: str = "xla"
  norm_kernel: str = "xla"
  remat: str = "none"
  second_time: bool = False
  logvar: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array,
               labels: Optional[jax.Array] = None,
               train: bool = False) -> jax.Array:
    """Runs the network.

    Args:
      x: [B, H, W, C] float32 noisy images.
      t: [B] the time input (DDPM: int32 step index i in [0, T); any numeric
        dtype, used as float32); [B, 2] with second_time.
      labels: [B] int32 class labels in [0, num_classes] (num_classes = null),
        or None (all null). Only allowed when num_classes > 0.
      train: enables dropout; then apply needs rngs={'dropout': key} if
        dropout > 0. With norm="batch" it also normalises with the batch's
        statistics and updates the running ones: apply with
        mutable=["batch_stats"].

    Returns:
      [B, H, W, C] float32, the same shape as x.
    """
    check_inputs(self, SPEC, x, t, labels)
    out_ch = x.shape[-1]
    n_levels = len(self.ch_mult)
    dt = jnp.dtype(self.dtype)   # the config gives a string

    # Time (and label) embedding, shared by every ResBlock.
    t, t2 = split_time(t, self.second_time, "UNet")

    def features(t):
      t = scaled_time(t, self.time_scale)
      if self.time_embedding == "fourier":
        return fourier_embedding(t, self.ch)
      return timestep_embedding(t, self.ch, self.flip_sin_to_cos, self.freq_shift)

    def mlp(f, prefix, last_init):
      h = nn.Dense(4 * self.ch, dtype=dt, kernel_init=default_init,
                   name=f"{prefix}_dense0")(f)
      return nn.Dense(4 * self.ch, dtype=dt, kernel_init=last_init,
                      name=f"{prefix}_dense1")(nn.silu(h))

    f = features(t)
    temb = mlp(f, "temb", default_init)
    if t2 is not None:
      temb = temb + mlp(features(t2), "temb2", zero_init)
    if self.logvar:
      sow_logvar(self, f, dt)
    if self.num_classes > 0:
      if labels is None:
        labels = jnp.full(x.shape[:1], self.num_classes, dtype=jnp.int32)
      temb = temb + nn.Embed(self.num_classes + 1, 4 * self.ch, dtype=dt,
                             name="label_embed")(labels)

    # `train` is a Python bool: static for the checkpoint (self is arg 0).
    res_cls = rematerialised(ResBlock, self.remat, static_argnums=(3,))
    attn_cls = rematerialised(AttnBlock, self.remat, static_argnums=(2,))

    def res_block(h, ch, name):
      return res_cls(out_ch=ch, dropout=self.dropout,
                     num_groups=self.num_groups, dtype=dt, norm=self.norm,
                     norm_eps=self.norm_eps, norm_kernel=self.norm_kernel,
                     name=name)(h, temb, train)

    def attn_block(h, name):
      return attn_cls(num_groups=self.num_groups, dtype=dt, norm=self.norm,
                      norm_eps=self.norm_eps, head_dim=self.attn_head_dim,
                      attention=self.attention, norm_kernel=self.norm_kernel,
                      name=name)(h, train)

    # Down path; every intermediate output is a skip connection.
    h = nn.Conv(self.ch, (3, 3), padding="SAME", dtype=dt,
                kernel_init=default_init, name="conv_in")(x.astype(dt))
    skips = [h]
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = res_block(h, self.ch * mult, f"down_{level}_block_{i}")
        if h.shape[1] in self.attn_resolutions:
          h = attn_block(h, f"down_{level}_attn_{i}")
        skips.append(h)
      if level != n_levels - 1:
        h = Downsample(with_conv=self.resamp_with_conv, dtype=dt,
                       padding=self.downsample_padding,
                       name=f"down_{level}_downsample")(h)
        skips.append(h)

    # Middle, at the lowest resolution.
    h = res_block(h, h.shape[-1], "mid_block_0")
    h = attn_block(h, "mid_attn")
    h = res_block(h, h.shape[-1], "mid_block_1")

    # Up path, consuming the skips in reverse order.
    for level in reversed(range(n_levels)):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res_block(h, self.ch * self.ch_mult[level], f"up_{level}_block_{i}")
        if h.shape[1] in self.attn_resolutions:
          h = attn_block(h, f"up_{level}_attn_{i}")
      if level != 0:
        h = Upsample(with_conv=self.resamp_with_conv, dtype=dt,
                     name=f"up_{level}_upsample")(h)
    assert not skips, "every skip connection must be consumed"

    h = normalise(h, self.norm, self.num_groups, dt, "norm_out", train,
                  eps=self.norm_eps, silu=True, kernel=self.norm_kernel)
    h = nn.Conv(out_ch, (3, 3), padding="SAME", dtype=dt,
                kernel_init=zero_init, name="conv_out")(h)
    return h.astype(jnp.float32)

