"""The EDM process (Karras et al. 2022): preconditioning, loss, sigma draws and grid.

EDM writes a noisy sample as x = y + σ·n (y the data, n standard normal,
σ >= 0) and wraps the raw network F in the preconditioning of its Table 1:

  D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ))
  c_skip = σ_d² / (σ² + σ_d²)        c_out = σ·σ_d / √(σ² + σ_d²)
  c_in   = 1 / √(σ² + σ_d²)          c_noise = ln(σ) / 4

Training draws ln σ ~ N(P_mean, P_std²) and weighs ‖D − y‖² by
λ(σ) = (σ² + σ_d²) / (σ·σ_d)², which makes λ·c_out² = 1: the loss is a
unit-weight MSE on the network output (`edm_loss`). Sampling walks the
Karras grid of Eq. 5 (`karras_sigmas`) with the samplers of
`ddx.sampling.sigma`.

Everything here is pure; the process itself is `EDM`, a static pytree.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from ddx.processes import common
from ddx.processes.common import bcast, static_field
from ddx.processes.edm import spec as edm_config

# Quartiles of the standard normal: ln σ ~ N(P_mean, P_std²) falls in each
# quarter of its law with probability 1/4 (the loss-by-quartile diagnostic).
_NORMAL_QUARTILES = (-0.6744897501960817, 0.0, 0.6744897501960817)
_DEFAULTS = edm_config.SPEC.defaults()   # the config's defaults are the class's


_static = static_field


@flax.struct.dataclass
class EDM:
  """EDM's hyper-parameters (defaults: the paper's, Table 1 and Sec. 5).

  All fields are static Python floats, so an `EDM` is a pytree with no
  leaves: it passes through `jax.jit` as part of the program's signature.
  """
  sigma_data: float = _static(_DEFAULTS["sigma_data"])  # σ_d, the data's standard deviation
  sigma_min: float = _static(_DEFAULTS["sigma_min"])  # smallest σ of the sampling grid
  sigma_max: float = _static(_DEFAULTS["sigma_max"])  # largest σ (the start of sampling)
  rho: float = _static(_DEFAULTS["rho"])  # ρ of the Karras grid (Eq. 5)
  p_mean: float = _static(_DEFAULTS["p_mean"])  # training: ln σ ~ N(p_mean, p_std²)
  p_std: float = _static(_DEFAULTS["p_std"])

  def check(self) -> "EDM":
    """Raises ValueError (one line naming the config key) for a bad value.

    Returns:
      self, so that `EDM(...).check()` can be chained.
    """
    edm_config.SPEC.check(dataclasses.asdict(self))
    return self


def precondition(p: EDM, sigma: jnp.ndarray):
  """EDM Table 1's preconditioning coefficients at noise level σ.

  Args:
    p: the process.
    sigma: σ > 0, any shape (typically [B]) float32.
  Returns:
    (c_skip, c_out, c_in, c_noise), each shaped like sigma.
  """
  sigma = jnp.asarray(sigma, jnp.float32)
  sd2 = p.sigma_data ** 2
  s2 = jnp.square(sigma)
  c_skip = sd2 / (s2 + sd2)
  c_out = sigma * p.sigma_data * jax.lax.rsqrt(s2 + sd2)
  c_in = jax.lax.rsqrt(s2 + sd2)
  c_noise = 0.25 * jnp.log(sigma)
  return c_skip, c_out, c_in, c_noise


def loss_weight(p: EDM, sigma: jnp.ndarray) -> jnp.ndarray:
  """λ(σ) = (σ² + σ_d²) / (σ·σ_d)², EDM's weight of ‖D(y + σn; σ) − y‖².

  Args:
    sigma: σ > 0, any shape float32.
  Returns:
    λ, shaped like sigma.
  """
  sigma = jnp.asarray(sigma, jnp.float32)
  return (jnp.square(sigma) + p.sigma_data ** 2) / jnp.square(sigma * p.sigma_data)


def sample_sigma(p: EDM, rng: jax.Array, n: int) -> jnp.ndarray:
  """Training noise levels: ln σ ~ N(P_mean, P_std²).

  Returns:
    σ float32 [n], all > 0.
  """
  return jnp.exp(p.p_mean + p.p_std * jax.random.normal(rng, (n,), jnp.float32))


def denoise(p: EDM, net_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray],
            x: jnp.ndarray, sigma: jnp.ndarray) -> jnp.ndarray:
  """The preconditioned denoiser D(x; σ) = c_skip·x + c_out·F(c_in·x, c_noise).

  Args:
    net_fn: `net_fn(x_in [B, ...], c_noise float32 [B]) -> [B, ...]`, the raw
      network F.
    x: [B, ...] noisy input y + σ·n.
    sigma: float32 [B], σ > 0.
  Returns:
    D(x; σ), the estimate of y, [B, ...] float32.
  """
  x = jnp.asarray(x, jnp.float32)
  sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
  c_skip, c_out, c_in, c_noise = precondition(p, sigma)
  out = net_fn(bcast(c_in, x) * x, c_noise).astype(jnp.float32)
  return bcast(c_skip, x) * x + bcast(c_out, x) * out


def edm_loss(apply_fn: Callable[..., Any], params: Any, p: EDM, x0: jnp.ndarray,
             rng: jax.Array, has_aux: bool = False):
  """EDM's training loss E_{σ,n}[λ(σ)·‖D(y + σn; σ) − y‖²] (EDM Eq. 2, 8).

  Because λ·c_out² = 1 it is computed as the unit-weight MSE of the raw
  network output against its effective target (Eq. 8):
  F_target = (y − c_skip·(y + σn)) / c_out, a well-scaled regression at
  every σ. The mean is over pixels (as `ddx.diffusion_loss`), so this is
  EDM's loss divided by the number of pixels.

  Args:
    apply_fn: `apply_fn(params, x_in [B, ...], c_noise float32 [B]) -> [B, ...]`,
      the raw network F (with `(output, aux)` when has_aux).
    params: whatever apply_fn takes.
    p: the process (checked here).
    x0: [B, H, W, C] float32 clean data y (in [-1, 1] for images).
    rng: PRNG key; split here into the σ draw and the noise draw, as
      `s_rng, n_rng = jax.random.split(rng)`.
    has_aux: apply_fn returns (output, aux); aux is returned in metrics.
  Returns:
    (loss scalar float32, metrics dict with "loss" and "mse_by_quartile" [4]:
    the loss for ln σ in each quarter of N(P_mean, P_std²) from the smallest
    σ to the largest, 0 where empty; plus "aux" when has_aux).
  """
  p.check()
  b = x0.shape[0]
  s_rng, n_rng = jax.random.split(rng)
  sigma = sample_sigma(p, s_rng, b)
  noise = jax.random.normal(n_rng, x0.shape, x0.dtype)
  c_skip, c_out, c_in, c_noise = precondition(p, sigma)
  x = x0 + bcast(sigma, x0) * noise
  out = apply_fn(params, bcast(c_in, x0) * x, c_noise)
  out, aux = out if has_aux else (out, None)
  out = out.astype(jnp.float32)   # the loss is float32 whatever the compute dtype
  tgt = (x0 - bcast(c_skip, x0) * x) / bcast(c_out, x0)
  per_ex = jnp.mean(jnp.square(out - tgt), axis=tuple(range(1, x0.ndim)))
  loss = jnp.mean(per_ex)
  bounds = jnp.asarray([p.p_mean + p.p_std * z for z in _NORMAL_QUARTILES], jnp.float32)
  q = jnp.sum(jnp.log(sigma)[:, None] > bounds[None, :], axis=1)
  return loss, common.loss_metrics(loss, per_ex, q, aux if has_aux else None)
