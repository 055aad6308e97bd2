"""REPA (training.repa, ddx/repa.py): the loss against REPA's, the frozen encoder,
the training-only projector, REPA off unchanged, and a run that trains,
resumes bit for bit and samples. A tiny DiT on the 8x8 digits and a tiny
random DINOv2 (width 32, one block, patch 7) saved as an encoder folder."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddx import config as config_lib
from ddx import parallel
from ddx import repa
from ddx import train
from ddx.encoders import dinov2
from testutils import load_config, train_and_resume


def _save_encoder(folder, seed):
  """A random DINOv2 (patch 7, 2x2 position grid) saved as a converted folder."""
  cfg = dinov2.Dinov2Config(hidden_size=32, depth=1, num_heads=2, patch_size=7, pos_grid=2)
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: (rng.normal(size=a.shape) * 0.2
                       + (path[-1].key == "scale")).astype(np.float32),
      dinov2.abstract_params(cfg))
  return dinov2.save(str(folder), cfg, params)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
  root = tmp_path_factory.mktemp("encoders")
  for seed in (0, 1):
    _save_encoder(root / f"enc{seed}", seed)
  return str(root / "enc0"), str(root / "enc1")


def _config(encoder=""):
  c = load_config("test")
  c.model.name = "dit"
  c.model.update(patch_size=2, hidden_size=32, depth=2, num_heads=2)
  c.diffusion.process = "flow"
  c.diffusion.num_timesteps = 1000   # test.py's is DDPM's, unread by flow
  c.training.batch_size = 8
  c.training.num_steps = 4
  c.training.log_every = 2
  c.training.checkpoint_every = 2
  c.training.sample_every = 4
  c.sampling.steps = 3
  r = c.training.repa
  # 14 px -> a 2x2 patch grid, matched to the DiT's 4x4 (repa.match_grid).
  r.update(encoder=encoder, depth=1, projector_dim=16, resolution=14)
  return c


# --------------------------------------------------------------------------
# The math.

def _repa_loss_numpy(zs, zs_tilde):
  """REPA's loss.py, transcribed: for each example, F.normalize both token
  sets, mean over tokens of -(z · z~), summed and divided by the batch size."""
  def normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  total = 0.0
  for z_j, z_tilde_j in zip(zs, zs_tilde):
    total += np.mean(-(normalize(z_j) * normalize(z_tilde_j)).sum(-1))
  return total / len(zs)


def test_alignment_is_repas_projection_loss():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(3, 5, 7)).astype(np.float32)
  z_tilde = (rng.normal(size=(3, 5, 7)) + 0.5 * z).astype(np.float32)
  loss, cos = repa.alignment(jnp.asarray(z_tilde), jnp.asarray(z))
  np.testing.assert_allclose(loss, _repa_loss_numpy(z, z_tilde), rtol=1e-6)
  assert float(cos) == -float(loss)
  same, _ = repa.alignment(jnp.asarray(z), jnp.asarray(3.0 * z))   # scale-free
  np.testing.assert_allclose(same, -1.0, rtol=1e-6)


def test_spatial_zscore_is_ireps():
  """iREPA's spatial_zscore: (z − α·mean_T) / (std_T + 1e-6), torch's unbiased std."""
  z = np.random.default_rng(1).normal(size=(2, 6, 3)).astype(np.float32)
  want = (z - 0.6 * z.mean(1, keepdims=True)) / (z.std(1, ddof=1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(repa.spatial_zscore(jnp.asarray(z), 0.6), want, rtol=1e-5)


def test_the_conv_projector_is_a_same_convolution_on_the_token_grid(encoders):
  """iREPA's projector: Conv2d(D, E, 3, padding=1) over the [rows, columns] grid
  of the tokens, against a NumPy loop; its gradient is finite."""
  c = _config(encoders[0])
  c.training.repa.update(projector="conv", projector_kernel=3)
  params = jax.jit(lambda key: repa.init_projector(c, 5, key))(jax.random.key(0))
  k, bias = np.asarray(params["conv"]["kernel"]), np.asarray(params["conv"]["bias"])
  assert k.shape == (3, 3, 32, 5) and np.all(np.abs(k) <= 1 / np.sqrt(9 * 32))
  h = np.random.default_rng(0).normal(size=(1, 16, 32)).astype(np.float32)
  pad = np.pad(h.reshape(4, 4, 32), ((1, 1), (1, 1), (0, 0)))
  want = np.stack([np.einsum("ijd,ijde->e", pad[r:r + 3, q:q + 3], k) + bias
                   for r in range(4) for q in range(4)])[None]
  got, g = jax.jit(lambda p, h: (
      repa.projector(c, 5).apply({"params": p}, h),
      jax.grad(lambda q: repa.loss(c, q, h, jnp.ones((1, 16, 5)))[0])(p)))(
          params, jnp.asarray(h))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert all(np.all(np.isfinite(x)) and np.any(x != 0) for x in jax.tree.leaves(g))


def test_match_grid():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 3)), jnp.float32)
  assert repa.match_grid(x, (2, 2), (2, 2)) is x
  up = repa.match_grid(x, (2, 2), (4, 4))
  assert up.shape == (2, 16, 3)
  const = jnp.ones((1, 16, 3))
  np.testing.assert_allclose(repa.match_grid(const, (4, 4), (2, 2)), 1.0, rtol=1e-6)
  # Row-major: the top-left output token comes from the top-left input token.
  np.testing.assert_allclose(up[:, 0], x[:, 0], rtol=1e-6)


def test_no_gradient_reaches_the_encoder(encoders):
  enc = dinov2.load(encoders[0])
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 1)), jnp.float32)
  grads = jax.jit(jax.grad(
      lambda e: jnp.sum(repa.encoder_targets(e, images, 14, (4, 4)) ** 2)))(enc)
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))


# --------------------------------------------------------------------------
# The config.

@pytest.mark.parametrize("overrides, message", [
    ({"model.name": "unet"},
     r"^training.repa needs a network that exposes its hidden tokens; model.name='unet' "
     r"does not: use one of \('dit',\)"),
    ({"training.repa.depth": 3}, r"^training.repa.depth=3 must be a block in \[1, 2\]"),
    ({"training.repa.depth": 0}, r"^training.repa.depth=0 must be a block in \[1, 2\]"),
    ({"training.repa.weight": -0.5}, r"^training.repa.weight=-0.5 must be a number >= 0"),
    ({"training.repa.projector": "linear"},
     r"^training.repa.projector='linear' is unknown; use one of \('mlp', 'conv'\)"),
    ({"training.repa.projector_kernel": 2},
     r"^training.repa.projector_kernel=2 must be an odd positive integer"),
    ({"training.repa.spatial_norm": "pca"},
     r"^training.repa.spatial_norm='pca' is unknown; use one of \('none', 'zscore'\)"),
    ({"training.repa.projector_dim": 0}, r"^training.repa.projector_dim=0 must be a "),
    ({"training.repa.resolution": 0}, r"^training.repa.resolution=0 must be a positive "),
    ({"autoencoder.path": "/some/vae", "data.image_size": 16, "sampling.clip_x0": False},
     r"^training.repa with latent diffusion needs each latent's source pixels"),
])
def test_config_errors_are_one_line(encoders, overrides, message):
  c = _config(encoders[0])
  for key, value in overrides.items():
    group, _, name = key.rpartition(".")
    g = c
    for part in group.split("."):
      g = g[part]
    g[name] = value
  with pytest.raises(config_lib.ConfigError, match=message) as e:
    config_lib.validate(c)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides, message", [
    ({"encoder": "/nonexistent/enc"},
     r"^training.repa.encoder='/nonexistent/enc': /nonexistent/enc/encoder.json does "
     r"not exist; convert DINOv2 weights first"),
    ({"resolution": 20},
     r"^training.repa.resolution=20 is not a multiple of the encoder's patch size 7; "),
])
def test_the_encoder_folder_is_checked_when_training_starts(encoders, overrides, message):
  """Not by validate (sampling a finished run needs no encoder), by make_setup,
  before anything is written."""
  c = _config(encoders[0])
  c.training.repa.update(overrides)
  config_lib.validate(c)
  with pytest.raises(config_lib.ConfigError, match=message) as e:
    repa.load_encoder(c, parallel.make_mesh())
  assert "\n" not in str(e.value)


def test_a_process_without_alignment_is_refused(encoders, monkeypatch):
  from ddx import processes
  monkeypatch.setattr(type(processes.spec("flow")), "repa", False)
  with pytest.raises(config_lib.ConfigError,
                     match=r"^training.repa is not defined for diffusion.process='flow'"):
    config_lib.validate(_config(encoders[0]))


# --------------------------------------------------------------------------
# Training.

@pytest.fixture(scope="module")
def run(encoders, tmp_path_factory):
  """The one REPA run: 4 steps straight, and resumed from step 2 (bit for bit)."""
  config = _config(encoders[0])
  workdir, state = train_and_resume(config, tmp_path_factory.mktemp("run"))
  return config, workdir, jax.device_get(state)


@pytest.mark.slow
def test_a_run_trains_resumes_and_samples(run, encoders):
  import ddx
  config, workdir, state = run
  rec = json.loads(open(os.path.join(workdir, repa.RECORD_FILE)).read())
  assert rec["encoder"] == encoders[0]
  assert rec["weights"] == dinov2.load(encoders[0]).digest
  logged = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  logged = [x for x in logged if "repa_loss" in x]
  assert logged and all(np.isfinite(x["repa_loss"]) and -1 <= x["repa_cos"] <= 1
                        for x in logged)
  np.testing.assert_allclose(logged[-1]["repa_cos"], -logged[-1]["repa_loss"], rtol=1e-6)
  # ddx.load: the EMA network alone (the loop sampled its step-4 grid from it).
  model = ddx.load(workdir)
  assert jax.tree.structure(model.variables["params"]) == jax.tree.structure(state.params)
  # Another encoder's weights: the resume is refused in one line.
  with pytest.raises(config_lib.ConfigError,
                     match=r"^training.repa.encoder='.*enc1' has other weights") as e:
    train.train_and_evaluate(_config(encoders[1]), workdir)
  assert "\n" not in str(e.value)


@pytest.mark.slow
def test_the_projector_trains_and_the_encoder_stays_out(run):
  config, _, state = run
  init_rng = jax.random.fold_in(jax.random.key(config.training.seed), 0)   # train._train's
  fresh = jax.jit(lambda k: repa.init_projector(config, 32, k))(init_rng)
  assert jax.tree.structure(fresh) == jax.tree.structure(state.repa)
  assert all(not np.array_equal(a, b)
             for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(state.repa)))
  # Neither the EMA nor the network's params hold the projector.
  assert jax.tree.structure(state.ema_params) == jax.tree.structure(state.params)
  assert "fc1" not in state.params and "fc1" not in state.ema_params
  # The optimizer: the network's state and the projector's, nothing of the encoder.
  tx = train.make_optimizer(config.optim)
  net_opt, proj_opt = state.opt_state
  assert jax.tree.structure(net_opt) == jax.tree.structure(
      jax.eval_shape(tx.init, state.params))
  assert jax.tree.structure(proj_opt) == jax.tree.structure(
      jax.eval_shape(tx.init, state.repa))


def test_repa_off_is_the_program_without_the_group():
  """REPA off: no projector, no extra argument, and the update is the same
  program as for a config without training.repa (runs older than REPA)."""
  def program(config):
    config_lib.validate(config)
    setup = train.make_setup(config, parallel.make_mesh())
    batch = {"image": jax.ShapeDtypeStruct((8, 8, 8, 1), jnp.float32),
             "label": jax.ShapeDtypeStruct((8,), jnp.int32)}
    assert setup.encoder is None and setup.abstract.repa == ()
    return str(jax.make_jaxpr(setup.step.fn)(setup.abstract, batch, jax.random.key(0),
                                             None))
  bare = _config("")
  del bare.training["repa"]
  off = program(_config(""))
  assert off == program(bare)
  assert "hidden" not in off
