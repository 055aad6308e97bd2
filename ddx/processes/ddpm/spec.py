"""The DDPM process's config half (no JAX): its keys, checks, samplers and defaults.

The names here are the single source for ddx.config and the JAX modules
(ddx.processes.ddpm.core.PREDICTIONS, ddx.schedules); the samplers' own modules keep
their lists, which tests/test_config.py compares with these.
"""
from __future__ import annotations

from ddx.processes import base

PREDICTIONS = ("eps", "x0", "v")          # diffusion.prediction (ddx.diffusion)
SCHEDULES = ("linear", "cosine")          # diffusion.schedule (ddx.schedules)
DISCRETE_SAMPLERS = ("ddpm", "ddim", "dpm_solver_pp")   # ddx.processes.ddpm.sampling.SAMPLERS
SIGMA_SAMPLERS = ("euler", "heun", "stochastic")   # through the VP mapping (sigma.vp_*)
SPACINGS = ("uniform", "trailing", "quadratic", "logsnr")   # ddx.processes.ddpm.sampling.SPACINGS
DDPM_VARIANCES = ("posterior", "beta")    # sampling.ddpm_variance
SIGMA_INDICES = ("nearest", "interp")     # sampling.sigma_index: a DDPM model on a σ grid


class DDPMSpec(base.Spec):
  """Discrete-time DDPM (Ho et al. 2020) over a `ddx.schedules.Schedule`."""
  name = "ddpm"
  fields = (
      base.Field("schedule", "linear", "linear | cosine"),
      base.Field("num_timesteps", 1000, "T, the number of diffusion steps"),
      base.Field("beta_start", 1e-4, "linear schedule only: β_1"),
      base.Field("beta_end", 0.02, "linear schedule only: β_T"),
  )
  predictions = PREDICTIONS
  default_prediction = "eps"
  samplers = DISCRETE_SAMPLERS + SIGMA_SAMPLERS
  default_sampler = "ddim"
  spaced_samplers = DISCRETE_SAMPLERS
  spacings = SPACINGS
  bpd_estimators = ("ode", "vlb", "both")
  implementation = "ddx.processes.ddpm.process:DDPMProcess"
  repa = True   # REPA aligns the network is called once, on x_t

  def check(self, f) -> None:
    base.one_of(f, "schedule", SCHEDULES)
    t = f["num_timesteps"]
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
      raise ValueError(f"diffusion.num_timesteps={t!r} must be a positive integer")
    base.finite(f, "beta_start", "beta_end")
    if not 0 < f["beta_start"] <= f["beta_end"] < 1:
      raise ValueError(f"diffusion.beta_start={f['beta_start']}, beta_end={f['beta_end']}: "
                       "need 0 < beta_start <= beta_end < 1")

  def check_sampling(self, g, group: str) -> None:
    if "ddpm_variance" in g and g["ddpm_variance"] not in DDPM_VARIANCES:
      raise ValueError(f"{group}.ddpm_variance={g['ddpm_variance']!r} must be one of "
                       f"{DDPM_VARIANCES}")
    if "sigma_index" in g and g["sigma_index"] not in SIGMA_INDICES:
      raise ValueError(f"{group}.sigma_index={g['sigma_index']!r} is unknown; use one of "
                       f"{SIGMA_INDICES}")

  def max_steps(self, f, sampler: str) -> int:
    # The discrete samplers visit distinct indices of the T steps.
    return f["num_timesteps"] if sampler in DISCRETE_SAMPLERS else 100_000


SPEC = DDPMSpec()
