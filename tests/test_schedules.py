"""Schedules against NumPy formulas written here, independently of ddx."""
import math

import numpy as np
import pytest

from ddx.processes.ddpm import schedules


def _reference(betas):
  """Per-step quantities by a plain loop over t = 1..T (DDPM notation)."""
  T = len(betas)
  ab, ab_prev, post_var, c1, c2 = [], [], [], [], []
  prod = 1.0
  for t in range(1, T + 1):
    beta = betas[t - 1]
    prev = prod               # ᾱ_{t-1}, ᾱ_0 = 1
    prod = prod * (1.0 - beta)  # ᾱ_t
    ab.append(prod)
    ab_prev.append(prev)
    post_var.append(beta * (1 - prev) / (1 - prod))
    c1.append(math.sqrt(prev) * beta / (1 - prod))
    c2.append(math.sqrt(1 - beta) * (1 - prev) / (1 - prod))
  return [np.array(v) for v in (ab, ab_prev, post_var, c1, c2)]


@pytest.mark.parametrize("T", [1, 10, 1000])
def test_linear_matches_reference(T):
  s = schedules.linear(T, 1e-4, 0.02)
  betas = [1e-4 + (0.02 - 1e-4) * k / (T - 1) if T > 1 else 1e-4 for k in range(T)]
  ab, ab_prev, post_var, c1, c2 = _reference(betas)
  np.testing.assert_allclose(s.betas, betas, rtol=1e-6)
  np.testing.assert_allclose(s.alphas, 1 - np.array(betas), rtol=1e-6)
  np.testing.assert_allclose(s.alphas_cumprod, ab, rtol=1e-5)
  np.testing.assert_allclose(s.alphas_cumprod_prev, ab_prev, rtol=1e-5)
  np.testing.assert_allclose(s.sqrt_alphas_cumprod, np.sqrt(ab), rtol=1e-5)
  np.testing.assert_allclose(s.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - ab), rtol=1e-5)
  np.testing.assert_allclose(s.posterior_variance, post_var, rtol=1e-5, atol=1e-30)
  np.testing.assert_allclose(s.posterior_mean_coef1, c1, rtol=1e-5)
  np.testing.assert_allclose(s.posterior_mean_coef2, c2, rtol=1e-5, atol=1e-30)
  assert s.num_timesteps == T


def test_index_convention():
  s = schedules.linear(1000)
  # Array index 0 is diffusion step t = 1: ᾱ_1 = 1 - β_1, ᾱ_0 = 1.
  assert float(s.alphas_cumprod[0]) == pytest.approx(1 - 1e-4, rel=1e-7)
  assert float(s.alphas_cumprod_prev[0]) == 1.0
  assert float(s.posterior_variance[0]) == 0.0
  np.testing.assert_allclose(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])
  # Clipped log variance replaces log β̃_1 = -inf with log β̃_2.
  assert np.all(np.isfinite(s.posterior_log_variance_clipped))
  assert float(s.posterior_log_variance_clipped[0]) == pytest.approx(
      math.log(float(s.posterior_variance[1])), rel=1e-5)
  # DDPM's ᾱ_T for the linear schedule is about 4.0e-5.
  assert float(s.alphas_cumprod[-1]) == pytest.approx(4.036e-5, rel=1e-2)


@pytest.mark.parametrize("make", [schedules.linear, schedules.cosine])
def test_alphas_cumprod_strictly_decreasing(make):
  ab = np.asarray(make(1000).alphas_cumprod, dtype=np.float64)
  assert np.all(np.diff(ab) < 0)
  assert 0 < ab[-1] < ab[0] < 1


def test_cosine_matches_closed_form():
  T, s_ = 1000, 0.008
  s = schedules.cosine(T)
  f = lambda t: math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2
  betas = [min(1 - f(t) / f(t - 1), 0.999) for t in range(1, T + 1)]
  np.testing.assert_allclose(s.betas, betas, rtol=1e-5)
  # Away from the clipped end, ᾱ_t = f(t)/f(0) exactly.
  ab_closed = np.array([f(t) / f(0) for t in range(1, T + 1)])
  np.testing.assert_allclose(s.alphas_cumprod[:-1], ab_closed[:-1], rtol=1e-4)
  assert float(s.betas[-1]) == pytest.approx(0.999)


def test_bad_arguments():
  with pytest.raises(ValueError, match="num_timesteps"):
    schedules.linear(0)
  with pytest.raises(ValueError, match="beta_start"):
    schedules.linear(10, 0.1, 0.01)
  with pytest.raises(ValueError, match="schedule"):
    import ml_collections
    schedules.from_config(ml_collections.ConfigDict(
        {"schedule": "quadratic", "num_timesteps": 10}))
