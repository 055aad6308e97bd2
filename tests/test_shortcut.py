"""ddx.shortcut: the self-consistency target, the step-size grid and the sampler."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddx.processes.meanflow import core as meanflow

from ddx.processes.shortcut import core as shortcut

SHAPE = (4, 2, 2, 1)


def _net(seed=0):
  """A nonlinear s(x, t, d) for checking the algebra."""
  w = jnp.asarray(np.random.default_rng(seed).normal(size=(4, 4)), jnp.float32)

  def s_fn(x, t, d):
    flat = x.reshape(x.shape[0], -1)
    return jnp.tanh(flat @ w * (1 + d[:, None]) + t[:, None]).reshape(x.shape)
  return s_fn


def test_target_for_2d_equals_two_d_steps():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
  t = jnp.asarray([1.0, 0.5, 0.25, 0.0625], jnp.float32)
  d = t / 2
  s_fn = _net()
  tgt = np.asarray(shortcut.consistency_target(s_fn, x, t, d))
  xn, tn, dn = np.asarray(x), np.asarray(t), np.asarray(d)
  # Two explicit d-steps, written out in NumPy around the same network.
  s1 = np.asarray(s_fn(x, t, d))
  mid = xn - dn[:, None, None, None] * s1
  s2 = np.asarray(s_fn(jnp.asarray(mid), jnp.asarray(tn - dn), d))
  two = mid - dn[:, None, None, None] * s2
  np.testing.assert_allclose(xn - 2 * dn[:, None, None, None] * tgt, two, rtol=1e-6,
                             atol=1e-6)


def test_the_exact_flow_map_is_self_consistent():
  """s(x, t, d) = the exact average velocity over [t − d, t] (Gaussian data):
  its target for 2d is the exact average velocity over [t − 2d, t]."""
  rng = np.random.default_rng(2)
  mean = rng.normal(size=SHAPE[1:]).astype(np.float32)
  std = rng.uniform(0.3, 1.5, size=SHAPE[1:]).astype(np.float32)
  exact = lambda x, t, d: meanflow.gaussian_average_velocity(mean, std, x, t - d, t)
  x = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
  t = jnp.asarray([1.0, 0.75, 0.5, 0.25], jnp.float32)
  d = jnp.asarray([0.5, 0.125, 0.25, 0.0625], jnp.float32)
  np.testing.assert_allclose(np.asarray(shortcut.consistency_target(exact, x, t, d)),
                             np.asarray(exact(x, t, 2 * d)), rtol=2e-5, atol=2e-5)
  for steps in (1, 4):   # and samples the data exactly with any step count
    got = shortcut.sample(exact, x, steps=steps)
    np.testing.assert_allclose(np.asarray(got), mean + std * np.asarray(x), rtol=1e-5,
                               atol=1e-5)


def test_consistency_times_lie_on_the_power_of_two_grid():
  t, d = shortcut.sample_consistency_times(jax.random.key(0), 4000, max_steps=8)
  t, d = np.asarray(t), np.asarray(d)
  assert set(np.round(d * 8).astype(int)) == {1, 2, 4}           # d in {1/8, 1/4, 1/2}
  j = t / (2 * d)
  np.testing.assert_allclose(j, np.round(j), atol=1e-6)          # t a multiple of 2d
  assert np.all(t - 2 * d >= -1e-7) and np.all(t <= 1.0)
  for size in (1 / 8, 1 / 4, 1 / 2):   # every slot of every size is drawn
    assert len(set(np.round(t[d == size], 6))) == round(1 / (2 * size))


def test_sampler_steps_and_errors():
  calls = []

  def s_fn(x, t, d):
    calls.append(None)
    return jnp.ones_like(x) * d[:, None, None, None] * 0 + 1.0

  x = shortcut.sample(s_fn, jnp.zeros(SHAPE), steps=4)
  np.testing.assert_allclose(np.asarray(x), -1.0)                # 4 steps of 1/4
  x, traj = shortcut.sample(s_fn, jnp.zeros(SHAPE), steps=2, return_trajectory=True)
  assert traj.shape == (2,) + SHAPE
  np.testing.assert_allclose(np.asarray(traj[0]), -0.5)
  for bad in (0, 3, 6):
    with pytest.raises(ValueError, match=f"steps={bad} must be a power of two"):
      shortcut.sample(s_fn, jnp.zeros(SHAPE), steps=bad)
  with pytest.raises(ValueError, match="max_steps=1 leaves"):
    shortcut.sample_consistency_times(jax.random.key(0), 4, max_steps=1)
