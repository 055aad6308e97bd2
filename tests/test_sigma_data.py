"""diffusion.sigma_data = "auto": measured from the training data, saved in config.json."""
import json
import math
import os

import numpy as np
import pytest

from ddx import config as config_lib
from ddx import data as data_lib
from ddx import train
from testutils import load_config


def digits_pixels_std() -> float:
  """scikit-learn's digits as ddx.data scales them: counts 0..16 -> round(·255/16)
  as uint8 -> float32 u8 / 127.5 - 1; the std over all pixels in float64."""
  from sklearn import datasets
  u8 = np.round(datasets.load_digits().images * (255.0 / 16.0)).astype(np.uint8)
  x = u8.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
  return float(np.std(x.astype(np.float64)))


def test_digits_sigma_data_is_the_std_of_the_training_pixels():
  got = data_lib.value_std(data_lib.digits_source())
  assert got == pytest.approx(digits_pixels_std(), rel=1e-12)
  assert got == pytest.approx(0.7518, abs=1e-4)   # not EDM's 0.5


def test_a_large_dataset_is_measured_on_a_fixed_seeded_subset():
  rng = np.random.default_rng(5)
  images = rng.integers(0, 256, (50, 4, 4, 1), dtype=np.uint8)
  images[:25] //= 4                                  # halves that differ
  src = data_lib.ArraySource(images, np.zeros(50), 0)
  rows = np.sort(np.random.default_rng(0).permutation(50)[:20])
  want = np.std(images[rows].astype(np.float64) / 127.5 - 1)
  got = data_lib.value_std(src, max_images=20)
  assert got == pytest.approx(want, rel=1e-6)
  assert got != pytest.approx(data_lib.value_std(src), rel=1e-3)
  assert data_lib.value_std(src, max_images=20) == got


def test_a_source_with_value_moments_pools_mean_and_variance():
  """A latent cache draws mean + std·ε per row: Var = E[var] + Var(mean)."""
  class Moments:
    num_classes, image_shape = 0, (2, 2, 1)
    mean = np.random.default_rng(1).normal(0.3, 2.0, (7, 2, 2, 1))
    var = np.random.default_rng(2).uniform(0.1, 1.0, (7, 2, 2, 1))

    def __len__(self):
      return 7

    def value_moments(self, index):
      return self.mean[index], self.var[index]

  s = Moments()
  assert data_lib.value_std(s) == pytest.approx(
      math.sqrt(s.var.mean() + s.mean.var()), rel=1e-12)


@pytest.mark.parametrize("value", [0.0, -0.5, "half", True, float("nan")])
def test_bad_sigma_data_is_one_line(value):
  c = load_config()
  c.diffusion.process = "edm"
  c.sampling.sampler = c.eval.sampler = "heun"
  c.diffusion.sigma_data = value
  with pytest.raises(config_lib.ConfigError, match="diffusion.sigma_data=.* must be a "
                     "number > 0 .* or auto") as e:
    config_lib.validate(c)
  assert "\n" not in str(e.value)
  c.diffusion.sigma_data = "auto"
  config_lib.validate(c)


def _no_measuring(*_):
  raise AssertionError("sigma_data was measured again")


def test_resolve_auto_measures_once_then_reads_config_json(tmp_path, monkeypatch):
  c = load_config()
  c.diffusion.process = "edm"
  c.diffusion.sigma_data = "auto"
  src = data_lib.digits_source()
  got = train.resolve_auto(c, str(tmp_path), src)
  assert got.diffusion.sigma_data == pytest.approx(digits_pixels_std(), rel=1e-12)
  assert (got.model.time_embedding, got.model.time_scale) == ("positional", 1.0)
  assert c.diffusion.sigma_data == "auto"            # the caller's config is untouched
  saved = config_lib.to_dict(got)
  saved["diffusion"]["sigma_data"] = 0.61
  (tmp_path / "config.json").write_text(json.dumps(saved))
  monkeypatch.setattr(data_lib, "value_std", _no_measuring)
  assert train.resolve_auto(c, str(tmp_path), src).diffusion.sigma_data == 0.61
  c.diffusion.sigma_data = 0.7                        # a number given now wins
  assert train.resolve_auto(c, str(tmp_path), src).diffusion.sigma_data == 0.7


class _Stop(Exception):
  pass


def test_train_writes_the_number_and_a_rerun_without_checkpoints_measures_again(
    tmp_path, monkeypatch):
  """train_and_evaluate resolves "auto" before config.json is written and before
  anything is built (stopped where the state would be restored: nothing
  compiles). A rerun before any checkpoint measures again: a first start that
  failed leaves a config.json that must not fix the corrected run's values
  (issue #32); a resume with checkpoints reads config.json's number
  (`resolve_auto`, tested above)."""
  c = load_config()
  c.diffusion.process = "edm"
  c.diffusion.sigma_data = "auto"
  c.sampling.sampler, c.sampling.clip_x0 = "euler", False
  seen = []

  def stop(setup, ck, config, rng, source=None):
    seen.append(config)     # the config the run trains, checkpoints and samples with
    ck.close()
    raise _Stop
  monkeypatch.setattr(train, "restore_or_init", stop)
  workdir = str(tmp_path / "wd")
  with pytest.raises(_Stop):
    train.train_and_evaluate(c, workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["diffusion"]["sigma_data"] == pytest.approx(digits_pixels_std(), rel=1e-12)
  assert seen[0].diffusion.sigma_data == saved["diffusion"]["sigma_data"]
  saved["diffusion"]["sigma_data"] = 0.625             # as if measured on other data
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(saved, f)
  with pytest.raises(_Stop):
    train.train_and_evaluate(c, workdir)
  assert seen[1].diffusion.sigma_data == pytest.approx(digits_pixels_std(), rel=1e-12)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["diffusion"]["sigma_data"] == seen[1].diffusion.sigma_data
