"""Continuous-time consistency models (sCM, Lu & Song 2024, arXiv 2410.11081): the math.

TrigFlow: x_t = cos(t)·x_0 + sin(t)·z, z ~ N(0, σ_d² I), t in [0, π/2]
(t = 0 data, t = π/2 pure noise of scale σ_d). A network F(x/σ_d, t) gives

  the probability-flow velocity   dx_t/dt = σ_d·F(x_t/σ_d, t)     (a diffusion model),
  the consistency function        f(x_t, t) = cos(t)·x_t − sin(t)·σ_d·F(x_t/σ_d, t),

so f(x, 0) = x holds exactly, by construction. A consistency model makes f
constant along the probability-flow ODE: df/dt = 0, where

  df/dt = −cos(t)·(σ_d·F − dx_t/dt) − sin(t)·(x_t + σ_d·dF/dt),
  dF/dt = ∂_x F·(dx_t/dt)/σ_d + ∂_t F        (one jax.jvp),

and dx_t/dt is the data's conditional velocity cos(t)·z − sin(t)·x_0
(consistency training) or a teacher's σ_d·F_teacher (distillation). Training
regresses F onto sg(F + g) with g = cos(t)·df/dt (sCM's weighting), the
second term of g scaled by a warm-up r from 0 to 1, and g normalised to
g/(‖g‖ + c) (tangent normalisation). The tangent's jvp carries the factor
cos(t)·sin(t) in its tangent vector, so cos(t)·sin(t)·dF/dt comes out directly
and stays finite near t = π/2.

Distillation from a diffusion teacher given as EDM's denoiser D(y; σ) of
y = x_0 + σ·n: x_t = cos(t)·y with σ = σ_d·tan(t), so the teacher's
probability-flow velocity in TrigFlow time is (`teacher_velocity`)

  dx_t/dt = (cos(t)·x_t − D(x_t/cos(t); σ_d·tan(t))) / sin(t).

Sampling: one step x_0 = f(σ_d·z, π/2) = −σ_d·F(z, π/2); more steps re-noise
x_0 to intermediate times (`mid_times`) and apply f again.

The network sees TrigFlow time as `time_input(t)` = 1000·t/(π/2), the range
[0, 1000] of flow's 1000·t and DDPM's indices, so the same sinusoidal
embeddings apply.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from ddx.processes.common import bcast

# F_fn(x_scaled [B, ...], t [B]) -> [B, ...]: the network with TrigFlow time t
# (any map of t to the network's own time input happens inside, so the jvp
# differentiates through it).
FFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
T_MAX = math.pi / 2


def time_input(t: jnp.ndarray) -> jnp.ndarray:
  """The network's time input for TrigFlow t in [0, π/2]: 1000·t/(π/2), float32 [B]."""
  return (1000.0 / T_MAX) * jnp.asarray(t, jnp.float32)


def noise_level(t, sigma_data: float):
  """σ = σ_d·tan(t): x_t/cos(t) = x_0 + σ·n with n ~ N(0, I), EDM's σ of
  TrigFlow time t (the noise-to-signal ratio in the data's units). inf at
  t = π/2, also where float32's π/2 (a little above π/2) makes cos(t) < 0."""
  t = jnp.asarray(t, jnp.float32)
  cos = jnp.cos(t)
  return jnp.where(cos > 0, sigma_data * jnp.sin(t) / jnp.where(cos > 0, cos, 1.0),
                   jnp.inf)


def teacher_velocity(denoise_fn: Callable, x_t: jnp.ndarray, t: jnp.ndarray,
                     sigma_data: float) -> jnp.ndarray:
  """A diffusion teacher's probability-flow velocity dx_t/dt in TrigFlow time.

  With x_t = cos(t)·y, y = x_0 + σ·n and σ = σ_d·tan(t), the σ-form ODE
  dy/dσ = (y − D(y; σ))/σ (EDM Eq. 3) becomes
  dx_t/dt = (cos(t)·x_t − D(x_t/cos(t); σ_d·tan(t)))/sin(t).

  Args:
    denoise_fn: D(y [B, ...], σ float32 [B]) -> [B, ...], EDM's denoiser.
    x_t: [B, ...]; t: [B] in (0, π/2) (both ends excluded: 0/0 at t = 0,
      σ = inf at π/2).
    sigma_data: σ_d.
  Returns:
    dx_t/dt [B, ...] float32, under stop_gradient (a regression target).
  """
  t = jnp.asarray(t, jnp.float32)
  x_t = x_t.astype(jnp.float32)
  cos, sin = bcast(jnp.cos(t), x_t), bcast(jnp.sin(t), x_t)
  d = denoise_fn(x_t / cos, noise_level(t, sigma_data)).astype(jnp.float32)
  return jax.lax.stop_gradient((cos * x_t - d) / sin)


def mid_times(steps: int, t_mid: float) -> tuple[float, ...]:
  """The re-noising times of an n-step sampler: t_mid·(n − k)/(n − 1) for
  k = 1 … n − 1, evenly spaced from t_mid towards 0 (sCM's 2-step sampler:
  (1.1,)); () for one step."""
  if isinstance(steps, bool) or int(steps) != steps or steps < 1:
    raise ValueError(f"sampling steps must be a positive integer, got {steps!r}")
  n = int(steps)
  return tuple(t_mid * (n - k) / (n - 1) for k in range(1, n))


def sample_t(rng: jax.Array, n: int, sigma_data: float, p_mean: float = -1.0,
             p_std: float = 1.4) -> jnp.ndarray:
  """Training times: t = arctan(e^τ/σ_d) with τ ~ N(p_mean, p_std²) (EDM's
  log-normal σ = e^τ, mapped to TrigFlow time). Returns float32 [n] in (0, π/2)."""
  tau = p_mean + p_std * jax.random.normal(rng, (n,))
  return jnp.arctan(jnp.exp(tau) / sigma_data)


def interpolate(x0: jnp.ndarray, z: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
  """x_t = cos(t)·x_0 + sin(t)·z (z already of scale σ_d)."""
  return bcast(jnp.cos(t), x0) * x0 + bcast(jnp.sin(t), x0) * z


def velocity(x0: jnp.ndarray, z: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
  """The conditional dx_t/dt = cos(t)·z − sin(t)·x_0 (consistency training)."""
  return bcast(jnp.cos(t), x0) * z - bcast(jnp.sin(t), x0) * x0


def consistency_fn(F_fn: FFn, x_t: jnp.ndarray, t: jnp.ndarray,
                   sigma_data: float) -> jnp.ndarray:
  """f(x_t, t) = cos(t)·x_t − sin(t)·σ_d·F(x_t/σ_d, t); f(x, 0) = x exactly."""
  out = F_fn(x_t / sigma_data, t).astype(x_t.dtype)
  return bcast(jnp.cos(t), x_t) * x_t - bcast(jnp.sin(t), x_t) * sigma_data * out


def tangent(F_fn: FFn, x_t: jnp.ndarray, t: jnp.ndarray, dxdt: jnp.ndarray,
            sigma_data: float, *, warmup: float | jnp.ndarray = 1.0,
            norm_c: float = 0.1, has_aux: bool = False):
  """The network output and sCM's tangent g, under stop_gradient.

  Args:
    F_fn: the network F(x/σ_d, t).
    x_t: [B, ...]; t: [B] in (0, π/2]; dxdt: the velocity the path follows.
    sigma_data: σ_d.
    warmup: r in [0, 1], the weight of the dF/dt term (tangent warm-up).
    norm_c: c of g/(‖g‖ + c); 0 or less leaves g unnormalised.
    has_aux: F_fn returns (F, aux); aux is returned too, not differentiated
      by the jvp (it keeps its gradient for the loss, e.g. a log-variance).
  Returns:
    (F, g), or (F, g, aux) with has_aux: F = F_fn(x_t/σ_d, t) and
    g = −cos²(t)·(σ_d·F − dx/dt) − r·cos(t)·sin(t)·(x_t + σ_d·dF/dt),
    the regression target being sg(F + g).
  """
  cs = jnp.cos(t) * jnp.sin(t)
  out = jax.jvp(F_fn, (x_t / sigma_data, t),
                (bcast(cs, x_t) * dxdt / sigma_data, cs), has_aux=has_aux)
  F, cs_dF = out[:2]
  # bfloat16 networks: the target's arithmetic in float32 (float64 stays).
  wide = lambda a: a.astype(jnp.promote_types(a.dtype, jnp.float32))
  F, cs_dF = wide(F), wide(cs_dF)
  cos = bcast(jnp.cos(t), x_t)
  g = (-cos * cos * (sigma_data * F - dxdt)
       - warmup * (bcast(cs, x_t) * x_t + sigma_data * cs_dF))
  if norm_c > 0:
    axes = tuple(range(1, g.ndim))
    g = g / (jnp.sqrt(jnp.sum(jnp.square(g), axis=axes, keepdims=True)) + norm_c)
  g = jax.lax.stop_gradient(g)
  return (F, g, out[2]) if has_aux else (F, g)


def loss(F: jnp.ndarray, g: jnp.ndarray, logvar: jnp.ndarray | None = None
         ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """sCM's loss for output F (carrying the gradient) and tangent g.

  Per example Δ² = mean over pixels of (F − sg(F + g))²; with a learned
  log-variance w(t) (`logvar`, [B], adaptive weighting) the loss is
  e^{−w}·Δ² + w, otherwise Δ². Returns (mean over the batch, Δ² [B]).
  """
  axes = tuple(range(1, F.ndim))
  d2 = jnp.mean(jnp.square(F - jax.lax.stop_gradient(F + g)), axis=axes)
  per = d2 if logvar is None else jnp.exp(-logvar) * d2 + logvar
  return jnp.mean(per), d2


def sample(F_fn: FFn, z: jnp.ndarray, sigma_data: float,
           mid_times: Sequence[float] = (), rng: jax.Array | None = None, *,
           clip_x0: bool = False, return_trajectory: bool = False):
  """Consistency sampling: x = f(σ_d·z, π/2), then for each t in mid_times
  x = f(cos(t)·x + sin(t)·σ_d·z_k, t), z_k = N(0, I) from fold_in(rng, k)
  (one lax.scan).

  Args:
    F_fn: the network F(x/σ_d, t).
    z: unit noise [B, ...].
    mid_times: decreasing times in (0, π/2) for the steps after the first
      (sCM's 2-step sampler uses t = 1.1; `mid_times`); 1 + len(mid_times)
      evaluations.
    rng: the re-noising key, needed when mid_times is not empty.
    clip_x0: clip every f (an estimate of x_0) to [-1, 1].
    return_trajectory: also return x after every step, [1 + len(mid_times), B, ...].
  Returns:
    x_0 [B, ...] (and the trajectory).
  """
  n = z.shape[0]
  clip = (lambda x: jnp.clip(x, -1.0, 1.0)) if clip_x0 else (lambda x: x)
  x = clip(consistency_fn(F_fn, sigma_data * z, jnp.full((n,), T_MAX, jnp.float32),
                          sigma_data))
  if not len(mid_times):
    return (x, x[None]) if return_trajectory else x
  if rng is None:
    raise ValueError("sample: mid_times needs rng for the fresh noise")
  times = jnp.asarray(mid_times, jnp.float32)

  def step(x, k):
    t = jnp.full((n,), times[k])
    noise = sigma_data * jax.random.normal(jax.random.fold_in(rng, k), x.shape, x.dtype)
    x = clip(consistency_fn(F_fn, interpolate(x, noise, t), t, sigma_data))
    return x, x if return_trajectory else None

  first = x
  x, traj = jax.lax.scan(step, x, jnp.arange(len(mid_times)))
  if return_trajectory:
    return x, jnp.concatenate([first[None], traj])
  return x
