"""The config module: loads without JAX, its name lists match the implementations."""
import subprocess
import sys

import pytest

from ddx import config as config_lib

from testutils import ROOT


def test_configs_load_with_ml_collections_alone():
  """As big_vision's: a config file pulls in neither JAX nor Flax."""
  code = ("import sys; from ddx import config as c\n"
          "for n in ('default', 'digits', 'digits_cond', 'cifar10', 'article', 'test', 'digits_dit'):\n"
          "  cfg = c.from_file(f'configs/{n}.py'); cfg.data.path = cfg.data.path or 'x'; c.validate(cfg)\n"
          "bad = [m for m in ('jax', 'flax', 'optax', 'orbax', 'PIL') if m in sys.modules]\n"
          "assert not bad, bad\n")
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]


def test_name_lists_match_the_implementations():
  from ddx import diffusion, evaluation, sampling, schedules
  from ddx.models import attention, layers
  assert config_lib.PREDICTIONS == diffusion.PREDICTIONS
  assert config_lib.ATTENTIONS == attention.ATTENTIONS
  assert config_lib.REMATS == layers.REMATS
  assert config_lib.SCHEDULES == schedules.names()
  assert config_lib.NORMS == layers.NORMS
  assert config_lib.SAMPLERS == tuple(sampling.SAMPLERS)
  assert config_lib.SPACINGS == sampling.SPACINGS
  assert config_lib.DDPM_VARIANCES == sampling.DDPM_VARIANCES
  assert config_lib.METRICS == evaluation.METRICS
  assert config_lib.INCEPTION_METRICS == evaluation.INCEPTION_METRICS


def test_from_file_errors_are_one_line(tmp_path):
  with pytest.raises(config_lib.ConfigError, match=r"config file .*nope\.py does not exist"):
    config_lib.from_file(str(tmp_path / "nope.py"))
  (tmp_path / "empty.py").write_text("x = 1\n")
  with pytest.raises(config_lib.ConfigError, match="has no get_config"):
    config_lib.from_file(str(tmp_path / "empty.py"))


def test_every_shipped_config_validates():
  import glob
  import os
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    config = config_lib.from_file(path)
    config.data.path = config.data.path or "some/folder"   # article.py: user's images
    config_lib.validate(config)
