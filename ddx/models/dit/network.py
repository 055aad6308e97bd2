"""The Diffusion Transformer, DiT (Peebles & Xie 2023, arXiv 2212.09748), in Flax linen.

Architecture (channels-last; p = patch_size, D = hidden_size):

  tokens = Conv(D, kernel = stride = p)(x)  reshaped to [B, N, D], N = HW/p^2,
           + a FIXED 2-D sin-cos position embedding (a constant, not a param)
  c      = MLP(sinusoidal(t, 256)) [+ Embed(num_classes + 1, D)(label)]
  depth x DiTBlock (adaLN-Zero): shift/scale/gate for attention and MLP come
           from Dense(6D)(SiLU(c));
             x = x + gate_msa * Attn(LN(x) * (1 + scale_msa) + shift_msa)
             x = x + gate_mlp * MLP(LN(x) * (1 + scale_mlp) + shift_mlp)
           (LN without affine parameters, eps 1e-6; MLP = Dense(D * mlp_ratio),
           GELU (tanh), Dense(D); multi-head attention, qkv with bias)
  final  : LN modulated by Dense(2D)(SiLU(c)) (shift, scale), Dense(p*p*C_out),
           unpatchified to [B, H, W, C_out].

Initialisation follows the official code: Glorot-uniform dense kernels (the
patch embedding's over its flattened kernel) and zero biases, normal(0.02)
time-MLP kernels and label table, and zero adaLN modulation and output layers,
so every block is the identity and the output is exactly zero at init.

Calling convention (the same as the U-Net's, so callers treat both alike):
`DiT(...).apply(variables, x, t, labels=None, train=False)` with x [B, H, W, C]
float32, t [B] the noise-conditioning value (used as float: DDPM step index
i in [0, T), or a continuous value), labels [B] int32 in [0, num_classes]
where `num_classes` is the null label (None = all null); returns float32
[B, H, W, C], or [B, H, W, 2C] with learn_sigma (the mean channels first, then
the variance channels, as the official DiT). `train` is accepted and unused.

Official layout, kept so facebookresearch/DiT checkpoints can be imported:
  * the timestep embedding is [cos, sin] with frequencies
    exp(-log(10000) * k / 128), k = 0..127 (unlike the U-Net's [sin, cos]);
  * the position embedding's first D/2 channels encode the patch's COLUMN
    (the official code names them "h" but feeds them the meshgrid's w
    coordinate), the last D/2 its ROW; each half is [sin(pos * w_k),
    cos(pos * w_k)] with w_k = 10000^(-k / (D/4)); tokens are in row-major
    patch order;
  * a patch token's channels are ordered (row in patch, column in patch,
    channel), for both the patch embedding and the output;
  * the qkv projection's output is laid out as [3, heads, head_dim];
  * parameter names follow the torch module paths (`blocks_3/attn/qkv`,
    `t_embedder/mlp_0`, `adaLN_modulation_1`, ...).
The official parameter count includes the (frozen) position embedding; here it
is a constant, so counts are N * D smaller.

LightningDiT's block options (Yao et al. 2025, arXiv 2501.01423, as the
hustvl/LightningDiT code builds them; model.* keys of the spec, whose
defaults are the DiT above, bit for bit: no parameter added, the same program):
  mlp=swiglu       the MLP is SwiGLU: Dense(2h) "w12" split into (a, b), then
                   Dense(D) "w3" of silu(a) * b, h = int(2/3 * int(D * mlp_ratio))
                   (`spec.swiglu_hidden`; about the GELU MLP's parameters);
  token_norm=rms   each adaLN norm is an RMSNorm with a learned scale [D]
                   ("norm1", "norm2", "norm_final"; eps 1e-6, float32) before
                   the modulation, in place of the affine-free LayerNorm;
  qk_norm          q and k are normalised per head over head_dim ("q_norm",
                   "k_norm", one [head_dim] affine shared by the heads):
                   LayerNorm with scale and bias, eps 1e-5 (torch's default, as
                   LightningDiT's nn.LayerNorm), or with token_norm=rms the
                   RMSNorm above;
  pos_embed=rope   after the QK norm, q and k are rotated by EVA-02's 2-D RoPE
                   (`rope_2d`): the first head_dim/2 channels by the token's
                   row, the last head_dim/2 by its column, in adjacent pairs
                   (2i, 2i+1) at frequency 10000^(-2i / (head_dim/2)). The
                   sin-cos absolute embedding is still added to the tokens, as
                   LightningDiT does.

Hidden tokens (REPA, `ddx.repa`): after each block the tokens [B, N, D] float32
are sown into the "hidden" collection (`layers.sow_hidden`); only an apply with
mutable=["hidden"] keeps them, so the default program is unchanged.

Mixed precision: with dtype=bfloat16 the dense layers, the patch conv, the
label embedding and the attention products run in bfloat16 while parameters
stay float32; the residual stream, LayerNorm statistics, the modulation and
the attention softmax are float32, and the output is float32.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddx.models import attention as attention_lib
from ddx.models import fused_norm
from ddx.models.base import check_inputs, module_fields
from ddx.models.dit.spec import PATCH_SIZES, PRESETS, SPEC, preset  # noqa: F401 (as before the move)
from ddx.models.dit.spec import swiglu_hidden
from ddx.models.layers import (fourier_embedding, rematerialised, scaled_time, sow_hidden,
                               sow_logvar, split_time, timestep_embedding)

FREQUENCY_EMBEDDING_SIZE = 256
_LN_EPSILON = 1e-6
# LightningDiT's RMSNorm (Llama's code): eps 1e-6. Its QK LayerNorm is
# torch's nn.LayerNorm(head_dim): affine, eps 1e-5.
RMS_EPSILON = 1e-6
QK_LN_EPSILON = 1e-5
ROPE_THETA = 10000.0

_xavier = nn.initializers.xavier_uniform()
# The official code initialises the patch conv like a linear layer on the
# flattened patch: fan_in = p * p * C, fan_out = D (not D * p * p).
_patch_init = nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=-1)
_normal_002 = nn.initializers.normal(stddev=0.02)
_zeros = nn.initializers.zeros


def patchify(x: jax.Array, p: int) -> jax.Array:
  """Cuts images into non-overlapping p x p patches, one token per patch.

  Args:
    x: [B, H, W, C] with H and W divisible by p.
    p: patch size.

  Returns:
    [B, (H/p) * (W/p), p * p * C], tokens in row-major patch order, each
    token's channels ordered (row in patch, column in patch, channel).
  """
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: jax.Array, p: int, h: int, w: int, c: int) -> jax.Array:
  """Inverse of `patchify`: tokens back to images.

  Args:
    tokens: [B, (h/p) * (w/p), p * p * c] in `patchify`'s layout.
    p: patch size.
    h, w: image height and width (multiples of p).
    c: channels per pixel.

  Returns:
    [B, h, w, c].
  """
  b = tokens.shape[0]
  x = tokens.reshape(b, h // p, w // p, p, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """[sin(pos * w_k), cos(pos * w_k)], w_k = 10000^(-k / (dim/2)); [M, dim]."""
  omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
  out = np.outer(pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """The fixed 2-D sin-cos position embedding of a grid of patches.

  Args:
    dim: embedding size; a multiple of 4.
    grid_h, grid_w: patches per column and per row (H/p, W/p).

  Returns:
    [grid_h * grid_w, dim] float32 numpy, rows in row-major patch order; the
    first dim/2 channels encode the column index, the last dim/2 the row
    index (the official layout; see the module docstring).
  """
  if dim % 4:
    raise ValueError(f"the 2-D sin-cos embedding needs dim % 4 == 0, got {dim}")
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  emb = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)],
                       axis=1)
  return emb.astype(np.float32)


def rope_2d(head_dim: int, grid_h: int, grid_w: int) -> tuple[np.ndarray, np.ndarray]:
  """The cos and sin tables of EVA-02's 2-D rotary embedding (LightningDiT's
  VisionRotaryEmbeddingFast), for a grid_h x grid_w grid of patches.

  Channel c of a head, in the first head_dim/2, rotates with the token's row
  r; in the last head_dim/2 with its column; within each half, channels
  (2i, 2i+1) form a pair at frequency w_i = 10000^(-2i / (head_dim/2)),
  i < head_dim/4. The positions are the integer row and column (LightningDiT's
  t = arange(n) / n * n at its trained size).

  Args:
    head_dim: channels per head; a multiple of 4.
    grid_h, grid_w: patches per column and per row.

  Returns:
    (cos, sin), each [grid_h * grid_w, head_dim] float64 numpy (constants,
    cast to the computation's float32 by `apply_rope`), rows in row-major
    patch order, each pair's angle repeated in both its channels.
  """
  if head_dim % 4:
    raise ValueError(f"2-D RoPE needs head_dim % 4 == 0, got {head_dim}")
  quarter = head_dim // 4
  freqs = ROPE_THETA ** (-np.arange(0, 2 * quarter, 2, dtype=np.float64) / (2 * quarter))
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  angle = lambda pos: np.repeat(np.outer(pos.reshape(-1), freqs), 2, axis=1)
  angles = np.concatenate([angle(rows), angle(cols)], axis=1)
  return np.cos(angles), np.sin(angles)


def apply_rope(x: jax.Array, cos: np.ndarray, sin: np.ndarray) -> jax.Array:
  """Rotates each adjacent channel pair (x_2i, x_2i+1) of every head by its angle:
  x * cos + rotate_half(x) * sin, rotate_half(x)_(2i, 2i+1) = (-x_2i+1, x_2i).

  Args:
    x: [B, N, heads, head_dim] queries or keys, any float dtype.
    cos, sin: [N, head_dim] from `rope_2d`.

  Returns:
    [B, N, heads, head_dim] in x's dtype (computed in float32, or float64).
  """
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))   # float64 stays (tests)
  pairs = xf.reshape(x.shape[:-1] + (-1, 2))
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  cos, sin = (jnp.asarray(a, xf.dtype)[None, :, None] for a in (cos, sin))
  return (xf * cos + rotated * sin).astype(x.dtype)


class Norm(nn.Module):
  """A normalisation over the last axis with a learned affine map; float32
  statistics and result (the caller casts).

  Attributes:
    kind: "layer" (LayerNorm: (x - mean) / std * scale + bias) or "rms"
      (RMSNorm: x / rms * scale, no bias).
    epsilon: added to the variance (mean square for rms).
  """
  kind: str = "rms"
  epsilon: float = RMS_EPSILON

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x: [..., C]. Returns: [..., C] float32 (float64 for float64 x)."""
    c = x.shape[-1]
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    if self.kind == "rms":
      return xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True)
                                + self.epsilon) * scale
    bias = self.param("bias", _zeros, (c,), jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    return (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


def _modulate(h: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN's h * (1 + scale) + shift with [B, D] modulation; float32."""
  return h * (1 + scale[:, None, :]) + shift[:, None, :]


def norm_modulate(x: jax.Array, shift: jax.Array, scale: jax.Array, dtype: Any,
                  kernel: str = "xla") -> jax.Array:
  """LayerNorm of each token (no affine parameters, float32 statistics, eps
  1e-6), then adaLN's x * (1 + scale) + shift, cast to dtype.

  Args:
    x: [B, N, D] tokens, any float dtype.
    shift, scale: [B, D] per-example modulation, broadcast over the tokens.
    dtype: the result's dtype.
    kernel: "xla" (`fused_norm.layer_norm_modulate_reference`, which XLA fuses
      as it likes) or "pallas" (`fused_norm.layer_norm_modulate`, one kernel;
      the same function).
  """
  if kernel == "pallas":
    return fused_norm.layer_norm_modulate(x, shift, scale, _LN_EPSILON, jnp.dtype(dtype))
  return fused_norm.layer_norm_modulate_reference(x, shift, scale, _LN_EPSILON).astype(dtype)


def _dense(features: int, dtype: Any, name: str, kernel_init=_xavier) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, kernel_init=kernel_init,
                  bias_init=_zeros, name=name)


class Attention(nn.Module):
  """Multi-head self-attention over the tokens (qkv with bias, then proj).

  Attributes:
    num_heads: heads; must divide the token width D.
    dtype: computation dtype (the softmax is float32 regardless).
    attention: "xla" | "auto" | "cudnn" | "tpu_flash" (`ddx.models.attention`).
    qk_norm: None, or "layer" | "rms": normalise q and k per head ("q_norm",
      "k_norm"; LayerNorm eps 1e-5, RMSNorm eps 1e-6).
    rope_grid: None, or (grid_h, grid_w): rotate q and k by `rope_2d` (after
      the QK norm, as LightningDiT).
  """
  num_heads: int
  dtype: Any = jnp.float32
  attention: str = "xla"
  qk_norm: Optional[str] = None
  rope_grid: Optional[tuple[int, int]] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies attention.

    Args:
      x: [B, N, D] tokens.

    Returns:
      [B, N, D] in `dtype`.
    """
    b, n, d = x.shape
    qkv = _dense(3 * d, self.dtype, "qkv")(x)
    # The official (timm) layout of the qkv output: [3, heads, head_dim].
    qkv = qkv.reshape(b, n, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.qk_norm is not None:
      eps = RMS_EPSILON if self.qk_norm == "rms" else QK_LN_EPSILON
      q = Norm(self.qk_norm, eps, name="q_norm")(q).astype(q.dtype)
      k = Norm(self.qk_norm, eps, name="k_norm")(k).astype(k.dtype)
    if self.rope_grid is not None:
      cos, sin = rope_2d(d // self.num_heads, *self.rope_grid)   # constants
      q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # Scale 1/sqrt(head_dim); logits and softmax in float32 (also for bf16).
    if self.attention == "xla":
      h = jax.nn.dot_product_attention(q, k, v)
    else:
      h = attention_lib.attend(q, k, v, self.attention)
    return _dense(d, self.dtype, "proj")(h.reshape(b, n, d))


class Mlp(nn.Module):
  """Dense(hidden) -> GELU (tanh approximation) -> Dense(D).

  Attributes:
    hidden: width of the hidden layer.
    dtype: computation dtype.
  """
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x: [B, N, D]. Returns: [B, N, D] in `dtype`."""
    h = _dense(self.hidden, self.dtype, "fc1")(x)
    h = nn.gelu(h, approximate=True)
    return _dense(x.shape[-1], self.dtype, "fc2")(h)


class SwiGLU(nn.Module):
  """Dense(2 * hidden) "w12" -> (a, b) halves -> silu(a) * b -> Dense(D) "w3"
  (LightningDiT's SwiGLUFFN, with biases).

  Attributes:
    hidden: width of the gated hidden layer (`spec.swiglu_hidden`).
    dtype: computation dtype.
  """
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x: [B, N, D]. Returns: [B, N, D] in `dtype`."""
    a, b = jnp.split(_dense(2 * self.hidden, self.dtype, "w12")(x), 2, axis=-1)
    return _dense(x.shape[-1], self.dtype, "w3")(nn.silu(a) * b)


class DiTBlock(nn.Module):
  """A transformer block with adaLN-Zero conditioning (the paper's Fig. 3).

  The modulation layer starts at zero, so the gates are zero and the block is
  the identity at init.

  Attributes:
    num_heads: attention heads; must divide D.
    mlp_ratio: MLP hidden width / D.
    dtype: computation dtype of the dense layers and attention.
    attention: the attention implementation (see `Attention`).
    norm_kernel: "xla" | "pallas" (`norm_modulate`; LayerNorm only).
    mlp: "gelu" (`Mlp`) | "swiglu" (`SwiGLU`).
    token_norm: "layer" (affine-free LayerNorm) | "rms" (`Norm`, "norm1",
      "norm2"), before each modulation.
    qk_norm: normalise q and k per head, with token_norm's kind of norm.
    rope_grid: None, or the patch grid (grid_h, grid_w) of 2-D RoPE.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  attention: str = "xla"
  norm_kernel: str = "xla"
  mlp: str = "gelu"
  token_norm: str = "layer"
  qk_norm: bool = False
  rope_grid: Optional[tuple[int, int]] = None

  def _norm_modulate(self, x, shift, scale, name):
    if self.token_norm == "rms":
      return _modulate(Norm("rms", RMS_EPSILON, name=name)(x), shift, scale).astype(
          self.dtype)
    return norm_modulate(x, shift, scale, self.dtype, self.norm_kernel)

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    """Applies the block.

    Args:
      x: [B, N, D] float32 tokens (the residual stream).
      c: [B, D] conditioning (time + label embedding).

    Returns:
      [B, N, D] float32.
    """
    d = x.shape[-1]
    mod = _dense(6 * d, self.dtype, "adaLN_modulation_1",
                 kernel_init=_zeros)(nn.silu(c)).astype(jnp.float32)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        jnp.split(mod, 6, axis=-1))
    h = self._norm_modulate(x, shift_msa, scale_msa, "norm1")
    h = Attention(self.num_heads, self.dtype, self.attention,
                  self.token_norm if self.qk_norm else None, self.rope_grid,
                  name="attn")(h)
    x = x + gate_msa[:, None, :] * h.astype(jnp.float32)
    h = self._norm_modulate(x, shift_mlp, scale_mlp, "norm2")
    if self.mlp == "swiglu":
      h = SwiGLU(swiglu_hidden(d, self.mlp_ratio), self.dtype, name="mlp")(h)
    else:
      h = Mlp(int(d * self.mlp_ratio), self.dtype, name="mlp")(h)
    return x + gate_mlp[:, None, :] * h.astype(jnp.float32)


class TimestepEmbedder(nn.Module):
  """embedding(t · scale, 256) -> Dense(D) -> SiLU -> Dense(D).

  Attributes:
    hidden_size: D.
    dtype: computation dtype.
    kind: "positional" (DiT's sinusoidal table) or "fourier" (fixed random
      frequencies, ddx.models.layers.fourier_embedding).
    scale: factor on t before the embedding (1 = DiT's).
    zero_out: the last Dense starts at zero (a second time's embedder, so
      the network starts as the one-time network).
    logvar: also sow the learned log-variance head on the features
      (`ddx.models.layers.sow_logvar`).
  """
  hidden_size: int
  dtype: Any = jnp.float32
  kind: str = "positional"
  scale: float = 1.0
  zero_out: bool = False
  logvar: bool = False

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    """Args: t: [B] numeric. Returns: [B, D] in `dtype`."""
    t = scaled_time(t, self.scale)
    if self.kind == "fourier":
      f = fourier_embedding(t, FREQUENCY_EMBEDDING_SIZE)
    else:   # DiT's table: [cos, sin], frequencies exp(-log(10000) k / 128)
      f = timestep_embedding(t, FREQUENCY_EMBEDDING_SIZE, flip_sin_to_cos=True,
                             freq_shift=0)
    if self.logvar:
      sow_logvar(self, f, self.dtype)
    h = _dense(self.hidden_size, self.dtype, "mlp_0", _normal_002)(f)
    return _dense(self.hidden_size, self.dtype, "mlp_2",
                  _zeros if self.zero_out else _normal_002)(nn.silu(h))


class FinalLayer(nn.Module):
  """adaLN-modulated LayerNorm, then Dense(p * p * C_out); all zero at init.

  Attributes:
    out_features: p * p * C_out.
    dtype: computation dtype.
    norm_kernel: "xla" | "pallas" (`norm_modulate`).
    token_norm: "layer" | "rms" (`Norm`, "norm_final").
  """
  out_features: int
  dtype: Any = jnp.float32
  norm_kernel: str = "xla"
  token_norm: str = "layer"

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    """Args: x: [B, N, D] float32; c: [B, D]. Returns: [B, N, out_features]."""
    d = x.shape[-1]
    mod = _dense(2 * d, self.dtype, "adaLN_modulation_1",
                 kernel_init=_zeros)(nn.silu(c)).astype(jnp.float32)
    shift, scale = jnp.split(mod, 2, axis=-1)
    if self.token_norm == "rms":
      h = _modulate(Norm("rms", RMS_EPSILON, name="norm_final")(x), shift,
                    scale).astype(self.dtype)
    else:
      h = norm_modulate(x, shift, scale, self.dtype, self.norm_kernel)
    return _dense(self.out_features, self.dtype, "linear", _zeros)(h)


class DiT(nn.Module):
  """Diffusion Transformer predicting a tensor of the input's shape.

  The fields are the contract's (`ddx.models.base`) and the DiT keys of
  `config.model` (`ddx.models.dit.spec`, whose checks it runs when traced).

  Attributes:
    patch_size: p; H and W must be multiples of it.
    hidden_size: token width D; a multiple of 4 and of num_heads.
    depth: number of DiT blocks.
    num_heads: attention heads.
    mlp_ratio: MLP hidden width / D.
    num_classes: classes for label conditioning; 0 = unconditional.
    learn_sigma: also output C variance channels (after the C mean channels).
    time_embedding: "positional" (DiT's) or "fourier" (see TimestepEmbedder).
    time_scale: factor on `t` before the time embedding (1 = DiT's).
    dtype: computation dtype, "float32" or "bfloat16" (a string, as in the
      config, or a jnp dtype); parameters stay float32.
    attention: attention implementation, "xla" | "auto" | "cudnn" |
      "tpu_flash" (`ddx.models.attention`); the same function either way.
    norm_kernel: "xla", or "pallas" for each LayerNorm + adaLN modulation as
      one Pallas kernel (`ddx.models.fused_norm`); the same function.
    remat: what the backward pass recomputes in each DiT block, "none" |
      "dots" | "full" (`ddx.models.layers.rematerialised`; the trainer sets
      it from training.remat). Changes memory and time, not the gradients.
    second_time: the network takes a second time (t of shape [B, 2]), embedded
      by its own TimestepEmbedder ("t2_embedder") whose last layer starts at
      zero, so the network starts as the one-time network.
    logvar: a learned log-variance head on the time features
      (`ddx.models.layers.sow_logvar`; adaptive loss weighting).
    mlp: "gelu" (DiT's) | "swiglu" (LightningDiT's; see the module docstring).
    token_norm: "layer" (DiT's) | "rms" (LightningDiT's RMSNorm).
    pos_embed: "sincos" (DiT's) | "rope" (also 2-D RoPE on q and k).
    qk_norm: normalise q and k per head (LightningDiT's option).
  """
  patch_size: int = 2
  hidden_size: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  num_classes: int = 0
  learn_sigma: bool = False
  time_embedding: str = "positional"
  time_scale: float = 1.0
  dtype: Any = jnp.float32
  attention: str = "xla"
  norm_kernel: str = "xla"
  remat: str = "none"
  second_time: bool = False
  logvar: bool = False
  mlp: str = "gelu"
  token_norm: str = "layer"
  pos_embed: str = "sincos"
  qk_norm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array,
               labels: Optional[jax.Array] = None,
               train: bool = False) -> jax.Array:
    """Runs the network.

    Args:
      x: [B, H, W, C] float32 noisy input.
      t: [B] noise-conditioning value (int step index or float), used as
        float32; [B, 2] with second_time.
      labels: [B] int32 class labels in [0, num_classes] (num_classes = null),
        or None (all null). Only allowed when num_classes > 0.
      train: unused (DiT has no dropout); accepted so callers treat every
        backbone alike.

    Returns:
      [B, H, W, C] float32, or [B, H, W, 2C] with learn_sigma (mean first).
    """
    del train
    check_inputs(self, SPEC, x, t, labels)
    if self.norm_kernel != "xla":
      SPEC.check_norm_kernel(module_fields(self))
    b, hgt, wid, ch = x.shape
    p, d = self.patch_size, self.hidden_size
    out_ch = 2 * ch if self.learn_sigma else ch
    dt = jnp.dtype(self.dtype)   # the config gives a string

    tokens = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=dt,
                     kernel_init=_patch_init, bias_init=_zeros,
                     name="x_embedder")(x.astype(dt))
    pos = sincos_pos_embed_2d(d, hgt // p, wid // p)   # a constant
    tokens = tokens.reshape(b, -1, d).astype(jnp.float32) + pos[None]

    t, t2 = split_time(t, self.second_time, "DiT")
    c = TimestepEmbedder(d, dt, self.time_embedding, self.time_scale,
                         logvar=self.logvar, name="t_embedder")(t)
    if t2 is not None:
      c = c + TimestepEmbedder(d, dt, self.time_embedding, self.time_scale,
                               zero_out=True, name="t2_embedder")(t2)
    if self.num_classes > 0:
      if labels is None:
        labels = jnp.full((b,), self.num_classes, dtype=jnp.int32)
      c = c + nn.Embed(self.num_classes + 1, d, dtype=dt,
                       embedding_init=_normal_002, name="y_embedder")(labels)

    block_cls = rematerialised(DiTBlock, self.remat)
    rope_grid = (hgt // p, wid // p) if self.pos_embed == "rope" else None
    for i in range(self.depth):
      tokens = block_cls(self.num_heads, self.mlp_ratio, dt, self.attention,
                         self.norm_kernel, self.mlp, self.token_norm, self.qk_norm,
                         rope_grid, name=f"blocks_{i}")(tokens, c)
      sow_hidden(self, tokens)   # a no-op unless "hidden" is mutable (REPA)
    out = FinalLayer(p * p * out_ch, dt, self.norm_kernel, self.token_norm,
                     name="final_layer")(tokens, c)
    return unpatchify(out, p, hgt, wid, out_ch).astype(jnp.float32)
