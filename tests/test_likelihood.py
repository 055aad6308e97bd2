"""Likelihood math against closed forms: Gaussian data, NumPy sums, uniform bits.

ODE tests use Gaussian data x_0 ~ N(mu, Σ) with a full covariance Σ = Q S² Qᵀ
(so the Jacobian of the drift is not diagonal and Rademacher probes have a
variance), whose probability-flow drifts and marginal densities are exact:
  EDM form, in u = log σ: x_σ ~ N(mu, Σ + σ² I),
    dx/du = σ (x - D(x; σ)) = σ² (Σ + σ² I)⁻¹ (x - mu);
  flow form, x_t = (1 - t) x_0 + t n: x_t ~ N((1 - t) mu, (1 - t)² Σ + t² I),
    v(x, t) = -mu + Q diag((t - (1 - t) s²) / v²) Qᵀ (x - (1 - t) mu),
    v² = (1 - t)² s² + t².
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from ddx import likelihood as lk
from ddx.processes.ddpm import vlb
from ddx.processes.ddpm import schedules
import testutils

# --- Gaussian data in D = 16 dimensions, shaped [B, 2, 2, 4] ---------------
D = 16
SHAPE = (2, 2, 4)
_RS = np.random.RandomState(0)
Q = np.linalg.qr(_RS.randn(D, D))[0]
S = np.linspace(0.2, 1.0, D)                 # the data's standard deviations
MU = _RS.uniform(-0.5, 0.5, D)
X0 = MU + (_RS.randn(8, D) * S) @ Q.T        # 8 draws from the data
SIG_MIN, SIG_MAX = 0.002, 80.0
T_EPS = 1e-3                                 # the flow's data-side time

_Q, _S, _MU = (jnp.asarray(a, jnp.float32) for a in (Q, S, MU))


def _np_logn(x, mean, var_eig):
  """log N(x; mean, Q diag(var_eig) Qᵀ) in float64, x [B, D]."""
  z = (x - mean) @ Q
  return -0.5 * np.sum(z ** 2 / var_eig, 1) - 0.5 * np.sum(np.log(2 * np.pi * var_eig))


def _apply_eig(x, scale_eig, shift):
  """Q diag(scale_eig) Qᵀ (x - shift) on x [B, 2, 2, 4]."""
  y = (x.reshape(x.shape[0], -1) - shift) @ _Q
  return ((y * scale_eig) @ _Q.T).reshape(x.shape)


def edm_drift_logsig(x, u):
  sig = jnp.exp(u)
  return _apply_eig(x, sig ** 2 / (_S ** 2 + sig ** 2), _MU)


def edm_prior(x):
  y = (x.reshape(x.shape[0], -1) - _MU) @ _Q
  var = _S ** 2 + SIG_MAX ** 2
  return -0.5 * jnp.sum(y ** 2 / var, 1) - 0.5 * jnp.sum(jnp.log(2 * jnp.pi * var))


def flow_drift(x, t):
  v2 = (1 - t) ** 2 * _S ** 2 + t ** 2
  return _apply_eig(x, (t - (1 - t) * _S ** 2) / v2, (1 - t) * _MU) - _MU.reshape(SHAPE)


def flow_prior(x):
  return lk.gaussian_logp(x, 1.0)


EDM_GRID = lambda n: np.linspace(np.log(SIG_MIN), np.log(SIG_MAX), n + 1)
FLOW_GRID = lambda n: np.linspace(T_EPS, 1.0, n + 1)
EDM_EXACT = _np_logn(X0, MU, S ** 2 + SIG_MIN ** 2)
FLOW_EXACT = _np_logn(X0, (1 - T_EPS) * MU, (1 - T_EPS) ** 2 * S ** 2 + T_EPS ** 2)
CASES = {"edm": (edm_drift_logsig, edm_prior, EDM_GRID, EDM_EXACT),
         "flow": (flow_drift, flow_prior, FLOW_GRID, FLOW_EXACT)}


def _x(x0=X0):
  return jnp.asarray(x0.reshape((-1,) + SHAPE), jnp.float32)


def _exact_ll(case, solver, steps, **kw):
  drift, prior, grid, _ = CASES[case]
  fn = jax.jit(lambda x, g: lk.ode_log_likelihood(drift, x, g, prior, None,
                                                  trace="exact", solver=solver, **kw))
  return fn(_x(), jnp.asarray(grid(steps), jnp.float32))


# --- ODE log-likelihood, exact trace ------------------------------------------

@pytest.mark.parametrize("case,solver,steps,tol", [
    ("edm", "rk4", 48, 1e-3),    # log σ from 0.002 to 80
    ("flow", "heun", 128, 1e-3),
    ("flow", "rk4", 16, 1e-3),
    ("flow", "euler", 512, 1e-2),  # first order: ~1700 steps for 1e-3
])
def test_ode_exact_trace_matches_gaussian_density(case, solver, steps, tol):
  logp, nfe = _exact_ll(case, solver, steps)
  err = np.abs(np.asarray(logp, np.float64) - CASES[case][3]) / D
  assert err.max() < tol, err
  assert nfe == {"euler": 1, "heun": 2, "rk4": 4}[solver] * steps


def test_exact_trace_of_a_nonlinear_drift_per_example():
  """One Euler step of f(x) = tanh(x W + c): log p = prior(x + h f) + h tr J(x),
  tr J = Σ_j (1 - tanh²(z_j)) W_jj, each example's own Jacobian."""
  rng = np.random.default_rng(3)
  w, c = rng.normal(size=(D, D)), rng.normal(size=D)
  x = rng.normal(size=(5, D))
  h = 0.1
  drift = lambda y, t: jnp.tanh(y.reshape(5, D) @ w + c).reshape(y.shape) * (1 + t)
  logp, _ = lk.ode_log_likelihood(drift, _x(x), np.array([0.0, h]), flow_prior,
                                  None, trace="exact", solver="euler", trace_chunk=7)
  z = np.tanh(x @ w + c)
  x1 = x + h * z
  want = (-0.5 * np.sum(x1 ** 2, 1) - 0.5 * D * np.log(2 * np.pi)
          + h * np.sum((1 - z ** 2) * np.diag(w), 1))
  np.testing.assert_allclose(logp, want, rtol=1e-5, atol=1e-4)


def test_ode_trace_chunk_gives_the_same_divergence():
  """Basis directions 5 at a time (16 = 3 x 5 + 1) sum the same diagonal."""
  full, _ = _exact_ll("flow", "rk4", 4)
  chunked, _ = _exact_ll("flow", "rk4", 4, trace_chunk=5)
  np.testing.assert_allclose(chunked, full, rtol=1e-6, atol=1e-5)


# --- Hutchinson: unbiased, with the closed-form variance ----------------------

def _hutchinson_variance(probe, num_probes):
  """Var(ε^T A ε) / K for A = ∫ J du = Q diag(½ log((s²+σ_max²)/(s²+σ_min²))) Qᵀ."""
  a = Q @ np.diag(0.5 * np.log((S ** 2 + SIG_MAX ** 2) / (S ** 2 + SIG_MIN ** 2))) @ Q.T
  fro2 = np.sum(a ** 2)
  var = 2 * fro2 if probe == "gaussian" else 2 * (fro2 - np.sum(np.diag(a) ** 2))
  return var / num_probes


@pytest.mark.parametrize("probe,num_probes", [
    ("rademacher", 1), ("gaussian", 1), ("gaussian", 4)])
def test_hutchinson_is_unbiased(probe, num_probes):
  n, steps = 512, 24
  grid = jnp.asarray(EDM_GRID(steps), jnp.float32)
  x = jnp.broadcast_to(_x(X0[:1]), (n,) + SHAPE)   # one point, n probe draws
  exact, _ = lk.ode_log_likelihood(edm_drift_logsig, x[:1], grid, edm_prior, None,
                                   trace="exact", solver="rk4")
  est, _ = jax.jit(lambda x, r: lk.ode_log_likelihood(
      edm_drift_logsig, x, grid, edm_prior, r, probe=probe, num_probes=num_probes,
      solver="rk4"))(x, jax.random.key(0))
  est = np.asarray(est, np.float64)
  se = est.std(ddof=1) / math.sqrt(n)
  assert abs(est.mean() - float(exact[0])) < 3 * se, (est.mean(), float(exact[0]), se)
  # Each example drew its own probes, with the variance of ε^T A ε.
  ratio = est.var(ddof=1) / _hutchinson_variance(probe, num_probes)
  assert 0.7 < ratio < 1.4, ratio


# --- Adaptive solver (diffrax) ------------------------------------------------

@pytest.mark.parametrize("case", ["edm", "flow"])
def test_adaptive_matches_gaussian_density(case):
  pytest.importorskip("diffrax")
  drift, prior, grid, exact = CASES[case]
  calls = []

  def counting_drift(x, t):
    jax.debug.callback(lambda: calls.append(1))
    return drift(x, t)

  fn = jax.jit(lambda x: lk.ode_log_likelihood(
      counting_drift, x, jnp.asarray(grid(1), jnp.float32), prior, None,
      trace="exact", solver="adaptive", rtol=1e-5, atol=1e-5))
  logp, nfe = fn(_x())
  jax.effects_barrier()
  err = np.abs(np.asarray(logp, np.float64) - exact) / D
  assert err.max() < 1e-3, err
  assert int(nfe) == len(calls), (int(nfe), len(calls))


# --- Errors -----------------------------------------------------------------

@pytest.mark.parametrize("kw,name", [
    ({"trace": "hutchinsn"}, "trace"), ({"probe": "sphere"}, "probe"),
    ({"solver": "rk45"}, "solver"), ({"rtol": 0.0}, "rtol"),
    ({"atol": -1e-5}, "atol"), ({"num_probes": 0}, "num_probes"),
    ({"trace_chunk": 0}, "trace_chunk")])
def test_ode_bad_arguments(kw, name):
  with pytest.raises(ValueError, match=name) as e:
    lk.ode_log_likelihood(flow_drift, _x(), FLOW_GRID(2), flow_prior,
                          jax.random.key(0), **kw)
  assert "\n" not in str(e.value)


def test_ode_bad_grid_and_missing_rng():
  with pytest.raises(ValueError, match="t_grid"):
    lk.ode_log_likelihood(flow_drift, _x(), np.array([0.5]), flow_prior,
                          jax.random.key(0))
  with pytest.raises(ValueError, match="rng"):
    lk.ode_log_likelihood(flow_drift, _x(), FLOW_GRID(2), flow_prior, None)


# --- bits/dim and dequantisation -----------------------------------------------

@pytest.mark.parametrize("num_dims", [1, 3072])
def test_uniform_8bit_is_8_bits_per_dim(num_dims):
  # The uniform density on [-1, 1]^D is the dequantised uniform 8-bit law.
  logp = jnp.full((3,), -num_dims * math.log(2.0))
  np.testing.assert_allclose(lk.bits_per_dim(logp, num_dims), 8.0, rtol=1e-6)
  # The same law on [0, 1]^D (density 1), and a 1-bit uniform law on [-1, 1].
  np.testing.assert_allclose(lk.bits_per_dim(jnp.zeros(3), num_dims,
                                             data_range=(0, 1)), 8.0, rtol=1e-6)
  np.testing.assert_allclose(lk.bits_per_dim(logp, num_dims, levels=2), 1.0, rtol=1e-6)


def test_bits_per_dim_of_a_dequantised_discrete_law():
  """A law P(k) spread uniformly over its cells of width 2/256: -log2 P / D."""
  rng = np.random.default_rng(0)
  p = rng.dirichlet(np.ones(256))
  k = rng.integers(0, 256, (10, 3))
  log_pk = np.log(p[k]).sum(1)
  density = log_pk - 3 * np.log(2 / 256)          # log p_x on the cells
  np.testing.assert_allclose(lk.bits_per_dim(jnp.asarray(density), 3),
                             -log_pk / (3 * np.log(2)), rtol=1e-5)


def test_dequantize_fills_each_level_cell_uniformly():
  k = np.arange(256, dtype=np.uint8).repeat(400).reshape(-1, 1, 1, 1)
  x = np.asarray(lk.dequantize(jnp.asarray(k), jax.random.key(0)), np.float64)
  assert x.min() >= -1 and x.max() < 1
  cell = np.floor((x + 1) * 128)
  np.testing.assert_array_equal(cell, k)
  u = (x + 1) * 128 - k                            # the offset in its cell
  assert abs(u.mean() - 0.5) < 3 * math.sqrt(1 / 12 / u.size)
  assert abs(u.var() - 1 / 12) < 0.005
  with pytest.raises(ValueError, match="dequantize"):
    lk.dequantize(jnp.zeros((1, 2)), jax.random.key(0))


def test_bits_per_dim_bad_arguments():
  for kw, name in [({"data_range": (1, -1)}, "data_range"), ({"levels": 1}, "levels")]:
    with pytest.raises(ValueError, match=name):
      lk.bits_per_dim(jnp.zeros(2), 4, **kw)
  with pytest.raises(ValueError, match="num_dims"):
    lk.bits_per_dim(jnp.zeros(2), 0)


# --- the DDPM bound ----------------------------------------------------------

def test_discretized_gaussian_sums_to_one_and_matches_scipy():
  levels = np.arange(256) / 127.5 - 1
  for mean, scale in [(0.0, 1.0), (0.3, 0.05), (-0.99, 0.01), (1.2, 0.004)]:
    logp = lk.discretized_gaussian_log_likelihood(
        jnp.asarray(levels), jnp.float32(mean), jnp.float32(math.log(scale)))
    logp = np.asarray(logp, np.float64)
    assert abs(np.exp(logp).sum() - 1) < 1e-5
    lo, hi = (levels - 1 / 255 - mean) / scale, (levels + 1 / 255 - mean) / scale
    # Differences taken on the side of the tail each bin is in (float64).
    mid = np.where(lo > 0, stats.norm.sf(lo) - stats.norm.sf(hi),
                   special.ndtr(hi) - special.ndtr(lo))
    with np.errstate(divide="ignore"):
      want = np.log(mid)
    want[0], want[-1] = stats.norm.logcdf(hi[0]), stats.norm.logsf(lo[-1])
    ok = want > -80                                 # where float64 has them
    np.testing.assert_allclose(logp[ok], want[ok], rtol=1e-4, atol=1e-4)


def _np_vlb(betas, x0, mu, s, noise, variance):
  """Ho et al. Eq. 5 in float64 from the betas: the terms [T, B] and L_T [B]."""
  alphas = 1 - betas
  ab = np.cumprod(alphas)
  ab_prev = np.append(1.0, ab[:-1])
  post_var = betas * (1 - ab_prev) / (1 - ab)
  c = lambda a: a[:, None, None]
  x_t = np.sqrt(c(ab)) * x0 + np.sqrt(1 - c(ab)) * noise          # [T, B, D]
  # The exact denoiser's E[x_0 | x_t] for x_0 ~ N(mu, s²).
  x0_hat = mu + np.sqrt(c(ab)) * s ** 2 / (c(ab) * s ** 2 + 1 - c(ab)) * (
      x_t - np.sqrt(c(ab)) * mu)
  post_mean = lambda x0_: (c(betas * np.sqrt(ab_prev) / (1 - ab)) * x0_
                           + c((1 - ab_prev) * np.sqrt(alphas) / (1 - ab)) * x_t)
  m_true, m_model = post_mean(x0), post_mean(x0_hat)
  var = post_var.copy() if variance == "posterior" else betas.copy()
  var[0] = post_var[1] if variance == "posterior" else betas[0]    # decoder's σ_1²
  v_true = c(np.append(post_var[1], post_var[1:]))
  kl = 0.5 * (np.log(c(var) / v_true) + v_true / c(var)
              + (m_true - m_model) ** 2 / c(var) - 1)
  terms = kl.sum(-1)
  sd = np.sqrt(var[0])
  lo, hi = (x0 - 1 / 255 - m_model[0]) / sd, (x0 + 1 / 255 - m_model[0]) / sd
  p = np.where(x0 < -0.999, special.ndtr(hi),
               np.where(x0 > 0.999, special.ndtr(-lo), special.ndtr(hi) - special.ndtr(lo)))
  terms[0] = -np.log(p).sum(-1)
  prior = 0.5 * (-1 - np.log(1 - ab[-1]) + (1 - ab[-1]) + ab[-1] * x0 ** 2).sum(-1)
  return terms, prior


def _gaussian_8bit_data(rng, b, d, mu, s):
  k = np.clip(np.round((mu + s * rng.normal(size=(b, d)) + 1) * 127.5), 0, 255)
  k[0, :2] = (0, 255)                               # the two open-ended bins
  return k / 127.5 - 1


@pytest.mark.parametrize("variance,prediction", [
    ("posterior", "eps"), ("beta", "eps"), ("posterior", "v")])
def test_ddpm_vlb_matches_numpy_sum(variance, prediction):
  sched = schedules.linear(1000)
  betas = np.linspace(1e-4, 0.02, 1000)
  mu, s = 0.1, 0.3
  x0 = _gaussian_8bit_data(np.random.default_rng(1), 6, 4, mu, s)
  rng = jax.random.key(7)
  denoise = testutils.as_prediction(testutils.gaussian_denoiser(sched, mu, s), sched,
                                    prediction)
  out = jax.jit(lambda x, r: vlb.ddpm_vlb_terms(
      denoise, sched, x, r, prediction=prediction, variance=variance))(
          jnp.asarray(x0, jnp.float32), rng)
  # The documented noise of index i: normal(fold_in(rng, i), x0.shape).
  noise = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(rng, i), x0.shape))
                    for i in range(1000)]).astype(np.float64)
  terms, prior = _np_vlb(betas, x0, mu, s, noise, variance)
  np.testing.assert_allclose(out["terms"], terms.T, rtol=5e-4, atol=5e-5)
  np.testing.assert_allclose(out["prior"], prior, rtol=1e-5)
  np.testing.assert_allclose(out["decoder"], terms[0], rtol=1e-4)
  np.testing.assert_allclose(out["kl"], terms[1:].sum(0), rtol=1e-4)
  total = prior + terms.sum(0)
  np.testing.assert_allclose(out["total"], total, rtol=1e-5)
  np.testing.assert_allclose(out["bpd"], total / (4 * np.log(2)), rtol=1e-4)


def test_ddpm_vlb_subset_estimate_is_unbiased():
  sched = schedules.linear(100, 1e-3, 0.2)
  mu, s, n = 0.1, 0.3, 1024
  x0 = jnp.broadcast_to(jnp.asarray(
      _gaussian_8bit_data(np.random.default_rng(2), 1, 4, mu, s), jnp.float32), (n, 4))
  denoise = testutils.gaussian_denoiser(sched, mu, s)
  full = vlb.ddpm_vlb_terms(denoise, sched, x0, jax.random.key(0))["total"]
  sub = vlb.ddpm_vlb_terms(denoise, sched, x0, jax.random.key(1), num_terms=10)
  full, est = np.asarray(full, np.float64), np.asarray(sub["total"], np.float64)
  se = math.sqrt(full.var() / n + est.var() / n)
  assert abs(est.mean() - full.mean()) < 3 * se, (est.mean(), full.mean(), se)
  assert est.var() > full.var()                       # sampling 10 of 100 terms
  steps = np.asarray(sub["timesteps"])
  assert all(len(set(r)) == 10 for r in steps) and steps.min() >= 0 and steps.max() < 100


def test_ddpm_vlb_bad_arguments():
  sched = schedules.linear(10)
  x0 = jnp.zeros((2, 4))
  den = testutils.gaussian_denoiser(sched, 0.0, 1.0)
  for kw, name in [({"variance": "learned"}, "variance"), ({"prediction": "score"},
                   "prediction"), ({"num_terms": 0}, "num_terms"),
                   ({"num_terms": 11}, "num_terms")]:
    with pytest.raises(ValueError, match=name) as e:
      vlb.ddpm_vlb_terms(den, sched, x0, jax.random.key(0), **kw)
    assert "\n" not in str(e.value)
