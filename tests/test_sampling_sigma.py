"""σ-grid samplers (EDM Alg. 1-2, Euler, DPM-Solver++) against NumPy transcriptions,
the exact Gaussian denoiser, and the VP mapping of a DDPM model; the dispatcher."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

import ddx
from ddx.processes.ddpm import vp
from ddx.processes.edm import core as edm
from ddx.processes.flow import core as flow
from ddx.processes.ddpm import schedules
from ddx import processes
from ddx.sampling import sigma
from testutils import gaussian_denoiser

MU, S = 0.3, 0.5


def _exact_d(x, sg):
  """E[y | y + σn = x] for y ~ N(MU, S²): the ideal denoiser, [B, 1]."""
  return MU + S ** 2 / (S ** 2 + sg[:, None] ** 2) * (x - MU)


def _np_d(x, sg):
  """A nonlinear denoiser for the step-by-step transcriptions (NumPy)."""
  return np.tanh(x) * 0.8 / (1.0 + 0.1 * sg) + 0.05 * sg


def _jax_d(x, sg):
  sg = sg.reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.tanh(x) * 0.8 / (1.0 + 0.1 * sg) + 0.05 * sg


def _grid_noise(n):
  """n standardised normal quantiles: moment errors are then discretisation only."""
  z = norm.ppf((np.arange(n) + 0.5) / n)
  return (z - z.mean()) / z.std()


def _alg1_np(x, grid, heun=True):
  """EDM Alg. 1 (lines 3-8) in float64 NumPy, the step to σ = 0 Euler."""
  out = []
  for i in range(len(grid) - 1):
    s, s1 = grid[i], grid[i + 1]
    d = (x - _np_d(x, s)) / s
    x_next = x + (s1 - s) * d
    if heun and s1 != 0:
      d2 = (x_next - _np_d(x_next, s1)) / s1
      x_next = x + (s1 - s) * (0.5 * d + 0.5 * d2)
    x = x_next
    out.append(x)
  return np.stack(out)


@pytest.mark.parametrize("sampler", ["heun", "euler"])
def test_heun_and_euler_match_edm_alg1(sampler):
  grid = sigma.karras_sigmas(0.02, 20.0, 7.0, 5)
  x_T = np.random.default_rng(0).normal(size=(3, 2, 2, 1))
  ref = _alg1_np(grid[0] * x_T, grid, heun=sampler == "heun")
  out, traj = sigma.sample(_jax_d, grid, jax.random.key(0), x_T.shape, sampler,
                           x_T=jnp.asarray(x_T, jnp.float32), return_trajectory=True)
  assert traj.shape == (5,) + x_T.shape
  np.testing.assert_allclose(traj, ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out, ref[-1], rtol=1e-4, atol=1e-5)


def test_heun_single_step_to_positive_sigma_is_corrected():
  """A one-step grid [σ_0, σ_1 > 0] takes the full trapezoid step."""
  grid = np.array([2.0, 0.5])
  x_T = np.array([[0.7], [-1.2]])
  ref = _alg1_np(grid[0] * x_T, grid)[-1]
  euler = _alg1_np(grid[0] * x_T, grid, heun=False)[-1]
  out = sigma.sample(_jax_d, grid, jax.random.key(0), (2, 1), "heun",
                     x_T=jnp.asarray(x_T, jnp.float32))
  np.testing.assert_allclose(out, ref, rtol=1e-5)
  assert np.abs(ref - euler).min() > 5e-3   # the correction is not a no-op here


def test_stochastic_matches_edm_alg2():
  """EDM Alg. 2 in NumPy with the sampler's own noise draws."""
  n, churn, s_tmin, s_tmax, s_noise = 6, 2.0, 0.1, 5.0, 1.007
  grid = sigma.karras_sigmas(0.02, 20.0, 7.0, n)
  shape = (4, 3)
  rng = jax.random.key(3)
  x_T = np.asarray(ddx.sampling.initial_noise(rng, shape), np.float64)
  keys = jax.random.split(jax.random.split(rng)[1], n)
  x = grid[0] * x_T
  ref, gammas = [], []
  for i in range(n):
    s, s1 = grid[i], grid[i + 1]
    gamma = min(churn / n, np.sqrt(2) - 1) if s_tmin <= s <= s_tmax else 0.0
    gammas.append(gamma)
    eps = s_noise * np.asarray(jax.random.normal(keys[i], shape), np.float64)
    s_hat = s + gamma * s
    x_hat = x + np.sqrt(s_hat ** 2 - s ** 2) * eps
    d = (x_hat - _np_d(x_hat, s_hat)) / s_hat
    x = x_hat + (s1 - s_hat) * d
    if s1 != 0:
      d2 = (x - _np_d(x, s1)) / s1
      x = x_hat + (s1 - s_hat) * (0.5 * d + 0.5 * d2)
    ref.append(x)
  assert 0 < sum(g > 0 for g in gammas) < n     # the band excludes some steps
  out, traj = sigma.sample(_jax_d, grid, rng, shape, "stochastic", churn=churn,
                           s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise,
                           return_trajectory=True)
  np.testing.assert_allclose(traj, np.stack(ref), rtol=1e-4, atol=1e-5)
  # churn = 0 is Heun, and a huge churn is capped at γ = √2 − 1.
  heun = sigma.sample(_jax_d, grid, rng, shape, "heun")
  np.testing.assert_allclose(sigma.sample(_jax_d, grid, rng, shape, "stochastic"),
                             heun, rtol=1e-6)
  big = sigma.sample(_jax_d, grid, rng, shape, "stochastic", churn=1e6)
  capped = sigma.sample(_jax_d, grid, rng, shape, "stochastic",
                        churn=n * (np.sqrt(2) - 1))
  np.testing.assert_allclose(big, capped, rtol=1e-5)


def test_dpm_solver_pp_matches_numpy_2m():
  """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) with α = 1, σ_t = σ, λ = −log σ."""
  grid = sigma.karras_sigmas(0.02, 20.0, 7.0, 6)
  x_T = np.random.default_rng(1).normal(size=(5, 1))
  x, prev, h_prev, ref = grid[0] * x_T, None, None, []
  for i in range(6):
    s, s1 = grid[i], grid[i + 1]
    d = _np_d(x, s)
    if s1 == 0:
      x = d
    else:
      h = np.log(s) - np.log(s1)
      dd = d if prev is None else (1 + h / (2 * h_prev)) * d - h / (2 * h_prev) * prev
      x = (s1 / s) * x - np.expm1(-h) * dd
      prev, h_prev = d, h
    ref.append(x)
  _, traj = sigma.sample(_jax_d, grid, jax.random.key(0), (5, 1), "dpm_solver_pp",
                         x_T=jnp.asarray(x_T, jnp.float32), return_trajectory=True)
  np.testing.assert_allclose(traj, np.stack(ref), rtol=1e-4, atol=1e-5)


def _edm_errors(sampler, ks, n=257):
  """Max error of x(σ = 0) against the exact ODE solution for Gaussian data:
  dx/dσ = σ(x − μ)/(s² + σ²) keeps (x − μ)/√(s² + σ²) constant."""
  z = _grid_noise(n)
  errs = []
  for k in ks:
    g = sigma.karras_sigmas(0.002, 80.0, 7.0, k)
    exact = MU + S * (g[0] * z - MU) / np.sqrt(S ** 2 + g[0] ** 2)
    x = sigma.sample(_exact_d, g, jax.random.key(0), (n, 1), sampler,
                     x_T=jnp.asarray(z[:, None], jnp.float32))
    errs.append(np.abs(np.asarray(x, np.float64)[:, 0] - exact).max())
  return np.array(errs)


def _slope(ks, errs):
  return -np.polyfit(np.log(ks), np.log(errs), 1)[0]


@pytest.mark.parametrize("sampler,lo,hi", [("euler", 0.85, 1.15), ("heun", 1.8, 2.3),
                                           ("dpm_solver_pp", 1.8, 2.4)])
def test_convergence_order_on_gaussian_data(sampler, lo, hi):
  """Heun (and DPM-Solver++(2M)) converge at second order, Euler at first."""
  ks = (16, 32, 64, 128)
  errs = _edm_errors(sampler, ks)
  assert np.all(np.diff(errs) < 0), errs
  assert lo < _slope(ks, errs) < hi, (errs, _slope(ks, errs))


@pytest.mark.parametrize("sampler,steps", [("heun", 64), ("euler", 512),
                                           ("dpm_solver_pp", 64)])
def test_edm_samples_have_the_data_moments(sampler, steps):
  """With the exact D for y ~ N(0.3, 0.5²) and random noise, the samples'
  mean and std are the data's within Monte-Carlo error (4 standard errors)."""
  n = 4000
  x = ddx.sample(_exact_d, edm.EDM(), jax.random.key(11), (n, 1), sampler, steps)
  x = np.asarray(x, np.float64)
  assert abs(x.mean() - MU) < 4 * S / np.sqrt(n)
  assert abs(x.std() - S) < 4 * S / np.sqrt(2 * n)


def test_stochastic_sampler_moments():
  """Alg. 2 with churn still samples the data law (it adds and removes noise)."""
  n = 4000
  x = np.asarray(ddx.sample(_exact_d, edm.EDM(), jax.random.key(5), (n, 1),
                            "stochastic", 64, churn=30.0, s_tmin=0.05, s_tmax=50.0),
                 np.float64)
  assert abs(x.mean() - MU) < 4 * S / np.sqrt(n)
  assert abs(x.std() - S) < 4 * S / np.sqrt(2 * n) + 0.005


def test_start_is_sigma_max_times_the_ddpm_noise():
  """x_T is unit noise, drawn as the DDPM samplers draw it, scaled by σ_0."""
  p = edm.EDM()
  shape = (3, 2)
  _, traj = ddx.sample(lambda x, sg: jnp.zeros_like(x), p, jax.random.key(4), shape,
                       "euler", 3, return_trajectory=True)
  g = sigma.karras_sigmas(p.sigma_min, p.sigma_max, p.rho, 3)
  z = np.asarray(ddx.sampling.initial_noise(jax.random.key(4), shape))
  # D = 0: each Euler step multiplies x by σ_{i+1}/σ_i, so x_1 = σ_1·z.
  np.testing.assert_allclose(traj[0], g[1] * z, rtol=1e-5)


# ----------------------------------------------------------------- VP mapping

def _fractional_eps(sched):
  """The exact ε for Gaussian data at a fractional index i: σ(i) by linear
  interpolation of log σ_i in i (the inverse of sigma_index="interp")."""
  log_sig = jnp.asarray(np.log(vp.vp_sigmas(sched)), jnp.float32)

  def fn(x, i):
    assert i.dtype == jnp.float32
    ls = jnp.interp(i, jnp.arange(log_sig.shape[0], dtype=jnp.float32), log_sig)
    a = (1.0 / (1.0 + jnp.exp(2.0 * ls)))[:, None]
    x0 = MU + jnp.sqrt(a) * S ** 2 / (a * S ** 2 + 1 - a) * (x - jnp.sqrt(a) * MU)
    return (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
  return fn


@pytest.mark.parametrize("index", ["nearest", "interp"])
def test_ddpm_model_sampled_with_heun_on_a_sigma_grid(index):
  """A DDPM schedule with the exact Gaussian ε-denoiser, sampled with Heun
  through the VP mapping, gives the data's mean and std. The start σ_max =
  √((1 − ᾱ_T)/ᾱ_T) ≈ 157 misses the data mean by μ·s/σ_max ≈ 0.001."""
  sched = schedules.linear(1000)
  fn = gaussian_denoiser(sched, MU, S) if index == "nearest" else _fractional_eps(sched)
  z = jnp.asarray(_grid_noise(1001)[:, None], jnp.float32)
  x = ddx.sample(fn, sched, jax.random.key(0), (1001, 1), "heun", 64, x_T=z,
                 sigma_index=index)
  x = np.asarray(x, np.float64)
  assert abs(x.mean() - MU) < 0.002 and abs(x.std() - S) < 0.004, (x.mean(), x.std())
  # and it converges like Heun: 4x the steps, ~16x smaller std error
  x16 = np.asarray(ddx.sample(fn, sched, jax.random.key(0), (1001, 1), "heun", 16,
                              x_T=z, sigma_index=index), np.float64)
  assert abs(x16.std() - S) > 8 * abs(x.std() - S)


def test_vp_grid_and_indices():
  sched = schedules.linear(1000)
  s = vp.vp_sigmas(sched)
  a = np.asarray(sched.alphas_cumprod, np.float64)
  np.testing.assert_allclose(s, np.sqrt((1 - a) / a))
  g = vp.vp_grid(sched, 10, "interp")
  np.testing.assert_allclose(g, sigma.karras_sigmas(s[0], s[-1], 7.0, 10))
  gn = vp.vp_grid(sched, 10, "nearest")
  assert gn[-1] == 0 and np.all(np.isin(gn[:-1], s))
  assert gn[0] == s[-1] and gn[-2] == s[0]
  np.testing.assert_array_less(np.abs(gn[:-1] - g[:-1]),
                               np.abs(np.diff(s)).max())
  # x0 prediction of "the index itself": D returns the index the network got.
  idx_fn = lambda x, i: jnp.broadcast_to(i.astype(jnp.float32)[:, None], x.shape)
  for index, sg, want in [
      ("nearest", [s[10] * 1.001, s[500] * 0.999], [10, 500]),
      ("interp", [np.sqrt(s[10] * s[11]), s[700]], [10.5, 700.0])]:
    D = vp.vp_denoiser(idx_fn, sched, "x0", index)
    out = D(jnp.ones((2, 1)), jnp.asarray(sg, jnp.float32))
    np.testing.assert_allclose(out[:, 0], want, rtol=1e-4)
  # the network sees x_t = x/√(1 + σ²); an x0-net returning x_t gives that back
  D = vp.vp_denoiser(lambda x, i: x, sched, "x0", "interp")
  sg = jnp.asarray([0.5, 3.0])
  np.testing.assert_allclose(D(jnp.full((2, 1), 2.0), sg)[:, 0],
                             2.0 / np.sqrt(1 + np.asarray(sg) ** 2), rtol=1e-6)


# ----------------------------------------------------------------- dispatcher

def test_ddpm_default_is_unchanged():
  """sampler=None on a Schedule is DDIM, as before."""
  sched = schedules.linear(50)
  fn = lambda x, i: 0.1 * x
  a = ddx.sample(fn, sched, jax.random.key(0), (2, 3), steps=10)
  b = ddx.sample(fn, sched, jax.random.key(0), (2, 3), "ddim", 10)
  np.testing.assert_array_equal(a, b)


def test_edm_clip_x0():
  x = ddx.sample(lambda x, sg: 5.0 + 0 * x, edm.EDM(), jax.random.key(0), (3, 2),
                 "heun", 8, clip_x0=True)
  np.testing.assert_allclose(x, 1.0, rtol=1e-5)


def test_samplers_by_process_and_errors():
  for name in processes.names():   # every registered process's sampler list is coherent
    s = processes.spec(name)
    assert s.default_sampler in s.samplers, name
    assert set(s.spaced_samplers) <= set(s.samplers), name
  d = lambda x, s: x
  key = jax.random.key(0)
  for process, bad in [(edm.EDM(), "ddim"), (edm.EDM(), "ddpm"),
                       (flow.Flow(), "stochastic"), (flow.Flow(), "dpm_solver_pp"),
                       (schedules.linear(10), "rk4")]:
    with pytest.raises(ValueError, match=r"sampler=.* is not a sampler of diffusion.process=\w+; "
                       r"use one of \(") as e:
      ddx.sample(d, process, key, (1, 1), bad)
    assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="churn"):
    ddx.sample(d, edm.EDM(), key, (1, 1), "heun", churn=10.0)
  with pytest.raises(ValueError, match="spacing"):
    ddx.sample(d, edm.EDM(), key, (1, 1), "heun", spacing="logsnr")
  with pytest.raises(ValueError, match="sigma_index"):
    ddx.sample(d, schedules.linear(10), key, (1, 1), "heun", sigma_index="round")
  with pytest.raises(ValueError, match="diffusion.sigma_min"):
    ddx.sample(d, edm.EDM(sigma_min=100.0), key, (1, 1), "heun")
  with pytest.raises(ValueError, match="diffusion.shift"):
    ddx.sample(d, flow.Flow(shift=0.0), key, (1, 1), "euler")
  with pytest.raises(ValueError, match="steps"):
    ddx.sample(d, edm.EDM(), key, (1, 1), "heun", 0)
  with pytest.raises(ValueError, match="process"):
    ddx.sample(d, "edm", key, (1, 1), "heun")
  with pytest.raises(ValueError, match="descend"):
    sigma.sample(d, np.array([1.0, 2.0, 0.0]), key, (1, 1), "heun")


def test_one_program_and_one_evaluation_on_the_last_heun_step():
  """Under jit the sampler is one scan (not unrolled), and Heun calls D
  2N − 1 times: the second call sits in a cond skipped at σ = 0."""
  count = {"n": 0}

  def counted(x, sg):
    def host(a):
      count["n"] += 1
      return np.asarray(a)
    return jax.pure_callback(host, jax.ShapeDtypeStruct(x.shape, x.dtype), 0.5 * x)

  run = jax.jit(lambda rng: ddx.sample(counted, edm.EDM(), rng, (2, 1), "heun", 12))
  text = str(jax.make_jaxpr(run)(jax.random.key(0)))
  assert "scan" in text and "cond" in text
  jax.block_until_ready(run(jax.random.key(0)))
  assert count["n"] == 2 * 12 - 1


# ------------------------------------------------- repeated σ and σ̂ rounding

@pytest.mark.parametrize("sampler", ["euler", "heun", "dpm_solver_pp"])
def test_a_repeated_sigma_is_a_no_op(sampler):
  """A grid with repeated σ (zero-length steps) samples exactly as the grid
  without the repeats. DPM-Solver++(2M) used to return NaN: h = 0 made the
  next step's r = h_prev/h zero."""
  ties = np.array([20.0, 5.0, 5.0, 1.0, 0.3, 0.3, 0.3, 0.05, 0.0])
  once = np.array([20.0, 5.0, 1.0, 0.3, 0.05, 0.0])
  x_T = jnp.asarray(np.random.default_rng(2).normal(size=(5, 1)), jnp.float32)
  a = sigma.sample(_jax_d, ties, jax.random.key(0), (5, 1), sampler, x_T=x_T)
  b = sigma.sample(_jax_d, once, jax.random.key(0), (5, 1), sampler, x_T=x_T)
  assert np.all(np.isfinite(a))
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_vp_grid_nearest_has_no_repeats(name):
  """Rounding a Karras grid to the schedule's σ_i maps several points to one
  σ_i where the schedule is sparse (150 steps on linear(1000): 3 repeats;
  cosine: from 10 steps on); vp_grid drops them, so they cost nothing."""
  sched = getattr(schedules, name)(1000)
  s = vp.vp_sigmas(sched)
  for steps in (10, 150):
    g = vp.vp_grid(sched, steps, "nearest")
    assert np.all(np.diff(g) < 0) and g[-1] == 0 and np.all(np.isin(g[:-1], s))
    karras = sigma.karras_sigmas(s[0], s[-1], 7.0, steps)[:-1]
    want = np.unique(s[np.argmin(np.abs(karras[:, None] - s[None, :]), axis=1)])[::-1]
    np.testing.assert_array_equal(g[:-1], want)
  g = vp.vp_grid(schedules.linear(1000), 150, "nearest")
  assert len(g) == 151 - 3
  x = sigma.sample(_jax_d, g, jax.random.key(0), (4, 1), "dpm_solver_pp")
  assert np.all(np.isfinite(x))


@pytest.mark.parametrize("index", ["nearest", "interp"])
def test_stochastic_sigma_hat_is_one_the_network_knows(index):
  """EDM Alg. 2 for a discrete-time network: t̂_i = t_i + γ_i·t_i is rounded to
  a σ the network was trained at (EDM's code does this for its discrete
  iDDPM model: round_sigma) before the noise √(t̂² − t²)·S_noise·ε is added,
  and D is evaluated at that same t̂; so t̂ never exceeds σ_max. "nearest"
  rounds to the nearest schedule σ_i, "interp" caps at σ_max = σ_{T−1}.
  The ε-network ε = c·x_t makes D(x; σ) = x·(1 − c·σ/√(1 + σ²)) (EDM Table 1,
  VP: x_t = x/√(1 + σ²), D = (x_t − √(1 − ᾱ)·ε)/√ᾱ)."""
  sched, c, churn, s_noise = schedules.linear(100), 0.5, 10.0, 1.0
  s = vp.vp_sigmas(sched)
  seen = []
  record = lambda i: seen.append(np.asarray(i)[0])

  def eps_fn(x_t, i):
    jax.debug.callback(record, i)
    return c * x_t

  shape, rng = (3, 2), jax.random.key(1)
  _, traj = ddx.sample(eps_fn, sched, rng, shape, "stochastic", 8, churn=churn,
                       s_noise=s_noise, sigma_index=index, return_trajectory=True)
  grid = vp.vp_grid(sched, 8, index)
  n = len(grid) - 1
  d_np = lambda x, sg: x * (1 - c * sg / np.sqrt(1 + sg ** 2))
  keys = jax.random.split(jax.random.split(rng)[1], n)
  x = grid[0] * np.asarray(ddx.sampling.initial_noise(rng, shape), np.float64)
  gamma = min(churn / n, np.sqrt(2) - 1)
  ref, hats = [], []
  for i in range(n):
    t, t1 = grid[i], grid[i + 1]
    t_hat = t + gamma * t
    t_hat = (s[np.argmin(np.abs(s - t_hat))] if index == "nearest"
             else min(t_hat, s[-1]))
    hats.append(t_hat)
    eps = s_noise * np.asarray(jax.random.normal(keys[i], shape), np.float64)
    x_hat = x + np.sqrt(t_hat ** 2 - t ** 2) * eps
    d = (x_hat - d_np(x_hat, t_hat)) / t_hat
    x = x_hat + (t1 - t_hat) * d
    if t1 != 0:
      x = x_hat + (t1 - t_hat) * 0.5 * (d + (x - d_np(x, t1)) / t1)
    ref.append(x)
  hats = np.array(hats)
  assert hats.max() <= s[-1] and hats[0] == pytest.approx(s[-1], rel=1e-6)
  assert np.all(hats[1:-1] > grid[1:-2])        # the churn adds noise after step 0
  np.testing.assert_allclose(traj, np.stack(ref), rtol=1e-4, atol=1e-5)
  if index == "nearest":   # the network ran at the indices of t̂_i and t_{i+1}
    want = [int(np.argmin(np.abs(s - v))) for v in hats]
    want += [int(np.argmin(np.abs(s - v))) for v in grid[1:-1]]
    assert sorted(int(i) for i in seen) == sorted(want)
