"""ddx.meanflow against closed forms: Gaussian data, whose average velocity is
known exactly, and finite differences for the JVP tangent."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddx import meanflow

from testutils import gaussian_data

SHAPE = (3, 2, 2, 1)


def _gaussian(seed=0):
  return gaussian_data(seed, SHAPE[1:])


def _np_velocity(mean, std, z, t):
  """The marginal velocity E[ε − x | z_t = z] for x ~ N(mean, std²), ε ~ N(0, 1),
  from the joint Gaussian: E[ε − x] = −mean, Cov(ε − x, z_t) = t − (1 − t)·std²,
  Var z_t = (1 − t)²·std² + t²."""
  var = (1 - t) ** 2 * std ** 2 + t ** 2
  return -mean + (t - (1 - t) * std ** 2) / var * (z - (1 - t) * mean)


def _np_average_velocity(mean, std, z, r, t, n=2000):
  """(z_t − z_r)/(t − r) with z_r from RK4 on dz/dτ = v(z, τ), τ from t to r."""
  z, r, t = z.astype(np.float64), float(r), float(t)
  z0, h = z.copy(), (r - t) / n
  tau = t
  for _ in range(n):
    k1 = _np_velocity(mean, std, z, tau)
    k2 = _np_velocity(mean, std, z + h / 2 * k1, tau + h / 2)
    k3 = _np_velocity(mean, std, z + h / 2 * k2, tau + h / 2)
    k4 = _np_velocity(mean, std, z + h * k3, tau + h)
    z, tau = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), tau + h
  return (z0 - z) / (t - r)


def test_gaussian_average_velocity_is_the_integrated_flow():
  rng, mean, std = _gaussian()
  z = rng.normal(size=SHAPE).astype(np.float32)
  r = np.array([0.0, 0.2, 0.5], np.float32)
  t = np.array([1.0, 0.9, 0.5], np.float32)
  got = np.asarray(meanflow.gaussian_average_velocity(mean, std, z, r, t))
  for i in range(3):
    want = (_np_velocity(mean, std, z[i], t[i]) if r[i] == t[i]
            else _np_average_velocity(mean, std, z[i], r[i], t[i]))
    np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-5)


def test_identity_target_equals_the_exact_average_velocity():
  """With the exact u and the marginal velocity the MeanFlow target is u
  itself, so the loss is zero there (the identity the method trains on)."""
  rng, mean, std = _gaussian(1)
  z = rng.normal(size=SHAPE).astype(np.float32)
  r = np.array([0.0, 0.3, 0.7], np.float32)
  t = np.array([1.0, 0.8, 0.7], np.float32)
  u_fn = lambda z, r, t: meanflow.gaussian_average_velocity(mean, std, z, r, t)
  v = _np_velocity(mean, std, z, t[:, None, None, None]).astype(np.float32)
  u, tgt = meanflow.target(u_fn, jnp.asarray(z), jnp.asarray(r), jnp.asarray(t),
                           jnp.asarray(v))
  want = np.stack([_np_average_velocity(mean, std, z[i], r[i], t[i]) if r[i] < t[i]
                   else v[i] for i in range(3)])
  np.testing.assert_allclose(np.asarray(tgt), want, rtol=1e-4, atol=2e-5)
  value, d2 = meanflow.loss(u, tgt)
  assert float(value) < 1e-6 and np.all(np.asarray(d2) < 1e-8)


def test_exact_average_velocity_samples_the_data_in_one_step():
  """x = ε − u(ε, 0, 1) is the exact flow map ε -> mean + std·ε, and n steps of
  the exact u compose to the same map."""
  rng, mean, std = _gaussian(2)
  eps = rng.normal(size=SHAPE).astype(np.float32)
  u_fn = lambda z, r, t: meanflow.gaussian_average_velocity(mean, std, z, r, t)
  for steps in (1, 3):
    x = np.asarray(meanflow.sample(u_fn, jnp.asarray(eps), steps=steps))
    np.testing.assert_allclose(x, mean + std * eps, rtol=1e-5, atol=1e-5)
  x, traj = meanflow.sample(u_fn, jnp.asarray(eps), steps=2, return_trajectory=True)
  assert traj.shape == (2,) + SHAPE and np.array_equal(np.asarray(traj[-1]), np.asarray(x))


def test_jvp_tangent_matches_central_differences():
  """d/dt u = v·∂_z u + ∂_t u (r fixed) of a nonlinear u, against
  (u(z + hv, r, t + h) − u(z − hv, r, t − h)) / 2h in float64."""
  with jax.enable_x64():
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.normal(size=(4, 4)))

    def u_fn(z, r, t):
      flat = z.reshape(z.shape[0], -1)
      h = jnp.tanh(flat @ w + t[:, None] * 1.7 - r[:, None] ** 2)
      return (h * jnp.cos(3 * t)[:, None] + flat * r[:, None]).reshape(z.shape)

    z = jnp.asarray(rng.normal(size=SHAPE))
    v = jnp.asarray(rng.normal(size=SHAPE))
    r, t = jnp.asarray([0.1, 0.2, 0.3]), jnp.asarray([0.9, 0.5, 0.4])
    u, tgt = meanflow.target(u_fn, z, r, t, v)
    du_dt = (v - tgt) / (t - r)[:, None, None, None]
    h = 1e-5
    fd = (u_fn(z + h * v, r, t + h) - u_fn(z - h * v, r, t - h)) / (2 * h)
    np.testing.assert_allclose(np.asarray(du_dt), np.asarray(fd), rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(np.asarray(u), np.asarray(u_fn(z, r, t)))


def test_target_carries_no_gradient_and_the_diagonal_is_flow_matching():
  rng = np.random.default_rng(4)
  z, v = (jnp.asarray(rng.normal(size=SHAPE), jnp.float32) for _ in range(2))
  t = jnp.asarray([0.9, 0.5, 0.2], jnp.float32)

  def value(a):
    u, tgt = meanflow.target(lambda z, r, t: a * z * t[:, None, None, None], z, t, t, v)
    np.testing.assert_array_equal(np.asarray(tgt), np.asarray(v))   # r = t: target v
    return meanflow.loss(u, tgt, power=0.0)[0]

  a = 0.7
  grad = jax.grad(value)(a)
  # Only u depends on a: d/da mean‖a·z·t − v‖² = mean 2·Σ (a·z·t − v)·z·t.
  zt = np.asarray(z) * np.asarray(t)[:, None, None, None]
  want = np.mean(np.sum(2 * (a * zt - np.asarray(v)) * zt, axis=(1, 2, 3)))
  np.testing.assert_allclose(float(grad), want, rtol=1e-5)


def test_adaptive_weight():
  rng = np.random.default_rng(5)
  u, tgt = (rng.normal(size=SHAPE).astype(np.float32) for _ in range(2))
  d2 = np.sum((u - tgt) ** 2, axis=(1, 2, 3))
  for power in (0.0, 0.5, 1.0):
    value, got = meanflow.loss(jnp.asarray(u), jnp.asarray(tgt), power=power, eps=1e-3)
    np.testing.assert_allclose(np.asarray(got), d2, rtol=1e-6)
    np.testing.assert_allclose(float(value), np.mean(d2 / (d2 + 1e-3) ** power), rtol=1e-5)


def test_guided_velocity_mixes_as_in_the_paper():
  v, c, u = (jnp.full((1, 2), a) for a in (1.0, 2.0, 4.0))
  np.testing.assert_array_equal(np.asarray(meanflow.guided_velocity(v, c, u, 1.0)), 1.0)
  # ω v + κ c + (1 − ω − κ) u with ω = 2, κ = 0.5: 2 + 1 − 6 = −3.
  np.testing.assert_allclose(np.asarray(meanflow.guided_velocity(v, c, u, 2.0, 0.5)), -3.0)


def test_time_sampling():
  r, t = meanflow.sample_times(jax.random.key(0), 20000, ratio=0.25)
  r, t = np.asarray(r), np.asarray(t)
  assert np.all(r <= t) and np.all((t > 0) & (t < 1))
  share = np.mean(r < t)
  assert abs(share - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 20000), share
  # t is the larger of two logit-normal draws (or one when r = t): its median
  # in logit space lies above the draws' mean −0.4.
  assert np.median(np.log(t / (1 - t))) > -0.4
  with pytest.raises(ValueError, match="steps=0"):
    meanflow.sample(lambda z, r, t: z, jnp.zeros(SHAPE), steps=0)
