"""Samplers against NumPy references, closed-form statistics and an exact denoiser."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddx
from ddx.processes.ddpm import sampling as discrete
from ddx.processes.ddpm import schedules
from testutils import as_prediction, gaussian_denoiser


def _np_sched(T):
  # Large betas so that a short test schedule still ends close to pure noise.
  betas = np.linspace(1e-3, 0.3, T)
  return betas, np.cumprod(1 - betas)


def _sched(T):
  return schedules.from_betas(_np_sched(T)[0])


def test_timesteps_follow_ddim():
  np.testing.assert_array_equal(discrete.timesteps(1000, 50), np.arange(980, -1, -20))
  np.testing.assert_array_equal(discrete.timesteps(10, 10), np.arange(9, -1, -1))
  seq = discrete.timesteps(1000, 30)   # k = 33: starts at 29*33 = 957
  assert len(seq) == 30 and seq[0] == 957 and seq[-1] == 0
  for bad in (0, 1001, 2.5):
    with pytest.raises(ValueError, match="steps"):
      discrete.timesteps(1000, bad)


@pytest.mark.parametrize("steps", [10, 25])
def test_ddim_eta0_matches_numpy_eq12(steps):
  """DDIM Eq. 12 with η = 0 for ε_θ(x, t) = 0.1·x, step for step."""
  T = 100
  _, ab = _np_sched(T)
  x_T = np.random.default_rng(0).normal(size=(3, 4, 4, 1)).astype(np.float32)
  x = x_T.astype(np.float64)
  seq = list(range(0, T, T // steps))[::-1]
  ref = []
  for j, i in enumerate(seq):
    a_t = ab[i]
    a_s = ab[seq[j + 1]] if j + 1 < len(seq) else 1.0
    eps = 0.1 * x
    x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    x = np.sqrt(a_s) * x0 + np.sqrt(1 - a_s) * eps
    ref.append(x)
  out, traj = ddx.sample(lambda x, i: 0.1 * x, _sched(T), jax.random.key(0),
                         x_T.shape, sampler="ddim", steps=steps, eta=0.0,
                         x_T=jnp.asarray(x_T), spacing="uniform", return_trajectory=True)
  assert traj.shape == (steps,) + x_T.shape
  np.testing.assert_allclose(traj, np.stack(ref), rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(out, ref[-1], rtol=2e-4, atol=2e-5)


def test_ddpm_scan_equals_python_loop_eq11():
  """The scan sampler against DDPM Alg. 2 / Eq. 11 in a Python loop, same noise."""
  T = 20
  betas, ab = _np_sched(T)
  sched = _sched(T)
  shape = (2, 3, 3, 1)
  rng = jax.random.key(7)
  fn = lambda x, i: jnp.sin(x) * 0.3 + 0.01 * i[:, None, None, None]
  out, traj = ddx.sample(fn, sched, rng, shape, sampler="ddpm", steps=T,
                         return_trajectory=True)
  # The driver's key scheme: one key for x_T, one per step.
  init_key, step_key = jax.random.split(rng)
  keys = jax.random.split(step_key, T)
  x = np.asarray(jax.random.normal(init_key, shape), np.float64)
  for j, i in enumerate(range(T - 1, -1, -1)):
    eps = np.asarray(fn(jnp.asarray(x, jnp.float32), jnp.full((2,), i, jnp.int32)),
                     np.float64)
    mean = (x - betas[i] / np.sqrt(1 - ab[i]) * eps) / np.sqrt(1 - betas[i])
    if i > 0:
      var = betas[i] * (1 - ab[i - 1]) / (1 - ab[i])      # β̃_t
      z = np.asarray(jax.random.normal(keys[j], shape), np.float64)
      x = mean + np.sqrt(var) * z
    else:
      x = mean
    np.testing.assert_allclose(traj[j], x, rtol=1e-3, atol=1e-4, err_msg=f"step {j}")
  np.testing.assert_allclose(out, x, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_ddpm_variance_linear_model_closed_form(variance):
  """ε_θ = c·x makes every step affine: x_{t-1} = m_t x_t + σ_t z, so
  Var[x_0] follows v_{t-1} = m_t² v_t + σ_t² from v_T = 1."""
  T, c, n = 30, 0.5, 40_000
  betas, ab = _np_sched(T)
  v = 1.0
  for i in range(T - 1, -1, -1):
    m = (1 - betas[i] * c / np.sqrt(1 - ab[i])) / np.sqrt(1 - betas[i])
    if i == 0:
      s2 = 0.0
    elif variance == "posterior":
      s2 = betas[i] * (1 - ab[i - 1]) / (1 - ab[i])
    else:
      s2 = betas[i]
    v = m * m * v + s2
  x = ddx.sample(lambda x, i: c * x, _sched(T), jax.random.key(1), (n, 1),
                 sampler="ddpm", steps=T, ddpm_variance=variance)
  assert float(jnp.var(x)) == pytest.approx(v, rel=0.03)
  assert abs(float(jnp.mean(x))) < 0.03 * np.sqrt(v)


def test_ddim_eta1_equals_ancestral_over_full_sequence():
  """With steps = T, DDIM η = 1 has σ² = β̃: the same law as DDPM (same mean,
  same noise scale), so with the same keys the samples coincide."""
  T = 20
  fn = lambda x, i: 0.2 * x
  a = ddx.sample(fn, _sched(T), jax.random.key(3), (4, 2), sampler="ddim", steps=T, eta=1.0)
  b = ddx.sample(fn, _sched(T), jax.random.key(3), (4, 2), sampler="ddpm", steps=T)
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _standard_normal_grid(n):
  """n points with exactly mean 0 and std 1 (normal quantiles, standardised):
  the samplers are linear maps here, so moment errors are pure discretisation."""
  from scipy.stats import norm
  z = norm.ppf((np.arange(n) + 0.5) / n)
  return jnp.asarray(((z - z.mean()) / z.std())[:, None], jnp.float32)


def _moment_error(sampler, steps, s=0.1, spacing=None):
  sched = schedules.linear(1000)
  mu = 0.5
  x = ddx.sample(gaussian_denoiser(sched, mu, s), sched, jax.random.key(0), (2001, 1),
                 sampler=sampler, steps=steps, x_T=_standard_normal_grid(2001),
                 spacing=spacing)
  return abs(float(jnp.mean(x)) - mu) + abs(float(jnp.std(x)) - s)


@pytest.mark.parametrize("s", [0.1, 0.5])
def test_deterministic_samplers_converge_on_gaussian_data(s):
  """With the exact denoiser for x_0 ~ N(0.5, s²), DDIM (η=0) and DPM-Solver++
  converge to the data distribution, and DPM-Solver++(2M) is closer than DDIM
  at every small step count."""
  ks = (5, 10, 20, 500)
  e_ddim = [_moment_error("ddim", k, s) for k in ks]
  e_dpm = [_moment_error("dpm_solver_pp", k, s) for k in ks]
  assert e_ddim[-1] < 0.01 * (s / 0.1) and e_dpm[-1] < 0.005
  assert e_ddim[0] > e_ddim[1] > e_ddim[2] > e_ddim[3]
  for a, b in zip(e_dpm[:3], e_ddim[:3]):
    assert a < 0.7 * b, (e_dpm, e_ddim)


def test_dpm_solver_pp_matches_numpy_reference():
  """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in float64 NumPy on a linear
  denoiser, over the same log-SNR index sequence."""
  sched = schedules.linear(1000)
  ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
  seq = discrete.timesteps(1000, 8, "logsnr", sched)
  lam = lambda a: 0.5 * np.log(a / (1 - a))
  x0_of = lambda x, a: 0.3 * np.sqrt(a) * x      # any linear x̂_0(x_t)
  x, prev, h_prev = np.array([1.0, -0.5]), None, None
  for j, i in enumerate(seq):
    a_t = ab[i]
    d = x0_of(x, a_t)
    if j + 1 == len(seq):
      x = d
      break
    a_s = ab[seq[j + 1]]
    h = lam(a_s) - lam(a_t)
    D = d if prev is None else (1 + h / (2 * h_prev)) * d - h / (2 * h_prev) * prev
    x = np.sqrt((1 - a_s) / (1 - a_t)) * x - np.sqrt(a_s) * np.expm1(-h) * D
    prev, h_prev = d, h
  def fn(xt, i):   # the same model as an ε-prediction
    a = sched.alphas_cumprod[i][:, None]
    return (xt - jnp.sqrt(a) * 0.3 * jnp.sqrt(a) * xt) / jnp.sqrt(1 - a)
  out = ddx.sample(fn, sched, jax.random.key(0), (2, 1), sampler="dpm_solver_pp",
                   steps=8, x_T=jnp.array([[1.0], [-0.5]]))
  np.testing.assert_allclose(out[:, 0], x, rtol=1e-4)


def test_logsnr_spacing():
  sched = schedules.linear(1000)
  assert list(discrete.timesteps(1000, 1, "logsnr", sched)) == [999]
  for steps in (2, 10, 100, 1000):
    seq = discrete.timesteps(1000, steps, "logsnr", sched)
    assert len(seq) == steps and seq[-1] == 0 and np.all(np.diff(seq) < 0)
  seq = discrete.timesteps(1000, 10, "logsnr", sched)
  assert seq[0] == 999
  a = np.asarray(sched.alphas_cumprod, np.float64)[seq]
  lam = 0.5 * np.log(a / (1 - a))
  h = np.diff(lam)
  assert h.max() / h.min() < 2.0    # close to even in λ (uniform skip: > 10x)


def test_prediction_types_agree_through_a_sampler():
  """The same denoiser expressed as ε, x0 or v gives the same DDIM samples."""
  sched = _sched(50)
  eps_fn = lambda x, i: 0.3 * jnp.tanh(x)
  as_pred = lambda kind: as_prediction(eps_fn, sched, kind)
  outs = [ddx.sample(as_pred(k), sched, jax.random.key(2), (5, 3), steps=10,
                     prediction=k) for k in ("eps", "x0", "v")]
  np.testing.assert_allclose(outs[1], outs[0], rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(outs[2], outs[0], rtol=1e-3, atol=1e-4)


def test_x_T_rng_determinism_and_clip():
  sched = _sched(50)
  fn = lambda x, i: -2.0 * x   # pushes x̂_0 far outside [-1, 1]
  x_T = jax.random.normal(jax.random.key(9), (3, 2))
  a = ddx.sample(fn, sched, jax.random.key(0), (3, 2), sampler="ddpm", steps=50, x_T=x_T)
  b = ddx.sample(fn, sched, jax.random.key(0), (3, 2), sampler="ddpm", steps=50, x_T=x_T)
  c = ddx.sample(fn, sched, jax.random.key(1), (3, 2), sampler="ddpm", steps=50, x_T=x_T)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  d = ddx.sample(fn, sched, jax.random.key(0), (3, 2), steps=10, x_T=x_T)
  e = ddx.sample(fn, sched, jax.random.key(5), (3, 2), steps=10, x_T=x_T)
  np.testing.assert_array_equal(d, e)   # DDIM η=0 uses no noise after x_T
  assert float(jnp.max(jnp.abs(d))) > 1.0
  clipped = ddx.sample(fn, sched, jax.random.key(0), (3, 2), steps=10, x_T=x_T, clip_x0=True)
  assert float(jnp.max(jnp.abs(clipped))) <= 1.0


def test_sample_is_one_program_under_caller_jit():
  sched = _sched(100)
  w = jnp.float32(0.1)

  @jax.jit
  def run(w, rng):
    return ddx.sample(lambda x, i: w * x, sched, rng, (2, 2), steps=100)

  jaxpr = jax.make_jaxpr(run)(w, jax.random.key(0))
  text = str(jaxpr)
  assert "scan" in text and text.count("mul") < 200   # not unrolled over 100 steps
  np.testing.assert_allclose(run(w, jax.random.key(0)),
                             ddx.sample(lambda x, i: w * x, sched, jax.random.key(0),
                                        (2, 2), steps=100), rtol=1e-5)


def test_bad_sampler_arguments():
  sched = _sched(10)
  with pytest.raises(ValueError, match="sampler"):
    ddx.sample(lambda x, i: x, sched, jax.random.key(0), (1, 1), sampler="rk4")
  with pytest.raises(ValueError, match="steps"):
    ddx.sample(lambda x, i: x, sched, jax.random.key(0), (1, 1), steps=11)
  with pytest.raises(ValueError, match="ddpm_variance"):
    ddx.sample(lambda x, i: x, sched, jax.random.key(0), (1, 1), ddpm_variance="big")


def test_trailing_and_quadratic_spacings_follow_their_papers():
  # Lin et al. (2024), Table 2, "trailing": round(arange(T, 0, -T/S)) - 1.
  want = np.round(np.arange(1000, 0, -1000 / 10)).astype(int) - 1
  np.testing.assert_array_equal(discrete.timesteps(1000, 10, "trailing"), want)
  assert list(discrete.timesteps(1000, 1, "trailing")) == [999]
  np.testing.assert_array_equal(discrete.timesteps(10, 10, "trailing"), np.arange(9, -1, -1))
  # DDIM's CIFAR-10 code: int(c**2) for c in linspace(0, sqrt(0.8 T), S), ascending.
  ddim = [int(c ** 2) for c in np.linspace(0, np.sqrt(1000 * 0.8), 10)]
  np.testing.assert_array_equal(discrete.timesteps(1000, 10, "quadratic"), ddim[::-1])
  # From S = 100 DDIM's code repeats 0, 0, 0, 0, 1, ...: ddx keeps them distinct.
  q = discrete.timesteps(1000, 100, "quadratic")
  assert np.all(np.diff(q) < 0) and q[0] == 800 and q[-1] == 0
  with pytest.raises(ValueError, match="spacing='logsnr' needs the schedule"):
    discrete.timesteps(1000, 10, "logsnr")
  with pytest.raises(ValueError, match="spacing='cubic' is unknown"):
    discrete.timesteps(1000, 10, "cubic")


def test_one_step_from_pure_noise_only_with_trailing():
  """Uniform spacing's single step evaluates index 0 and returns the noise;
  trailing starts at T-1 and lands near the data (exact Gaussian denoiser)."""
  sched = schedules.linear(1000)
  mu, s = 0.3, 0.1
  fn = gaussian_denoiser(sched, mu, s)
  x_T = jax.random.normal(jax.random.key(0), (4000, 1))
  kw = dict(sampler="ddim", steps=1, x_T=x_T)
  uniform = ddx.sample(fn, sched, jax.random.key(1), (4000, 1), spacing="uniform", **kw)
  trailing = ddx.sample(fn, sched, jax.random.key(1), (4000, 1), spacing="trailing", **kw)
  assert abs(float(uniform.std()) - 1.0) < 0.05          # still the noise
  # One step from T-1 lands on E[x0 | x_T] ≈ mu (x_T carries almost no signal).
  assert abs(float(trailing.mean()) - mu) < 0.01 and float(trailing.std()) < 0.02
  # The default spacing of ddim is trailing.
  default = ddx.sample(fn, sched, jax.random.key(1), (4000, 1), **kw)
  np.testing.assert_array_equal(default, trailing)
