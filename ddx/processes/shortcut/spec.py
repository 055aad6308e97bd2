"""The shortcut-model process's config half (no JAX): keys, checks, samplers, defaults."""
from __future__ import annotations

import math

from ddx.processes import base
from ddx.processes.flow import spec as flow_config

SAMPLERS = ("shortcut", "euler")   # ddx.processes.shortcut.ShortcutProcess.sample
# Flow matching's training-time keys, shared with diffusion.process=flow (the
# same Field objects, so the same defaults): the d = 0 part of the batch draws
# its times as a flow run does.
FLOW_TIME_KEYS = ("t_sampling", "logit_mean", "logit_std")


def check_max_steps(max_steps, name: str = "max_steps") -> int:
  """log2(max_steps), or ValueError (one line naming `name`) unless
  max_steps is a power of two ≥ 1."""
  if not (isinstance(max_steps, int) and not isinstance(max_steps, bool) and
          max_steps >= 1 and max_steps & (max_steps - 1) == 0):
    raise ValueError(f"{name}={max_steps!r} must be a power of two (1, 2, 4, ..., 128)")
  return int(math.log2(max_steps))


def step_counts(max_steps: int) -> tuple[int, ...]:
  """The step counts the shortcut sampler takes: 1, 2, 4, ..., max_steps."""
  return tuple(2 ** k for k in range(check_max_steps(max_steps) + 1))


class ShortcutSpec(base.Spec):
  """Shortcut models (Frans et al. 2024): a flow network that also sees its
  step size d, trained by flow matching at d = 0 and self-consistency
  (one 2d-step = two d-steps) on powers of two d."""
  name = "shortcut"
  fields = tuple(x for x in flow_config.FlowSpec.fields if x.key in FLOW_TIME_KEYS) + (
      base.Field("shortcut_max_steps", 128, "M, the most sampling steps (a power of "
                 "two): step sizes 1/M, 2/M, ..., 1 are trained"),
      base.Field("shortcut_consistency_fraction", 0.25, "share of each batch trained "
                 "on self-consistency (the rest: flow matching at d = 0)"),
  )
  samplers = SAMPLERS
  default_sampler = "shortcut"
  bpd_estimators = ()          # a few-step map has no likelihood ODE
  implementation = "ddx.processes.shortcut.process:ShortcutProcess"
  repa = True   # REPA aligns the aux of the full-batch call on x_t (not the stop-gradient bootstrap calls)
  second_time = True           # the network sees (t, d)
  loss_inputs = ("labels",)    # the bootstrap targets run on part of the batch

  def check(self, f) -> None:
    # Flow's checks of its time keys, on flow's defaults for the rest.
    flow_config.SPEC.check({**flow_config.SPEC.defaults(),
                            **{k: f[k] for k in FLOW_TIME_KEYS}})
    levels = check_max_steps(f["shortcut_max_steps"], "diffusion.shortcut_max_steps")
    if levels == 0:
      raise ValueError("diffusion.shortcut_max_steps=1 leaves no step size to make "
                       "self-consistent; use a power of two ≥ 2 (the paper: 128)")
    frac = f["shortcut_consistency_fraction"]
    if not (base.is_finite(frac) and 0 < frac < 1):
      raise ValueError(f"diffusion.shortcut_consistency_fraction={frac!r} must lie in "
                       "(0, 1) (the paper: 0.25)")

  def max_steps(self, f, sampler: str) -> int:
    return f["shortcut_max_steps"] if sampler == "shortcut" else 100_000

  def check_steps(self, f, sampler: str, steps, name: str = "steps") -> None:
    """The shortcut sampler takes a power of two of steps, at most M: the step
    sizes 1/steps the network was trained on."""
    if sampler != "shortcut":
      return
    valid = step_counts(f["shortcut_max_steps"])
    if isinstance(steps, bool) or not isinstance(steps, int) or steps not in valid:
      raise ValueError(f"{name}={steps!r} is not a step count of the shortcut sampler: "
                       f"a power of two up to diffusion.shortcut_max_steps={valid[-1]}, "
                       f"one of {valid}; set sampling.steps / eval.steps to one of them, "
                       "or use sampler euler (the d = 0 flow ODE, any steps)")


SPEC = ShortcutSpec()
