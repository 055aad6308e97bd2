"""The consistency (sCM) process's config half (no JAX): keys, checks, sampler, defaults."""
from __future__ import annotations

import math

from ddx.processes import base

SAMPLERS = ("consistency",)   # ddx.processes.consistency.core.sample: 1 step, then re-noise and jump


class ConsistencySpec(base.Spec):
  """Continuous-time consistency models (sCM, Lu & Song 2024) in TrigFlow:
  x_t = cos(t)·x_0 + sin(t)·z, z ~ N(0, σ_d²), t in [0, π/2]; defaults are the
  paper's. Trained from scratch (consistency training) or distilled from
  training.teacher (any ddx process)."""
  name = "consistency"
  fields = (
      base.Field("sigma_data", 0.5, "σ_d, the data's standard deviation, or auto"),
      base.Field("scm_p_mean", -1.0, "training times t = arctan(e^τ/σ_d), "
                     "τ ~ N(scm_p_mean, scm_p_std²)"),
      base.Field("scm_p_std", 1.4, "training times: the std of τ"),
      base.Field("scm_tangent_c", 0.1, "tangent normalisation g/(‖g‖ + c); 0 = off"),
      base.Field("scm_warmup_steps", 10_000, "tangent warm-up: the dF/dt term's weight "
                     "r goes 0 -> 1 over this many steps (0 = r = 1 from the start)"),
      base.Field("scm_adaptive", True, "adaptive weighting: a learned log-variance w(t), "
                     "loss e^-w·Δ² + w"),
      base.Field("scm_mid_t", 1.1, "the re-noising time of the 2-step sampler; n steps "
                     "re-noise at scm_mid_t·(n-k)/(n-1), k = 1..n-1"),
  )
  samplers = SAMPLERS
  default_sampler = "consistency"
  bpd_estimators = ()       # no likelihood ODE: the model is a one-step map
  implementation = "ddx.processes.consistency.process:ConsistencyProcess"
  repa = True   # REPA aligns the aux of F(x_t/σ_d, t), the JVP's primal call (not the tangent)
  # The network sees 1000·t/(π/2) (`ddx.processes.consistency.core.time_input`), flow's range,
  # times 0.02 before the positional embedding: its fastest frequency then turns
  # 13 rad over t in [0, π/2], not 637. sCM: a fast-moving time embedding makes
  # dF/dt, and so the tangent, blow up; on the digits scale 1 gave FD 221 at step
  # 400 and 0.02 FD 24 (docs/consistency.md).
  time_embedding = "positional"
  time_scales = {"positional": 0.02}
  # The trainer's extras (ddx.processes.Process.loss): the step for the warm-up,
  # the teacher's D(y; σ) for distillation; the network's log-variance head.
  loss_inputs = ("step", "teacher")
  logvar = True

  def check(self, f) -> None:
    base.finite(f, "scm_p_mean", "scm_p_std", "scm_tangent_c", "scm_mid_t")
    sigma_data = f["sigma_data"]
    if sigma_data != base.AUTO and not (base.is_finite(sigma_data) and sigma_data > 0):
      raise ValueError(f"diffusion.sigma_data={sigma_data!r} must be a number > 0 (the "
                       "data's standard deviation) or auto (measured from the training "
                       "data)")
    if f["scm_p_std"] <= 0:
      raise ValueError(f"diffusion.scm_p_std={f['scm_p_std']} must be > 0 (sCM: 1.4)")
    if f["scm_tangent_c"] < 0:
      raise ValueError(f"diffusion.scm_tangent_c={f['scm_tangent_c']} must be >= 0 "
                       "(sCM: 0.1; 0 = no tangent normalisation)")
    w = f["scm_warmup_steps"]
    if isinstance(w, bool) or not isinstance(w, int) or w < 0:
      raise ValueError(f"diffusion.scm_warmup_steps={w!r} must be an integer >= 0 "
                       "(sCM: 10000; 0 = no warm-up)")
    if not isinstance(f["scm_adaptive"], bool):
      raise ValueError(f"diffusion.scm_adaptive={f['scm_adaptive']!r} must be True or False")
    if not 0 < f["scm_mid_t"] < math.pi / 2:
      raise ValueError(f"diffusion.scm_mid_t={f['scm_mid_t']} must lie in (0, π/2) "
                       "(sCM: 1.1)")

  def max_steps(self, f, sampler) -> int:
    del f, sampler
    return 1000


SPEC = ConsistencySpec()
