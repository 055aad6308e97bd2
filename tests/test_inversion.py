"""DDIM inversion against a NumPy loop, round trips back through DDIM, and slerp."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddx
from ddx import config as config_lib
from ddx import inversion
from ddx.processes.ddpm import schedules
from testutils import as_prediction, gaussian_denoiser


def _sched(T):
  # Large betas so that a short schedule still ends close to pure noise.
  return schedules.from_betas(np.linspace(1e-3, 0.3, T))


def _model(seed=0):
  """The tiny random U-Net of tests/test_api.py (T = 50), built faster.

  One jitted init and a NumPy perturbation (the output conv is
  zero-initialised, so unperturbed the network would output 0): per-leaf
  jax.random calls compiled one program per shape, ~8 s here.
  """
  c = config_lib.base_config()
  c.model.ch, c.model.ch_mult, c.model.num_res_blocks = 8, (1, 2), 1
  c.model.attn_resolutions, c.model.num_groups = (4,), 4
  c.diffusion.num_timesteps = 50
  c.sampling.steps, c.sampling.num_samples = 5, 3
  net = ddx.models.build(c.model)
  params = jax.jit(net.init)(jax.random.key(seed), jnp.zeros((1, 8, 8, 1)),
                             jnp.zeros((1,), jnp.int32))["params"]
  rng = np.random.default_rng(seed + 1)
  params = jax.tree.map(
      lambda p: jnp.asarray(np.asarray(p) + 0.05 * rng.standard_normal(p.shape, np.float32)),
      params)
  return ddx.Model({"params": params}, config_lib.freeze(c))


MODEL = _model()


@pytest.mark.parametrize("steps", [1, 4, 10])
def test_invert_matches_numpy_loop(steps):
  """ε_θ(x, i) = 0.1·x + 0.002·i: depends on the index, so the test also pins
  which index is evaluated at which step (0 on x_0, then the index left)."""
  T = 40
  sched = _sched(T)
  ab = np.cumprod(1 - np.linspace(1e-3, 0.3, T))
  x0 = np.random.default_rng(0).normal(size=(3, 4, 4, 1))
  eps_fn = lambda x, i: 0.1 * x + 0.002 * i
  up = list(range(0, T, T // steps))[:steps]
  x, a_cur, i_cur, ref = x0.copy(), 1.0, 0, []
  for i in up:
    eps = eps_fn(x, i_cur)
    x0_hat = (x - np.sqrt(1 - a_cur) * eps) / np.sqrt(a_cur)
    x = np.sqrt(ab[i]) * x0_hat + np.sqrt(1 - ab[i]) * eps
    a_cur, i_cur = ab[i], i
    ref.append(x)
  fn = lambda x, i: 0.1 * x + 0.002 * i[:, None, None, None].astype(jnp.float32)
  out, traj = ddx.invert(fn, sched, jnp.asarray(x0, jnp.float32), steps=steps,
                         return_trajectory=True)
  assert out.dtype == jnp.float32 and out.shape == x0.shape
  assert traj.shape == (steps,) + x0.shape
  np.testing.assert_allclose(traj, np.stack(ref), rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(out, ref[-1], rtol=2e-4, atol=2e-5)


def test_prediction_types_agree():
  """The same denoiser as ε, x0 or v inverts to the same x_T (the first step
  reads the output at ᾱ_0 < 1, so x0 / v need no division by √(1-1))."""
  sched = _sched(50)
  eps_fn = lambda x, i: 0.3 * jnp.tanh(x)
  as_pred = lambda kind: as_prediction(eps_fn, sched, kind)
  x0 = jax.random.uniform(jax.random.key(1), (5, 3), minval=-1, maxval=1)
  outs = [ddx.invert(as_pred(k), sched, x0, steps=10, prediction=k)
          for k in ("eps", "x0", "v")]
  np.testing.assert_allclose(outs[1], outs[0], rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(outs[2], outs[0], rtol=1e-3, atol=1e-4)
  with pytest.raises(ValueError, match="prediction"):
    ddx.invert(eps_fn, sched, x0, prediction="score")


def _gaussian_round_trip(steps, spacing="uniform"):
  sched = schedules.linear(1000)
  mu, s = 0.5, 0.5
  fn = gaussian_denoiser(sched, mu, s)
  x0 = mu + s * jax.random.normal(jax.random.key(0), (256, 1))
  x_T = ddx.invert(fn, sched, x0, steps=steps, spacing=spacing)
  rec = ddx.sample(fn, sched, jax.random.key(1), x0.shape, sampler="ddim",
                   steps=steps, eta=0.0, x_T=x_T, spacing=spacing)
  return float(jnp.sqrt(jnp.mean((rec - x0) ** 2))), x0, x_T


def test_round_trip_converges_with_exactgaussian_denoiser():
  """x_0 ~ N(0.5, 0.5²), T = 1000: x_0 -> invert -> DDIM -> x_0. Measured RMS
  error (data std 0.5): 5 steps 0.34, 20 steps 0.12, 100 steps 0.026,
  1000 steps 0.0027 -- first order in 1/steps, as each step's ε̂ is taken
  one step early."""
  runs = [_gaussian_round_trip(k) for k in (5, 20, 100, 1000)]
  errs = [r[0] for r in runs]
  assert errs[0] > errs[1] > errs[2] > errs[3], errs
  assert errs[2] < 0.04 and errs[3] < 0.004, errs
  # With every step the inverted noise is the exact probability-flow map of
  # x_0: affine for Gaussian data, x_T = √ᾱ μ + √(ᾱ s² + 1-ᾱ)/s · (x_0 - μ).
  _, x0, x_T = runs[-1]
  a = float(schedules.linear(1000).alphas_cumprod[-1])
  want = np.sqrt(a) * 0.5 + np.sqrt(a * 0.25 + 1 - a) / 0.5 * (x0 - 0.5)
  np.testing.assert_allclose(x_T, want, atol=0.01)
  # log-SNR spacing inverts the log-SNR walk just as well.
  assert _gaussian_round_trip(100, spacing="logsnr")[0] < 0.04


def test_invert_fn_round_trip_through_sample_fn_on_a_unet():
  """The Model path: invert_fn, then sample_fn with DDIM η = 0, no clipping.
  Measured RMS error on [-0.5, 0.5] images, T = 50: 5 steps 0.016, 50 steps
  0.0016 (10 steps 0.011, 25 steps 0.0034)."""
  x0 = 0.5 * jnp.tanh(jax.random.normal(jax.random.key(7), (2, 8, 8, 1)))
  errs = []
  for steps in (5, 50):
    x_T = ddx.invert_fn(MODEL, x0, steps=steps)
    assert x_T.shape == x0.shape and x_T.dtype == jnp.float32
    rec = ddx.sample_fn(MODEL, jax.random.key(0), steps=steps, sampler="ddim",
                        eta=0.0, x_T=x_T, clip_x0=False, spacing="uniform")
    errs.append(float(jnp.sqrt(jnp.mean((rec - x0) ** 2))))
  assert errs[1] < 0.3 * errs[0] and errs[1] < 0.005, errs
  # Same shapes and steps: the compiled program is reused.
  n = inversion._invert_jit._cache_size()
  ddx.invert_fn(MODEL, -x0, steps=5)
  assert inversion._invert_jit._cache_size() == n
  with pytest.raises(ValueError, match="shape"):
    ddx.invert_fn(MODEL, jnp.zeros((2, 4, 4, 1)))
  with pytest.raises(ValueError, match="unconditional"):
    ddx.invert_fn(MODEL, x0, labels=jnp.zeros((2,), jnp.int32))


def test_invert_is_one_scan_and_composes_under_jit():
  sched = _sched(100)

  def run(w, x0, steps):
    return ddx.invert(lambda x, i: w * x, sched, x0, steps=steps)

  x0 = jnp.ones((2, 2))
  texts = [str(jax.make_jaxpr(jax.jit(run, static_argnums=2), static_argnums=2)(
      jnp.float32(0.1), x0, k)) for k in (10, 100)]
  assert all(t.count("scan[") == 1 for t in texts)
  # Not unrolled: the program is the same size for 10 and 100 steps (only
  # the lengths printed in the shapes differ).
  assert len(texts[0].splitlines()) == len(texts[1].splitlines())
  w = jnp.float32(0.1)
  jitted = jax.jit(run, static_argnums=2)(w, x0, 100)
  np.testing.assert_allclose(jitted, run(w, x0, 100), rtol=1e-5)
  # Differentiable through the scan, e.g. for optimising an inversion.
  g = jax.grad(lambda w: jnp.sum(run(w, x0, 10)))(w)
  assert np.isfinite(float(g))


def test_slerp_endpoints_norms_and_arc():
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (8, 8, 3))
  b = jax.random.normal(kb, (8, 8, 3))
  b = b * jnp.linalg.norm(a) / jnp.linalg.norm(b)        # equal norms
  alphas = jnp.linspace(0.0, 1.0, 9)
  z = ddx.slerp(a, b, alphas)
  assert z.shape == (9, 8, 8, 3) and z.dtype == jnp.float32
  np.testing.assert_allclose(z[0], a, atol=1e-6)
  np.testing.assert_allclose(z[-1], b, atol=1e-6)
  assert ddx.slerp(a, b, 0.5).shape == a.shape
  np.testing.assert_allclose(ddx.slerp(a, b, 0.5), z[4], atol=1e-6)
  # On the great circle: every norm equals the endpoints' (linear
  # interpolation would dip to about 1/√2 of it at the midpoint).
  norms = jnp.linalg.norm(z.reshape(9, -1), axis=1)
  np.testing.assert_allclose(norms, jnp.linalg.norm(a), rtol=1e-5)
  assert float(jnp.linalg.norm(0.5 * (a + b)) / jnp.linalg.norm(a)) < 0.8
  # ...at angle α·θ from a.
  cos = lambda u, v: jnp.sum(u * v) / (jnp.linalg.norm(u) * jnp.linalg.norm(v))
  theta = jnp.arccos(cos(a, b))
  for j, al in enumerate(alphas):
    np.testing.assert_allclose(jnp.cos(al * theta), cos(a, z[j]), atol=1e-5)
  # Unequal norms: norms stay between the endpoints' for these near-orthogonal
  # Gaussian draws.
  z2 = jnp.linalg.norm(ddx.slerp(a, 3.0 * b, alphas).reshape(9, -1), axis=1)
  lo, hi = float(jnp.linalg.norm(a)), 3.0 * float(jnp.linalg.norm(a))
  assert float(z2.min()) >= lo * (1 - 1e-5) and float(z2.max()) <= hi * (1 + 1e-5)


def test_slerp_falls_back_to_linear_when_parallel():
  a = jax.random.normal(jax.random.key(1), (4, 5))
  alphas = jnp.array([0.0, 0.25, 0.5, 1.0])
  lerp = lambda u, v: (1 - alphas)[:, None, None] * u + alphas[:, None, None] * v
  for b in (2.0 * a, -a, a + 1e-4, jnp.zeros_like(a)):
    z = ddx.slerp(a, b, alphas)
    assert bool(jnp.all(jnp.isfinite(z)))
    np.testing.assert_allclose(z, lerp(a, b), rtol=1e-4, atol=1e-5)
  g = jax.grad(lambda a: jnp.sum(ddx.slerp(a, 2.0 * a, 0.3)))(a)
  assert bool(jnp.all(jnp.isfinite(g)))
  with pytest.raises(ValueError, match="shape"):
    ddx.slerp(a, a[:2], 0.5)
