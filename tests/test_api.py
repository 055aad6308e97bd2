"""ddx.Model + ddx.sample_fn on a tiny random network: shapes, determinism, jit caching, CFG."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddx
from ddx import config as config_lib
from ddx import model as model_lib


def _model(num_classes=0, seed=0):
  c = config_lib.base_config()
  c.model.ch, c.model.ch_mult, c.model.num_res_blocks = 8, (1, 2), 1
  c.model.attn_resolutions, c.model.num_groups = (4,), 4
  c.model.num_classes = num_classes
  c.training.label_dropout = 0.1 if num_classes else 0.0
  c.diffusion.num_timesteps = 50
  c.sampling.steps, c.sampling.num_samples = 5, 3
  net = ddx.models.build(c.model)
  labels = jnp.zeros((1,), jnp.int32) if num_classes else None
  params = net.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 1)),
                    jnp.zeros((1,), jnp.int32), labels)["params"]
  # Perturb: the zero-initialised output layer would make every output 0.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])
  return ddx.Model({"params": params}, config_lib.freeze(c))


MODEL = _model()


def test_sample_fn_shape_range_determinism():
  a = ddx.sample_fn(MODEL, jax.random.key(0), steps=5)
  b = ddx.sample_fn(MODEL, jax.random.key(0), steps=5)
  c = ddx.sample_fn(MODEL, jax.random.key(1), steps=5)
  assert a.shape == (3, 8, 8, 1) and a.dtype == jnp.float32
  assert float(a.min()) >= -1 and float(a.max()) <= 1
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  u8 = ddx.to_uint8(a)
  assert u8.dtype == np.uint8 and u8.shape == a.shape
  np.testing.assert_array_equal(ddx.to_uint8(jnp.array([-1.0, 0.0, 1.0])), [0, 128, 255])


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm_solver_pp"])
def test_sample_fn_runs_every_sampler(sampler):
  x = ddx.sample_fn(MODEL, jax.random.key(0), steps=4, sampler=sampler)
  assert x.shape == (3, 8, 8, 1) and bool(jnp.all(jnp.isfinite(x)))


def test_sample_fn_matches_sample_with_the_network():
  """sample_fn is ddx.sample over the model's network and schedule, clipped."""
  net = MODEL.network()
  x_T = jax.random.normal(jax.random.key(3), (2, 8, 8, 1))
  want = ddx.sample(lambda x, i: net.apply(MODEL.variables, x, i), MODEL.schedule,
                    jax.random.key(0), (2, 8, 8, 1), sampler="ddim", steps=5, x_T=x_T,
                    clip_x0=True)
  got = ddx.sample_fn(MODEL, jax.random.key(0), steps=5, x_T=x_T, sampler="ddim",
                      clip_x0=True, eta=0.0)
  np.testing.assert_allclose(got, jnp.clip(want, -1, 1), atol=1e-5)


def test_sample_fn_compiles_once_per_static_signature():
  f = model_lib.sample_jit
  ddx.sample_fn(MODEL, jax.random.key(0), steps=4)
  n = f._cache_size()
  ddx.sample_fn(MODEL, jax.random.key(5), steps=4)           # new rng: no recompile
  ddx.sample_fn(MODEL, jax.random.key(5), steps=4, eta=0.5)  # eta is traced
  other = _model(seed=3)                                      # new weights, same config
  ddx.sample_fn(other, jax.random.key(5), steps=4)
  assert f._cache_size() == n
  ddx.sample_fn(MODEL, jax.random.key(0), steps=3)           # new steps: one more
  assert f._cache_size() == n + 1


def test_weights_are_arguments_not_constants():
  """The compiled sampler takes every weight as an input, none baked in."""
  options = ddx.options.resolve(MODEL.config, num_samples=2, steps=3, sampler="ddim")
  lowered = model_lib.sample_jit.lower(MODEL, jax.random.key(0), None, None, options,
                                       guided=False)
  text = lowered.as_text()
  main = next(l for l in text.splitlines() if "func.func public @main" in l)
  n_weights = len(jax.tree.leaves(MODEL.variables))
  assert main.count("%arg") >= n_weights
  # No weight-sized dense constant in the program (biases of 8 would be tiny;
  # a 3x3x8x8 kernel as a constant would show as a dense<...> of that shape).
  assert "tensor<3x3x8x8xf32> = stablehlo.constant" not in text


@pytest.mark.slow
def test_classifier_free_guidance_limits():
  model = _model(num_classes=3)
  labels = jnp.array([0, 1, 2], jnp.int32)
  x_T = jax.random.normal(jax.random.key(4), (3, 8, 8, 1))
  kw = dict(steps=4, x_T=x_T, sampler="ddim")
  # The unconditional model, straight from the network with labels=None.
  uncond = jnp.clip(ddx.sample(lambda x, i: model.apply(x, i), model.schedule,
                               jax.random.key(0), (3, 8, 8, 1), sampler="ddim", steps=4,
                               x_T=x_T, clip_x0=True), -1, 1)
  cond = ddx.sample_fn(model, jax.random.key(0), labels=labels, guidance_scale=1.0, **kw)
  w0 = ddx.sample_fn(model, jax.random.key(0), labels=labels, guidance_scale=0.0, **kw)
  w1 = ddx.sample_fn(model, jax.random.key(0), labels=labels, guidance_scale=1.0 + 1e-9, **kw)
  w3 = ddx.sample_fn(model, jax.random.key(0), labels=labels, guidance_scale=3.0, **kw)
  np.testing.assert_allclose(w0, uncond, atol=1e-5)
  np.testing.assert_allclose(w1, cond, atol=1e-5)
  assert not np.allclose(w3, cond, atol=1e-3)
  with pytest.raises(ValueError, match="unconditional"):
    ddx.sample_fn(MODEL, jax.random.key(0), labels=labels)


@pytest.mark.parametrize("labels", [[0, 1, 3], [0, -1, 2], [0, 1, 7]])
def test_labels_outside_the_classes_are_refused(labels):
  model = _model(num_classes=3)
  with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
    ddx.sample_fn(model, jax.random.key(0), steps=2, labels=jnp.array(labels))


def test_guidance_needs_a_trained_null_label():
  model = _model(num_classes=3)
  config = model.config.as_configdict()
  config.training.label_dropout = 0.0
  untrained = ddx.Model(model.variables, config_lib.freeze(config))
  with pytest.raises(ValueError, match="label_dropout=0"):
    ddx.sample_fn(untrained, jax.random.key(0), steps=2, guidance_scale=2.0)
  ddx.sample_fn(untrained, jax.random.key(0), steps=2, guidance_scale=1.0)   # no guidance: fine


def test_model_apply_is_the_network():
  model = _model(num_classes=3)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  t = jnp.array([3, 40], jnp.int32)
  want = ddx.models.build(model.config.model).apply(model.variables, x, t, jnp.array([1, 2]))
  np.testing.assert_array_equal(model.apply(x, t, jnp.array([1, 2])), want)
  null = ddx.models.build(model.config.model).apply(model.variables, x, t, jnp.array([3, 3]))
  np.testing.assert_array_equal(model.apply(x, t), null)
