"""The flow-matching process behind the `ddx.processes.Process` protocol.

The math is `ddx.flow` (interpolant, training times, loss, time grid); the
samplers are `ddx.sampling.flow`'s ODE integrators from t = 1 to 0.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax.numpy as jnp
import numpy as np

from ddx import likelihood
from ddx.processes.base import AUTO
from ddx.processes.flow import core as flow
from ddx.processes.flow import spec as flow_config
from ddx.sampling import flow as flow_sampling

# The likelihood ODE's data-side time: the network's velocity is integrated
# over [ODE_T_EPS, 1] (score_sde stops its VP SDE at 1e-5, but rectified-flow
# networks trained on logit-normal t see almost no t below 1e-3).
ODE_T_EPS = 1e-3


@flax.struct.dataclass
class FlowProcess(flow.Flow):
  """`ddx.flow.Flow`'s hyper-parameters (static) with the protocol's methods."""
  spec: ClassVar = flow_config.SPEC

  @classmethod
  def from_config(cls, f) -> "FlowProcess":
    kw = {k: f[k] for k in cls.spec.defaults()}
    prediction = f.get("prediction", AUTO)
    return cls(**kw, prediction=cls.spec.default_prediction if prediction == AUTO
               else prediction)

  @classmethod
  def coerce(cls, obj, prediction=None):
    del prediction   # a Flow carries its own
    if isinstance(obj, cls):
      return obj
    return cls(**dataclasses.asdict(obj)) if isinstance(obj, flow.Flow) else None

  def loss(self, apply_fn, params, x0, rng, has_aux: bool = False):
    """The flow-matching velocity loss (`ddx.flow.flow_loss`); the network sees
    time 1000·t."""
    return flow.flow_loss(apply_fn, params, self, x0, rng, has_aux=has_aux)

  def denoiser(self, net_fn):
    """The velocity v̂(x, t): the network at time 1000·t, an x0 output
    converted (`ddx.flow.velocity`)."""
    return lambda x, t: flow.velocity(self, net_fn(x, flow.time_input(t)), x, t)

  def noise_level(self, time):
    """σ = t/(1 − t): x_t = (1 − t)·x_0 + t·ε has that noise-to-signal ratio
    (inf at t = 1)."""
    t = jnp.asarray(time, jnp.float32)
    return t / (1.0 - t)

  def sigma_denoiser(self, denoise_fn):
    """D(y; σ) for any σ > 0 (a distillation teacher): y = x_0 + σ·n is
    x_t/(1 − t) at t = σ/(1 + σ), where x̂_0 = x_t − t·v̂(x_t, t)."""
    def D(y, sigma):
      t = jnp.asarray(sigma, jnp.float32) / (1.0 + jnp.asarray(sigma, jnp.float32))
      tb = t.reshape((-1,) + (1,) * (y.ndim - 1))
      x_t = (1.0 - tb) * y
      return x_t - tb * denoise_fn(x_t, t).astype(jnp.float32)
    return D

  def grid(self, sampler: str, steps: int, spacing=None, sigma_index: str = "nearest"):
    """N + 1 times from 1 to 0, shifted (`ddx.flow.time_grid`), every sampler."""
    del sampler, spacing, sigma_index
    self.check()
    return flow.time_grid(steps, self.shift)

  def sample(self, denoise_fn, rng, shape, sampler: str, steps: int, *, x_T=None,
             clip_x0: bool = False, return_trajectory: bool = False, **_):
    return flow_sampling.sample(denoise_fn, self.grid(sampler, steps), rng, shape,
                                sampler, x_T=x_T, clip_x0=clip_x0,
                                return_trajectory=return_trajectory)

  def ode(self, denoise_fn, steps: int):
    """dx/dt = v(x, t) from t = ODE_T_EPS to 1, prior N(0, I); the data side is
    x_ε = (1 − ε)(x_0 + ε/(1 − ε)·n), hence the scale 1 − ε (`ddx.bpd`)."""
    def drift(x, t):
      return denoise_fn(x, jnp.full((x.shape[0],), t, jnp.float32)).astype(jnp.float32)
    grid = np.linspace(ODE_T_EPS, 1.0, steps + 1)
    return drift, grid, likelihood.gaussian_logp, 1.0 - ODE_T_EPS
