"""Latent diffusion: the latent cache (--mode encode), reading it as batches, and
a tiny latent run that trains, resumes and samples decoded images."""
import copy
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddx
from ddx import autoencoder as ae_lib
from ddx import config as config_lib
from ddx import data as data_lib
from ddx import latents
from ddx import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_vae(folder, seed=0):
  """A random two-level autoencoder (downsample 2, 4 latent channels)."""
  settings = ae_lib.Settings(block_out_channels=(8, 8), layers_per_block=1,
                             norm_num_groups=4, latent_channels=4,
                             scaling_factor=0.5, shift_factor=0.1)
  ae_lib.save(str(folder), settings, ae_lib.init_params(settings, jax.random.key(seed)))
  return str(folder)


def latent_config(tmp, vae, **over):
  c = config_lib.from_file(os.path.join(ROOT, "configs", "test.py"))
  c.data.name, c.data.path = "latents", str(tmp / "cache")
  c.data.image_size, c.data.channels, c.data.random_flip = 16, 3, True
  c.autoencoder.path, c.autoencoder.downsample = vae, 2
  c.encode.source, c.encode.shard_size, c.encode.batch_size = "digits", 700, 128
  c.model.attn_resolutions = ()
  c.sampling.clip_x0 = False
  for k, v in over.items():
    group, field = k.split(".")
    c[group][field] = v
  return c


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("latents")
  vae = tiny_vae(tmp / "vae")
  config = latent_config(tmp, vae)
  meta = latents.encode_dataset(config, log=lambda *_: None)
  return tmp, vae, config, meta


def test_cache_holds_the_encoded_images_and_their_mirrors(cache):
  tmp, vae, config, meta = cache
  assert meta["num_images"] == 1797 and meta["latent_shape"] == [8, 8, 4]
  assert sorted(os.listdir(config.data.path)) == sorted(
      ["latents.json"] + [f"shard_{k:06d}{e}" for k in range(3)
                          for e in (".npy", ".labels.npy")])
  digits = data_lib.digits_source(16, 3)
  ae = ae_lib.load(vae)
  idx = np.array([0, 5, 699, 700, 1796])        # across shard boundaries
  x = digits.images[idx].astype(np.float32) / 127.5 - 1.0
  src = latents.LatentSource(config.data.path, random_flip=True)
  for flip, pixels in ((False, x), (True, x[:, :, ::-1])):
    mean, std = ae_lib.encode_moments(ae, jnp.asarray(pixels))
    got, labels = src.moments(idx, np.full(len(idx), flip))
    np.testing.assert_allclose(got[:, 0], mean, atol=1e-5)
    np.testing.assert_allclose(got[:, 1], std, atol=1e-5)
    np.testing.assert_array_equal(labels, digits.labels[idx])


def test_decoding_in_chunks_equals_one_decode(cache):
  from ddx import model as model_lib
  _, vae, _, _ = cache
  ae = ae_lib.load(vae)
  z = jax.random.normal(jax.random.key(1), (10, 8, 8, 4))
  whole = ae_lib.decode(ae, z)
  for max_batch in (3, 6):     # 10 images: 5 chunks of 2, or 2 chunks of 5
    np.testing.assert_allclose(jax.jit(model_lib.decode_latents, static_argnums=2)(
        ae, z, max_batch), whole, atol=1e-5)


def test_remote_rows_read_single_rows(cache):
  from etils import epath
  _, _, config, _ = cache
  path = os.path.join(config.data.path, "shard_000001.npy")
  full = np.load(path)
  rows = latents._RemoteRows(epath.Path(path))
  for i in (0, 3, len(full) - 1):
    np.testing.assert_array_equal(rows[i], full[i])


def test_batches_are_scaled_posterior_samples_of_the_planned_rows(cache):
  _, _, config, meta = cache
  src = latents.run_source(config)
  step, seed, B = 3, 3, 8
  got = data_lib.get_batch(src, step, batch_size=B, seed=seed, random_flip=True,
                           process_index=1, process_count=2)
  index = data_lib.global_batch_indices(len(src), B, seed, step)[4:]
  flip = data_lib.flip_mask(B, seed, step)[4:]
  assert flip.any() and not flip.all()
  m, labels = src.moments(index, flip)
  noise = np.stack([np.random.default_rng(np.random.SeedSequence([seed, 2, step, 4 + j]))
                    .standard_normal((8, 8, 4), dtype=np.float32) for j in range(4)])
  want = (m[:, 0] + m[:, 1] * noise - 0.1) * 0.5      # (z - shift) * scale
  np.testing.assert_allclose(got["image"], want, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(got["label"], labels)
  # The loader (a worker thread) yields the same batches.
  with data_lib.Loader(src, step, batch_size=B, seed=seed, random_flip=True,
                       process_index=1, process_count=2, num_workers=0) as loader:
    _, batch = next(loader)
  np.testing.assert_array_equal(batch["image"], got["image"])
  mean_src = latents.LatentSource(config.data.path, random_flip=True, sample_posterior=False)
  mean = data_lib.get_batch(mean_src, step, batch_size=B, seed=seed, random_flip=True,
                            process_index=1, process_count=2)["image"]
  np.testing.assert_allclose(mean, (m[:, 0] - 0.1) * 0.5, rtol=1e-6)


def test_interrupted_encode_resumes_to_the_same_bytes(cache, tmp_path):
  _, vae, config, _ = cache
  path = tmp_path / "cache"
  shutil.copytree(config.data.path, path)
  os.rename(path / "latents.json", path / "plan.json")      # as if stopped mid-way
  os.remove(path / "shard_000001.npy")
  before = (path / "shard_000000.npy").stat().st_mtime_ns
  c = latent_config(tmp_path, vae)
  latents.encode_dataset(c, log=lambda *_: None)
  assert (path / "shard_000000.npy").stat().st_mtime_ns == before   # skipped
  for name in os.listdir(config.data.path):
    assert (path / name).read_bytes() == open(os.path.join(config.data.path, name),
                                              "rb").read(), name


def test_encode_killed_before_its_plan_resumes(cache, tmp_path):
  """Killed while only plan.json.tmp existed (the plan's rename not done): the
  same command finishes the cache; a folder with anything else is refused
  and left as it was."""
  _, vae, config, _ = cache
  path = tmp_path / "cache"
  path.mkdir()
  (path / "plan.json.tmp").write_text('{"half": ')     # cut mid-write
  latents.encode_dataset(latent_config(tmp_path, vae), log=lambda *_: None)
  assert sorted(os.listdir(path)) == sorted(os.listdir(config.data.path))
  for name in os.listdir(config.data.path):
    assert (path / name).read_bytes() == open(os.path.join(config.data.path, name),
                                              "rb").read(), name
  mine = tmp_path / "mine"
  user = tmp_path / "mine" / "cache"
  user.mkdir(parents=True)
  (user / "plan.json.tmp").write_text("x")
  (user / "notes.txt").write_text("keep")
  with pytest.raises(data_lib.DataError, match="holds no latent cache.*notes.txt"):
    latents.encode_dataset(latent_config(mine, vae), log=lambda *_: None)
  assert sorted(os.listdir(user)) == ["notes.txt", "plan.json.tmp"]
  assert (user / "notes.txt").read_text() == "keep"


def test_another_cache_is_refused_and_left_alone(cache, tmp_path):
  tmp, vae, config, _ = cache
  before = {n: os.path.getmtime(os.path.join(config.data.path, n))
            for n in os.listdir(config.data.path)}
  other = latent_config(tmp, vae, **{"encode.flips": False})
  with pytest.raises(data_lib.DataError, match="another latent cache.*flips"):
    latents.encode_dataset(other, log=lambda *_: None)
  assert before == {n: os.path.getmtime(os.path.join(config.data.path, n))
                    for n in os.listdir(config.data.path)}
  # Training with another VAE, another image size, or flips the cache lacks.
  vae2 = tiny_vae(tmp_path / "vae2", seed=1)
  with pytest.raises(data_lib.DataError, match="made by autoencoder"):
    latents.run_source(latent_config(tmp, vae2))
  with pytest.raises(data_lib.DataError, match="data.image_size=32"):
    latents.run_source(latent_config(tmp, vae, **{"data.image_size": 32}))
  (tmp_path / "noflip").mkdir()
  c = latent_config(tmp_path / "noflip", vae, **{"encode.flips": False,
                                                   "encode.shard_size": 2000,
                                                   "encode.dtype": "float16"})
  latents.encode_dataset(c, log=lambda *_: None)
  with pytest.raises(data_lib.DataError, match="without flips"):
    latents.run_source(c)
  c.data.random_flip = False
  half, full = latents.run_source(c), latents.run_source(config)
  idx, no = np.arange(0, 1797, 97), np.zeros(19, bool)
  np.testing.assert_allclose(half.moments(idx, no)[0], full.moments(idx, no)[0],
                             rtol=2e-3, atol=1e-3)      # float16 storage


def test_fid_reference_of_a_latent_run_is_the_encoded_pixel_dataset(tmp_path):
  from ddx import eval_run
  seen = []

  def fn(u8):
    seen.append(u8)
    return u8.reshape(len(u8), -1)[:, :5].astype(np.float64), None
  c = latent_config(tmp_path, "vae")
  ref = eval_run.reference_stats(c, eval_run.Extractor("f", fn), str(tmp_path / "r.npz"),
                                 batch_size=1000, progress=False)
  pixels = np.concatenate(seen)
  np.testing.assert_array_equal(pixels, data_lib.digits_source(16, 3).images)
  np.testing.assert_allclose(ref["mu"], pixels.reshape(1797, -1)[:, :5].mean(0))
  c.encode.source = ""
  with pytest.raises(config_lib.ConfigError, match="encode.source"):
    eval_run.reference_stats(c, eval_run.Extractor("f", fn), str(tmp_path / "r2.npz"))


@pytest.mark.parametrize("over, match", [
    ({"data.path": ""}, "data.path"),
    ({"autoencoder.path": ""}, "autoencoder.path"),
    ({"sampling.clip_x0": True}, "clip_x0"),
    ({"autoencoder.downsample": 3}, "autoencoder.downsample"),
    ({"eval.metrics": ("bpd",)}, "bpd"),
])
def test_bad_latent_configs(tmp_path, over, match):
  c = latent_config(tmp_path, "vae", **over)
  c.eval.metrics = over.get("eval.metrics", ("fid",))
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(c)


def test_bad_encode_configs(tmp_path):
  for over, match in (({"encode.source": ""}, "encode.source"),
                      ({"encode.source": "folder"}, "encode.folder"),
                      ({"data.name": "digits"}, "data.name=latents"),
                      ({"encode.dtype": "bfloat16"}, "encode.dtype")):
    c = latent_config(tmp_path, "vae", **over)
    with pytest.raises(config_lib.ConfigError, match=match):
      config_lib.validate_encode(c)
  c = latent_config(tmp_path, tiny_vae(tmp_path / "vae"), **{"autoencoder.downsample": 4})
  with pytest.raises(config_lib.ConfigError, match="downsamples by 2"):
    latents.encode_dataset(c)


@pytest.mark.slow
def test_latent_run_trains_resumes_and_samples_decoded_images(cache, tmp_path):
  _, vae, config, _ = cache
  config = copy.deepcopy(config)
  config.model.ch_mult = (1,)   # one U-Net level: the latent path is the same for any
  t = config.training
  t.num_steps, t.checkpoint_every, t.sample_every = 4, 2, 4
  config.sampling.steps = 2
  straight = train.train_and_evaluate(config, str(tmp_path / "a"))
  # Resume from step 2 of a copy: the same params as the run that did not stop.
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "4")
  t.sample_every = 0
  resumed = train.train_and_evaluate(config, str(tmp_path / "b"))
  jax.tree.map(np.testing.assert_array_equal, straight.params, resumed.params)
  grid = tmp_path / "a" / "samples" / "step_0000004.png"
  from PIL import Image
  from ddx import evaluation
  evaluation.save_grid(np.zeros((4, 16, 16, 3), np.uint8), tmp_path / "pixels.png")
  assert Image.open(grid).size == Image.open(tmp_path / "pixels.png").size   # decoded
  model = ddx.load(str(tmp_path / "a"))
  assert model.image_shape == (8, 8, 4) and model.autoencoder is not None
  key = jax.random.key(0)
  z = ddx.sample_fn(model, key, steps=2, num_samples=4, decode=False)
  x = ddx.sample_fn(model, key, steps=2, num_samples=4)
  assert z.shape == (4, 8, 8, 4) and x.shape == (4, 16, 16, 3)
  assert float(jnp.abs(z).max()) > 1.0          # latents are not clipped
  want = jnp.clip(ae_lib.decode(model.autoencoder, z), -1, 1)
  np.testing.assert_allclose(x, want, atol=1e-5)


@pytest.mark.slow
def test_encode_cli_two_processes_write_the_same_cache(cache, tmp_path):
  """--mode encode from the command line, 2 processes (jax.distributed on
  127.0.0.1, the launch script users run): each writes its shards, and the
  cache equals the one-process cache. (Bad encode configs: test_bad_encode_configs;
  the CLI turns ConfigError into one line and exit 2 for every mode.)"""
  _, _, config, _ = cache
  vae = tiny_vae(tmp_path / "vae")          # same seed: the same weights (fingerprint)
  out = tmp_path / "c"
  overrides = ["--mode", "encode", "--config.data.name=latents", f"--config.data.path={out}",
               "--config.data.image_size=16", "--config.data.channels=3",
               f"--config.autoencoder.path={vae}", "--config.autoencoder.downsample=2",
               "--config.encode.source=digits", "--config.encode.shard_size=700",
               "--config.encode.batch_size=128", "--config.sampling.clip_x0=False",
               "--config.model.attn_resolutions=()"]
  env = dict(os.environ, PYTHON=sys.executable, DEVICES_PER_PROCESS="1")
  r = subprocess.run(["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"), "2",
                      "configs/test.py", str(tmp_path / "w"), *overrides],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  log = open(tmp_path / "w" / "process_1.log").read()
  assert "shard 2/3" in log and "shard 1/3" not in log     # process 1 wrote shard 1 only
  assert json.load(open(out / "latents.json")) == json.load(
      open(os.path.join(config.data.path, "latents.json")))
  for k in range(3):
    np.testing.assert_allclose(np.load(out / f"shard_{k:06d}.npy"),
                               np.load(os.path.join(config.data.path, f"shard_{k:06d}.npy")),
                               rtol=1e-5, atol=1e-6)


def test_sigma_data_auto_of_a_latent_cache_is_the_std_of_its_training_draws(cache):
  """value_std from the cache's moments (no sampling) against the std of the
  batches training draws (posterior samples of both mirror variants)."""
  _, _, config, _ = cache
  src = latents.run_source(config)
  got = data_lib.value_std(src)
  draws = np.concatenate([data_lib.get_batch(src, step, batch_size=128, seed=0,
                                             random_flip=True)["image"]
                          for step in range(40)])
  assert got == pytest.approx(float(np.std(draws.astype(np.float64))), rel=0.01)
  mean_src = latents.LatentSource(config.data.path, random_flip=True, sample_posterior=False)
  assert data_lib.value_std(mean_src) < got
