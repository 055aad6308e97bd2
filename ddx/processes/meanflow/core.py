"""MeanFlow (Geng et al. 2025, arXiv 2505.13447): the math of one-step flow models.

The path is flow matching's (`ddx.flow`): z_t = (1 − t)·x + t·ε, t = 0 data,
t = 1 noise, with conditional velocity v = ε − x. A MeanFlow network predicts
the *average* velocity over an interval,

  u(z_t, r, t) = 1/(t − r) ∫_r^t v(z_τ, τ) dτ          (r ≤ t),

so one step from t to r is exact: z_r = z_t − (t − r)·u(z_t, r, t), and one
network evaluation maps noise to data: x = ε − u(ε, 0, 1). Differentiating
(t − r)·u = ∫_r^t v in t gives the MeanFlow identity

  u(z_t, r, t) = v(z_t, t) − (t − r)·d/dt u(z_t, r, t),
  d/dt u = v·∂_z u + ∂_t u                                (r held fixed),

whose right side is the regression target: its total derivative is one
forward-mode product `jax.jvp(u, (z, r, t), (v, 0, 1))`, computed exactly and
under stop-gradient, so training costs one forward+JVP and one backward.
At r = t the target is v itself: plain flow matching is the diagonal.

This module is pure math over a network function `u_fn(z, r, t)`; the trainer
and samplers wire it to a network with two time inputs.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from ddx.processes.common import bcast

UFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def sample_times(rng: jax.Array, n: int, *, logit_mean: float = -0.4,
                 logit_std: float = 1.0, ratio: float = 0.25
                 ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(r, t) for n examples: two logit-normal draws, ordered so r ≤ t, and r = t
  for all but a share `ratio` of them (the paper's ablation: 25% with r ≠ t;
  the others train the instantaneous velocity, the diagonal u(z, t, t) = v).

  Returns:
    r, t: float32 [n] in (0, 1), r ≤ t.
  """
  k1, k2 = jax.random.split(rng)
  a = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(k1, (2, n)))
  r, t = jnp.minimum(a[0], a[1]), jnp.maximum(a[0], a[1])
  keep = jax.random.uniform(k2, (n,)) < ratio
  return jnp.where(keep, r, t), t


def target(u_fn: UFn, z: jnp.ndarray, r: jnp.ndarray, t: jnp.ndarray,
           v: jnp.ndarray, has_aux: bool = False):
  """The network's output and its MeanFlow regression target.

  Args:
    u_fn: u_fn(z [B, ...], r [B], t [B]) -> [B, ...], the average velocity
      (with `(u, aux)` when has_aux: aux is passed through, not differentiated).
    z: z_t [B, ...]; r, t: [B] with r ≤ t.
    v: the velocity at (z, t) that the path follows [B, ...]: in training the
      conditional ε − x (or its guided mix, `guided_velocity`).
    has_aux: u_fn returns (u, aux).
  Returns:
    (u, target) (and aux when has_aux): u = u_fn(z, r, t), and
    v − (t − r)·(v·∂_z u + ∂_t u), the total derivative from one jvp with
    tangent (v, 0, 1), under stop_gradient.
  """
  out = jax.jvp(u_fn, (z, r, t), (v, jnp.zeros_like(r), jnp.ones_like(t)),
                has_aux=has_aux)
  u, du_dt = out[:2]
  tgt = jax.lax.stop_gradient(v - bcast(t - r, v) * du_dt.astype(v.dtype))
  return (u, tgt, out[2]) if has_aux else (u, tgt)


def guided_velocity(v: jnp.ndarray, u_cond: jnp.ndarray, u_uncond: jnp.ndarray,
                    omega: float, kappa: float = 0.0) -> jnp.ndarray:
  """Classifier-free guidance folded into the training target (MeanFlow Sec. 4.2
  and its appendix): ṽ = ω·v + κ·u(z, t, t | c) + (1 − ω − κ)·u(z, t, t | ∅).

  With ω = 1, κ = 0 it is v: no guidance. u_cond and u_uncond are the network's
  instantaneous velocities (r = t) and enter under stop_gradient.
  """
  u_cond, u_uncond = jax.lax.stop_gradient((u_cond, u_uncond))
  return omega * v + kappa * u_cond + (1.0 - omega - kappa) * u_uncond


def loss(u: jnp.ndarray, tgt: jnp.ndarray, *, power: float = 1.0,
         eps: float = 1e-3) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The adaptively weighted squared error of MeanFlow.

  Per example Δ² = ‖u − target‖² (summed over pixels) and weight
  w = sg(1 / (Δ² + eps)^power): power = 0 is the plain squared error,
  power = 1 (the paper's choice) a robust, scale-free loss.
  Returns:
    (mean over the batch of w·Δ², the per-example Δ² [B]).
  """
  axes = tuple(range(1, u.ndim))
  d2 = jnp.sum(jnp.square((u - tgt).astype(jnp.float32)), axis=axes)
  w = jax.lax.stop_gradient(1.0 / jnp.power(d2 + eps, power))
  return jnp.mean(w * d2), d2


def sample(u_fn: UFn, eps: jnp.ndarray, steps: int = 1,
           return_trajectory: bool = False):
  """n-step MeanFlow sampling from t = 1 to 0 on a uniform grid, one lax.scan:
  z_{t_{k+1}} = z_{t_k} − (t_k − t_{k+1})·u(z_{t_k}, t_{k+1}, t_k).

  Args:
    u_fn: the average velocity u_fn(z, r, t).
    eps: the starting noise z_1 [B, ...].
    steps: network evaluations (static), ≥ 1.
  Returns:
    x [B, ...] (and the states after every step [steps, B, ...]).
  """
  if steps < 1:
    raise ValueError(f"steps={steps} must be at least 1")
  grid = jnp.linspace(1.0, 0.0, steps + 1, dtype=jnp.float32)
  n = eps.shape[0]

  def step(z, k):
    t, r = grid[k], grid[k + 1]
    u = u_fn(z, jnp.full((n,), r), jnp.full((n,), t))
    z = z - (t - r) * u.astype(z.dtype)
    return z, (z if return_trajectory else None)

  z, traj = jax.lax.scan(step, eps, jnp.arange(steps))
  return (z, traj) if return_trajectory else z


def gaussian_average_velocity(mean: jnp.ndarray, std: jnp.ndarray,
                              z: jnp.ndarray, r: jnp.ndarray, t: jnp.ndarray,
                              ) -> jnp.ndarray:
  """The exact u(z, r, t) for data x ~ N(mean, diag(std²)) (a reference for
  tests and for checking a trained model on Gaussian data).

  The marginal of z_t is N(m_t, s_t²) with m_t = (1 − t)·mean and
  s_t² = (1 − t)²·std² + t²; the probability-flow trajectories are
  z_τ = m_τ + s_τ·ξ with ξ constant, so
  u = (z_t − z_r)/(t − r) = −mean + (s_t − s_r)/(t − r)·(z − m_t)/s_t, and at
  r = t the velocity v = −mean + (t − (1 − t)·std²)/s_t²·(z − m_t).
  """
  tb, rb = bcast(t, z), bcast(r, z)
  m_t = (1.0 - tb) * mean
  s = lambda a: jnp.sqrt(jnp.square((1.0 - a) * std) + jnp.square(a))
  s_t, s_r = s(tb), s(rb)
  same = jnp.abs(tb - rb) < 1e-6
  slope = jnp.where(same, (tb - (1.0 - tb) * jnp.square(std)) / s_t,
                    (s_t - s_r) / jnp.where(same, 1.0, tb - rb))
  return -mean + slope * (z - m_t) / s_t
