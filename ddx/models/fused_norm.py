"""Normalisations in one pass over memory: Pallas kernels, `model.norm_kernel`.

Two kernels: the U-Net's GroupNorm (+ SiLU), and DiT's LayerNorm followed by
its adaLN modulation (`layer_norm_modulate`, below `GroupNorm`).

XLA computes a GroupNorm as two programs over the activations: a reduction
that reads them for the group statistics, then an element-wise program that
reads them again to normalise, scale, shift and apply the SiLU that follows
every U-Net norm but the attention block's. Per normalisation that is two
reads and one write of the activation tensor; in the profiles of the
CIFAR-10 U-Net on an H200 this memory-bound work was the largest share after
the convolutions.

The kernel here gives each program one image and a block of whole channel
groups ([H*W, Cb] of the [B, H*W, C] activations), keeps the block on chip,
and computes mean, variance, the affine map and the SiLU from that one read:
one read and one write. The group sums are a matmul with a block-diagonal
indicator matrix (x @ same sums each pixel's channels per group), so the
kernel needs only 2D dots, reductions and element-wise operations, which
every Pallas backend lowers.

  xla     Flax's nn.GroupNorm then nn.silu (the default, every backend).
  pallas  this kernel: compiled by Pallas on GPU (Triton) and TPU (Mosaic),
          run by Pallas' interpreter on CPU (correct but slow; for tests).

The backward pass differentiates the plain-JAX formula (`reference`) at the
saved inputs (a custom VJP): the same gradients as `xla`, computed by XLA.
A layer whose block does not fit (`block_channels` returns None) runs the
reference. The parameters are nn.GroupNorm's ("scale", "bias", shape [C]),
so a checkpoint loads under either setting.
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

NORM_KERNELS = ("xla", "pallas")

# Most elements of a program's block: 16k float32 values (64 KiB) stay in a
# GPU program's registers and shared memory; a TPU core's VMEM holds 1 MiB
# blocks with room for double buffering.
MAX_BLOCK_ELEMENTS = 16384
MAX_BLOCK_ELEMENTS_TPU = 1 << 18
# Triton's dots need every dimension >= 16.
MIN_BLOCK_CHANNELS = 16


def _is_pow2(n: int) -> bool:
  return n > 0 and not n & (n - 1)


def block_channels(hw: int, channels: int, group_size: int,
                   backend: str) -> Optional[int]:
  """Channels per program: whole groups, dividing C, within MAX_BLOCK_ELEMENTS.

  Args:
    hw: pixels per image (H * W).
    channels: C.
    group_size: C / num_groups.
    backend: jax.default_backend(); "gpu" also needs power-of-two block sides
      (Triton), "tpu" a block of all C channels or a multiple of 128 (Mosaic's
      lane width).

  Returns:
    The largest such block width, or None when no block fits (then the
    layer runs the reference).
  """
  if backend == "gpu" and not _is_pow2(hw):
    return None
  budget = MAX_BLOCK_ELEMENTS_TPU if backend == "tpu" else MAX_BLOCK_ELEMENTS
  for cb in range(channels, 0, -1):
    if (channels % cb or cb % group_size or cb < MIN_BLOCK_CHANNELS or hw * cb > budget
        or (backend == "gpu" and not _is_pow2(cb))
        or (backend == "tpu" and cb != channels and cb % 128)):
      continue
    return cb
  return None


def reference(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int,
              eps: float, silu: bool) -> jax.Array:
  """GroupNorm over [B, H, W, C] (float32 statistics), then SiLU if `silu`.

  Returns float32; the caller casts.
  """
  b, h, w, c = x.shape
  xg = x.astype(jnp.float32).reshape(b, h * w, num_groups, c // num_groups)
  mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
  var = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
  y = ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(b, h, w, c)
  y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return jax.nn.silu(y) if silu else y


def _kernel(x_ref, scale_ref, bias_ref, o_ref, *, group_size: int, eps: float,
            silu: bool):
  """One image's [H*W, Cb] block: statistics, affine map and SiLU from one read."""
  x = x_ref[0].astype(jnp.float32)                        # [HW, Cb]
  cb = x.shape[1]
  # lax.div, not //: floor division of signed ints adds ops Triton may not lower.
  rows = jax.lax.div(jax.lax.broadcasted_iota(jnp.int32, (cb, cb), 0), group_size)
  cols = jax.lax.div(jax.lax.broadcasted_iota(jnp.int32, (cb, cb), 1), group_size)
  same = (rows == cols).astype(jnp.float32)               # block-diagonal groups
  n = x.shape[0] * group_size
  dot = functools.partial(jnp.dot, precision=jax.lax.Precision.HIGHEST,
                          preferred_element_type=jnp.float32)
  mean = jnp.sum(dot(x, same), axis=0, keepdims=True) / n  # [1, Cb], per channel
  d = x - mean
  var = jnp.sum(dot(d * d, same), axis=0, keepdims=True) / n
  y = d * jax.lax.rsqrt(var + eps) * scale_ref[...] + bias_ref[...]
  if silu:
    y = y * jax.nn.sigmoid(y)
  o_ref[0] = y.astype(o_ref.dtype)


def _compiler_params(backend: str):
  """Triton's on GPU (jax 0.10 would pick Mosaic GPU, whose copies are <= 256
  wide); the backend's default elsewhere."""
  if backend != "gpu":
    return None
  from jax.experimental.pallas import triton as pltriton
  return pltriton.CompilerParams(num_warps=8)


def _pallas(x, scale, bias, num_groups, eps, silu, out_dtype, cb, backend):
  b, h, w, c = x.shape
  kernel = functools.partial(_kernel, group_size=c // num_groups, eps=eps, silu=silu)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((b, h * w, c), out_dtype),
      grid=(b, c // cb),
      in_specs=[pl.BlockSpec((1, h * w, cb), lambda i, j: (i, 0, j)),
                pl.BlockSpec((1, cb), lambda i, j: (0, j)),
                pl.BlockSpec((1, cb), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((1, h * w, cb), lambda i, j: (i, 0, j)),
      interpret=backend == "cpu",
      compiler_params=_compiler_params(backend),
      name="group_norm_silu" if silu else "group_norm",
  )(x.reshape(b, h * w, c), scale.reshape(1, c).astype(jnp.float32),
    bias.reshape(1, c).astype(jnp.float32))
  return out.reshape(b, h, w, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int,
               eps: float, silu: bool, out_dtype: Any) -> jax.Array:
  """GroupNorm (+ SiLU) of [B, H, W, C] with per-channel scale and bias [C].

  The Pallas kernel where a block fits (`block_channels`), else `reference`;
  interpreted on CPU. Statistics in float32; the result in out_dtype.
  """
  b, h, w, c = x.shape
  backend = jax.default_backend()
  cb = block_channels(h * w, c, c // num_groups, backend)
  if cb is None:
    return reference(x, scale, bias, num_groups, eps, silu).astype(out_dtype)
  return _pallas(x, scale, bias, num_groups, eps, silu, out_dtype, cb, backend)


def _fwd(x, scale, bias, num_groups, eps, silu, out_dtype):
  return group_norm(x, scale, bias, num_groups, eps, silu, out_dtype), (x, scale, bias)


def _bwd(num_groups, eps, silu, out_dtype, saved, g):
  x, scale, bias = saved
  _, vjp = jax.vjp(lambda *a: reference(*a, num_groups, eps, silu).astype(out_dtype),
                   x, scale, bias)
  return vjp(g)


group_norm.defvjp(_fwd, _bwd)


class GroupNorm(nn.Module):
  """nn.GroupNorm (+ SiLU) through `group_norm`; the same parameters.

  Attributes:
    num_groups: groups; must divide the channels.
    epsilon: added to the variance.
    dtype: output dtype (statistics in float32, as Flax's).
    silu: apply SiLU to the output (the U-Net's norm-then-activation pairs).
  """
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  silu: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return group_norm(x, scale, bias, self.num_groups, self.epsilon, self.silu,
                      jnp.dtype(self.dtype))


# DiT: LayerNorm (no affine parameters) then x * (1 + scale) + shift per example.
#
# XLA runs it as a row reduction and an element-wise pass over the float32
# residual stream. The kernel gives each program Tb whole tokens of one example
# and writes the modulated, cast result from one read. DiT's widths (768,
# 1152) are not powers of two, which Triton's blocks must be, so on GPU the
# block is as wide as the next power of two and the lanes past D are masked
# out of the statistics (Pallas masks the loads and stores past the array).


def _next_pow2(n: int) -> int:
  return 1 << (n - 1).bit_length()


def token_block(n: int, d: int, backend: str) -> Optional[tuple[int, int]]:
  """(tokens per program Tb, block width) for [B, N, D] tokens, or None.

  Tb divides N and the block fits the budget; on GPU Tb and the width are
  powers of two (the width >= D), on TPU Tb is a multiple of 8 (sublanes) or
  N, and D must be a multiple of 128 (lanes).
  """
  width = _next_pow2(d) if backend == "gpu" else d
  budget = MAX_BLOCK_ELEMENTS_TPU if backend == "tpu" else MAX_BLOCK_ELEMENTS
  if backend == "tpu" and d % 128:
    return None
  for tb in range(n, 0, -1):
    if (n % tb or tb * width > budget or (backend == "gpu" and not _is_pow2(tb))
        or (backend == "tpu" and tb != n and tb % 8)):
      continue
    return tb, width
  return None


def layer_norm_modulate_reference(x: jax.Array, shift: jax.Array, scale: jax.Array,
                                  eps: float) -> jax.Array:
  """LayerNorm over the last axis of [B, N, D] (float32), then * (1 + scale) + shift
  with [B, D] modulation; float32. DiT's xla path (`dit.norm_modulate`) and the
  kernel's backward pass."""
  x = x.astype(jnp.float32)
  mean = x.mean(axis=-1, keepdims=True)
  var = jnp.square(x - mean).mean(axis=-1, keepdims=True)
  y = (x - mean) * jax.lax.rsqrt(var + eps)
  return y * (1 + scale[:, None, :].astype(jnp.float32)) + shift[:, None, :].astype(jnp.float32)


def _ln_kernel(x_ref, shift_ref, scale_ref, o_ref, *, d: int, eps: float):
  """Tb tokens of one example: statistics over the first d lanes, modulation, cast."""
  x = x_ref[0].astype(jnp.float32)                        # [Tb, width]
  valid = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1) < d
  x = jnp.where(valid, x, 0.0)
  mean = jnp.sum(x, axis=1, keepdims=True) / d
  dev = jnp.where(valid, x - mean, 0.0)
  var = jnp.sum(dev * dev, axis=1, keepdims=True) / d
  y = dev * jax.lax.rsqrt(var + eps) * (1 + scale_ref[0]) + shift_ref[0]
  o_ref[0] = y.astype(o_ref.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm_modulate(x: jax.Array, shift: jax.Array, scale: jax.Array, eps: float,
                        out_dtype: Any) -> jax.Array:
  """DiT's modulate(layer_norm(x), shift, scale) of [B, N, D] tokens, in out_dtype.

  The Pallas kernel where a block fits (`token_block`), else the reference;
  interpreted on CPU; the backward pass is XLA's gradient of the reference.
  """
  backend = jax.default_backend()
  blk = token_block(x.shape[1], x.shape[2], backend)
  if blk is None:
    return layer_norm_modulate_reference(x, shift, scale, eps).astype(out_dtype)
  return _ln_pallas(x, shift, scale, eps, out_dtype, *blk, backend)


def _ln_pallas(x, shift, scale, eps, out_dtype, tb, width, backend):
  """The kernel with Tb tokens per program in blocks `width` lanes wide (>= D)."""
  b, n, d = x.shape
  mod = lambda a: a.astype(jnp.float32).reshape(b, 1, d)
  return pl.pallas_call(
      functools.partial(_ln_kernel, d=d, eps=eps),
      out_shape=jax.ShapeDtypeStruct((b, n, d), out_dtype),
      grid=(b, n // tb),
      in_specs=[pl.BlockSpec((1, tb, width), lambda i, j: (i, j, 0)),
                pl.BlockSpec((1, 1, width), lambda i, j: (i, 0, 0)),
                pl.BlockSpec((1, 1, width), lambda i, j: (i, 0, 0))],
      out_specs=pl.BlockSpec((1, tb, width), lambda i, j: (i, j, 0)),
      interpret=backend == "cpu", compiler_params=_compiler_params(backend),
      name="layer_norm_modulate",
  )(x, mod(shift), mod(scale))


def _ln_fwd(x, shift, scale, eps, out_dtype):
  return layer_norm_modulate(x, shift, scale, eps, out_dtype), (x, shift, scale)


def _ln_bwd(eps, out_dtype, saved, g):
  _, vjp = jax.vjp(
      lambda *a: layer_norm_modulate_reference(*a, eps).astype(out_dtype), *saved)
  return vjp(g)


layer_norm_modulate.defvjp(_ln_fwd, _ln_bwd)
