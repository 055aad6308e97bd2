"""DDIM inversion (data -> noise, one `lax.scan`) and spherical interpolation of noise.

DDIM with η = 0 (Song et al. 2021, Eq. 12) is a deterministic map from x_T to
x_0. Written in the current state x at ᾱ_cur and the network's ε̂ there, one
step to ᾱ_next is

  x_next = √(ᾱ_next/ᾱ_cur) · (x - √(1-ᾱ_cur) ε̂) + √(1-ᾱ_next) ε̂,

i.e. x_next = √ᾱ_next x̂_0 + √(1-ᾱ_next) ε̂ with x̂_0 = (x - √(1-ᾱ_cur) ε̂)/√ᾱ_cur.
`sample(..., sampler="ddim", eta=0)` walks the descending index sequence
i_S > ... > i_1 = 0 (`discrete.timesteps`) and then steps to ᾱ = 1.
`invert` walks the same points backwards: from x_0 (ᾱ = 1) to index i_1 = 0,
then i_1 -> i_2 -> ... -> i_S, with the same update run towards more noise.

The approximation. Undoing the sampler's step i_{j+1} -> i_j exactly needs
ε̂ = ε_θ(x_{i_{j+1}}, i_{j+1}) at the noisier point, which is what we are
solving for. Like Song et al. (2021, Sec. 4.3) and Mokady et al. (2023,
null-text inversion), `invert` instead uses ε_θ at the point it is leaving:
ε̂ = ε_θ(x_{i_j}, i_j) for the step i_j -> i_{j+1}. The first step leaves the
clean image, which has no index; there the network is evaluated on x_0 itself
at index 0 (ᾱ_0 = 1 - β_1 ≈ 1, so x_0 is close to what x_{i_1} would be), and
x̂_0 is x_0 exactly. So the network sees (x_0, 0), (x_{i_1}, i_1), ...,
(x_{i_{S-1}}, i_{S-1}): S evaluations, as many as the sampler makes. When ε_θ
is smooth in (x, t) each step errs by O(Δ²) in the step size Δ, so the round
trip x_0 -> x_T -> x_0 errs by O(1/steps) (measured first order in
tests/test_inversion.py). With a network that is far from a denoiser (a
random one) over a long schedule, the sampler's x̂_0 = (x - √(1-ᾱ) ε̂)/√ᾱ
magnifies that mismatch by up to 1/√ᾱ_T and the round trip fails.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddx import model as model_lib
from ddx import options as options_lib
from ddx.model import Model
from ddx.processes.ddpm import core as diffusion
from ddx.processes.ddpm import sampling as discrete
from ddx.processes.ddpm.schedules import Schedule
from ddx.sampling import DenoiseFn


def invert(denoise_fn: DenoiseFn, sched: Schedule, x0: jnp.ndarray,
           steps: int = 50, prediction: str = "eps", spacing: str = "uniform",
           return_trajectory: bool = False):
  """DDIM inversion (η = 0): maps data x_0 to the x_T that DDIM sampling maps back to it.

  The exact reverse walk of `sample(denoise_fn, sched, rng, x0.shape,
  sampler="ddim", eta=0, steps=steps, spacing=spacing)`, over the same index
  sequence in ascending order, with ε̂ evaluated at the point each step leaves
  (see the module docstring for the approximation). One `lax.scan`: pure,
  composes under your own `jax.jit`, and compile time and memory do not grow
  with `steps` (unless return_trajectory).

  Args:
    denoise_fn: `denoise_fn(x_t, i) -> [B, ...]`, i int32 [B] in [0, T), in
      the `prediction` parameterisation.
    sched: the noise schedule the model was trained with.
    x0: [B, ...] clean data (any float dtype; computed in float32).
    steps: network evaluations S, 1 <= S <= T (static); use the same number
      when sampling back.
    prediction: what denoise_fn returns: eps | x0 | v.
    spacing: one of `ddx.processes.ddpm.sampling.SPACINGS`; sample back with the same one
      (`ddx.sample_fn` defaults DDIM to "trailing": pass spacing="uniform").
    return_trajectory: also return the state after every step, [S, B, ...],
      in ascending noise order: trajectory[j] is x at index seq[S-1-j] of the
      sampler's sequence, and trajectory[-1] is x_T.
  Returns:
    x_T float32 [B, ...] (x0's shape), or (x_T, trajectory).
  """
  if prediction not in diffusion.PREDICTIONS:
    raise ValueError(
        f"prediction={prediction!r} is unknown; use one of {diffusion.PREDICTIONS}")
  x = jnp.asarray(x0, jnp.float32)
  up = discrete.timesteps(sched.num_timesteps, steps, spacing, sched)[::-1].copy()
  # Step j leaves the point at ᾱ_cur (x_0 itself for j = 0) and lands on up[j];
  # the network is evaluated at the index being left, index 0 for x_0.
  eval_idx = np.concatenate([[0], up[:-1]]).astype(np.int32)
  ab = sched.alphas_cumprod
  a_next = ab[up]
  a_cur = jnp.concatenate([jnp.ones((1,), ab.dtype), ab[up[:-1]]])
  a_eval = ab[eval_idx]   # ᾱ the network's output refers to (≠ a_cur at j = 0)

  def body(x, inp):
    i, a_e, a_c, a_n = inp
    out = denoise_fn(x, jnp.full((x.shape[0],), i, jnp.int32)).astype(jnp.float32)
    # ε̂ as the network means it: its output read at the index it was given.
    _, eps = diffusion.to_x0_eps(out, x, a_e, prediction)
    # x̂_0 from the current point at its own ᾱ: at ᾱ_cur = 1 this is x_0
    # exactly, which makes the first step the exact inverse of the sampler's
    # last one (i_1 -> ᾱ = 1) up to where ε̂ was evaluated.
    x0_hat = (x - jnp.sqrt(1.0 - a_c) * eps) / jnp.sqrt(a_c)
    x = jnp.sqrt(a_n) * x0_hat + jnp.sqrt(1.0 - a_n) * eps
    return x, (x if return_trajectory else None)

  xs = (jnp.asarray(eval_idx), a_eval, a_cur, a_next)
  x, traj = jax.lax.scan(body, x, xs)
  return (x, traj) if return_trajectory else x


@functools.partial(jax.jit, static_argnames=("steps", "guided"))
def _invert_jit(model, images, labels, guidance_scale, *, steps, guided):
  fn = model_lib.denoiser(model, labels, guidance_scale, guided)
  images = model_lib.shard_batch(images)   # data-parallel, as sample_fn
  # Uniform spacing: pass spacing="uniform" to sample_fn to sample back.
  return invert(fn, model.schedule, images, steps=steps,
                prediction=model.schedule.prediction, spacing="uniform")


def invert_fn(model: Model, images: jnp.ndarray, steps: Optional[int] = None, *,
              labels=None, guidance_scale: Optional[float] = None) -> jnp.ndarray:
  """Inverts images to DDIM noise with a trained model; one jitted program.

  The counterpart of `ddx.sample_fn`: the model pytree is a jit argument and
  `steps` is static, so calls with the same shapes and options reuse the
  compiled program. Defaults come from `model.config.sampling`. Round trip:

    x_T = ddx.invert_fn(model, x0, steps=s)
    x0_rec = ddx.sample_fn(model, rng, steps=s, sampler="ddim", eta=0.0,
                           x_T=x_T, clip_x0=False, spacing="uniform")

  Pass sampler="ddim", eta=0.0 and clip_x0=False explicitly: configs default
  to clip_x0=True, and clipping x̂_0 is not part of the map being inverted.

  Args:
    model: what `ddx.load(workdir)` returns (or a `ddx.Model` you build).
    images: float [N, H, W, C] in [-1, 1], H, W, C as model.image_shape.
    steps: network evaluations (default config.sampling.steps); sample back
      with the same number.
    labels: int [N] class labels for a class-conditional model (the images'
      classes); None uses sample_fn's default classes 0, 1, ...,
      num_classes-1, 0, ... so that labels=None on both sides matches.
    guidance_scale: classifier-free guidance w (default
      config.sampling.guidance_scale). Inversion is most accurate at w = 1;
      large w makes ε̂ vary faster along the path and the round trip worse.
  Returns:
    x_T float32 [N, H, W, C] (not clipped).
  """
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4 or tuple(images.shape[1:]) != model.image_shape:
    raise ValueError(f"images must have shape [N, {', '.join(map(str, model.image_shape))}]"
                     f" for this model, got {images.shape}")
  o = options_lib.resolve(model.config, steps=steps, guidance_scale=guidance_scale)
  steps, w = o.steps, o.guidance_scale
  labels = model_lib.resolve_labels(model, labels, images.shape[0])
  guided = labels is not None and float(w) != 1.0
  if guided:
    model_lib.check_guidance(model, w)
  return _invert_jit(model, images, labels, jnp.float32(w),
                     steps=int(steps), guided=guided)


def slerp(a: jnp.ndarray, b: jnp.ndarray, alpha) -> jnp.ndarray:
  """Spherical linear interpolation between two noise tensors.

  a and b are single tensors of the same shape (one x_T each, e.g. [H, W, C]);
  the angle θ between them is taken over all their elements, as one vector.
  For a batch of pairs, `jax.vmap` over the batch axis. With a, b of equal
  norm every interpolant keeps that norm, so it stays on the shell where
  Gaussian noise lives; plain linear interpolation would shrink it (to about
  1/√2 at the midpoint of independent draws) and give washed-out samples.

    slerp = sin((1-α)θ)/sin θ · a + sin(αθ)/sin θ · b,  cos θ = <a,b>/(|a||b|).

  When a and b are (nearly) parallel or antiparallel (|cos θ| > 0.9995) or
  either is zero, sin θ is too small to divide by and the result is the linear
  interpolation (1-α)·a + α·b instead (the same to O(θ²) when parallel).

  Args:
    a, b: float arrays of the same shape S.
    alpha: scalar, or a [K] array of interpolation weights (0 gives a, 1 gives
      b; values outside [0, 1] extrapolate along the same arc).
  Returns:
    float32 [*S] for scalar alpha, or [K, *S]: one interpolant per alpha.
  """
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  if a.shape != b.shape:
    raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}")
  alpha = jnp.asarray(alpha, jnp.float32)
  if alpha.ndim > 1:
    raise ValueError(f"alpha must be a scalar or a [K] array, got shape {alpha.shape}")
  t = alpha.reshape(alpha.shape + (1,) * a.ndim)
  na, nb = jnp.linalg.norm(a), jnp.linalg.norm(b)
  denom = na * nb
  cos = jnp.sum(a * b) / jnp.where(denom > 0, denom, 1.0)
  linear = (denom == 0) | (jnp.abs(cos) > 0.9995)
  # Double-where: keep θ away from 0 and π on the linear branch so that
  # neither value nor gradient of the unused slerp branch is NaN.
  theta = jnp.arccos(jnp.where(linear, 0.0, jnp.clip(cos, -1.0, 1.0)))
  sin = jnp.sin(theta)
  wa = jnp.where(linear, 1.0 - t, jnp.sin((1.0 - t) * theta) / sin)
  wb = jnp.where(linear, t, jnp.sin(t * theta) / sin)
  return wa * a + wb * b
