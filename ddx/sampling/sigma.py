"""Samplers on a σ grid for any denoiser in EDM's form x = y + σ·n.

`denoise_fn(x, sigma) -> D(x; σ)` takes x [B, ...] and σ float32 [B] and
returns the estimate of the clean data y. The probability-flow ODE is
dx/dσ = (x − D(x; σ))/σ (EDM Eq. 3 with s = 1, σ(t) = t), walked along a
descending grid σ_0 > ... > σ_N (typically ending at σ_N = 0,
`karras_sigmas`). Network evaluations (NFE) for N steps:

  euler          N        Euler steps on the ODE (the step to σ = 0 returns D)
  heun           2N − 1   EDM Alg. 1: Heun, with an Euler last step to σ = 0
  stochastic     2N − 1   EDM Alg. 2: Heun plus churn (noise added, then removed)
  dpm_solver_pp  N        DPM-Solver++(2M) in λ = −log σ: first step first
                          order, the last step (to σ = 0) returns D

A whole trajectory is one `lax.scan`; Heun's skipped correction is a
`lax.cond`, so the last step really costs one evaluation. The steps are
`ddx.sampling.steps`'s, shared with the other grids. A repeated σ in a
grid is a zero-length step that the deterministic samplers pass unchanged
(its evaluations are still spent: DDPM's `vp_grid` drops repeats).

A process maps onto this form with its own D(x; σ) and grid: EDM is in it
already; DDPM's VP mapping is `ddx.processes.ddpm.vp`.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddx.sampling import steps as steps_lib
from ddx.sampling.steps import initial_noise

SigmaDenoiseFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]

SAMPLERS = ("euler", "heun", "stochastic", "dpm_solver_pp")
NFE = {"euler": "N", "heun": "2N - 1", "stochastic": "2N - 1", "dpm_solver_pp": "N"}
SIGMA_INDICES = ("nearest", "interp")


def karras_sigmas(sigma_min: float, sigma_max: float, rho: float,
                  steps: int) -> np.ndarray:
  """The sampling grid of EDM Eq. 5, plus the final σ = 0.

  σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ for i < N, σ_N = 0;
  ρ = 7 spends most steps at small σ. With N = 1 the grid is [σ_max, 0].

  Args:
    sigma_min, sigma_max: 0 < σ_min < σ_max.
    rho: ρ > 0.
    steps: N >= 1, the number of sampler steps (intervals of the grid).
  Returns:
    float64 [N + 1], strictly descending, ending in 0.
  """
  if isinstance(steps, bool) or int(steps) != steps or steps < 1:
    raise ValueError(f"sampling steps must be a positive integer, got {steps!r}")
  if not 0 < sigma_min < sigma_max:
    raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
  if not rho > 0:
    raise ValueError(f"rho={rho} must be > 0")
  n = int(steps)
  frac = np.arange(n, dtype=np.float64) / max(n - 1, 1)
  lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  sig = (hi + frac * (lo - hi)) ** rho
  return np.concatenate([sig, [0.0]])


def _check_grid(sigmas) -> None:
  """One-line errors for a grid that is not [N + 1] descending and >= 0."""
  if np.ndim(sigmas) != 1 or np.shape(sigmas)[0] < 2:
    raise ValueError(f"the sigma grid must be 1-D with at least 2 points, got "
                     f"shape {np.shape(sigmas)}")
  try:
    s = np.asarray(sigmas, np.float64)
  except jax.errors.TracerArrayConversionError:
    return                                # values only known at run time
  if not (s[0] > 0 and np.all(s >= 0) and np.all(np.diff(s) <= 0)):
    raise ValueError("the sigma grid must descend from sigma_0 > 0 to values >= 0, "
                     f"got {s[:3]}...{s[-2:]}")


def sample(denoise_fn: SigmaDenoiseFn, sigmas, rng: jax.Array, shape,
           sampler: str = "heun", *, churn=0.0, s_tmin=0.0, s_tmax=float("inf"),
           s_noise=1.0, round_sigma: Optional[Callable[[jnp.ndarray], jnp.ndarray]] = None,
           x_T: Optional[jnp.ndarray] = None, clip_x0: bool = False,
           return_trajectory: bool = False):
  """Runs a σ-grid sampler from x = σ_0·noise down the grid, as one `lax.scan`.

  Pure and jit-composable, as every sampler.

  Args:
    denoise_fn: `denoise_fn(x [B, ...], sigma float32 [B]) -> D(x; σ) [B, ...]`.
    sigmas: [N + 1] descending σ grid, σ_0 > 0, usually ending with 0
      (`ddx.sampling.sigma.karras_sigmas`); N = steps (static: the array's length).
    rng: PRNG key. `ddx.sampling.initial_noise(rng, shape)` is the unit
      noise when x_T is None (the same start as the DDPM samplers); the
      stochastic sampler's step i draws from
      `jax.random.split(jax.random.split(rng)[1], N)[i]`.
    shape: the batch shape, e.g. (B, H, W, C).
    sampler: "euler" | "heun" | "stochastic" | "dpm_solver_pp" (NFE in the
      module docstring).
    churn, s_tmin, s_tmax, s_noise: EDM Alg. 2's S_churn, S_tmin, S_tmax,
      S_noise, for "stochastic": γ_i = min(S_churn/N, √2 − 1) where
      S_tmin <= σ_i <= S_tmax, else 0. churn = 0 makes it "heun".
    round_sigma: for "stochastic" on a network that knows only some σ
      (`vp_round_sigma`): σ̂_i = round_sigma(σ_i + γ_i·σ_i) (at least σ_i),
      so the noise is added up to the σ̂ the network is then evaluated at,
      as EDM's code rounds t̂ for its discrete-time models. None: σ̂ as is.
    x_T: optional unit starting noise [shape] (scaled by σ_0 here).
    clip_x0: clip D(x; σ) to [-1, 1] at every evaluation.
    return_trajectory: also return the state after every step, [N, *shape].
  Returns:
    x at σ_N [shape] float32 (the sample when σ_N = 0), or (x, trajectory).
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler={sampler!r} is not a sigma-grid sampler; use one "
                     f"of {SAMPLERS}")
  _check_grid(sigmas)
  shape = tuple(shape)
  sig = jnp.asarray(sigmas, jnp.float32)
  n = sig.shape[0] - 1
  noise = (initial_noise(rng, shape) if x_T is None
           else jnp.asarray(x_T, jnp.float32).reshape(shape))
  x = sig[0] * noise

  def den(x, s):
    d = denoise_fn(x, jnp.full((shape[0],), s, jnp.float32)).astype(jnp.float32)
    return jnp.clip(d, -1.0, 1.0) if clip_x0 else d

  deriv = lambda x, s: (x - den(x, s)) / s

  if sampler in ("euler", "heun"):
    return steps_lib.integrate(deriv, sig, x, sampler, return_trajectory)

  if sampler == "stochastic":
    keys = jax.random.split(jax.random.split(rng)[1], n)
    gamma_max = jnp.minimum(jnp.asarray(churn, jnp.float32) / n, math.sqrt(2.0) - 1.0)
    in_band = (sig[:-1] >= s_tmin) & (sig[:-1] <= s_tmax)
    gammas = jnp.where(in_band, gamma_max, 0.0)

    def body(x, inp):
      s, s_next, gamma, key = inp
      s_hat = s + gamma * s
      if round_sigma is not None:   # (never below σ: churn only adds noise)
        s_hat = jnp.maximum(round_sigma(s_hat), s)
      eps = s_noise * jax.random.normal(key, shape, jnp.float32)
      x_hat = x + jnp.sqrt(jnp.maximum(s_hat ** 2 - s ** 2, 0.0)) * eps
      x_next = steps_lib.heun_step(deriv, x_hat, s_hat, s_next)
      return x_next, (x_next if return_trajectory else None)

    x, traj = jax.lax.scan(body, x, (sig[:-1], sig[1:], gammas, keys))
    return (x, traj) if return_trajectory else x

  # DPM-Solver++(2M) with α = 1, σ_t = σ and λ = −log σ (`steps.dpm_solver_pp_2m`).
  def body(carry, inp):
    x, state = carry
    s, s_next = inp
    end = s_next == 0
    h = jnp.log(s) - jnp.log(jnp.where(end, 1.0, s_next))
    state, x = steps_lib.dpm_solver_pp_2m(state, x, den(x, s), h, s_next / s, None, end)
    return (x, state), (x if return_trajectory else None)

  init = (x, steps_lib.dpm_solver_pp_2m_init(x))
  (x, _), traj = jax.lax.scan(body, init, (sig[:-1], sig[1:]))
  return (x, traj) if return_trajectory else x
