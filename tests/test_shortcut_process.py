"""diffusion.process = shortcut: its config checks, its training targets on the
real (tiny) U-Net, and a conditional run through the trainer, resume, load and
guided sampling."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddx
from ddx import config as config_lib
from ddx import model as model_lib
from ddx import processes
from ddx.processes.shortcut.process import ShortcutProcess

from testutils import load_config, train_and_resume

M = 4   # shortcut_max_steps in these tests: step sizes 1/4 (the flow), 1/2, 1


def _config(**diffusion):
  c = load_config()
  c.model.ch, c.model.ch_mult, c.model.attn_resolutions = 8, (1,), ()   # tiny: compile
  c.diffusion.process, c.diffusion.num_timesteps = "shortcut", 1000   # ddpm's default
  c.diffusion.shortcut_max_steps = M
  c.diffusion.update(diffusion)
  c.sampling.steps = c.eval.steps = 2
  return c


@pytest.mark.parametrize("key,value,words", [
    ("diffusion.shortcut_max_steps", 3, "diffusion.shortcut_max_steps=3 must be a power of two"),
    ("diffusion.shortcut_max_steps", 1, "diffusion.shortcut_max_steps=1 leaves no step size"),
    ("diffusion.shortcut_consistency_fraction", 1.0,
     r"diffusion.shortcut_consistency_fraction=1.0 must lie in \(0, 1\)"),
    ("diffusion.t_sampling", "beta", "diffusion.t_sampling='beta' is unknown"),
    ("sampling.steps", 3, r"sampling.steps=3 is not a step count of the shortcut sampler: a "
     r"power of two up to diffusion.shortcut_max_steps=4, one of \(1, 2, 4\)"),
    ("sampling.steps", 8, r"sampling.steps=8 must be an integer in \[1, 4\]"),
    ("sampling.sampler", "heun", "sampling.sampler='heun' is not a sampler of "
     "diffusion.process=shortcut"),
    ("eval.metrics", ("digits", "bpd"), "eval.metrics has bpd, but diffusion.process="
     r"shortcut has no likelihood \(bits/dim\); drop bpd"),
])
def test_bad_config_is_one_line(key, value, words):
  c = _config()
  config_lib.validate(c)
  assert (c.sampling.sampler, c.eval.sampler) == ("shortcut", "shortcut")   # auto
  group, name = key.split(".")
  c[group][name] = value
  with pytest.raises(config_lib.ConfigError, match=words) as e:
    if group == "eval":
      config_lib.check_eval_inputs(c)     # what --mode eval checks
    else:
      config_lib.validate(c)
  assert "\n" not in str(e.value)


def test_keys_share_flow_time_defaults_and_steps_are_checked_for_eval():
  spec = processes.spec("shortcut")
  flow = processes.spec("flow").defaults()
  assert {k: spec.defaults()[k] for k in ("t_sampling", "logit_mean", "logit_std")} == {
      k: flow[k] for k in ("t_sampling", "logit_mean", "logit_std")}
  assert spec.bpd_estimators == () and spec.second_time
  c = _config()
  c.sampling.sampler, c.sampling.steps = "euler", 3       # the d = 0 ODE: any steps
  config_lib.validate(c)
  c.eval.steps, c.eval.every_steps = 3, 3
  with pytest.raises(config_lib.ConfigError, match="eval.steps=3 is not a step count"):
    config_lib.validate(c)
  c = config_lib.from_file(os.path.join(os.path.dirname(__file__), "..", "configs",
                                        "digits_shortcut.py"))
  config_lib.validate(c)


def _random_model(config, seed=0):
  """A ddx.Model of config's (second-time) network with small random weights:
  every layer nonzero, the zero-initialised step-size embedding included."""
  from testutils import random_model
  return random_model(config, seed)


def test_targets_are_two_d_steps_of_the_network_and_the_rest_is_flow_matching():
  """Through `training_batch` on the real tiny U-Net: a consistency example's
  target for 2d is where two d-steps of the same network land; a d = 0
  example is flow matching's (x_t on the straight path, target n − x_0); the
  loss is the squared error on them. (One jit: the U-Net compiles slowly.)"""
  c = _config()
  model = _random_model(c)
  proc, net = model.process, model.network()
  n = proc.consistency_count(8)
  assert n == 2
  x0 = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 1)), jnp.float32)
  pair = lambda a, b: jnp.stack([a, b], -1)
  b = lambda v: v[:, None, None, None]

  def apply_fn(params, x, time, labels=None):
    return net.apply({"params": params}, x, time, labels)

  @jax.jit
  def run(params):
    x_t, time, target = proc.training_batch(apply_fn, params, x0, jax.random.key(1))
    loss, _ = proc.loss(apply_fn, params, x0, jax.random.key(1))
    out = apply_fn(params, x_t, proc.network_time(time))
    s = proc.denoiser(lambda x, tt: apply_fn(params, x, tt))
    t, d = time[:n, 0], time[:n, 1] / 2
    mid = x_t[:n] - b(d) * s(x_t[:n], pair(t, d))
    two = mid - b(d) * s(mid, pair(t - d, d))
    # The smallest step size 1/M is the flow: the network sees d = 0 there.
    half = jnp.full((2,), 0.5)
    by_d = s(jnp.concatenate([x_t[:2]] * 3),
             pair(jnp.concatenate([half] * 3), jnp.repeat(jnp.asarray([1 / M, 0, 2 / M]), 2)))
    return x_t, time, target, loss, out, two, by_d

  x_t, time, target, loss, out, two, by_d = map(np.asarray, run(model.variables["params"]))
  t, d = time[:, 0], time[:, 1] / 2
  assert set(np.round(time[:n, 1] * M).astype(int)) <= {2, 4}     # 2d in {1/2, 1}
  np.testing.assert_allclose(x_t[:n] - 2 * b(d[:n]) * target[:n], two, rtol=1e-5, atol=1e-5)
  assert np.array_equal(by_d[:2], by_d[2:4]) and not np.allclose(by_d[4:], by_d[2:4])
  # The d = 0 rows: flow's path x_t = (1 − t)·x_0 + t·n and its velocity n − x_0.
  x0 = np.asarray(x0)
  assert np.all(time[n:, 1] == 0) and np.all((t[n:] > 0) & (t[n:] < 1))
  noise = target[n:] + x0[n:]
  np.testing.assert_allclose(x_t[n:], b(1 - t[n:]) * x0[n:] + b(t[n:]) * noise, atol=1e-5)
  np.testing.assert_allclose(loss, np.mean((out - target) ** 2), rtol=1e-5)


@pytest.mark.slow
def test_conditional_run_trains_resumes_loads_and_samples_guided(tmp_path):
  """A class-conditional shortcut run through the real trainer (the targets
  take the batch's labels), bitwise resume, ddx.load, sample_fn with 1 and 2
  steps, steps=3 refused, and classifier-free guidance (with an interval) on
  the one-step map checked against the network's two outputs."""
  c = _config()
  c.model.num_classes, c.training.label_dropout = 10, 0.2
  c.training.num_steps, c.training.log_every = 4, 2
  c.training.checkpoint_every, c.training.sample_every = 2, 4
  straight_dir, _ = train_and_resume(c, tmp_path)
  saved = json.load(open(os.path.join(straight_dir, "config.json")))
  assert saved["sampling"]["sampler"] == "shortcut"

  model = ddx.load(straight_dir)
  assert isinstance(model.process, ShortcutProcess)
  x_T = jax.random.normal(jax.random.key(3), (3, 8, 8, 1))
  labels = jnp.asarray([0, 1, 2], jnp.int32)
  for steps in (1, 2):
    imgs = ddx.sample_fn(model, jax.random.key(0), steps=steps, x_T=x_T, labels=labels)
    assert imgs.shape == (3, 8, 8, 1) and bool(np.all(np.isfinite(imgs)))
  with pytest.raises(ValueError, match=r"steps=3 is not a step count of the shortcut "
                     r"sampler: a power of two up to diffusion.shortcut_max_steps=4") as e:
    ddx.sample_fn(model, jax.random.key(0), steps=3, x_T=x_T, labels=labels)
  assert "\n" not in str(e.value)

  # One step from t = 1 with d = 1: x_0 = x_T − s, s = u + w·(c − u).
  time = jnp.full((3, 2), 1000.0)
  cond = np.asarray(model.apply(x_T, time, labels))
  uncond = np.asarray(model.apply(x_T, time, jnp.full((3,), 10, jnp.int32)))
  guided = ddx.sample_fn(model, jax.random.key(0), steps=1, x_T=x_T, labels=labels,
                         guidance_scale=2.5, clip_x0=False)
  want = np.clip(np.asarray(x_T) - (uncond + 2.5 * (cond - uncond)), -1, 1)
  np.testing.assert_allclose(guided, want, rtol=1e-5, atol=1e-5)
  # σ(t = 1) = ∞ lies outside the interval (0, 10]: the plain conditional step.
  inside = ddx.sample_fn(model, jax.random.key(0), steps=1, x_T=x_T, labels=labels,
                         guidance_scale=2.5, guidance_interval=(0.0, 10.0), clip_x0=False)
  np.testing.assert_allclose(inside, np.clip(np.asarray(x_T) - cond, -1, 1), rtol=1e-5,
                             atol=1e-5)
