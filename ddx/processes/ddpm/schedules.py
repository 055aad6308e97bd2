"""Noise schedules: every per-step array the diffusion math needs, in one pytree.

Index convention (used everywhere in ddx): the diffusion steps of DDPM are
t = 1..T; ddx stores step t at array index i = t - 1. So

  betas[i]          = β_t
  alphas_cumprod[i] = ᾱ_t = ∏_{s=1..t} (1 - β_s)      (alphas_cumprod[0] = 1 - β_1)
  alphas_cumprod_prev[i] = ᾱ_{t-1}, with ᾱ_0 = 1       (alphas_cumprod_prev[0] = 1)

Model inputs, `q_sample` and samplers all take the index i in [0, T).
"""
from __future__ import annotations

import math

import flax.struct
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class Schedule:
  """Per-step arrays of a discrete diffusion process, each float32 [T].

  Computed in float64 with NumPy and stored as float32, so no quantity carries
  float32 round-off from a cumulative product of 1000 terms.
  """
  betas: jnp.ndarray                       # β_t
  alphas: jnp.ndarray                      # α_t = 1 - β_t
  alphas_cumprod: jnp.ndarray              # ᾱ_t
  alphas_cumprod_prev: jnp.ndarray         # ᾱ_{t-1}, ᾱ_0 = 1
  sqrt_alphas_cumprod: jnp.ndarray         # √ᾱ_t
  sqrt_one_minus_alphas_cumprod: jnp.ndarray  # √(1-ᾱ_t)
  posterior_variance: jnp.ndarray          # β̃_t = β_t (1-ᾱ_{t-1}) / (1-ᾱ_t)
  posterior_log_variance_clipped: jnp.ndarray  # log β̃_t, with β̃_1 (= 0) replaced by β̃_2
  posterior_mean_coef1: jnp.ndarray        # coefficient of x_0 in μ̃_t
  posterior_mean_coef2: jnp.ndarray        # coefficient of x_t in μ̃_t

  @property
  def num_timesteps(self) -> int:
    """T, static (read from the array shape, so usable under jit)."""
    return self.betas.shape[0]


def from_betas(betas) -> Schedule:
  """Builds a Schedule from β_1..β_T (array of shape [T], values in (0, 1))."""
  b = np.asarray(betas, dtype=np.float64)
  if b.ndim != 1 or b.size < 1:
    raise ValueError(f"betas must be a non-empty 1-D array, got shape {b.shape}")
  if not np.all((b > 0) & (b < 1)):
    raise ValueError("every beta must lie in (0, 1)")
  alphas = 1.0 - b
  ac = np.cumprod(alphas)
  ac_prev = np.concatenate([[1.0], ac[:-1]])
  post_var = b * (1.0 - ac_prev) / (1.0 - ac)
  # β̃_1 = 0 (x_0 is known given x_1 and x_0); its log is -inf, so use β̃_2 as
  # the DDPM code does; with T == 1 there is no β̃_2 and we keep β_1.
  clipped = np.concatenate([post_var[1:2], post_var[1:]]) if b.size > 1 else b
  f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
  return Schedule(
      betas=f32(b),
      alphas=f32(alphas),
      alphas_cumprod=f32(ac),
      alphas_cumprod_prev=f32(ac_prev),
      sqrt_alphas_cumprod=f32(np.sqrt(ac)),
      sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - ac)),
      posterior_variance=f32(post_var),
      posterior_log_variance_clipped=f32(np.log(clipped)),
      posterior_mean_coef1=f32(b * np.sqrt(ac_prev) / (1.0 - ac)),
      posterior_mean_coef2=f32((1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)),
  )


def linear(num_timesteps: int = 1000, beta_start: float = 1e-4,
           beta_end: float = 0.02) -> Schedule:
  """DDPM's linear schedule: β_t evenly spaced from beta_start to beta_end.

  The defaults are DDPM's (T = 1000, β_1 = 1e-4, β_T = 0.02).
  """
  _check_t(num_timesteps)
  if not 0 < beta_start <= beta_end < 1:
    raise ValueError(
        f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
  return from_betas(np.linspace(beta_start, beta_end, num_timesteps,
                                dtype=np.float64))


def cosine(num_timesteps: int = 1000, s: float = 0.008,
           max_beta: float = 0.999) -> Schedule:
  """Improved DDPM's cosine schedule (Nichol & Dhariwal 2021, Eq. 17).

  ᾱ_t = f(t)/f(0) with f(t) = cos²(((t/T + s)/(1 + s)) · π/2), and
  β_t = 1 - ᾱ_t/ᾱ_{t-1} clipped at max_beta to avoid the singularity at t = T.
  """
  _check_t(num_timesteps)
  t = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  f = np.cos((t + s) / (1 + s) * math.pi / 2) ** 2
  betas = np.minimum(1.0 - f[1:] / f[:-1], max_beta)
  return from_betas(betas)


def _check_t(num_timesteps):
  if int(num_timesteps) != num_timesteps or num_timesteps < 1:
    raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps}")


_REGISTRY = {"linear": linear, "cosine": cosine}


def names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def from_config(diffusion_config) -> Schedule:
  """Builds the schedule named by `config.diffusion` (schedule, num_timesteps, ...)."""
  name = diffusion_config.schedule
  if name not in _REGISTRY:
    raise ValueError(f"diffusion.schedule={name!r} is unknown; use one of {names()}")
  if name == "linear":
    return linear(diffusion_config.num_timesteps, diffusion_config.beta_start,
                  diffusion_config.beta_end)
  return cosine(diffusion_config.num_timesteps)
