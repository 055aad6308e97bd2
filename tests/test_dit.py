"""Tests for the DiT network (ddx.models.dit) and ddx.models.build.

The references are NumPy transcriptions of the paper / official code
(facebookresearch/DiT models.py): the adaLN-Zero block, the [cos, sin]
timestep embedding, the 2-D sin-cos position embedding built from
np.meshgrid(grid_w, grid_h) as the official code does, the patch conv as an
explicit sum over patch pixels, and the official unpatchify einsum. Models are
tiny (D = 32, depth <= 2) and parameters are drawn with NumPy from
`jax.eval_shape(model.init)`, so only one test pays for a real init; big
models are only ever shapes (`jax.eval_shape`).
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ddx import parallel
from ddx.models import NAMES, DiT, UNet, build
from ddx.models import dit as dit_lib
from ddx.models import layers
from ddx.models.base import count_params

from testutils import jaxpr_eqns

_FAST_COMPILE = {"xla_backend_optimization_level": 0}

# Conditional, learn_sigma, D = 32 with 4 heads of 8: most tests use it.
TINY = DiT(patch_size=2, hidden_size=32, depth=2, num_heads=4, mlp_ratio=2.0,
           num_classes=5, learn_sigma=True)
TINY_BF16 = TINY.clone(dtype="bfloat16")
# A rectangular input (4 x 6 patches) catches row/column mix-ups.
SHAPE = (2, 8, 12, 3)


@functools.cache
def _apply(model):
  return jax.jit(model.apply, compiler_options=_FAST_COMPILE)


def _inputs(shape, seed=0):
  """x: [B, H, W, C] float32 noise; t: [B] float32 distinct, non-integer."""
  x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  t = (np.arange(shape[0]) * 211.0 + 17.5).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(t)


def _random_like(shapes, seed=1):
  """Every leaf random and non-zero (also the zero-initialised ones), so the
  output depends on every weight: kernels/tables std 1/sqrt(fan_in), biases
  std 0.1."""
  rng = np.random.default_rng(seed)

  def fill(leaf):
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if len(leaf.shape) >= 2:
      return jnp.asarray(noise / math.sqrt(math.prod(leaf.shape[:-1])))
    return jnp.asarray(0.1 * noise)

  return jax.tree.map(fill, shapes)


@functools.cache
def _random_params(model, shape, seed=1):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  t = jax.ShapeDtypeStruct(shape[:1], jnp.float32)
  labels = (jax.ShapeDtypeStruct(shape[:1], jnp.int32) if model.num_classes
            else None)
  return _random_like(jax.eval_shape(model.init, jax.random.key(0), x, t,
                                     labels), seed)


# --------------------------------------------------------------------------
# NumPy transcription of the paper / official code (float64).

def _np(a):
  return np.asarray(a, np.float64)


def _silu(x):
  return x / (1 + np.exp(-x))


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _ln(x):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6)


def _linear(x, p):
  return x @ _np(p["kernel"]) + _np(p["bias"])


def _modulate(x, shift, scale):
  return x * (1 + scale[:, None]) + shift[:, None]


def _np_block(x, c, p, heads):
  """adaLN-Zero DiT block (the paper's Fig. 3, the official DiTBlock)."""
  b, n, d = x.shape
  hd = d // heads
  mod = _linear(_silu(c), p["adaLN_modulation_1"])
  shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = np.split(mod, 6, -1)
  h = _modulate(_ln(x), shift_msa, scale_msa)
  # timm Attention: qkv -> [B, N, 3, heads, hd] -> [3, B, heads, N, hd].
  qkv = _linear(h, p["attn"]["qkv"]).reshape(b, n, 3, heads, hd).transpose(2, 0, 3, 1, 4)
  q, k, v = qkv
  logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  h = (w @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
  x = x + gate_msa[:, None] * _linear(h, p["attn"]["proj"])
  h = _modulate(_ln(x), shift_mlp, scale_mlp)
  h = _linear(_gelu_tanh(_linear(h, p["mlp"]["fc1"])), p["mlp"]["fc2"])
  return x + gate_mlp[:, None] * h


def _np_timestep_embedding(t, dim=256, max_period=10000):
  """The official TimestepEmbedder.timestep_embedding (cos first)."""
  half = dim // 2
  freqs = np.exp(-math.log(max_period) * np.arange(half) / half)
  args = _np(t)[:, None] * freqs[None]
  return np.concatenate([np.cos(args), np.sin(args)], -1)


def _np_pos_embed(dim, grid_h, grid_w):
  """The official get_2d_sincos_pos_embed (MAE), for a grid_h x grid_w grid.

  The official function takes a square grid; the only change is separate
  sizes for the two aranges.
  """
  def sincos_1d(d, pos):
    omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  grid = np.meshgrid(np.arange(grid_w, dtype=np.float32),
                     np.arange(grid_h, dtype=np.float32))   # w goes first
  grid = np.stack(grid, axis=0).reshape(2, 1, grid_h, grid_w)
  emb_h = sincos_1d(dim // 2, grid[0])
  emb_w = sincos_1d(dim // 2, grid[1])
  return np.concatenate([emb_h, emb_w], axis=1)


def _np_dit(model, params, x, t, labels):
  """The official DiT.forward, channels-last."""
  x = _np(x)
  b, hgt, wid, ch = x.shape
  p, d = model.patch_size, model.hidden_size
  gh, gw = hgt // p, wid // p
  # PatchEmbed: a stride-p conv, i.e. a sum over each patch's pixels.
  kernel = _np(params["x_embedder"]["kernel"])               # [p, p, C, D]
  patches = x.reshape(b, gh, p, gw, p, ch)
  tokens = np.einsum("biajkc,akcd->bijd", patches, kernel).reshape(b, gh * gw, d)
  tokens = tokens + _np(params["x_embedder"]["bias"]) + _np_pos_embed(d, gh, gw)
  te = params["t_embedder"]
  c = _linear(_silu(_linear(_np_timestep_embedding(t), te["mlp_0"])), te["mlp_2"])
  if model.num_classes:
    labels = np.full((b,), model.num_classes) if labels is None else np.asarray(labels)
    c = c + _np(params["y_embedder"]["embedding"])[labels]
  for i in range(model.depth):
    tokens = _np_block(tokens, c, params[f"blocks_{i}"], model.num_heads)
  fl = params["final_layer"]
  shift, scale = np.split(_linear(_silu(c), fl["adaLN_modulation_1"]), 2, -1)
  out = _linear(_modulate(_ln(tokens), shift, scale), fl["linear"])
  # unpatchify: 'nhwpqc->nchpwq' in NCHW is 'nhwpqc->nhpwqc' in NHWC.
  out_ch = out.shape[-1] // (p * p)
  out = out.reshape(b, gh, gw, p, p, out_ch)
  return np.einsum("nhwpqc->nhpwqc", out).reshape(b, hgt, wid, out_ch)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


# --------------------------------------------------------------------------

def test_block_matches_numpy_adaln_zero():
  """One DiTBlock, every weight random and non-zero (modulation included)."""
  block = dit_lib.DiTBlock(num_heads=4, mlp_ratio=2.0)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 6, 32)), jnp.float32)
  c = jnp.asarray(rng.standard_normal((2, 32)), jnp.float32)
  params = _random_like(jax.eval_shape(block.init, jax.random.key(0), x, c))
  out = jax.jit(block.apply, compiler_options=_FAST_COMPILE)(params, x, c)
  ref = _np_block(_np(x), _np(c), params["params"], heads=4)
  assert out.dtype == jnp.float32
  # The gates are O(1), so the branches move the output well away from x.
  assert _rel(ref, x) > 0.3
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_forward_matches_numpy_official_dit():
  """The whole network: patch conv, position and [cos, sin] time embeddings,
  label table, blocks, final layer and unpatchify, on a 4 x 6 patch grid."""
  x, t = _inputs(SHAPE)
  labels = jnp.array([3, 5], jnp.int32)    # a class and the null label
  variables = _random_params(TINY, SHAPE)
  out = _apply(TINY)(variables, x, t, labels)
  ref = _np_dit(TINY, variables["params"], x, t, labels)
  assert out.shape == SHAPE[:3] + (2 * SHAPE[3],) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-4)


def test_zero_output_and_official_init():
  model = DiT(patch_size=2, hidden_size=32, depth=2, num_heads=4,
              num_classes=5, learn_sigma=True)
  x, t = _inputs((2, 8, 8, 4))
  init = jax.jit(model.init, compiler_options=_FAST_COMPILE)
  variables = init(jax.random.key(0), x, t, jnp.array([1, 5], jnp.int32))
  out = _apply(model)(variables, x, t, jnp.array([0, 2], jnp.int32))
  assert out.shape == (2, 8, 8, 8)
  assert np.all(np.asarray(out) == 0.0)
  p = variables["params"]
  # Patch conv: xavier-uniform over the flattened [p*p*C, D] kernel.
  bound = math.sqrt(6 / (2 * 2 * 4 + 32))
  k = np.abs(np.asarray(p["x_embedder"]["kernel"]))
  assert 0.9 * bound < k.max() <= bound
  # A dense kernel: xavier-uniform over [D, 4D].
  k = np.abs(np.asarray(p["blocks_0"]["mlp"]["fc1"]["kernel"]))
  assert 0.95 * math.sqrt(6 / (32 + 128)) < k.max() <= math.sqrt(6 / (32 + 128))
  # normal(0.02): time MLP kernels and the label table.
  for leaf in (p["t_embedder"]["mlp_0"]["kernel"], p["y_embedder"]["embedding"]):
    assert 0.015 < float(np.std(leaf)) < 0.025
  for name in ("blocks_0", "blocks_1", "final_layer"):
    mod = p[name]["adaLN_modulation_1"]
    assert not np.any(mod["kernel"]) and not np.any(mod["bias"])
  assert not np.any(p["final_layer"]["linear"]["kernel"])
  biases = [l for path, l in jax.tree_util.tree_leaves_with_path(p)
            if path[-1].key == "bias"]
  # patch conv, 2 time-MLP, 5 per block, 2 final.
  assert len(biases) == 1 + 2 + 2 * 5 + 2 and not any(np.any(b) for b in biases)


def test_patchify_layout_and_round_trip():
  p, shape = 2, (2, 4, 6, 3)
  x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  tokens = np.asarray(dit_lib.patchify(jnp.asarray(x), p))
  assert tokens.shape == (2, 2 * 3, p * p * 3)
  # Token i * (W/p) + j holds pixel (i*p + a, j*p + b), channel c at
  # (a * p + b) * C + c.
  for i in range(2):
    for j in range(3):
      for a in range(p):
        for b in range(p):
          k = (a * p + b) * 3
          np.testing.assert_array_equal(tokens[:, i * 3 + j, k:k + 3],
                                        x[:, i * p + a, j * p + b, :])
  back = dit_lib.unpatchify(jnp.asarray(tokens), p, 4, 6, 3)
  np.testing.assert_array_equal(back, x)


def test_sincos_position_embedding_is_official_layout():
  np.testing.assert_allclose(dit_lib.sincos_pos_embed_2d(16, 3, 3),
                             _np_pos_embed(16, 3, 3), atol=1e-6)
  rect = dit_lib.sincos_pos_embed_2d(16, 2, 5)
  np.testing.assert_allclose(rect, _np_pos_embed(16, 2, 5), atol=1e-6)
  # First half: the column index (token 1 is row 0, column 1); second half:
  # the row index (token 5 is row 1, column 0); position 0 is [0.., 1..].
  np.testing.assert_allclose(rect[1, :8], [np.sin(1), np.sin(0.1), np.sin(0.01),
                                           np.sin(0.001), np.cos(1), np.cos(0.1),
                                           np.cos(0.01), np.cos(0.001)], atol=1e-6)
  np.testing.assert_allclose(rect[5, 8:], rect[1, :8], atol=1e-6)
  np.testing.assert_allclose(rect[0], [0] * 4 + [1] * 4 + [0] * 4 + [1] * 4)
  with pytest.raises(ValueError, match="dim % 4"):
    dit_lib.sincos_pos_embed_2d(18, 2, 2)


def _dit_embedding(t):
  """The time table DiT's TimestepEmbedder uses: the shared one, [cos, sin], freq_shift 0."""
  return layers.timestep_embedding(t, dit_lib.FREQUENCY_EMBEDDING_SIZE,
                                   flip_sin_to_cos=True, freq_shift=0)


def test_timestep_embedding_is_cos_first():
  t = np.array([0.0, 3.0, 999.0, 0.25], np.float32)
  np.testing.assert_allclose(_dit_embedding(jnp.asarray(t)),
                             _np_timestep_embedding(t), atol=2e-4)
  np.testing.assert_allclose(_dit_embedding(jnp.asarray(t[:1]))[0, :2],
                             [1.0, 1.0])


def test_label_conditioning_and_null_label():
  x, t = _inputs(SHAPE)
  variables = _random_params(TINY, SHAPE)
  apply = _apply(TINY)
  null = apply(variables, x, t, jnp.full((2,), 5, jnp.int32))
  cond = apply(variables, x, t, jnp.array([1, 1], jnp.int32))
  other = apply(variables, x, t, jnp.array([2, 2], jnp.int32))
  assert _rel(cond, null) > 1e-2 and _rel(other, cond) > 1e-2
  # labels=None is the null label, exactly.
  np.testing.assert_array_equal(_apply(TINY)(variables, x, t, None), null)


def test_bfloat16_close_to_float32():
  x, t = _inputs(SHAPE)
  variables = _random_params(TINY, SHAPE)
  labels = jnp.array([0, 4], jnp.int32)
  ref = _apply(TINY)(variables, x, t, labels)
  out = _apply(TINY_BF16)(variables, x, t, labels)
  assert out.dtype == jnp.float32
  err = _rel(out, ref)
  assert 1e-5 < err < 3e-2, err    # bf16 really ran, and stays close


def test_bfloat16_matmuls_in_bf16_statistics_in_f32():
  x = jax.ShapeDtypeStruct(SHAPE, jnp.float32)
  t = jax.ShapeDtypeStruct(SHAPE[:1], jnp.float32)
  labels = jax.ShapeDtypeStruct(SHAPE[:1], jnp.int32)
  variables = jax.eval_shape(TINY_BF16.init, jax.random.key(0), x, t, labels)
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(variables))
  eqns = list(jaxpr_eqns(jax.make_jaxpr(TINY_BF16.apply)(variables, x, t, labels).jaxpr))
  dtypes = lambda e: {str(v.aval.dtype) for v in e.invars if hasattr(v.aval, "dtype")}
  matmuls = [e for e in eqns if e.primitive.name in ("conv_general_dilated",
                                                     "dot_general")]
  # 1 patch conv, 2 time-MLP, per block 5 dense + 2 attention products,
  # final 2 dense.
  assert len(matmuls) == 1 + 2 + 2 * 7 + 2
  assert all(dtypes(e) == {"bfloat16"} for e in matmuls), \
      [(e.primitive.name, dtypes(e)) for e in matmuls if dtypes(e) != {"bfloat16"}]
  reductions = [e for e in eqns if e.primitive.name in ("reduce_sum", "reduce_max",
                                                        "exp")]
  assert reductions and all(dtypes(e) == {"float32"} for e in reductions)


# Parameters of the paper's models on 32 x 32 x 4 latents, 1000 classes,
# learn_sigma (Table 1: S 33M, B 130M, L 458M, XL 675M). The official count
# (sum of model.parameters()) also includes the frozen position embedding
# (256 tokens x D), a constant here: XL/2 + 256 * 1152 = 675,129,632, the
# official DiT-XL/2 count.
PARAM_COUNTS = {"S/2": (32_865_056, 33e6), "B/2": (130_315_808, 130e6),
                "L/2": (457_840_672, 458e6), "XL/2": (674_834_720, 675e6)}


@pytest.mark.parametrize("name", list(PARAM_COUNTS))
def test_param_counts_match_paper(name):
  model = DiT(**dit_lib.preset(name), num_classes=1000, learn_sigma=True)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32),
                          jax.ShapeDtypeStruct((1,), jnp.int32),
                          jax.ShapeDtypeStruct((1,), jnp.int32))
  n = count_params(shapes["params"])
  exact, paper = PARAM_COUNTS[name]
  assert n == exact
  assert abs(n - paper) / paper < 0.01
  if name == "XL/2":
    assert n + 256 * 1152 == 675_129_632


def test_presets():
  assert dit_lib.preset("XL/8") == dict(patch_size=8, hidden_size=1152, depth=28,
                                        num_heads=16, mlp_ratio=4.0)
  assert dit_lib.preset("S/4")["hidden_size"] == 384
  for bad in ("XXL/2", "S/3", "S", "s/2"):
    with pytest.raises(ValueError, match=r"unknown; use one of S/2, S/4, S/8, B/2"):
      dit_lib.preset(bad)


def test_bad_inputs_raise():
  def shapes(model, shape, labels=False):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    t = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
    y = jax.ShapeDtypeStruct(shape[:1], jnp.int32) if labels else None
    return jax.eval_shape(model.init, jax.random.key(0), x, t, y)

  small = DiT(patch_size=2, hidden_size=32, depth=1, num_heads=4)
  with pytest.raises(ValueError, match=r"shape \[B, H, W, C\]"):
    shapes(small, (2, 8, 8))
  with pytest.raises(ValueError, match=r"8x6 is not divisible by model.patch_size=4"):
    shapes(small.clone(patch_size=4), (2, 8, 6, 1))
  with pytest.raises(ValueError, match="hidden_size=32 is not divisible by model.num_heads=3"):
    shapes(small.clone(num_heads=3), (2, 8, 8, 1))
  with pytest.raises(ValueError, match="hidden_size=30 must be a multiple of 4"):
    shapes(small.clone(hidden_size=30, num_heads=2), (2, 8, 8, 1))
  with pytest.raises(ValueError, match="num_classes=0"):
    shapes(small, (2, 8, 8, 1), labels=True)


def _model_group(**overrides):
  """A config.model group holding both backbones' keys, as the config will."""
  m = ml_collections.ConfigDict(dict(
      ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.1,
      num_groups=8, resamp_with_conv=True, num_classes=10, norm="group",
      dtype="float32", patch_size=4, hidden_size=64, depth=3, num_heads=2,
      mlp_ratio=2.0, learn_sigma=True))
  m.update(overrides)
  return m


def test_build_picks_the_network_by_name():
  assert NAMES == ("unet", "dit")
  net = build(_model_group(name="dit", dtype="bfloat16"))
  assert net == DiT(patch_size=4, hidden_size=64, depth=3, num_heads=2,
                    mlp_ratio=2.0, num_classes=10, learn_sigma=True,
                    dtype="bfloat16")
  unet = UNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
              dropout=0.1, num_groups=8, resamp_with_conv=True, num_classes=10,
              norm="group", dtype="float32")
  assert build(_model_group(name="unet")) == unet
  # Older run configs have no model.name: the U-Net.
  assert build(_model_group()) == unet
  assert build(_model_group(name="dit").to_dict()).depth == 3   # a plain mapping
  with pytest.raises(ValueError,
                     match=r"model.name='vit' is unknown; use one of \('unet', 'dit'\)"):
    build(_model_group(name="vit"))


def test_fsdp_splits_the_big_dit_kernels():
  """Which DiT-S/2 leaves parallel.fsdp_spec splits over an fsdp axis of 8."""
  model = DiT(**dit_lib.preset("S/2"), num_classes=1000, learn_sigma=True)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32),
                          jax.ShapeDtypeStruct((1,), jnp.int32),
                          jax.ShapeDtypeStruct((1,), jnp.int32))["params"]
  specs = {"/".join(k.key for k in path): (leaf.shape, parallel.fsdp_spec(leaf.shape, 8))
           for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)}
  split = lambda name: specs[name][1] != parallel.P()
  for i in range(12):
    for name in ("attn/qkv/kernel", "attn/proj/kernel", "mlp/fc1/kernel",
                 "mlp/fc2/kernel", "adaLN_modulation_1/kernel"):
      assert split(f"blocks_{i}/{name}"), name
  # Every kernel and the label table split (fsdp_spec picks the largest
  # dimension 8 divides); every bias (<= 6 * 384 values) stays whole. DiT has
  # no norm parameters.
  for name in specs:
    assert split(name) == (not name.endswith("/bias")), (name, specs[name])
  assert split("y_embedder/embedding") and split("x_embedder/kernel")
  n_split = sum(math.prod(s) for s, spec in specs.values() if spec != parallel.P())
  fraction = n_split / count_params(shapes)
  # Measured: 99.78% of DiT-S/2's parameters split.
  assert fraction > 0.995, fraction
  print(f"DiT-S/2 fsdp=8: {fraction:.4%} of parameters split")
