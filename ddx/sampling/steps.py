"""Sampler steps shared by every time grid: Euler/Heun, and DPM-Solver++(2M).

The grids differ only in their variable: the DDPM index walk (`discrete.py`,
λ from ᾱ), EDM's σ (`sigma.py`, λ = −log σ) and flow matching's t
(`flow.py`). Each grid computes its own step sizes and coefficients and
calls these steps, so one formula exists once.

A zero-length step (a repeated grid point) is an exact no-op for every step
here: Euler and Heun move by h·(...) with h = 0, and DPM-Solver++(2M) keeps
its state (its r = h_prev/h would otherwise divide by zero one step later).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

DerivFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def heun_step(deriv_fn: DerivFn, x: jnp.ndarray, s: jnp.ndarray,
              s_next: jnp.ndarray, method: str = "heun") -> jnp.ndarray:
  """One Euler or Heun step of dx/ds = deriv_fn(x, s) from s to s_next.

  Heun is the explicit trapezoid rule (EDM Alg. 1 lines 5-8). A step that
  lands on s_next = 0, where the derivative may not exist, takes the Euler
  step and skips the second evaluation (`lax.cond`: it really costs one).

  Args:
    deriv_fn: `deriv_fn(x [B, ...], s float32 scalar) -> [B, ...]`.
    x: [B, ...] float32 state at s.
    s, s_next: float32 scalars, the step's start and end.
    method: "euler" | "heun".
  Returns:
    [B, ...] float32, x at s_next.
  """
  h = s_next - s
  d = deriv_fn(x, s)
  x_e = x + h * d
  if method == "euler":
    return x_e
  return jax.lax.cond(s_next == 0, lambda: x_e,
                      lambda: x + (0.5 * h) * (d + deriv_fn(x_e, s_next)))


def integrate(deriv_fn: DerivFn, grid: jnp.ndarray, x: jnp.ndarray, method: str,
              return_trajectory: bool = False):
  """Integrates dx/ds = deriv_fn(x, s) along `grid` with Euler or Heun, one scan.

  Args:
    deriv_fn: `deriv_fn(x [B, ...], s float32 scalar) -> [B, ...]`.
    grid: [N + 1] float32 times, the start first.
    x: [B, ...] float32 state at grid[0].
    method: "euler" | "heun" (`heun_step`).
    return_trajectory: also return the state after every step, [N, B, ...].
  Returns:
    x at grid[-1] (and the trajectory).
  """
  if method not in ("euler", "heun"):
    raise ValueError(f"method={method!r} is unknown; use 'euler' or 'heun'")
  grid = jnp.asarray(grid, jnp.float32)

  def body(x, inp):
    s, s_next = inp
    x = heun_step(deriv_fn, x, s, s_next, method)
    return x, (x if return_trajectory else None)

  x, traj = jax.lax.scan(body, x, (grid[:-1], grid[1:]))
  return (x, traj) if return_trajectory else x


def dpm_solver_pp_2m_init(x: jnp.ndarray):
  """The multistep state before the first step: (x̂_0 prev, h prev, steps taken)."""
  return (jnp.zeros_like(x), jnp.ones((), x.dtype), jnp.zeros((), jnp.int32))


def dpm_solver_pp_2m(state, x: jnp.ndarray, x0: jnp.ndarray, h: jnp.ndarray,
                     sigma_ratio: jnp.ndarray, alpha_next: Optional[jnp.ndarray],
                     last: jnp.ndarray):
  """One DPM-Solver++(2M) step (Lu et al. 2022, Alg. 2): multistep, data prediction.

  x_s = (σ_s/σ_t)·x_t − α_s·(e^{−h} − 1)·D with h = λ_s − λ_t (λ = log α/σ)
  and D = (1 + 1/(2r))·x̂_0 − 1/(2r)·x̂_0_prev, r = h_prev/h; the first step
  uses D = x̂_0 (first order) and the last step returns x̂_0 (σ_s = 0). A
  step with h = 0 returns x and the state unchanged.

  Args:
    state: `dpm_solver_pp_2m_init(x)` or the state the previous step returned.
    x: [B, ...] float32, x_t.
    x0: [B, ...] float32, the data prediction x̂_0(x_t, t).
    h: float32 scalar, λ_s − λ_t (> 0, or 0 for a repeated grid point).
    sigma_ratio: float32 scalar, σ_s/σ_t.
    alpha_next: float32 scalar α_s, or None for α = 1 (EDM's x = y + σn).
    last: bool scalar: this step lands on the data (returns x̂_0).
  Returns:
    (state, x_s [B, ...] float32).
  """
  x0_prev, h_prev, n = state
  r = h_prev / h
  second = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
  d = jnp.where(n > 0, second, x0)
  scale = jnp.expm1(-h) if alpha_next is None else alpha_next * jnp.expm1(-h)
  x_s = jnp.where(last, x0, sigma_ratio * x - scale * d)
  moved = h != 0
  new = (jnp.where(moved, x0, x0_prev), jnp.where(moved, h, h_prev),
         jnp.where(moved, n + 1, n))
  return new, jnp.where(moved | last, x_s, x)


def initial_noise(rng: jax.Array, shape) -> jnp.ndarray:
  """The x_T that `sample` draws from `rng` when no x_T is given."""
  return jax.random.normal(jax.random.split(rng)[0], tuple(shape), jnp.float32)
