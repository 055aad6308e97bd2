"""Bits/dim per process (ddx.bpd) and its --mode eval wiring (metric "bpd").

The adapters are checked on Gaussian data x_0 ~ N(mu, Σ), Σ = Q diag(S²) Qᵀ
(full covariance), with each process's exact denoiser in its native form:
  EDM:  D(x; σ) = mu + Σ (Σ + σ² I)⁻¹ (x − mu);
  DDPM: ε̂(x_t, i) = (x_t − √ᾱ x̂_0)/√(1 − ᾱ), x̂_0 = mu + √ᾱ Σ (ᾱ Σ + (1 − ᾱ) I)⁻¹
        (x_t − √ᾱ mu), at the fractional index i of ᾱ = 1/(1 + σ²) (log σ_i
        interpolated linearly in i, the "interp" convention);
  flow: v(x, t) = −mu + Q diag((t − (1 − t) s²)/v²) Qᵀ (x − (1 − t) mu),
        v² = (1 − t)² s² + t².
Each process's ODE gives the density of the data smoothed by N(0, s_min² I)
(s_min = σ_min, σ_0 of the schedule, ε/(1 − ε)), so the closed form is
log N(x; mu, Σ + s_min² I), in float64 NumPy.
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddx import bpd
from ddx import config as config_lib
from ddx import processes
from ddx.processes.edm import core as edm
from ddx import eval_run
from ddx.processes.flow import core as flow
from ddx import likelihood
from ddx import model as model_lib
from ddx.processes.ddpm import schedules
from testutils import load_config, random_model

D = 16
SHAPE = (2, 2, 4)
_RS = np.random.RandomState(1)
Q = np.linalg.qr(_RS.randn(D, D))[0]
S = np.linspace(0.2, 1.0, D)
MU = _RS.uniform(-0.5, 0.5, D)
X0 = MU + (_RS.randn(6, D) * S) @ Q.T
_Q, _S, _MU = (jnp.asarray(a, jnp.float32) for a in (Q, S, MU))


def _np_logn(x, var_eig):
  z = (x - MU) @ Q
  return -0.5 * np.sum(z ** 2 / var_eig, 1) - 0.5 * np.sum(np.log(2 * np.pi * var_eig))


def _apply(x, scale, shift):
  """Q diag(scale) Qᵀ (x − shift) on x [B, 2, 2, 4], scale [B, D] or [D]."""
  y = (x.reshape(x.shape[0], -1) - shift) @ _Q
  return ((y * scale) @ _Q.T).reshape(x.shape)


def edm_D(x, sigma):
  s2 = jnp.square(sigma)[:, None]
  return _apply(x, _S ** 2 / (_S ** 2 + s2), _MU) + _MU.reshape(SHAPE)


def flow_v(x, t):
  t = t[:, None]
  v2 = (1 - t) ** 2 * _S ** 2 + t ** 2
  y = (x.reshape(x.shape[0], -1) - (1 - t) * _MU) @ _Q
  return (((y * (t - (1 - t) * _S ** 2) / v2) @ _Q.T) - _MU).reshape(x.shape)


def ddpm_net(sched, prediction):
  """The exact network of the Gaussian data at a fractional index i."""
  log_sig = jnp.log(jnp.asarray(np.sqrt((1 - np.asarray(sched.alphas_cumprod, np.float64))
                                        / np.asarray(sched.alphas_cumprod, np.float64)),
                                jnp.float32))

  def fn(x_t, i):
    sig = jnp.exp(jnp.interp(i, jnp.arange(log_sig.shape[0], dtype=jnp.float32), log_sig))
    a = (1.0 / (1.0 + sig ** 2))[:, None]
    xf = x_t.reshape(x_t.shape[0], -1)
    y = (xf - jnp.sqrt(a) * _MU) @ _Q
    x0 = _MU + (y * jnp.sqrt(a) * _S ** 2 / (a * _S ** 2 + 1 - a)) @ _Q.T
    eps = (xf - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
    out = {"eps": eps, "x0": x0, "v": jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0}[prediction]
    return out.reshape(x_t.shape)
  return fn


SCHED = schedules.linear(1000)
_AB = np.cumprod(1 - np.asarray(SCHED.betas, np.float64))
DDPM_SIG = np.sqrt((1 - _AB) / _AB)     # σ_0 .. σ_{T-1} of the schedule


def _ve_estimate(s_min, s_max):
  """What the ODE estimate converges to for a VE-form (EDM, DDPM) process: the
  exact flow map x -> x_T of the Gaussian, x_T = mu + Q diag(r) Qᵀ (x − mu),
  r = √((s² + σ_max²)/(s² + σ_min²)), scored by the prior N(0, σ_max² I) that
  stands in for the true N(mu, Σ + σ_max² I), plus log det = Σ log r."""
  r = np.sqrt((S ** 2 + s_max ** 2) / (S ** 2 + s_min ** 2))
  x_t = MU + ((X0 - MU) @ Q * r) @ Q.T
  prior = -0.5 * np.sum(x_t ** 2, 1) / s_max ** 2 - D * np.log(s_max) - 0.5 * D * np.log(2 * np.pi)
  return prior + np.sum(np.log(r))


@pytest.mark.parametrize("name,prediction", [
    ("edm", "eps"), ("ddpm", "eps"), ("ddpm", "v"), ("flow", "v")])
def test_ode_logp_equals_the_gaussian_density(name, prediction):
  process, fn = {"edm": (edm.EDM(), edm_D), "ddpm": (SCHED, ddpm_net(SCHED, prediction)),
                 "flow": (flow.Flow(), flow_v)}[name]
  logp, nfe = jax.jit(lambda x: bpd.ode_logp(process, fn, x, None, prediction=prediction,
                                            trace="exact", solver="rk4", steps=48))(
      jnp.asarray(X0.reshape((-1,) + SHAPE), jnp.float32))
  logp = np.asarray(logp, np.float64)
  assert int(nfe) == 4 * 48
  # The smoothed data density log N(x; mu, Σ + s_min² I).
  s_min = {"edm": 0.002, "ddpm": DDPM_SIG[0],
           "flow": bpd.FLOW_T_EPS / (1 - bpd.FLOW_T_EPS)}[name]
  exact = _np_logn(X0, S ** 2 + s_min ** 2)
  if name == "flow":     # the prior N(0, I) is exact at t = 1
    np.testing.assert_array_less(np.abs(logp - exact) / D, 2e-5)
  else:                  # the prior N(0, σ_max² I) is off by O(|mu| / σ_max) per dim
    s_max = {"edm": 80.0, "ddpm": DDPM_SIG[-1]}[name]
    np.testing.assert_array_less(np.abs(logp - _ve_estimate(s_min, s_max)) / D, 2e-4)
    np.testing.assert_array_less(np.abs(logp - exact) / D, 3e-3)
  if name == "ddpm":
    # σ_0 = 0.01 is part of the answer: no smoothing, or twice as much, is
    # measurably different.
    for other in (0.0, 2 * s_min):
      assert np.abs(logp - _np_logn(X0, S ** 2 + other ** 2)).max() / D > 1e-4
  if name == "flow":
    # The density of x_ε itself (no rescaling to data scale) is ~1e-3 per dim off here.
    eps = bpd.FLOW_T_EPS
    z = (X0 - (1 - eps) * MU) @ Q
    var = (1 - eps) ** 2 * S ** 2 + eps ** 2
    raw = -0.5 * np.sum(z ** 2 / var, 1) - 0.5 * np.sum(np.log(2 * np.pi * var))
    assert np.abs(logp - raw).min() / D > 2e-4


def test_ode_logp_bad_process_and_steps():
  with pytest.raises(ValueError, match="not a ddx process"):
    bpd.ode_logp(object(), edm_D, jnp.zeros((1,) + SHAPE), None, trace="exact")
  with pytest.raises(ValueError, match="steps=0 must be a positive integer"):
    bpd.ode_logp(edm.EDM(), edm_D, jnp.zeros((1,) + SHAPE), None, steps=0)
  with pytest.raises(ValueError, match="trace='tr' is unknown"):
    bpd.ode_logp(edm.EDM(), edm_D, jnp.zeros((1,) + SHAPE), None, trace="tr")


# --- A tiny random Model through the public functions and the Evaluator ------

def _bpd_config(process="ddpm"):
  c = load_config()
  c.diffusion.process = process
  if process != "ddpm":
    c.diffusion.prediction = "v" if process == "flow" else c.diffusion.prediction
    c.eval.sampler = c.sampling.sampler = "heun"
  c.eval.metrics = ("bpd",)
  c.eval.bpd_num_images, c.eval.batch_size = 10, 6
  c.eval.bpd_solver, c.eval.bpd_steps, c.eval.bpd_vlb_terms = "euler", 2, 3
  return c


@pytest.mark.slow
def test_evaluator_bpd_scores_held_out_digits_and_resumes(tmp_path, monkeypatch, capsys):
  from ddx import bpd as bpd_mod
  c = _bpd_config()
  c.eval.bpd_estimator = "both"
  model = random_model(c)
  ev = eval_run.Evaluator(c, str(tmp_path))
  assert ev._extractor is None      # no Inception weights needed
  calls = {"ode": 0, "vlb": 0, "sample": 0}
  real_ode, real_vlb = bpd_mod.ode_bpd, bpd_mod.vlb_bpd

  def count(name, fn):
    def wrapped(*a, **k):
      calls[name] += 1
      return fn(*a, **k)
    return wrapped
  monkeypatch.setattr(bpd_mod, "ode_bpd", count("ode", real_ode))
  monkeypatch.setattr(bpd_mod, "vlb_bpd", count("vlb", real_vlb))
  monkeypatch.setattr(model_lib, "sample_fn", count("sample", model_lib.sample_fn))
  out = str(tmp_path / "out")
  m = ev(model, 7, None, out)
  assert calls == {"ode": 2, "vlb": 2, "sample": 0}     # 10 images in batches of 6
  assert sorted(os.listdir(out)) == ["bpd_00000.npz", "bpd_00001.npz"]
  for k in ("bpd_ode", "bpd_ode_stderr", "bpd_vlb", "bpd_vlb_stderr"):
    assert np.isfinite(m[k]) and m[k] > 0, (k, m)
  # A random network is a poor model: more than the 8 bits/dim of the uniform law.
  assert m["bpd_ode"] > 8 and m["bpd_vlb"] > 8
  assert m["bpd_ode_nfe"] == 2 and m["bpd_vlb_nfe"] == 3
  assert "bpd_ode" in capsys.readouterr().out
  # The scored images are the digits metric's held-out ones, the first 10.
  images, labels = eval_run.bpd_images(c)
  from sklearn.datasets import load_digits
  d = load_digits()
  want = np.round(d.images[1000:1010] * 255 / 16).astype(np.uint8)[..., None]
  np.testing.assert_array_equal(images, want)
  np.testing.assert_array_equal(labels, d.target[1000:1010])
  # Batch 0 by hand: ode_bpd on images 0..5 with batch 0's key.
  ode_rng, _ = jax.random.split(jax.random.fold_in(jax.random.key(c.eval.seed), 0))
  b0, _ = real_ode(model, images[:6], ode_rng, solver="euler", steps=2)
  np.testing.assert_allclose(np.load(os.path.join(out, "bpd_00000.npz"))["ode"], b0,
                             rtol=1e-6)

  # Resumed: batch 1 lost, batch 0 reused; same numbers.
  os.remove(eval_run.bpd_chunk_path(out, 1))
  calls.update(ode=0, vlb=0)
  m2 = ev(model, 7, None, out)
  assert calls["ode"] == 1 and calls["vlb"] == 1
  for k in ("bpd_ode", "bpd_vlb"):
    assert m2[k] == pytest.approx(m[k], rel=1e-6)
  # Other weights do not reuse the batches.
  calls.update(ode=0, vlb=0)
  ev(random_model(c, seed=1), 7, None, out)
  assert calls["ode"] == 2


@pytest.mark.slow
def test_bpd_chunks_use_the_command_line_ddpm_variance():
  """The VLB's reverse variance: the command line's over the run's saved one (the
  chunk key recorded the command line's while the score used the saved one)."""
  c = _bpd_config()
  c.model.ch_mult, c.model.attn_resolutions = (1,), ()   # a quick compile
  c.eval.bpd_estimator, c.eval.batch_size = "vlb", 2
  model = random_model(c)   # saved: sampling.ddpm_variance = posterior
  images, labels = eval_run.bpd_images(c)
  images, labels = images[:2], labels[:2]
  c.sampling.ddpm_variance = "beta"
  got = eval_run.bpd_chunks(model, c, images, labels, progress=False)["vlb"]
  _, rng = jax.random.split(jax.random.fold_in(jax.random.key(c.eval.seed), 0))
  want = {v: bpd.vlb_bpd(model, images, rng, num_terms=3, variance=v)[0]
          for v in ("beta", "posterior")}
  np.testing.assert_allclose(got, want["beta"], rtol=1e-6)
  assert not np.allclose(want["beta"], want["posterior"], rtol=1e-3)


_ODE_ONLY = [p for p in sorted(processes.names())
             if "ode" in processes.spec(p).bpd_estimators
             and "vlb" not in processes.spec(p).bpd_estimators]


@pytest.mark.parametrize("process", _ODE_ONLY)
def test_ode_bpd_of_models_without_a_bound_and_no_vlb(process):
  c = _bpd_config(process)
  model = random_model(c)
  images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1)).astype(np.uint8)
  b, nfe = bpd.ode_bpd(model, images, jax.random.key(0), steps=2, solver="euler")
  assert b.shape == (3,) and np.all(np.isfinite(b)) and int(nfe) == 2
  with pytest.raises(ValueError, match=f"process is {process}; use ode_bpd"):
    bpd.vlb_bpd(model, images, jax.random.key(0))
  with pytest.raises(ValueError, match="not \\[-1, 1\\] floats"):
    bpd.ode_bpd(model, images / 127.5 - 1, jax.random.key(0))
  with pytest.raises(ValueError, match="images must be uint8 \\[B, 8, 8, 1\\]"):
    bpd.ode_bpd(model, images[:, :4], jax.random.key(0))


def test_conditional_model_labels():
  c = load_config()
  c.model.num_classes = 10
  m = model_lib.Model({}, config_lib.freeze(c))
  with pytest.raises(ValueError, match="label_dropout=0; pass labels="):
    bpd.likelihood_labels(m, None, 2)
  np.testing.assert_array_equal(bpd.likelihood_labels(m, np.array([3, 4]), 2), [3, 4])
  c.training.label_dropout = 0.1
  m = model_lib.Model({}, config_lib.freeze(c))
  np.testing.assert_array_equal(bpd.likelihood_labels(m, None, 2), [10, 10])
  with pytest.raises(ValueError, match="model is unconditional"):
    bpd.likelihood_labels(model_lib.Model({}, config_lib.freeze(load_config())),
                          np.array([1]), 1)


def test_bpd_config_errors_are_one_line():
  from ddx import evaluation
  assert config_lib.METRICS == evaluation.METRICS
  assert config_lib.BPD_ESTIMATORS == bpd.ESTIMATORS
  assert config_lib.BPD_TRACES == likelihood.TRACES
  assert config_lib.BPD_PROBES == likelihood.PROBES
  assert config_lib.BPD_SOLVERS == likelihood.SOLVERS

  def check(pattern, process="ddpm", **kv):
    c = _bpd_config(process)
    for k, v in kv.items():
      c.eval[k] = v
    with pytest.raises(config_lib.ConfigError, match=pattern) as info:
      config_lib.validate(c)
    assert "\n" not in str(info.value)
    if "bpd" in c.eval.metrics:   # --mode eval checks them too
      with pytest.raises(config_lib.ConfigError, match=pattern):
        config_lib.check_eval_inputs(c)

  check("eval.bpd_estimator='elbo' is unknown", bpd_estimator="elbo")
  check("eval.bpd_trace='diag' is unknown", bpd_trace="diag")
  check("eval.bpd_probe='sphere' is unknown", bpd_probe="sphere")
  check("eval.bpd_solver='rk45' is unknown", bpd_solver="rk45")
  check("eval.bpd_rtol=0.0 must be > 0", bpd_rtol=0.0)
  check("eval.bpd_atol=-1e-05 must be > 0", bpd_atol=-1e-5)
  check("eval.bpd_probes=0 must be a positive integer", bpd_probes=0)
  check("eval.bpd_steps=0 must be a positive integer", bpd_steps=0)
  check("eval.bpd_vlb_terms=101 must be an integer in \\[0, T=100\\]", bpd_vlb_terms=101)
  check("bpd_estimator=vlb is not an estimator of diffusion.process=edm",
        "edm", bpd_estimator="vlb")
  check("bpd_estimator=both is not an estimator of diffusion.process=flow", "flow", bpd_estimator="both")
  check("unknown metric 'bdp'", metrics=("bdp",))
  c = _bpd_config()
  c.eval.bpd_num_images = 798
  with pytest.raises(config_lib.ConfigError, match="has 797 images; use at most 797"):
    eval_run.bpd_images(c)
  for process in processes.names():   # every process with a likelihood takes bpd
    if processes.spec(process).bpd_estimators:
      config_lib.validate(_bpd_config(process))


def test_adaptive_solver_without_diffrax_is_a_config_error(monkeypatch):
  """Without diffrax, adaptive is a one-line ConfigError up front, and the solver
  itself says how to install it. diffrax is simulated missing (the test extra
  installs it, so an importorskip-style check would never run this in CI)."""
  import importlib.util
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "diffrax" else find_spec(name, *a))
  monkeypatch.setitem(sys.modules, "diffrax", None)   # `import diffrax` raises ImportError
  c = _bpd_config()
  c.eval.bpd_solver = "adaptive"
  config_lib.validate(c)            # the value is valid; running it needs diffrax
  with pytest.raises(config_lib.ConfigError, match="bpd_solver=adaptive needs diffrax"):
    config_lib.check_eval_inputs(c)
  with pytest.raises(ValueError, match="solver='adaptive' needs diffrax: pip install"):
    bpd.ode_logp(edm.EDM(), edm_D, jnp.asarray(X0.reshape((-1,) + SHAPE), jnp.float32),
                 None, trace="exact", solver="adaptive", rtol=1e-5, atol=1e-5)


def test_adaptive_solver_through_the_adapter():
  pytest.importorskip("diffrax")
  logp, nfe = jax.jit(lambda x: bpd.ode_logp(edm.EDM(), edm_D, x, None, trace="exact",
                                            solver="adaptive", rtol=1e-5, atol=1e-5))(
      jnp.asarray(X0.reshape((-1,) + SHAPE), jnp.float32))
  want = _ve_estimate(0.002, 80.0)
  np.testing.assert_array_less(np.abs(np.asarray(logp, np.float64) - want) / D, 2e-4)
  assert 20 < int(nfe) < 1000
