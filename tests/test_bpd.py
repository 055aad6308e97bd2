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
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddx import bpd
from ddx import config as config_lib
from ddx import edm
from ddx import eval_run
from ddx import flow
from ddx import likelihood
from ddx import model as model_lib
from ddx import schedules
from ddx.models import UNet
from testutils import load_config

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
