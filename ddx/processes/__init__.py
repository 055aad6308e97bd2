"""Diffusion processes behind one interface, picked by name (config.diffusion.process).

A process is one folder, `ddx/processes/<name>/`, and one line in `REGISTRY`
below:

  spec.py      a `Spec` (ddx.processes.base), plain Python: the diffusion.*
               keys it owns with their defaults and range checks, its
               predictions and samplers and their defaults. `ddx.config`
               validates through it, so checking a config never imports JAX
               (the folder's __init__.py is a docstring for the same reason).
  core.py      its math: the losses, targets and time draws, and the
               samplers only it uses (DDPM's are in sampling.py).
  process.py   the JAX class implementing `Process` (below), named by
               Spec.implementation.

What several processes share is below them: `ddx.processes.common` (the
static field, broadcasting, the loss metrics, and `sample`, which runs any
process's sampler) and `ddx.sampling` (the σ-grid and t-grid samplers and
their steps), which imports no process. Nothing outside the folders branches
on the process: the trainer calls `process.loss`, `ddx.model` wraps the
network with `process.denoiser`, `ddx.sample` runs `process.sample`,
`ddx.bpd` integrates `process.ode`. A process registered at run time
(`register`, or a test's `monkeypatch.setitem(REGISTRY, ...)`) goes through
the same paths.

"auto" values: diffusion.prediction, sampling.sampler and eval.sampler
default to "auto", which `resolve_defaults` turns into the process's
`default_prediction` / `default_sampler` before a run's config is saved, so
config.json holds what ran. sampling.spacing / eval.spacing "auto" stays:
it means the chosen sampler's own default grid (`ddx.sampling`).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

from ddx import registry
from ddx.processes.base import AUTO, Field, Spec
from ddx.processes.consistency import spec as consistency_spec
from ddx.processes.ddpm import spec as ddpm_spec
from ddx.processes.edm import spec as edm_spec
from ddx.processes.flow import spec as flow_spec
from ddx.processes.meanflow import spec as meanflow_spec
from ddx.processes.shortcut import spec as shortcut_spec

DEFAULT = "ddpm"   # diffusion.process of a config (or an older run's) that names none

# diffusion.process -> its Spec. A new process: its folder, and one entry here.
REGISTRY: dict[str, Spec] = {
    "ddpm": ddpm_spec.SPEC,
    "edm": edm_spec.SPEC,
    "flow": flow_spec.SPEC,
    "shortcut": shortcut_spec.SPEC,
    "consistency": consistency_spec.SPEC,
    "meanflow": meanflow_spec.SPEC,
}

__all__ = ["AUTO", "DEFAULT", "Field", "Spec", "Process", "REGISTRY", "register", "names", "spec",
           "implementation", "from_config", "as_process", "fields", "resolve_defaults"]


class Process(Protocol):
  """The JAX half of a process: one object holding its (static) settings.

  `ddx.Model.process` and `ddx.processes.from.spec` return one. Times:
  each process has its own (DDPM: int32 index i in [0, T); EDM: σ; flow:
  t in [0, 1]; consistency: TrigFlow t in [0, π/2]; meanflow and shortcut:
  [B, 2], (t, r) and (t, d)); `denoise_fn(x, time)` below is the process-native denoiser
  that `sample` and `ode` take, what `denoiser(net_fn)` makes of a network.
  """
  spec: Spec   # class attribute: the process's config half

  @classmethod
  def from_config(cls, f) -> "Process":
    """The process for config.diffusion `f` (diffusion.prediction resolved)."""

  @classmethod
  def coerce(cls, obj, prediction: Optional[str]) -> Optional["Process"]:
    """obj as this process (e.g. a bare ddx.edm.EDM), or None if it is not one."""

  def check(self) -> "Process":
    """Raises ValueError (one line naming the diffusion.* key) for a bad value."""

  def loss(self, apply_fn: Callable, params: Any, x0, rng, has_aux: bool = False):
    """The training loss. apply_fn(params, x_in [B, ...], time [B]) -> out (and
    aux when has_aux). Returns (loss scalar float32, metrics dict with "loss",
    "mse_by_quartile" [4] and "aux" when has_aux)."""

  def denoiser(self, net_fn: Callable) -> Callable:
    """The raw network net_fn(x, network time [B]) as the process-native
    denoise_fn(x, time [B]): the time the network sees, the preconditioning."""

  def noise_level(self, time):
    """The noise level σ (noise-to-signal ratio) at the process's own time
    [B] -> float32 [B] (the guidance interval reads it)."""

  def grid(self, sampler: str, steps: int, spacing: Optional[str] = None,
           sigma_index: str = "nearest"):
    """The host-side (NumPy) times `sampler` visits in `steps` steps."""

  def sample(self, denoise_fn: Callable, rng, shape, sampler: str, steps: int, *,
             x_T=None, clip_x0: bool = False, return_trajectory: bool = False,
             **options):
    """Runs `sampler` (checked by ddx.sample) as one lax.scan; options are
    eta, ddpm_variance, spacing, churn, s_tmin, s_tmax, s_noise, sigma_index;
    a process reads the ones its samplers take."""

  def ode(self, denoise_fn: Callable, steps: int):
    """The likelihood ODE: (drift(x, s), grid [steps + 1] NumPy, prior_logp(x),
    scale), integrated from grid[0] (data side, at scale·x) to grid[-1]."""

  def sigma_denoiser(self, denoise_fn: Callable) -> Callable:
    """The model as EDM's denoiser D(y [B, ...], σ [B]) -> x̂_0 of y = x_0 + σ·n,
    σ > 0 continuous: how a distilling process (training.teacher) reads a
    teacher of any process."""

  # Optional, where a mapping exists: to_sigma(denoise_fn, steps, sigma_index)
  # -> (σ grid [steps + 1], D(x; σ)), the process in EDM's σ form x = y + σn
  # (DDPM: the VP mapping; EDM: itself), which the σ-grid samplers and the
  # σ-form ODE (`ddx.likelihood.sigma_ode`) run on.


_REGISTRY = registry.Registry(REGISTRY, "diffusion.process", "process")
register, names, spec = _REGISTRY.register, _REGISTRY.names, _REGISTRY.spec
implementation = _REGISTRY.implementation


def from_config(f) -> Process:
  """The process that config.diffusion `f` names, e.g. `Model.process`."""
  return implementation(f.get("process", DEFAULT)).from_config(f)


def as_process(obj, prediction: Optional[str] = None) -> Process:
  """A `Process` for what `ddx.sample` and `ddx.bpd.ode_logp` are given.

  Args:
    obj: a Process, or a bare `ddx.schedules.Schedule` (ddpm), `ddx.edm.EDM`
      or `ddx.flow.Flow`.
    prediction: ddpm: what the denoiser returns (eps | x0 | v); None or
      "auto" keeps the process's own (a bare Schedule: eps).
  """
  for name in REGISTRY:
    p = implementation(name).coerce(obj, None if prediction == AUTO else prediction)
    if p is not None:
      return p
  raise ValueError(f"process of type {type(obj).__name__} is not a ddx process; pass "
                   "a Schedule (ddpm), ddx.edm.EDM, ddx.flow.Flow or a Process of "
                   f"one of {names()}")


fields = _REGISTRY.fields   # every registered process's diffusion.* keys


def resolve_defaults(config) -> None:
  """Replaces "auto" by the process's default, in place: diffusion.prediction
  (left "auto" for a process that does not use it), sampling.sampler and
  eval.sampler. An unknown process is left for validation to report."""
  f = config.diffusion
  s = REGISTRY.get(f.get("process", DEFAULT))
  if s is None:
    return
  if f.get("prediction", AUTO) == AUTO and s.default_prediction is not None:
    f.prediction = s.default_prediction
  for group in ("sampling", "eval"):
    g = config.get(group)
    if g is not None and g.get("sampler", AUTO) == AUTO:
      g.sampler = s.default_sampler
