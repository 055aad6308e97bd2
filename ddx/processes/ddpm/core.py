"""The forward process, its posterior, prediction conversions and the training loss.

All functions are pure and shape-polymorphic in the batch. Time is the array
index i in [0, T) of diffusion step t = i + 1 (see `ddx.processes.ddpm.schedules`).

Prediction parameterisations (x_t = √ᾱ x_0 + √(1-ᾱ) ε):
  eps: the network predicts ε                      (DDPM)
  x0:  the network predicts x_0
  v:   the network predicts v = √ᾱ ε - √(1-ᾱ) x_0  (Salimans & Ho 2022)
Every conversion between them lives here, in `to_x0_eps` and `target`.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from ddx.processes.common import bcast, loss_metrics
from ddx.processes.ddpm.schedules import Schedule
from ddx.processes.ddpm.spec import PREDICTIONS


def extract(arr: jnp.ndarray, t: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
  """Gathers arr[t] ([B]) and reshapes it to broadcast against x ([B, ...])."""
  return bcast(arr[t], x)


def q_sample(sched: Schedule, x0: jnp.ndarray, t: jnp.ndarray,
             noise: jnp.ndarray) -> jnp.ndarray:
  """Samples x_t ~ q(x_t | x_0) = N(√ᾱ_t x_0, (1-ᾱ_t) I)  (DDPM Eq. 4).

  Args:
    sched: the noise schedule.
    x0: [B, ...] clean data.
    t: [B] int32 array indices in [0, T).
    noise: [B, ...] standard normal, same shape as x0.
  Returns:
    x_t: [B, ...] with x0's dtype.
  """
  return (extract(sched.sqrt_alphas_cumprod, t, x0) * x0
          + extract(sched.sqrt_one_minus_alphas_cumprod, t, x0) * noise)


def q_posterior(sched: Schedule, x0: jnp.ndarray, x_t: jnp.ndarray,
                t: jnp.ndarray):
  """Mean and variance of q(x_{t-1} | x_t, x_0)  (DDPM Eq. 6-7).

  μ̃_t = √ᾱ_{t-1} β_t/(1-ᾱ_t) · x_0 + √α_t (1-ᾱ_{t-1})/(1-ᾱ_t) · x_t,
  β̃_t = (1-ᾱ_{t-1})/(1-ᾱ_t) · β_t.

  Args:
    x0, x_t: [B, ...]; t: [B] int32 indices in [0, T).
  Returns:
    (mean [B, ...], variance broadcastable [B, 1, ...], log variance clipped
    [B, 1, ...]).
  """
  mean = (extract(sched.posterior_mean_coef1, t, x_t) * x0
          + extract(sched.posterior_mean_coef2, t, x_t) * x_t)
  return (mean, extract(sched.posterior_variance, t, x_t),
          extract(sched.posterior_log_variance_clipped, t, x_t))


def to_x0_eps(model_out: jnp.ndarray, x_t: jnp.ndarray, alpha_bar: jnp.ndarray,
              prediction: str = "eps"):
  """Converts a network output to the pair (x̂_0, ε̂).

  Args:
    model_out: [B, ...] the network's output in the `prediction` parameterisation.
    x_t: [B, ...] the noisy input.
    alpha_bar: ᾱ of x_t's step, [B] or scalar (any value in (0, 1]).
    prediction: eps | x0 | v.
  Returns:
    (x0_hat, eps_hat), each shaped like x_t.
  """
  a = bcast(alpha_bar, x_t)
  sa, s1a = jnp.sqrt(a), jnp.sqrt(1.0 - a)
  if prediction == "eps":
    eps = model_out
    return (x_t - s1a * eps) / sa, eps
  if prediction == "x0":
    x0 = model_out
    # ᾱ = 1 would divide by zero; no sampler evaluates the network there.
    return x0, (x_t - sa * x0) / s1a
  if prediction == "v":
    return sa * x_t - s1a * model_out, s1a * x_t + sa * model_out
  raise ValueError(f"prediction={prediction!r} is unknown; use one of {PREDICTIONS}")


def eps_from_x0(x_t, x0, alpha_bar):
  """ε = (x_t - √ᾱ x_0) / √(1-ᾱ)."""
  a = bcast(alpha_bar, x_t)
  return (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)


def target(x0: jnp.ndarray, noise: jnp.ndarray, alpha_bar: jnp.ndarray,
           prediction: str = "eps") -> jnp.ndarray:
  """The regression target for a parameterisation, given x_0, ε and ᾱ."""
  if prediction == "eps":
    return noise
  if prediction == "x0":
    return x0
  if prediction == "v":
    a = bcast(alpha_bar, x0)
    return jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0
  raise ValueError(f"prediction={prediction!r} is unknown; use one of {PREDICTIONS}")


def diffusion_loss(apply_fn: Callable[..., jnp.ndarray], params: Any,
                   sched: Schedule, x0: jnp.ndarray, rng: jax.Array,
                   prediction: str = "eps", has_aux: bool = False):
  """The simple DDPM loss (Alg. 1): E_{t, ε} ||target - f(x_t, t)||².

  t is uniform over [0, T), ε standard normal; with prediction="eps" this is
  DDPM's L_simple. For x0 / v the same MSE is taken in that parameterisation.

  Args:
    apply_fn: `apply_fn(params, x_t, t) -> [B, ...]` the network.
    params: whatever apply_fn takes (e.g. the Flax params dict).
    sched: the noise schedule.
    x0: [B, H, W, C] float32 clean images in [-1, 1].
    rng: a PRNG key; split here into the t and ε draws.
    prediction: eps | x0 | v.
    has_aux: apply_fn returns (output, aux), e.g. the updated batch_stats of
      a Flax apply with mutable=["batch_stats"]; aux is returned in metrics.
  Returns:
    (loss scalar float32, metrics dict with "loss" and "mse_by_quartile" [4]:
    the loss over t in each quarter of [0, T), NaN-free (0 where empty);
    plus "aux" when has_aux).
  """
  if prediction not in PREDICTIONS:
    raise ValueError(f"prediction={prediction!r} is unknown; use one of {PREDICTIONS}")
  b = x0.shape[0]
  t_rng, n_rng = jax.random.split(rng)
  t = jax.random.randint(t_rng, (b,), 0, sched.num_timesteps, dtype=jnp.int32)
  noise = jax.random.normal(n_rng, x0.shape, x0.dtype)
  x_t = q_sample(sched, x0, t, noise)
  out = apply_fn(params, x_t, t)
  out, aux = out if has_aux else (out, None)
  out = out.astype(jnp.float32)   # the loss is float32 whatever the compute dtype
  tgt = target(x0, noise, sched.alphas_cumprod[t], prediction)
  per_ex = jnp.mean(jnp.square(out - tgt), axis=tuple(range(1, x0.ndim)))
  loss = jnp.mean(per_ex)
  # Loss by quarter of the time range: shows which noise levels the model
  # has learned (a cheap diagnostic the DDPM papers plot).
  q = (t * 4) // sched.num_timesteps
  return loss, loss_metrics(loss, per_ex, q, aux if has_aux else None)
