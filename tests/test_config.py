"""The config module: loads without JAX, its name lists match the implementations.

Backbone and process tests are parametrised over the registries (ddx.models.names(),
ddx.processes.names()): a new variant is tested here without editing this file.
"""
import re
import subprocess
import sys

import pytest

from ddx import config as config_lib
from ddx import models, processes

from testutils import ROOT, load_config


def test_configs_load_and_validate_with_ml_collections_alone():
  """As big_vision's: every config file loads and validates (under every
  process and every backbone) without pulling in JAX or Flax."""
  code = ("import glob, sys, warnings; from ddx import config as c\n"
          "warnings.simplefilter('ignore', c.ConfigWarning)\n"
          "paths = sorted(glob.glob('configs/*.py')); assert len(paths) >= 11, paths\n"
          "for p in paths:\n"
          "  cfg = c.from_file(p); cfg.data.path = cfg.data.path or 'x'; c.validate(cfg)\n"
          "from ddx import processes\nfor n in processes.names():\n"   # 64 steps: a count every sampler takes
          "  cfg = c.base_config(); cfg.diffusion.process = n; cfg.sampling.steps = 64\n"
          "  c.validate(cfg)\n"
          "from ddx import models\n"
          "for n in models.names():\n"
          "  cfg = c.base_config(); cfg.model.name = n; c.validate(cfg)\n"
          "bad = [m for m in ('jax', 'flax', 'optax', 'orbax', 'PIL') if m in sys.modules]\n"
          "assert not bad, bad\n")
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]


def test_name_lists_match_the_implementations():
  """Every name list config.py or a process's Spec holds equals the one of the
  module that implements it (the JAX modules import the Specs' lists; where a
  sampler module keeps its own, they must agree)."""
  from ddx import bpd, evaluation, likelihood, models, processes
  from ddx import sampling
  from ddx.models import attention, fused_norm, layers
  from ddx.models.unet import spec as unet_spec
  from ddx.processes.ddpm import sampling as discrete
  from ddx.processes.ddpm import schedules
  from ddx.processes.ddpm import spec as ddpm_spec
  from ddx.sampling import sigma
  assert config_lib.ATTENTIONS == attention.ATTENTIONS
  assert config_lib.NORM_KERNELS == fused_norm.NORM_KERNELS
  assert config_lib.REMATS == layers.REMATS
  assert config_lib.TIME_EMBEDDINGS == layers.TIME_EMBEDDINGS
  assert unet_spec.NORMS == layers.NORMS
  assert unet_spec.DOWNSAMPLE_PADDINGS == layers.DOWNSAMPLE_PADDINGS
  assert config_lib.MODELS == models.NAMES == models.names()
  assert ddpm_spec.SCHEDULES == schedules.names()
  assert ddpm_spec.DISCRETE_SAMPLERS == tuple(discrete.SAMPLERS)
  assert ddpm_spec.SPACINGS == discrete.SPACINGS == processes.spec("ddpm").spacings
  assert ddpm_spec.DDPM_VARIANCES == discrete.DDPM_VARIANCES
  assert ddpm_spec.SIGMA_INDICES == sigma.SIGMA_INDICES
  assert set(ddpm_spec.SIGMA_SAMPLERS) <= set(sigma.SAMPLERS)
  assert processes.spec("edm").samplers == sigma.SAMPLERS
  assert processes.spec("flow").samplers == sampling.flow.SAMPLERS
  assert config_lib.METRICS == evaluation.METRICS
  assert config_lib.INCEPTION_METRICS == evaluation.INCEPTION_METRICS
  assert config_lib.BPD_ESTIMATORS == bpd.ESTIMATORS
  assert config_lib.BPD_TRACES == likelihood.TRACES
  assert config_lib.BPD_PROBES == likelihood.PROBES
  assert config_lib.BPD_SOLVERS == likelihood.SOLVERS
  assert set(processes.spec("ddpm").bpd_estimators) == set(bpd.ESTIMATORS)
  # model.dtype: the networks take any name jnp.dtype knows; these are the two
  # compute dtypes ddx supports.
  import jax.numpy as jnp
  assert [jnp.dtype(d) for d in config_lib.DTYPES] == [jnp.float32, jnp.bfloat16]


def test_auto_becomes_the_process_default_and_explicit_values_stay():
  """diffusion.prediction / sampling.sampler / eval.sampler "auto" resolve to the
  chosen process's defaults in validate (what config.json then holds)."""
  want = {"ddpm": ("eps", "ddim"), "edm": ("auto", "heun"), "flow": ("v", "euler")}
  for process, (prediction, sampler) in want.items():
    c = config_lib.base_config()
    c.diffusion.process = process
    config_lib.validate(c)
    assert (c.diffusion.prediction, c.sampling.sampler, c.eval.sampler) == (
        prediction, sampler, sampler), process
  c = config_lib.base_config()
  c.diffusion.process, c.diffusion.prediction, c.sampling.sampler = "flow", "x0", "heun"
  config_lib.validate(c)
  assert (c.diffusion.prediction, c.sampling.sampler) == ("x0", "heun")
  # A saved config.json of an older ddx (explicit values) loads as it was; one
  # missing the keys gets its process's defaults.
  old = config_lib.with_defaults({"diffusion": {"process": "ddpm", "prediction": "v"},
                                  "sampling": {"sampler": "ddpm"}})
  assert (old.diffusion.prediction, old.sampling.sampler) == ("v", "ddpm")
  bare = config_lib.with_defaults({"diffusion": {"process": "flow"}})
  assert (bare.diffusion.prediction, bare.sampling.sampler) == ("v", "euler")


@pytest.mark.parametrize("key,value,match", [
    ("sigma_data", -1.0, r"diffusion.sigma_data=-1.0 must be a number > 0 .*diffusion.process=edm"),
    ("sigma_min", 100.0, r"diffusion.sigma_min=100.0 must be below diffusion.sigma_max"),
    ("shift", 0.0, r"diffusion.shift=0.0 must be > 0 .*diffusion.process=flow"),
    ("t_min", 1.5, r"diffusion.t_min=1.5 must lie in \(0, 1\)"),
])
def test_out_of_range_key_of_another_process_is_an_error(key, value, match):
  """An EDM / flow key out of range is refused under the default DDPM process."""
  c = config_lib.base_config()
  c.diffusion[key] = value
  with pytest.raises(config_lib.ConfigError, match=match) as e:
    config_lib.validate(c)
  assert "\n" not in str(e.value)


def test_changed_key_the_process_does_not_read_warns_once():
  c = config_lib.base_config()
  c.diffusion.sigma_data = 1.0       # an EDM key, in range, under ddpm
  with pytest.warns(config_lib.ConfigWarning,
                    match=r"^diffusion.sigma_data=1.0 has no effect: only "
                    r"diffusion.process=edm reads it, and this run's is ddpm") as rec:
    config_lib.validate(c)
  assert len(rec) == 1 and "\n" not in str(rec[0].message)
  c = config_lib.base_config()
  c.diffusion.process, c.diffusion.prediction = "edm", "eps"   # EDM has no prediction
  with pytest.warns(config_lib.ConfigWarning, match="diffusion.prediction='eps' has no "
                    "effect: diffusion.process=edm does not read it"):
    config_lib.validate(c)


@pytest.mark.parametrize("backbone", models.names())
@pytest.mark.parametrize("process", processes.names())
def test_unchanged_keys_give_no_warning(process, backbone):
  import warnings
  c = config_lib.base_config()
  c.diffusion.process, c.model.name = process, backbone
  c.sampling.steps = 64   # a count every sampler takes
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    config_lib.validate(c)


def test_a_process_switch_brings_its_defaults():
  """Issue: --config.diffusion.process=flow stopped at prediction='eps'."""
  c = load_config("default")
  c.diffusion.process = "flow"
  config_lib.validate(c)
  assert c.diffusion.prediction == "v" and c.sampling.sampler == "euler"


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


@pytest.mark.parametrize("name", models.names())
def test_every_backbone_brings_its_keys_with_their_defaults(name):
  """base_config's model group holds each registered backbone's own keys (its
  Spec's fields) with their defaults; its tiny test settings validate."""
  spec = models.spec(name)
  c = config_lib.base_config()
  assert {k: c.model[k] for k in spec.defaults()} == spec.defaults()
  c.model.name = name
  c.model.update(spec.tiny)
  config_lib.validate(c)


def test_a_key_two_backbones_share_has_one_default(monkeypatch):
  class Clash(models.Spec):
    name = "clash"
    fields = (models.Field(next(iter(models.fields())), object(), "a clashing default"),)
  monkeypatch.setitem(models.REGISTRY, "clash", Clash())
  with pytest.raises(ValueError, match=r"is a key of two backbones with different defaults"):
    config_lib.base_config()


def test_an_unknown_backbone_is_named_in_one_line():
  c = config_lib.base_config()
  c.model.name = "vit"
  with pytest.raises(config_lib.ConfigError,
                     match=rf"^model.name='vit' is unknown; use one of {re.escape(str(models.names()))}$"):
    config_lib.validate(c)
