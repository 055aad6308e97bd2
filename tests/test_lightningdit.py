"""LightningDiT's block options on the DiT (model.mlp, token_norm, pos_embed,
qk_norm) and the SiT / LightningDiT presets.

The references are NumPy transcriptions of hustvl/LightningDiT's code
(models/lightningdit.py Attention and LightningDiTBlock, models/rmsnorm.py
RMSNorm, models/swiglu_ffn.py SwiGLUFFN, models/pos_embed.py
VisionRotaryEmbeddingFast with its rotate_half), written here from that code,
not from ddx's. Layers are compared in float64 where they can run in it
(`jax.enable_x64`); the block, whose modulation is float32 by
design, with the float32 tolerance of tests/test_dit.py's block test.
Networks are tiny; the big presets are only ever shapes (`jax.eval_shape`).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddx import config as config_lib
from ddx import parallel
from ddx.models import DiT
from ddx.models import dit as dit_lib
from ddx.models.base import count_params

from testutils import load_config

_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _np(a):
  return np.asarray(a, np.float64)


def _random_like(shapes, seed=1, dtype=np.float32):
  """Every leaf random and non-zero (norm scales near 1), so outputs and
  gradients depend on every weight."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    noise = rng.standard_normal(leaf.shape)
    if path[-1].key == "scale":
      noise = 1 + 0.2 * noise
    elif len(leaf.shape) >= 2:
      noise = noise / math.sqrt(math.prod(leaf.shape[:-1]))
    else:
      noise = 0.1 * noise
    return jnp.asarray(noise.astype(dtype))

  return jax.tree_util.tree_map_with_path(fill, shapes)


# --------------------------------------------------------------------------
# NumPy transcriptions of LightningDiT's layers (float64).

def _np_rmsnorm(x, weight, eps=1e-6):
  """models/rmsnorm.py RMSNorm: x * rsqrt(mean(x^2) + eps), then * weight."""
  return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * weight


def _np_layernorm(x, weight, bias, eps=1e-5):
  """torch nn.LayerNorm(dim) (affine, eps 1e-5): LightningDiT's QK norm."""
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * weight + bias


def _silu(x):
  return x / (1 + np.exp(-x))


def _np_swiglu(x, w12, b12, w3, b3):
  """models/swiglu_ffn.py SwiGLUFFN: x12 = w12(x); x1, x2 = chunk(2); w3(silu(x1) * x2).
  Weights as x @ W (ddx's kernel layout, torch's weight transposed)."""
  x12 = x @ w12 + b12
  x1, x2 = np.split(x12, 2, axis=-1)
  return (_silu(x1) * x2) @ w3 + b3


def _np_rope_tables(head_dim, grid_h, grid_w, theta=10000.0):
  """models/pos_embed.py VisionRotaryEmbeddingFast(dim=head_dim // 2,
  pt_seq_len=grid) as LightningDiT builds it. The one change: separate row
  and column lengths (LightningDiT's grid is square)."""
  dim = head_dim // 2
  freqs = 1.0 / theta ** (np.arange(0, dim, 2)[: dim // 2].astype(np.float64) / dim)

  def axis(n):
    t = np.arange(n) / n * n                       # ft_seq_len = pt_seq_len = n
    f = np.einsum("i,f->if", t, freqs)
    return np.repeat(f, 2, axis=-1)                # '... n -> ... (n r)', r = 2

  fh, fw = axis(grid_h), axis(grid_w)
  # broadcat((freqs[:, None, :], freqs[None, :, :]), dim=-1), then view(-1, D).
  f = np.concatenate([np.broadcast_to(fh[:, None, :], (grid_h, grid_w, dim)),
                      np.broadcast_to(fw[None, :, :], (grid_h, grid_w, dim))], -1)
  f = f.reshape(-1, head_dim)
  return np.cos(f), np.sin(f)


def _np_rotate_half(x):
  """pos_embed.rotate_half: '... (d r) -> ... d r', stack(-x2, x1), back."""
  x = x.reshape(x.shape[:-1] + (-1, 2))
  return np.stack([-x[..., 1], x[..., 0]], -1).reshape(x.shape[:-2] + (-1,))


def _np_attention(x, p, heads, qk_norm, grid):
  """models/lightningdit.py Attention.forward: qkv -> [3, B, heads, N, hd],
  q_norm / k_norm, rope(q), rope(k), softmax(q k^T / sqrt(hd)) v, proj."""
  b, n, d = x.shape
  hd = d // heads
  qkv = (x @ _np(p["qkv"]["kernel"]) + _np(p["qkv"]["bias"]))
  q, k, v = qkv.reshape(b, n, 3, heads, hd).transpose(2, 0, 3, 1, 4)
  if qk_norm == "layer":
    q = _np_layernorm(q, _np(p["q_norm"]["scale"]), _np(p["q_norm"]["bias"]))
    k = _np_layernorm(k, _np(p["k_norm"]["scale"]), _np(p["k_norm"]["bias"]))
  elif qk_norm == "rms":
    q = _np_rmsnorm(q, _np(p["q_norm"]["scale"]))
    k = _np_rmsnorm(k, _np(p["k_norm"]["scale"]))
  if grid is not None:
    cos, sin = _np_rope_tables(hd, *grid)
    q = q * cos + _np_rotate_half(q) * sin
    k = k * cos + _np_rotate_half(k) * sin
  logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  h = (w @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
  return h @ _np(p["proj"]["kernel"]) + _np(p["proj"]["bias"])


def _np_lightningdit_block(x, c, p, heads, grid):
  """LightningDiTBlock.forward with use_rmsnorm, use_swiglu, rope, use_qknorm
  (its QK norm is then an RMSNorm), wo_shift False."""
  mod = _silu(c) @ _np(p["adaLN_modulation_1"]["kernel"]) + _np(p["adaLN_modulation_1"]["bias"])
  shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = np.split(mod, 6, -1)
  modulate = lambda h, shift, scale: h * (1 + scale[:, None]) + shift[:, None]
  h = modulate(_np_rmsnorm(x, _np(p["norm1"]["scale"])), shift_msa, scale_msa)
  x = x + gate_msa[:, None] * _np_attention(h, p["attn"], heads, "rms", grid)
  h = modulate(_np_rmsnorm(x, _np(p["norm2"]["scale"])), shift_mlp, scale_mlp)
  m = p["mlp"]
  h = _np_swiglu(h, _np(m["w12"]["kernel"]), _np(m["w12"]["bias"]), _np(m["w3"]["kernel"]),
                 _np(m["w3"]["bias"]))
  return x + gate_mlp[:, None] * h


# --------------------------------------------------------------------------
# The layers against the transcriptions.

def test_rope_tables_are_eva02s_layout():
  """Rows rotate the first half of a head, columns the second, in adjacent
  pairs; on a rectangular 3 x 5 grid (row/column mix-ups show)."""
  cos, sin = dit_lib.rope_2d(16, 3, 5)
  ref_cos, ref_sin = _np_rope_tables(16, 3, 5)
  assert cos.shape == sin.shape == (15, 16) and cos.dtype == np.float64
  # float64 throughout; the two write the frequencies differently (1 / t^a and
  # t^-a), a few ulps of angles <= 4 (ulp 8.9e-16).
  tol = 1e-14
  np.testing.assert_allclose(cos, ref_cos, rtol=0, atol=tol)
  np.testing.assert_allclose(sin, ref_sin, rtol=0, atol=tol)
  # Token 7 is row 1, column 2; head_dim 16: per half four frequencies
  # 10000^(-2i/8), each on one adjacent channel pair.
  pairs = np.repeat([1.0, 0.1, 0.01, 0.001], 2)
  np.testing.assert_allclose(cos[7], np.cos(np.concatenate([1 * pairs, 2 * pairs])),
                             rtol=0, atol=tol)
  np.testing.assert_allclose(sin[7], np.sin(np.concatenate([1 * pairs, 2 * pairs])),
                             rtol=0, atol=tol)
  with pytest.raises(ValueError, match="head_dim % 4"):
    dit_lib.rope_2d(6, 2, 2)


def test_rope_rotates_pairs_and_is_relative():
  """apply_rope = x cos + rotate_half(x) sin (float64); the q.k logits then
  depend only on the offset between two tokens' rows and columns."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 15, 3, 16))
  ref_cos, ref_sin = _np_rope_tables(16, 3, 5)
  with jax.enable_x64():
    out = np.asarray(dit_lib.apply_rope(jnp.asarray(x), ref_cos, ref_sin))
  assert out.dtype == np.float64
  want = x * ref_cos[:, None] + _np_rotate_half(x) * ref_sin[:, None]
  np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
  # One q and one k at every token: q_i . k_j is a function of (i - j) on the grid.
  q = np.broadcast_to(rng.standard_normal(16), (15, 16))
  k = np.broadcast_to(rng.standard_normal(16), (15, 16))
  rot = lambda a: a * ref_cos + _np_rotate_half(a) * ref_sin
  logits = rot(q) @ rot(k).T
  # Tokens (0, 0)-(1, 2) and (1, 1)-(2, 3): the same offset (1, 2).
  np.testing.assert_allclose(logits[0, 7], logits[6, 13], rtol=1e-12)
  assert abs(logits[0, 7] - logits[0, 2]) > 1e-3   # and offsets matter


def test_rmsnorm_matches_llamas():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 24)) * 3
  norm = dit_lib.Norm("rms", 1e-6)
  with jax.enable_x64():
    params = {"params": {"scale": jnp.asarray(1 + 0.2 * rng.standard_normal(24))}}
    out = np.asarray(norm.apply(params, jnp.asarray(x)))
  assert out.dtype == np.float64
  np.testing.assert_allclose(out, _np_rmsnorm(x, _np(params["params"]["scale"])),
                             rtol=1e-12, atol=1e-12)


def test_swiglu_matches_lightningdits_and_its_width():
  # int(2/3 * int(D * ratio)): 1152 * 4 -> 3072, 768 * 4 -> 2048, 32 * 2 -> 42.
  assert [dit_lib.swiglu_hidden(d, r) for d, r in ((1152, 4.0), (768, 4.0), (32, 2.0))] == \
      [3072, 2048, 42]
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 32))
  layer = dit_lib.SwiGLU(hidden=42, dtype=jnp.float64)
  with jax.enable_x64():
    shapes = jax.eval_shape(layer.init, jax.random.key(0), jnp.asarray(x))
    params = _random_like(shapes, dtype=np.float64)
    out = np.asarray(layer.apply(params, jnp.asarray(x)))
  p = params["params"]
  assert p["w12"]["kernel"].shape == (32, 84) and p["w3"]["kernel"].shape == (42, 32)
  ref = _np_swiglu(x, _np(p["w12"]["kernel"]), _np(p["w12"]["bias"]),
                   _np(p["w3"]["kernel"]), _np(p["w3"]["bias"]))
  np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("qk_norm,rope", [("layer", False), ("rms", False),
                                          ("rms", True), (None, True)])
def test_attention_qk_norm_and_rope_match_lightningdits(qk_norm, rope, monkeypatch):
  """LightningDiT's Attention in float64: QK norm (LayerNorm eps 1e-5, or
  RMSNorm) per head, then RoPE, on a 2 x 3 grid. jax.nn.dot_product_attention
  keeps its softmax float32 even for float64 inputs, so here it is replaced by
  the same product in float64, written in the test (torch's
  scaled_dot_product_attention, [B, T, N, H] in and out)."""
  def attention64(q, k, v):
    logits = jnp.einsum("bqnh,bknh->bnqk", q, k) / math.sqrt(q.shape[-1])
    return jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(logits, axis=-1), v)

  monkeypatch.setattr(jax.nn, "dot_product_attention", attention64)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 6, 32))
  grid = (2, 3) if rope else None
  attn = dit_lib.Attention(num_heads=2, dtype=jnp.float64, qk_norm=qk_norm, rope_grid=grid)
  with jax.enable_x64():
    shapes = jax.eval_shape(attn.init, jax.random.key(0), jnp.asarray(x))
    params = _random_like(shapes, dtype=np.float64)
    out = np.asarray(attn.apply(params, jnp.asarray(x)))
  names = set(params["params"])
  assert names == {"qkv", "proj"} | ({"q_norm", "k_norm"} if qk_norm else set())
  if qk_norm:
    assert set(params["params"]["q_norm"]) == ({"scale", "bias"} if qk_norm == "layer"
                                               else {"scale"})
    assert params["params"]["q_norm"]["scale"].shape == (16,)   # per head, shared
  assert out.dtype == np.float64
  ref = _np_attention(x, params["params"], 2, qk_norm, grid)
  np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-10)


def test_block_with_every_option_matches_lightningdits():
  """One block, RMSNorm + SwiGLU + QK RMSNorm + RoPE, every weight random."""
  block = dit_lib.DiTBlock(num_heads=2, mlp_ratio=2.0, mlp="swiglu", token_norm="rms",
                           qk_norm=True, rope_grid=(2, 3))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 6, 32)), jnp.float32)
  c = jnp.asarray(rng.standard_normal((2, 32)), jnp.float32)
  params = _random_like(jax.eval_shape(block.init, jax.random.key(0), x, c))
  out = jax.jit(block.apply, compiler_options=_FAST_COMPILE)(params, x, c)
  ref = _np_lightningdit_block(_np(x), _np(c), params["params"], 2, (2, 3))
  assert float(np.linalg.norm(ref - _np(x)) / np.linalg.norm(ref)) > 0.3
  # tests/test_dit.py's float32 tolerance for the DiT block.
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------
# The defaults are today's DiT; each option's parameters.

def _param_shapes(model, shape=(2, 8, 12, 3)):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  t = jax.ShapeDtypeStruct(shape[:1], jnp.float32)
  y = jax.ShapeDtypeStruct(shape[:1], jnp.int32) if model.num_classes else None
  params = jax.eval_shape(model.init, jax.random.key(0), x, t, y)["params"]
  return {"/".join(k.key for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


_TINY = DiT(patch_size=2, hidden_size=32, depth=2, num_heads=4, mlp_ratio=2.0,
            num_classes=5, learn_sigma=True)

# The parameters of _TINY before the options existed (listed from the code of
# 2026-12-08, commit 612cab5): the official DiT's tree, which the importer
# (ddx/convert/dit.py) writes.
_BLOCK = {"adaLN_modulation_1/bias": (192,), "adaLN_modulation_1/kernel": (32, 192),
          "attn/proj/bias": (32,), "attn/proj/kernel": (32, 32),
          "attn/qkv/bias": (96,), "attn/qkv/kernel": (32, 96),
          "mlp/fc1/bias": (64,), "mlp/fc1/kernel": (32, 64),
          "mlp/fc2/bias": (32,), "mlp/fc2/kernel": (64, 32)}
_DEFAULT_TREE = {
    **{f"blocks_{i}/{k}": v for i in range(2) for k, v in _BLOCK.items()},
    "final_layer/adaLN_modulation_1/bias": (64,),
    "final_layer/adaLN_modulation_1/kernel": (32, 64),
    "final_layer/linear/bias": (24,), "final_layer/linear/kernel": (32, 24),
    "t_embedder/mlp_0/bias": (32,), "t_embedder/mlp_0/kernel": (256, 32),
    "t_embedder/mlp_2/bias": (32,), "t_embedder/mlp_2/kernel": (32, 32),
    "x_embedder/bias": (32,), "x_embedder/kernel": (2, 2, 3, 32),
    "y_embedder/embedding": (6, 32)}


def test_defaults_keep_the_dit_parameter_tree():
  assert _param_shapes(_TINY) == _DEFAULT_TREE
  explicit = _TINY.clone(mlp="gelu", token_norm="layer", pos_embed="sincos", qk_norm=False)
  assert explicit == _TINY
  assert {k: dit_lib.SPEC.defaults()[k] for k in ("mlp", "token_norm", "pos_embed",
                                                  "qk_norm")} == \
      dict(mlp="gelu", token_norm="layer", pos_embed="sincos", qk_norm=False)


def test_each_option_changes_only_its_parameters():
  def diff(**options):
    tree = _param_shapes(_TINY.clone(**options))
    return ({k: v for k, v in tree.items() if _DEFAULT_TREE.get(k) != v},
            set(_DEFAULT_TREE) - set(tree))

  added, removed = diff(mlp="swiglu")        # hidden int(2/3 * 64) = 42
  assert added == {f"blocks_{i}/mlp/{k}": v for i in range(2) for k, v in
                   (("w12/kernel", (32, 84)), ("w12/bias", (84,)),
                    ("w3/kernel", (42, 32)), ("w3/bias", (32,)))}
  assert removed == {f"blocks_{i}/mlp/{k}" for i in range(2) for k in
                     ("fc1/kernel", "fc1/bias", "fc2/kernel", "fc2/bias")}
  added, removed = diff(token_norm="rms")
  assert added == {"blocks_0/norm1/scale": (32,), "blocks_0/norm2/scale": (32,),
                   "blocks_1/norm1/scale": (32,), "blocks_1/norm2/scale": (32,),
                   "final_layer/norm_final/scale": (32,)} and not removed
  assert diff(pos_embed="rope") == ({}, set())            # constants only
  added, removed = diff(qk_norm=True)                     # LayerNorm, head_dim 8
  assert added == {f"blocks_{i}/attn/{q}_norm/{w}": (8,) for i in range(2)
                   for q in "qk" for w in ("scale", "bias")} and not removed
  added, _ = diff(qk_norm=True, token_norm="rms")
  assert {k for k in added if "_norm/" in k} == {
      f"blocks_{i}/attn/{q}_norm/scale" for i in range(2) for q in "qk"}


# --------------------------------------------------------------------------
# Each option alone and all together: one training step on a tiny DiT.

_OPTIONS = {
    "swiglu": dict(mlp="swiglu"),
    "rms": dict(token_norm="rms"),
    "rope": dict(pos_embed="rope"),
    "qk_norm": dict(qk_norm=True),
    "all_bf16_remat": dict(mlp="swiglu", token_norm="rms", pos_embed="rope",
                           qk_norm=True, dtype="bfloat16", remat="dots"),
}


@pytest.mark.parametrize("name", list(_OPTIONS))
def test_each_option_gives_a_finite_loss_and_gradients(name):
  """Flow matching's velocity loss and its gradient at random weights (the
  gates non-zero, so gradients reach every block parameter): finite, and
  every parameter the option adds gets a non-zero gradient."""
  model = DiT(patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=3,
              **_OPTIONS[name])
  shape = (4, 8, 8, 1)
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  noise = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  t = jnp.asarray(rng.uniform(size=(4,)), jnp.float32)
  y = jnp.array([0, 1, 2, 3], jnp.int32)
  xs = jax.ShapeDtypeStruct(shape, jnp.float32)
  params = _random_like(jax.eval_shape(model.init, jax.random.key(0), xs, t, y))

  def loss_fn(params):
    xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
    v = model.apply(params, xt, 1000 * t, y)
    return jnp.mean(jnp.square(v - (noise - x0)))

  loss, grads = jax.jit(jax.value_and_grad(loss_fn), compiler_options=_FAST_COMPILE)(params)
  assert np.isfinite(float(loss)) and float(loss) > 0
  flat = {"/".join(k.key for k in path): np.asarray(g)
          for path, g in jax.tree_util.tree_leaves_with_path(grads["params"])}
  assert all(np.all(np.isfinite(g)) for g in flat.values())
  new = [k for k in flat if any(s in k for s in ("norm1", "norm2", "norm_final", "q_norm",
                                                 "k_norm", "w12", "w3"))]
  assert bool(new) == (name != "rope")
  for k in new + ["blocks_0/attn/qkv/kernel"]:
    assert np.abs(flat[k]).max() > 0, k


def test_options_compose_with_the_pallas_layernorm_kernel():
  """norm_kernel=pallas (interpreted on CPU) fuses the adaLN LayerNorms with
  SwiGLU, RoPE and the QK LayerNorm on: the same function as xla."""
  model = DiT(patch_size=2, hidden_size=32, depth=1, num_heads=2, mlp="swiglu",
              pos_embed="rope", qk_norm=True)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 1)), jnp.float32)
  t = jnp.array([3.0, 500.0], jnp.float32)
  params = _random_like(jax.eval_shape(model.init, jax.random.key(0), x, t))
  ref = jax.jit(model.apply, compiler_options=_FAST_COMPILE)(params, x, t)
  out = jax.jit(model.clone(norm_kernel="pallas").apply,
                compiler_options=_FAST_COMPILE)(params, x, t)
  # tests/test_fused_norm.py's float32 tolerance for the same function.
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match=r"model.token_norm='rms' has no fused kernel: "
                     r"use model.norm_kernel=xla"):
    model.clone(token_norm="rms", norm_kernel="pallas").init(jax.random.key(0), x, t)


# --------------------------------------------------------------------------
# Config checks: one line naming the key and the fix.

@pytest.mark.parametrize("overrides,message", [
    (dict(mlp="relu"), r"^model.mlp='relu' is unknown; use one of \('gelu', 'swiglu'\)$"),
    (dict(token_norm="batch"),
     r"^model.token_norm='batch' is unknown; use one of \('layer', 'rms'\)$"),
    (dict(pos_embed="learned"),
     r"^model.pos_embed='learned' is unknown; use one of \('sincos', 'rope'\)$"),
    (dict(pos_embed="rope", hidden_size=24, num_heads=4),
     r"^model.pos_embed=rope needs a head dim \(hidden_size / num_heads = 6\) divisible "
     r"by 4 .*; change model.num_heads or use model.pos_embed=sincos$"),
    (dict(mlp="swiglu", mlp_ratio=0.01),
     r"^model.mlp=swiglu with hidden_size=32, mlp_ratio=0.01 has no hidden units; raise "
     r"model.mlp_ratio$"),
    (dict(token_norm="rms", norm_kernel="pallas"),
     r"^model.norm_kernel='pallas' fuses DiT's LayerNorm; model.token_norm='rms' has no "
     r"fused kernel: use model.norm_kernel=xla$"),
])
def test_config_checks_name_the_key_and_the_fix(overrides, message):
  c = load_config()
  c.model.name = "dit"
  c.model.update(dit_lib.SPEC.tiny)
  c.model.update(overrides)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)


def test_the_network_runs_the_same_checks():
  """A bad field set on the module (not through a typed config) fails with the
  config's line when the network is traced."""
  x = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.float32)
  small = DiT(patch_size=2, hidden_size=32, depth=1, num_heads=2)
  with pytest.raises(ValueError, match=r"^model.qk_norm='yes' must be True or False\n"):
    jax.eval_shape(small.clone(qk_norm="yes").init, jax.random.key(0), x, t)
  with pytest.raises(ValueError, match=r"^model.pos_embed=rope needs a head dim "
                     r"\(hidden_size / num_heads = 6\)"):
    jax.eval_shape(small.clone(num_heads=4, hidden_size=24, pos_embed="rope").init,
                   jax.random.key(0), x, t)
  with pytest.raises(ValueError, match=r"^model.mlp='relu' is unknown"):
    jax.eval_shape(small.clone(mlp="relu").init, jax.random.key(0), x, t)


def test_lightningdit_config_validates():
  c = load_config()
  c.model.name = "dit"
  c.model.update(dit_lib.SPEC.tiny)
  c.model.update(mlp="swiglu", token_norm="rms", pos_embed="rope", qk_norm=True)
  config_lib.validate(c)


# --------------------------------------------------------------------------
# Presets and their published parameter counts.

def _count(name, channels, size):
  model = DiT(**dit_lib.preset(name), num_classes=1000)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32),
                          jax.ShapeDtypeStruct((1,), jnp.int32),
                          jax.ShapeDtypeStruct((1,), jnp.int32))["params"]
  tokens = (size // model.patch_size) ** 2
  # The official count (sum of model.parameters()) also holds the frozen
  # sin-cos position embedding, tokens x D; a constant in ddx.
  return count_params(shapes), tokens * model.hidden_size, shapes


# name -> (latent channels, latent side, exact count (ddx, no frozen pos
# embed), published figure, its half unit). SiT-B/2 and XL/2 on SD-VAE
# latents (32x32x4, learn_sigma), the SiT paper's 130M and 675M (DiT's
# networks; the published figures match the count without the frozen table:
# 130.32M; with it 130.51M). LightningDiT-XL/1 on VA-VAE latents (16x16x32,
# no learned variance): the repository's training log (docs/log.txt)
# "LightningDiT Parameters: 675.26M", which counts the frozen table
# (674,961,824 + 294,912 = 675,256,736). LightningDiT-B/1: no figure was
# found in the repository or the paper; its count is pinned and compared with
# the B models' 130M.
_PRESET_COUNTS = {
    "SiT-B/2": (4, 32, 130_315_808, 130e6, 0.5e6, False),
    "SiT-XL/2": (4, 32, 674_834_720, 675e6, 0.5e6, False),
    "LightningDiT-B/1": (32, 16, 130_359_584, 130e6, 0.5e6, False),
    "LightningDiT-XL/1": (32, 16, 674_961_824, 675.26e6, 0.005e6, True),
}


@pytest.mark.parametrize("name", list(_PRESET_COUNTS))
def test_preset_param_counts_match_the_published(name):
  channels, size, exact, published, half_unit, with_table = _PRESET_COUNTS[name]
  n, table, _ = _count(name, channels, size)
  assert n == exact
  assert abs(n + (table if with_table else 0) - published) < half_unit


def test_presets():
  xl = dit_lib.preset("LightningDiT-XL/1")
  assert xl == dict(patch_size=1, hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0,
                    learn_sigma=False, mlp="swiglu", token_norm="rms", pos_embed="rope",
                    qk_norm=False)
  assert dit_lib.preset("SiT-B/2") == dict(dit_lib.preset("B/2"), learn_sigma=True)
  for bad in ("LightningDiT-XL/4", "SiT-B/1", "Sit-B/2", "LightningDiT-XXL/1"):
    with pytest.raises(ValueError, match=r"unknown; use one of S/2, .*, or "
                       r"SiT-<size>/2\|4\|8, LightningDiT-<size>/1\|2$"):
      dit_lib.preset(bad)


def test_fsdp_splits_the_lightningdit_kernels():
  """FSDP decides from shapes: every LightningDiT-B/1 kernel (SwiGLU's w12
  and w3 too) splits over an fsdp axis of 8; the RMSNorm scales [D] stay
  whole, as the [D] biases do."""
  _, _, shapes = _count("LightningDiT-B/1", 32, 16)
  for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
    name = "/".join(k.key for k in path)
    split = parallel.fsdp_spec(leaf.shape, 8) != parallel.P()
    if name.endswith("kernel") or name.endswith("embedding"):
      assert split, name
    if name.endswith("scale") or leaf.shape == (768,):
      assert not split, name
  assert shapes["blocks_0"]["mlp"]["w12"]["kernel"].shape == (768, 4096)
