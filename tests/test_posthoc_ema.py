"""Post-hoc EMA (EDM2 Sec. 3, App. C): the profile math against the paper's
formulas and numerical integration, reconstruction against a directly tracked
EMA, snapshots through training and resume, and the reconstruct command."""
import os
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

import ddx
from ddx import checkpoint as ckpt_lib
from ddx import config as config_lib
from ddx import posthoc_ema, train

from testutils import ROOT, load_config, snapshot_leaves


# --------------------------------------------------------------------------
# NumPy transcription of EDM2 Sec. 3 (Eq. 3 and the text around it).


def paper_profile(tau, t, gamma):
  """p_t(tau) = (gamma + 1) / t^(gamma + 1) * tau^gamma on 0 < tau <= t, else 0."""
  return np.where((tau > 0) & (tau <= t), (gamma + 1) / t ** (gamma + 1) * tau ** gamma, 0.0)


def paper_beta(t, gamma):
  """beta_gamma(t) = (1 - 1/t)^(gamma + 1)."""
  return (1.0 - 1.0 / t) ** (gamma + 1)


def paper_ema_weights(T, gamma):
  """[T] weight of the parameters after update s = 1..T in the EMA at T, by
  running theta_hat(t) = beta(t) theta_hat(t-1) + (1 - beta(t)) theta(t)
  on theta(s) = the s-th unit vector (float64)."""
  ema = np.zeros(T)
  for t in range(1, T + 1):
    ema = paper_beta(t, gamma) * ema
    ema[t - 1] += 1 - paper_beta(t, gamma)
  return ema


# --------------------------------------------------------------------------
# The math.


def test_sigma_rel_and_gamma_match_the_paper_and_the_profile_std():
  # EDM2 Sec. 3.2 tracks gamma_1 = 16.97 (sigma_rel 0.05) and gamma_2 = 6.94 (0.10).
  assert posthoc_ema.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
  assert posthoc_ema.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
  assert posthoc_ema.sigma_rel_to_gamma(config_lib.MAX_SIGMA_REL) == pytest.approx(0, abs=1e-9)
  t = 3.0
  for sigma_rel in (0.01, 0.05, 0.08, 0.2, config_lib.MAX_SIGMA_REL):
    g = posthoc_ema.sigma_rel_to_gamma(sigma_rel)
    moment = lambda k: integrate.quad(lambda tau: tau ** k * paper_profile(tau, t, g),
                                      0, t, epsabs=0, epsrel=1e-12, limit=200)[0]
    assert moment(0) == pytest.approx(1.0, rel=1e-9)
    std = np.sqrt(moment(2) - moment(1) ** 2)
    assert std / t == pytest.approx(sigma_rel, rel=1e-6)
    assert float(posthoc_ema.gamma_to_sigma_rel(g)) == pytest.approx(sigma_rel, rel=1e-9)
  for bad in (0.0, -0.1, config_lib.MAX_SIGMA_REL * 1.001):
    with pytest.raises(ValueError, match="outside"):
      posthoc_ema.sigma_rel_to_gamma(bad)


def test_ema_weight_is_one_minus_the_papers_beta_and_keeps_precision():
  for sigma_rel in (0.05, 0.10):
    g = posthoc_ema.sigma_rel_to_gamma(sigma_rel)
    n = np.array([1, 2, 3, 10, 1000, 10 ** 6])
    want = 1 - paper_beta(n.astype(np.float64), g)
    got = np.asarray(jax.jit(posthoc_ema.ema_weight, static_argnums=0)(g, jnp.asarray(n)))
    assert got.dtype == np.float32
    # 1 - beta ~ 1e-5 at n = 1e6: float32 1 - 1/n alone would be ~1% off there.
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_ema_recursion_weights_each_step_by_the_profile_mass():
  """The discrete EMA with beta(t) is the continuous profile integrated over each
  step: weight of update s at time T = int_{s-1}^{s} p_T(tau) dtau."""
  T, g = 12, posthoc_ema.sigma_rel_to_gamma(0.1)
  mass = [integrate.quad(lambda tau: paper_profile(tau, T, g), s - 1, s, epsrel=1e-12)[0]
          for s in range(1, T + 1)]
  np.testing.assert_allclose(paper_ema_weights(T, g), mass, rtol=1e-9, atol=1e-15)


def test_profile_dot_equals_numerical_integration():
  rng = np.random.default_rng(0)
  for _ in range(8):
    t_a, t_b = rng.uniform(1, 100, 2)
    g_a, g_b = rng.uniform(0, 20, 2)
    lo = min(t_a, t_b)
    want = integrate.quad(lambda tau: paper_profile(tau, t_a, g_a) * paper_profile(tau, t_b, g_b),
                          0, lo, epsabs=0, epsrel=1e-11, limit=200)[0]
    assert float(posthoc_ema.profile_dot(t_a, g_a, t_b, g_b)) == pytest.approx(want, rel=1e-8)
  # Exponents of sigma_rel = 0.001 (gamma ~ 1e3) do not overflow.
  g = posthoc_ema.sigma_rel_to_gamma(0.001)
  assert np.isfinite(posthoc_ema.profile_dot(1e6, g, 2e6, g)) and g > 500


def test_solve_weights_reproduces_a_stored_profile_exactly():
  """A target that is one of the snapshots' profiles: weight 1 on it, residual 0."""
  g = [posthoc_ema.sigma_rel_to_gamma(r) for r in (0.05, 0.10)]
  steps, gammas = np.repeat([100, 200, 300], 2), np.tile(g, 3)
  x, residual = posthoc_ema.solve_weights(steps, gammas, 300, g[1])
  np.testing.assert_allclose(x, [0, 0, 0, 0, 0, 1], atol=1e-6)
  assert residual < 1e-6


# --------------------------------------------------------------------------
# Reconstruction against a directly tracked EMA.


def _posthoc_config(every=2, sigma_rels=(0.05, 0.10)):
  config = load_config()
  config.training.posthoc_ema.snapshot_every = every
  config.training.posthoc_ema.sigma_rels = sigma_rels
  config.training.sample_every = 0
  return config


def test_reconstruction_equals_a_directly_tracked_ema(tmp_path):
  """Parameters follow a fixed random walk (with drift) for T steps; the trainer's
  update tracks sigma_rel 0.05, 0.10 and the target 0.08; snapshots of the first
  two go through SnapshotWriter to disk; `reconstruct` from them equals the
  tracked 0.08.

  Tolerance, and why: reconstruction - tracked = sum_s delta_s theta(s), where
  delta = sum_i x_i w_i - w_target are the per-step weights (paper's recursion
  on unit vectors) left over by the least-squares profile fit. So |error| <=
  ||delta||_1 max|theta| (+ float32 rounding of the EMAs, ~1e-6 max|theta|).
  """
  T, every, target = 60, 10, 0.08
  config = _posthoc_config(every)
  config.training.num_steps = T
  rels = tuple(config.training.posthoc_ema.sigma_rels)
  gammas = [posthoc_ema.sigma_rel_to_gamma(r) for r in rels + (target,)]
  abstract = jax.eval_shape(lambda k: ddx.model.init_variables(config, k),
                            jax.random.key(0))["params"]
  rng = np.random.default_rng(0)
  leaves, treedef = jax.tree.flatten(abstract)
  theta = [np.cumsum(rng.normal(0.01, 0.05, (T,) + a.shape), axis=0).astype(np.float32)
           for a in leaves]
  step = jax.jit(lambda e, p, n: posthoc_ema.update(e, p, n, gammas))
  params_at = lambda s: jax.tree.unflatten(treedef, [th[s - 1] for th in theta])
  emas = tuple(params_at(1) for _ in gammas)
  writer = None
  for s in range(1, T + 1):
    emas = step(emas, params_at(s), s)
    state = types.SimpleNamespace(posthoc_ema=emas[:2], batch_stats={})
    if writer is None:
      writer = posthoc_ema.SnapshotWriter(str(tmp_path), config, s, state)
    elif writer.due(s):
      writer.save(s, state)
  writer.close()
  assert ckpt_lib.Checkpointer(str(tmp_path), name="posthoc_ema",
                               read_only=True).steps() == list(range(every, T + 1, every))
  _, [(variables, info)] = posthoc_ema.reconstruct(str(tmp_path), [target])
  assert info["step"] == T and len(info["snapshots"]) == 2 * T // every

  delta = -paper_ema_weights(T, gammas[2])
  for snap in info["snapshots"]:
    g = gammas[rels.index(snap["sigma_rel"])]
    delta[:snap["step"]] += snap["weight"] * paper_ema_weights(snap["step"], g)
  bound = np.abs(delta).sum()
  assert bound < 0.02, bound    # the fit itself: 12 snapshots make sigma_rel 0.08 closely
  scale = max(float(np.abs(th).max()) for th in theta)
  for got, tracked in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(emas[2])):
    err = np.abs(got - np.asarray(tracked)).max()
    assert err <= bound * scale + 1e-5 * scale, (err, bound * scale)
  # ... and far closer than either stored profile is to the target.
  spread = max(np.abs(np.asarray(a) - np.asarray(b)).max()
               for a, b in zip(jax.tree.leaves(emas[2]), jax.tree.leaves(emas[0])))
  assert max(np.abs(g - np.asarray(t)).max() for g, t in zip(
      jax.tree.leaves(variables["params"]), jax.tree.leaves(emas[2]))) < 0.05 * spread


# --------------------------------------------------------------------------
# Training: the state, snapshots, resume.


@pytest.fixture(scope="module")
def posthoc_run(tmp_path_factory):
  """A 6-step run of configs/test.py with snapshots every 2 steps, and a
  checkpoint after every step (the params the profiles average)."""
  workdir = str(tmp_path_factory.mktemp("posthoc") / "wd")
  config = _posthoc_config(every=2)
  config.training.checkpoint_every, config.training.keep_checkpoints = 1, 6
  state = train.train_and_evaluate(config, workdir)
  return config, workdir, state


@pytest.mark.slow
def test_training_tracks_the_profiles_with_the_papers_beta(posthoc_run):
  """The trained state's and the snapshots' profiles are the paper's recursion
  (float64) over the params after each update (read from the checkpoints)."""
  config, workdir, state = posthoc_run
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {"params": jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), state.params)}
  ck = ckpt_lib.Checkpointer(workdir, read_only=True)
  assert ck.steps() == [1, 2, 3, 4, 5, 6]
  params = [[np.asarray(x, np.float64) for x in jax.tree.leaves(
      ck.restore(n, target, partial=True)["params"])] for n in ck.steps()]
  snaps = snapshot_leaves(workdir, config)
  for k, r in enumerate(config.training.posthoc_ema.sigma_rels):
    g = posthoc_ema.sigma_rel_to_gamma(r)
    want = params[0]                      # beta(1) = 0: update 1 replaces the init
    for n in range(2, 7):
      b = paper_beta(n, g)
      want = [b * e + (1 - b) * x for e, x in zip(want, params[n - 1])]
      if n in snaps:
        size = len(want)
        for got, w in zip(snaps[n][k * size:(k + 1) * size], want):
          np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6, err_msg=f"{r} at {n}")
    for got, w in zip(jax.tree.leaves(state.posthoc_ema[k]), want):
      np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_snapshot_lost_after_its_checkpoint_is_rewritten(posthoc_run, tmp_path):
  """A kill after the step-6 checkpoint but before its snapshot was complete: the
  rerun (nothing left to train) writes it from the checkpoint, bit for bit.
  (Resuming mid-run, snapshots included, is tests/test_reliability.py's kill -9.)"""
  config, src, straight = posthoc_run
  snaps = snapshot_leaves(src, config)
  assert sorted(snaps) == [2, 4, 6]
  np.testing.assert_array_equal(jax.tree.leaves(straight.posthoc_ema)[0], snaps[6][0])
  wd = str(tmp_path / "wd")
  shutil.copytree(src, wd)
  shutil.rmtree(os.path.join(wd, "posthoc_ema", "6"))
  train.train_and_evaluate(config, wd)
  again = snapshot_leaves(wd, config)
  assert sorted(again) == sorted(snaps)
  for a, b in zip(again[6], snaps[6]):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_resume_refuses_other_profiles_and_leaves_the_workdir(posthoc_run, tmp_path):
  _, src, _ = posthoc_run
  wd = str(tmp_path / "wd")
  shutil.copytree(src, wd)
  before = sorted(os.listdir(os.path.join(wd, "posthoc_ema")))
  for every, rels in ((2, (0.05, 0.2)), (0, (0.05, 0.10)), (2, (0.05, 0.10, 0.2))):
    config = _posthoc_config(every, rels)
    config.training.num_steps = 8
    with pytest.raises(config_lib.ConfigError,
                       match=r"track the post-hoc EMA profiles sigma_rels=\(0.05, 0.1\), "
                             r"not .*rerun with the old training.posthoc_ema values"):
      train.train_and_evaluate(config, wd)
  assert sorted(os.listdir(os.path.join(wd, "posthoc_ema"))) == before
  assert ckpt_lib.Checkpointer(wd, read_only=True).steps() == [1, 2, 3, 4, 5, 6]


def test_checkpoints_without_posthoc_ema_still_resume(tmp_path):
  """A checkpoint written before TrainState had posthoc_ema (no such node on
  disk) restores into today's state (posthoc off)."""
  config = load_config()
  tx = train.make_optimizer(config.optim)
  abstract = jax.eval_shape(lambda k: train.create_state(config, tx, k), jax.random.key(0))
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape).astype(s.dtype)),
                       abstract)
  old = {k: getattr(state, k) for k in ("step", "params", "ema_params", "opt_state",
                                        "batch_stats")}
  ck = ckpt_lib.Checkpointer(str(tmp_path))
  ck.save(3, old, config)
  ck.close()
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev),
                        abstract)
  restored, step = ckpt_lib.Checkpointer(str(tmp_path)).resume(target)
  assert step == 3 and restored.posthoc_ema == ()
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------
# The command.


@pytest.mark.slow
def test_command_writes_loadable_workdirs(posthoc_run, tmp_path):
  """python -m ddx.posthoc_ema with two sigma_rels: each OUT/sigma_rel_<s> loads
  with ddx.load and holds reconstruct()'s weights, and --mode eval scores it."""
  from ddx import eval_run
  config, workdir, _ = posthoc_run
  out = tmp_path / "out"
  r = subprocess.run([sys.executable, "-m", "ddx.posthoc_ema", "--workdir", workdir,
                      "--sigma_rel", "0.08,0.15", "--out", str(out)],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert sorted(os.listdir(out)) == ["sigma_rel_0.08", "sigma_rel_0.15"]
  _, results = posthoc_ema.reconstruct(workdir, [0.08, 0.15])
  for name, (variables, info) in zip(sorted(os.listdir(out)), results):
    model = ddx.load(str(out / name))
    for a, b in zip(jax.tree.leaves(model.variables["params"]),
                    jax.tree.leaves(variables["params"])):
      np.testing.assert_array_equal(a, b)
    assert info["step"] == 6 and 0.9 < sum(s["weight"] for s in info["snapshots"]) < 1.1
  c = load_config()   # --mode eval on OUT (it samples, so --mode sample works too)
  c.eval.num_samples, c.eval.batch_size, c.eval.steps = 8, 8, 2
  metrics = eval_run.evaluate(c, str(out / "sigma_rel_0.08"))
  assert np.isfinite(metrics["digits_fd"])


@pytest.mark.parametrize("args,needle", [
    (["--sigma_rel", "0.5"], "--sigma_rel 0.5 is outside (0, 0.2887]"),
    (["--sigma_rel", "abc"], "--sigma_rel='abc' must be a number"),
    (["--sigma_rel", "0.08", "--out", "NONEMPTY"], "exists and is not an empty directory"),
    (["--sigma_rel", "0.08", "--step", "5"], "no snapshot at step 5"),
    (["--sigma_rel", "0.08", "--workdir", "EMPTY"], "no post-hoc EMA snapshots in"),
    (["--sigma_rel", "0.08", "--bogus", "1"], "unrecognized arguments: --bogus 1"),
])
def test_command_bad_input_is_one_line_exit_2(tmp_path, capsys, args, needle):
  run = tmp_path / "run"
  _fake_snapshots(run, [2])
  full = tmp_path / "full"
  full.mkdir()
  (full / "keep.txt").write_text("user data")
  (tmp_path / "empty").mkdir()
  argv = ["--workdir", str(run), "--out", str(tmp_path / "out"), *args]
  argv = [{"NONEMPTY": str(full), "EMPTY": str(tmp_path / "empty")}.get(a, a) for a in argv]
  with pytest.raises(SystemExit) as e:
    posthoc_ema.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("ddx: error:") and needle in err[0], err
  assert not (tmp_path / "out").exists()
  assert sorted(os.listdir(full)) == ["keep.txt"]


def _fake_snapshots(workdir, steps):
  """Snapshots of tiny trees at steps (the profiles' value = the step)."""
  store = posthoc_ema.snapshots(str(workdir))
  for s in steps:
    store.save(s, {"emas": ({"w": np.full(2, s, np.float32)},) * 2, "batch_stats": {}},
               _posthoc_config())
  store.close()


def test_snapshot_writer_rewrites_what_a_resumed_run_recomputes(tmp_path):
  """Resumed at step 4 (every 2): snapshot 6 (of a trajectory the run recomputes)
  is removed, and the missing snapshot 4 is written from the resumed state."""
  _fake_snapshots(tmp_path, [2, 6])
  state = types.SimpleNamespace(posthoc_ema=({"w": np.full(2, -4, np.float32)},) * 2,
                                batch_stats={})
  posthoc_ema.SnapshotWriter(str(tmp_path), _posthoc_config(every=2), 4, state).close()
  store = posthoc_ema.snapshots(str(tmp_path), read_only=True)
  assert store.steps() == [2, 4]
  target = {"emas": ({"w": np.zeros(2, np.float32)},) * 2, "batch_stats": {}}
  np.testing.assert_array_equal(store.restore(4, target)["emas"][0]["w"], [-4, -4])
  np.testing.assert_array_equal(store.restore(2, target)["emas"][0]["w"], [2, 2])


def test_snapshots_of_other_profiles_are_refused(tmp_path):
  """A run killed before its first checkpoint still has snapshots: resuming it
  with other sigma_rels would mix profiles, so check_resume refuses."""
  _fake_snapshots(tmp_path, [2])
  posthoc_ema.check_resume(str(tmp_path), _posthoc_config())
  with pytest.raises(config_lib.ConfigError,
                     match=r"sigma_rels=\(0.05, 0.2\) but the snapshots in .* track "
                           r"\(0.05, 0.1\); rerun with"):
    posthoc_ema.check_resume(str(tmp_path), _posthoc_config(sigma_rels=(0.05, 0.2)))


@pytest.mark.parametrize("key,value,needle", [
    ("snapshot_every", -1, "training.posthoc_ema.snapshot_every=-1 must be an integer >= 0"),
    ("sigma_rels", (0.05, 0.3), "training.posthoc_ema.sigma_rels has 0.3, outside (0, 0.2887]"),
    ("sigma_rels", (0.0,), "training.posthoc_ema.sigma_rels has 0.0, outside"),
    ("sigma_rels", (0.1, 0.1), "training.posthoc_ema.sigma_rels=(0.1, 0.1) repeats a value"),
    ("sigma_rels", ("a",), "must be a tuple of numbers"),
])
def test_bad_posthoc_config_is_a_one_line_config_error(key, value, needle):
  config = _posthoc_config()
  config.training.posthoc_ema[key] = value
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_snapshot_interval_must_be_a_multiple_of_steps_per_dispatch():
  config = _posthoc_config(every=3)
  config.training.checkpoint_every = 0
  config.training.log_every = config.training.steps_per_dispatch = 2
  config.training.num_steps = 6
  with pytest.raises(config_lib.ConfigError,
                     match=r"^training\.posthoc_ema\.snapshot_every=3 is not a multiple"):
    config_lib.validate(config)
