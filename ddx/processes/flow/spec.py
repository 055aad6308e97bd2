"""The flow-matching process's config half (no JAX): keys, checks, samplers, defaults."""
from __future__ import annotations

from ddx.processes import base

T_SAMPLINGS = ("logit_normal", "uniform")   # diffusion.t_sampling
PREDICTIONS = ("v", "x0")                   # diffusion.prediction for process = flow
SAMPLERS = ("euler", "heun")                # ddx.sampling.flow.SAMPLERS


class FlowSpec(base.Spec):
  """Rectified flow (as SD3): x_t = (1 − t)·x_0 + t·n, the network's velocity."""
  name = "flow"
  fields = (
      base.Field("t_sampling", "logit_normal", "logit_normal (SD3) | uniform"),
      base.Field("logit_mean", 0.0, "logit-normal training times: mean"),
      base.Field("logit_std", 1.0, "logit-normal training times: std"),
      base.Field("shift", 1.0, "SD3's resolution time shift (1 = none), training "
                     "and sampling"),
      base.Field("t_min", 0.05, "x0 prediction: the velocity loss clips t below at "
                     "t_min"),
  )
  predictions = PREDICTIONS
  default_prediction = "v"
  samplers = SAMPLERS
  default_sampler = "euler"
  implementation = "ddx.processes.flow.process:FlowProcess"
  repa = True   # REPA aligns the network is called once, on x_t

  def check(self, f) -> None:
    if f["t_sampling"] not in T_SAMPLINGS:
      raise ValueError(f"diffusion.t_sampling={f['t_sampling']!r} is unknown; "
                       f"use one of {T_SAMPLINGS}")
    base.finite(f, "logit_mean", "logit_std", "shift", "t_min")
    if f["logit_std"] <= 0:
      raise ValueError(f"diffusion.logit_std={f['logit_std']} must be > 0 (SD3: 1.0)")
    if f["shift"] <= 0:
      raise ValueError(f"diffusion.shift={f['shift']} must be > 0 "
                       "(1 = no shift; SD3 uses 3 at 1024²)")
    if not 0 < f["t_min"] < 1:
      raise ValueError(f"diffusion.t_min={f['t_min']} must lie in (0, 1) (JiT: 0.05)")


def check_prediction(prediction) -> None:
  """Raises ValueError unless `prediction` is a flow prediction."""
  if prediction not in PREDICTIONS:
    raise ValueError(f"diffusion.prediction={prediction!r} is not a flow "
                     f"prediction; use one of {PREDICTIONS}")


SPEC = FlowSpec()
