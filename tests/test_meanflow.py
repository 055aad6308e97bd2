"""ddx.meanflow and the meanflow process against closed forms: Gaussian data,
whose average velocity is known exactly, and finite differences for the JVP
tangent; the process through its loss path, ddx.model's guidance, the config
checks and the real trainer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddx
from ddx.processes.meanflow import core as meanflow

from testutils import gaussian_data, train_and_resume

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


# --------------------------------------------------------------------------
# The process (ddx.processes.meanflow): its loss path, guidance, sampler, config.

def _process(**kw):
  from ddx.processes.meanflow.process import MeanFlowProcess
  return MeanFlowProcess(**kw)


def _exact_network(mean, std):
  """The exact u of N(mean, std²) data as a network: it reads (t, r) back from
  the network's time inputs (1000·t, 1000·(t − r))."""
  def apply_fn(params, z, time, labels=None):
    del params, labels
    t = time[:, 0] / 1000.0
    return meanflow.gaussian_average_velocity(mean, std, z, t - time[:, 1] / 1000.0, t)
  return apply_fn


def test_process_target_on_gaussian_data_is_the_exact_u():
  """Through the process's own loss path with the exact u as the network: the
  target is u + (s_r/s_t)·(v_c − v_m) (v_c = ε − x the conditional velocity,
  v_m its marginal; s_τ the data's std at τ), so u itself where v_c = v_m; on
  point-mass data (std 0: v_c = v_m) the loss is 0."""
  rng, mean, std = _gaussian(6)
  x0 = (mean + std * rng.normal(size=(64,) + SHAPE[1:])).astype(np.float32)
  p = _process(ratio=0.5)
  reg = p.regression(_exact_network(mean, std), None, jnp.asarray(x0), jax.random.key(0))
  r, t = (np.asarray(reg[k], np.float64)[:, None, None, None] for k in ("r", "t"))
  assert np.mean(r < t) > 0.2
  z, eps = np.asarray(reg["z"], np.float64), np.asarray(reg["eps"], np.float64)
  np.testing.assert_allclose(z, (1 - t) * x0 + t * eps, rtol=1e-5, atol=1e-6)
  s = lambda a: np.sqrt((1 - a) ** 2 * std ** 2 + a ** 2)
  v_m = _np_velocity(mean, std, z, t)
  u = np.asarray(meanflow.gaussian_average_velocity(mean, std, reg["z"], reg["r"],
                                                    reg["t"]))
  np.testing.assert_allclose(np.asarray(reg["u"]), u, rtol=1e-6, atol=1e-6)
  want = u + s(r) / s(t) * ((eps - x0) - v_m)
  np.testing.assert_allclose(np.asarray(reg["target"]), want, rtol=1e-3, atol=1e-3)

  point = np.zeros_like(std)
  x0 = np.broadcast_to(mean, x0.shape)
  value, metrics = p.loss(_exact_network(mean, point), None, jnp.asarray(x0),
                          jax.random.key(1))
  assert float(value) < 1e-6 and float(np.max(metrics["mse_by_quartile"])) < 1e-8


def test_process_guided_velocity_where_it_applies():
  """ṽ = ω·v + κ·u(c) + (1 − ω − κ)·u(∅) for labelled examples with t in
  [tmin, tmax]; v for null-labelled ones and outside the range."""
  null = 3

  def apply_fn(params, z, time, labels=None):   # u(z, t, t | c) = c + 1, any z
    del params
    if labels is None:
      labels = jnp.zeros((z.shape[0],), jnp.int32)
    return jnp.zeros_like(z) + (labels.astype(jnp.float32) + 1.0)[:, None, None, None]

  x0 = jnp.asarray(np.random.default_rng(7).normal(size=(256,) + SHAPE[1:]), jnp.float32)
  labels = jnp.asarray(np.arange(256) % 4, jnp.int32)   # every 4th is null
  for kappa in (0.0, 0.5):
    p = _process(omega=2.0, kappa=kappa, guidance_tmin=0.3, guidance_tmax=0.8)
    reg = p.regression(apply_fn, None, x0, jax.random.key(8), labels=labels,
                       null_label=null)
    t, lab = np.asarray(reg["t"]), np.asarray(labels)
    v = np.asarray(reg["eps"]) - np.asarray(x0)
    guided = 2.0 * v + kappa * (lab + 1.0)[:, None, None, None] + (1 - 2.0 - kappa) * (null + 1.0)
    on = ((lab != null) & (t >= 0.3) & (t <= 0.8))[:, None, None, None]
    assert 0 < on.mean() < 0.75
    np.testing.assert_allclose(np.asarray(reg["v"]), np.where(on, guided, v), rtol=1e-6,
                               atol=1e-6)


def test_process_samples_gaussian_data_exactly():
  """process.denoiser(exact-u network) through ddx.sample: 1 and 2 steps give
  mean + std·ε; clip_x0 clips the one-step sample; σ = t/(1 − t)."""
  rng, mean, std = _gaussian(9)
  p = _process()
  net = _exact_network(mean, std)
  denoise = p.denoiser(lambda x, time: net(None, x, time))
  eps = rng.normal(size=SHAPE).astype(np.float32)
  for steps in (1, 2):
    x = ddx.sample(denoise, p, jax.random.key(0), SHAPE, steps=steps, x_T=eps)
    np.testing.assert_allclose(np.asarray(x), mean + std * eps, rtol=1e-5, atol=1e-5)
  x = ddx.sample(denoise, p, jax.random.key(0), SHAPE, steps=1, x_T=3 * eps,
                      clip_x0=True)
  np.testing.assert_allclose(np.asarray(x), np.clip(mean + 3 * std * eps, -1, 1),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="sampler='euler' is not a sampler of diffusion.process=meanflow"):
    ddx.sample(denoise, p, jax.random.key(0), SHAPE, sampler="euler", steps=1)
  time = np.array([[0.5, 0.2], [0.75, 0.0]], np.float32)
  np.testing.assert_allclose(np.asarray(p.noise_level(time)), [1.0, 3.0], rtol=1e-6)


def test_meanflow_config_checks():
  from ddx import config as config_lib
  from testutils import load_config
  c = load_config()
  c.diffusion.process = "meanflow"
  config_lib.validate(c)
  assert c.sampling.sampler == "meanflow"
  for key, value, match in (
      ("diffusion.mf_ratio", 1.5, r"diffusion.mf_ratio=1.5 must lie in \[0, 1\]"),
      ("diffusion.mf_omega", 2.0, "mf_omega=2.0, mf_kappa=0.0 guide with class labels, "
       "but model.num_classes=0"),
      ("model.num_classes", 10, "training.label_dropout=0 never trains the null label"),
      ("eval.metrics", ("digits", "bpd"), "diffusion.process=meanflow has no likelihood"),
      ("sampling.sampler", "heun", "sampling.sampler='heun' is not a sampler of "
       "diffusion.process=meanflow")):
    c2 = load_config()
    c2.diffusion.process = "meanflow"
    if key == "model.num_classes":
      c2.diffusion.mf_omega = 2.0
    group, name = key.split(".")
    c2[group][name] = value
    with pytest.raises(config_lib.ConfigError, match=match):
      config_lib.validate(c2)
  c.diffusion.mf_omega, c.model.num_classes, c.training.label_dropout = 2.0, 10, 0.1
  config_lib.validate(c)


_EMB = np.array([0.3, -0.7, 1.1, 0.05], np.float32)   # label 3 = the null label


def _toy_apply(self, x, time, labels=None):
  """A linear stand-in network of two times: 0.5·x + 1e-4·τ_0 − 3e-4·τ_1 + EMB[y]."""
  y = jnp.full((x.shape[0],), 3, jnp.int32) if labels is None else labels
  tau = jnp.asarray(time, jnp.float32)
  assert tau.shape == (x.shape[0], 2)
  return (0.5 * x + (1e-4 * tau[:, 0] - 3e-4 * tau[:, 1])[:, None, None, None]
          + jnp.asarray(_EMB)[y][:, None, None, None])


def test_cfg_at_sampling_mixes_u_inside_the_interval(monkeypatch):
  """ddx.model.denoiser on a conditional MeanFlow model: u_∅ + w·(u_c − u_∅) where
  σ = t/(1 − t) of the current time is in (lo, hi], else u_c (NumPy reference);
  the network sees (1000·t, 1000·(t − r))."""
  from ddx import config as config_lib
  from ddx import model as model_lib
  from testutils import load_config
  monkeypatch.setattr(model_lib.Model, "apply", _toy_apply)
  c = load_config()
  c.diffusion.process, c.model.num_classes, c.training.label_dropout = "meanflow", 3, 0.1
  model = model_lib.Model({}, config_lib.freeze(c))
  rng = np.random.default_rng(10)
  x = rng.normal(size=(4, 8, 8, 1)).astype(np.float32)
  labels = np.array([0, 2, 1, 2])
  t = np.array([0.2, 0.5, 0.75, 0.95], np.float32)   # σ = 0.25, 1, 3, 19
  r = np.array([0.0, 0.25, 0.5, 0.0], np.float32)
  lo, hi, w = 0.5, 5.0, 2.5

  def u_np(y):
    return (0.5 * x + (0.1 * t - 0.3 * (t - r))[:, None, None, None]
            + _EMB[y][:, None, None, None])
  sigma = t / (1 - t)
  inside = ((sigma > lo) & (sigma <= hi))[:, None, None, None]
  assert 0 < inside.sum() < 4
  uc, uu = u_np(labels), u_np(np.full(4, 3))
  fn = model_lib.denoiser(model, jnp.asarray(labels), jnp.float32(w), True,
                          interval=(jnp.float32(lo), jnp.float32(hi)))
  time = jnp.asarray(np.stack([t, r], -1))
  np.testing.assert_allclose(fn(jnp.asarray(x), time), np.where(inside, uu + w * (uc - uu), uc),
                             rtol=1e-5, atol=1e-5)
  fn = model_lib.denoiser(model, jnp.asarray(labels), jnp.float32(w), True)
  np.testing.assert_allclose(fn(jnp.asarray(x), time), uu + w * (uc - uu), rtol=1e-5, atol=1e-5)
  # sample_fn: one step is x = ε − u(ε, 0, 1), guided.
  eps = rng.normal(size=(4, 8, 8, 1)).astype(np.float32) * 0.3
  one = ddx.sample_fn(model, jax.random.key(0), steps=1, labels=labels, x_T=eps,
                      guidance_scale=w, clip_x0=False)
  t, r, x = np.ones(4, np.float32), np.zeros(4, np.float32), eps
  want = eps - (u_np(np.full(4, 3)) + w * (u_np(labels) - u_np(np.full(4, 3))))
  np.testing.assert_allclose(one, np.clip(want, -1, 1), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# The real network and trainer.

def _tiny(**kw):
  """configs/test.py as a MeanFlow run with a quick-to-compile U-Net."""
  from testutils import load_config
  c = load_config()
  c.diffusion.process = "meanflow"
  c.model.ch_mult, c.model.attn_resolutions = (1,), ()
  c.sampling.steps, c.sampling.clip_x0 = 2, False
  for key, value in kw.items():
    group, name = key.split("__")
    c[group][name] = value
  return c


@pytest.mark.slow
def test_unet_jvp_matches_central_differences():
  """The total derivative du/dt = v·∂_z u + ∂_t u that the process's target takes
  from one jvp of the real U-Net (two times, through (1000·t, 1000·(t − r))),
  against central differences of the process's u(x, (t, r)) along (v, 0, 1)."""
  from testutils import random_model
  model = random_model(_tiny(model__time_scale=1.0))   # a steep embedding: both times matter
  net = model.network()
  p = _process(ratio=1.0)
  x0 = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1), minval=-1.0)
  apply_fn = lambda params, z, time, labels=None: net.apply({"params": params}, z, time)
  reg = jax.jit(lambda params: p.regression(apply_fn, params, x0, jax.random.key(2)))(
      model.variables["params"])
  r, t, z, v = (np.asarray(reg[k], np.float64) for k in ("r", "t", "z", "v"))
  assert np.all(t - r > 0.02)
  du_dt = (v - np.asarray(reg["target"])) / (t - r)[:, None, None, None]
  u = jax.jit(p.denoiser(lambda x, time: net.apply(model.variables, x, time)))
  # The network sees 1000·t through sinusoids of up to 1 rad per unit: h = 1e-4
  # is 0.1 rad there (truncation ~0.2%), still far above float32 rounding.
  h = 1e-4
  fd = (np.asarray(u(jnp.asarray(z + h * v, jnp.float32), pair(t + h, r)), np.float64)
        - np.asarray(u(jnp.asarray(z - h * v, jnp.float32), pair(t - h, r)))) / (2 * h)
  assert np.linalg.norm(fd) > 0.1
  np.testing.assert_allclose(du_dt, fd, atol=1e-2 * np.abs(fd).max())
  # ∂_t u moves both network times: without the second one's share it differs.
  one = (np.asarray(u(jnp.asarray(z, jnp.float32), pair(t + h, r + h)), np.float64)
         - np.asarray(u(jnp.asarray(z, jnp.float32), pair(t - h, r - h)))) / (2 * h)
  full = (np.asarray(u(jnp.asarray(z, jnp.float32), pair(t + h, r)), np.float64)
          - np.asarray(u(jnp.asarray(z, jnp.float32), pair(t - h, r)))) / (2 * h)
  assert np.abs(full - one).max() > 10 * 1e-2 * np.abs(fd).max()


def pair(t, r):
  from ddx.processes.meanflow.process import pair as pair_
  return pair_(jnp.asarray(t, jnp.float32), jnp.asarray(r, jnp.float32))


@pytest.mark.slow
def test_meanflow_trains_resumes_bitwise_loads_and_samples(tmp_path):
  """Through the real trainer with training guidance (the labels= override and
  the null label): 4 steps, resume from step 2 bitwise, ddx.load, sample_fn with
  1 and 2 steps, and with classifier-free guidance at sampling."""
  config = _tiny(model__num_classes=10, training__label_dropout=0.1,
                 diffusion__mf_omega=1.5, diffusion__mf_kappa=0.3,
                 diffusion__mf_guidance_tmax=0.9, training__num_steps=4,
                 training__log_every=2, training__checkpoint_every=2,
                 training__sample_every=4)
  straight_dir, _ = train_and_resume(config, tmp_path)

  model = ddx.load(straight_dir)
  assert model.process.spec.name == "meanflow" and model.process.omega == 1.5
  x_T = jax.random.normal(jax.random.key(3), (2, 8, 8, 1))
  out = {s: ddx.sample_fn(model, jax.random.key(0), steps=s, x_T=x_T) for s in (1, 2)}
  for imgs in out.values():
    assert imgs.shape == (2, 8, 8, 1) and bool(np.all(np.isfinite(imgs)))
  assert not np.array_equal(out[1], out[2])
  guided = ddx.sample_fn(model, jax.random.key(0), steps=2, x_T=x_T, guidance_scale=2.0)
  assert bool(np.all(np.isfinite(guided))) and not np.array_equal(guided, out[2])
