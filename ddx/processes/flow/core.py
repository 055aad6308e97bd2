"""The flow-matching process (rectified flow, as in SD3): interpolant, times, loss.

x_t = (1 − t)·x_0 + t·n for t in [0, 1] (t = 0 data, t = 1 pure noise), a
straight line whose velocity dx_t/dt = n − x_0 the network learns
(Lipman et al. 2022; Liu et al. 2022; Esser et al. 2024, "SD3"). Sampling
integrates dx/dt = v(x, t) from t = 1 to 0 (`ddx.sampling.flow`).

Training times: t = sigmoid(u), u ~ N(logit_mean, logit_std²) (SD3's
logit-normal, Eq. 19) or t ~ U(0, 1); then the resolution shift
t -> shift·t / (1 + (shift − 1)·t) (SD3 Eq. 23). The shift is applied in
training and in sampling alike: SD3 motivates it as the same map of noise
levels for a larger image, and the SD3 training code in diffusers draws its
training times from the shifted scheduler; shift = 1 is the identity.

The network sees the time as 1000·t (`time_input`, SD3's convention), so
the sinusoidal embeddings sized for DDPM's indices see the same range.

Prediction: "v" (the network outputs the velocity) or "x0" (it outputs x̂_0,
and v̂ = (x_t − x̂_0)/t; JiT, Li & He 2025).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ddx.processes import common

from ddx.processes.common import bcast, static_field
from ddx.processes.flow import spec as flow_config
from ddx.processes.flow.spec import PREDICTIONS, T_SAMPLINGS

# The smallest t that `velocity` divides by: no sampler evaluates t = 0, so
# this only keeps a stray t = 0 finite.
_T_FLOOR = 1e-6
_DEFAULTS = flow_config.SPEC.defaults()   # the config's defaults are the class's


_static = static_field


@flax.struct.dataclass
class Flow:
  """Flow-matching hyper-parameters; all static, so a pytree with no leaves."""
  t_sampling: str = _static(_DEFAULTS["t_sampling"])  # logit_normal | uniform
  logit_mean: float = _static(_DEFAULTS["logit_mean"])  # SD3: m = 0, s = 1
  logit_std: float = _static(_DEFAULTS["logit_std"])
  shift: float = _static(_DEFAULTS["shift"])  # SD3 Eq. 23; 1 = no shift
  prediction: str = _static(flow_config.SPEC.default_prediction)  # v | x0
  # For prediction x0, the loss divides by max(t, t_min) (JiT's t_eps 0.05):
  # the v-loss ‖x̂_0 − x_0‖²/t² would weigh small t without bound.
  t_min: float = _static(_DEFAULTS["t_min"])

  def check(self) -> "Flow":
    """Raises ValueError (one line naming the config key) for a bad value.

    Returns:
      self, so that `Flow(...).check()` can be chained.
    """
    flow_config.SPEC.check(dataclasses.asdict(self))
    flow_config.check_prediction(self.prediction)
    return self


def interpolate(x0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
  """x_t = (1 − t)·x_0 + t·n.

  Args:
    x0, noise: [B, ...]; t: [B] in [0, 1].
  Returns:
    x_t [B, ...].
  """
  t = bcast(t, x0)
  return (1.0 - t) * x0 + t * noise


def velocity_target(x0: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
  """The conditional velocity dx_t/dt = n − x_0, [B, ...]."""
  return noise - x0


def shift_time(t, shift: float):
  """SD3's resolution shift (Eq. 23): t -> shift·t / (1 + (shift − 1)·t).

  Maps [0, 1] onto itself, fixing 0 and 1; shift > 1 moves times towards
  noise. Works on NumPy and JAX arrays (returns the same kind).
  """
  return shift * t / (1.0 + (shift - 1.0) * t)


def sample_t(p: Flow, rng: jax.Array, n: int) -> jnp.ndarray:
  """Training times: logit-normal or uniform, then shifted.

  Returns:
    t float32 [n] in [0, 1].
  """
  if p.t_sampling == "logit_normal":
    t = jax.nn.sigmoid(p.logit_mean + p.logit_std * jax.random.normal(rng, (n,), jnp.float32))
  else:
    t = jax.random.uniform(rng, (n,), jnp.float32)
  return shift_time(t, p.shift)


def time_input(t: jnp.ndarray) -> jnp.ndarray:
  """The time the network is given: 1000·t (SD3), float32 [B]."""
  return 1000.0 * jnp.asarray(t, jnp.float32)


def velocity(p: Flow, net_out: jnp.ndarray, x_t: jnp.ndarray,
             t: jnp.ndarray) -> jnp.ndarray:
  """The network output as a velocity v̂.

  "v": the output itself. "x0": v̂ = (x_t − x̂_0)/t, exact for t > 0 (the
  loss's t_min clip is a loss weight only: the minimiser x̂_0 = E[x_0 | x_t]
  does not depend on it, so sampling divides by t itself).

  Args:
    net_out: [B, ...] the network output; x_t: [B, ...]; t: [B] in (0, 1].
  Returns:
    v̂ [B, ...] float32.
  """
  net_out = net_out.astype(jnp.float32)
  if p.prediction == "v":
    return net_out
  return (x_t - net_out) / bcast(jnp.maximum(t, _T_FLOOR), x_t)


def x0_from_velocity(x_t: jnp.ndarray, v: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
  """x̂_0 = x_t − t·v̂ (the point the straight line through x_t reaches at t = 0)."""
  return x_t - bcast(t, x_t) * v


def flow_loss(apply_fn: Callable[..., Any], params: Any, p: Flow, x0: jnp.ndarray,
              rng: jax.Array, has_aux: bool = False):
  """The conditional flow-matching loss E_{t,n}‖v̂(x_t, t) − (n − x_0)‖².

  For prediction "v" this is the plain velocity MSE. For "x0" the loss is
  the same velocity MSE with v̂ = (x_t − x̂_0)/max(t, t_min) and the target
  (x_t − x_0)/max(t, t_min), i.e. ‖x̂_0 − x_0‖²/max(t, t_min)² (JiT, Li & He
  2025): it weighs every t as the v-model's loss does for t >= t_min, so
  the two parameterisations train on the same objective, and the clip stops
  the 1/t² weight from blowing up near the data end.

  Args:
    apply_fn: `apply_fn(params, x_t [B, ...], time float32 [B]) -> [B, ...]`,
      the raw network, given time_input(t) = 1000·t (with `(output, aux)`
      when has_aux).
    params: whatever apply_fn takes.
    p: the process (checked here).
    x0: [B, H, W, C] float32 clean data.
    rng: PRNG key; split here as `t_rng, n_rng = jax.random.split(rng)`.
    has_aux: apply_fn returns (output, aux); aux is returned in metrics.
  Returns:
    (loss scalar float32, metrics dict with "loss" and "mse_by_quartile" [4]:
    the loss for t (after the shift) in each quarter of [0, 1], 0 where
    empty; plus "aux" when has_aux).
  """
  p.check()
  b = x0.shape[0]
  t_rng, n_rng = jax.random.split(rng)
  t = sample_t(p, t_rng, b)
  noise = jax.random.normal(n_rng, x0.shape, x0.dtype)
  x_t = interpolate(x0, noise, t)
  out = apply_fn(params, x_t, time_input(t))
  out, aux = out if has_aux else (out, None)
  out = out.astype(jnp.float32)   # the loss is float32 whatever the compute dtype
  if p.prediction == "v":
    err = out - velocity_target(x0, noise)
  else:
    err = (x0 - out) / bcast(jnp.maximum(t, p.t_min), x0)
  per_ex = jnp.mean(jnp.square(err), axis=tuple(range(1, x0.ndim)))
  loss = jnp.mean(per_ex)
  q = jnp.clip(jnp.floor(t * 4).astype(jnp.int32), 0, 3)
  return loss, common.loss_metrics(loss, per_ex, q, aux if has_aux else None)


def time_grid(steps: int, shift: float = 1.0) -> np.ndarray:
  """The sampling times: N + 1 points evenly spaced from 1 to 0, then shifted.

  Args:
    steps: N >= 1 sampler steps.
    shift: SD3's shift (> 0), as in training.
  Returns:
    float64 [N + 1], strictly descending from 1.0 to 0.0.
  """
  if isinstance(steps, bool) or int(steps) != steps or steps < 1:
    raise ValueError(f"sampling steps must be a positive integer, got {steps!r}")
  if not shift > 0:
    raise ValueError(f"diffusion.shift={shift} must be > 0")
  t = np.linspace(1.0, 0.0, int(steps) + 1, dtype=np.float64)
  return shift_time(t, float(shift))
