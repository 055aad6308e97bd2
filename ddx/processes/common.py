"""What every process's JAX half shares, and `sample`, which runs any of them.

  static_field   a process's hyper-parameter as a static dataclass field
  bcast          a per-example [B] array shaped to broadcast against [B, ...]
  loss_metrics   the metrics dict every process's loss returns
  sample         `ddx.sample`: checks the sampler against the process's Spec
                 and hands over to the process (one lax.scan)
"""
from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ddx import processes


def static_field(default):
  """A dataclass field of a process's hyper-parameters: static (not a pytree
  leaf), so a process object is a pytree with no leaves and jit keys on it."""
  return flax.struct.field(pytree_node=False, default=default)


def bcast(a: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
  """Reshapes a per-example [B] (or scalar) array to broadcast against x [B, ...]
  (in x's dtype); every process's math uses it."""
  a = jnp.asarray(a, dtype=x.dtype)
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def loss_metrics(loss, per_ex: jnp.ndarray, quarter: jnp.ndarray, aux=None) -> dict:
  """The metrics dict every process's loss returns.

  Args:
    loss: the scalar loss.
    per_ex: [B] per-example loss; quarter: [B] int32 in [0, 4), which quarter
      of the process's noise levels each example's draw fell in.
    aux: the network's auxiliary output (e.g. batch_stats), kept as "aux".
  Returns:
    {"loss", "mse_by_quartile": [4] mean per quarter (0 where empty), "aux"?}.
  """
  onehot = jax.nn.one_hot(quarter, 4, dtype=jnp.float32)
  by_q = (onehot * per_ex[:, None]).sum(0) / jnp.maximum(onehot.sum(0), 1.0)
  metrics = {"loss": loss, "mse_by_quartile": by_q}
  if aux is not None:
    metrics["aux"] = aux
  return metrics


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
      denoiser (`ddx.processes.edm.core.denoise`).
    Flow: `denoise_fn(x_t, t float32 [B] in [0, 1]) -> v̂`, the velocity
      (`ddx.processes.flow.core.velocity` converts an x0-network).

  Samplers (each process's `Spec.samplers`) and network evaluations for `steps` = N:
    Schedule: ddpm, ddim, dpm_solver_pp (N, discrete indices, `timesteps`);
      euler (N), heun (2N − 1), stochastic (2N − 1) on a Karras grid (ρ = 7)
      between the schedule's smallest and largest σ = √((1 − ᾱ)/ᾱ), with
      x = x_t/√ᾱ (EDM's VP mapping; the output is x at σ = 0).
    EDM: euler (N), heun (2N − 1), stochastic (2N − 1), dpm_solver_pp (N)
      on `ddx.sampling.sigma.karras_sigmas(sigma_min, sigma_max, rho, N)`.
    Flow: euler (N), heun (2N − 1) on `ddx.processes.flow.core.time_grid(N, shift)`.

  Args:
    denoise_fn: see above.
    process: a `ddx.processes.Process` (what `ddx.Model.process` is), or a
      bare `Schedule`, `ddx.edm.EDM` or `ddx.flow.Flow`.
    rng: PRNG key for the starting noise (`ddx.sampling.initial_noise(rng, shape)`, scaled
      by σ_0 on a σ grid) and the per-step noise.
    shape: shape of the sample batch, e.g. (B, H, W, C).
    sampler: one of the process's samplers (`Spec.samplers`); None or
      "auto" = its default (`Spec.default_sampler`).
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
    spacing: one of DDPM's spacings (`ddx.processes.ddpm.sampling.SPACINGS`), for
      the discrete DDPM samplers only; None
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
  sampler = proc.spec.check_sampler(sampler, spacing=spacing, churn=_nonzero(churn))
  return proc.sample(denoise_fn, rng, shape, sampler, steps, x_T=x_T, clip_x0=clip_x0,
                     return_trajectory=return_trajectory, eta=eta,
                     ddpm_variance=ddpm_variance, spacing=spacing, churn=churn,
                     s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise,
                     sigma_index=sigma_index)
