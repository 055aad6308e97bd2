"""Building blocks of the DDPM U-Net: time embedding, blocks, resampling.

All modules take channels-last images, `[B, H, W, C]`. Computation runs in
`dtype` (e.g. bfloat16) while parameters stay float32 (`param_dtype`, Flax's
default). Weights use DDPM's initialiser (Glorot-uniform, `fan_avg`), and the
last layer of every residual branch starts at zero, so each block is the
identity at init (DDPM used a scale of 1e-10; exact zeros behave the same).

The options that diffusers' `UNet2DModel` exposes and DDPM fixed (the order
and frequency spacing of the time embedding, the downsampling pad, attention
heads, the GroupNorm epsilon) are arguments whose defaults are DDPM's.

Normalisation is GroupNorm (DDPM) or BatchNorm (`norm="batch"`). BatchNorm
keeps running statistics in the "batch_stats" collection: `train=True` uses
the batch's statistics and updates the running ones (apply with
`mutable=["batch_stats"]`); `train=False` uses the running ones, so a sample
never depends on the other samples in its batch.
"""

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddx.models import attention as attention_lib
from ddx.models import fused_norm

# DDPM's `default_init(scale=1.0)`: variance_scaling(1, fan_avg, uniform).
default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zero_init = nn.initializers.zeros

# DDPM (via tf.contrib.layers.group_norm) used epsilon 1e-6.
GN_EPSILON = 1e-6

# How Downsample pads its stride-2 conv: DDPM's TensorFlow 'SAME' (one row and
# column at the bottom/right) or PyTorch's padding=1 (one on every side).
DOWNSAMPLE_PADDINGS = ("bottom_right", "symmetric")


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool = False,
                       freq_shift: float = 1) -> jax.Array:
  """Sinusoidal embedding of diffusion timesteps, as in DDPM / Transformers.

  Args:
    t: [B] timesteps (any numeric dtype; used as float32).
    dim: embedding size; must be at least 4 so that there are two frequencies.
    flip_sin_to_cos: put the cosines first (diffusers' `flip_sin_to_cos`).
    freq_shift: frequency k of half = dim // 2 is 10000^(-k / (half -
      freq_shift)); DDPM's 1 spaces them from 1 down to exactly 1/10000,
      diffusers' default 0 stops one step short (its `freq_shift`).

  Returns:
    [B, dim] float32: concat([sin(t * f), cos(t * f)]) (cos first if
    flipped) with geometrically spaced frequencies f, plus a zero column if
    `dim` is odd.
  """
  if t.ndim != 1:
    raise ValueError(
        f"timestep_embedding expects t of shape [B], got {t.shape}")
  half = dim // 2
  if half < 2:
    raise ValueError(f"timestep_embedding needs dim >= 4, got {dim}")
  if half - freq_shift <= 0:
    # The frequency spacing divides by (half - freq_shift).
    raise ValueError(f"timestep_embedding needs freq_shift < dim // 2 = {half}, "
                     f"got {freq_shift}")
  freqs = jnp.exp(
      -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32)
      / (half - freq_shift))
  emb = t.astype(jnp.float32)[:, None] * freqs[None, :]
  parts = [jnp.sin(emb), jnp.cos(emb)]
  emb = jnp.concatenate(parts[::-1] if flip_sin_to_cos else parts, axis=-1)
  if dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


# How a network embeds its time input (the `time_embedding` field of UNet and DiT).
TIME_EMBEDDINGS = ("positional", "fourier")

# The Fourier features' frequencies are drawn once from this seed: the same in
# every network, run and machine (NumPy's PCG64 stream), so they need no saving.
_FOURIER_SEED = 0


def scaled_time(t: jax.Array, scale: float) -> jax.Array:
  """The network's time input times `scale` (its `time_scale`), as float32.

  Args:
    t: [B] any numeric dtype.
    scale: a Python float; 1 returns t as float32 with no multiply, so the
      embedding is bit for bit the unscaled one.

  Returns:
    [B] float32.
  """
  t = t.astype(jnp.float32)
  return t if scale == 1 else t * jnp.float32(scale)


def fourier_embedding(t: jax.Array, dim: int) -> jax.Array:
  """Random Fourier features of the time with fixed frequencies (NCSN++, EDM2).

  Frequencies f_k ~ N(0, 1), k < dim // 2, are the first draws of NumPy's
  default_rng(_FOURIER_SEED); their spread is set by scaling t (`scaled_time`):
  t·s with f ~ N(0, 1) is NCSN++'s Gaussian projection of scale s.

  Args:
    t: [B] (any numeric dtype; used as float32).
    dim: embedding size, at least 2.

  Returns:
    [B, dim] float32: concat([sin(2π f t), cos(2π f t)]), plus a zero column
    if `dim` is odd.
  """
  if t.ndim != 1:
    raise ValueError(f"fourier_embedding expects t of shape [B], got {t.shape}")
  half = dim // 2
  if half < 1:
    raise ValueError(f"fourier_embedding needs dim >= 2, got {dim}")
  freqs = np.random.default_rng(_FOURIER_SEED).standard_normal(half)
  freqs = jnp.asarray(2 * np.pi * freqs, jnp.float32)
  emb = t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
  if dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def split_time(t: jax.Array, second_time: bool, network: str
               ) -> tuple[jax.Array, Optional[jax.Array]]:
  """The network's time input as (main time [B], second time [B] or None).

  A process with two times (MeanFlow's interval, a shortcut model's step size;
  its Spec's second_time) gives the network t of shape [B, 2]: column 0 the
  main time, column 1 the second. Every other process gives [B].

  Raises:
    ValueError: t's shape does not fit the network's second_time.
  """
  t = jnp.asarray(t)
  if second_time:
    if t.ndim != 2 or t.shape[1] != 2:
      raise ValueError(f"{network} with second_time=True expects t of shape [B, 2] "
                       f"(time, second time), got {t.shape}")
    return t[:, 0], t[:, 1]
  if t.ndim != 1:
    raise ValueError(f"{network} expects t of shape [B], got {t.shape} (a [B, 2] time "
                     "is for a network built with second_time=True)")
  return t, None


def sow_logvar(module: nn.Module, features: jax.Array, dtype: Any) -> None:
  """The learned log-variance head of adaptive loss weighting (EDM2, sCM).

  A zero-initialised Dense(1) on the time features, sown into the "logvar"
  collection as float32 [B]: only an apply with mutable=["logvar"] (the
  trainer, for a process whose Spec has logvar=True) collects it, and the
  network's output is unchanged.
  """
  lv = nn.Dense(1, dtype=dtype, kernel_init=nn.initializers.zeros,
                bias_init=nn.initializers.zeros, name="logvar_head")(features)
  module.sow("logvar", "logvar", lv[:, 0].astype(jnp.float32))


# The collection a backbone sows its hidden tokens into (`sow_hidden`).
HIDDEN = "hidden"


def sow_hidden(module: nn.Module, tokens: jax.Array) -> None:
  """Sows one block's output tokens [B, N, D] into the "hidden" collection.

  Called after every block, in order, so an apply with mutable=["hidden"]
  gets the tuple of every block's tokens under ("hidden", "tokens"); without
  that collection mutable, `sow` stores nothing and the program is the same
  (REPA aligns one block's tokens, `ddx.repa`); `init`, for which every
  collection is mutable, stores nothing either.
  """
  if module.is_initializing():
    return   # init returns parameters (and statistics), never a forward's tokens
  module.sow(HIDDEN, "tokens", tokens)


def _conv3x3(features: int, dtype: Any, name: str, zero: bool = False,
             strides: int = 1, padding: Any = "SAME") -> nn.Conv:
  return nn.Conv(
      features, (3, 3), strides=(strides, strides), padding=padding,
      dtype=dtype, kernel_init=zero_init if zero else default_init, name=name)


def _dense(features: int, dtype: Any, name: str,
           zero: bool = False) -> nn.Dense:
  return nn.Dense(features, dtype=dtype,
                  kernel_init=zero_init if zero else default_init, name=name)


NORMS = ("group", "batch")

# PyTorch's BatchNorm2d defaults (its momentum 0.1 is 1 - momentum here), as
# in the article's setup (configs/article.py): the running statistics average
# over roughly the last 10 batches.
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5


def norm_layer(kind: str, num_groups: int, dtype: Any, name: str,
               train: bool, eps: float = GN_EPSILON) -> nn.Module:
  """GroupNorm or BatchNorm over the channels of [B, H, W, C].

  Flax computes the statistics (and BatchNorm's running averages) in float32
  even when dtype is bfloat16, so mixed precision keeps stable normalisation.
  `eps` is GroupNorm's epsilon; BatchNorm keeps PyTorch's 1e-5.
  """
  if kind == "group":
    return nn.GroupNorm(num_groups=num_groups, epsilon=eps, dtype=dtype,
                        name=name)
  if kind == "batch":
    return nn.BatchNorm(use_running_average=not train, momentum=_BN_MOMENTUM,
                        epsilon=_BN_EPSILON, dtype=dtype, name=name)
  raise ValueError(f"norm={kind!r} is unknown; use one of {NORMS}")


def normalise(x: jax.Array, kind: str, num_groups: int, dtype: Any, name: str,
              train: bool, eps: float = GN_EPSILON, silu: bool = False,
              kernel: str = "xla") -> jax.Array:
  """norm_layer(...)(x), then SiLU if `silu`; kernel="pallas" runs a GroupNorm
  and its SiLU as one Pallas kernel (`ddx.models.fused_norm`, same parameters)."""
  if kernel not in fused_norm.NORM_KERNELS:
    raise ValueError(f"norm_kernel={kernel!r} is unknown; use one of {fused_norm.NORM_KERNELS}")
  if kernel == "pallas" and kind == "group":
    return fused_norm.GroupNorm(num_groups=num_groups, epsilon=eps, dtype=dtype,
                                silu=silu, name=name)(x)
  y = norm_layer(kind, num_groups, dtype, name, train, eps=eps)(x)
  return nn.silu(y) if silu else y


REMATS = ("none", "dots", "full")


def _save_dots_and_convs(prim, *_, **params) -> bool:
  """Remat policy: keep conv outputs and matmuls without batch dimensions.

  The dense layers' and convolutions' outputs are the expensive values to
  recompute; batched dots (the attention logits, [B, N, T, T]) are the big
  ones to store, so they and everything element-wise are recomputed.
  """
  if prim.name == "conv_general_dilated":
    return True
  if prim.name == "dot_general":
    (_, _), (lhs_batch, rhs_batch) = params["dimension_numbers"]
    return not lhs_batch and not rhs_batch
  return False


def rematerialised(block: type, remat: str, static_argnums: tuple = ()) -> type:
  """The block class, recomputed in the backward pass as `remat` says.

  Args:
    block: a Flax module class (a backbone block).
    remat: "none" (store every activation: the block itself), "dots" (store
      matmul and conv outputs, recompute the rest: normalisation, activations,
      softmax) or "full" (store only the block's inputs).
    static_argnums: the block's non-array arguments, counting self as 0
      (e.g. `train`), which the checkpoint must treat as Python values.

  Returns:
    A module class with the same fields and parameter names.
  """
  if remat == "none":
    return block
  if remat not in REMATS:
    raise ValueError(f"remat={remat!r} is unknown; use one of {REMATS}")
  policy = _save_dots_and_convs if remat == "dots" else None
  return nn.remat(block, policy=policy, static_argnums=static_argnums)


class ResBlock(nn.Module):
  """Residual block with a time-embedding bias, as in DDPM.

  h = conv2(dropout(silu(norm2(conv1(silu(norm1(x))) + dense(silu(temb))))));
  returns skip(x) + h, where conv2 starts at zero and skip is the identity, or
  a 1x1 conv ("NIN") when the channel count changes.

  Attributes:
    out_ch: output channels; None keeps the input's.
    dropout: dropout rate before the second conv.
    num_groups: GroupNorm groups; must divide the input and output channels.
    dtype: computation dtype.
    norm: "group" | "batch".
    norm_eps: GroupNorm epsilon.
    norm_kernel: "xla" | "pallas" (`normalise`).
  """
  out_ch: Optional[int] = None
  dropout: float = 0.0
  num_groups: int = 32
  dtype: Any = jnp.float32
  norm: str = "group"
  norm_eps: float = GN_EPSILON
  norm_kernel: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array,
               train: bool = False) -> jax.Array:
    """Applies the block.

    Args:
      x: [B, H, W, C_in] input.
      temb: [B, D] time (and label) embedding.
      train: enables dropout (then a 'dropout' rng is needed if rate > 0)
        and, with norm="batch", batch statistics.

    Returns:
      [B, H, W, out_ch] (out_ch defaults to C_in).
    """
    in_ch = x.shape[-1]
    out_ch = in_ch if self.out_ch is None else self.out_ch
    norm = functools.partial(normalise, kind=self.norm, num_groups=self.num_groups,
                             dtype=self.dtype, train=train, eps=self.norm_eps,
                             silu=True, kernel=self.norm_kernel)
    h = norm(x, name="norm1")
    h = _conv3x3(out_ch, self.dtype, "conv1")(h)
    # Per-channel bias from the embedding, broadcast over all positions.
    temb_bias = _dense(out_ch, self.dtype, "temb_proj")(nn.silu(temb))
    h = h + temb_bias[:, None, None, :]
    h = norm(h, name="norm2")
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = _conv3x3(out_ch, self.dtype, "conv2", zero=True)(h)
    if in_ch != out_ch:
      x = _dense(out_ch, self.dtype, "nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Self-attention over all H*W positions, with a residual add.

  One head over all channels (DDPM) by default; `head_dim` > 0 splits the
  channels into C / head_dim heads (diffusers' `attention_head_dim`), each
  with logits scaled by head_dim^-1/2. The heads share the q/k/v/out
  projections, so the parameter shapes do not depend on head_dim. The output
  projection starts at zero, so the block is the identity at init.

  Attributes:
    num_groups: GroupNorm groups; must divide the channels.
    dtype: computation dtype.
    norm: "group" | "batch".
    norm_eps: GroupNorm epsilon.
    head_dim: channels per head; 0 = one head of all C channels. Must divide
      C.
    attention: "xla" (the einsums below) or a fused implementation of
      `ddx.models.attention` ("auto" | "cudnn" | "tpu_flash").
  """
  num_groups: int = 32
  dtype: Any = jnp.float32
  norm: str = "group"
  norm_eps: float = GN_EPSILON
  head_dim: int = 0
  attention: str = "xla"
  norm_kernel: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Applies the block.

    Args:
      x: [B, H, W, C] input.
      train: with norm="batch", use (and update) batch statistics.

    Returns:
      [B, H, W, C].
    """
    b, hgt, wid, c = x.shape
    d = self.head_dim or c
    if c % d:
      raise ValueError(f"attention head_dim={self.head_dim} does not divide the "
                       f"{c} channels of an attention block")
    h = normalise(x, self.norm, self.num_groups, self.dtype, "norm", train,
                  eps=self.norm_eps, kernel=self.norm_kernel)
    q = _dense(c, self.dtype, "q")(h).reshape(b, hgt * wid, c)
    k = _dense(c, self.dtype, "k")(h).reshape(b, hgt * wid, c)
    v = _dense(c, self.dtype, "v")(h).reshape(b, hgt * wid, c)
    heads = lambda a: a.reshape(b, hgt * wid, c // d, d)
    if self.attention != "xla":
      h = attention_lib.attend(heads(q), heads(k), heads(v), self.attention)
    elif d == c:
      logits = jnp.einsum("bqc,bkc->bqk", q, k) * (c ** -0.5)
      # Softmax in float32: bf16 logits lose too much precision over H*W keys.
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
      h = jnp.einsum("bqk,bkc->bqc", weights.astype(v.dtype), v)
    else:
      logits = jnp.einsum("bqhd,bkhd->bhqk", heads(q), heads(k)) * (d ** -0.5)
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
      h = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), heads(v))
    h = _dense(c, self.dtype, "proj_out", zero=True)(h.reshape(b, hgt, wid, c))
    return x + h


class Downsample(nn.Module):
  """Halves H and W: a 3x3 stride-2 conv, or 2x2 average pooling.

  With padding="bottom_right" (DDPM) the conv pads by one row/column at the
  bottom/right only, which is what TensorFlow's 'SAME' padding does for an
  even size with a 3x3 kernel and stride 2; "symmetric" pads one on every
  side, as PyTorch's padding=1 (diffusers' `downsample_padding=1`). Either
  way the output is exactly H/2 x W/2; the taps differ by one pixel.

  Attributes:
    with_conv: use the conv (True) or average pooling (False).
    dtype: computation dtype.
    padding: "bottom_right" | "symmetric".
  """
  with_conv: bool = True
  dtype: Any = jnp.float32
  padding: str = "bottom_right"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the downsampling.

    Args:
      x: [B, H, W, C] input with even H and W.

    Returns:
      [B, H/2, W/2, C].
    """
    if self.with_conv:
      if self.padding not in DOWNSAMPLE_PADDINGS:
        raise ValueError(f"downsample padding={self.padding!r} is unknown; use "
                         f"one of {DOWNSAMPLE_PADDINGS}")
      pad = ((0, 1), (0, 1)) if self.padding == "bottom_right" else ((1, 1), (1, 1))
      return _conv3x3(x.shape[-1], self.dtype, "conv", strides=2,
                      padding=pad)(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
  """Doubles H and W by nearest-neighbour repetition, then an optional 3x3 conv.

  Attributes:
    with_conv: apply a 3x3 conv after the repetition.
    dtype: computation dtype.
  """
  with_conv: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the upsampling.

    Args:
      x: [B, H, W, C] input.

    Returns:
      [B, 2H, 2W, C].
    """
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    if self.with_conv:
      x = _conv3x3(x.shape[-1], self.dtype, "conv")(x)
    return x
