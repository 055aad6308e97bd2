"""Post-hoc EMA (EDM2 Sec. 3, App. C): the profile math against the paper's
formulas and numerical integration, reconstruction against a directly tracked
EMA, snapshots through training and resume, and the reconstruct command."""
import os
import re
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

from testutils import ROOT, load_config, snapshot_leaves, tree_digest


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
  for bad in (0.0, -0.1):
    with pytest.raises(ValueError, match=f"sigma_rel={bad!r} is not greater than 0"):
      posthoc_ema.sigma_rel_to_gamma(bad)
  # Just above the bound: the message must not print a rounded bound (0.2887)
  # that the value seems to be inside.
  for bad in (config_lib.MAX_SIGMA_REL * 1.001, 0.2887):
    with pytest.raises(ValueError) as e:
      posthoc_ema.sigma_rel_to_gamma(bad)
    assert str(e.value).startswith(f"sigma_rel={bad!r} is greater than the largest width "
                                   f"{config_lib.MAX_SIGMA_REL!r} "), e.value


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


@pytest.mark.parametrize("times,rels,target", [
    (12, (0.05, 0.10), 0.08), (12, (0.05, 0.10), 0.25), (2, (0.05, 0.10), 0.20),
    (3, (0.05, 0.10), 0.15), (5, (0.03, 0.10, 0.2), 0.05)])
def test_solve_weights_sum_to_one(times, rels, target):
  """Every profile has mass 1, so weights that do not sum to 1 scale every
  reconstructed parameter (the least-squares sums are 0.76 to 1.02 here).
  The normalised sum is 1 up to float64 rounding: dividing K terms by their
  sum and adding them again errs by at most K eps sum|x|."""
  g = [posthoc_ema.sigma_rel_to_gamma(r) for r in rels]
  steps = np.arange(1, times + 1) * 100
  x, residual = posthoc_ema.solve_weights(np.repeat(steps, len(rels)),
                                          np.tile(g, times), steps[-1],
                                          posthoc_ema.sigma_rel_to_gamma(target))
  eps = np.finfo(np.float64).eps
  assert abs(x.sum() - 1) <= len(x) * eps * np.abs(x).sum(), x.sum()
  assert residual < posthoc_ema.MAX_RELATIVE_RESIDUAL


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


def _tiny(config):
  """A one-level U-Net without attention: the profiles, snapshots and their
  reconstruction are the same code for any network, and its six checkpoints
  and snapshots save in a fraction of configs/test.py's time."""
  config.model.ch_mult, config.model.attn_resolutions = (1,), ()
  return config


@pytest.fixture(scope="module")
def posthoc_run(tmp_path_factory):
  """A 6-step run of configs/test.py (its network _tiny) with snapshots every 2
  steps, and a checkpoint after every step (the params the profiles average)."""
  workdir = str(tmp_path_factory.mktemp("posthoc") / "wd")
  config = _tiny(_posthoc_config(every=2))
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
    config = _tiny(_posthoc_config(every, rels))
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
    weights = [s["weight"] for s in info["snapshots"]]
    assert info["step"] == 6 and abs(sum(weights) - 1) <= (
        len(weights) * np.finfo(np.float64).eps * info["sum_abs_weights"])
  c = _tiny(load_config())   # --mode eval on OUT (it samples, so --mode sample works too)
  c.eval.num_samples, c.eval.batch_size, c.eval.steps = 8, 8, 2
  metrics = eval_run.evaluate(c, str(out / "sigma_rel_0.08"))
  assert np.isfinite(metrics["digits_fd"])


@pytest.mark.parametrize("args,needle", [
    (["--sigma_rel", "0.5"], "--sigma_rel 0.5 is greater than the largest width "
                             f"{config_lib.MAX_SIGMA_REL!r} "),
    (["--sigma_rel", "0.2887"], "--sigma_rel 0.2887 is greater than the largest width "
                                f"{config_lib.MAX_SIGMA_REL!r} "),
    (["--sigma_rel", "abc"], "--sigma_rel='abc' must be a number"),
    (["--sigma_rel", "0.1,0.10"], "--sigma_rel repeats 0.1; give each width once"),
    (["--sigma_rel", "0.1,0.1000001"], "0.1 and 0.1000001 would both be written to "
                                       "OUT/sigma_rel_0.1"),
    # Far narrower than any snapshot: the fit is ~ nothing (relative residual ~1).
    (["--sigma_rel", "1e-6"], "make that profile only with relative residual 1 (more "
                              "than 0.5); choose a sigma_rel nearer the tracked ones"),
    (["--sigma_rel", "0.08", "--out", "NONEMPTY"],
     "--out NONEMPTY is not empty (it holds keep.txt); ddx.posthoc_ema writes only"),
    (["--sigma_rel", "0.08", "--out", "FILE"], "--out FILE is a file, not a folder"),
    (["--sigma_rel", "0.08", "--out", "FILE/sub"], "--out FILE/sub cannot be created or "
                                                  "written (FILE is not a writable directory)"),
    (["--sigma_rel", "0.08", "--out", "RUN"], "--out RUN is the run's --workdir"),
    (["--sigma_rel", "0.08", "--out", "RUN/posthoc_ema/8"], "is inside the run's posthoc_ema/"),
    (["--sigma_rel", "0.08,0.1", "--out", "RUN/posthoc_ema"], "is inside the run's posthoc_ema/"),
    (["--sigma_rel", "0.08", "--out", "RUN/checkpoints/x"], "is inside the run's checkpoints/"),
    (["--sigma_rel", "0.08", "--out", "LINK/9"], "is inside the run's posthoc_ema/"),
    (["--sigma_rel", "0.08", "--step", "5"], "no snapshot at step 5"),
    (["--sigma_rel", "0.08", "--workdir", "EMPTY"], "no post-hoc EMA snapshots in"),
    (["--sigma_rel", "0.08", "--bogus", "1"], "unrecognized arguments: --bogus 1"),
])
def test_command_bad_input_is_one_line_exit_2(tmp_path, capsys, args, needle):
  """One line, exit 2, and not a byte of the run or of the user's folders
  changed (nor OUT created)."""
  run = tmp_path / "run"
  _fake_snapshots(run, [2])
  full = tmp_path / "full"
  full.mkdir()
  (full / "keep.txt").write_text("user data")
  (tmp_path / "file").write_text("user data")
  (tmp_path / "empty").mkdir()
  os.symlink(run / "posthoc_ema", tmp_path / "link")
  names = {"NONEMPTY": str(full), "EMPTY": str(tmp_path / "empty"),
           "FILE": str(tmp_path / "file"), "RUN": str(run), "LINK": str(tmp_path / "link")}
  expand = lambda a: re.sub(r"\b(NONEMPTY|EMPTY|FILE|RUN|LINK)\b",
                            lambda m: names[m.group(0)], a)
  argv = ["--workdir", str(run), "--out", str(tmp_path / "out"), *args]
  argv, needle = [expand(a) for a in argv], expand(needle)
  before = tree_digest(tmp_path)
  with pytest.raises(SystemExit) as e:
    posthoc_ema.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("ddx: error:") and needle in err[0], err
  assert not (tmp_path / "out").exists()
  assert tree_digest(tmp_path) == before
  assert sorted(os.listdir(tmp_path)) == ["empty", "file", "full", "link", "run"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_command_refuses_a_read_only_out(tmp_path, capsys):
  run, ro = tmp_path / "run", tmp_path / "ro"
  _fake_snapshots(run, [2])
  ro.mkdir()
  ro.chmod(0o555)
  try:
    with pytest.raises(SystemExit) as e:
      posthoc_ema.main(["--workdir", str(run), "--sigma_rel", "0.08",
                        "--out", str(ro / "out")])
  finally:
    ro.chmod(0o755)
  assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [
      f"ddx: error: --out {ro / 'out'} cannot be created or written ({ro} is not a "
      "writable directory); choose a writable --out"]


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
    ("sigma_rels", (0.05, 0.3), "training.posthoc_ema.sigma_rels: 0.3 is greater than the "
                                f"largest width {config_lib.MAX_SIGMA_REL!r}"),
    ("sigma_rels", (0.2887,), "sigma_rels: 0.2887 is greater than the largest width 0.2886751"),
    ("sigma_rels", (0.0,), "training.posthoc_ema.sigma_rels: 0.0 is not greater than 0"),
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


# --------------------------------------------------------------------------
# Reconstructions of snapshots with the network's structure (no training).


def _model_snapshots(workdir, steps, fill):
  """Snapshots of configs/test.py's parameter tree at steps, leaf values
  fill(step, profile index, leaf index, shape) (float32)."""
  config = _posthoc_config()
  abstract = jax.eval_shape(lambda k: ddx.model.init_variables(config, k),
                            jax.random.key(0))["params"]
  leaves, treedef = jax.tree.flatten(abstract)
  store = posthoc_ema.snapshots(str(workdir))
  for s in steps:
    emas = tuple(jax.tree.unflatten(treedef, [np.asarray(fill(s, k, i, a.shape), np.float32)
                                              for i, a in enumerate(leaves)])
                 for k in range(len(config.training.posthoc_ema.sigma_rels)))
    store.save(s, {"emas": emas, "batch_stats": {}}, config)
  store.close()


def test_constant_parameters_reconstruct_the_constant(tmp_path):
  """A parameter that never changed is that value in every snapshot, and its
  EMA of any width is that value: weights summing to 1 give it back. In
  float64 the sum errs by K eps sum|x| relative (~1e-14 here), far below
  float32's half ulp, so the float32 result is the constant exactly."""
  c = np.float32(0.3)
  _model_snapshots(tmp_path, [2, 4, 6], lambda s, k, i, shape: np.full(shape, c))
  _, results = posthoc_ema.reconstruct(str(tmp_path), [0.05, 0.08, 0.15, 0.2])
  for variables, info in results:
    eps = np.finfo(np.float64).eps
    assert len(info["snapshots"]) * eps * info["sum_abs_weights"] < np.finfo(np.float32).eps / 4
    for leaf in jax.tree.leaves(variables["params"]):
      np.testing.assert_array_equal(leaf, np.full(leaf.shape, c), err_msg=info["sigma_rel"])


def _varying(s, k, i, shape):
  return np.random.default_rng([s, k, i]).normal(size=shape)


def _same_workdirs(a, b):
  """Equal outputs of two reconstructions: names, config.json and posthoc_ema.json
  bytes, the checkpoint's arrays bit for bit."""
  assert sorted(os.listdir(a)) == sorted(os.listdir(b))
  for name in ("config.json", "posthoc_ema.json"):
    assert (a / name).read_bytes() == (b / name).read_bytes(), name
  x, y = ddx.load(str(a)), ddx.load(str(b))
  for u, v in zip(jax.tree.leaves(x.variables), jax.tree.leaves(y.variables), strict=True):
    np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("sigma_rel,kill_at", [
    ("0.08", "config"), ("0.08,0.15", "claimed"), ("0.08,0.15", "wrote 0")])
def test_interrupted_command_is_redone(tmp_path, monkeypatch, sigma_rel, kill_at):
  """Stopped at each point between its writes (the subprocess test below kills
  one for real): the same command then succeeds, equal to an uninterrupted
  run; OUT of a finished run, or holding a file of the user's beside the
  command's own, is refused untouched."""
  run = tmp_path / "run"
  _model_snapshots(run, [2, 4, 6], _varying)
  command = lambda out: posthoc_ema.main(["--workdir", str(run), "--sigma_rel", sigma_rel,
                                          "--out", str(out)])
  command(tmp_path / "straight")
  assert not (tmp_path / "straight" / posthoc_ema.MARKER).exists()

  class Killed(BaseException):
    pass

  def stop(name):
    if name == kill_at:
      raise Killed
  monkeypatch.setattr(posthoc_ema, "_kill_point", stop)
  out = tmp_path / "out"
  with pytest.raises(Killed):
    command(out)
  assert (out / posthoc_ema.MARKER).exists()
  monkeypatch.undo()
  command(out)
  _check = (lambda: _same_workdirs(out, tmp_path / "straight")) if "," not in sigma_rel \
      else (lambda: [_same_workdirs(out / n, tmp_path / "straight" / n)
                     for n in ("sigma_rel_0.08", "sigma_rel_0.15")])
  _check()
  assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "straight"))
  for extra in ([], ["notes.txt"]):   # finished; a user's file beside an unfinished run
    if extra:
      (out / posthoc_ema.MARKER).write_text("")
      (out / "notes.txt").write_text("mine")
    before = tree_digest(out)
    with pytest.raises(SystemExit) as e:
      command(out)
    assert e.value.code == 2 and tree_digest(out) == before


def test_a_killed_runs_temporary_sibling_is_cleared(tmp_path):
  """ddx up to 2026-12 wrote OUT as .OUT.tmp-<8 hex> and renamed it; a kill left
  that sibling for good. The next run removes it, and no other sibling."""
  run = tmp_path / "run"
  _model_snapshots(run, [2], _varying)
  stale = tmp_path / ".out.tmp-0123abcd"
  (stale / "checkpoints" / "2.orbax-checkpoint-tmp-1").mkdir(parents=True)
  (stale / "config.json").write_text("{")
  mine = [tmp_path / ".out.tmp-0123abce", tmp_path / ".out.tmp-notours", tmp_path / ".out2.tmp-0123abcd"]
  for p in mine:
    p.mkdir()
  (mine[0] / "notes.txt").write_text("mine")
  (mine[1] / "config.json").write_text("{}")
  (mine[2] / "config.json").write_text("{}")
  before = {p.name: tree_digest(p) for p in mine}
  posthoc_ema.main(["--workdir", str(run), "--sigma_rel", "0.1", "--out", str(tmp_path / "out")])
  assert not stale.exists()
  assert {p.name: tree_digest(p) for p in mine} == before


@pytest.mark.slow
def test_command_killed_with_sigkill_is_redone(tmp_path):
  """kill -9 between the two folders of a two-width reconstruction (the
  test-only DDX_TEST_KILL_AT hook), then the same command: equal, bit for
  bit, to an uninterrupted run."""
  run = tmp_path / "run"
  _model_snapshots(run, [2, 4, 6], _varying)
  posthoc_ema.main(["--workdir", str(run), "--sigma_rel", "0.08,0.15",
                    "--out", str(tmp_path / "straight")])
  argv = [sys.executable, "-m", "ddx.posthoc_ema", "--workdir", str(run),
          "--sigma_rel", "0.08,0.15", "--out", str(tmp_path / "out")]
  env = dict(os.environ, DDX_TEST_KILL_AT="wrote 0")
  r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == -9, r.stderr[-3000:]
  assert sorted(os.listdir(tmp_path / "out")) == [posthoc_ema.MARKER, "sigma_rel_0.08"]
  # The same command again, in-process (the kill above is the real process;
  # test_interrupted_command_is_redone redoes every stopping point the same way).
  posthoc_ema.main(argv[3:])
  for n in ("sigma_rel_0.08", "sigma_rel_0.15"):
    _same_workdirs(tmp_path / "out" / n, tmp_path / "straight" / n)
  assert sorted(os.listdir(tmp_path / "out")) == ["sigma_rel_0.08", "sigma_rel_0.15"]
