"""The EDM process behind the `ddx.processes.Process` protocol.

The math is `ddx.edm` (preconditioning, loss, Karras grid); the samplers are
`ddx.sampling.sigma`'s on the Karras grid.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax.numpy as jnp

from ddx import likelihood
from ddx.processes.edm import core as edm
from ddx.processes.edm import spec as edm_config
from ddx.sampling import sigma as sigma_lib


@flax.struct.dataclass
class EDMProcess(edm.EDM):
  """`ddx.edm.EDM`'s hyper-parameters (static) with the protocol's methods."""
  spec: ClassVar = edm_config.SPEC

  @classmethod
  def from_config(cls, f) -> "EDMProcess":
    return cls(**{k: f[k] for k in cls.spec.defaults()})

  @classmethod
  def coerce(cls, obj, prediction=None):
    del prediction   # EDM's network is preconditioned: it has no prediction choice
    if isinstance(obj, cls):
      return obj
    return cls(**dataclasses.asdict(obj)) if isinstance(obj, edm.EDM) else None

  def loss(self, apply_fn, params, x0, rng, has_aux: bool = False):
    """EDM's λ-weighted loss (`ddx.edm.edm_loss`); the network sees c_in·x and
    c_noise = ln(σ)/4."""
    return edm.edm_loss(apply_fn, params, self, x0, rng, has_aux=has_aux)

  def denoiser(self, net_fn):
    """D(x; σ) = c_skip·x + c_out·F(c_in·x, c_noise) (`ddx.edm.denoise`)."""
    return lambda x, sigma: edm.denoise(self, net_fn, x, sigma)

  def noise_level(self, time):
    """EDM's time is σ itself."""
    return jnp.asarray(time, jnp.float32)

  def grid(self, sampler: str, steps: int, spacing=None, sigma_index: str = "nearest"):
    """The Karras grid (EDM Eq. 5) for every sampler."""
    del sampler, spacing, sigma_index
    self.check()
    return sigma_lib.karras_sigmas(self.sigma_min, self.sigma_max, self.rho, steps)

  def to_sigma(self, denoise_fn, steps: int, sigma_index: str = "nearest"):
    """EDM is the σ form: its grid and denoiser as they are."""
    return self.grid(None, steps), denoise_fn

  def sigma_denoiser(self, denoise_fn):
    """D(y; σ) for any σ > 0 (a distillation teacher): EDM's own denoiser."""
    return denoise_fn

  def sample(self, denoise_fn, rng, shape, sampler: str, steps: int, *, x_T=None,
             clip_x0: bool = False, return_trajectory: bool = False, churn=0.0,
             s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, **_):
    grid, fn = self.to_sigma(denoise_fn, steps)
    return sigma_lib.sample(fn, grid, rng, shape, sampler, churn=churn, s_tmin=s_tmin,
                            s_tmax=s_tmax, s_noise=s_noise, x_T=x_T, clip_x0=clip_x0,
                            return_trajectory=return_trajectory)

  def ode(self, denoise_fn, steps: int):
    return likelihood.sigma_ode(denoise_fn, self.sigma_min, self.sigma_max, steps)
