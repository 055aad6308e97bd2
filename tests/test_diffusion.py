"""q_sample, the posterior, prediction conversions and the loss, against closed forms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddx
from ddx.processes.ddpm import core as diffusion
from ddx.processes.ddpm import schedules

SCHED = schedules.linear(1000)


def test_q_sample_formula():
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (5, 4, 4, 3)).astype(np.float32)
  noise = rng.normal(size=x0.shape).astype(np.float32)
  t = np.array([0, 1, 499, 998, 999], np.int32)
  betas = np.linspace(1e-4, 0.02, 1000)
  ab = np.cumprod(1 - betas)
  want = (np.sqrt(ab[t])[:, None, None, None] * x0
          + np.sqrt(1 - ab[t])[:, None, None, None] * noise)
  got = ddx.q_sample(SCHED, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_q_sample_statistics():
  n = 200_000
  x0 = jnp.full((n, 1), 0.7)
  for i in (0, 250, 999):
    t = jnp.full((n,), i, jnp.int32)
    noise = jax.random.normal(jax.random.key(i), x0.shape)
    xt = np.asarray(ddx.q_sample(SCHED, x0, t, noise), np.float64)
    ab = float(SCHED.alphas_cumprod[i])
    assert xt.mean() == pytest.approx(np.sqrt(ab) * 0.7, abs=5e-3)
    assert xt.var() == pytest.approx(1 - ab, rel=2e-2, abs=2e-5)


def test_posterior_matches_bayes():
  """μ̃, β̃ from Gaussian conditioning of q(x_t|x_{t-1}) q(x_{t-1}|x_0)."""
  rng = np.random.default_rng(1)
  x0 = rng.normal(size=(4, 3)).astype(np.float32)
  xt = rng.normal(size=(4, 3)).astype(np.float32)
  t = np.array([1, 10, 500, 999], np.int32)   # array indices; t=0 below
  betas = np.linspace(1e-4, 0.02, 1000)
  ab = np.cumprod(1 - betas)
  ab_prev = ab[t - 1]
  prec = 1 / (1 - ab_prev) + (1 - betas[t]) / betas[t]
  var = 1 / prec
  mean = var[:, None] * (np.sqrt(ab_prev)[:, None] * x0 / (1 - ab_prev)[:, None]
                         + np.sqrt(1 - betas[t])[:, None] * xt / betas[t][:, None])
  m, v, logv = diffusion.q_posterior(SCHED, jnp.asarray(x0), jnp.asarray(xt),
                                     jnp.asarray(t))
  np.testing.assert_allclose(m, mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(v[:, 0], var, rtol=1e-4)
  np.testing.assert_allclose(logv[:, 0], np.log(var), rtol=1e-4)
  # Step t = 1 (index 0): x_0 is known exactly, mean x_0, variance 0.
  m0, v0, _ = diffusion.q_posterior(SCHED, jnp.asarray(x0), jnp.asarray(xt),
                                    jnp.zeros(4, jnp.int32))
  np.testing.assert_allclose(m0, x0, atol=1e-6)
  assert np.all(np.asarray(v0) == 0)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_conversions_round_trip(prediction):
  rng = np.random.default_rng(2)
  x0 = jnp.asarray(rng.uniform(-1, 1, (6, 5)), jnp.float32)
  eps = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
  a = jnp.asarray(rng.uniform(0.01, 0.99, (6,)), jnp.float32)
  xt = jnp.sqrt(a)[:, None] * x0 + jnp.sqrt(1 - a)[:, None] * eps
  out = diffusion.target(x0, eps, a, prediction)
  x0_hat, eps_hat = diffusion.to_x0_eps(out, xt, a, prediction)
  np.testing.assert_allclose(x0_hat, x0, atol=1e-5)
  np.testing.assert_allclose(eps_hat, eps, atol=1e-5)
  np.testing.assert_allclose(diffusion.eps_from_x0(xt, x0, a), eps, atol=1e-5)


def test_v_definition():
  a = jnp.float32(0.3)
  x0, eps = jnp.float32(0.5), jnp.float32(-1.2)
  v = diffusion.target(x0, eps, a, "v")
  assert float(v) == pytest.approx(np.sqrt(0.3) * -1.2 - np.sqrt(0.7) * 0.5, rel=1e-6)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_loss_is_zero_for_the_oracle(prediction):
  """A network that knows x_0 predicts the target exactly: loss 0.

  Fails if q_sample and the target disagree on the time index or the formula.
  """
  x0 = jax.random.uniform(jax.random.key(0), (64, 4, 4, 1), minval=-1, maxval=1)

  def oracle(params, xt, t):
    a = SCHED.alphas_cumprod[t][:, None, None, None]
    eps = (xt - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
    return diffusion.target(x0, eps, SCHED.alphas_cumprod[t], prediction)

  loss, metrics = ddx.diffusion_loss(oracle, None, SCHED, x0, jax.random.key(1),
                                     prediction=prediction)
  assert float(loss) < 1e-6
  if prediction == "x0":
    return  # the x_0 target does not depend on t
  # A slightly wrong index must show: shift t by one step.
  def off_by_one(params, xt, t):
    return oracle(params, xt, jnp.minimum(t + 1, 999))
  loss_off, _ = ddx.diffusion_loss(off_by_one, None, SCHED, x0, jax.random.key(1),
                                   prediction=prediction)
  assert float(loss_off) > 100 * max(float(loss), 1e-9)


def test_loss_of_zero_predictor():
  x0 = jnp.full((4096, 2, 2, 1), 0.5)
  zero = lambda p, xt, t: jnp.zeros_like(xt)
  loss, m = ddx.diffusion_loss(zero, None, SCHED, x0, jax.random.key(3))
  assert float(loss) == pytest.approx(1.0, abs=0.03)   # E[ε²] = 1
  loss, _ = ddx.diffusion_loss(zero, None, SCHED, x0, jax.random.key(3), prediction="x0")
  assert float(loss) == pytest.approx(0.25, rel=1e-6)  # (x_0 - 0)² exactly
  assert m["mse_by_quartile"].shape == (4,)
  np.testing.assert_allclose(m["mse_by_quartile"], 1.0, atol=0.06)


def test_loss_is_jittable_and_batch_polymorphic():
  f = jax.jit(lambda x0, k: ddx.diffusion_loss(
      lambda p, xt, t: p * xt, 0.5, SCHED, x0, k)[0])
  for b in (1, 3):
    assert np.isfinite(float(f(jnp.zeros((b, 2, 2, 1)), jax.random.key(0))))
  with pytest.raises(ValueError, match="prediction"):
    ddx.diffusion_loss(lambda p, x, t: x, None, SCHED, jnp.zeros((1, 2)),
                       jax.random.key(0), prediction="score")
