"""Tests for the speed options: model.attention, training.remat (ddx.models).

The fused attention paths are checked against a NumPy transcription of
softmax(q k^T / sqrt(H)) v and against each network's own XLA path; remat is
checked to leave the gradients unchanged and to change the program. Models
are tiny and their parameters drawn with NumPy from `jax.eval_shape(init)`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddx import config as config_lib
from ddx import model as model_lib
from ddx.models import DiT, UNet
from ddx.models import attention as attention_lib

from testutils import exported_calls, jaxpr_eqns

_FAST_COMPILE = {"xla_backend_optimization_level": 0}

# One head (DDPM) and two heads of 8 channels, attention at 4x4 and 2x2.
UNET = UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
            num_groups=4)
UNET_HEADS = UNET.clone(attn_head_dim=8)
DIT = DiT(patch_size=2, hidden_size=32, depth=2, num_heads=4, mlp_ratio=2.0)
SHAPE = (2, 8, 8, 3)


def _inputs(seed=0):
  x = jnp.asarray(np.random.default_rng(seed).standard_normal(SHAPE), jnp.float32)
  return x, jnp.array([3, 700], jnp.int32)


@functools.cache
def _params(model, seed=1):
  """Random float32 params of `model` (norm scales near 1), drawn with NumPy."""
  x, t = _inputs()
  abstract = jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, a: jnp.asarray(rng.normal(size=a.shape) * 0.3
                                  + (path[-1].key == "scale"), jnp.float32),
      abstract)


def _np_attention(q, k, v):
  """softmax(q k^T / sqrt(H)) v per head, float64; q, k, v [B, T, N, H]."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", w, v)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


def test_auto_attention_matches_numpy():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 16, 2, 8)) * 2, jnp.float32)
             for _ in range(3))
  out = attention_lib.attend(q, k, v, "auto")
  assert out.shape == q.shape and out.dtype == jnp.float32
  assert _rel(out, _np_attention(q, k, v)) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("model", [UNET, UNET_HEADS, DIT], ids=["unet", "unet_heads", "dit"])
def test_auto_attention_equals_the_xla_path(model):
  """float32: the same function (bitwise equal here; 2e-6 leaves XLA room to
  reorder sums). bfloat16: within 3% of the largest output: the U-Net's XLA
  path rounds its logits to bf16 (8 significant bits) before the float32
  softmax while jax.nn's keeps them float32, so the weights differ by up to
  |logit| * 2^-9 relative, and both paths round weights and outputs to bf16
  (measured 0.94% with one head, 1.17% with heads of 8; DiT: 0, the same
  call)."""
  x, t = _inputs()
  params = {"params": _params(model)}
  for dtype, tol in (("float32", 2e-6), ("bfloat16", 3e-2)):
    run = lambda attention: jax.jit(
        model.clone(dtype=dtype, attention=attention).apply,
        compiler_options=_FAST_COMPILE)(params, x, t)
    ref, out = run("xla"), run("auto")
    assert _rel(out, ref) < tol, (dtype, _rel(out, ref))


def test_cudnn_attention_on_cpu_is_a_config_error():
  config = config_lib.base_config()
  config.model.attention = "cudnn"
  config_lib.validate(config)          # a valid name: it is the backend that lacks it
  with pytest.raises(config_lib.ConfigError,
                     match=r"^model.attention='cudnn': cudnn needs a GPU backend, this "
                           r"one is cpu; use --config.model.attention=xla \(or auto\)$"):
    model_lib.network(config)
  config.model.attention = "flash"
  with pytest.raises(config_lib.ConfigError, match=r"model.attention='flash' is unknown"):
    config_lib.validate(config)
  assert attention_lib.unavailable("tpu_flash", "gpu") == (
      "tpu_flash needs a TPU backend, this one is gpu")
  assert attention_lib.unavailable("cudnn", "gpu") is None


def test_remat_is_checked_by_the_config():
  config = config_lib.base_config()
  config.training.remat = "some"
  with pytest.raises(config_lib.ConfigError, match=r"training.remat='some' is unknown"):
    config_lib.validate(config)


def _grads(model, remat):
  """Gradients of a training-mode loss of `model` with `remat`, and its jaxpr."""
  x, t = _inputs()
  net = model.clone(remat=remat)
  loss = lambda p: jnp.sum(net.apply({"params": p}, x, t, train=True) ** 2)
  grad = jax.grad(loss)
  return (jax.jit(grad, compiler_options=_FAST_COMPILE)(_params(model)),
          jax.make_jaxpr(grad)(_params(model)).jaxpr)


def _checkpoints(jaxpr):
  # jax.checkpoint's primitive is "remat2" in jax 0.10 ("checkpoint" in some others).
  return [e for e in jaxpr_eqns(jaxpr)
          if e.primitive.name in ("checkpoint", "remat", "remat2")]


@pytest.mark.slow
@pytest.mark.parametrize("model", [UNET, DIT], ids=["unet", "dit"])
def test_remat_keeps_gradients_and_changes_the_program(model):
  ref, jaxpr = _grads(model, "none")
  assert not _checkpoints(jaxpr)       # the default program has no checkpoint
  # U-Net: 8 ResBlocks (2 down, 2 middle, 4 up) + 4 AttnBlocks at 4x4; DiT: depth.
  blocks = 8 + 4 if model is UNET else 2
  for remat in ("dots", "full"):
    grads, jaxpr = _grads(model, remat)
    assert len(_checkpoints(jaxpr)) == blocks, remat
    # Recomputing reorders float32 sums; leaves whose true gradient is zero
    # (conv biases just before a GroupNorm) hold only that rounding, so the
    # absolute tolerance is relative to the largest gradient of the model.
    scale = max(float(np.abs(b).max()) for b in jax.tree.leaves(ref))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale)


def test_make_setup_builds_the_net_with_training_remat():
  from ddx import parallel, train
  from testutils import load_config
  config = load_config("test")
  config.training.remat = "full"
  setup = train.make_setup(config, parallel.make_mesh())
  assert setup.net.remat == "full"
  assert model_lib.network(config).remat == "none"   # sampling: the plain network


def test_tpu_flash_attention_lowers_for_tpu_without_one():
  """jax.export lowers for a platform this machine lacks: the Pallas TPU
  kernel becomes a Mosaic call for DiT-B/2's attention (256 tokens, 12 heads
  of 64, bf16). cuDNN's cannot be checked so: its lowering asks for the library."""
  q = jax.ShapeDtypeStruct((4, 256, 12, 64), jnp.bfloat16)
  f = lambda q, k, v: attention_lib.attend(q, k, v, "tpu_flash")
  assert exported_calls(f, (q, q, q), "tpu") >= 1
