"""Failure and resume: kill -9, SIGTERM, unreadable checkpoints, NaN, bad input."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ddx import checkpoint as ckpt_lib
from ddx import config as config_lib
from ddx import train

from testutils import ROOT, load_config, main_in_process, snapshot_leaves


def _main_cmd(workdir, *overrides):
  return [sys.executable, "-m", "ddx.main", "--config", "configs/test.py",
          "--workdir", str(workdir), "--config.training.sample_every=0", *overrides]


def _main_in_process(workdir, *overrides):
  """`python -m ddx.main` of _main_cmd's arguments, in this process: its exit
  code (0 if it returned). Its stderr is the test's (capsys). For the exit-2
  refusals whose line comes from ddx.main's own checks: one of each kind still
  runs as a real process (the bad-input test's grad_clip case,
  test_batch_not_divisible_by_devices, test_sample_skips_a_corrupt_newest_checkpoint...)."""
  argv = ["ddx.main"] + [os.path.join(ROOT, a) if a == "configs/test.py" else a
                         for a in _main_cmd(workdir, *overrides)[3:]]
  return main_in_process(argv)[0]


def _raw_state(workdir, step=None, config=None):
  """The saved TrainState leaves of a checkpoint of configs/test.py.

  Restored onto this process's first device whatever device count saved it
  (the trainer subprocesses split the CPU into 2 devices).
  """
  config = config or load_config()
  tx = train.make_optimizer(config.optim)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev),
      jax.eval_shape(lambda k: train.create_state(config, tx, k), jax.random.key(0)))
  ck = ckpt_lib.Checkpointer(str(workdir), read_only=True)
  step = ck.latest_step() if step is None else step
  return step, [np.asarray(x) for x in jax.tree.leaves(ck.restore(step, abstract))]


def _snapshot(path):
  """Every file under path with its size and mtime (to prove nothing changed)."""
  snap = {}
  for root, _, files in os.walk(path):
    for f in files:
      p = os.path.join(root, f)
      st = os.stat(p)
      snap[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
  return snap


# --------------------------------------------------------------------------
# kill -9 and SIGTERM on a real trainer process.

N_STEPS = 8
SNAPSHOT_EVERY = 2   # post-hoc EMA snapshots: a kill can land in one of those saves too
# A one-level U-Net without attention: what a kill interrupts does not depend on
# the network, and it compiles, steps and saves in about half configs/test.py's time.
TINY = ("--config.model.ch_mult=(1,)", "--config.model.attn_resolutions=()")
RUN_ARGS = (f"--config.training.num_steps={N_STEPS}", "--config.training.log_every=1",
            "--config.training.checkpoint_every=1", "--config.training.keep_checkpoints=2",
            f"--config.training.posthoc_ema.snapshot_every={SNAPSHOT_EVERY}", *TINY)


def _run_config():
  config = load_config()
  config.training.posthoc_ema.snapshot_every = SNAPSHOT_EVERY
  config.model.ch_mult, config.model.attn_resolutions = (1,), ()
  return config


def _wait_for_step(proc, at_least, timeout=300):
  """Reads the trainer's progress lines until it reports step >= at_least."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    line = proc.stdout.readline()
    if not line:
      if proc.poll() is not None:
        return None
      continue
    if line.startswith("step "):
      step = int(line.split()[1].split("/")[0])
      if step >= at_least:
        return step
  raise AssertionError("trainer did not reach the step in time")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """An uninterrupted run, as a process (same device layout as the trials). It
  saves only its final checkpoint (and the snapshots): the cadence is no part of
  the state, and each save cost ~1.5 s here."""
  wd = tmp_path_factory.mktemp("ref") / "wd"
  r = subprocess.run(_main_cmd(wd, *RUN_ARGS, "--config.training.checkpoint_every=0"),
                     cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return _raw_state(wd, config=_run_config()), snapshot_leaves(wd, _run_config())


@pytest.mark.slow
def test_sigterm_then_kill9_then_resume_is_bitwise_exact(reference_run, tmp_path):
  """One workdir through three trainer processes: SIGTERM at step >= 2 saves
  that step (the run checkpoints only on preemption) and exits 0 promptly; the
  resumed run is killed with SIGKILL at a random later step, anywhere (a save
  included); the last run finishes. State and post-hoc EMA snapshots are an
  uninterrupted run's, bit for bit."""
  (ref_step, ref_leaves), ref_snaps = reference_run
  assert ref_step == N_STEPS
  assert sorted(ref_snaps) == list(range(SNAPSHOT_EVERY, N_STEPS + 1, SNAPSHOT_EVERY))
  assert any(np.any(a != 0) for a in ref_leaves)
  wd = tmp_path / "wd"

  proc = subprocess.Popen(_main_cmd(wd, *RUN_ARGS, "--config.training.checkpoint_every=0"),
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    seen = _wait_for_step(proc, 2)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    elapsed = time.monotonic() - t0
  finally:
    if proc.poll() is None:
      proc.kill()
  assert rc == 0, proc.stderr.read()[-3000:]
  assert elapsed < 60
  steps = ckpt_lib.Checkpointer(str(wd), read_only=True).steps()
  assert len(steps) == 1 and seen <= steps[0] < N_STEPS   # only the preemption save

  rnd = random.Random(1234)
  proc = subprocess.Popen(_main_cmd(wd, *RUN_ARGS), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  try:
    _wait_for_step(proc, rnd.randint(steps[0] + 1, max(steps[0] + 1, N_STEPS - 2)))
    time.sleep(rnd.uniform(0.0, 0.3))   # land anywhere, mid-save included
    proc.kill()                          # SIGKILL
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()

  r = subprocess.run(_main_cmd(wd, *RUN_ARGS), cwd=ROOT, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  step, leaves = _raw_state(wd, config=_run_config())
  assert step == N_STEPS
  assert len(leaves) == len(ref_leaves)
  for a, b in zip(leaves, ref_leaves):
    np.testing.assert_array_equal(a, b)
  snaps = snapshot_leaves(wd, _run_config())
  assert sorted(snaps) == sorted(ref_snaps)
  for s in snaps:
    for a, b in zip(snaps[s], ref_snaps[s]):
      np.testing.assert_array_equal(a, b, err_msg=f"snapshot {s}")


# --------------------------------------------------------------------------
# Unreadable checkpoints.


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("six") / "wd")
  config = load_config()
  config.training.sample_every = 0
  state = train.train_and_evaluate(config, wd)
  return config, wd, state


@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back_and_is_kept(six_steps, tmp_path):
  config, src, straight = six_steps
  import shutil
  wd = str(tmp_path / "wd")
  shutil.copytree(src, wd)
  state_dir = os.path.join(wd, "checkpoints", "6", "state")
  truncated = 0
  for root, _, files in os.walk(state_dir):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "r+b") as fh:
        fh.truncate(os.path.getsize(p) // 3)
      truncated += 1
  assert truncated > 0
  resumed = train.train_and_evaluate(config, wd)
  # It resumed from step 3, trained 3..6 again: the same result as never failing.
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(a, b)
  kept = os.path.join(wd, "checkpoints_unreadable", "6")
  assert os.path.isdir(kept) and os.listdir(kept)          # not deleted
  assert ckpt_lib.Checkpointer(wd, read_only=True).steps() == [3, 6]


def _du(path):
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


@pytest.mark.slow
def test_disk_full_while_saving_keeps_the_previous_checkpoint(six_steps, tmp_path):
  """A workdir with a step-3 checkpoint on a tmpfs with room for only part of
  another: the save at step 6 fails, step 3 survives, the error is one line."""
  import shutil
  first = tmp_path / "first"
  shutil.copytree(six_steps[1], first)
  shutil.rmtree(first / "checkpoints" / "6")     # the run as it stood at step 3
  used = _du(first)
  mnt = tmp_path / "small"
  mnt.mkdir()
  size_kb = (used + _du(first / "checkpoints" / "3") // 2) // 1024 + 64
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)],
                     capture_output=True)
  if r.returncode != 0:
    pytest.skip("cannot mount a tmpfs here (needs root)")
  try:
    wd = mnt / "wd"
    shutil.copytree(first, wd)
    r = subprocess.run(_main_cmd(wd, "--config.training.num_steps=9"), cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    _check_disk_full_outcome(r, wd)
  finally:
    subprocess.run(["umount", str(mnt)], capture_output=True)


def _check_disk_full_outcome(r, wd):
  assert r.returncode == 1, r.stderr[-3000:]
  # orbax's writer threads may print their own tracebacks around it.
  lines = [l[l.index("ddx: training stopped:"):] for l in r.stderr.splitlines()
           if "ddx: training stopped:" in l]
  assert len(lines) == 1 and "disk is full" in lines[0], r.stderr[-3000:]
  assert "step 3) is intact" in lines[0]
  assert ckpt_lib.Checkpointer(str(wd), read_only=True).steps() == [3]
  step, leaves = _raw_state(wd, 3)
  assert step == 3 and all(np.all(np.isfinite(l)) for l in leaves)


# --------------------------------------------------------------------------
# Non-finite loss.


def _exploding_config(policy):
  config = load_config()   # TINY's network: the policy is the same for any
  config.model.ch_mult, config.model.attn_resolutions = (1,), ()
  config.optim.lr = 1e30
  config.optim.grad_clip = 0.0
  config.optim.warmup_steps = 0
  config.training.nan_policy = policy
  config.training.sample_every = 0
  config.training.log_every = 1
  config.training.checkpoint_every = 1
  return config


@pytest.mark.slow
def test_nonfinite_loss_stops_naming_the_step_and_checkpoints_stay_finite(tmp_path):
  wd = str(tmp_path / "wd")
  config = _exploding_config("stop")
  with pytest.raises(train.TrainingError, match=r"non-finite .* at step \d+"):
    train.train_and_evaluate(config, wd)
  ck = ckpt_lib.Checkpointer(wd, read_only=True)
  assert ck.steps()
  for step in ck.steps():
    _, leaves = _raw_state(wd, step, config)
    for leaf in leaves:
      assert np.all(np.isfinite(leaf)), f"non-finite value in checkpoint {step}"


def test_nonfinite_loss_with_skip_policy_finishes_with_finite_params(tmp_path):
  wd = str(tmp_path / "wd")
  state = train.train_and_evaluate(_exploding_config("skip"), wd)
  assert int(state.step) == 6
  for leaf in jax.tree.leaves(state.params):
    assert np.all(np.isfinite(np.asarray(leaf)))
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    assert sum(json.loads(l)["nonfinite_steps"] for l in f) >= 1


# --------------------------------------------------------------------------
# Bad input: one line naming the field and the fix, exit 2, workdir untouched.


# Config values the validator refuses, checked in-process (no subprocess each).
BAD_CONFIGS = [
    ({"sampling.sampler": "rk4"}, "sampling.sampler='rk4' is not a sampler of"),
    ({"diffusion.process": "edm", "sampling.sampler": "ddim"},
     "not a sampler of diffusion.process=edm"),
    ({"diffusion.process": "edm", "diffusion.sigma_min": 100.0},
     "diffusion.sigma_min=100.0 must be below"),
    ({"diffusion.process": "flow", "diffusion.prediction": "v", "diffusion.shift": 0.0},
     "diffusion.shift=0.0 must be > 0"),
    ({"model.name": "vit"}, "model.name='vit' is unknown"),
    ({"model.name": "dit", "model.patch_size": 3}, "not divisible by model.patch_size=3"),
    ({"model.name": "dit", "model.num_heads": 5}, "not divisible by model.num_heads=5"),
    ({"diffusion.schedule": "quadratic"}, "diffusion.schedule"),
    ({"diffusion.prediction": "score"}, "diffusion.prediction"),
    ({"data.image_size": 10, "model.ch_mult": (1, 2, 2)}, "not divisible"),
    ({"sampling.steps": 101}, "sampling.steps"),
    ({"sampling.steps": 0}, "sampling.steps"),
    ({"optim.lr": 0.0}, "optim.lr"),
    ({"optim.lr": -1.0}, "optim.lr"),
    ({"model.attn_resolutions": (3,)}, "not a U-Net level"),
    ({"model.num_groups": 3}, "model.num_groups=3 must divide"),
    ({"sampling.spacing": "cubic"}, "sampling.spacing='cubic' is unknown"),
    ({"eval.spacing": "cubic", "eval.every_steps": 2}, "eval.spacing='cubic' is unknown"),
    ({"model.num_classes": 10, "sampling.guidance_scale": 2.0},
     "training.label_dropout=0 never trains the null label"),
]


@pytest.mark.parametrize("overrides,needle", BAD_CONFIGS,
                         ids=[next(iter(o)) for o, _ in BAD_CONFIGS])
def test_bad_config_values_are_one_line_config_errors(overrides, needle):
  config = load_config()
  for key, value in overrides.items():
    group, name = key.split(".")
    config[group][name] = value
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  assert needle in str(e.value) and "\n" not in str(e.value)


# One CLI run per kind of failure: override parsing, a type, the validator, data,
# a structure change of a resumed run, a flag, a config file that does not load.
BAD_INPUTS = [
    (["--config.training.bsz=8"], "bsz"),
    (["--config.training.batch_size=abc"], "batch_size"),
    (["--config.optim.lr=0"], "optim.lr"),
    (["--config.data.name=folder", "--config.data.path=/nonexistent_ddx_dir"],
     "nonexistent_ddx_dir"),
    (["--config.optim.grad_clip=0"], "optim.grad_clip: 1.0 -> 0.0"),
    (["--mode=bogus"], "mode"),
    (["--config=/nonexistent/config.py"], "/nonexistent/config.py could not be loaded"),
]


# These fail inside ddx.main after JAX started: in-process (an uncaught exception,
# a traceback, fails the test). The rest fail while the flags are parsed, before
# JAX is imported: cheap processes. grad_clip's structure change, which reads
# the workdir, stays a real process too.
IN_PROCESS = {"--config.optim.lr=0", "--config.data.name=folder"}


@pytest.mark.parametrize("args,needle", BAD_INPUTS, ids=[a[0][0] for a in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_the_workdir_is_untouched(six_steps, args, needle,
                                                                   capsys):
  _, wd, _ = six_steps
  before = _snapshot(wd)
  if args[0] in IN_PROCESS:
    capsys.readouterr()
    code, stderr = _main_in_process(wd, *args), capsys.readouterr().err
  else:
    r = subprocess.run(_main_cmd(wd, *args), cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    code, stderr = r.returncode, r.stderr
  assert code == 2, (code, stderr[-2000:])
  err = [l for l in stderr.splitlines() if l.startswith("ddx: error:")]
  assert len(err) == 1 and needle in err[0], stderr[-2000:]
  assert "Traceback" not in stderr
  assert _snapshot(wd) == before


def test_batch_not_divisible_by_devices(tmp_path):
  env = dict(os.environ)
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
  r = subprocess.run(_main_cmd(tmp_path / "wd", "--config.training.batch_size=15"),
                     cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert r.returncode == 2
  assert "batch_size=15 is not divisible by the 2 data shards" in r.stderr


def test_empty_image_folder_and_non_images(tmp_path, capsys):
  folder = tmp_path / "imgs"
  folder.mkdir()
  (folder / "notes.txt").write_text("not an image")
  code = _main_in_process(tmp_path / "wd", "--config.data.name=folder",
                          f"--config.data.path={folder}")
  err = capsys.readouterr().err
  assert code == 2 and "ddx: error:" in err and str(folder) in err


@pytest.mark.parametrize("workdir_kind", ["file", "readonly_parent"])
def test_unusable_workdir(tmp_path, workdir_kind, capsys):
  if workdir_kind == "file":
    wd = tmp_path / "afile"
    wd.write_text("user data")
  else:
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    wd = parent / "wd"
    if os.access(parent, os.W_OK):   # root ignores permission bits
      pytest.skip("running as a user that can write anywhere")
  code = _main_in_process(wd)
  assert code == 2 and "workdir" in capsys.readouterr().err
  if workdir_kind == "file":
    assert wd.read_text() == "user data"


def test_sample_mode_without_checkpoint(tmp_path, capsys):
  code = _main_in_process(tmp_path, "--mode=sample")
  assert code == 2 and "no checkpoint" in capsys.readouterr().err


def test_missing_workdir_and_config_flags():
  for args, needle in ((["--config", "configs/test.py"], "--workdir is required"),
                       (["--workdir", "/tmp/ddx_unused_wd"], "--config is required")):
    r = subprocess.run([sys.executable, "-m", "ddx.main", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and needle in r.stderr, r.stderr[-2000:]
  assert not os.path.exists("/tmp/ddx_unused_wd")


def test_metric_writer_survives_a_full_disk(tmp_path, caplog):
  """Logs are not worth a crash: a write error (ENOSPC from /dev/full) warns once
  and stops logging, so the checkpoint error path can report what matters."""
  from ddx import logging as log_lib
  if not os.path.exists("/dev/full"):
    pytest.skip("no /dev/full")
  w = log_lib.MetricWriter(str(tmp_path))
  w._jsonl.close()
  w._jsonl = open("/dev/full", "w", buffering=1)
  with caplog.at_level("WARNING"):
    w.write(1, {"loss": 0.5})
    w.write(2, {"loss": 0.4})
    w.flush()
    w.close()
  warnings = [r for r in caplog.records if "stopped writing" in r.getMessage()]
  assert len(warnings) == 1 and "No space left" in warnings[0].getMessage()
  assert not w.active


# --------------------------------------------------------------------------
# One run, one workdir (issue #32: 4-7, 10a, 11).


def _hashes(path):
  """Every file under path with a digest of its bytes (nothing may change)."""
  import hashlib
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def _quick(**extra):
  config = load_config()
  config.training.sample_every = 0
  for key, value in extra.items():
    group, name = key.split(".")
    config[group][name] = value
  return config


def test_training_refuses_a_folder_that_is_not_a_ddx_workdir(tmp_path):
  """The user's own config.json (and notes) are not ddx's: one line, and not a
  byte of the folder changes."""
  user = tmp_path / "u"
  user.mkdir()
  (user / "config.json").write_text('{"lr": 0.1, "my": "experiment"}')
  (user / "notes.txt").write_text("my notes")
  before = _hashes(user)
  with pytest.raises(config_lib.ConfigError, match="not a ddx workdir") as e:
    train.train_and_evaluate(_quick(), str(user))
  assert "\n" not in str(e.value) and "config.json, notes.txt" in str(e.value)
  assert _hashes(user) == before and sorted(os.listdir(user)) == ["config.json", "notes.txt"]


def test_what_makes_a_ddx_workdir(tmp_path):
  """New, empty, the marker (a first run killed at any moment), or checkpoints/
  beside a ddx config.json (ddx.convert's output, an older ddx's run)."""
  from ddx import workdir as workdir_lib
  ok = workdir_lib.check_trainable
  ok(str(tmp_path / "new"))
  (tmp_path / "empty").mkdir()
  ok(str(tmp_path / "empty"))
  killed = tmp_path / "killed"
  killed.mkdir()
  for name in (workdir_lib.MARKER, workdir_lib.LOCK, "config.json", "metrics.jsonl"):
    (killed / name).write_text("{}")
  ok(str(killed))
  converted = tmp_path / "converted"
  (converted / "checkpoints").mkdir(parents=True)
  (converted / "config.json").write_text(json.dumps(config_lib.to_dict(load_config())))
  ok(str(converted))
  (converted / "config.json").write_text('{"model": 1, "mine": 2}')   # not ddx's
  with pytest.raises(workdir_lib.WorkdirError, match="it holds checkpoints, config.json"):
    ok(str(converted))
  (tmp_path / "afile").write_text("x")
  with pytest.raises(workdir_lib.WorkdirError, match="is not a directory"):
    ok(str(tmp_path / "afile"))


@pytest.mark.slow
def test_a_held_workdir_refuses_a_second_trainer_and_a_dead_holder_does_not(
    six_steps, tmp_path):
  import shutil
  from ddx import workdir as workdir_lib
  wd = str(tmp_path / "wd")
  shutil.copytree(six_steps[1], wd)
  held = workdir_lib.lock(wd)
  try:
    before = _hashes(wd)
    with pytest.raises(workdir_lib.WorkdirError, match=rf"in use by another ddx process "
                       rf"\(pid {os.getpid()} on host"):
      train.train_and_evaluate(_quick(**{"training.num_steps": 7}), wd)
    assert _hashes(wd) == before
  finally:
    held.release()
  state = train.train_and_evaluate(_quick(**{"training.num_steps": 7}), wd)
  assert int(state.step) == 7


@pytest.mark.slow
def test_two_trainers_and_a_sigkilled_holder(tmp_path):
  """A first run (no checkpoint yet) holds the workdir: a second launch is one
  line, exit 2, and changes nothing; the first is killed with SIGKILL before any
  checkpoint; the same command then resumes (the lock died with the process)."""
  wd = tmp_path / "wd"
  args = ("--config.training.checkpoint_every=0", "--config.training.log_every=1", *TINY)
  first = subprocess.Popen(_main_cmd(wd, *args), cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
  try:
    assert _wait_for_step(first, 1) is not None
    first.send_signal(signal.SIGSTOP)   # holds the lock; its files stand still
    before = _hashes(wd)
    r = subprocess.run(_main_cmd(wd, *args), cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    after = _hashes(wd)
    assert first.poll() is None   # still holding the workdir: the refusal was no race
    first.kill()                  # SIGKILL: no checkpoint written yet
    first.wait(timeout=30)
  finally:
    if first.poll() is None:
      first.kill()
  assert r.returncode == 2, r.stderr[-3000:]
  err = [l for l in r.stderr.splitlines() if l.startswith("ddx: error:")]
  assert len(err) == 1 and f"in use by another ddx process (pid {first.pid}" in err[0], \
      r.stderr[-3000:]
  assert "Traceback" not in r.stderr and after == before
  assert not os.path.isdir(wd / "checkpoints") or not os.listdir(wd / "checkpoints")
  r = subprocess.run(_main_cmd(wd, *args), cwd=ROOT, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert ckpt_lib.Checkpointer(str(wd), read_only=True).steps() == [6]


def test_bad_init_from_and_guide_are_refused_before_anything_is_written(six_steps, tmp_path):
  wd = tmp_path / "wd"
  cases = [({"training.init_from": str(tmp_path / "missing")}, "training.init_from="),
           ({"training.init_from": six_steps[1], "model.ch": 16}, "has shape"),
           ({"sampling.guide_workdir": str(tmp_path / "missing")},
            "sampling.guide_workdir=")]
  for extra, needle in cases:
    with pytest.raises(config_lib.ConfigError, match=needle) as e:
      train.train_and_evaluate(_quick(**extra), str(wd))
    assert "\n" not in str(e.value)
    assert not wd.exists(), extra   # no config.json to fix a corrected rerun's "auto"


def test_resume_says_init_from_is_ignored(six_steps, tmp_path, caplog):
  import shutil
  wd = str(tmp_path / "wd")
  shutil.copytree(six_steps[1], wd)
  with caplog.at_level("WARNING"):
    train.train_and_evaluate(_quick(**{"training.init_from": str(tmp_path / "gone")}), wd)
  said = [r.getMessage() for r in caplog.records if "init_from" in r.getMessage()]
  assert len(said) == 1 and "ignored: the run resumes from its own checkpoint (step 6)" \
      in said[0], said


@pytest.mark.slow
def test_distillation_refuses_a_teacher_trained_further(tmp_path):
  """teacher.json records the teacher's step and weights at the first start; a
  resume whose teacher's weights differ from the record is one line naming both
  steps, and the student's folder is untouched."""
  def tiny(**extra):
    c = _quick(**extra)
    c.model.ch, c.model.ch_mult, c.model.attn_resolutions = 8, (1,), ()
    return c
  teacher, student = str(tmp_path / "teacher"), str(tmp_path / "student")
  flow = {"diffusion.process": "flow", "training.checkpoint_every": 2}
  train.train_and_evaluate(tiny(**flow, **{"training.num_steps": 2}), teacher)
  distil = {"diffusion.process": "consistency", "diffusion.num_timesteps": 1000,
            "training.teacher": teacher, "training.checkpoint_every": 2}
  train.train_and_evaluate(tiny(**distil, **{"training.num_steps": 2}), student)
  record = json.loads(open(os.path.join(student, "teacher.json")).read())
  assert record["step"] == 2 and record["teacher"] == teacher
  # The teacher moved on: as if the student had started from the teacher's step
  # 1, whose weights differ (training it further costs a third run here).
  record.update(step=1, weights="0" * len(record["weights"]))
  with open(os.path.join(student, "teacher.json"), "w") as f:
    json.dump(record, f)
  before = _hashes(student)
  with pytest.raises(config_lib.ConfigError, match=r"at step 2, but .* from its step 1"):
    train.train_and_evaluate(tiny(**distil, **{"training.num_steps": 4}), student)
  assert _hashes(student) == before


@pytest.mark.parametrize("mode", ["sample", "eval"])
def test_sample_and_eval_on_a_read_only_workdir(six_steps, tmp_path, mode, capsys):
  import shutil
  mnt = tmp_path / "ro"
  mnt.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
                    capture_output=True).returncode != 0:
    pytest.skip("cannot mount a tmpfs here (needs root)")
  try:
    wd = mnt / "wd"
    shutil.copytree(six_steps[1], wd)
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    before = _hashes(wd)
    capsys.readouterr()
    code = _main_in_process(wd, f"--mode={mode}", "--config.eval.num_samples=4")
    stderr = capsys.readouterr().err
    assert code == 2, stderr[-3000:]
    err = [l for l in stderr.splitlines() if l.startswith("ddx: error:")]
    assert len(err) == 1 and f"--mode {mode} writes" in err[0], stderr[-3000:]
    assert "Traceback" not in stderr and _hashes(wd) == before
  finally:
    subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_sample_skips_a_corrupt_newest_checkpoint_in_one_line(six_steps, tmp_path):
  import shutil
  wd = tmp_path / "wd"
  shutil.copytree(six_steps[1], wd)
  for root, _, files in os.walk(wd / "checkpoints" / "6" / "state"):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "r+b") as fh:
        fh.truncate(os.path.getsize(p) // 3)
  r = subprocess.run(_main_cmd(wd, "--mode=sample"), cwd=ROOT, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "skipped checkpoint 6" in lines[0], r.stderr[-3000:]
  assert len(lines[0]) < 600
  assert "of the checkpoint at step 3" in r.stdout, r.stdout
