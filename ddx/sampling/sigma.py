"""Samplers on a σ grid for any denoiser in EDM's form x = y + σ·n.

`denoise_fn(x, sigma) -> D(x; σ)` takes x [B, ...] and σ float32 [B] and
returns the estimate of the clean data y. The probability-flow ODE is
dx/dσ = (x − D(x; σ))/σ (EDM Eq. 3 with s = 1, σ(t) = t), walked along a
descending grid σ_0 > ... > σ_N (typically ending at σ_N = 0,
`ddx.edm.karras_sigmas`). Network evaluations (NFE) for N steps:

  euler          N        Euler steps on the ODE (the step to σ = 0 returns D)
  heun           2N − 1   EDM Alg. 1: Heun, with an Euler last step to σ = 0
  stochastic     2N − 1   EDM Alg. 2: Heun plus churn (noise added, then removed)
  dpm_solver_pp  N        DPM-Solver++(2M) in λ = −log σ: first step first
                          order, the last step (to σ = 0) returns D

A whole trajectory is one `lax.scan`; Heun's skipped correction is a
`lax.cond`, so the last step really costs one evaluation. The steps are
`ddx.sampling.steps`'s, shared with the other grids. A repeated σ in a
grid is a zero-length step that the deterministic samplers pass unchanged
(its evaluations are still spent: `vp_grid` drops repeats).

The DDPM process maps onto this form (EDM Sec. 2, App. C.1): x = x_t/√ᾱ,
σ = √((1 − ᾱ)/ᾱ); `vp_sigmas`, `vp_grid` and `vp_denoiser` turn a
discrete-time ε/x0/v network into a D(x; σ).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddx import diffusion
from ddx.edm import karras_sigmas
from ddx.sampling import steps as steps_lib
from ddx.sampling.discrete import initial_noise
from ddx.schedules import Schedule

SigmaDenoiseFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]

SAMPLERS = ("euler", "heun", "stochastic", "dpm_solver_pp")
NFE = {"euler": "N", "heun": "2N - 1", "stochastic": "2N - 1", "dpm_solver_pp": "N"}
SIGMA_INDICES = ("nearest", "interp")


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

  Pure and jit-composable, as `ddx.sampling.discrete.sample`.

  Args:
    denoise_fn: `denoise_fn(x [B, ...], sigma float32 [B]) -> D(x; σ) [B, ...]`.
    sigmas: [N + 1] descending σ grid, σ_0 > 0, usually ending with 0
      (`ddx.edm.karras_sigmas`); N = steps (static: the array's length).
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


def vp_sigmas(sched: Schedule) -> np.ndarray:
  """σ_i = √((1 − ᾱ_i)/ᾱ_i) of a DDPM schedule, float64 [T], ascending in i.

  Raises ValueError when the schedule is a tracer (the grid is built on the
  host: close over a schedule built outside jit).
  """
  try:
    a = np.asarray(sched.alphas_cumprod, np.float64)
  except jax.errors.TracerArrayConversionError:
    raise ValueError("sigma-grid samplers of a DDPM model need the schedule's values "
                     "at trace time: close over a schedule built outside jit "
                     "instead of passing it as a jit argument") from None
  return np.sqrt((1.0 - a) / a)


def vp_grid(sched: Schedule, steps: int, sigma_index: str = "nearest",
            rho: float = 7.0) -> np.ndarray:
  """A Karras σ grid for a DDPM model, between its smallest and largest σ.

  Args:
    sched: the model's schedule (concrete).
    steps: N >= 1 sampler steps.
    sigma_index: "nearest" rounds each grid σ to the nearest of the
      schedule's own σ_i (in σ, as EDM's code does for its VP models), so
      every network evaluation is at a trained index, and drops repeats:
      where the schedule's σ_i are sparser than the grid (small σ, and the
      cosine schedule), several grid points round to one σ_i, and a
      zero-length step would cost evaluations and move nothing. "interp"
      keeps the grid as is.
    rho: ρ of the grid.
  Returns:
    float64 [N' + 1], strictly descending, ending in 0; N' = steps for
    "interp", N' <= steps for "nearest" (the steps the sampler takes).
  """
  if sigma_index not in SIGMA_INDICES:
    raise ValueError(f"sigma_index={sigma_index!r} is unknown; use one of {SIGMA_INDICES}")
  s = vp_sigmas(sched)
  if s.size < 2:
    raise ValueError("sigma-grid samplers need a schedule with T >= 2 steps")
  grid = karras_sigmas(s[0], s[-1], rho, steps)
  if sigma_index == "nearest":
    idx = np.argmin(np.abs(grid[:-1, None] - s[None, :]), axis=1)
    grid = np.concatenate([s[np.unique(idx)[::-1]], [0.0]])
  return grid


def vp_round_sigma(sched: Schedule, sigma_index: str = "nearest"
                   ) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """The σ a DDPM network can be evaluated at, for the stochastic sampler's σ̂.

  Args:
    sched: the model's schedule (concrete).
    sigma_index: "nearest": the nearest of the schedule's σ_i (in σ, as
      `vp_grid` rounds); "interp": σ capped at the largest σ_{T−1}.
  Returns:
    `round_sigma(sigma float32 scalar) -> float32 scalar`, never above σ_{T−1}.
  """
  if sigma_index not in SIGMA_INDICES:
    raise ValueError(f"sigma_index={sigma_index!r} is unknown; use one of {SIGMA_INDICES}")
  s = jnp.asarray(vp_sigmas(sched), jnp.float32)
  if sigma_index == "nearest":
    return lambda sigma: s[jnp.argmin(jnp.abs(s - sigma))]
  return lambda sigma: jnp.minimum(sigma, s[-1])


def vp_denoiser(denoise_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray],
                sched: Schedule, prediction: str = "eps",
                sigma_index: str = "nearest") -> SigmaDenoiseFn:
  """A DDPM network as EDM's D(x; σ) (the VP mapping, EDM Table 1 column VP).

  x_t = √ᾱ·x with ᾱ = 1/(1 + σ²); the network runs on x_t at the index
  whose σ_i matches σ, and its output is converted to x̂_0 = D(x; σ).

  Args:
    denoise_fn: `denoise_fn(x_t [B, ...], i [B]) -> [B, ...]` in the
      `prediction` parameterisation. With sigma_index "nearest" i is int32
      (the index i with σ_i nearest σ); with "interp" i is float32, the
      fractional index where log σ_i, linearly interpolated in i, equals
      log σ (the network must accept a real-valued time).
    sched: the schedule it was trained with.
    prediction: eps | x0 | v.
    sigma_index: "nearest" | "interp".
  Returns:
    `D(x [B, ...], sigma float32 [B]) -> x̂_0 [B, ...]` for σ in
    [σ_0, σ_{T−1}] (σ > 0).
  """
  if prediction not in diffusion.PREDICTIONS:
    raise ValueError(
        f"prediction={prediction!r} is unknown; use one of {diffusion.PREDICTIONS}")
  if sigma_index not in SIGMA_INDICES:
    raise ValueError(f"sigma_index={sigma_index!r} is unknown; use one of {SIGMA_INDICES}")
  a_sched = sched.alphas_cumprod
  sig_sched = jnp.sqrt((1.0 - a_sched) / a_sched)

  def D(x, sigma):
    sigma = jnp.asarray(sigma, jnp.float32)
    if sigma_index == "nearest":
      i = jnp.argmin(jnp.abs(sig_sched[None, :] - sigma[:, None]), axis=1).astype(jnp.int32)
    else:
      i = jnp.interp(jnp.log(sigma), jnp.log(sig_sched),
                     jnp.arange(sig_sched.shape[0], dtype=jnp.float32))
    a = 1.0 / (1.0 + jnp.square(sigma))
    x_t = jnp.sqrt(a).reshape((-1,) + (1,) * (x.ndim - 1)) * x
    out = denoise_fn(x_t, i).astype(jnp.float32)
    return diffusion.to_x0_eps(out, x_t, a, prediction)[0]
  return D
