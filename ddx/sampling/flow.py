"""ODE samplers for flow matching: dx/dt = v(x, t) from t = 1 (noise) to t = 0.

`velocity_fn(x_t, t) -> v̂` takes x_t [B, ...] and t float32 [B] in [0, 1]
(the model face turns t into the network's time input and an x0-network's
output into a velocity, `ddx.flow.velocity`). On a grid of N steps
(`ddx.flow.time_grid`), network evaluations (NFE):

  euler   N        x_{i+1} = x_i + (t_{i+1} − t_i)·v(x_i, t_i)
  heun    2N − 1   the trapezoid rule, with an Euler last step to t = 0

A whole trajectory is one `lax.scan` (`ddx.sampling.steps.integrate`).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddx.sampling.steps import initial_noise
from ddx.sampling.steps import integrate

VelocityFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]

SAMPLERS = ("euler", "heun")
NFE = {"euler": "N", "heun": "2N - 1"}


def sample(velocity_fn: VelocityFn, times, rng: jax.Array, shape,
           sampler: str = "euler", *, x_T: Optional[jnp.ndarray] = None,
           clip_x0: bool = False, return_trajectory: bool = False):
  """Integrates the flow ODE from x = noise at times[0] (= 1) down the grid.

  Pure and jit-composable, as every sampler.

  Args:
    velocity_fn: `velocity_fn(x_t [B, ...], t float32 [B]) -> v̂ [B, ...]`.
    times: [N + 1] descending times, from 1 (pure noise) usually to 0
      (`ddx.flow.time_grid`); N = steps (static: the array's length).
    rng: PRNG key; the start is `ddx.sampling.initial_noise(rng, shape)`
      when x_T is None (the same noise as every other sampler).
    shape: the batch shape, e.g. (B, H, W, C).
    sampler: "euler" | "heun".
    x_T: optional starting noise [shape] (t = 1 is pure noise: used as is).
    clip_x0: clip the implied x̂_0 = x_t − t·v̂ to [-1, 1] at every
      evaluation and use the velocity (x_t − x̂_0)/t that points at it.
    return_trajectory: also return the state after every step, [N, *shape].
  Returns:
    x at times[-1] [shape] float32 (the sample when it is 0), or (x, trajectory).
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler={sampler!r} is not a flow sampler; use one of {SAMPLERS}")
  if np.ndim(times) != 1 or np.shape(times)[0] < 2:
    raise ValueError(f"the time grid must be 1-D with at least 2 points, got "
                     f"shape {np.shape(times)}")
  shape = tuple(shape)
  x = (initial_noise(rng, shape) if x_T is None
       else jnp.asarray(x_T, jnp.float32).reshape(shape))

  def deriv(x, t):
    v = velocity_fn(x, jnp.full((shape[0],), t, jnp.float32)).astype(jnp.float32)
    # No evaluation happens at t = 0, so dividing by t is safe here.
    return clipped_velocity(x, v, t) if clip_x0 else v

  return integrate(deriv, jnp.asarray(times, jnp.float32), x, sampler,
                   return_trajectory)


def clipped_velocity(x: jnp.ndarray, v: jnp.ndarray, t) -> jnp.ndarray:
  """The velocity towards the clipped x̂_0: with x̂_0 = x_t − t·v̂ clipped to
  [-1, 1], the v that points from x_t at it, (x_t − clip(x̂_0)) / t.

  Args:
    x: x_t [B, ...]; v: v̂ [B, ...]; t: > 0, broadcastable against x (a scalar,
      or [B, 1, ...]).
  """
  return (x - jnp.clip(x - t * v, -1.0, 1.0)) / t
