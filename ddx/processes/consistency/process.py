"""The continuous-time consistency process (sCM) behind the `ddx.processes.Process` protocol.

The math is `ddx.consistency` (TrigFlow, the consistency function, sCM's
tangent and loss, the teacher's velocity, the sampler). Its time is TrigFlow
t in [0, π/2]; the network sees `ddx.processes.consistency.core.time_input(t)` = 1000·t/(π/2)
and x_t/σ_d, and gives F. The process-native denoise_fn is F itself,
F(x_t/σ_d, t): the consistency function f = cos(t)·x_t − sin(t)·σ_d·F is
affine in F, so guidance can mix F.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ddx.processes import common

from ddx.processes.consistency import core as consistency
from ddx.processes.consistency import spec as consistency_config
from ddx.sampling.steps import initial_noise

_DEFAULTS = consistency_config.SPEC.defaults()


_static = common.static_field


@flax.struct.dataclass
class ConsistencyProcess:
  """sCM's hyper-parameters (static: a pytree with no leaves) and the protocol's methods."""
  sigma_data: float = _static(_DEFAULTS["sigma_data"])
  scm_p_mean: float = _static(_DEFAULTS["scm_p_mean"])
  scm_p_std: float = _static(_DEFAULTS["scm_p_std"])
  scm_tangent_c: float = _static(_DEFAULTS["scm_tangent_c"])
  scm_warmup_steps: int = _static(_DEFAULTS["scm_warmup_steps"])
  scm_adaptive: bool = _static(_DEFAULTS["scm_adaptive"])
  scm_mid_t: float = _static(_DEFAULTS["scm_mid_t"])
  spec: ClassVar = consistency_config.SPEC

  @classmethod
  def from_config(cls, f) -> "ConsistencyProcess":
    return cls(**{k: f[k] for k in cls.spec.defaults()})

  @classmethod
  def coerce(cls, obj, prediction=None):
    del prediction   # F has one parameterisation
    return obj if isinstance(obj, cls) else None

  def check(self) -> "ConsistencyProcess":
    self.spec.check(dataclasses.asdict(self))
    if self.sigma_data == "auto":
      raise ValueError("diffusion.sigma_data=auto is measured when training starts; "
                       "pass the number (the run's config.json holds it)")
    return self

  def loss(self, apply_fn, params, x0, rng, has_aux: bool = False, *, step=None,
           teacher=None, **_):
    """sCM's loss: F regressed onto sg(F + g) (`ddx.processes.consistency.core.tangent`).

    Args:
      apply_fn: apply_fn(params, x_t/σ_d, time_input(t)) -> out, or
        (out, logvar [B]) from a network with a log-variance head; with
        has_aux, (that, aux).
      params, x0 [B, ...] float32, rng: as every process's loss; rng splits
        into the times' and the noise's keys.
      step: int32 scalar, the training step (the tangent warm-up); None = r 1.
      teacher: None (consistency training: dx/dt = cos(t)·z − sin(t)·x_0) or
        D(y; σ), a teacher's EDM denoiser (distillation:
        `ddx.processes.consistency.core.teacher_velocity`).
    Returns:
      (loss, metrics): "loss", "mse_by_quartile" [4] (Δ² by quarter of
      [0, π/2]), "aux" with has_aux.
    """
    self.check()
    b, sd = x0.shape[0], self.sigma_data
    t_rng, z_rng = jax.random.split(rng)
    t = consistency.sample_t(t_rng, b, sd, self.scm_p_mean, self.scm_p_std)
    z = sd * jax.random.normal(z_rng, x0.shape, jnp.float32)
    x_t = consistency.interpolate(x0, z, t)
    if teacher is None:
      dxdt = consistency.velocity(x0, z, t)
    else:
      dxdt = consistency.teacher_velocity(teacher, x_t, t, sd)
    warmup = 1.0
    if step is not None and self.scm_warmup_steps > 0:
      warmup = jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / self.scm_warmup_steps)

    def F_fn(xs, s):
      res = apply_fn(params, xs, consistency.time_input(s))
      out, aux = res if has_aux else (res, None)
      out, logvar = out if isinstance(out, tuple) else (out, None)
      return out, (logvar, aux)

    F, g, (logvar, aux) = consistency.tangent(F_fn, x_t, t, dxdt, sd, warmup=warmup,
                                              norm_c=self.scm_tangent_c, has_aux=True)
    if logvar is not None and self.scm_adaptive:
      loss, d2 = consistency.loss(F, g, logvar.astype(jnp.float32).reshape(b))
    else:
      loss, d2 = consistency.loss(F, g)
    q = jnp.clip(jnp.floor(t / consistency.T_MAX * 4).astype(jnp.int32), 0, 3)
    return loss, common.loss_metrics(loss, d2, q, aux if has_aux else None)

  def denoiser(self, net_fn):
    """F(x/σ_d, t): the raw network net_fn(x_scaled, time_input(t))."""
    return lambda xs, t: net_fn(xs, consistency.time_input(t))

  def noise_level(self, time):
    """σ = σ_d·tan(t) (`ddx.processes.consistency.core.noise_level`), EDM's σ in the data's units."""
    return consistency.noise_level(time, self.sigma_data)

  def grid(self, sampler: str, steps: int, spacing=None, sigma_index: str = "nearest"):
    """The N times the sampler evaluates: π/2, then the re-noising times."""
    del sampler, spacing, sigma_index
    self.check()
    return np.asarray((consistency.T_MAX,) + consistency.mid_times(steps, self.scm_mid_t))

  def sample(self, denoise_fn, rng, shape, sampler: str, steps: int, *, x_T=None,
             clip_x0: bool = False, return_trajectory: bool = False, **_):
    """`ddx.processes.consistency.core.sample`: N = steps evaluations of F; x_T (unit noise)
    is z, drawn from rng as every sampler's (`initial_noise`) when None."""
    del sampler
    shape = tuple(shape)
    z = (initial_noise(rng, shape) if x_T is None
         else jnp.asarray(x_T, jnp.float32).reshape(shape))
    mids = tuple(self.grid(None, steps)[1:])
    return consistency.sample(denoise_fn, z, self.sigma_data, mids,
                              jax.random.split(rng)[1], clip_x0=clip_x0,
                              return_trajectory=return_trajectory)

  def ode(self, denoise_fn, steps: int):
    del denoise_fn, steps
    raise ValueError("diffusion.process=consistency has no likelihood ODE (its network is "
                     "a one-step map, not a velocity); score bits/dim with a diffusion "
                     "model, e.g. the teacher run")
