"""REPA (Yu et al. 2025, arXiv 2410.06940): representation alignment, a training-only head.

REPA adds to the process's loss a term that pulls a projection of the
network's hidden tokens towards a frozen encoder's patch tokens of the clean
image (`training.repa.*`, docs/repa.md):

  h      = the network's tokens after block `depth` (1-based), [B, N, D], of
           the process's network call on x_t (its Spec's `repa` says which call)
  z~     = projector(h), [B, N, E]: Dense(dim) SiLU Dense(dim) SiLU Dense(E),
           Glorot-uniform kernels and zero biases (SiT's init, which REPA's
           projectors get as submodules of the SiT)
  z      = the encoder's final-LayerNorm patch tokens of the clean images
           (DINOv2's x_norm_patchtokens), preprocessed as REPA does
           (`ddx.encoders.dinov2.preprocess`: [0, 1], ImageNet mean/std,
           torch bicubic to `resolution`), [B, M, E], then matched to the
           network's token grid (`match_grid`) when M != N
  loss   = process loss + weight * mean over examples and tokens of
           -cos(z~, z)   (REPA's loss.py: F.normalize both, mean over tokens,
           sum over the batch / B; `alignment`)

The projector's params are `TrainState.repa`: optimised with the network (its
Adam state is opt_state's second half, and training.optim.grad_clip clips the
norm of both gradients together, as REPA clips the SiT with its projectors),
in neither the EMA nor `ddx.load`'s model. The encoder is frozen: its params
are an argument of the jitted step (replicated, never baked in), its
features are under stop_gradient, and it is in neither optimizer nor EMA nor
checkpoint; the workdir records it by path and weights digest in repa.json,
and a resume with other weights is refused.
"""
from __future__ import annotations

import json
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from etils import epath

from ddx import config as config_lib
from ddx import models
from ddx import parallel
from ddx import workdir as workdir_lib
from ddx.encoders import dinov2

RECORD_FILE = "repa.json"
# F.normalize's eps: x / max(|x|, eps).
NORMALIZE_EPS = 1e-12
ZSCORE_EPS = 1e-6      # iREPA's SpatialNormalization eps
# The projector's init key is fold_in(init key, this): the network's init is untouched.
_INIT_STREAM = 0x4E9A

_xavier = nn.initializers.xavier_uniform()


def enabled(config) -> bool:
  """Whether the run trains with REPA (training.repa.encoder is set)."""
  r = config.training.get("repa")
  return bool(r is not None and r.encoder)


class Projector(nn.Module):
  """REPA's projector (models/sit.py's build_mlp): three Dense layers with SiLU.

  Attributes:
    hidden: the inner width (training.repa.projector_dim, 2048).
    features: the output width, the encoder's token width E.
  """
  hidden: int
  features: int

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    """h: [B, N, D] float32 hidden tokens. Returns [B, N, features] float32."""
    dense = lambda n, name: nn.Dense(n, kernel_init=_xavier, bias_init=nn.initializers.zeros,
                                     name=name)
    h = nn.silu(dense(self.hidden, "fc1")(h))
    h = nn.silu(dense(self.hidden, "fc2")(h))
    return dense(self.features, "fc3")(h)


class ConvProjector(nn.Module):
  """iREPA's projector (arXiv 2512.10794): one Conv(kernel x kernel, "SAME") on
  the token grid, from D to the encoder's width, initialised as torch's Conv2d
  (uniform weights and bias in +-1/sqrt(fan_in); SiT's init touches only its
  Linear layers).

  Attributes:
    features: the output width E.
    kernel: the kernel side (odd).
    grid: the token grid (rows, columns) the N tokens lie on, row-major.
  """
  features: int
  kernel: int
  grid: tuple[int, int]

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    """h: [B, N, D] float32 hidden tokens. Returns [B, N, features] float32."""
    b, n, d = h.shape
    fan_in = self.kernel * self.kernel * d
    bound = 1.0 / fan_in ** 0.5
    uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound)
    x = h.reshape(b, self.grid[0], self.grid[1], d)
    x = nn.Conv(self.features, (self.kernel, self.kernel), padding="SAME",
                kernel_init=uniform, bias_init=uniform, name="conv")(x)
    return x.reshape(b, n, self.features)


def spatial_zscore(tokens: jax.Array, alpha: float, eps: float = ZSCORE_EPS) -> jax.Array:
  """iREPA's spatial normalisation of encoder tokens [B, N, E] over the N tokens:
  (z − α·mean) / (std + eps), std with Bessel's correction (torch's Tensor.std)."""
  mean = jnp.mean(tokens, axis=1, keepdims=True)
  std = jnp.std(tokens, axis=1, keepdims=True, ddof=1)
  return (tokens - alpha * mean) / (std + eps)


def token_layout(config) -> tuple[int, tuple[int, int], int]:
  """(blocks, token grid (rows, columns), token width) of the run's network
  (its Spec's `hidden_tokens`, for the side the network sees)."""
  m = config.model
  side = config_lib.image_shape(config)[0]
  out = models.spec(m.get("name", models.DEFAULT)).hidden_tokens(m, side, side)
  if out is None:
    raise config_lib.ConfigError(
        f"training.repa needs a network that exposes its hidden tokens; model.name="
        f"{m.get('name')!r} does not")
  return out


def projector(config, encoder_width: int) -> nn.Module:
  """training.repa.projector's module for an encoder of width E."""
  r = config.training.repa
  if r.projector == "conv":
    _, grid, _ = token_layout(config)
    return ConvProjector(int(encoder_width), int(r.get("projector_kernel", 3)), tuple(grid))
  return Projector(int(r.projector_dim), int(encoder_width))


def init_projector(config, encoder_width: int, rng: jax.Array) -> Any:
  """Fresh projector params for the run's network and an encoder of width E.

  Args:
    rng: the state's init key; the projector draws from fold_in(rng, const).
  """
  _, grid, width = token_layout(config)
  h = jnp.zeros((1, grid[0] * grid[1], width), jnp.float32)
  return projector(config, encoder_width).init(
      jax.random.fold_in(rng, _INIT_STREAM), h)["params"]


def load_encoder(config, mesh) -> Optional[dinov2.Encoder]:
  """training.repa.encoder's encoder, replicated over `mesh`; None when off.

  Raises:
    config_lib.ConfigError: the folder does not load, or training.repa.resolution
      is not a multiple of its patch size (one line).
  """
  if not enabled(config):
    return None
  r = config.training.repa
  try:
    encoder = dinov2.load(r.encoder)
  except dinov2.EncoderWeightsError as e:
    raise config_lib.ConfigError(f"training.repa.encoder={r.encoder!r}: {e}") from None
  patch = encoder.config.patch_size
  if r.resolution % patch:
    raise config_lib.ConfigError(
        f"training.repa.resolution={r.resolution} is not a multiple of the encoder's "
        f"patch size {patch}; use a multiple, e.g. {max(1, r.resolution // patch) * patch} "
        "(REPA: 224 = 16 patches of 14)")
  return parallel.replicate(encoder, mesh)


def match_grid(tokens: jax.Array, grid: tuple[int, int], to: tuple[int, int]) -> jax.Array:
  """Tokens [B, gh*gw, E] on a row-major grid resized to the grid `to`.

  Bilinear (jax.image.resize "linear", antialiased when shrinking: a
  triangle filter as wide as the scale), per channel; the identity when the
  grids are equal. REPA itself picks the encoder's resolution so the grids
  agree (224 px / 14 = 16 = 256 px / 8 / 2); this serves the others.
  """
  if tuple(grid) == tuple(to):
    return tokens
  b, _, e = tokens.shape
  x = tokens.reshape(b, grid[0], grid[1], e)
  x = jax.image.resize(x, (b, to[0], to[1], e), "linear")
  return x.reshape(b, to[0] * to[1], e)


def encoder_targets(encoder: dinov2.Encoder, images: jax.Array, resolution: int,
                    grid: tuple[int, int], spatial_norm: str = "none",
                    zscore_alpha: float = 1.0) -> jax.Array:
  """The encoder's patch tokens of clean images, on the network's token grid.

  Args:
    encoder: the frozen encoder (params as jit arguments).
    images: [B, H, W, C] float32 in [-1, 1], C = 1 (repeated to RGB) or 3.
    resolution: the encoder's input side (training.repa.resolution).
    grid: the network's token grid (rows, columns).
    spatial_norm: "zscore" applies iREPA's `spatial_zscore` (with zscore_alpha)
      on the encoder's own grid, before it is matched; "none" (REPA) does not.
  Returns:
    [B, rows*columns, E] float32 under stop_gradient.
  """
  if images.shape[-1] == 1:
    images = jnp.repeat(images, 3, axis=-1)
  x = dinov2.preprocess(images.astype(jnp.float32), resolution)
  patch = dinov2.forward(encoder, x)["patch"].astype(jnp.float32)
  if spatial_norm == "zscore":
    patch = spatial_zscore(patch, zscore_alpha)
  side = resolution // encoder.config.patch_size
  return jax.lax.stop_gradient(match_grid(patch, (side, side), grid))


def _normalize(x: jax.Array) -> jax.Array:
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, NORMALIZE_EPS)


def alignment(projected: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
  """REPA's projection loss: -cos of the normalised vectors, mean over tokens and batch.

  Args:
    projected: [B, N, E] the projector's output z~.
    target: [B, N, E] the encoder's tokens z.
  Returns:
    (loss, mean cosine) float32 scalars; loss = -mean cosine.
  """
  cos = jnp.sum(_normalize(projected.astype(jnp.float32))
                * _normalize(target.astype(jnp.float32)), axis=-1)
  mean = jnp.mean(cos)
  return -mean, mean


def loss(config, projector_params: Any, hidden: jax.Array,
         target: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`alignment` of the projected hidden tokens [B, N, D] with target [B, N, E]."""
  z = projector(config, target.shape[-1]).apply({"params": projector_params},
                                                hidden.astype(jnp.float32))
  return alignment(z, target)


def _record_path(workdir: str) -> epath.Path:
  return epath.Path(workdir) / RECORD_FILE


def record(config, encoder: Optional[dinov2.Encoder]) -> Optional[dict]:
  """What identifies the run's REPA encoder: {"encoder": path, "weights":
  its weights digest, "config": its architecture}; None without REPA."""
  if encoder is None:
    return None
  return {"encoder": config.training.repa.encoder, "weights": encoder.digest,
          "config": encoder.config.to_dict()}


def write_record(workdir: str, rec: Optional[dict]) -> None:
  """Writes repa.json at a run's start before its first checkpoint (the
  trainer keeps it as it is on resume); removes an earlier start's without REPA."""
  path = _record_path(workdir)
  if rec is not None:
    path.write_text(json.dumps(rec, indent=2, sort_keys=True) + "\n")
  elif path.exists():
    path.unlink()


def check_record(workdir: str, rec: Optional[dict]) -> None:
  """Refuses to resume a REPA run whose encoder's weights differ from those it
  started with (repa.json): the projector was trained towards other features.

  Raises:
    config_lib.ConfigError: one line naming both folders.
  """
  path = _record_path(workdir)
  first = None if rec is None else workdir_lib.read_record(path)
  if first is None or first.get("weights") == rec["weights"]:
    return
  raise config_lib.ConfigError(
      f"training.repa.encoder={rec['encoder']!r} has other weights (digest "
      f"{rec['weights'][:12]}...) than the encoder the run in {workdir} started with "
      f"({first.get('encoder')!r}, {str(first.get('weights'))[:12]}..., {path}); point "
      "training.repa.encoder at those weights, or use a new --workdir")
