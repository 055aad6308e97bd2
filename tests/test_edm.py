"""ddx.edm against NumPy transcriptions of EDM (Karras et al. 2022): Table 1's
preconditioning, the loss weight, Eq. 5's grid, the σ draws and the loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from ddx.processes.edm import core as edm
from ddx.sampling import sigma

SIGMAS = np.array([0.002, 0.05, 0.5, 1.0, 7.3, 80.0])


def test_preconditioning_is_table_1():
  for sd in (0.5, 1.3):
    p = edm.EDM(sigma_data=sd)
    c_skip, c_out, c_in, c_noise = (np.asarray(c, np.float64)
                                    for c in edm.precondition(p, jnp.asarray(SIGMAS)))
    s = SIGMAS
    np.testing.assert_allclose(c_skip, sd ** 2 / (s ** 2 + sd ** 2), rtol=1e-6)
    np.testing.assert_allclose(c_out, s * sd / np.sqrt(sd ** 2 + s ** 2), rtol=1e-6)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(s ** 2 + sd ** 2), rtol=1e-6)
    np.testing.assert_allclose(c_noise, 0.25 * np.log(s), rtol=1e-6)


def test_loss_weight_and_unit_effective_weight():
  p = edm.EDM()
  lam = np.asarray(edm.loss_weight(p, jnp.asarray(SIGMAS)), np.float64)
  np.testing.assert_allclose(lam, (SIGMAS ** 2 + 0.25) / (SIGMAS * 0.5) ** 2, rtol=1e-6)
  c_out = np.asarray(edm.precondition(p, jnp.asarray(SIGMAS))[1], np.float64)
  np.testing.assert_allclose(lam * c_out ** 2, 1.0, rtol=1e-5)   # EDM Sec. 5


def test_karras_grid_is_eq5():
  for smin, smax, rho, n in [(0.002, 80.0, 7.0, 18), (0.01, 10.0, 3.0, 5),
                             (0.002, 80.0, 1.0, 4)]:
    g = sigma.karras_sigmas(smin, smax, rho, n)
    ref = [(smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
           for i in range(n)] + [0.0]
    assert g.dtype == np.float64 and g.shape == (n + 1,)
    np.testing.assert_allclose(g, ref, rtol=1e-12)
    assert g[0] == pytest.approx(smax) and g[-2] == pytest.approx(smin) and g[-1] == 0
  np.testing.assert_allclose(sigma.karras_sigmas(0.002, 80.0, 7.0, 4)[1:3],
                             [(80 ** (1 / 7) + k / 3 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
                              for k in (1, 2)])
  # ρ = 1 is evenly spaced in σ; one step goes straight from σ_max to 0
  np.testing.assert_allclose(np.diff(sigma.karras_sigmas(1.0, 4.0, 1.0, 4)[:-1]), -1.0)
  np.testing.assert_array_equal(sigma.karras_sigmas(0.002, 80.0, 7.0, 1), [80.0, 0.0])
  with pytest.raises(ValueError, match="steps"):
    sigma.karras_sigmas(0.002, 80.0, 7.0, 0)


def test_sigma_draws_are_lognormal():
  p = edm.EDM(p_mean=-0.4, p_std=0.7)
  ls = np.log(np.asarray(edm.sample_sigma(p, jax.random.key(0), 40_000), np.float64))
  assert ls.mean() == pytest.approx(-0.4, abs=4 * 0.7 / 200)
  assert ls.std() == pytest.approx(0.7, rel=0.02)


def _net_np(x_in, c_noise, w):
  return w * np.tanh(x_in) + 0.1 * c_noise.reshape((-1,) + (1,) * (x_in.ndim - 1))


def _net(params, x_in, c_noise):
  return params["w"] * jnp.tanh(x_in) + 0.1 * c_noise.reshape(
      (-1,) + (1,) * (x_in.ndim - 1))


def test_denoise_matches_table_1():
  p = edm.EDM()
  x = np.random.default_rng(0).normal(size=(3, 2, 2, 1)) * 3
  s = np.array([0.01, 0.7, 20.0])
  sd = 0.5
  b = lambda a: a[:, None, None, None]
  want = (b(sd ** 2 / (s ** 2 + sd ** 2)) * x
          + b(s * sd / np.sqrt(s ** 2 + sd ** 2))
          * _net_np(b(1 / np.sqrt(s ** 2 + sd ** 2)) * x, 0.25 * np.log(s), 0.8))
  got = edm.denoise(p, lambda xi, cn: _net({"w": 0.8}, xi, cn),
                    jnp.asarray(x, jnp.float32), jnp.asarray(s, jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_edm_loss_is_the_weighted_denoising_loss():
  """edm_loss = mean over the batch of λ(σ)·mean_pixels (D(y + σn; σ) − y)²,
  the draws reproduced from the same keys, and the quartiles of ln σ."""
  p = edm.EDM(sigma_data=0.6, p_mean=-1.0, p_std=1.4)
  b = 32
  y = np.random.default_rng(1).uniform(-1, 1, size=(b, 4, 4, 2))
  rng = jax.random.key(7)
  loss, metrics = edm.edm_loss(_net, {"w": 0.9}, p, jnp.asarray(y, jnp.float32), rng)
  s_rng, n_rng = jax.random.split(rng)
  s = np.exp(-1.0 + 1.4 * np.asarray(jax.random.normal(s_rng, (b,)), np.float64))
  n = np.asarray(jax.random.normal(n_rng, y.shape), np.float64)
  sd = 0.6
  bc = lambda a: a[:, None, None, None]
  x = y + bc(s) * n
  c_skip, c_out = sd ** 2 / (s ** 2 + sd ** 2), s * sd / np.sqrt(s ** 2 + sd ** 2)
  c_in = 1 / np.sqrt(s ** 2 + sd ** 2)
  d = bc(c_skip) * x + bc(c_out) * _net_np(bc(c_in) * x, 0.25 * np.log(s), 0.9)
  lam = (s ** 2 + sd ** 2) / (s * sd) ** 2
  per = lam * np.mean((d - y) ** 2, axis=(1, 2, 3))
  assert float(loss) == pytest.approx(per.mean(), rel=1e-4)
  assert float(metrics["loss"]) == pytest.approx(per.mean(), rel=1e-4)
  q = np.digitize(np.log(s), -1.0 + 1.4 * norm.ppf([0.25, 0.5, 0.75]))
  want = [per[q == k].mean() if np.any(q == k) else 0.0 for k in range(4)]
  assert len(set(q)) == 4
  np.testing.assert_allclose(metrics["mse_by_quartile"], want, rtol=1e-4)


def test_edm_loss_aux_and_float32():
  p = edm.EDM()
  y = jnp.zeros((4, 2, 2, 1))
  apply = lambda params, x, c: ((x * params).astype(jnp.bfloat16), {"n": 3})
  loss, metrics = edm.edm_loss(apply, 1.0, p, y, jax.random.key(0), has_aux=True)
  assert metrics["aux"] == {"n": 3} and loss.dtype == jnp.float32


def test_ideal_network_reaches_the_bayes_loss():
  """For y ~ N(0, s²) per pixel, the ideal F (from D* = s²/(s² + σ²)·x)
  leaves E[λ‖D* − y‖²] = E_σ[λ(σ)·s²σ²/(s² + σ²)], a closed form that the
  loss on a large batch must match (F = 0 lands far above it)."""
  s, p = 0.1, edm.EDM()     # far from σ_d, so F = 0 (D = c_skip·x) is far off
  sd = p.sigma_data
  y = jax.random.normal(jax.random.key(1), (4096, 8)) * s

  def ideal(params, x_in, c_noise):
    sig = jnp.exp(4.0 * c_noise)[:, None]
    x = x_in * jnp.sqrt(sig ** 2 + sd ** 2)
    d = s ** 2 / (s ** 2 + sig ** 2) * x
    c_skip = sd ** 2 / (sig ** 2 + sd ** 2)
    c_out = sig * sd / jnp.sqrt(sig ** 2 + sd ** 2)
    return (d - c_skip * x) / c_out

  loss, _ = edm.edm_loss(ideal, None, p, y, jax.random.key(2))
  u = np.random.default_rng(0).normal(size=400_000)
  sig = np.exp(p.p_mean + p.p_std * u)
  bayes = np.mean((sig ** 2 + sd ** 2) / (sig * sd) ** 2 * s ** 2 * sig ** 2
                  / (s ** 2 + sig ** 2))
  assert float(loss) == pytest.approx(bayes, rel=0.05)
  worse, _ = edm.edm_loss(lambda *a: 0.0 * a[1], None, p, y, jax.random.key(2))
  assert float(worse) > 2 * bayes


@pytest.mark.parametrize("field,value,match", [
    ("sigma_min", 100.0, r"diffusion.sigma_min=100.0 must be below diffusion.sigma_max"),
    ("sigma_min", 80.0, r"diffusion.sigma_min=80.0 must be below"),
    ("sigma_min", 0.0, r"diffusion.sigma_min=0.0 must be > 0"),
    ("rho", 0.0, r"diffusion.rho=0.0 must be > 0"),
    ("rho", -7.0, r"diffusion.rho"),
    ("sigma_data", -0.5, r"diffusion.sigma_data"),
    ("p_std", 0.0, r"diffusion.p_std"),
    ("p_mean", float("nan"), r"diffusion.p_mean=nan must be a finite number"),
    ("sigma_max", "80", r"diffusion.sigma_max='80' must be a finite number"),
])
def test_bad_values_give_one_line_errors(field, value, match):
  with pytest.raises(ValueError, match=match) as e:
    edm.EDM(**{field: value}).check()
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match=match):
    edm.edm_loss(_net, {"w": 1.0}, edm.EDM(**{field: value}), jnp.zeros((2, 1)),
                 jax.random.key(0))


def test_defaults_are_edms_and_static():
  p = edm.EDM()
  assert (p.sigma_data, p.sigma_min, p.sigma_max, p.rho, p.p_mean, p.p_std) == (
      0.5, 0.002, 80.0, 7.0, -1.2, 1.2)
  assert p.check() is p
  assert jax.tree_util.tree_leaves(p) == []   # all static: a jit signature, no arrays
