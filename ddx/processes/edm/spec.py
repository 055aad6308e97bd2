"""The EDM process's config half (no JAX): its keys, checks, samplers and defaults."""
from __future__ import annotations

from ddx.processes import base

SAMPLERS = ("euler", "heun", "stochastic", "dpm_solver_pp")   # ddx.sampling.sigma.SAMPLERS


class EDMSpec(base.Spec):
  """EDM (Karras et al. 2022): x = y + σn with EDM's preconditioning; defaults
  are the paper's (Table 1, Sec. 5)."""
  name = "edm"
  fields = (
      base.Field("sigma_data", 0.5, "σ_d, the data's standard deviation, or auto"),
      base.Field("sigma_min", 0.002, "smallest σ of the sampling grid"),
      base.Field("sigma_max", 80.0, "largest σ (the start of sampling)"),
      base.Field("rho", 7.0, "ρ of the Karras grid (EDM Eq. 5)"),
      base.Field("p_mean", -1.2, "training ln σ ~ N(p_mean, p_std²)"),
      base.Field("p_std", 1.2, "training ln σ ~ N(p_mean, p_std²)"),
  )
  predictions = ()          # the network is preconditioned: no choice of target
  samplers = SAMPLERS
  default_sampler = "heun"
  implementation = "ddx.processes.edm.process:EDMProcess"
  repa = True   # REPA aligns the network is called once, on c_in·(x_0 + σn)
  # fourier: EDM2's 2π·N(0, 1) frequencies on c_noise = ln(σ)/4, unscaled.
  time_scales = {"positional": 1.0, "fourier": 1.0}

  def check(self, f) -> None:
    base.finite(f, "sigma_min", "sigma_max", "rho", "p_mean", "p_std")
    sigma_data = f["sigma_data"]
    # "auto" is measured from the data when training starts (ddx.train.resolve_auto).
    if sigma_data != base.AUTO:
      if not base.is_finite(sigma_data) or sigma_data <= 0:
        raise ValueError(f"diffusion.sigma_data={sigma_data!r} must be a number > 0 (the "
                         "data's standard deviation) or auto (measured from the training "
                         "data)")
    if f["sigma_min"] <= 0:
      raise ValueError(f"diffusion.sigma_min={f['sigma_min']} must be > 0 (EDM: 0.002)")
    if f["sigma_min"] >= f["sigma_max"]:
      raise ValueError(f"diffusion.sigma_min={f['sigma_min']} must be below "
                       f"diffusion.sigma_max={f['sigma_max']} (EDM: 0.002 and 80)")
    if f["rho"] <= 0:
      raise ValueError(f"diffusion.rho={f['rho']} must be > 0 (EDM: 7)")
    if f["p_std"] <= 0:
      raise ValueError(f"diffusion.p_std={f['p_std']} must be > 0 (EDM: 1.2)")


SPEC = EDMSpec()
