"""Samplers of the discrete DDPM process: ancestral, DDIM (with η), DPM-Solver++(2M).

A sampler walks a descending sequence of array indices i_S > ... > i_1 (the
`spacing`, see `timesteps`) and finally steps from i_1 to ᾱ = 1, the clean
image. A whole trajectory is one `lax.scan`, so under `jax.jit` it is one XLA
program whose size and compile time do not grow with `steps`.

`denoise_fn(x_t, i) -> out` takes x_t [B, ...] and i int32 [B] and returns the
network output in the `prediction` parameterisation (ε by default).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddx.processes.ddpm import core as diffusion
from ddx.processes.ddpm.schedules import Schedule
from ddx.sampling import steps as steps_lib
from ddx.sampling.steps import initial_noise

DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]

# Which T-step indices S network evaluations visit (README: Samplers).
SPACINGS = ("uniform", "trailing", "quadratic", "logsnr")


def _concrete(sched: Schedule) -> np.ndarray:
  try:
    return np.asarray(sched.alphas_cumprod, np.float64)
  except jax.errors.TracerArrayConversionError:
    raise ValueError("spacing='logsnr' needs the schedule's values at trace time: "
                     "close over a schedule built outside jit instead of passing "
                     "it as a jit argument, or use another spacing") from None


def _strictly_descending(ascending: np.ndarray, top: int) -> np.ndarray:
  """Nudges an ascending index sequence so that it strictly increases within [0, top]."""
  out = np.asarray(ascending, np.int64).copy()
  n = len(out)
  for j in range(n):                      # no repeats: each index at least one above the last
    if j and out[j] <= out[j - 1]:
      out[j] = out[j - 1] + 1
  for j in reversed(range(n)):            # and room left at the top
    out[j] = min(out[j], top - (n - 1 - j))
  return out[::-1].astype(np.int32)


def timesteps(num_timesteps: int, steps: int, spacing: str = "uniform",
              sched: Optional[Schedule] = None) -> np.ndarray:
  """The descending array indices a sampler visits (then it steps to ᾱ = 1).

  Args:
    num_timesteps: T of the schedule.
    steps: number of network evaluations S, 1 <= S <= T.
    spacing:
      "uniform": DDIM's uniform skip (diffusers' "leading"): k = T // S and
        i_j = (j-1)·k, so T = 1000, S = 50 visits 980, 960, ..., 20, 0. It
        never starts at T-1: S = 1 visits only 0 and returns the noise.
      "trailing": Lin et al. (2024, Table 2): i_j = round(j·T/S) - 1, so it
        always starts at T-1 (pure noise); S = 50: 999, 979, ..., 19.
      "quadratic": the DDIM paper's CIFAR-10 setting (its Table 1):
        i = floor(c²) for c evenly spaced in [0, √(0.8·T)], made strictly
        increasing (DDIM's code repeats small indices from S ≈ 60 on, which
        are no-op steps; ddx moves them up by one instead).
      "logsnr": indices nearest to points evenly spaced in half-log-SNR
        λ = log(√ᾱ/√(1-ᾱ)) from λ(T-1) to λ(0) (DPM-Solver's choice for small
        images), made strictly descending; needs `sched`.
    sched: the schedule, for spacing="logsnr".
  Returns:
    int32 [S], strictly descending, each in [0, T-1].
  """
  if int(steps) != steps or not 1 <= steps <= num_timesteps:
    raise ValueError(
        f"sampling steps must be an integer in [1, T={num_timesteps}], got {steps}")
  steps, top = int(steps), num_timesteps - 1
  if spacing == "uniform":
    k = num_timesteps // steps
    return (np.arange(steps, dtype=np.int32) * k)[::-1].copy()
  if spacing == "trailing":
    up = np.round(np.arange(1, steps + 1) * (num_timesteps / steps)).astype(np.int64) - 1
    return _strictly_descending(up, top)
  if spacing == "quadratic":
    up = np.floor(np.linspace(0.0, np.sqrt(0.8 * num_timesteps), steps) ** 2)
    return _strictly_descending(up, top)
  if spacing != "logsnr":
    raise ValueError(f"spacing={spacing!r} is unknown; use one of {SPACINGS}")
  if sched is None:
    raise ValueError("spacing='logsnr' needs the schedule: pass sched=, or use "
                     "another spacing")
  a = _concrete(sched)
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
  """DPM-Solver++(2M) over the index walk (`steps.dpm_solver_pp_2m`): λ is
  the half-log-SNR of ᾱ, σ_s/σ_t = √((1-ᾱ_s)/(1-ᾱ_t)) and α_s = √ᾱ_s."""
  del eps, eta, variance
  h = _half_log_snr(st.a_s) - _half_log_snr(st.a_t)
  return steps_lib.dpm_solver_pp_2m(
      carry, x, x0, h, jnp.sqrt((1.0 - st.a_s) / (1.0 - st.a_t)), jnp.sqrt(st.a_s),
      st.last)


class _Sampler(NamedTuple):
  step: Callable
  init_carry: Callable[[jnp.ndarray], Any]
  spacing: str          # default timestep spacing


# Default spacings, chosen on the digits metric at 1-20 steps (BENCHMARKS.md,
# "Timestep spacing"): trailing starts from pure noise and was never worse than
# uniform. DPM-Solver++(2M) keeps log-SNR: with the uniform skip on a linear
# schedule its step-size ratios swing widely and the multistep extrapolation
# lost to DDIM on a Gaussian test (tests/test_sampling.py).
SAMPLERS = {
    "ddpm": _Sampler(_ddpm_step, lambda x: (), "trailing"),
    "ddim": _Sampler(_ddim_step, lambda x: (), "trailing"),
    "dpm_solver_pp": _Sampler(
        _dpmpp_2m_step, steps_lib.dpm_solver_pp_2m_init, "logsnr"),
}
DDPM_VARIANCES = ("posterior", "beta")


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
    spacing: one of SPACINGS (see `timesteps`); None picks the sampler's
      default (`SAMPLERS[sampler].spacing`).
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
