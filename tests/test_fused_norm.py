"""Tests for model.norm_kernel="pallas" (ddx.models.fused_norm), in Pallas' interpreter.

The GroupNorm kernel is checked against a NumPy transcription of GroupNorm
(Wu & He 2018: per image and group of C/G channels, subtract the mean over H,
W and the group's channels, divide by sqrt(variance + eps), then a
per-channel scale and shift) followed by SiLU x * sigmoid(x); against Flax's
nn.GroupNorm for values and gradients; and inside the U-Net against the xla
path with the same parameters. The DiT kernel is checked against NumPy's
LayerNorm of each token followed by adaLN's x * (1 + scale) + shift (DiT,
Peebles & Xie 2023), with and without the masked lanes a GPU block has, and
inside DiT against the xla path.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddx import config as config_lib
from ddx.models import UNet
from ddx.models import fused_norm

from testutils import exported_calls

_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _np_group_norm(x, scale, bias, groups, eps, silu):
  """GroupNorm then SiLU, float64, of [B, H, W, C] (the paper's definition)."""
  x = np.asarray(x, np.float64)
  b, h, w, c = x.shape
  out = np.empty_like(x)
  for i in range(b):
    for g in range(groups):
      sl = slice(g * c // groups, (g + 1) * c // groups)
      block = x[i, :, :, sl]
      out[i, :, :, sl] = (block - block.mean()) / np.sqrt(block.var() + eps)
  out = out * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)
  return out / (1 + np.exp(-out)) if silu else out


def _case(shape, seed=0):
  rng = np.random.default_rng(seed)
  c = shape[-1]
  # Offset and spread per channel, so a wrong group boundary shows.
  x = rng.standard_normal(shape) * rng.uniform(0.5, 3, c) + rng.uniform(-2, 2, c)
  return (jnp.asarray(x, jnp.float32), jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32),
          jnp.asarray(rng.normal(0, 0.5, c), jnp.float32))


def _ulp_nudge(tree, seed=1):
  """`tree` with every float32 entry moved by one ulp up or down (random signs)."""
  signs = np.random.default_rng(seed)
  eps = np.finfo(np.float32).eps
  return jax.tree.map(lambda a: a * (1 + eps * jnp.asarray(
      signs.choice([-1.0, 1.0], a.shape), jnp.float32)), tree)


def _assert_within_rounding(grad_fn, grad_ref_fn, args, names):
  """Each leaf of grad_fn(*args) is within 10x, norm-wise, of the float32 noise
  floor of grad_ref_fn: how far its result moves when every input changes by one
  ulp (`_ulp_nudge`). See test_dit_with_the_kernel_equals_the_xla_path for why."""
  leaves = lambda out: [np.asarray(a, np.float64) for a in jax.tree.leaves(out)]
  g, g_ref, g_ulp = (leaves(grad_fn(*args)), leaves(grad_ref_fn(*args)),
                     leaves(grad_ref_fn(*_ulp_nudge(args))))
  assert len(g) == len(g_ref) == len(names)
  for name, a, b, c in zip(names, g, g_ref, g_ulp):
    floor = np.linalg.norm(c - b)
    assert floor > 0, name
    assert np.linalg.norm(a - b) <= 10 * floor, (name, np.linalg.norm(a - b) / floor)


@pytest.mark.parametrize("shape,groups,blocks", [
    ((2, 8, 8, 32), 8, 1),        # the digits U-Net's first level: one block per image
    ((2, 32, 32, 64), 16, 4),     # CIFAR-sized: 1024 pixels x 16 channels per program
])
@pytest.mark.parametrize("silu", [True, False])
def test_kernel_matches_numpy(shape, groups, blocks, silu):
  x, scale, bias = _case(shape)
  hw, c = shape[1] * shape[2], shape[3]
  assert c // fused_norm.block_channels(hw, c, c // groups, "cpu") == blocks
  out = fused_norm.group_norm(x, scale, bias, groups, 1e-6, silu, jnp.dtype(jnp.float32))
  np.testing.assert_allclose(out, _np_group_norm(x, scale, bias, groups, 1e-6, silu),
                             rtol=1e-5, atol=1e-5)


def test_bfloat16_output_within_its_rounding():
  """bf16 in and out, statistics in float32: within bf16's half ulp (2^-9
  relative) of the float64 reference, plus the input's own rounding."""
  x, scale, bias = _case((2, 8, 8, 32))
  xb = x.astype(jnp.bfloat16)
  out = fused_norm.group_norm(xb, scale, bias, 8, 1e-6, True, jnp.dtype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  ref = _np_group_norm(np.asarray(xb, np.float32), scale, bias, 8, 1e-6, True)
  err = np.abs(np.asarray(out, np.float64) - ref)
  assert np.all(err <= 2 ** -8 * np.abs(ref) + 1e-6), err.max()


def test_values_and_gradients_equal_flax_group_norm():
  import flax.linen as nn
  x, scale, bias = _case((2, 8, 8, 32), seed=3)
  params = {"params": {"scale": scale, "bias": bias}}
  flax_gn = nn.GroupNorm(num_groups=8, epsilon=1e-6)
  ours = fused_norm.GroupNorm(num_groups=8, epsilon=1e-6, silu=True)
  assert (jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x))
          == jax.tree.map(jnp.shape, flax_gn.init(jax.random.key(0), x)))
  w = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape), jnp.float32)
  loss_ref = lambda p, x: jnp.sum(w * nn.silu(flax_gn.apply(p, x)))
  loss = lambda p, x: jnp.sum(w * ours.apply(p, x))
  np.testing.assert_allclose(loss(params, x), loss_ref(params, x), rtol=1e-5)
  # Gradients to scale, bias and x: the sums over each group cancel (x's
  # gradient sums to ~0 per group), so compare against the rounding floor.
  _assert_within_rounding(jax.grad(loss, argnums=(0, 1)), jax.grad(loss_ref, argnums=(0, 1)),
                          (params, x), ["bias", "scale", "x"])


def test_block_channels_rules_and_the_fallback():
  # Whole groups that divide C, within MAX_BLOCK_ELEMENTS.
  assert fused_norm.block_channels(64, 256, 8, "cpu") == 256
  assert fused_norm.block_channels(1024, 128, 4, "gpu") == 16
  assert fused_norm.block_channels(256, 96, 3, "cpu") == 48    # 64 would split a group
  # Triton wants power-of-two sides: 7x7 pixels run the reference on a GPU.
  assert fused_norm.block_channels(49, 64, 2, "gpu") is None
  assert fused_norm.block_channels(49, 64, 2, "cpu") == 64
  # Mosaic (TPU) wants all channels or multiples of 128 lanes, and has more room.
  assert fused_norm.block_channels(1024, 128, 4, "tpu") == 128
  assert fused_norm.block_channels(1024, 512, 16, "tpu") == 256
  # A group larger than the block budget: no block, the reference runs.
  assert fused_norm.block_channels(4096, 64, 8, "cpu") is None
  x, scale, bias = _case((1, 64, 64, 64))
  out = fused_norm.group_norm(x, scale, bias, 8, 1e-6, False, jnp.dtype(jnp.float32))
  np.testing.assert_allclose(out, _np_group_norm(x, scale, bias, 8, 1e-6, False),
                             rtol=1e-5, atol=1e-5)


def _both_paths(net):
  """Checks that `net` with norm_kernel="pallas" has the same parameter shapes
  and (float32) outputs as `net` at random NumPy parameters; returns (params,
  x, t, the kernel network)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float32)
  t = jnp.array([3, 700], jnp.int32)
  abstract = jax.eval_shape(net.init, jax.random.key(0), x, t)
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.3, jnp.float32),
                        abstract)
  fused = net.clone(norm_kernel="pallas")
  assert jax.tree.map(jnp.shape, jax.eval_shape(fused.init, jax.random.key(0), x, t)) == \
      jax.tree.map(jnp.shape, abstract)
  ref = jax.jit(net.apply, compiler_options=_FAST_COMPILE)(params, x, t)
  out = jax.jit(fused.apply, compiler_options=_FAST_COMPILE)(params, x, t)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))
  # bfloat16: the kernel applies SiLU before rounding to bf16, Flax's path after,
  # so they differ by bf16 rounding (measured 1.2% of the largest U-Net output).
  ref, out = (jax.jit(m.clone(dtype="bfloat16").apply, compiler_options=_FAST_COMPILE)(
      params, x, t) for m in (net, fused))
  assert float(jnp.abs(out - ref).max() / jnp.abs(ref).max()) < 3e-2
  return params, x, t, fused


@pytest.mark.slow
def test_unet_with_the_kernel_equals_the_xla_path():
  """Same parameters, same outputs (float32), and the kernel really runs:
  one pallas_call per GroupNorm of the network."""
  net = UNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4)
  params, x, t, fused = _both_paths(net)
  jaxpr = str(jax.make_jaxpr(fused.apply)(params, x, t))
  norms = jax.tree_util.tree_leaves_with_path(params)
  n_norms = sum(1 for path, _ in norms
                if "norm" in jax.tree_util.keystr(path) and path[-1].key == "scale")
  assert jaxpr.count("pallas_call") == n_norms > 0
  assert "pallas_call" not in str(jax.make_jaxpr(net.apply)(params, x, t))


def test_config_names_what_the_kernel_fuses():
  config = config_lib.base_config()
  config.model.norm_kernel = "triton"
  with pytest.raises(config_lib.ConfigError, match=r"^model.norm_kernel='triton' is unknown"):
    config_lib.validate(config)
  config.model.norm_kernel = "pallas"
  config_lib.validate(config)
  config.model.norm = "batch"
  with pytest.raises(config_lib.ConfigError,
                     match=r"model.norm_kernel='pallas' fuses the U-Net's GroupNorm .*"
                           r"norm='batch': use model.norm_kernel=xla$"):
    config_lib.validate(config)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_kernel_lowers_for_gpu_and_tpu_without_one(platform):
  """jax.export lowers for a platform this machine lacks: Pallas must turn the
  kernel into Triton IR (GPU) and Mosaic (TPU) for the CIFAR-10 U-Net's norms
  (bf16, 32 groups; 32x32x128 and 8x8x256). Whether ptxas and the TPU compiler
  then accept it needs the device (benchmarks/gpu_speed.py's norm part)."""
  f = lambda x, a, b: fused_norm.group_norm(x, a, b, 32, 1e-6, True, jnp.dtype(jnp.bfloat16))
  for shape in ((8, 32, 32, 128), (8, 8, 8, 256)):
    x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    s = jax.ShapeDtypeStruct(shape[-1:], jnp.float32)
    assert exported_calls(f, (x, s, s), platform) == 1, (platform, shape)


def _np_ln_modulate(x, shift, scale, eps=1e-6):
  """LayerNorm of each token (no affine), then x * (1 + scale) + shift, float64."""
  x = np.asarray(x, np.float64)
  y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
  return y * (1 + np.asarray(scale, np.float64)[:, None]) + np.asarray(shift, np.float64)[:, None]


def _tokens(b, n, d, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((b, n, d)) * rng.uniform(0.5, 3, (b, n, 1)) + rng.uniform(-2, 2, (b, n, 1))
  return (jnp.asarray(x, jnp.float32), jnp.asarray(rng.standard_normal((b, d)), jnp.float32),
          jnp.asarray(rng.standard_normal((b, d)) * 0.3, jnp.float32))


def test_layer_norm_modulate_matches_numpy_with_and_without_masked_lanes():
  x, shift, scale = _tokens(2, 16, 48)
  ref = _np_ln_modulate(x, shift, scale)
  f32 = jnp.dtype(jnp.float32)
  out = fused_norm.layer_norm_modulate(x, shift, scale, 1e-6, f32)   # CPU: 16 x 48 blocks
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  # A GPU's block: 8 tokens x 64 lanes, 16 of them past D, masked out.
  out = fused_norm._ln_pallas(x, shift, scale, 1e-6, f32, 8, 64, "cpu")
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  out = fused_norm.layer_norm_modulate(x, shift, scale, 1e-6, jnp.dtype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=2 ** -8, atol=1e-2)


def test_token_block_rules():
  assert fused_norm.token_block(256, 768, "gpu") == (16, 1024)     # DiT-B/2
  assert fused_norm.token_block(256, 1152, "gpu") == (8, 2048)     # DiT-XL/2
  assert fused_norm.token_block(256, 1152, "tpu") == (128, 1152)    # 256 x 1152 > 2^18
  assert fused_norm.token_block(16, 40, "tpu") is None             # 40 lanes: not a multiple of 128
  assert fused_norm.token_block(20, 48, "cpu") == (20, 48)


@pytest.mark.slow
def test_dit_with_the_kernel_equals_the_xla_path():
  """Same outputs, and gradients as close to the xla path's as float32 rounding
  allows, on any CPU.

  The kernel sums each token's D values in another order than XLA's
  reduction, so its LayerNorm outputs differ from the xla path's by rounding,
  and every gradient after them moves by that rounding times the network's
  sensitivity. Elementwise that is unbounded (an entry that cancels to ~0, e.g.
  the key bias's gradient, which softmax makes exactly zero in exact
  arithmetic, is pure rounding noise: 5x relative was seen), and which entries
  exceed a fixed rtol depends on the CPU's vector width (it failed on AVX-512).
  So each leaf is held, norm-wise, against the noise floor measured here: how
  far the xla path's own gradient moves when every parameter changes by one
  float32 ulp, a rounding-level change of the same kind. The kernel stays below
  that floor (measured ratios 0.2-0.9); a wrong wiring (a lost shift or scale
  gradient) is 1e4-1e5 times the floor.
  """
  from ddx.models import DiT
  net = DiT(patch_size=2, hidden_size=32, depth=2, num_heads=4, mlp_ratio=2.0)
  params, x, t, fused = _both_paths(net)
  # Two norms per block and the final layer's.
  assert str(jax.make_jaxpr(fused.apply)(params, x, t)).count("pallas_call") == 2 * 2 + 1
  loss = lambda m: lambda p: jnp.sum(jnp.sin(m.apply(p, x, t)))
  names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(params)]
  _assert_within_rounding(jax.grad(loss(fused)), jax.grad(loss(net)), (params,), names)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_dit_kernel_lowers_for_gpu_and_tpu_without_one(platform):
  """DiT-B/2 and DiT-XL/2 token widths (768, 1152; 256 tokens), bf16 out."""
  f = lambda x, a, b: fused_norm.layer_norm_modulate(x, a, b, 1e-6, jnp.dtype(jnp.bfloat16))
  for d in (768, 1152):
    x = jax.ShapeDtypeStruct((4, 256, d), jnp.float32)
    m = jax.ShapeDtypeStruct((4, d), jnp.float32)
    assert exported_calls(f, (x, m, m), platform) == 1, (platform, d)


def test_dit_accepts_the_kernel_in_the_config():
  config = config_lib.base_config()
  config.model.name = "dit"
  config.model.norm = "batch"     # a U-Net key; DiT has LayerNorms whatever it says
  config.model.norm_kernel = "pallas"
  config_lib.validate(config)
