"""What the few-step processes need of the backbones and the trainer: a second time
input that starts at zero, a log-variance head, init_from, a teacher as D(y; σ)."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddx
from ddx import config as config_lib
from ddx import parallel, train
from ddx.processes.meanflow import core as meanflow
from ddx.processes.edm import spec as edm_config
from ddx.processes.flow import spec as flow_config

from testutils import load_config, random_model

B = 3


def _dit(config):
  config.model.name = "dit"
  config.model.patch_size = 2
  config.model.hidden_size = 16
  config.model.depth = 1
  config.model.num_heads = 2
  return config


def _copy_shared(src, dst):
  """dst's parameters with every one src also has taken from src."""
  flat = flax.traverse_util.flatten_dict(src)
  return flax.traverse_util.unflatten_dict(
      {k: flat.get(k, v) for k, v in flax.traverse_util.flatten_dict(dst).items()})


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_second_time_starts_as_the_one_time_network(backbone):
  config = _source_config()   # a one-level U-Net: the time inputs are the same
  if backbone == "dit":
    config = _dit(config)
  one = ddx.models.build(config.model)
  two = ddx.models.build(config.model, second_time=True)
  x = jax.random.normal(jax.random.key(0), (B, 8, 8, 1))
  t = jnp.array([3.0, 40.0, 90.0])
  p1 = random_model(config).variables["params"]
  p2 = two.init(jax.random.key(1), x, jnp.zeros((B, 2)))["params"]
  extra = set(flax.traverse_util.flatten_dict(p2)) - set(flax.traverse_util.flatten_dict(p1))
  assert extra and all(k[0] in ("temb2_dense0", "temb2_dense1", "t2_embedder") for k in extra)
  p2 = _copy_shared(p1, p2)
  ref = one.apply({"params": p1}, x, t)
  for second in (jnp.zeros(B), jnp.array([1.0, 500.0, 7.0])):
    out = two.apply({"params": p2}, x, jnp.stack([t, second], 1))
    np.testing.assert_array_equal(out, ref)
  # Once its last layer moves, the second time changes the output.
  flat = flax.traverse_util.flatten_dict(p2)
  last = [k for k in flat if k[0] in ("temb2_dense1", "t2_embedder") and k[-1] == "kernel"][-1]
  flat[last] = jnp.full_like(flat[last], 0.1)
  moved = flax.traverse_util.unflatten_dict(flat)
  a = two.apply({"params": moved}, x, jnp.stack([t, jnp.zeros(B)], 1))
  b = two.apply({"params": moved}, x, jnp.stack([t, jnp.full(B, 300.0)], 1))
  assert float(jnp.abs(a - b).max()) > 1e-4


def test_time_shapes_are_checked():
  config = load_config()
  x = jnp.zeros((B, 8, 8, 1))
  params = random_model(config).variables["params"]
  one = ddx.models.build(config.model)
  with pytest.raises(ValueError, match=r"second_time=True"):
    one.apply({"params": params}, x, jnp.zeros((B, 2)))
  two = ddx.models.build(config.model, second_time=True)
  with pytest.raises(ValueError, match=r"expects t of shape \[B, 2\]"):
    two.init(jax.random.key(0), x, jnp.zeros((B,)))


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_logvar_head_is_sown_and_leaves_the_output(backbone):
  config = _source_config()   # a one-level U-Net: the time inputs are the same
  if backbone == "dit":
    config = _dit(config)
  plain = ddx.models.build(config.model)
  head = ddx.models.build(config.model, logvar=True)
  x = jax.random.normal(jax.random.key(0), (B, 8, 8, 1))
  t = jnp.array([3.0, 40.0, 90.0])
  p = _copy_shared(random_model(config).variables["params"],
                   head.init(jax.random.key(1), x, t)["params"])
  out, col = head.apply({"params": p}, x, t, mutable=["logvar"])
  np.testing.assert_array_equal(out, plain.apply({"params": random_model(config).variables["params"]}, x, t))
  (lv,) = jax.tree.leaves(col)
  assert lv.shape == (B,) and lv.dtype == jnp.float32
  np.testing.assert_array_equal(lv, 0.0)
  # An apply that does not collect it returns the output alone.
  assert isinstance(head.apply({"params": p}, x, t), jax.Array)


def _gaussian(seed=0):
  rng = np.random.default_rng(seed)
  mu = jnp.asarray(rng.normal(size=(1, 4)), jnp.float32)
  s = jnp.asarray(rng.uniform(0.3, 1.5, size=(1, 4)), jnp.float32)
  return mu, s


def test_flow_and_edm_sigma_denoisers_are_the_exact_posterior_mean():
  """Gaussian data N(μ, s²): E[x_0 | x_0 + σn] = μ + s²/(s² + σ²)·(y − μ). Flow's
  D(y; σ) built from the exact flow velocity (MeanFlow's closed form at r = t)
  and EDM's identity both give it."""
  from ddx.processes.edm.process import EDMProcess
  from ddx.processes.flow.process import FlowProcess
  mu, s = _gaussian()
  y = jax.random.normal(jax.random.key(0), (5, 4)) * 2
  sigma = jnp.array([0.01, 0.3, 1.0, 5.0, 80.0])
  exact = mu + s ** 2 / (s ** 2 + sigma[:, None] ** 2) * (y - mu)
  flow = FlowProcess.from_config(dict(flow_config.SPEC.defaults(), prediction="v"))
  v = lambda x, t: meanflow.gaussian_average_velocity(mu, s, x, t, t)
  np.testing.assert_allclose(flow.sigma_denoiser(v)(y, sigma), exact, rtol=2e-5, atol=2e-5)
  edm = EDMProcess.from_config(dict(edm_config.SPEC.defaults(), prediction="auto"))
  D = lambda x, sig: mu + s ** 2 / (s ** 2 + sig[:, None] ** 2) * (x - mu)
  np.testing.assert_allclose(edm.sigma_denoiser(D)(y, sigma), exact, rtol=1e-6)


def _source_config():
  """configs/test.py with a one-level U-Net without attention: init_from copies
  every tensor by its path, whatever the network (its second-time head too)."""
  config = load_config()
  config.model.ch_mult, config.model.attn_resolutions = (1,), ()
  return config


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A 3-step run of _source_config(): what init_from and teacher read."""
  workdir = str(tmp_path_factory.mktemp("src") / "wd")
  config = _source_config()
  config.training.num_steps = 3
  config.training.sample_every = 0
  train.train_and_evaluate(config, workdir)
  return workdir


def _fresh_state(config):
  setup = train.make_setup(config, parallel.make_mesh(devices=jax.devices()[:1]))
  return train.init_from(setup.init(jax.random.key(5)), config)


@pytest.mark.slow
def test_init_from_starts_from_the_source_ema(source, monkeypatch):
  src = ddx.load(source)
  config = _source_config()
  config.training.init_from = source
  state = _fresh_state(config)
  for tree in (state.params, state.ema_params):
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(src.variables["params"])):
      np.testing.assert_array_equal(a, b)
  # A two-time network: the source's tensors, the second time's fresh and zero
  # at the end, so it starts as the source network.
  monkeypatch.setattr(flow_config.SPEC, "second_time", True)
  config.diffusion.process = "flow"
  config.diffusion.prediction = "auto"
  state = _fresh_state(config)
  net = ddx.model.network(config)
  x = jax.random.normal(jax.random.key(0), (B, 8, 8, 1))
  t = jnp.array([3.0, 40.0, 90.0])
  out = net.apply({"params": state.params}, x, jnp.stack([t, jnp.full(B, 250.0)], 1))
  np.testing.assert_array_equal(out, src.apply(x, t))
  # Another network size: one line naming the parameter.
  monkeypatch.undo()
  config = _source_config()
  config.training.init_from = source
  config.model.ch = 16
  with pytest.raises(config_lib.ConfigError, match=r"training.init_from=.*has shape"):
    _fresh_state(config)


def test_teacher_needs_a_process_that_distils():
  """training.teacher under a process whose Spec does not take one: one line at
  validation (the teacher itself is checked in tests/test_consistency_process.py)."""
  config = load_config()
  config.training.teacher = "runs/some_flow_run"
  with pytest.raises(config_lib.ConfigError, match=r"does not distil"):
    config_lib.validate(config)
