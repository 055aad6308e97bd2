"""ddx.flow and ddx.sampling.flow: the interpolant, SD3's times and shift, the
loss against NumPy, and the Euler/Heun ODE samplers with the exact velocity."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

import ddx
from ddx.processes.flow import core as flow
from ddx.sampling import flow as flow_sampling

MU, S = 0.3, 0.5


def _logit(t):
  return np.log(t) - np.log1p(-t)


def test_interpolant_and_target():
  rng = np.random.default_rng(0)
  x0, n = rng.normal(size=(3, 2, 2, 1)), rng.normal(size=(3, 2, 2, 1))
  t = np.array([0.0, 0.3, 1.0])
  x_t = flow.interpolate(jnp.asarray(x0), jnp.asarray(n), jnp.asarray(t))
  np.testing.assert_allclose(x_t, (1 - t)[:, None, None, None] * x0
                             + t[:, None, None, None] * n, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(x_t[0], x0[0], rtol=1e-6)      # t = 0 is the data
  np.testing.assert_allclose(x_t[2], n[2], rtol=1e-6)       # t = 1 is pure noise
  np.testing.assert_allclose(flow.velocity_target(jnp.asarray(x0), jnp.asarray(n)),
                             n - x0, rtol=1e-5, atol=1e-6)
  # the target is d x_t / dt
  dt = jax.jvp(lambda t: flow.interpolate(jnp.asarray(x0), jnp.asarray(n), t),
               (jnp.asarray(t, jnp.float32),), (jnp.ones(3),))[1]
  np.testing.assert_allclose(dt, n - x0, rtol=1e-5, atol=1e-6)


def test_shift_is_sd3_eq23():
  t = np.linspace(0.01, 0.99, 7)
  for shift in (0.5, 1.0, 3.0):
    st = flow.shift_time(t, shift)
    np.testing.assert_allclose(st, shift * t / (1 + (shift - 1) * t), rtol=1e-12)
    # SD3's reading: the shift scales the noise-to-signal ratio t/(1 - t) by
    # the shift (α = √(m/n) for m/n times more pixels).
    np.testing.assert_allclose(st / (1 - st), shift * t / (1 - t), rtol=1e-10)
  assert flow.shift_time(0.5, 3.0) == pytest.approx(0.75)
  assert flow.shift_time(0.0, 3.0) == 0.0 and flow.shift_time(1.0, 3.0) == 1.0


def test_time_grid():
  np.testing.assert_allclose(flow.time_grid(4), [1.0, 0.75, 0.5, 0.25, 0.0])
  g = flow.time_grid(4, 3.0)
  np.testing.assert_allclose(g, [1.0, 0.9, 0.75, 0.5, 0.0], rtol=1e-12)
  assert g.dtype == np.float64
  with pytest.raises(ValueError, match="steps"):
    flow.time_grid(0)
  with pytest.raises(ValueError, match="diffusion.shift"):
    flow.time_grid(4, -1.0)


def test_time_draws():
  n = 40_000
  key = jax.random.key(0)
  t = np.asarray(flow.sample_t(flow.Flow(logit_mean=0.5, logit_std=0.8), key, n), np.float64)
  u = _logit(t)
  assert u.mean() == pytest.approx(0.5, abs=4 * 0.8 / np.sqrt(n))
  assert u.std() == pytest.approx(0.8, rel=0.02)
  # shifted: logit(shift(t)) = logit(t) + log(shift), so N(m + log 3, s²)
  t3 = np.asarray(flow.sample_t(flow.Flow(logit_mean=0.5, logit_std=0.8, shift=3.0),
                                key, n), np.float64)
  np.testing.assert_allclose(_logit(t3), u + np.log(3.0), rtol=1e-3, atol=1e-3)
  tu = np.asarray(flow.sample_t(flow.Flow(t_sampling="uniform"), key, n), np.float64)
  assert tu.min() >= 0 and tu.max() < 1
  assert tu.mean() == pytest.approx(0.5, abs=4 * np.sqrt(1 / 12 / n))
  assert tu.var() == pytest.approx(1 / 12, rel=0.03)
  hist = np.histogram(tu, bins=4, range=(0, 1))[0] / n
  np.testing.assert_allclose(hist, 0.25, atol=0.01)
  np.testing.assert_allclose(flow.time_input(jnp.asarray([0.0, 0.25, 1.0])),
                             [0.0, 250.0, 1000.0])


def test_x0_prediction_conversions():
  rng = np.random.default_rng(2)
  x0, n = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
  t = np.array([0.01, 0.2, 0.7, 1.0])
  x_t = (1 - t)[:, None] * x0 + t[:, None] * n
  v = flow.velocity(flow.Flow(prediction="x0"), jnp.asarray(x0, jnp.float32),
                    jnp.asarray(x_t, jnp.float32), jnp.asarray(t, jnp.float32))
  np.testing.assert_allclose(v, n - x0, rtol=2e-4, atol=2e-4)
  vv = flow.velocity(flow.Flow(), jnp.asarray(n - x0), jnp.asarray(x_t), jnp.asarray(t))
  np.testing.assert_allclose(vv, n - x0, rtol=1e-6)     # "v": the output itself
  np.testing.assert_allclose(
      flow.x0_from_velocity(jnp.asarray(x_t), jnp.asarray(n - x0), jnp.asarray(t)),
      x0, rtol=1e-5, atol=1e-5)


def _net_np(x_t, time, w):
  return w * np.sin(x_t) + 1e-3 * time.reshape((-1,) + (1,) * (x_t.ndim - 1))


def _net(params, x_t, time):
  return params * jnp.sin(x_t) + 1e-3 * time.reshape((-1,) + (1,) * (x_t.ndim - 1))


@pytest.mark.parametrize("t_sampling,shift,prediction", [
    ("logit_normal", 1.0, "v"), ("uniform", 3.0, "v"), ("logit_normal", 2.0, "x0")])
def test_flow_loss_matches_numpy(t_sampling, shift, prediction):
  p = flow.Flow(t_sampling=t_sampling, shift=shift, prediction=prediction,
                logit_mean=-0.3, logit_std=1.2)
  b = 64
  x0 = np.random.default_rng(3).uniform(-1, 1, size=(b, 3, 3, 2))
  rng = jax.random.key(9)
  loss, metrics = flow.flow_loss(_net, 0.7, p, jnp.asarray(x0, jnp.float32), rng)
  t_rng, n_rng = jax.random.split(rng)
  if t_sampling == "logit_normal":
    u = np.asarray(jax.random.normal(t_rng, (b,)), np.float64)
    t = 1 / (1 + np.exp(-(-0.3 + 1.2 * u)))
  else:
    t = np.asarray(jax.random.uniform(t_rng, (b,)), np.float64)
  t = shift * t / (1 + (shift - 1) * t)
  n = np.asarray(jax.random.normal(n_rng, x0.shape), np.float64)
  tb = t[:, None, None, None]
  x_t = (1 - tb) * x0 + tb * n
  out = _net_np(x_t, 1000 * t, 0.7)
  if prediction == "v":
    err = out - (n - x0)
  else:   # JiT: v̂ = (x_t − x̂_0)/max(t, t_min) against (x_t − x_0)/max(t, t_min)
    c = np.maximum(tb, 0.05)
    err = (x_t - out) / c - (x_t - x0) / c
  per = np.mean(err ** 2, axis=(1, 2, 3))
  assert float(loss) == pytest.approx(per.mean(), rel=2e-4)
  q = np.minimum((t * 4).astype(int), 3)
  want = [per[q == k].mean() if np.any(q == k) else 0.0 for k in range(4)]
  np.testing.assert_allclose(metrics["mse_by_quartile"], want, rtol=2e-4)
  assert set(metrics) == {"loss", "mse_by_quartile"}


def test_flow_loss_aux():
  apply = lambda params, x, t: (x.astype(jnp.bfloat16), {"k": 1})
  loss, m = flow.flow_loss(apply, None, flow.Flow(), jnp.zeros((2, 2, 2, 1)),
                           jax.random.key(0), has_aux=True)
  assert m["aux"] == {"k": 1} and loss.dtype == jnp.float32


@pytest.mark.parametrize("kw,match", [
    ({"shift": 0.0}, r"diffusion.shift=0.0 must be > 0"),
    ({"shift": -2.0}, r"diffusion.shift"),
    ({"t_sampling": "beta"}, r"diffusion.t_sampling='beta' is unknown"),
    ({"prediction": "eps"}, r"diffusion.prediction='eps' is not a flow prediction"),
    ({"logit_std": 0.0}, r"diffusion.logit_std"),
    ({"t_min": 1.0}, r"diffusion.t_min"),
    ({"logit_mean": float("inf")}, r"diffusion.logit_mean=inf must be a finite"),
])
def test_bad_values_give_one_line_errors(kw, match):
  with pytest.raises(ValueError, match=match) as e:
    flow.Flow(**kw).check()
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match=match):
    flow.flow_loss(_net, 1.0, flow.Flow(**kw), jnp.zeros((2, 1)), jax.random.key(0))


# ------------------------------------------------------------------- samplers

def _exact_v(x, t):
  """E[n − x_0 | x_t] for x_0 ~ N(MU, S²): x_t ~ N((1 − t)μ, c), c = (1 − t)²s² + t²,
  Cov(n, x_t) = t, Cov(x_0, x_t) = (1 − t)s²."""
  t = t[:, None]
  c = (1 - t) ** 2 * S ** 2 + t ** 2
  r = x - (1 - t) * MU
  return t / c * r - (MU + (1 - t) * S ** 2 / c * r)


def _np_v(x, t):
  return np.cos(x) * (1.0 + t) - 0.3 * x


def _jax_v(x, t):
  return jnp.cos(x) * (1.0 + t[:, None]) - 0.3 * x


def test_heun_and_euler_match_numpy():
  times = flow.time_grid(5, 2.0)
  x_T = np.random.default_rng(4).normal(size=(3, 2))
  for sampler in ("euler", "heun"):
    x, ref = x_T.copy(), []
    for i in range(5):
      t, t1 = times[i], times[i + 1]
      v = _np_v(x, t)
      x_e = x + (t1 - t) * v
      if sampler == "heun" and t1 > 0:
        x_e = x + (t1 - t) * 0.5 * (v + _np_v(x_e, t1))
      x = x_e
      ref.append(x)
    _, traj = flow_sampling.sample(_jax_v, times, jax.random.key(0), x_T.shape, sampler,
                                   x_T=jnp.asarray(x_T, jnp.float32),
                                   return_trajectory=True)
    np.testing.assert_allclose(traj, np.stack(ref), rtol=1e-4, atol=1e-5)


def _grid_noise(n):
  z = norm.ppf((np.arange(n) + 0.5) / n)
  return (z - z.mean()) / z.std()


def _errors(sampler, ks, shift=1.0, n=257):
  """Max error against the exact flow map x(0) = μ + s·x(1) for Gaussian data
  (x_t = (1 − t)μ + √((1 − t)²s² + t²)·z along each ODE path)."""
  z = _grid_noise(n)
  errs = []
  for k in ks:
    x = ddx.sample(_exact_v, flow.Flow(shift=shift), jax.random.key(0), (n, 1),
                   sampler, k, x_T=jnp.asarray(z[:, None], jnp.float32))
    errs.append(np.abs(np.asarray(x, np.float64)[:, 0] - (MU + S * z)).max())
  return np.array(errs)


@pytest.mark.parametrize("sampler,shift,lo,hi", [
    ("euler", 1.0, 0.85, 1.15), ("heun", 1.0, 1.8, 2.3), ("heun", 3.0, 1.8, 2.3)])
def test_convergence_order(sampler, shift, lo, hi):
  ks = (8, 16, 32, 64) if shift == 1.0 else (16, 32, 64, 128)
  errs = _errors(sampler, ks, shift)
  assert np.all(np.diff(errs) < 0), errs
  slope = -np.polyfit(np.log(ks), np.log(errs), 1)[0]
  assert lo < slope < hi, (errs, slope)


@pytest.mark.parametrize("sampler,steps", [("heun", 32), ("euler", 512)])
def test_samples_have_the_data_moments(sampler, steps):
  n = 4000
  x = np.asarray(ddx.sample(_exact_v, flow.Flow(), jax.random.key(3), (n, 1), sampler,
                            steps), np.float64)
  assert abs(x.mean() - MU) < 4 * S / np.sqrt(n)
  assert abs(x.std() - S) < 4 * S / np.sqrt(2 * n)


def test_x0_network_through_velocity_samples_the_same():
  """An exact x0-network, turned into a velocity by flow.velocity, gives the
  same samples as the exact velocity (v = (x_t − x̂_0)/t)."""
  p = flow.Flow(prediction="x0")

  def x0_net(x, t):
    tt = t[:, None]
    c = (1 - tt) ** 2 * S ** 2 + tt ** 2
    return MU + (1 - tt) * S ** 2 / c * (x - (1 - tt) * MU)

  a = ddx.sample(lambda x, t: flow.velocity(p, x0_net(x, t), x, t), p,
                 jax.random.key(1), (64, 1), "heun", 16)
  b = ddx.sample(_exact_v, p, jax.random.key(1), (64, 1), "heun", 16)
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_start_noise_and_clip():
  shape = (3, 2)
  _, traj = ddx.sample(lambda x, t: jnp.zeros_like(x), flow.Flow(), jax.random.key(2),
                       shape, "euler", 4, return_trajectory=True)
  np.testing.assert_allclose(traj[0], ddx.sampling.initial_noise(jax.random.key(2), shape))
  # v = x − 5 points at x̂_0 = x − t·v = 5 at t = 1; clipped, x̂_0 = 1
  x = ddx.sample(lambda x, t: x - 5.0, flow.Flow(), jax.random.key(2), shape, "heun", 8,
                 clip_x0=True)
  np.testing.assert_allclose(x, 1.0, rtol=1e-5)
