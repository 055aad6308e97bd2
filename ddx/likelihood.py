"""Likelihood in bits/dim: the probability-flow ODE estimate and the DDPM bound.

This module owns the process-agnostic math of likelihood evaluation; the
per-process adapters (the drift of DDPM's continuous limit, EDM, flow) and the
`--mode eval` wiring live with their callers.

Two estimators, two conventions for the data:

* `ode_log_likelihood` (score_sde, Song et al. 2021, App. D): the log-density
  of continuous data under the probability-flow ODE dx/dt = f(x, t), by the
  instantaneous change of variables (FFJORD)
      log p_0(x_0) = log p_T(x_T) + ∫_{t_0}^{t_T} div f(x(t), t) dt,
  the divergence exact (D Jacobian-vector products) or by the
  Skilling-Hutchinson estimator ε^T J ε. It is a density on [-1, 1]^D, so
  8-bit images are first dequantised, x = 2 (k + u)/256 - 1 with
  u ~ U[0, 1)^D (`dequantize`), and `bits_per_dim` adds the log-Jacobian of
  [0, 256)^D -> [-1, 1]^D. The result is an upper bound (in expectation over
  u) on the discrete model's bits/dim; score_sde reports 2.99 (CIFAR-10).

* DDPM's variational bound on the 8-bit data, `ddpm_vlb_terms`, is DDPM's
  (`ddx.processes.ddpm.vlb`); it uses `normal_kl` and the discretised
  Gaussian decoder here.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr


TRACES = ("hutchinson", "exact")
PROBES = ("rademacher", "gaussian")
SOLVERS = ("euler", "heun", "rk4", "adaptive")
VARIANCES = ("posterior", "beta")

# Network evaluations per step of each fixed-step solver.
_STAGES = {"euler": 1, "heun": 2, "rk4": 4}


# --------------------------------------------------------------------------
# Conventions: dequantisation and bits/dim.


def dequantize(images: jnp.ndarray, rng: jax.Array) -> jnp.ndarray:
  """Uniform dequantisation of 8-bit images into [-1, 1).

  x = 2 (k + u) / 256 - 1 with u ~ U[0, 1) per pixel, score_sde's convention:
  level k fills the cell [2k/256 - 1, 2(k+1)/256 - 1) of width 2/256. (ddx
  trains on k/127.5 - 1; the two scalings differ by < 1/256, as in
  score_sde, which trains on k/255 and evaluates on (k + u)/256.)

  Args:
    images: [B, ...] integer levels in 0..255 (uint8 or any integer dtype).
    rng: a PRNG key for u.
  Returns:
    x: [B, ...] float32 in [-1, 1).
  """
  if not jnp.issubdtype(jnp.asarray(images).dtype, jnp.integer):
    raise ValueError(
        f"dequantize: images must be integer 8-bit levels 0..255, got dtype "
        f"{jnp.asarray(images).dtype}; pass the raw uint8 images, not [-1, 1] floats")
  k = jnp.asarray(images).astype(jnp.float32)
  u = jax.random.uniform(rng, k.shape, jnp.float32)
  lo = k * (2.0 / 256.0) - 1.0               # exact in float32
  hi = lo + 2.0 / 256.0
  # lo + u·2/256 can round up onto the next cell's start when u is within
  # float32 round-off of 1; keep every value inside its own cell.
  return jnp.minimum(lo + u * (2.0 / 256.0), jnp.nextafter(hi, lo))


def bits_per_dim(logp_nats: jnp.ndarray, num_dims: int, *,
                 data_range: Sequence[float] = (-1.0, 1.0),
                 levels: int = 256) -> jnp.ndarray:
  """Bits/dim of the discrete data from a log-density of dequantised data.

  With y = k + u in [0, levels)^D (unit cells, one per discrete value) and
  x = lo + (hi - lo) y / levels the model's input, p_y(y) = p_x(x) |dx/dy|
  and log |dx/dy| = D log((hi - lo) / levels). So

      bpd = -(log p_x(x) / D + log((hi - lo) / levels)) / ln 2,

  i.e. for [-1, 1] and 256 levels, bpd = -log p_x / (D ln 2) + 7 (score_sde's
  offset). The uniform density 2^-D on [-1, 1]^D gives exactly 8 bits/dim.
  In expectation over u this bounds the discrete -log2 P(k) / D from above.

  Args:
    logp_nats: [B] (or any shape) float log p_x(x) in nats, summed over dims.
    num_dims: D, the number of dimensions per example (e.g. H * W * C).
    data_range: (lo, hi), the interval the dequantised data were mapped to.
    levels: the number of discrete values per dimension (256 for 8 bits).
  Returns:
    bits/dim, float32, shaped like logp_nats.
  """
  lo, hi = (float(v) for v in data_range)
  if not hi > lo:
    raise ValueError(f"bits_per_dim: data_range={tuple(data_range)} needs lo < hi")
  if int(num_dims) != num_dims or num_dims < 1:
    raise ValueError(f"bits_per_dim: num_dims={num_dims} must be a positive integer")
  if int(levels) != levels or levels < 2:
    raise ValueError(f"bits_per_dim: levels={levels} must be an integer >= 2")
  log_cell = math.log((hi - lo) / levels)
  logp = jnp.asarray(logp_nats, jnp.float32)
  return -(logp / num_dims + log_cell) / math.log(2.0)


def gaussian_logp(x: jnp.ndarray, scale: float = 1.0) -> jnp.ndarray:
  """log N(x; 0, scale² I) summed over all but the batch axis: a prior_logp_fn.

  Args:
    x: [B, ...] float.
    scale: the prior's standard deviation (1 for VP/flow, σ_max for EDM/VE).
  Returns:
    [B] float32 nats.
  """
  x = x.astype(jnp.float32).reshape(x.shape[0], -1)
  d = x.shape[1]
  return (-0.5 * jnp.sum(jnp.square(x), axis=1) / scale ** 2
          - d * (math.log(scale) + 0.5 * math.log(2 * math.pi)))


# --------------------------------------------------------------------------
# The probability-flow ODE log-likelihood.


def _check_ode_args(trace, probe, num_probes, solver, rtol, atol, trace_chunk,
                    max_steps, t_grid):
  if trace not in TRACES:
    raise ValueError(f"trace={trace!r} is unknown; use one of {TRACES}")
  if probe not in PROBES:
    raise ValueError(f"probe={probe!r} is unknown; use one of {PROBES}")
  if solver not in SOLVERS:
    raise ValueError(f"solver={solver!r} is unknown; use one of {SOLVERS}")
  if int(num_probes) != num_probes or num_probes < 1:
    raise ValueError(f"num_probes={num_probes} must be a positive integer")
  if trace_chunk is not None and (int(trace_chunk) != trace_chunk or trace_chunk < 1):
    raise ValueError(f"trace_chunk={trace_chunk} must be None or a positive integer")
  if not rtol > 0:
    raise ValueError(f"rtol={rtol} must be > 0 (a relative tolerance, e.g. 1e-5)")
  if not atol > 0:
    raise ValueError(f"atol={atol} must be > 0 (an absolute tolerance, e.g. 1e-5)")
  if int(max_steps) != max_steps or max_steps < 1:
    raise ValueError(f"max_steps={max_steps} must be a positive integer")
  shape = np.shape(t_grid)   # works for lists, arrays and tracers alike
  if len(shape) != 1 or shape[0] < 2:
    raise ValueError(f"t_grid must be a 1-D array of >= 2 times, got shape {shape}")


def _divergence_fn(drift_fn, trace, probes, trace_chunk):
  """Returns aug(x, t) -> (f(x, t) [B, ...] float32, div f [B] float32)."""

  def aug(x, t):
    # One linearisation, then a tangent per probe or basis vector: the
    # primal (the network's forward) is computed once per evaluation.
    f, f_jvp = jax.linearize(lambda y: drift_fn(y, t), x)
    b = x.shape[0]
    if trace == "hutchinson":
      jv = jax.vmap(f_jvp)(probes)                              # [K, B, ...]
      prod = (probes.astype(jnp.float32) * jv.astype(jnp.float32))
      div = jnp.mean(jnp.sum(prod.reshape(prod.shape[0], b, -1), axis=2), axis=0)
    else:
      d = math.prod(x.shape[1:])

      def diag_entry(j):
        # J e_j, its j-th component: the j-th diagonal entry, per example.
        e = jax.nn.one_hot(j, d, dtype=x.dtype).reshape(x.shape[1:])
        col = f_jvp(jnp.broadcast_to(e, x.shape)).reshape(b, d)
        return jnp.take(col, j, axis=1).astype(jnp.float32)     # [B]

      diag = jax.lax.map(diag_entry, jnp.arange(d), batch_size=trace_chunk or d)
      div = jnp.sum(diag, axis=0)
    return f.astype(jnp.float32), div
  return aug


def _tree_axpy(y, h, k):
  return jax.tree.map(lambda a, b: a + h * b, y, k)


def _fixed_step(aug, solver):
  """One step of the joint (x, ∫ div) ODE from t0 to t1 with a fixed solver."""

  def field(y, t):
    f, div = aug(y[0], t)
    return (f, div)

  def step(y, ts):
    t0, t1 = ts
    h = t1 - t0
    k1 = field(y, t0)
    if solver == "euler":
      return _tree_axpy(y, h, k1), None
    if solver == "heun":
      k2 = field(_tree_axpy(y, h, k1), t1)
      ks = jax.tree.map(lambda a, b: 0.5 * (a + b), k1, k2)
      return _tree_axpy(y, h, ks), None
    # rk4: the classical fourth-order Runge-Kutta.
    tm = t0 + 0.5 * h
    k2 = field(_tree_axpy(y, 0.5 * h, k1), tm)
    k3 = field(_tree_axpy(y, 0.5 * h, k2), tm)
    k4 = field(_tree_axpy(y, h, k3), t1)
    ks = jax.tree.map(lambda a, b, c, e: (a + 2 * b + 2 * c + e) / 6, k1, k2, k3, k4)
    return _tree_axpy(y, h, ks), None
  return step


def ode_log_likelihood(
    drift_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray],
    x: jnp.ndarray,
    t_grid: jnp.ndarray,
    prior_logp_fn: Callable[[jnp.ndarray], jnp.ndarray],
    rng: Optional[jax.Array] = None,
    *,
    trace: str = "hutchinson",
    probe: str = "rademacher",
    num_probes: int = 1,
    solver: str = "heun",
    trace_chunk: Optional[int] = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
):
  """log p(x) under the probability-flow ODE dx/dt = drift_fn(x, t).

  Integrates x and ∫ div drift jointly from t_grid[0] (the data side) to
  t_grid[-1] (the prior side), and returns
      log p(x) = prior_logp_fn(x_T) + ∫_{t_grid[0]}^{t_grid[-1]} div drift dt
  (the sign holds for either direction of time: the steps are signed).
  Fixed-step solvers run as one `lax.scan` over the grid; "adaptive" is
  diffrax's Tsit5 with a PID step-size controller between the grid's ends.

  Assumption: drift_fn acts on each example independently (no batch norm or
  attention across the batch). Then the Jacobian of the batched drift is
  block-diagonal, and one jvp with a batched tangent gives every example's
  own J_b v_b: ε_b^T J_b ε_b carries no cross-example terms.

  Divergence: "exact" sums the diagonal of J through D jvps (basis vectors,
  `trace_chunk` of them vectorised at a time), for small images.
  "hutchinson" is Skilling-Hutchinson, div ≈ mean_k ε_k^T J ε_k with
  `num_probes` Rademacher or standard-normal probes per example, drawn once
  per trajectory and fixed along it (score_sde): the ∫ div estimate is then
  ε^T (∫ J dt) ε, unbiased for the exact ∫ div.

  Args:
    drift_fn: (x [B, ...] float32, t scalar float32) -> dx/dt [B, ...].
    x: [B, ...] float32 data (dequantised and scaled, e.g. `dequantize`).
    t_grid: [N + 1] float32 times, t_grid[0] data side, t_grid[-1] prior side;
      the fixed solvers take the N steps between consecutive entries, the
      adaptive one uses only the two ends.
    prior_logp_fn: x_T [B, ...] -> [B] log-density of the prior in nats.
    rng: PRNG key for the probes (unused, may be None, with trace="exact").
    trace: hutchinson | exact.
    probe: rademacher | gaussian (hutchinson only).
    num_probes: probes per example, averaged (hutchinson only).
    solver: euler | heun | rk4 | adaptive.
    trace_chunk: exact trace: basis directions per vectorised batch of jvps
      (None: all D at once; smaller uses less memory).
    rtol, atol: adaptive only: diffrax PIDController tolerances, > 0.
    max_steps: adaptive only: the solver's step budget (errors if exceeded).
  Returns:
    (logp [B] float32 nats, nfe): nfe is the number of evaluations of the
    joint dynamics, each one drift linearisation plus num_probes (or D)
    jvp tangents; a Python int for the fixed solvers, an int32 scalar array
    for "adaptive" (6 per attempted step plus 1, from diffrax's step count).
  """
  _check_ode_args(trace, probe, num_probes, solver, rtol, atol, trace_chunk,
                  max_steps, t_grid)
  x = jnp.asarray(x, jnp.float32)
  t_grid = jnp.asarray(t_grid, jnp.float32)
  probes = None
  if trace == "hutchinson":
    if rng is None:
      raise ValueError("rng is None: trace='hutchinson' needs a PRNG key for its probes")
    shape = (num_probes,) + x.shape
    if probe == "rademacher":
      probes = jax.random.rademacher(rng, shape, jnp.float32)
    else:
      probes = jax.random.normal(rng, shape, jnp.float32)
  aug = _divergence_fn(drift_fn, trace, probes, trace_chunk)
  y0 = (x, jnp.zeros((x.shape[0],), jnp.float32))

  if solver == "adaptive":
    (x_t, int_div), nfe = _adaptive(aug, y0, t_grid[0], t_grid[-1], rtol, atol,
                                    max_steps)
  else:
    (x_t, int_div), _ = jax.lax.scan(_fixed_step(aug, solver), y0,
                                     (t_grid[:-1], t_grid[1:]))
    nfe = _STAGES[solver] * (t_grid.shape[0] - 1)
  logp = prior_logp_fn(x_t).astype(jnp.float32) + int_div
  return logp, nfe


def _adaptive(aug, y0, t0, t1, rtol, atol, max_steps):
  """Tsit5 + PID control through diffrax (optional dependency, imported here)."""
  try:
    import diffrax  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(
        "solver='adaptive' needs diffrax: pip install 'ddx[likelihood]' "
        "(or pip install diffrax), or use solver='rk4'") from e
  term = diffrax.ODETerm(lambda t, y, args: aug(y[0], t))
  sol = diffrax.diffeqsolve(
      term, diffrax.Tsit5(), t0=t0, t1=t1, dt0=None, y0=y0,
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
      saveat=diffrax.SaveAt(t1=True), max_steps=max_steps)
  y1 = jax.tree.map(lambda a: a[0], sol.ys)
  # Tsit5 is FSAL: 6 new evaluations per attempted step, plus the one at t0
  # (shared by the first-step-size choice and the first step); the tests
  # check this against a drift that counts its calls.
  nfe = 6 * sol.stats["num_steps"] + 1
  return y1, nfe


# --------------------------------------------------------------------------
# The DDPM variational bound.


def normal_kl(mean1, logvar1, mean2, logvar2) -> jnp.ndarray:
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats.

  All arguments broadcast against each other.
  """
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: jnp.ndarray, mean: jnp.ndarray,
                                        log_scale: jnp.ndarray) -> jnp.ndarray:
  """log P(x) of 8-bit data under a Gaussian integrated over x's bin.

  The 256 levels 2k/255 - 1 in [-1, 1] own bins of width 2/255 centred on
  them; the end bins extend to -inf and +inf, so the 256 probabilities sum to
  one (DDPM's decoder, Ho et al. 2020 Eq. 13). The CDF differences are
  computed in log space with the exact normal CDF, stable in both tails
  (DDPM's code uses a tanh approximation and a 1e-12 floor).

  Args:
    x: [B, ...] float data on the levels 2k/255 - 1.
    mean: the Gaussian's mean, broadcastable to x.
    log_scale: log of its standard deviation, broadcastable to x.
  Returns:
    [B, ...] float32 log-probabilities in nats (per element, not summed).
  """
  x = jnp.asarray(x, jnp.float32)
  inv_std = jnp.exp(-jnp.asarray(log_scale, jnp.float32))
  centred = x - mean
  hi = inv_std * (centred + 1.0 / 255.0)   # upper bin edge, standardised
  lo = inv_std * (centred - 1.0 / 255.0)   # lower bin edge
  log_cdf_hi = log_ndtr(hi)                # the bottom bin: P(z < hi)
  log_sf_lo = log_ndtr(-lo)                # the top bin: P(z > lo)
  # Middle bins: log(Φ(hi) - Φ(lo)); reflect bins above the mean so the
  # difference is always taken between lower-tail CDFs (no 1 - 1 round-off).
  flip = (lo + hi) > 0
  a = jnp.where(flip, -hi, lo)
  b = jnp.where(flip, -lo, hi)
  log_b = log_ndtr(b)
  log_mid = log_b + jnp.log(-jnp.expm1(log_ndtr(a) - log_b))
  return jnp.where(x < -0.999, log_cdf_hi, jnp.where(x > 0.999, log_sf_lo, log_mid))


def sigma_ode(denoise_fn, sigma_min: float, sigma_max: float, steps: int):
  """The probability-flow ODE of x = y + σn in u = log σ (`ddx.bpd`): EDM's, and DDPM's through its VP mapping.

  dx/du = σ·dx/dσ = x − D(x; e^u) (EDM Eq. 3, s = 1, σ(t) = t), from σ_min to
  σ_max; prior N(0, σ_max² I).

  Args:
    denoise_fn: D(x [B, ...], σ float32 [B]) -> [B, ...].
    sigma_min, sigma_max: the ends, 0 < σ_min < σ_max.
    steps: N, steps uniform in log σ.
  Returns:
    (drift(x, u), grid float64 [N + 1], prior_logp(x), data-side scale 1).
  """
  def drift(x, u):
    s = jnp.full((x.shape[0],), jnp.exp(u), jnp.float32)
    return x - denoise_fn(x, s).astype(jnp.float32)
  grid = np.linspace(math.log(sigma_min), math.log(sigma_max), steps + 1)
  prior = functools.partial(gaussian_logp, scale=sigma_max)
  return drift, grid, prior, 1.0
