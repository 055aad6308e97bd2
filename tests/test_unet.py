"""Tests for the DDPM U-Net (ddx.models).

XLA:CPU's optimising backend needs tens of seconds to compile a U-Net `init`
(the threefry random ops are expensive to compile) on a small CPU, so these
tests:
  * compile with `xla_backend_optimization_level=0` (same results, slower code);
  * build random parameters from `jax.eval_shape(model.init)` with numpy
    instead of running `init`, except in the one test about the real init;
  * reuse a few tiny models, so each compiled function is compiled once;
  * draw inputs with numpy.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddx.models import UNet
from ddx.models.layers import Downsample, Upsample, timestep_embedding
from ddx.models.base import count_params

from testutils import jaxpr_eqns

# DDPM's CIFAR-10 model has 35.7M parameters (Ho et al. 2020, Sec. 4); this
# implementation has exactly this many.
CIFAR10_PARAMS = 35_746_307

_FAST_COMPILE = {"xla_backend_optimization_level": 0}

# Conditional, with dropout and attention at the 4x4 level: most tests use it.
BASE = UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
            dropout=0.5, num_groups=4, num_classes=10)
RGB = UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
           num_groups=4)
NO_ATTN = UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
               num_groups=4)


@functools.cache
def _apply(model):
  """Returns a jitted model.apply, shared between tests."""
  return jax.jit(model.apply, static_argnames="train",
                 compiler_options=_FAST_COMPILE)


def _inputs(shape, seed=0):
  """Returns x: [B, H, W, C] float32 noise and t: [B] int32 distinct steps."""
  # numpy, not jax.random: each new shape would cost a threefry compile.
  x = jnp.asarray(np.random.default_rng(seed).standard_normal(shape),
                  jnp.float32)
  t = jnp.arange(shape[0], dtype=jnp.int32) * 37 + 3
  return x, t


@functools.cache
def _random_params(model, shape, seed=1):
  """Returns variables of `model` for inputs of `shape`, all leaves random.

  Unlike the real init, no residual branch or output conv is zero, so the
  output depends on x, t and labels and the tests below can fail. Kernels and
  embeddings have std 1/sqrt(fan_in); GroupNorm scales are about 1.
  """
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  t = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if len(leaf.shape) >= 2:
      return jnp.asarray(noise / math.sqrt(math.prod(leaf.shape[:-1])))
    if path[-1].key == "scale":
      return jnp.asarray(1.0 + 0.1 * noise)
    return jnp.asarray(0.1 * noise)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _max_diff(a, b):
  return float(jnp.max(jnp.abs(a - b)))


@pytest.mark.parametrize("model,shape", [(BASE, (2, 8, 8, 1)),
                                         (RGB, (2, 16, 16, 3)),
                                         (NO_ATTN, (2, 8, 8, 1))],
                         ids=["grey8-cond-attn", "rgb16-attn", "grey8-no-attn"])
def test_output_shape(model, shape):
  x, t = _inputs(shape)
  out = _apply(model)(_random_params(model, shape), x, t)
  assert out.shape == shape
  assert out.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(out))) > 1e-3  # random params: not all zero


def test_cifar10_param_count():
  model = UNet(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
               attn_resolutions=(16,), dropout=0.1, num_groups=32)
  variables = jax.eval_shape(
      model.init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
      jax.ShapeDtypeStruct((1,), jnp.int32))
  n = count_params(variables["params"])
  print(f"DDPM CIFAR-10 UNet parameters: {n:,}")
  assert abs(n - 35.7e6) <= 0.3e6
  assert n == CIFAR10_PARAMS
  # Parameters stay float32 (param_dtype) whatever the computation dtype.
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(variables))


def test_bfloat16_compute_keeps_float32_params_and_output():
  model = UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
               num_groups=4, num_classes=10, dtype=jnp.bfloat16)
  shape = (2, 8, 8, 1)
  variables = _init_shapes(model, shape)
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(variables))
  out = jax.eval_shape(model.apply, variables,
                       jax.ShapeDtypeStruct(shape, jnp.float32),
                       jax.ShapeDtypeStruct(shape[:1], jnp.int32))
  assert out.shape == shape and out.dtype == jnp.float32


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_bfloat16_runs_every_matmul_in_bf16_and_statistics_in_f32(norm):
  """dtype="bfloat16" (as the config spells it) reaches every conv, dense,
  embedding and attention product; norm statistics and softmax stay f32."""
  model = UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
               num_groups=4, num_classes=10, dtype="bfloat16", norm=norm)
  shape = (2, 8, 8, 1)
  labels = jax.ShapeDtypeStruct((2,), jnp.int32)
  variables = _init_shapes(model, shape, labels)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.int32)
  fn = lambda v, x, t, y: model.apply(v, x, t, y, train=True,
                                      mutable=["batch_stats"])[0]
  closed = jax.make_jaxpr(fn)(variables, x, t, labels)
  eqns = list(jaxpr_eqns(closed.jaxpr))
  dtypes = lambda e: {str(v.aval.dtype) for v in e.invars if hasattr(v.aval, "dtype")}
  matmuls = [e for e in eqns if e.primitive.name in ("conv_general_dilated",
                                                     "dot_general")]
  # Measured: 20 convs and 39 dense layers / attention products (the label
  # embedding is a gather, checked below).
  assert len(matmuls) == 59
  assert all(dtypes(e) == {"bfloat16"} for e in matmuls), \
      [(e.primitive.name, dtypes(e)) for e in matmuls if dtypes(e) != {"bfloat16"}]
  gathers = [e for e in eqns if e.primitive.name == "gather"]
  assert gathers and all("bfloat16" in dtypes(e) for e in gathers)
  reductions = [e for e in eqns if e.primitive.name in ("reduce_sum", "reduce_max",
                                                        "exp")]
  assert reductions and all(dtypes(e) == {"float32"} for e in reductions)
  out = jax.eval_shape(fn, variables, x, t, labels)
  assert out.dtype == jnp.float32


def test_dropout():
  shape = (2, 8, 8, 1)
  x, t = _inputs(shape)
  variables = _random_params(BASE, shape)
  apply = _apply(BASE)
  # Eval mode: deterministic, and no dropout rng is needed.
  a = apply(variables, x, t, train=False)
  b = apply(variables, x, t, train=False)
  np.testing.assert_array_equal(a, b)
  # Train mode: the dropout rng changes the output.
  c = apply(variables, x, t, train=True, rngs={"dropout": jax.random.key(1)})
  d = apply(variables, x, t, train=True, rngs={"dropout": jax.random.key(2)})
  assert _max_diff(c, d) > 1e-3
  assert _max_diff(c, a) > 1e-3


def test_zero_output_at_init():
  shape = (2, 8, 8, 1)
  x, t = _inputs(shape)
  labels = jnp.array([0, 1], jnp.int32)
  init = jax.jit(BASE.init, compiler_options=_FAST_COMPILE)
  variables = init(jax.random.key(0), x, t, labels)
  out = _apply(BASE)(variables, x, t, labels)
  np.testing.assert_array_equal(out, np.zeros(shape, np.float32))
  # Only the zero-initialised layers are zero: the network is not dead.
  assert float(jnp.max(jnp.abs(variables["params"]["conv_in"]["kernel"]))) > 0


def test_time_and_label_conditioning():
  shape = (2, 8, 8, 1)
  x, _ = _inputs(shape)
  t = jnp.array([5, 5], jnp.int32)
  variables = _random_params(BASE, shape)
  apply = _apply(BASE)
  base = apply(variables, x, t, jnp.array([3, 3]))
  assert _max_diff(base, apply(variables, x, t + 100, jnp.array([3, 3]))) > 1e-3
  assert _max_diff(base, apply(variables, x, t, jnp.array([4, 4]))) > 1e-3
  # labels=None is the null label, index num_classes.
  null = apply(variables, x, t, None)
  null_explicit = apply(variables, x, t, jnp.full((2,), BASE.num_classes))
  np.testing.assert_allclose(null, null_explicit, atol=1e-6)
  assert _max_diff(null, base) > 1e-3


def _init_shapes(model, shape, labels=None):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  t = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), x, t, labels)


def test_bad_configs_raise():
  tiny = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, num_groups=4)
  with pytest.raises(ValueError, match=r"levels of a 8px model are \(8, 4\)"):
    _init_shapes(UNet(**tiny, attn_resolutions=(2,)), (1, 8, 8, 1))
  with pytest.raises(ValueError, match=r"6x6 is not divisible by 2\^\(levels-1\)=4"):
    _init_shapes(UNet(**{**tiny, "ch_mult": (1, 2, 2)}, attn_resolutions=()),
                 (1, 6, 6, 1))
  with pytest.raises(ValueError, match="num_groups=3"):
    _init_shapes(UNet(**{**tiny, "num_groups": 3}), (1, 8, 8, 1))
  with pytest.raises(ValueError, match="num_classes=0"):
    _init_shapes(UNet(**tiny), (1, 8, 8, 1), jnp.zeros((1,), jnp.int32))


def test_timestep_embedding():
  t = jnp.array([0, 1, 999], jnp.int32)
  emb = np.asarray(timestep_embedding(t, 8))
  assert emb.shape == (3, 8)
  np.testing.assert_allclose(emb[0], [0] * 4 + [1] * 4)  # sin(0), cos(0)
  # Frequencies go from 1 down to 1/10000 (DDPM's spacing).
  freqs = np.exp(-np.log(10000.0) * np.arange(4) / 3)
  np.testing.assert_allclose(emb[2], np.concatenate(
      [np.sin(999 * freqs), np.cos(999 * freqs)]), rtol=1e-4, atol=1e-4)
  odd = timestep_embedding(t, 9)
  assert odd.shape == (3, 9)
  np.testing.assert_array_equal(odd[:, -1], 0)


@pytest.mark.parametrize("with_conv", [True, False])
def test_resampling_shapes(with_conv):
  x = jax.ShapeDtypeStruct((1, 8, 6, 2), jnp.float32)
  down, _ = jax.eval_shape(Downsample(with_conv).init_with_output,
                           jax.random.key(0), x)
  assert down.shape == (1, 4, 3, 2)
  up, _ = jax.eval_shape(Upsample(with_conv).init_with_output,
                         jax.random.key(0), x)
  assert up.shape == (1, 16, 12, 2)
