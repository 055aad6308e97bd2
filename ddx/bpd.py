"""Bits/dim of 8-bit images under any ddx process.

`ddx.likelihood` owns the process-agnostic math (the probability-flow ODE
log-likelihood with an exact or Skilling-Hutchinson trace, the DDPM bound,
dequantisation, bits/dim). Each process says which ODE to integrate, over
what range, from which prior (`process.ode`, `ddx.processes`); this module
applies it to a `ddx.Model`:

  ode_logp(process, denoise_fn, x, rng, ...)    the testable core: any process,
                                                any process-native denoiser
  ode_bpd(model, images_u8, rng, ...)           a Model on uint8 images
  vlb_bpd(model, images_u8, rng, ...)           the DDPM bound of a ddpm Model

The probability-flow ODE of each built-in process (all three are "data + Gaussian
noise" families, so each gives the density of the data smoothed by a small
Gaussian, evaluated at the dequantised image):

* EDM: x = y + σ n. In u = log σ, dx/du = σ · dx/dσ = x − D(x; e^u) (EDM
  Eq. 3 with s = 1, σ(t) = t, times σ), integrated from σ_min to σ_max;
  prior N(0, σ_max² I) (the data's own variance is ignored next to σ_max²).
  The result is log p_{σ_min}(x): the data convolved with N(0, σ_min² I).
* DDPM (its continuous limit): through EDM's VP mapping x̂ = x_t / √ᾱ,
  σ = √((1 − ᾱ)/ᾱ) (`ddx.processes.ddpm.vp.vp_denoiser`, index "interp": the
  network runs at the real-valued index whose interpolated log σ_i equals
  log σ), the same ODE in u = log σ from σ_0 to σ_{T−1} of the schedule.
  In x̂ the data side is x̂ = x_0 + σ_0 n, unscaled, so no Jacobian term is
  needed (in x_t coordinates it would be D·log √ᾱ_0). The prior is
  N(0, σ_{T−1}² I) in x̂ (DDPM's N(0, I) in x_t is N(0, (1 + σ²) I) in x̂:
  D/(2σ²) nats apart, 2e-5 per dim for the linear schedule).
* Flow: x_t = (1 − t) x_0 + t n, dx/dt = v(x, t), from t = ε = 1e-3 to 1,
  prior N(0, I) (exact at t = 1). The network is never asked about t < ε
  (its x0-prediction velocity divides by t). The ODE gives the density of
  x_ε = (1 − ε)(x_0 + ε/(1 − ε) n); this module evaluates it at (1 − ε) x
  and adds D·log(1 − ε), i.e. it reports the density of x_0 + ε/(1 − ε) n at
  x, in data scale as the other two processes do.

Class-conditional models: `labels=None` scores log p(x) with the null label
(needs training.label_dropout > 0); explicit labels give log p(x | y).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from ddx import likelihood
from ddx import model as model_lib
from ddx import processes
from ddx.processes.ddpm import vlb
from ddx.processes.flow.process import ODE_T_EPS as FLOW_T_EPS   # the flow ODE's data-side time

ESTIMATORS = ("ode", "vlb", "both")   # = ddx.config.BPD_ESTIMATORS (tested)

Nfe = Union[int, jax.Array]


def ode_logp(process, denoise_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray],
             x: jnp.ndarray, rng: Optional[jax.Array], *,
             prediction: Optional[str] = None,
             trace: str = "hutchinson", probe: str = "rademacher", num_probes: int = 1,
             solver: str = "rk4", steps: int = 32, rtol: float = 1e-5,
             atol: float = 1e-5, trace_chunk: Optional[int] = None,
             max_steps: int = 4096) -> tuple[jax.Array, Nfe]:
  """log-density of data x under a process's probability-flow ODE (module docstring).

  Args:
    process: what `Model.process` returns (`ddx.processes.Process`), or a bare
      `Schedule` (ddpm; concrete, not a jit argument), `ddx.edm.EDM` or
      `ddx.flow.Flow`. Its `ode` says the drift, range, prior and scale.
    denoise_fn: the process-native denoiser, as `ddx.model.process_denoiser`
      makes it: ddpm: (x_t [B, ...], i [B] float32 fractional index) -> the
      network output in `prediction`; edm: (x, σ [B]) -> D(x; σ);
      flow: (x, t [B]) -> velocity v(x, t).
    x: [B, ...] float32 data in [-1, 1] (dequantised, `likelihood.dequantize`).
    rng: PRNG key for the Hutchinson probes (None with trace="exact").
    prediction: ddpm only: eps | x0 | v; None keeps the process's own (a bare
      Schedule: eps).
    trace, probe, num_probes, solver, rtol, atol, trace_chunk, max_steps: as
      `ddx.likelihood.ode_log_likelihood` (solver "adaptive" needs diffrax).
    steps: fixed-step solvers: N steps, uniform in log σ (ddpm, edm) or in t
      (flow); "adaptive" ignores it.
  Returns:
    (logp [B] float32 nats of the (slightly smoothed) data density at x,
     nfe: evaluations of the joint dynamics, an int, or an int32 array for
     "adaptive").
  """
  if isinstance(steps, bool) or int(steps) != steps or steps < 1:
    raise ValueError(f"steps={steps!r} must be a positive integer")
  drift, grid, prior, scale = processes.as_process(process, prediction).ode(
      denoise_fn, int(steps))
  x = jnp.asarray(x, jnp.float32)
  logp, nfe = likelihood.ode_log_likelihood(
      drift, scale * x, jnp.asarray(grid, jnp.float32), prior, rng, trace=trace,
      probe=probe, num_probes=num_probes, solver=solver, trace_chunk=trace_chunk,
      rtol=rtol, atol=atol, max_steps=max_steps)
  if scale != 1.0:
    # p_x(x) = p_{x_ε}(scale·x)·scale^D: the density back in data scale.
    logp = logp + math.prod(x.shape[1:]) * math.log(scale)
  return logp, nfe


# --------------------------------------------------------------------------
# A ddx.Model on 8-bit images.


def _check_images(model, images_u8) -> jnp.ndarray:
  shape = tuple(np.shape(images_u8))
  if len(shape) != 4 or shape[1:] != tuple(model.image_shape):
    raise ValueError(f"images must be uint8 [B, {', '.join(map(str, model.image_shape))}] "
                     f"for this model, got shape {shape}")
  dtype = jnp.asarray(images_u8).dtype
  if not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"images must be integer 8-bit levels 0..255, got dtype {dtype}; "
                     "pass the raw uint8 images, not [-1, 1] floats")
  return jnp.asarray(images_u8)


def likelihood_labels(model, labels, n: int):
  """The labels the likelihood conditions on: None (unconditional model), the
  given ones (log p(x | y)), or the null label (log p(x), labels=None).

  Raises:
    ValueError: labels for an unconditional model, bad labels, or labels=None
      for a conditional model whose null label was never trained.
  """
  num_classes = model.config.model.num_classes
  if labels is None and num_classes > 0:
    if float(model.config.training.get("label_dropout", 0.0)) <= 0:
      raise ValueError("labels=None scores log p(x) with the null label, but this model "
                       "was trained with training.label_dropout=0; pass labels= (the "
                       "images' classes) for log p(x | y)")
    return jnp.full((n,), num_classes, jnp.int32)
  return model_lib.resolve_labels(model, labels, n)


@functools.partial(jax.jit, static_argnames=(
    "trace", "probe", "num_probes", "solver", "steps", "rtol", "atol", "trace_chunk"))
def _ode_bpd_jit(model, images, rng, labels, *, trace, probe, num_probes, solver, steps,
                 rtol, atol, trace_chunk):
  dq_rng, probe_rng = jax.random.split(rng)
  x = model_lib.shard_batch(likelihood.dequantize(images, dq_rng))
  fn = model_lib.denoiser(model, labels)   # the process's own denoiser
  logp, nfe = ode_logp(model.process, fn, x, probe_rng, trace=trace,
                       probe=probe, num_probes=num_probes, solver=solver, steps=steps,
                       rtol=rtol, atol=atol, trace_chunk=trace_chunk)
  bpd = likelihood.bits_per_dim(logp, math.prod(images.shape[1:]))
  return bpd, jnp.asarray(nfe, jnp.int32)


def ode_bpd(model, images_u8, rng: jax.Array, *, labels=None,
            trace: str = "hutchinson", probe: str = "rademacher", num_probes: int = 1,
            solver: str = "rk4", steps: int = 32, rtol: float = 1e-5,
            atol: float = 1e-5, trace_chunk: Optional[int] = None
            ) -> tuple[jax.Array, Nfe]:
  """Bits/dim of 8-bit images under a model's probability-flow ODE, any process.

  The images are dequantised, x = 2 (k + u)/256 − 1 with u ~ U[0, 1)
  (`likelihood.dequantize`), their log-density integrated by `ode_logp`, and
  the change of variables to [0, 256)^D added (`likelihood.bits_per_dim`, +7
  bits/dim); in expectation over u and the probes this bounds the discrete
  model's −log2 P(k)/D from above. One jitted program per batch shape and
  static option; the batch is split over devices when it divides evenly.

  Args:
    model: a `ddx.Model` (any process).
    images_u8: [B, H, W, C] uint8 (any integer dtype) levels 0..255.
    rng: PRNG key; split into the dequantisation noise and the probes.
    labels: class-conditional models: [B] int32 classes for log p(x | y), or
      None for log p(x) with the null label (needs label_dropout > 0).
    trace: hutchinson | exact (D jvps per evaluation: small images only).
    probe: rademacher | gaussian; num_probes: Hutchinson probes per image.
    solver: euler | heun | rk4 | adaptive (diffrax Tsit5; rtol, atol > 0).
    steps: fixed-step solvers' steps (rk4: 4 evaluations a step).
    trace_chunk: exact trace: basis vectors per vectorised jvp batch.
  Returns:
    (bpd [B] float32, nfe: evaluations of the ODE's dynamics, each one
     network linearisation plus num_probes (or D) jvps; int32 scalar array).
  """
  images = _check_images(model, images_u8)
  labels = likelihood_labels(model, labels, images.shape[0])
  return _ode_bpd_jit(model, images, rng, labels, trace=trace, probe=probe,
                      num_probes=int(num_probes), solver=solver, steps=int(steps),
                      rtol=float(rtol), atol=float(atol), trace_chunk=trace_chunk)


@functools.partial(jax.jit, static_argnames=("num_terms", "variance", "clip_x0"))
def _vlb_bpd_jit(model, images, rng, labels, *, num_terms, variance, clip_x0):
  x0 = model_lib.shard_batch(images.astype(jnp.float32) / 127.5 - 1.0)
  fn = model_lib.denoiser(model, labels)
  out = vlb.ddpm_vlb_terms(fn, model.schedule, x0, rng,
                                  prediction=model.process.prediction,
                                  variance=variance, num_terms=num_terms, clip_x0=clip_x0)
  return out["bpd"]


def vlb_bpd(model, images_u8, rng: jax.Array, *, labels=None,
            num_terms: Optional[int] = None, variance: Optional[str] = None,
            clip_x0: bool = False) -> tuple[jax.Array, int]:
  """Bits/dim of 8-bit images by the DDPM variational bound (Ho et al. 2020, Eq. 5).

  L_T + Σ L_{t−1} + L_0 on the images scaled as in training, k/127.5 − 1,
  with the discretised Gaussian decoder for L_0 (`ddx.processes.ddpm.vlb.ddpm_vlb_terms`):
  a bound on the discrete data's −log2 P(k)/D, no dequantisation.

  Args:
    model: a `ddx.Model` with diffusion.process = ddpm.
    images_u8: [B, H, W, C] uint8 levels.
    rng: PRNG key for the x_t draws (and the subset's timesteps).
    labels: as `ode_bpd`.
    num_terms: None sums all T terms; K draws K distinct timesteps per image
      for an unbiased estimate (T/K · the sampled terms).
    variance: the reverse variance, posterior (β̃) | beta (β); None uses
      config.sampling.ddpm_variance.
    clip_x0: clip x̂_0 to [-1, 1] before forming the reverse mean.
  Returns:
    (bpd [B] float32, nfe: network evaluations per image, T or K).
  Raises:
    ValueError: the model's process is not ddpm.
  """
  if "vlb" not in model.process.spec.bpd_estimators:
    raise ValueError(f"vlb_bpd: the variational bound is DDPM's, but this model's "
                     f"diffusion.process is {model.config.diffusion.process}; use ode_bpd")
  images = _check_images(model, images_u8)
  labels = likelihood_labels(model, labels, images.shape[0])
  variance = model.config.sampling.ddpm_variance if variance is None else variance
  bpd = _vlb_bpd_jit(model, images, rng, labels,
                     num_terms=None if num_terms is None else int(num_terms),
                     variance=variance, clip_x0=bool(clip_x0))
  return bpd, model.process.num_timesteps if num_terms is None else int(num_terms)
