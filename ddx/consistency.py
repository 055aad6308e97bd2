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

Sampling: one step x_0 = f(σ_d·z, π/2) = −σ_d·F(z, π/2); more steps re-noise
x_0 to intermediate times and apply f again.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from ddx.diffusion import bcast

# F_fn(x_scaled [B, ...], t [B]) -> [B, ...]: the network with TrigFlow time t
# (any map of t to the network's own time input happens inside, so the jvp
# differentiates through it).
FFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
T_MAX = math.pi / 2


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
            norm_c: float = 0.1) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The network output and sCM's tangent g, under stop_gradient.

  Args:
    F_fn: the network F(x/σ_d, t).
    x_t: [B, ...]; t: [B] in (0, π/2]; dxdt: the velocity the path follows.
    sigma_data: σ_d.
    warmup: r in [0, 1], the weight of the dF/dt term (tangent warm-up).
    norm_c: c of g/(‖g‖ + c); 0 or less leaves g unnormalised.
  Returns:
    (F, g): F = F_fn(x_t/σ_d, t) and
    g = −cos²(t)·(σ_d·F − dx/dt) − r·cos(t)·sin(t)·(x_t + σ_d·dF/dt),
    the regression target being sg(F + g).
  """
  cs = jnp.cos(t) * jnp.sin(t)
  F, cs_dF = jax.jvp(F_fn, (x_t / sigma_data, t),
                     (bcast(cs, x_t) * dxdt / sigma_data, cs))
  cos = bcast(jnp.cos(t), x_t)
  g = (-cos * cos * (sigma_data * F - dxdt)
       - warmup * (bcast(cs, x_t) * x_t + sigma_data * cs_dF))
  if norm_c > 0:
    axes = tuple(range(1, g.ndim))
    g = g / (jnp.sqrt(jnp.sum(jnp.square(g), axis=axes, keepdims=True)) + norm_c)
  return F, jax.lax.stop_gradient(g)


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
           mid_times: Sequence[float] = (), rng: jax.Array | None = None
           ) -> jnp.ndarray:
  """Consistency sampling: x = f(σ_d·z, π/2), then for each t in mid_times
  x = f(cos(t)·x + sin(t)·σ_d·z', t) with fresh z' (one lax.scan).

  Args:
    F_fn: the network F(x/σ_d, t).
    z: unit noise [B, ...].
    mid_times: decreasing times in (0, π/2) for the steps after the first
      (sCM's 2-step sampler uses t = 1.1); 1 + len(mid_times) evaluations.
    rng: the re-noising key, needed when mid_times is not empty.
  Returns:
    x_0 [B, ...].
  """
  n = z.shape[0]
  x = consistency_fn(F_fn, sigma_data * z, jnp.full((n,), T_MAX, jnp.float32), sigma_data)
  if not len(mid_times):
    return x
  if rng is None:
    raise ValueError("sample: mid_times needs rng for the fresh noise")
  times = jnp.asarray(mid_times, jnp.float32)

  def step(x, k):
    t = jnp.full((n,), times[k])
    noise = sigma_data * jax.random.normal(jax.random.fold_in(rng, k), x.shape, x.dtype)
    return consistency_fn(F_fn, interpolate(x, noise, t), t, sigma_data), None

  x, _ = jax.lax.scan(step, x, jnp.arange(len(mid_times)))
  return x
