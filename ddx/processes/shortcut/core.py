"""Shortcut models (Frans et al. 2024, arXiv 2410.12557): the math of step-size-conditioned flows.

The path is flow matching's (`ddx.flow`): x_t = (1 − t)·x_0 + t·ε, t = 1 noise,
t = 0 data. The network s(x_t, t, d) also sees the step size d it will be used
with, and predicts the direction of one step of that size:
x_{t−d} = x_t − d·s(x_t, t, d). It learns two things at once:

  d = 0:   flow matching, s(x_t, t, 0) ≈ ε − x_0 (the instantaneous velocity);
  d > 0:   self-consistency, one step of size 2d equals two steps of size d:
           s(x_t, t, 2d) ≈ sg[(s(x_t, t, d) + s(x_t − d·s(x_t, t, d), t − d, d)) / 2].

Step sizes are powers of two, d = 1/M·2^k for M = max_steps, so sampling with
1, 2, 4, ..., M steps uses exactly the sizes that were trained.
(The paper writes t from noise 0 to data 1; ddx's flow time runs the other
way, so its t + d is t − d here.)
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ddx.processes.common import bcast
from ddx.processes.shortcut.spec import check_max_steps

SFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def sample_consistency_times(rng: jax.Array, n: int, max_steps: int = 128
                             ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(t, d) for the self-consistency part of a batch.

  d = 2^k / max_steps with k uniform in {0, ..., log2(max_steps) − 1} (the
  target's size 2d runs up to 1), and t a uniformly drawn multiple of 2d in
  (0, 1], so both d-steps stay on the grid that sampling with 1/(2d) steps
  visits.
  Returns:
    t, d: float32 [n].
  """
  levels = check_max_steps(max_steps)
  if levels == 0:
    raise ValueError("max_steps=1 leaves no step size to make consistent; use ≥ 2")
  k1, k2 = jax.random.split(rng)
  k = jax.random.randint(k1, (n,), 0, levels)
  d = jnp.exp2(k.astype(jnp.float32)) / max_steps
  slots = jnp.round(1.0 / (2.0 * d)).astype(jnp.int32)        # grid points of size 2d
  j = jnp.floor(jax.random.uniform(k2, (n,)) * slots).astype(jnp.int32) + 1
  return jnp.minimum(j.astype(jnp.float32) * 2.0 * d, 1.0), d


def consistency_target(s_fn: SFn, x_t: jnp.ndarray, t: jnp.ndarray,
                       d: jnp.ndarray) -> jnp.ndarray:
  """The target of s(x_t, t, 2d): the mean direction of two d-steps, under
  stop_gradient.

  Args:
    s_fn: s_fn(x [B, ...], t [B], d [B]) -> [B, ...].
    x_t: [B, ...]; t, d: [B] with t − 2d ≥ 0.
  Returns:
    [B, ...]: (s(x_t, t, d) + s(x_t − d·s(x_t, t, d), t − d, d)) / 2, so that
    x_t − 2d·target equals two d-steps from x_t.
  """
  s1 = s_fn(x_t, t, d)
  x_mid = x_t - bcast(d, x_t) * s1
  s2 = s_fn(x_mid, t - d, d)
  return jax.lax.stop_gradient(0.5 * (s1 + s2))


def sample(s_fn: SFn, eps: jnp.ndarray, steps: int = 1, return_trajectory: bool = False):
  """`steps` equal steps of size d = 1/steps from t = 1 to 0, one lax.scan.

  Args:
    s_fn: the shortcut network s(x, t, d).
    eps: the starting noise x_1 [B, ...].
    steps: a power of two ≥ 1 (the sizes the model trained on when ≤ max_steps).
  Returns:
    x_0 [B, ...] (and the states after every step [steps, B, ...]).
  """
  check_max_steps(steps, "steps")
  n, d = eps.shape[0], 1.0 / steps

  def step(x, k):
    t = 1.0 - k.astype(jnp.float32) * d
    x = x - d * s_fn(x, jnp.full((n,), t), jnp.full((n,), d, jnp.float32)).astype(x.dtype)
    return x, (x if return_trajectory else None)

  x, traj = jax.lax.scan(step, eps, jnp.arange(steps))
  return (x, traj) if return_trajectory else x
