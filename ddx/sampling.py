"""Samplers: DDPM ancestral, DDIM (with η) and DPM-Solver++(2M), each one `lax.scan`.

A sampler walks a descending sequence of array indices i_S > ... > i_1 = 0 and
finally steps from i = 0 to ᾱ = 1, the clean image. Every sampler here uses
the same sequence (DDIM's uniform skip): k = T // steps and
i_j = (j - 1)·k for j = S..1, so with T = 1000, steps = 50 it visits
980, 960, ..., 20, 0. With steps = T this is every step, T-1, ..., 0.
When T is not a multiple of steps the walk starts at (steps - 1)·k < T - 1.

A whole trajectory is one `lax.scan`, so under `jax.jit` it is one XLA program
whose size and compile time do not grow with `steps`.

`denoise_fn(x_t, i) -> out` takes x_t [B, ...] and i int32 [B] and returns the
network output in the `prediction` parameterisation (ε by default).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ddx import diffusion
from ddx import parallel
from ddx import schedules
from ddx.models import UNet
from ddx.schedules import Schedule

DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


SPACINGS = ("uniform", "logsnr")


def timesteps(num_timesteps: int, steps: int, spacing: str = "uniform",
              sched: Optional[Schedule] = None) -> np.ndarray:
  """The descending array indices a sampler visits.

  Args:
    num_timesteps: T of the schedule.
    steps: number of network evaluations S, 1 <= S <= T.
    spacing: "uniform": DDIM's uniform skip (see the module docstring).
      "logsnr": indices nearest to points evenly spaced in half-log-SNR
      λ = log(√ᾱ/√(1-ᾱ)) from λ(T-1) to λ(0) (DPM-Solver's choice for small
      images), nudged so they stay strictly descending; needs `sched`.
    sched: the schedule, for spacing="logsnr".
  Returns:
    int32 [S], strictly descending, from <= T-1 down to 0 (logsnr with S = 1
    gives [T-1]: one step from pure noise).
  """
  if int(steps) != steps or not 1 <= steps <= num_timesteps:
    raise ValueError(
        f"sampling steps must be an integer in [1, T={num_timesteps}], got {steps}")
  if spacing == "uniform":
    k = num_timesteps // steps
    return (np.arange(steps, dtype=np.int32) * k)[::-1].copy()
  if spacing != "logsnr":
    raise ValueError(f"spacing={spacing!r} is unknown; use one of {SPACINGS}")
  try:
    a = np.asarray(sched.alphas_cumprod, np.float64)
  except jax.errors.TracerArrayConversionError:
    raise ValueError("spacing='logsnr' needs the schedule's values at trace time: "
                     "close over a schedule built outside jit instead of passing "
                     "it as a jit argument, or use spacing='uniform'") from None
  lam = 0.5 * (np.log(a) - np.log1p(-a))          # decreasing in the index
  grid = np.linspace(lam[-1], lam[0], steps)       # from noisy to clean
  out = []
  for j, g in enumerate(grid):
    i = int(np.argmin(np.abs(lam - g)))
    if out:
      i = min(i, out[-1] - 1)
    out.append(max(i, steps - 1 - j))              # leave room for the rest
  return np.asarray(out, np.int32)


class Step(NamedTuple):
  """What a sampler step gets: indices and ᾱ of the current and next point."""
  i: jnp.ndarray        # int32 scalar, current index
  a_t: jnp.ndarray      # ᾱ at i
  a_s: jnp.ndarray      # ᾱ at the next index (1.0 after the last step)
  last: jnp.ndarray     # bool scalar, this step lands on the clean image
  key: jax.Array        # PRNG key for this step's noise


def _ddpm_step(carry, x0, eps, x, st: Step, *, eta, variance):
  """Ancestral step x_t -> x_s from q(x_s | x_t, x̂_0) (DDPM Eq. 6-7, Alg. 2).

  Over a respaced sequence the step uses the effective β = 1 - ᾱ_t/ᾱ_s, so
  with steps = T it is exactly DDPM; variance "posterior" is σ² = β̃,
  "beta" is σ² = β. No noise is added on the last step (z = 0 at t = 1).
  """
  del eps, eta
  beta = 1.0 - st.a_t / st.a_s
  c0 = jnp.sqrt(st.a_s) * beta / (1.0 - st.a_t)
  ct = jnp.sqrt(1.0 - beta) * (1.0 - st.a_s) / (1.0 - st.a_t)
  mean = c0 * x0 + ct * x
  var = beta * (1.0 - st.a_s) / (1.0 - st.a_t) if variance == "posterior" else beta
  sigma = jnp.where(st.last, 0.0, jnp.sqrt(var))
  return carry, mean + sigma * jax.random.normal(st.key, x.shape, x.dtype)


def _ddim_step(carry, x0, eps, x, st: Step, *, eta, variance):
  """DDIM step (Song et al. 2021, Eq. 12) with σ = η·√((1-ᾱ_s)/(1-ᾱ_t))·√(1-ᾱ_t/ᾱ_s)."""
  del x, variance
  sigma = eta * jnp.sqrt((1.0 - st.a_s) / (1.0 - st.a_t) * (1.0 - st.a_t / st.a_s))
  dir_xt = jnp.sqrt(jnp.maximum(1.0 - st.a_s - sigma ** 2, 0.0)) * eps
  x_s = jnp.sqrt(st.a_s) * x0 + dir_xt
  return carry, x_s + sigma * jax.random.normal(st.key, x0.shape, x0.dtype)


def _half_log_snr(a):
  """λ = log(√ᾱ / √(1-ᾱ)); ᾱ is clipped below 1 so λ stays finite."""
  a = jnp.minimum(a, 1.0 - 1e-7)
  return 0.5 * (jnp.log(a) - jnp.log1p(-a))


def _dpmpp_2m_step(carry, x0, eps, x, st: Step, *, eta, variance):
  """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): multistep, data prediction.

  x_s = (σ_s/σ_t) x_t - α_s (e^{-h} - 1) D with h = λ_s - λ_t and
  D = (1 + 1/(2r)) x̂_0 - 1/(2r) x̂_0_prev, r = h_prev / h; the first step
  uses D = x̂_0 (first order), and the last step returns x̂_0 (σ_s = 0).
  """
  del eps, eta, variance
  x0_prev, h_prev, n = carry
  lam_t, lam_s = _half_log_snr(st.a_t), _half_log_snr(st.a_s)
  h = lam_s - lam_t
  r = h_prev / h
  second = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
  d = jnp.where(n > 0, second, x0)
  x_s = (jnp.sqrt((1.0 - st.a_s) / (1.0 - st.a_t)) * x
         - jnp.sqrt(st.a_s) * jnp.expm1(-h) * d)
  x_s = jnp.where(st.last, x0, x_s)
  return (x0, h, n + 1), x_s


class _Sampler(NamedTuple):
  step: Callable
  init_carry: Callable[[jnp.ndarray], Any]
  spacing: str          # default timestep spacing


# DPM-Solver++(2M) defaults to log-SNR spacing: with the uniform skip on a
# linear schedule its step-size ratios swing widely and the multistep
# extrapolation lost to DDIM on a Gaussian test (tests/test_sampling.py).
SAMPLERS = {
    "ddpm": _Sampler(_ddpm_step, lambda x: (), "uniform"),
    "ddim": _Sampler(_ddim_step, lambda x: (), "uniform"),
    "dpm_solver_pp": _Sampler(
        _dpmpp_2m_step,
        lambda x: (jnp.zeros_like(x), jnp.ones((), x.dtype), jnp.zeros((), jnp.int32)),
        "logsnr"),
}
DDPM_VARIANCES = ("posterior", "beta")


def initial_noise(rng: jax.Array, shape) -> jnp.ndarray:
  """The x_T that `sample` draws from `rng` when no x_T is given."""
  return jax.random.normal(jax.random.split(rng)[0], tuple(shape), jnp.float32)


def sample(denoise_fn: DenoiseFn, sched: Schedule, rng: jax.Array, shape,
           sampler: str = "ddim", steps: int = 50, eta: float = 0.0,
           x_T: Optional[jnp.ndarray] = None, clip_x0: bool = False,
           prediction: str = "eps", ddpm_variance: str = "posterior",
           spacing: Optional[str] = None, return_trajectory: bool = False):
  """Runs a sampler from noise to data as one `lax.scan`.

  Pure and jit-composable: call it inside your own `jax.jit`, with weights
  flowing in as arguments of that jit (through the closure in `denoise_fn`).

  Args:
    denoise_fn: `denoise_fn(x_t, i) -> [B, ...]`, i int32 [B] in [0, T).
    sched: the noise schedule the model was trained with.
    rng: PRNG key for the starting noise and the per-step noise.
    shape: shape of the sample batch, e.g. (B, H, W, C).
    sampler: "ddpm" (ancestral), "ddim" or "dpm_solver_pp" (2M).
    steps: number of network evaluations, 1 <= steps <= T (static).
    eta: DDIM η; 0 is deterministic, 1 matches the ancestral variance.
    x_T: optional starting noise [shape]; drawn from rng when None.
    clip_x0: clip x̂_0 to [-1, 1] at every step (ε̂ is recomputed from it).
    prediction: what denoise_fn returns: eps | x0 | v.
    ddpm_variance: for "ddpm": "posterior" (σ² = β̃, default) or "beta" (σ² = β).
    spacing: "uniform" | "logsnr" (see `timesteps`); None picks the sampler's
      default (uniform for ddpm/ddim, logsnr for dpm_solver_pp).
    return_trajectory: also return the states after every step, [S, *shape]
      (memory grows with steps; off by default).
  Returns:
    x_0 [shape] float32 (not clipped unless clip_x0), or (x_0, trajectory).
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler={sampler!r} is unknown; use one of {tuple(SAMPLERS)}")
  if ddpm_variance not in DDPM_VARIANCES:
    raise ValueError(
        f"ddpm_variance={ddpm_variance!r} is unknown; use one of {DDPM_VARIANCES}")
  if prediction not in diffusion.PREDICTIONS:
    raise ValueError(
        f"prediction={prediction!r} is unknown; use one of {diffusion.PREDICTIONS}")
  shape = tuple(shape)
  spec = SAMPLERS[sampler]
  seq = timesteps(sched.num_timesteps, steps, spacing or spec.spacing, sched)
  step_key = jax.random.split(rng)[1]
  x = (initial_noise(rng, shape) if x_T is None
       else jnp.asarray(x_T, jnp.float32).reshape(shape))
  step_fn = functools.partial(spec.step, eta=eta, variance=ddpm_variance)

  idx = jnp.asarray(seq)
  nxt = jnp.asarray(np.concatenate([seq[1:], [-1]]).astype(np.int32))
  xs = (idx, nxt, jax.random.split(step_key, len(seq)))

  def body(state, inp):
    carry, x = state
    i, i_next, key = inp
    a_t = sched.alphas_cumprod[i]
    a_s = jnp.where(i_next >= 0, sched.alphas_cumprod[jnp.maximum(i_next, 0)], 1.0)
    out = denoise_fn(x, jnp.full((shape[0],), i, jnp.int32)).astype(jnp.float32)
    x0, eps = diffusion.to_x0_eps(out, x, a_t, prediction)
    if clip_x0:
      x0 = jnp.clip(x0, -1.0, 1.0)
      eps = diffusion.eps_from_x0(x, x0, a_t)
    carry, x = step_fn(carry, x0, eps, x, Step(i, a_t, a_s, i_next < 0, key))
    return (carry, x), (x if return_trajectory else None)

  (_, x), traj = jax.lax.scan(body, (spec.init_carry(x), x), xs)
  return (x, traj) if return_trajectory else x


# --------------------------------------------------------------------------
# A trained model as one pytree, and sampling from it.


@flax.struct.dataclass
class Model:
  """A trained network: weights as pytree leaves, its config as static data.

  `variables` is the Flax variables dict ({"params": ...}, EMA weights when
  loaded by `ddx.load`; plus "batch_stats", BatchNorm's running statistics,
  for a model.norm = batch network, which sampling normalises with).
  `config` is the run's frozen, hashable config
  (ml_collections.FrozenConfigDict) and says the network, the schedule and the
  image shape, so `sample_fn(model, rng)` needs nothing else and jit caches one
  program per (config, shapes, static sampling options).
  """
  variables: Any
  config: Any = flax.struct.field(pytree_node=False)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    d = self.config.data
    return (d.image_size, d.image_size, d.channels)

  @property
  def schedule(self) -> Schedule:
    # Concrete even inside a jit trace: the schedule is a function of the
    # static config, and samplers may need its values (log-SNR spacing).
    with jax.ensure_compile_time_eval():
      return schedules.from_config(self.config.diffusion)

  def network(self):
    return UNet(**self.config.model)


def _denoiser(model: Model, labels, guidance_scale, guided: bool) -> DenoiseFn:
  """Wraps the network as denoise_fn, with classifier-free guidance if asked.

  With guidance the conditional and unconditional outputs come from one
  network call on a doubled batch: out = u + w·(c - u). Every prediction
  conversion is affine in the output for fixed x_t, so guiding the raw output
  is the same as guiding ε.
  """
  net = model.network()
  if labels is None:
    return lambda x, i: net.apply(model.variables, x, i)
  if not guided:
    return lambda x, i: net.apply(model.variables, x, i, labels)
  null = jnp.full_like(labels, model.config.model.num_classes)

  def f(x, i):
    out = net.apply(model.variables, jnp.concatenate([x, x]),
                    jnp.concatenate([i, i]), jnp.concatenate([labels, null]))
    c, u = jnp.split(out, 2)
    return u + guidance_scale * (c - u)
  return f


@functools.partial(
    jax.jit,
    static_argnames=("num_samples", "steps", "sampler", "clip_x0", "guided",
                     "ddpm_variance", "return_trajectory"))
def _sample_jit(model, rng, labels, guidance_scale, eta, x_T, *, num_samples,
                steps, sampler, clip_x0, guided, ddpm_variance, return_trajectory):
  fn = _denoiser(model, labels, guidance_scale, guided)
  shape = (num_samples,) + model.image_shape
  if x_T is None:
    x_T = initial_noise(rng, shape)
  # Split the sample batch over all devices when it divides evenly; the
  # scan carry inherits the sharding, so every step runs data-parallel.
  mesh = parallel.make_mesh()
  if parallel.num_data_shards(mesh) > 1 and num_samples % parallel.num_data_shards(mesh) == 0:
    x_T = jax.lax.with_sharding_constraint(x_T, parallel.data_sharded(mesh))
  res = sample(fn, model.schedule, rng, shape,
               sampler=sampler, steps=steps, eta=eta, x_T=x_T, clip_x0=clip_x0,
               prediction=model.config.diffusion.prediction,
               ddpm_variance=ddpm_variance, return_trajectory=return_trajectory)
  x, traj = res if return_trajectory else (res, None)
  x = jnp.clip(x, -1.0, 1.0)
  return (x, traj) if return_trajectory else x


def resolve_labels(model: Model, labels, num_samples: int):
  """The class labels to condition on: checked ones, or classes 0, 1, ... cycled.

  Returns None for an unconditional model (and rejects labels given to one).
  """
  num_classes = model.config.model.num_classes
  if num_classes > 0:
    if labels is None:
      labels = jnp.arange(num_samples, dtype=jnp.int32) % num_classes
    labels = jnp.asarray(labels, jnp.int32)
    if labels.shape != (num_samples,):
      raise ValueError(f"labels must have shape ({num_samples},), got {labels.shape}")
  elif labels is not None:
    raise ValueError("labels were given but the model is unconditional "
                     "(model.num_classes = 0)")
  return labels


def sample_fn(model: Model, rng: jax.Array, steps: Optional[int] = None, *,
              num_samples: Optional[int] = None, sampler: Optional[str] = None,
              eta: Optional[float] = None, labels=None,
              guidance_scale: Optional[float] = None,
              clip_x0: Optional[bool] = None, x_T=None,
              ddpm_variance: Optional[str] = None,
              return_trajectory: bool = False):
  """Samples images from a trained model; the whole trajectory is one jitted program.

  Defaults come from `model.config.sampling`. The model pytree is a jit
  argument (weights are never baked in as constants), so calls with the same
  shapes and static options reuse the compiled program.

  Args:
    model: what `ddx.load(workdir)` returns (or a `ddx.Model` you build).
    rng: PRNG key; same key and inputs -> the same images, bit for bit.
    steps: network evaluations (default config.sampling.steps).
    num_samples: batch size N (default config.sampling.num_samples, or
      len(labels), or x_T.shape[0]).
    sampler: ddpm | ddim | dpm_solver_pp.
    eta: DDIM η.
    labels: int [N] class labels for a class-conditional model; None draws
      classes 0, 1, ..., num_classes-1, 0, 1, ... for a conditional model.
    guidance_scale: classifier-free guidance w in out = u + w·(c - u);
      w = 1 is plain conditional sampling, w = 0 unconditional.
    clip_x0: clip x̂_0 to [-1, 1] at each step.
    x_T: optional starting noise [N, H, W, C].
    ddpm_variance: posterior | beta, for the ddpm sampler.
    return_trajectory: also return every intermediate state.
  Returns:
    images float32 [N, H, W, C] in [-1, 1] (and the trajectory if asked).
  """
  s = model.config.sampling
  steps = s.steps if steps is None else steps
  sampler = s.sampler if sampler is None else sampler
  eta = s.eta if eta is None else eta
  clip_x0 = s.clip_x0 if clip_x0 is None else clip_x0
  ddpm_variance = s.ddpm_variance if ddpm_variance is None else ddpm_variance
  w = s.guidance_scale if guidance_scale is None else guidance_scale
  if num_samples is None:
    if labels is not None:
      num_samples = len(labels)
    elif x_T is not None:
      num_samples = x_T.shape[0]
    else:
      num_samples = s.num_samples
  labels = resolve_labels(model, labels, num_samples)
  guided = labels is not None and float(w) != 1.0
  return _sample_jit(model, rng, labels, jnp.float32(w), jnp.float32(eta), x_T,
                     num_samples=int(num_samples), steps=int(steps),
                     sampler=sampler, clip_x0=bool(clip_x0), guided=guided,
                     ddpm_variance=ddpm_variance,
                     return_trajectory=bool(return_trajectory))


def to_uint8(images: jnp.ndarray) -> np.ndarray:
  """Maps float images in [-1, 1] to uint8 [0, 255] (round to nearest)."""
  x = parallel.gather(images).astype(np.float32)   # every process gets all images
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
