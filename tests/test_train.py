"""The trainer: a pure train_step, the real train_and_evaluate loop, resume, load, CLI."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddx
from ddx import config as config_lib
from ddx import data, train
from ddx.processes.ddpm import schedules

from testutils import ROOT, load_config


def _parts(config):
  net = ddx.models.build(config.model)
  tx = train.make_optimizer(config.optim)
  return net, schedules.from_config(config.diffusion), tx


def _batch(config, step=0):
  src = data.make_source(config.data)
  return data.get_batch(src, step, batch_size=config.training.batch_size,
                        seed=0, random_flip=False)


def _run_config():
  """configs/test.py with a one-level U-Net without attention: the update, the
  workdir, resume and CLI behaviour below are the same for any network (two
  levels with attention resume bit for bit in test_reliability's six_steps tests)."""
  config = load_config()
  config.model.ch_mult, config.model.attn_resolutions = (1,), ()
  return config


@pytest.fixture(scope="module")
def step_env():
  config = _run_config()
  net, sched, tx = _parts(config)
  state = jax.jit(lambda k: train.create_state(config, tx, k))(jax.random.key(0))
  step = jax.jit(lambda s, b, k: train.train_step(s, b, k, net=net, sched=sched, tx=tx,
                                                  config=config))
  return config, state, step


@pytest.mark.slow
def test_train_step_is_pure_and_updates_with_ema(step_env):
  config, state, step = step_env
  batch = _batch(config)
  s1, m1 = step(state, batch, jax.random.key(1))
  s2, m2 = step(state, batch, jax.random.key(1))
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
    np.testing.assert_array_equal(a, b)
  assert int(s1.step) == 1 and bool(m1["finite"])
  assert np.isfinite(float(m1["loss"])) and float(m1["grad_norm"]) > 0
  # The zero-initialised output conv blocks every other gradient on the first
  # update (DDPM's init); from the second update on everything trains.
  changed = lambda s: sum(not np.array_equal(a, b) for a, b in
                          zip(jax.tree.leaves(s.params), jax.tree.leaves(state.params)))
  assert changed(s1) >= 1
  s_n = s1
  for n in range(1, 4):
    s_n, _ = step(s_n, _batch(config, n), jax.random.key(1))
  assert changed(s_n) == len(jax.tree.leaves(state.params))
  # EMA after update n = 1 with warm-up: decay = min(0.999, 2/11).
  d = min(config.optim.ema_decay, 2 / 11)
  assert float(m1["ema_decay"]) == pytest.approx(d, rel=1e-6)
  for e, p, e0 in zip(jax.tree.leaves(s1.ema_params), jax.tree.leaves(s1.params),
                      jax.tree.leaves(state.ema_params)):
    np.testing.assert_allclose(e, d * e0 + (1 - d) * p, rtol=1e-5, atol=1e-7)
  # First update uses lr * 1/warmup (not 0): warmup_steps = 2 in configs/test.py.
  assert float(m1["lr"]) == pytest.approx(config.optim.lr / 2)
  s3, _ = step(state, batch, jax.random.key(2))   # another key: other noise draws
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(s3.params), jax.tree.leaves(s1.params)))


def test_nonfinite_batch_skips_the_update(step_env):
  config, state, step = step_env
  batch = _batch(config)
  batch["image"] = batch["image"].copy()
  batch["image"][0, 0, 0, 0] = np.nan
  s1, m = step(state, batch, jax.random.key(1))
  assert not bool(m["finite"])
  assert int(s1.step) == 1
  for a, b in zip(jax.tree.leaves((s1.params, s1.ema_params, s1.opt_state)),
                  jax.tree.leaves((state.params, state.ema_params, state.opt_state))):
    np.testing.assert_array_equal(a, b)


def test_lr_schedule_and_ema_decay():
  o = config_lib.base_config().optim
  o.lr, o.warmup_steps = 1e-3, 4
  lr = train.lr_schedule(o)
  np.testing.assert_allclose([float(lr(n)) for n in range(6)],
                             [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3], rtol=1e-6)
  o.ema_decay = 0.999
  assert float(train.ema_decay(o, jnp.int32(0))) == pytest.approx(0.1)
  assert float(train.ema_decay(o, jnp.int32(10**6))) == pytest.approx(0.999)
  o.ema_warmup = False
  assert float(train.ema_decay(o, jnp.int32(0))) == pytest.approx(0.999)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One real 6-step run of _run_config() (checkpoints at 3 and 6)."""
  workdir = str(tmp_path_factory.mktemp("run") / "wd")
  config = _run_config()
  state = train.train_and_evaluate(config, workdir)
  return config, workdir, state


@pytest.mark.slow
def test_train_and_evaluate_writes_the_workdir(trained):
  config, workdir, state = trained
  assert int(state.step) == 6
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["ch"] == config.model.ch
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    recs = [json.loads(l) for l in f]
  assert [r["step"] for r in recs] == [2, 4, 6]
  for r in recs:
    assert np.isfinite(r["loss"]) and r["images_per_sec"] > 0 and "grad_norm" in r
  assert os.path.exists(os.path.join(workdir, "samples", "step_0000006.png"))
  assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tensorboard")))


@pytest.mark.slow
def test_load_returns_the_ema_weights_and_samples(trained):
  config, workdir, state = trained
  model = ddx.load(workdir)
  for a, b in zip(jax.tree.leaves(model.variables["params"]),
                  jax.tree.leaves(state.ema_params)):
    np.testing.assert_array_equal(a, b)
  assert model.image_shape == (8, 8, 1)
  imgs = ddx.sample_fn(model, jax.random.key(0), steps=5)
  assert imgs.shape == (config.sampling.num_samples, 8, 8, 1)
  assert float(jnp.abs(imgs).max()) <= 1.0
  np.testing.assert_array_equal(imgs, ddx.sample_fn(model, jax.random.key(0), steps=5))
  # An older checkpoint by step.
  old = ddx.load(workdir, step=3)
  assert not np.array_equal(jax.tree.leaves(old.variables)[0],
                            jax.tree.leaves(model.variables)[0])


@pytest.mark.slow
def test_resume_is_bitwise_exact(trained, tmp_path):
  """Stop at step 3, restart with num_steps = 6: the same params as 6 straight."""
  config, _, straight = trained
  workdir = str(tmp_path / "wd")
  c3 = _run_config()
  c3.training.num_steps = 3
  train.train_and_evaluate(c3, workdir)
  resumed = train.train_and_evaluate(config, workdir)
  assert int(resumed.step) == 6
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_steps_per_dispatch_equals_single_steps():
  """train_steps (k updates in one scan) against k calls of train_step: the same
  states and the same per-step metrics (the loop around them is cadence only)."""
  from ddx import parallel
  config = load_config()   # one U-Net level: the scan is the same for any network
  config.model.ch_mult, config.model.attn_resolutions = (1,), ()
  setup = train.make_setup(config, parallel.make_mesh(devices=jax.devices()[:1]))
  batches = [_batch(config, s) for s in range(2)]
  rng = jax.random.key(5)
  state = setup.init(jax.random.key(0))
  single = []
  for b in batches:
    state, m = setup.step(state, b, rng)
    single.append(m)
  stacked = jax.tree.map(lambda *x: np.stack(x), *batches)
  multi, ms = setup.steps(setup.init(jax.random.key(0)), stacked, rng)
  assert int(multi.step) == 2
  for a, b in zip(jax.tree.leaves(multi), jax.tree.leaves(state)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for key in ("loss", "grad_norm", "param_norm", "lr"):
    np.testing.assert_allclose(ms[key], [m[key] for m in single], rtol=1e-5)


def test_steps_per_dispatch_must_divide_the_cadences():
  config = load_config()
  config.training.steps_per_dispatch = 2   # checkpoint_every is 3
  with pytest.raises(config_lib.ConfigError,
                     match=r"^training\.checkpoint_every=3 is not a multiple of "
                           r"training\.steps_per_dispatch=2"):
    config_lib.validate(config)
  config.training.steps_per_dispatch = 0
  with pytest.raises(config_lib.ConfigError, match=r"^training\.steps_per_dispatch=0 "):
    config_lib.validate(config)


def test_load_without_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(ddx.checkpoint.CheckpointError, match="no checkpoint"):
    ddx.load(str(tmp_path))


def test_refuses_a_workdir_of_another_architecture(trained):
  _, workdir, _ = trained
  config = _run_config()
  config.model.ch = 16
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with pytest.raises(config_lib.ConfigError,
                     match=r"another model structure \(model.ch: 8 -> 16\); rerun with "
                           r"the old values or use a new --workdir"):
    train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


@pytest.mark.slow
def test_optimizer_change_is_refused_then_reset_optimizer_resumes(trained, tmp_path):
  """The issue's scenario: grad_clip 1 -> 0 exits with the key named and every
  checkpoint where it was; reset_optimizer resumes params/EMA at the checkpoint's
  step with a fresh Adam state, once (a rerun continues that state)."""
  import shutil
  _, src, straight = trained
  wd = str(tmp_path / "wd")
  shutil.copytree(src, wd)
  ckdir = os.path.join(wd, "checkpoints")
  before = {d: sorted(os.listdir(os.path.join(ckdir, d))) for d in os.listdir(ckdir)}
  config = _run_config()
  config.optim.grad_clip = 0.0
  config.training.num_steps, config.training.checkpoint_every = 7, 1
  config.training.sample_every = 0
  with pytest.raises(config_lib.ConfigError,
                     match=r"another optimizer structure \(optim.grad_clip: 1.0 -> 0.0\);"
                           r" .*reset_optimizer=True"):
    train.train_and_evaluate(config, wd)
  assert {d: sorted(os.listdir(os.path.join(ckdir, d))) for d in os.listdir(ckdir)} == before
  assert not os.path.exists(os.path.join(wd, "checkpoints_unreadable"))

  config.training.reset_optimizer = True
  state = train.train_and_evaluate(config, wd)
  assert int(state.step) == 7
  adam = lambda s: s.opt_state[0]    # no clip in the chain: adam's own state first
  assert int(adam(state).count) == 1                  # fresh: one update since step 6
  # The update started from the step-6 weights: params moved by one Adam step.
  for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(straight.ema_params)):
    assert np.max(np.abs(np.asarray(a) - np.asarray(b))) < 0.05
  config.training.num_steps = 8                       # rerun: continues, no second reset
  state = train.train_and_evaluate(config, wd)
  assert int(state.step) == 8 and int(adam(state).count) == 2


def _cli(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "ddx.main", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_cli_sample_mode(trained):
  """--mode sample writes a new file per run: an earlier run's files (here:
  stand-ins under the first name) keep their bytes."""
  _, workdir, _ = trained
  out = os.path.join(workdir, "samples")
  os.makedirs(out, exist_ok=True)
  earlier = {os.path.join(out, "sample_ddim_5_001" + ext): os.urandom(64)
             for ext in (".npz", ".png")}
  for path, data in earlier.items():
    open(path, "wb").write(data)
  r = _cli("--config", "configs/test.py", "--workdir", workdir, "--mode", "sample",
           "--config.sampling.steps=5", "--config.sampling.num_samples=6")
  assert r.returncode == 0, r.stderr[-3000:]
  assert all(open(p, "rb").read() == data for p, data in earlier.items())
  new = os.path.join(out, "sample_ddim_5_002")
  assert new + ".png" in r.stdout
  z = np.load(new + ".npz")
  assert z["images"].shape == (6, 8, 8, 1) and z["images"].dtype == np.uint8
  assert json.loads(str(z["sampling"]))["steps"] == 5
  assert os.path.exists(new + ".png")
