"""The shortcut-model process (Frans et al. 2024) behind the `ddx.processes.Process` protocol.

The math is `ddx.shortcut` (the self-consistency target, the step-size grid,
the sampler) on flow matching's path (`ddx.flow`): x_t = (1 − t)·x_0 + t·ε.

Time: the process-native time is float32 [B, 2], column 0 the flow time t
in [0, 1] and column 1 the step size d the output will be used with;
`denoise_fn(x, time)` returns the step direction s(x_t, t, d), and one step
is x_{t−d} = x_t − d·s. Classifier-free guidance (`ddx.model.denoiser`)
doubles the batch along axis 0, which holds for [B, 2] as for [B];
`noise_level` reads column 0.

The network (built with a second time input, Spec.second_time) sees
1000·t and 1000·d_net, flow's units for both: a step size at or below 1/M
(M = diffusion.shortcut_max_steps) is given to it as d_net = 0, the flow
velocity. That is the paper's base case: the smallest step trains by flow
matching, and the self-consistency targets of 2/M come from two flow steps.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp

from ddx.processes import common
from ddx.processes.common import static_field
from ddx.processes.flow import core as flow
from ddx.processes.flow.process import FlowProcess
from ddx.processes.shortcut import core as shortcut
from ddx.processes.shortcut import spec as shortcut_config
from ddx.sampling import flow as flow_sampling
from ddx.sampling.steps import initial_noise

_DEFAULTS = shortcut_config.SPEC.defaults()


_static = static_field


def _pair(t, d) -> jnp.ndarray:
  """The process-native time [B, 2] of times t [B] and step sizes d [B]."""
  return jnp.stack([jnp.asarray(t, jnp.float32), jnp.asarray(d, jnp.float32)], axis=-1)


@flax.struct.dataclass
class ShortcutProcess:
  """Shortcut-model hyper-parameters (static; named as their diffusion.* keys)."""
  t_sampling: str = _static(_DEFAULTS["t_sampling"])
  logit_mean: float = _static(_DEFAULTS["logit_mean"])
  logit_std: float = _static(_DEFAULTS["logit_std"])
  shortcut_max_steps: int = _static(_DEFAULTS["shortcut_max_steps"])
  shortcut_consistency_fraction: float = _static(_DEFAULTS["shortcut_consistency_fraction"])
  spec: ClassVar = shortcut_config.SPEC

  @classmethod
  def from_config(cls, f) -> "ShortcutProcess":
    return cls(**{k: f[k] for k in cls.spec.defaults()})

  @classmethod
  def coerce(cls, obj, prediction=None):
    del prediction   # the network predicts the step direction; no choice
    return obj if isinstance(obj, cls) else None

  def check(self) -> "ShortcutProcess":
    """Raises ValueError (one line naming the diffusion.* key) for a bad value."""
    self.spec.check(dataclasses.asdict(self))
    return self

  @property
  def flow(self) -> flow.Flow:
    """Flow matching as the d = 0 part of the batch trains it (velocity, no shift)."""
    return flow.Flow(t_sampling=self.t_sampling, logit_mean=self.logit_mean,
                     logit_std=self.logit_std, prediction="v")

  def network_time(self, time: jnp.ndarray) -> jnp.ndarray:
    """What the network is given for time [B, 2] = (t, d): float32 [B, 2]
    (1000·t, 1000·d_net), d_net = 0 for d ≤ 1/M (the flow: module docstring)."""
    time = jnp.asarray(time, jnp.float32)
    d = time[:, 1]
    d = jnp.where(d <= 1.0 / self.shortcut_max_steps, 0.0, d)
    return flow.time_input(_pair(time[:, 0], d))

  def consistency_count(self, batch: int) -> int:
    """How many of a batch's examples train self-consistency (the first ones)."""
    return int(round(batch * self.shortcut_consistency_fraction))

  def training_batch(self, apply_fn, params, x0, rng, has_aux: bool = False,
                     labels=None):
    """The regression problem of one training step: inputs, times and targets.

    The first `consistency_count(B)` examples train self-consistency: (t, d)
    on the power-of-two grid (`ddx.processes.shortcut.core.sample_consistency_times`), the
    network asked for the step 2d, its target the mean direction of two
    d-steps of the same network with the current params
    (`ddx.processes.shortcut.core.consistency_target`, under stop_gradient). The rest train
    flow matching at d = 0: flow's training times (diffusion.t_sampling,
    logit_mean, logit_std) and velocity target ε − x_0.

    Args:
      apply_fn, params, x0, has_aux, labels: as `loss`.
      rng: PRNG key.
    Returns:
      x_t [B, ...] float32, time [B, 2] (t, step size: 2d or 0), target
      [B, ...] float32 (no gradient flows into it).
    """
    b = x0.shape[0]
    n = self.consistency_count(b)
    t_rng, c_rng, n_rng = jax.random.split(rng, 3)
    noise = jax.random.normal(n_rng, x0.shape, x0.dtype)
    t_flow = flow.sample_t(self.flow, t_rng, b - n)
    t_c, d_c = (shortcut.sample_consistency_times(c_rng, n, self.shortcut_max_steps)
                if n else (jnp.zeros((0,), jnp.float32),) * 2)
    t = jnp.concatenate([t_c, t_flow])
    x_t = flow.interpolate(x0, noise, t)

    def s_fn(x, tt, dd):   # the network on the consistency examples
      kw = {} if labels is None else {"labels": labels[:n]}
      out = apply_fn(params, x, self.network_time(_pair(tt, dd)), **kw)
      return (out[0] if has_aux else out).astype(jnp.float32)

    target = flow.velocity_target(x0[n:], noise[n:]).astype(jnp.float32)
    if n:   # a batch too small for one consistency example trains flow alone
      target = jnp.concatenate([shortcut.consistency_target(s_fn, x_t[:n], t_c, d_c),
                                target])
    d = jnp.concatenate([2.0 * d_c, jnp.zeros((b - n,), jnp.float32)])
    return x_t, _pair(t, d), target

  def loss(self, apply_fn, params, x0, rng, has_aux: bool = False, labels=None, **_):
    """The mean squared error of the network on `training_batch`'s targets:
    self-consistency on the first quarter (diffusion.shortcut_consistency_fraction)
    of the batch, flow matching at d = 0 on the rest, one mean over all.

    Args:
      apply_fn: apply_fn(params, x [n, ...], time float32 [n, 2], labels=...)
        -> output [n, ...] (with aux when has_aux), the raw network given
        `network_time`; `labels=` overrides the batch's labels (the targets
        run on the first examples only).
      params: whatever apply_fn takes.
      x0: [B, H, W, C] float32 clean data.
      rng: PRNG key.
      has_aux: apply_fn returns (output, aux); aux of the full-batch call is
        returned in metrics.
      labels: int32 [B] the batch's labels after label dropout, or None
        (unconditional).
    Returns:
      (loss scalar float32, metrics with "loss", "mse_by_quartile" [4] by t,
      and "aux" when has_aux).
    """
    self.check()
    x_t, time, target = self.training_batch(apply_fn, params, x0, rng, has_aux, labels)
    out = apply_fn(params, x_t, self.network_time(time))
    out, aux = out if has_aux else (out, None)
    err = out.astype(jnp.float32) - target
    per_ex = jnp.mean(jnp.square(err), axis=tuple(range(1, x0.ndim)))
    loss = jnp.mean(per_ex)
    q = jnp.clip(jnp.floor(time[:, 0] * 4).astype(jnp.int32), 0, 3)
    return loss, common.loss_metrics(loss, per_ex, q, aux if has_aux else None)

  def denoiser(self, net_fn):
    """The step direction s(x, time [B, 2]) float32: the network at
    `network_time(time)`."""
    return lambda x, time: net_fn(x, self.network_time(time)).astype(jnp.float32)

  def noise_level(self, time):
    """Flow's σ = t/(1 − t) of column 0 (t) of time [B, 2] -> float32 [B]."""
    return FlowProcess().noise_level(jnp.asarray(time, jnp.float32)[:, 0])

  def sigma_denoiser(self, denoise_fn):
    """D(y; σ) of the d = 0 flow (flow's mapping, `FlowProcess.sigma_denoiser`)."""
    return FlowProcess().sigma_denoiser(
        lambda x, t: denoise_fn(x, _pair(t, jnp.zeros_like(t))))

  def grid(self, sampler: str, steps: int, spacing=None, sigma_index: str = "nearest"):
    """The times visited: "shortcut" N + 1 evenly from 1 to 0 (steps of
    size 1/N); "euler" flow's grid (`ddx.flow.time_grid`)."""
    del spacing, sigma_index
    self.check_steps(sampler, steps)
    return flow.time_grid(steps)

  def check_steps(self, sampler: str, steps: int) -> None:
    """ValueError (one line) unless `sampler` takes `steps` on this model."""
    self.spec.check_steps(dataclasses.asdict(self), sampler, steps)

  def sample(self, denoise_fn, rng, shape, sampler: str, steps: int, *, x_T=None,
             clip_x0: bool = False, return_trajectory: bool = False, **_):
    """"shortcut": `steps` (a power of two ≤ M) equal steps of size d = 1/steps
    along s(x, t, d), one lax.scan (`ddx.processes.shortcut.core.sample`); "euler": flow's
    Euler ODE sampler on s(x, t, 0). clip_x0 clips x̂_0 = x_t − t·s to
    [-1, 1] at every evaluation and steps towards it, as flow's samplers do."""
    self.check_steps(sampler, steps)
    if sampler == "euler":
      velocity = lambda x, t: denoise_fn(x, _pair(t, jnp.zeros_like(t)))
      return flow_sampling.sample(velocity, self.grid(sampler, steps), rng, shape,
                                  "euler", x_T=x_T, clip_x0=clip_x0,
                                  return_trajectory=return_trajectory)
    shape = tuple(shape)
    x = (initial_noise(rng, shape) if x_T is None
         else jnp.asarray(x_T, jnp.float32).reshape(shape))

    def s_fn(x, t, d):
      s = denoise_fn(x, _pair(t, d)).astype(jnp.float32)
      # t ≥ d > 0 at every evaluation
      return flow_sampling.clipped_velocity(x, s, common.bcast(t, x)) if clip_x0 else s
    return shortcut.sample(s_fn, x, steps, return_trajectory=return_trajectory)

  def ode(self, denoise_fn, steps: int):
    """No likelihood: a few-step map has no probability-flow ODE here
    (Spec.bpd_estimators is empty, so ddx.config refuses bpd first)."""
    del denoise_fn, steps
    raise ValueError("diffusion.process=shortcut has no likelihood (bits/dim); drop bpd "
                     "from eval.metrics")
