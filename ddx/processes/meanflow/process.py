"""The MeanFlow process behind the `ddx.processes.Process` protocol.

The math is `ddx.meanflow` (the target from one jvp, the adaptive loss, the
(r, t) draws, the guided velocity, the n-step sampler). Its time is a pair:
the process-native `denoise_fn(x, time)` takes time float32 [B, 2], column 0
the current time t and column 1 the time r the step lands on (r ≤ t, both in
[0, 1], t = 1 noise), and returns the average velocity u(x, r, t). The
network, built with a second time input (Spec.second_time), sees
(1000·t, 1000·(t − r)): flow's time scale for t, and the interval length as
the paper conditions on (t, t − r), so at r = t it is flow's network with a
zero second time.
"""
from __future__ import annotations

from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ddx.processes import common

from ddx.processes.common import static_field
from ddx.processes.flow import core as flow
from ddx.processes.meanflow import core as meanflow
from ddx.processes.meanflow import spec as meanflow_config
from ddx.sampling.steps import initial_noise

# The process's attributes are its Spec's keys without the "mf_" prefix.
_KEYS = {k: k[len("mf_"):] for k in meanflow_config.SPEC.defaults()}
_DEFAULTS = {a: meanflow_config.SPEC.defaults()[k] for k, a in _KEYS.items()}


def _static(name):
  return static_field(_DEFAULTS[name])


def network_time(t: jnp.ndarray, r: jnp.ndarray) -> jnp.ndarray:
  """The network's two time inputs for the interval [r, t]: (1000·t, 1000·(t − r)).

  Args:
    t, r: float32 [B] in [0, 1], r ≤ t.
  Returns:
    float32 [B, 2].
  """
  return jnp.stack([flow.time_input(t), flow.time_input(t - r)], axis=-1)


def pair(t: jnp.ndarray, r: jnp.ndarray) -> jnp.ndarray:
  """The process time (t, r) as denoise_fn takes it: float32 [B, 2]."""
  return jnp.stack([jnp.asarray(t, jnp.float32), jnp.asarray(r, jnp.float32)], axis=-1)


@flax.struct.dataclass
class MeanFlowProcess:
  """MeanFlow's hyper-parameters (static: a pytree with no leaves) and the
  protocol's methods. Field x is the config key diffusion.mf_x."""
  logit_mean: float = _static("logit_mean")
  logit_std: float = _static("logit_std")
  ratio: float = _static("ratio")
  power: float = _static("power")
  omega: float = _static("omega")
  kappa: float = _static("kappa")
  guidance_tmin: float = _static("guidance_tmin")
  guidance_tmax: float = _static("guidance_tmax")
  spec: ClassVar = meanflow_config.SPEC

  @classmethod
  def from_config(cls, f) -> "MeanFlowProcess":
    return cls(**{a: f[k] for k, a in _KEYS.items()})

  @classmethod
  def coerce(cls, obj, prediction=None):
    del prediction   # the network's output is u: no prediction choice
    return obj if isinstance(obj, cls) else None

  def check(self) -> "MeanFlowProcess":
    self.spec.check({k: getattr(self, a) for k, a in _KEYS.items()})
    return self

  @property
  def guided(self) -> bool:
    """Whether training folds guidance into the target (ω ≠ 1 or κ ≠ 0)."""
    return self.omega != 1.0 or self.kappa != 0.0

  def loss(self, apply_fn, params, x0, rng, has_aux: bool = False, labels=None,
           null_label: int = 0, **_):
    """MeanFlow's adaptively weighted loss ‖u − sg(target)‖² (`ddx.meanflow`).

    (r, t) from `ddx.processes.meanflow.core.sample_times`; z_t = (1 − t)·x_0 + t·ε; the
    target v − (t − r)·du/dt from one jvp of the network through its time
    mapping (`network_time`), with v = ε − x_0, or with training guidance the
    mix ω·v + κ·u(z, t, t | c) + (1 − ω − κ)·u(z, t, t | ∅) for examples whose
    label is not the null one and whose t is in [guidance_tmin, guidance_tmax]
    (the others keep v: the unconditional velocity's own target).

    Args:
      apply_fn: apply_fn(params, z [B, ...], time float32 [B, 2], labels=...)
        -> out (and aux when has_aux); `labels=` overrides the batch's labels
        (the trainer's; only used with training guidance).
      params: what apply_fn takes.
      x0: [B, H, W, C] float32 data.
      rng: PRNG key, split as (times, noise).
      has_aux: apply_fn returns (out, aux); aux is returned in metrics.
      labels: int32 [B] after label dropout, or None (unconditional).
      null_label: the null class index.
    Returns:
      (loss scalar float32, metrics: "loss", "mse_by_quartile" [4] (the mean
      squared error ‖u − target‖²/D by quarter of t), "aux" when has_aux).
    """
    reg = self.regression(apply_fn, params, x0, rng, has_aux, labels, null_label)
    value, d2 = meanflow.loss(reg["u"], reg["target"], power=self.power)
    per_ex = d2 / np.prod(x0.shape[1:])
    q = jnp.clip(jnp.floor(reg["t"] * 4).astype(jnp.int32), 0, 3)
    return value, common.loss_metrics(value, per_ex, q, reg["aux"] if has_aux else None)

  def regression(self, apply_fn, params, x0, rng, has_aux: bool = False, labels=None,
                 null_label: int = 0) -> dict:
    """What `loss` regresses: the draws, the network's u and its target.

    Args: as `loss`.
    Returns:
      {"r", "t": [B]; "z", "eps", "v" (the velocity the target uses: ε − x_0 or
      the guided mix), "u", "target": [B, ...] float32; "aux"}.
    """
    self.check()
    b = x0.shape[0]
    t_rng, n_rng = jax.random.split(rng)
    r, t = meanflow.sample_times(t_rng, b, logit_mean=self.logit_mean,
                                 logit_std=self.logit_std, ratio=self.ratio)
    x0 = x0.astype(jnp.float32)
    eps = jax.random.normal(n_rng, x0.shape, jnp.float32)
    z = flow.interpolate(x0, eps, t)
    v = flow.velocity_target(x0, eps)
    if self.guided:
      v = self._guided_velocity(apply_fn, params, z, t, v, labels, null_label, has_aux)

    def u_fn(z, r, t):
      # The jvp's tangent (v, 0, 1) goes through network_time: 1000·t and
      # 1000·(t − r) both move at 1000 per unit of t.
      out = apply_fn(params, z, network_time(t, r))
      out, aux = out if has_aux else (out, None)
      return out.astype(jnp.float32), aux

    u, tgt, aux = meanflow.target(u_fn, z, r, t, v, has_aux=True)
    return {"r": r, "t": t, "z": z, "eps": eps, "v": v, "u": u, "target": tgt, "aux": aux}

  def _guided_velocity(self, apply_fn, params, z, t, v, labels, null_label, has_aux):
    """ṽ (`ddx.processes.meanflow.core.guided_velocity`) from the network's instantaneous
    velocities u(z, t, t | c) and u(z, t, t | ∅), one call on the doubled batch
    (only the null half when κ = 0); v where it does not apply."""
    if labels is None:
      meanflow_config.check_guidance({"mf_omega": self.omega, "mf_kappa": self.kappa},
                                     0, 0.0)
    null = jnp.full_like(labels, null_label)
    tt = network_time(t, t)
    if self.kappa != 0.0:
      out = apply_fn(params, jnp.concatenate([z, z]), jnp.concatenate([tt, tt]),
                     labels=jnp.concatenate([labels, null]))
      out = out[0] if has_aux else out
      u_c, u_u = jnp.split(out.astype(jnp.float32), 2)
    else:
      out = apply_fn(params, z, tt, labels=null)
      u_u = (out[0] if has_aux else out).astype(jnp.float32)
      u_c = u_u   # weighted by κ = 0
    g = meanflow.guided_velocity(v, u_c, u_u, self.omega, self.kappa)
    on = (labels != null_label) & (t >= self.guidance_tmin) & (t <= self.guidance_tmax)
    return jnp.where(common.bcast(on, v) > 0, g, v)

  def denoiser(self, net_fn):
    """The average velocity u(x, r, t): denoise_fn(x, time [B, 2] = (t, r)) runs
    the network at `network_time(t, r)`."""
    def u(x, time):
      time = jnp.asarray(time, jnp.float32)
      return net_fn(x, network_time(time[:, 0], time[:, 1])).astype(jnp.float32)
    return u

  def noise_level(self, time):
    """σ = t/(1 − t) at the current time t (column 0 of time [B, 2], or time [B]),
    as flow's: the guidance interval reads it."""
    t = jnp.asarray(time, jnp.float32)
    t = t[..., 0] if t.ndim == 2 else t
    return t / (1.0 - t)

  def grid(self, sampler: str, steps: int, spacing=None, sigma_index: str = "nearest"):
    """The N + 1 uniform times from 1 to 0 the sampler steps between."""
    del sampler, spacing, sigma_index
    return flow.time_grid(steps)

  def sample(self, denoise_fn, rng, shape, sampler: str, steps: int, *, x_T=None,
             clip_x0: bool = False, return_trajectory: bool = False, **_):
    """`steps` MeanFlow steps (= network evaluations) from t = 1 to 0 on the
    uniform grid, one lax.scan (`ddx.processes.meanflow.core.sample`).

    clip_x0 clips the point z_t − t·u where the step's straight line reaches
    t = 0 to [-1, 1] and steps towards it (as flow's samplers do with
    x̂_0 = x_t − t·v̂): in one step that is clipping the sample.
    """
    del sampler
    flow.time_grid(steps)   # a one-line error for steps < 1
    shape = tuple(shape)
    x = (initial_noise(rng, shape) if x_T is None
         else jnp.asarray(x_T, jnp.float32).reshape(shape))

    def u_fn(z, r, t):
      u = denoise_fn(z, pair(t, r))
      if clip_x0:
        tb = common.bcast(t, z)
        u = (z - jnp.clip(z - tb * u, -1.0, 1.0)) / tb   # t ≥ 1/steps > 0 here
      return u

    return meanflow.sample(u_fn, x, steps, return_trajectory=return_trajectory)

  def ode(self, denoise_fn, steps: int):
    del denoise_fn, steps
    raise ValueError("diffusion.process=meanflow has no likelihood ODE (its network "
                     "predicts average velocities); drop bpd from eval.metrics")
