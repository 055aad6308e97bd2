"""ddx.consistency (sCM in TrigFlow) against the closed forms of Gaussian data."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddx.processes.consistency import core as consistency

from testutils import gaussian_data

SD = 0.5                 # σ_d
SHAPE = (3, 2, 1, 1)


def _gaussian(seed=0):
  return gaussian_data(seed, SHAPE[1:], (0.3, 1.2))


def _spread(std, t):
  """Std of x_t = cos t·x_0 + sin t·z for x_0 ~ N(·, std²), z ~ N(0, σ_d²)."""
  return np.sqrt(np.cos(t) ** 2 * std ** 2 + np.sin(t) ** 2 * SD ** 2)


def _np_velocity(mean, std, x, t):
  """The probability-flow velocity of Gaussian data: trajectories are
  x_t = cos t·mean + S(t)·ξ, so dx/dt = −sin t·mean + S'(t)/S(t)·(x − cos t·mean)."""
  S = _spread(std, t)
  dS = np.sin(t) * np.cos(t) * (SD ** 2 - std ** 2) / S
  return -np.sin(t) * mean + dS / S * (x - np.cos(t) * mean)


def _np_to_data(mean, std, x, t, n=4000):
  """x_0 from RK4 on the probability-flow ODE from t down to 0."""
  x, h = x.astype(np.float64), -float(t) / n
  for k in range(n):
    s = float(t) + k * h
    k1 = _np_velocity(mean, std, x, s)
    k2 = _np_velocity(mean, std, x + h / 2 * k1, s + h / 2)
    k3 = _np_velocity(mean, std, x + h / 2 * k2, s + h / 2)
    k4 = _np_velocity(mean, std, x + h * k3, s + h)
    x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
  return x


def _exact_F(mean, std):
  """F* with f*(x, t) = mean + std·(x − cos t·mean)/S(t) = cos t·x − sin t·σ_d·F*."""
  def F(xs, t):
    tb = t[:, None, None, None]
    x = SD * xs
    S = jnp.sqrt(jnp.cos(tb) ** 2 * std ** 2 + jnp.sin(tb) ** 2 * SD ** 2)
    f = mean + std * (x - jnp.cos(tb) * mean) / S
    return (jnp.cos(tb) * x - f) / (SD * jnp.sin(tb))
  return F


def test_boundary_condition_is_exact():
  w = jnp.asarray(np.random.default_rng(0).normal(size=SHAPE), jnp.float32)
  F = lambda xs, t: jnp.tanh(xs * w + 3.0)
  x = jnp.asarray(np.random.default_rng(1).normal(size=SHAPE), jnp.float32)
  out = consistency.consistency_fn(F, x, jnp.zeros(3), SD)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


def test_exact_consistency_function_maps_along_the_ode():
  """f* (the reference the next tests use) equals RK4 integration to t = 0."""
  rng, mean, std = _gaussian()
  x = rng.normal(size=SHAPE).astype(np.float32)
  t = np.array([1.5, 0.8, 0.2], np.float32)
  got = np.asarray(consistency.consistency_fn(_exact_F(mean, std), jnp.asarray(x),
                                              jnp.asarray(t), SD))
  for i in range(3):
    np.testing.assert_allclose(got[i], _np_to_data(mean, std, x[i], t[i]), rtol=1e-4,
                               atol=1e-5)


def test_tangent_vanishes_at_the_exact_consistency_function():
  """Distillation from the exact teacher: df/dt = 0 along the ODE, so g = 0."""
  rng, mean, std = _gaussian(1)
  x = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
  t = jnp.asarray([1.5, 0.7, 0.1], jnp.float32)
  dxdt = jnp.asarray(_np_velocity(mean, std, np.asarray(x),
                                  np.asarray(t)[:, None, None, None]), jnp.float32)
  F, g = consistency.tangent(_exact_F(mean, std), x, t, dxdt, SD, norm_c=0.0)
  assert np.max(np.abs(np.asarray(g))) < 1e-5
  # A model off by a constant gets a nonzero tangent pointing back: F + g moves
  # towards F* (the sign the regression target needs).
  off = lambda xs, t: _exact_F(mean, std)(xs, t) + 0.3
  F, g = consistency.tangent(off, x, t, dxdt, SD, norm_c=0.0)
  assert np.all(np.asarray(g) < 0)


def test_tangent_jvp_matches_central_differences():
  """cos t·sin t·dF/dt inside g, against differences along (dx/dt/σ_d, 1)."""
  with jax.enable_x64():
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.normal(size=SHAPE[1:]))
    F = lambda xs, t: jnp.sin(xs * w * t[:, None, None, None]) + xs ** 2
    x, dxdt = (jnp.asarray(rng.normal(size=SHAPE)) for _ in range(2))
    t = jnp.asarray([0.3, 0.9, 1.4])
    out, g = consistency.tangent(F, x, t, dxdt, SD, warmup=1.0, norm_c=0.0)
    h = 1e-6
    dF = (F((x + h * dxdt) / SD, t + h) - F((x - h * dxdt) / SD, t - h)) / (2 * h)
    tb = t[:, None, None, None]
    want = (-jnp.cos(tb) ** 2 * (SD * out - dxdt)
            - jnp.cos(tb) * jnp.sin(tb) * (x + SD * dF))
    np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-7, atol=1e-9)
    # warm-up r = 0 drops the dF/dt term; normalisation divides by ‖g‖ + c.
    _, g0 = consistency.tangent(F, x, t, dxdt, SD, warmup=0.0, norm_c=0.0)
    np.testing.assert_allclose(np.asarray(g0), np.asarray(-jnp.cos(tb) ** 2
                                                          * (SD * out - dxdt)), rtol=1e-12)
    _, gn = consistency.tangent(F, x, t, dxdt, SD, norm_c=0.1)
    norm = np.sqrt(np.sum(np.asarray(want) ** 2, axis=(1, 2, 3)))[:, None, None, None]
    np.testing.assert_allclose(np.asarray(gn), np.asarray(want) / (norm + 0.1), rtol=1e-7)


def test_sampling_with_the_exact_model():
  rng, mean, std = _gaussian(3)
  z = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
  F = _exact_F(mean, std)
  x1 = np.asarray(consistency.sample(F, z, SD))
  np.testing.assert_allclose(x1, mean + std * np.asarray(z), rtol=1e-5, atol=1e-5)
  key = jax.random.key(7)
  x2 = np.asarray(consistency.sample(F, z, SD, mid_times=(1.1,), rng=key))
  noise = SD * np.asarray(jax.random.normal(jax.random.fold_in(key, 0), SHAPE))
  xt = math.cos(1.1) * x1 + math.sin(1.1) * noise
  want = mean + std * (xt - math.cos(1.1) * mean) / _spread(std, 1.1)
  np.testing.assert_allclose(x2, want, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="needs rng"):
    consistency.sample(F, z, SD, mid_times=(1.1,))


def test_distillation_from_the_exact_teacher_learns_the_one_step_map():
  """The process's distillation loss (`ConsistencyProcess.loss` with a teacher)
  from the exact Gaussian denoiser D(y; σ), on a per-pixel affine model
  F = a(t)·x/σ_d + b(t) (a, b cubic in t), maps noise to data in one step:
  −σ_d·F(z, π/2) ≈ mean + std·z after 300 Adam steps."""
  from ddx.processes.consistency.process import ConsistencyProcess
  rng, mean, std = _gaussian(4)
  basis = lambda t: jnp.stack([t ** k for k in range(4)], -1)      # [B, 4]
  per_unit = consistency.time_input(consistency.T_MAX) / consistency.T_MAX

  def apply(params, xs, time):          # the network's time is time_input(t)
    phi = basis(time / per_unit)
    a = jnp.einsum("bk,k...->b...", phi, params["a"])
    b = jnp.einsum("bk,k...->b...", phi, params["b"])
    return a * xs + b

  # p_mean 0.5 (sCM: -1.0) draws more times near π/2, where the one-step map
  # is read; no warm-up (no step is passed).
  process = ConsistencyProcess(sigma_data=SD, scm_p_mean=0.5)
  params = {"a": jnp.zeros((4,) + SHAPE[1:]), "b": jnp.zeros((4,) + SHAPE[1:])}
  steps, n = 300, 256
  tx = optax.adam(optax.cosine_decay_schedule(3e-2, steps))
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, key):
    k1, k2 = jax.random.split(key)
    x0 = mean + std * jax.random.normal(k1, (n,) + SHAPE[1:])
    grads = jax.grad(lambda p: process.loss(apply, p, x0, k2,
                                            teacher=_gaussian_D(mean, std))[0])(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt

  for k in range(steps):
    params, opt = step(params, opt, jax.random.key(k))
  # The one-step map is affine, x = slope·z + offset; the exact one has
  # slope std in [0.3, 1.2] and offset mean (the untrained model: 0 and 0).
  F = lambda xs, t: apply(params, xs, consistency.time_input(t))
  one_step = lambda z: np.asarray(consistency.sample(F, jnp.asarray(z), SD))
  offset = one_step(np.zeros((1,) + SHAPE[1:], np.float32))[0]
  slope = one_step(np.ones((1,) + SHAPE[1:], np.float32))[0] - offset
  np.testing.assert_allclose(slope, std, atol=0.05)
  np.testing.assert_allclose(offset, mean, atol=0.05)

def _gaussian_D(mean, std):
  """EDM's exact denoiser of Gaussian data: D(y; σ) = E[x_0 | x_0 + σn = y]
  = mean + std²/(std² + σ²)·(y − mean)."""
  def D(y, sigma):
    s2 = jnp.asarray(sigma, jnp.float32)[:, None, None, None] ** 2
    return mean + std ** 2 / (std ** 2 + s2) * (y - mean)
  return D


def test_teacher_velocity_of_the_exact_denoiser():
  """(cos t·x_t − D(x_t/cos t; σ_d tan t))/sin t is the probability-flow
  velocity of the TrigFlow marginals (the closed form above), and for a
  point mass (D ≡ x_0) the conditional velocity cos t·z − sin t·x_0."""
  rng, mean, std = _gaussian(5)
  x = rng.normal(size=SHAPE).astype(np.float32)
  t = np.array([1.5, 0.8, 0.05], np.float32)
  got = consistency.teacher_velocity(_gaussian_D(mean, std), jnp.asarray(x),
                                     jnp.asarray(t), SD)
  want = _np_velocity(mean, std, x.astype(np.float64), t[:, None, None, None])
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)
  x0, z = (rng.normal(size=SHAPE).astype(np.float32) for _ in range(2))
  tb = t[:, None, None, None]
  xt = np.cos(tb) * x0 + np.sin(tb) * z
  got = consistency.teacher_velocity(lambda y, s: jnp.asarray(x0), jnp.asarray(xt),
                                     jnp.asarray(t), SD)
  np.testing.assert_allclose(np.asarray(got), np.cos(tb) * z - np.sin(tb) * x0,
                             rtol=1e-4, atol=2e-4)


def test_noise_level_and_mid_times():
  t = np.array([0.0, 0.3, 1.2])
  np.testing.assert_allclose(np.asarray(consistency.noise_level(t, SD)),
                             SD * np.tan(t), rtol=1e-6)
  # The sampler's first time, float32(π/2), is the top noise level (the
  # guidance interval compares with it), not tan's large negative value there.
  assert float(consistency.noise_level(jnp.float32(consistency.T_MAX), SD)) == np.inf
  np.testing.assert_allclose(np.asarray(consistency.time_input(jnp.asarray([0.0, math.pi / 2]))),
                             [0.0, 1000.0], rtol=1e-6)
  assert consistency.mid_times(1, 1.1) == ()
  assert consistency.mid_times(2, 1.1) == (1.1,)              # sCM's 2-step sampler
  np.testing.assert_allclose(consistency.mid_times(4, 1.2), (1.2, 0.8, 0.4))
  with pytest.raises(ValueError, match="positive integer"):
    consistency.mid_times(0, 1.1)


def test_sample_trajectory_and_clip():
  rng, mean, std = _gaussian(6)
  z = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
  F = _exact_F(mean, std)
  key = jax.random.key(1)
  x, traj = consistency.sample(F, z, SD, (1.1, 0.5), key, return_trajectory=True)
  assert traj.shape == (3,) + SHAPE
  np.testing.assert_array_equal(np.asarray(traj[-1]), np.asarray(x))
  np.testing.assert_array_equal(np.asarray(traj[0]), np.asarray(consistency.sample(F, z, SD)))
  clipped = np.asarray(consistency.sample(F, 10 * z, SD, (1.1,), key, clip_x0=True))
  assert np.abs(clipped).max() <= 1.0


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_n_step_sampling_of_the_exact_model_draws_the_data(steps):
  """With the exact consistency function, every step count samples the data.

  Derivation: for x_0 ~ N(mean, std²) per pixel and z ~ N(0, σ_d²), x_t =
  cos t·x_0 + sin t·z ~ N(cos t·mean, S(t)²), S(t)² = cos²t·std² + sin²t·σ_d².
  The probability-flow ODE of Gaussian data is linear, and a 1-D flow keeps
  the order of points, so its map from t to 0 is the increasing affine map
  between the two Gaussians: f*(x, t) = mean + std·(x − cos t·mean)/S(t)
  (`_exact_F`; RK4 agrees, `test_exact_consistency_function_maps_along_the_ode`).
  So x = f*(σ_d·z, π/2) is exactly N(mean, std²); re-noised with fresh
  noise, cos t·x + sin t·σ_d·z_k is exactly N(cos t·mean, S(t)²) again and
  f* maps it back onto the data, at every t of the grid. Any grid, any step
  count: the output is N(mean, std²). Re-noising with noise correlated with
  z or with an earlier z_k, or with the wrong scale (σ_d twice or not at
  all), changes the variance. For 2 steps the joint law is known as well:
  x = mean + std·(cos t·std·z + sin t·σ_d·z_1)/S(t), so corr(x, z) =
  cos t·std/S(t) at t = scm_mid_t (1 with z_1 = z).

  Run as users call it (`ddx.sample`, the Process's rng and grid), and with
  the x_T that `ddx.sample_fn` draws from the same key passed in (the
  same program then). Tolerances: 5 standard errors of n samples, SE of the
  mean std/√n, of the std std/√(2n), of a correlation (1 − ρ²)/√n.
  """
  from ddx.processes import common
  from ddx.processes.consistency.process import ConsistencyProcess
  from ddx.sampling.steps import initial_noise
  rng, mean, std = _gaussian(7)
  process = ConsistencyProcess(sigma_data=SD)
  n, shape = 20_000, SHAPE[1:]
  key = jax.random.key(11)
  F = _exact_F(mean, std)
  x = np.asarray(common.sample(F, process, key, (n,) + shape, steps=steps), np.float64)
  z = initial_noise(key, (n,) + shape)
  same = common.sample(F, process, key, (n,) + shape, steps=steps, x_T=z)
  np.testing.assert_array_equal(np.asarray(same), x.astype(np.float32))
  np.testing.assert_array_less(np.abs(x.mean(0) - mean), 5 * std / math.sqrt(n))
  np.testing.assert_array_less(np.abs(x.std(0) - std), 5 * std / math.sqrt(2 * n))
  if steps == 2:
    t = process.scm_mid_t
    rho = math.cos(t) * std / _spread(std, t)
    zc = np.asarray(z, np.float64)
    got = np.mean((x - x.mean(0)) * (zc - zc.mean(0)), 0) / (x.std(0) * zc.std(0))
    np.testing.assert_array_less(np.abs(got - rho), 5 * (1 - rho ** 2) / math.sqrt(n))
