"""A workdir written before one folder per variant (issue #33) loads, samples bit
for bit as the code that wrote it did, and resumes (tests/fixtures/make_old_workdir.py
made it at commit b9377a8)."""
import os
import shutil

import jax
import numpy as np
import pytest

import ddx
from ddx import config as config_lib
from ddx import train

from testutils import ROOT

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "workdir_before_folders")
SAMPLES = FIXTURE + "_samples.npy"


@pytest.fixture
def old_run(tmp_path):
  path = tmp_path / "run"
  shutil.copytree(FIXTURE, path)
  return str(path)


def test_an_old_workdir_samples_as_the_code_that_wrote_it(old_run):
  model = ddx.load(old_run)
  images = ddx.sample_fn(model, jax.random.key(7), steps=3, num_samples=2)
  np.testing.assert_array_equal(np.asarray(images), np.load(SAMPLES))


@pytest.mark.slow
def test_an_old_workdir_resumes(old_run):
  config = config_lib.from_dict(config_lib.to_dict(ddx.load(old_run).config))
  config.training.num_steps = 4
  state = train.train_and_evaluate(config, old_run)
  assert int(state.step) == 4
  assert sorted(os.listdir(os.path.join(old_run, "checkpoints")))[-1] == "4"
