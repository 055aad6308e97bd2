"""Pure samplers, each a whole trajectory in one `lax.scan` (what research code imports).

  discrete.py   the DDPM process over a `Schedule`: ddpm, ddim, dpm_solver_pp,
                and the timestep spacings
  sigma.py      samplers on a σ grid for any D(x; σ) in EDM's form x = y + σn:
                euler, heun, stochastic (EDM Alg. 1-2), dpm_solver_pp; and the
                VP mapping that runs a DDPM network on a σ grid
  flow.py       flow-matching ODE samplers from t = 1 to 0: euler, heun
  steps.py      the steps they share: Euler/Heun, DPM-Solver++(2M)

`sample(denoise_fn, process, rng, shape, sampler=..., steps=...)` runs any of
them: it checks the sampler against the process's `Spec` and hands over to the
process (`ddx.processes`), which picks its grid and sampler module. It is pure
and composes under the caller's `jax.jit`. The face that wraps a trained
network (guidance, jit, sharding) is `ddx.model`.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddx import processes
from ddx.sampling import discrete
from ddx.sampling import flow
from ddx.sampling import sigma
from ddx.sampling.discrete import (DDPM_VARIANCES, SAMPLERS, SPACINGS, DenoiseFn,
                                   Step, initial_noise, timesteps)

# The samplers each built-in process offers, and what `sample` runs when
# sampler is None or "auto" (from the processes' Specs). A DDPM model runs
# the σ-grid samplers through the VP mapping (sigma.vp_*).
SAMPLERS_BY_PROCESS = {n: processes.spec(n).samplers for n in processes.names()}
DEFAULT_SAMPLER = {n: processes.spec(n).default_sampler for n in processes.names()}

__all__ = ["sample", "timesteps", "initial_noise", "SAMPLERS",
           "SAMPLERS_BY_PROCESS", "DEFAULT_SAMPLER", "SPACINGS", "DDPM_VARIANCES",
           "DenoiseFn", "Step", "discrete", "sigma", "flow"]


def _nonzero(v) -> bool:
  """Whether a (possibly traced) scalar is known to be nonzero now."""
  try:
    return float(np.asarray(v)) != 0.0
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return False


def sample(denoise_fn, process, rng: jax.Array, shape,
           sampler: Optional[str] = None, steps: int = 50, eta: float = 0.0,
           x_T: Optional[jnp.ndarray] = None, clip_x0: bool = False,
           prediction: Optional[str] = None, ddpm_variance: str = "posterior",
           spacing: Optional[str] = None, return_trajectory: bool = False, *,
           churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
           sigma_index: str = "nearest"):
  """Runs a sampler of `process` from noise to data as one `lax.scan`.

  Pure and jit-composable: call it inside your own `jax.jit`, with weights
  flowing in as arguments of that jit (through the closure in `denoise_fn`).

  What denoise_fn is, by process (what `process.denoiser(network)` makes):
    Schedule (DDPM): `denoise_fn(x_t, i) -> [B, ...]` the network output in
      the `prediction` parameterisation, i int32 [B] in [0, T) (float32
      fractional indices for sigma_index="interp").
    EDM: `denoise_fn(x, sigma float32 [B]) -> D(x; σ)`, the preconditioned
      denoiser (`ddx.edm.denoise`).
    Flow: `denoise_fn(x_t, t float32 [B] in [0, 1]) -> v̂`, the velocity
      (`ddx.flow.velocity` converts an x0-network).

  Samplers (SAMPLERS_BY_PROCESS) and network evaluations for `steps` = N:
    Schedule: ddpm, ddim, dpm_solver_pp (N, discrete indices, `timesteps`);
      euler (N), heun (2N − 1), stochastic (2N − 1) on a Karras grid (ρ = 7)
      between the schedule's smallest and largest σ = √((1 − ᾱ)/ᾱ), with
      x = x_t/√ᾱ (EDM's VP mapping; the output is x at σ = 0).
    EDM: euler (N), heun (2N − 1), stochastic (2N − 1), dpm_solver_pp (N)
      on `ddx.edm.karras_sigmas(sigma_min, sigma_max, rho, N)`.
    Flow: euler (N), heun (2N − 1) on `ddx.flow.time_grid(N, shift)`.

  Args:
    denoise_fn: see above.
    process: a `ddx.processes.Process` (what `ddx.Model.process` is), or a
      bare `Schedule`, `ddx.edm.EDM` or `ddx.flow.Flow`.
    rng: PRNG key for the starting noise (`initial_noise(rng, shape)`, scaled
      by σ_0 on a σ grid) and the per-step noise.
    shape: shape of the sample batch, e.g. (B, H, W, C).
    sampler: one of the process's samplers (SAMPLERS_BY_PROCESS); None or
      "auto" = its default (DEFAULT_SAMPLER: ddim, heun, euler).
    steps: number of sampler steps N (static); 1 <= N <= T for the discrete
      samplers.
    eta: DDIM η (ddim only).
    x_T: optional unit starting noise [shape]; drawn from rng when None.
    clip_x0: clip x̂_0 to [-1, 1] at every step: the DDPM x̂_0, EDM's D, and
      for flow the implied x̂_0 = x_t − t·v̂ (the velocity is recomputed).
    prediction: eps | x0 | v, what a DDPM denoise_fn returns; None keeps the
      process's own (a bare Schedule: eps). Ignored by EDM and flow, whose
      denoise_fn already returns D or v̂.
    ddpm_variance: for "ddpm": "posterior" (σ² = β̃, default) or "beta" (σ² = β).
    spacing: one of SPACINGS, for the discrete DDPM samplers only; None
      picks the sampler's default.
    return_trajectory: also return the states after every step, [N, *shape].
    churn, s_tmin, s_tmax, s_noise: EDM Alg. 2's S_churn, S_tmin, S_tmax,
      S_noise for sampler "stochastic" (churn must be 0 for the others).
    sigma_index: a DDPM model on a σ grid: "nearest" rounds the grid to the
      schedule's σ_i (integer indices), "interp" gives the network the
      fractional index where the schedule's log σ equals log σ.
  Returns:
    x_0 [shape] float32 (not clipped unless clip_x0), or (x_0, trajectory).
  """
  proc = processes.as_process(process, prediction)
  name, valid = proc.spec.name, proc.spec.samplers
  sampler = proc.spec.default_sampler if sampler in (None, processes.AUTO) else sampler
  if sampler not in valid:
    raise ValueError(f"sampler={sampler!r} does not exist for the {name} process; "
                     f"use one of {valid}")
  if sampler != "stochastic" and _nonzero(churn):
    raise ValueError(f"churn={churn} applies to sampler='stochastic' only; "
                     f"set churn=0 for sampler={sampler!r}")
  spaced = proc.spec.spaced_samplers
  if spacing is not None and sampler not in spaced:
    raise ValueError(f"spacing={spacing!r} applies to the samplers {spaced} of the {name} "
                     f"process only; {sampler!r} on the {name} process walks its own "
                     "grid: leave spacing unset")
  return proc.sample(denoise_fn, rng, shape, sampler, steps, x_T=x_T, clip_x0=clip_x0,
                     return_trajectory=return_trajectory, eta=eta,
                     ddpm_variance=ddpm_variance, spacing=spacing, churn=churn,
                     s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise,
                     sigma_index=sigma_index)
