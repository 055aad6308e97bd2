"""`SampleOptions`: every option that changes samples, resolved once, with one precedence.

An option can come from three places; the first that gives it wins:
  1. a keyword argument (`ddx.sample_fn(model, rng, churn=40)`),
  2. the command-line config (`--config FILE --config.sampling.churn=40`),
  3. the run's saved config (`model.config`, config.json of the workdir),
and the defaults of `ddx.config.base_config()` below those. `resolve` is the
one function that applies this rule; `ddx.sample_fn`, `--mode sample`,
`--mode eval`, in-loop evaluation and training's sample grids all go through
it, and an evaluation's sample chunks are keyed by every field, so a changed
option never reuses a chunk.

Groups: grids and `--mode sample` read `sampling.*`. Evaluation reads the
`eval.*` group for the keys it has (EVAL_KEYS: sampler, steps, eta, spacing,
and eval.batch_size as the samples per call) and `sampling.*` for the rest
(clip_x0, guidance_scale, guidance_interval, ddpm_variance, churn, s_tmin,
s_tmax, s_noise, sigma_index), so evaluation can use a faster sampler than the
grids.

The autoguidance guide (`sampling.guide_workdir`) is not an option here: it is
a second model, given to `sample_fn` as `guide_model=` and loaded by the
command line (`ddx.eval_run.load_guide`); an evaluation's chunk key holds its
workdir and weights' fingerprint besides these options.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import flax.struct
import numpy as np

from ddx import config as config_lib

GROUPS = ("sampling", "eval")
# The eval group's own key for an option (every other option of an evaluation
# comes from the sampling group); eval.num_samples is the total, not per call.
EVAL_KEYS = {"sampler": "sampler", "steps": "steps", "eta": "eta", "spacing": "spacing",
             "num_samples": "batch_size"}


@flax.struct.dataclass
class SampleOptions:
  """Every option that changes what `ddx.sample_fn` draws (besides the rng,
  labels and x_T), as one frozen, hashable value.

  A pytree: the float knobs (eta, guidance_scale, churn, s_tmin, s_tmax,
  s_noise, and the two ends of guidance_interval) are its leaves, so a jitted
  sampler takes them as traced arguments and changing them does not
  recompile; every other field is static (part of the tree structure, so a
  new value compiles a new program). guidance_interval is a tuple node: off
  (()) and on ((lo, hi)) are two programs, and moving the ends is not a
  recompile (the interval is swept when tuning it). Build one with
  `resolve`; change one with `.replace(field=value)`.

  Fields (config.sampling has the same keys):
    sampler: the sampler name (one of ddx.processes.spec(name).samplers).
    steps: sampler steps N.
    eta: DDIM η.
    clip_x0: clip x̂_0 to [-1, 1] at every step.
    guidance_scale: the guidance weight w: classifier-free guidance
      u + w·(c - u) (1 = plain conditional), or with a guide model
      (autoguidance) D_guide + w·(D - D_guide).
    guidance_interval: () = guide at every step, or (lo, hi): guide only
      where the process's noise level σ is in (lo, hi], elsewhere the plain
      conditional model (Kynkäänniemi et al. 2024); σ as
      `process.noise_level(t)`, `ddx.processes.Process`.
    ddpm_variance: posterior | beta, for the ddpm sampler.
    spacing: auto | uniform | trailing | quadratic | logsnr (discrete samplers).
    churn, s_tmin, s_tmax, s_noise: EDM Alg. 2's S_churn, S_tmin, S_tmax,
      S_noise (the stochastic sampler).
    sigma_index: nearest | interp, a DDPM model on a σ-grid sampler.
    num_samples: images per call.
  """
  sampler: str = flax.struct.field(pytree_node=False)
  steps: int = flax.struct.field(pytree_node=False)
  clip_x0: bool = flax.struct.field(pytree_node=False)
  ddpm_variance: str = flax.struct.field(pytree_node=False)
  spacing: str = flax.struct.field(pytree_node=False)
  sigma_index: str = flax.struct.field(pytree_node=False)
  num_samples: int = flax.struct.field(pytree_node=False)
  eta: Any = 0.0
  guidance_scale: Any = 1.0
  guidance_interval: Any = ()
  churn: Any = 0.0
  s_tmin: Any = 0.0
  s_tmax: Any = float("inf")
  s_noise: Any = 1.0

  def override(self, **kwargs) -> "SampleOptions":
    """A copy with the keyword values that are given (not None) in place.

    Raises:
      TypeError: a keyword that is not a field.
    """
    unknown = sorted(set(kwargs) - set(FIELDS))
    if unknown:
      raise TypeError(f"{unknown[0]!r} is not a sampling option; the options are {FIELDS}")
    return self.replace(**{k: coerce(k, v) for k, v in kwargs.items() if v is not None})

  def to_json(self) -> str:
    """Every field as sorted JSON (the eval chunk key); floats as Python floats."""
    return json.dumps({k: _plain(v) for k, v in dataclasses.asdict(self).items()},
                      sort_keys=True)


FIELDS = tuple(f.name for f in dataclasses.fields(SampleOptions))
FLOAT_FIELDS = ("eta", "guidance_scale", "churn", "s_tmin", "s_tmax", "s_noise")
_INT_FIELDS = ("steps", "num_samples")


def _plain(v):
  """A Python scalar (a list for guidance_interval) of a config value or a concrete array."""
  if isinstance(v, (tuple, list)):
    return [_plain(x) for x in v]
  if hasattr(v, "__array__"):   # NumPy or (concrete) JAX scalars
    v = np.asarray(v).item()
  return v


def coerce(name: str, v):
  """Python int/bool/float for config values; arrays (even traced) pass as they are.

  Raises:
    ValueError (ConfigError): a guidance_interval that is not () or (lo, hi)
      with 0 <= lo < hi (one line).
  """
  if name in _INT_FIELDS:
    return int(v)
  if name == "clip_x0":
    return bool(v)
  if name in FLOAT_FIELDS and isinstance(v, (int, float, np.number)):
    return float(v)
  if name == "guidance_interval":
    config_lib.check_guidance_interval(v, "guidance_interval")
    return tuple(float(x) if isinstance(x, (int, float, np.number)) else x
                 for x in config_lib.guidance_interval_ends(v))
  return v


def _layer(config, group: str) -> dict:
  """The options a config gives (its keys that exist), read for `group`."""
  if config is None:
    return {}
  out = {}
  sampling = config.get("sampling")
  evaluation = config.get("eval")
  for name in FIELDS:
    g, key = sampling, name
    if group == "eval" and name in EVAL_KEYS:
      g, key = evaluation, EVAL_KEYS[name]
    if g is not None and key in g:
      out[name] = g[key]
  return out


@functools.lru_cache(maxsize=None)
def _defaults(group: str) -> dict:
  return _layer(config_lib.base_config(), group)


def resolve(saved=None, cli=None, *, group: str = "sampling", **kwargs) -> SampleOptions:
  """The options to sample with: keyword argument > cli config > saved config > default.

  Args:
    saved: the run's saved config (`model.config`), or None.
    cli: the command-line config (the --config file with its --config.*
      overrides), or None (the Python API, in-loop evaluation).
    group: "sampling" (grids, --mode sample, sample_fn) or "eval"
      (evaluation: EVAL_KEYS come from eval.*, the rest from sampling.*).
    **kwargs: option values by field name; None means "not given".
  Returns:
    SampleOptions with Python values (floats as given when arrays).
  Raises:
    TypeError: a keyword that is not a SampleOptions field.
    ValueError: an unknown group.
  """
  if group not in GROUPS:
    raise ValueError(f"group={group!r} is unknown; use one of {GROUPS}")
  values = dict(_defaults(group))
  values.update(_layer(saved, group))
  values.update(_layer(cli, group))
  return SampleOptions(**{k: coerce(k, values[k]) for k in FIELDS}).override(**kwargs)
