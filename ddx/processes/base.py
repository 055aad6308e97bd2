"""What config validation needs to know of a process, in plain Python (no JAX).

Each process is a folder `ddx/processes/<name>/`: `spec.py` (a `Spec`: its
diffusion.* keys with defaults, their range checks, its predictions and
samplers and their defaults) and the JAX implementation the Spec names.
`ddx.config` validates a run through the Specs alone, so loading and
checking a config never imports JAX.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

from ddx.registry import Field

LOSS_INPUTS = ("labels", "null_label", "step", "teacher")   # Spec.loss_inputs
AUTO = "auto"   # diffusion.prediction / sampling.sampler / eval.sampler: the process's default


class Spec:
  """The JAX-free half of a process; subclass it once per process.

  Attributes:
    name: the diffusion.process value that selects it.
    fields: the diffusion.* keys it owns (diffusion.process and
      diffusion.prediction are shared by all processes).
    predictions: valid diffusion.prediction values; () = the key is unused.
    default_prediction: what diffusion.prediction="auto" becomes (None when
      the process does not use the key).
    samplers: valid sampling.sampler / eval.sampler values.
    default_sampler: what sampler "auto" (or None in `ddx.sample`) becomes.
    spaced_samplers: the samplers that take sampling.spacing (the others
      walk the process's own grid, and spacing must be "auto").
    spacings: the sampling.spacing values its spaced samplers take.
    bpd_estimators: valid eval.bpd_estimator values for this process.
    time_embedding, time_scales: what model.time_embedding / time_scale
      "auto" become for this process.
    implementation: "module:Class" of the JAX process (the `Process`
      protocol in `ddx.processes`), or the class itself.
    second_time: the network takes two times, t of shape [B, 2] (the
      backbones' `second_time`; e.g. MeanFlow's interval, a shortcut model's
      step size), the second embedded by a zero-initialised MLP.
    logvar: the network has a learned log-variance head (adaptive loss
      weighting): in training, `loss`'s apply_fn returns ((out, logvar [B]),
      aux) instead of (out, aux).
    loss_inputs: extra keyword arguments the trainer passes to `loss`, any of
      "labels" (int32 [B] after label dropout, or None), "null_label" (int:
      model.num_classes), "step" (int32 scalar, the update's step) and
      "teacher" (D(y [B, ...], σ [B]) of training.teacher's EMA network, or
      None). The training apply_fn also takes labels= to override the
      batch's labels for one call.
    repa: REPA (`ddx.repa`, training.repa) is defined for it: the "aux" of
      its `loss` comes from the network call with gradient on x_t [B, ...], a
      noisy version of each clean batch image in batch order (the primal call
      where a JVP is taken), so that call's hidden tokens can be aligned with
      the encoder's features of the clean images.
  """
  name: str = ""
  fields: tuple[Field, ...] = ()
  predictions: tuple[str, ...] = ()
  default_prediction: str | None = None
  samplers: tuple[str, ...] = ()
  default_sampler: str = ""
  spaced_samplers: tuple[str, ...] = ()
  spacings: tuple[str, ...] = ()
  bpd_estimators: tuple[str, ...] = ("ode",)
  implementation: Any = ""
  second_time: bool = False
  logvar: bool = False
  loss_inputs: tuple[str, ...] = ()
  repa: bool = False
  # model.time_embedding / model.time_scale "auto": the embedding of the network's
  # time input, and the factor on that input per embedding (an embedding missing
  # here has no automatic scale). How fast each moves with the noise level:
  # tests/test_time_embedding.py; their sample quality: benchmarks/noise_conditioning.py.
  time_embedding: str = "positional"
  time_scales: Mapping[str, float] = {"positional": 1.0}

  def check(self, f: Mapping[str, Any]) -> None:
    """Range-checks this process's own keys in `f` (config.diffusion or a dict).

    Raises:
      ValueError: one line naming the key, the value and the valid range.
    """

  def check_run(self, config) -> None:
    """Checks that involve other config groups (e.g. model.num_classes), for
    the process that runs; ValueError (one line) like `check`."""

  def check_sampler(self, sampler: Any, *, spacing: Any = None, churn: bool = False,
                    group: str = "") -> str:
    """The sampler that `sampler` names on this process (None or "auto": its
    default), checked with the options that depend on it: `spacing` (None or
    "auto" = the sampler's own grid) only for spaced_samplers and one of
    `spacings`; a nonzero churn (`churn` True) only for "stochastic".
    `ddx.config` (group "sampling" or "eval") and `ddx.sample` both ask here.

    Raises:
      ValueError: one line naming `{group}.<key>` and what to use instead.
    """
    p = f"{group}." if group else ""
    name = self.default_sampler if sampler in (None, AUTO) else sampler
    if name not in self.samplers:
      raise ValueError(f"{p}sampler={sampler!r} is not a sampler of diffusion.process="
                       f"{self.name}; use one of {self.samplers}, or auto "
                       f"({self.default_sampler})")
    spaced = name in self.spaced_samplers
    if spacing not in (None, AUTO) and spaced and spacing not in self.spacings:
      raise ValueError(f"{p}spacing={spacing!r} is unknown; use auto or one of "
                       f"{self.spacings}")
    if spacing not in (None, AUTO) and not spaced:
      raise ValueError(f"{p}spacing={spacing} applies to the samplers "
                       f"{self.spaced_samplers} of diffusion.process={self.name} only; "
                       f"{name} uses its own grid: set it to auto")
    if churn and name != "stochastic":
      raise ValueError(f"{p}churn applies to the stochastic sampler only; set "
                       f"{p}sampler=stochastic or {p}churn=0")
    return name

  def check_sampling(self, g: Mapping[str, Any], group: str) -> None:
    """Checks the sampling options only this process's samplers read, in the
    sampling.* (or eval.*) group `g`; ValueError (one line naming
    `{group}.<key>`) like `check`. By default there are none."""
    del g, group

  def max_steps(self, f: Mapping[str, Any], sampler: str) -> int:
    """The most sampler steps `sampler` can take on this process."""
    del f, sampler
    return 100_000

  def check_steps(self, f: Mapping[str, Any], sampler: str, steps: Any,
                  name: str = "steps") -> None:
    """Raises ValueError (one line naming `name`) if `sampler` cannot take
    `steps` steps on this process beyond 1 ≤ steps ≤ max_steps (which
    `ddx.config` checks itself); by default every such count works."""
    del f, sampler, steps, name

  def defaults(self) -> dict[str, Any]:
    return {x.key: x.default for x in self.fields}


def is_finite(v: Any) -> bool:
  """Whether v is a finite real number (not a bool)."""
  return not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v)


def finite(f: Mapping[str, Any], *keys: str) -> None:
  """Raises ValueError unless every diffusion.<key> is a finite real number."""
  for k in keys:
    v = f[k]
    if not is_finite(v):
      raise ValueError(f"diffusion.{k}={v!r} must be a finite number")


def one_of(f: Mapping[str, Any], key: str, valid: tuple[str, ...]) -> None:
  """Raises ValueError unless diffusion.<key> is one of `valid`."""
  if f[key] not in valid:
    raise ValueError(f"diffusion.{key}={f[key]!r} is unknown; use one of {valid}")
