"""The DDPM process behind the `ddx.processes.Process` protocol.

The math is `ddx.schedules` (the arrays) and `ddx.processes.ddpm.core` (q_sample, the
loss, prediction conversions); the samplers are `ddx.processes.ddpm.sampling`
(ddpm, ddim, dpm_solver_pp on the T indices) and, through EDM's VP mapping
(`to_sigma`), the σ-grid samplers of `ddx.sampling.sigma`.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax.numpy as jnp

from ddx import likelihood
from ddx.processes.base import AUTO
from ddx.processes.ddpm import core as diffusion
from ddx.processes.ddpm import sampling as discrete
from ddx.processes.ddpm import schedules
from ddx.processes.ddpm import spec as ddpm_config
from ddx.processes.ddpm import vp
from ddx.processes.ddpm.schedules import Schedule
from ddx.sampling import sigma as sigma_lib


@flax.struct.dataclass
class DDPMProcess(Schedule):
  """A DDPM `Schedule` (its arrays are the pytree leaves) and what the network
  predicts (static): eps | x0 | v. It is a Schedule, so everything that takes
  one (`ddx.q_sample`, `ddx.processes.ddpm.vlb.ddpm_vlb_terms`, ...) takes it."""
  prediction: str = flax.struct.field(pytree_node=False,
                                      default=ddpm_config.SPEC.default_prediction)
  spec: ClassVar = ddpm_config.SPEC

  @classmethod
  def from_config(cls, f) -> "DDPMProcess":
    return cls.coerce(schedules.from_config(f), f.get("prediction", AUTO))

  @classmethod
  def coerce(cls, obj, prediction=None):
    if not isinstance(obj, Schedule):
      return None
    if prediction in (None, AUTO):
      prediction = getattr(obj, "prediction", cls.spec.default_prediction)
    arrays = {f.name: getattr(obj, f.name) for f in dataclasses.fields(Schedule)}
    return cls(**arrays, prediction=prediction)

  def check(self) -> "DDPMProcess":
    if self.prediction not in ddpm_config.PREDICTIONS:
      raise ValueError(f"diffusion.prediction={self.prediction!r} is unknown; use one "
                       f"of {ddpm_config.PREDICTIONS}")
    return self

  def loss(self, apply_fn, params, x0, rng, has_aux: bool = False):
    """DDPM's simple loss in self.prediction (`ddx.processes.ddpm.core.diffusion_loss`);
    the network sees the index i in [0, T)."""
    return diffusion.diffusion_loss(apply_fn, params, self, x0, rng,
                                    prediction=self.prediction, has_aux=has_aux)

  def denoiser(self, net_fn):
    """The network itself: it takes the index i and its output stays in
    self.prediction (the samplers convert it)."""
    return net_fn

  def noise_level(self, time):
    """σ_i = √((1 − ᾱ_i)/ᾱ_i) at index i; a float32 (fractional,
    sigma_index=interp) index interpolates log σ linearly in i, the inverse
    of `ddx.processes.ddpm.vp.vp_denoiser`'s map."""
    a = jnp.asarray(self.alphas_cumprod, jnp.float32)
    sigmas = jnp.sqrt((1.0 - a) / a)
    time = jnp.asarray(time)
    if jnp.issubdtype(time.dtype, jnp.integer):
      return sigmas[time]
    return jnp.exp(jnp.interp(time, jnp.arange(a.shape[0], dtype=jnp.float32),
                              jnp.log(sigmas)))

  def grid(self, sampler: str, steps: int, spacing=None, sigma_index: str = "nearest"):
    """The discrete samplers' indices (`ddx.processes.ddpm.sampling.timesteps`; spacing None =
    the sampler's default), or the σ grid of the VP mapping for the others."""
    if sampler in discrete.SAMPLERS:
      return discrete.timesteps(self.num_timesteps, steps,
                                spacing or discrete.SAMPLERS[sampler].spacing, self)
    return vp.vp_grid(self, steps, sigma_index)

  def to_sigma(self, denoise_fn, steps: int, sigma_index: str = "nearest"):
    """EDM's VP mapping (EDM Sec. 2): (σ grid [steps + 1], D(x; σ)) that run this
    model on the σ-grid samplers (`ddx.processes.ddpm.vp.vp_grid`, `vp_denoiser`)."""
    return (vp.vp_grid(self, steps, sigma_index),
            vp.vp_denoiser(denoise_fn, self, self.prediction, sigma_index))

  def sigma_denoiser(self, denoise_fn):
    """D(y; σ) for any σ > 0 (a distillation teacher): the VP mapping with the
    fractional ("interp") index, σ clipped to the schedule's [σ_0, σ_{T−1}]."""
    return vp.vp_denoiser(denoise_fn, self, self.prediction, "interp")

  def sample(self, denoise_fn, rng, shape, sampler: str, steps: int, *, x_T=None,
             clip_x0: bool = False, return_trajectory: bool = False, eta=0.0,
             ddpm_variance: str = "posterior", spacing=None, churn=0.0, s_tmin=0.0,
             s_tmax=float("inf"), s_noise=1.0, sigma_index: str = "nearest", **_):
    if sampler in discrete.SAMPLERS:
      return discrete.sample(denoise_fn, self, rng, shape, sampler=sampler, steps=steps,
                             eta=eta, x_T=x_T, clip_x0=clip_x0, prediction=self.prediction,
                             ddpm_variance=ddpm_variance, spacing=spacing,
                             return_trajectory=return_trajectory)
    grid, fn = self.to_sigma(denoise_fn, steps, sigma_index)
    # The stochastic sampler's raised σ̂ is rounded to a σ the network knows.
    return sigma_lib.sample(fn, grid, rng, shape, sampler, churn=churn, s_tmin=s_tmin,
                            s_tmax=s_tmax, s_noise=s_noise,
                            round_sigma=vp.vp_round_sigma(self, sigma_index),
                            x_T=x_T, clip_x0=clip_x0, return_trajectory=return_trajectory)

  def ode(self, denoise_fn, steps: int):
    """DDPM's continuous limit through the VP mapping with the fractional
    ("interp") index, as EDM's ODE in log σ from σ_0 to σ_{T−1}."""
    den = vp.vp_denoiser(denoise_fn, self, self.prediction, "interp")
    sig = vp.vp_sigmas(self)
    if sig.size < 2:
      raise ValueError("the ODE likelihood of a DDPM model needs a schedule with T >= 2")
    return likelihood.sigma_ode(den, float(sig[0]), float(sig[-1]), steps)
