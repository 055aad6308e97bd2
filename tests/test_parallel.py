"""Scale-out: 8 fake devices, FSDP, 2 processes x 2 devices, sharded sampling.

Each multi-device run is a subprocess (the device count is fixed when JAX
starts) and must reproduce the 1-device run of the same config and global
batch: the same loss curve and params to float tolerance.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import ddx
from ddx import parallel, train
from testutils import ROOT, load_config

# configs/test.py as it is (its programs may already be in the compile cache);
# the driver lowers FSDP_MIN_SIZE so that FSDP splits its kernels.
OVERRIDES = {"training.num_steps": 4, "training.log_every": 1,
             "training.checkpoint_every": 0, "training.sample_every": 0}
RTOL = 1e-5
# Adam divides by sqrt(v): for a near-zero gradient a rounding difference in
# the all-reduce moves the update by up to ~lr (1e-3), so params are compared
# with an absolute floor of 1% of one step's lr.
ATOL = 1e-5


def _env(devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={devices}")
  env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "tests"), ROOT])
  return env


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return np.array([json.loads(line)["loss"] for line in f])


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  """The reference: this process's single CPU device."""
  assert jax.device_count() == 1
  wd = str(tmp_path_factory.mktemp("one") / "wd")
  config = load_config()
  for key, value in OVERRIDES.items():
    group, name = key.split(".")
    config[group][name] = value
  state = train.train_and_evaluate(config, wd)
  return wd, [np.asarray(x) for x in jax.tree.leaves(state.params)]


def _assert_params_close(params, reference):
  assert len(params) == len(reference)
  for a, b in zip(params, reference):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.slow
def test_eight_devices_with_fsdp_match_one_device_and_sample_alike(one_device, tmp_path):
  """8 devices as a (4 data x 2 fsdp) mesh: same losses and params as 1 device,
  with some params really split; and the sampler sharded over 8 devices
  returns the images one device gives for the same model and key."""
  ref_wd, ref_params = one_device
  out = tmp_path / "out.npz"
  overrides = dict(OVERRIDES, **{"training.fsdp": 2})
  r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "parallel_driver.py"),
                      str(out), str(tmp_path / "wd"), json.dumps(overrides), ref_wd],
                     cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  res = np.load(out)
  assert res["num_devices"] == 8 and res["num_split"] > 0
  np.testing.assert_allclose(_losses(tmp_path / "wd"), _losses(ref_wd), rtol=RTOL)
  _assert_params_close([res[f"p{i}"] for i in range(len(ref_params))], ref_params)
  images = ddx.sample_fn(ddx.load(ref_wd), jax.random.key(7), steps=10, num_samples=16)
  np.testing.assert_allclose(res["images"], np.asarray(images), atol=1e-5)


@pytest.mark.slow
def test_two_processes_match_one_device_and_their_checkpoint_loads(one_device, tmp_path):
  """2 processes x 2 CPU devices through jax.distributed on 127.0.0.1 (gloo),
  started by the launch script users run: same loss curve; the checkpoint
  they wrote together restores in this 1-process run to the same EMA."""
  ref_wd, _ = one_device
  wd = tmp_path / "wd"
  overrides = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  env = _env(1)
  env["DEVICES_PER_PROCESS"] = "2"
  env["PYTHON"] = sys.executable
  r = subprocess.run(["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"), "2",
                      "configs/test.py", str(wd), *overrides],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  np.testing.assert_allclose(_losses(wd), _losses(ref_wd), rtol=RTOL)
  got, want = ddx.load(str(wd)), ddx.load(ref_wd)
  assert got.config.model == want.config.model
  _assert_params_close(jax.tree.leaves(got.variables), jax.tree.leaves(want.variables))


def test_fsdp_spec_splits_the_largest_divisible_dimension():
  big = parallel.FSDP_MIN_SIZE
  assert parallel.fsdp_spec((3, 3, 64, 128), 4) == jax.sharding.PartitionSpec(
      None, None, None, "fsdp")
  assert parallel.fsdp_spec((big, 3), 2) == jax.sharding.PartitionSpec("fsdp")
  assert parallel.fsdp_spec((3, 3, 64, 128), 1) == jax.sharding.PartitionSpec()
  assert parallel.fsdp_spec((128,), 2) == jax.sharding.PartitionSpec()      # small: replicated
  assert parallel.fsdp_spec((big + 1,), 2) == jax.sharding.PartitionSpec()  # nothing divides


def test_initialize_distributed_needs_all_three_settings(monkeypatch):
  for k in ("DDX_COORDINATOR_ADDRESS", "DDX_NUM_PROCESSES", "DDX_PROCESS_ID",
            "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(k, raising=False)
  assert parallel.initialize_distributed() is False            # a single host starts nothing
  with pytest.raises(ValueError, match="needs all three"):
    parallel.initialize_distributed("127.0.0.1:1234", 2)
  monkeypatch.setenv("DDX_NUM_PROCESSES", "2")
  monkeypatch.setenv("DDX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
  with pytest.raises(ValueError, match="process_id=5"):
    parallel.initialize_distributed(process_id=5)
  assert parallel.initialize_distributed(num_processes=1, process_id=0) is False


def test_fsdp_that_does_not_divide_the_devices_is_a_config_error(tmp_path):
  config = load_config()
  config.training.fsdp = 3
  from ddx import config as config_lib
  with pytest.raises(config_lib.ConfigError, match="training.fsdp=3"):
    train.train_and_evaluate(config, str(tmp_path / "wd"))
  assert not os.path.exists(tmp_path / "wd")
