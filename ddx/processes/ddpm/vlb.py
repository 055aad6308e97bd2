"""DDPM's variational bound on 8-bit data (the discrete process's own likelihood).

`ddpm_vlb_terms` (Ho et al. 2020, Eq. 5; Nichol & Dhariwal 2021): the
  variational bound of the discrete DDPM process on the 8-bit data itself,
  L_T + Σ_{t=2..T} L_{t-1} + L_0, with the discretised Gaussian decoder L_0
  on the 256 levels 2k/255 - 1 (ddx's data scaling). It is already a
  probability of the discrete data: bits/dim = nats / (D ln 2), no Jacobian.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from ddx.likelihood import VARIANCES, discretized_gaussian_log_likelihood, normal_kl
from ddx.processes.ddpm import core as diffusion
from ddx.processes.ddpm.schedules import Schedule


def ddpm_vlb_terms(denoise_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray],
                   sched: Schedule, x0: jnp.ndarray, rng: jax.Array, *,
                   prediction: str = "eps", variance: str = "posterior",
                   num_terms: Optional[int] = None,
                   clip_x0: bool = False) -> dict:
  """The DDPM variational bound (Ho et al. 2020, Eq. 5) per example, in nats.

  -log p(x_0) <= L_T + Σ_{t=2..T} L_{t-1} + L_0 with
    L_T     = KL(q(x_T | x_0) || N(0, I)),
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)), x_t ~ q(x_t | x_0),
    L_0     = -log p(x_0 | x_1), the discretised Gaussian decoder,
  each term with its own draw of x_t. The model's mean is the posterior mean
  μ̃_t(x_t, x̂_0) at its x_0 estimate; its variance σ_t² is
    "posterior": β̃_t (DDPM's fixedsmall); at t = 1, where β̃_1 = 0, the
      decoder uses β̃_2 (the Schedule's clipped log variance, as DDPM's code);
    "beta": β_t (fixedlarge), β_1 in the decoder. (DDPM's and improved
      DDPM's code put β̃_2 into the fixedlarge decoder as well.)

  Full sum (num_terms=None): one `lax.scan` over the T indices; the noise for
  index i is jax.random.normal(jax.random.fold_in(rng, i), x0.shape, float32).
  Subset (num_terms=K): each example draws K distinct indices uniformly from
  [0, T); the estimate T/K · Σ sampled terms is unbiased for the sum over all
  T (index 0 is the decoder term, index i >= 1 is L_i = L_{t-1}, t = i + 1).

  Args:
    denoise_fn: (x_t [B, ...], i [B] int32 in [0, T)) -> the network's output
      in the `prediction` parameterisation.
    sched: the discrete schedule.
    x0: [B, ...] float32 8-bit data scaled to [-1, 1] (k / 127.5 - 1).
    rng: PRNG key for the x_t draws (and the subset's indices).
    prediction: eps | x0 | v.
    variance: posterior | beta.
    num_terms: None for all T terms, or K in [1, T] sampled terms.
    clip_x0: clip x̂_0 to [-1, 1] before forming the mean (improved DDPM's
      image_nll evaluation clips; the bound itself does not need it).
  Returns:
    dict of float32 arrays: "prior" [B] (L_T), "kl" [B] (Σ_{t>=2} L_{t-1},
    or its estimate), "decoder" [B] (L_0, or its estimate), "total" [B]
    nats, "bpd" [B] = total / (D ln 2), "terms" [B, T] (full) or [B, K]
    (subset) nats per sampled index, "timesteps" [B, T] or [B, K] int32,
    the index of each term.
  """
  if prediction not in diffusion.PREDICTIONS:
    raise ValueError(f"prediction={prediction!r} is unknown; use one of "
                     f"{diffusion.PREDICTIONS}")
  if variance not in VARIANCES:
    raise ValueError(f"variance={variance!r} is unknown; use one of {VARIANCES}")
  num_t = sched.num_timesteps
  if num_terms is not None and (int(num_terms) != num_terms
                                or not 1 <= num_terms <= num_t):
    raise ValueError(f"num_terms={num_terms} must be None or an integer in [1, {num_t}]")
  x0 = jnp.asarray(x0, jnp.float32)
  b = x0.shape[0]
  axes = tuple(range(1, x0.ndim))
  num_dims = math.prod(x0.shape[1:])
  model_logvar_table = (sched.posterior_log_variance_clipped if variance == "posterior"
                        else jnp.log(sched.betas))

  def term(i, noise):
    """The bound's term at indices i [B] with x_t drawn from noise: [B] nats."""
    x_t = diffusion.q_sample(sched, x0, i, noise)
    out = denoise_fn(x_t, i).astype(jnp.float32)
    x0_hat, _ = diffusion.to_x0_eps(out, x_t, sched.alphas_cumprod[i], prediction)
    if clip_x0:
      x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
    true_mean, _, true_logvar = diffusion.q_posterior(sched, x0, x_t, i)
    model_mean, _, _ = diffusion.q_posterior(sched, x0_hat, x_t, i)
    model_logvar = diffusion.extract(model_logvar_table, i, x0)
    kl = jnp.sum(normal_kl(true_mean, true_logvar, model_mean, model_logvar), axes)
    nll = -jnp.sum(discretized_gaussian_log_likelihood(
        x0, model_mean, 0.5 * model_logvar), axes)
    return jnp.where(i == 0, nll, kl)

  if num_terms is None:
    def body(_, i):
      noise = jax.random.normal(jax.random.fold_in(rng, i), x0.shape, jnp.float32)
      return None, term(jnp.full((b,), i, jnp.int32), noise)
    _, terms = jax.lax.scan(body, None, jnp.arange(num_t, dtype=jnp.int32))
    terms = terms.T                                               # [B, T]
    steps = jnp.broadcast_to(jnp.arange(num_t, dtype=jnp.int32), (b, num_t))
    weight = 1.0
  else:
    idx_rng, noise_rng = jax.random.split(rng)
    # K distinct indices per example: the first K of a random permutation.
    steps = jnp.argsort(jax.random.uniform(idx_rng, (b, num_t)), axis=1)[:, :num_terms]
    steps = steps.astype(jnp.int32)

    def body(_, k_i):
      k, i = k_i
      noise = jax.random.normal(jax.random.fold_in(noise_rng, k), x0.shape, jnp.float32)
      return None, term(i, noise)
    _, terms = jax.lax.scan(body, None, (jnp.arange(num_terms), steps.T))
    terms = terms.T                                               # [B, K]
    weight = num_t / num_terms
  decoder = weight * jnp.sum(jnp.where(steps == 0, terms, 0.0), axis=1)
  kl = weight * jnp.sum(jnp.where(steps > 0, terms, 0.0), axis=1)
  # L_T = KL(N(√ᾱ_T x_0, 1 - ᾱ_T) || N(0, 1)) per dimension, written as
  # ½ (ᾱ_T x_0² - ᾱ_T - log(1 - ᾱ_T)): normal_kl's -1 + (1 - ᾱ_T) would lose
  # the ~1e-5 nats it amounts to to float32 round-off.
  ab_t = sched.alphas_cumprod[-1]
  prior = 0.5 * jnp.sum(ab_t * jnp.square(x0) - ab_t - jnp.log1p(-ab_t), axes)
  total = prior + kl + decoder
  return {"prior": prior, "kl": kl, "decoder": decoder, "total": total,
          "bpd": total / (num_dims * math.log(2.0)), "terms": terms,
          "timesteps": steps}
