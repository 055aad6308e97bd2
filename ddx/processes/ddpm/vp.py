"""DDPM's VP mapping onto EDM's σ form (EDM Sec. 2, App. C.1): x = x_t/√ᾱ,
σ = √((1 − ᾱ)/ᾱ). `vp_sigmas`, `vp_grid` and `vp_denoiser` turn a discrete-time
ε/x0/v network into a D(x; σ), which the σ-grid samplers of
`ddx.sampling.sigma` walk and the σ-form likelihood ODE integrates.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddx.processes.ddpm import core as diffusion
from ddx.processes.ddpm.schedules import Schedule
from ddx.sampling.sigma import SIGMA_INDICES, SigmaDenoiseFn, karras_sigmas


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
