"""One-line errors for a --config that does not load or names no key, and what
--mode sample / eval take from the run instead of --config (issue #32)."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from ddx import config as config_lib
from testutils import ROOT, load_config, random_model


def _run(*args):
  return subprocess.run([sys.executable, "-m", "ddx.main", *args, "--workdir",
                         "/tmp/ddx_unused_cli_wd"], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)


@pytest.mark.parametrize("body,args,needle", [
    ("def get_config():\n  return None\n", (), "get_config() returned None"),
    ("x = 1\n", (), "has no get_config(); define get_config()"),
    (None, ("--config.training.fsd=1",),
     "--config.training.fsd: training.fsd is not a config key; did you mean "
     "--config.training.fsdp?"),
    (None, ("--config.trainin.seed=1",), "trainin is not a config key; did you mean "
     "--config.training?"),
    (None, ("--config.training.foo=1",), "training.foo is not a config key; training has "
     "batch_size,"),
])
def test_a_config_that_does_not_load_is_one_line(tmp_path, body, args, needle):
  """These fail while the flags are parsed, before JAX starts: cheap subprocesses."""
  path = "configs/test.py"
  if body is not None:
    path = str(tmp_path / "my_config.py")
    with open(path, "w") as f:
      f.write(body)
  r = _run("--config", path, *args)
  lines = [l for l in r.stderr.splitlines() if l.startswith("ddx: error:")]
  assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
  assert needle in lines[0], lines[0]
  assert "--config is required" not in r.stderr and "bad config override" not in r.stderr
  assert not os.path.exists("/tmp/ddx_unused_cli_wd")


def test_sample_and_eval_take_the_run_process_and_network(tmp_path, capsys):
  """A meanflow run sampled with --config configs/test.py (DDPM's U-Net there):
  the run's config.json decides diffusion.* and model.*, so its sampler passes
  the checks, and one note line says what --config had said."""
  from ddx import main
  run = load_config()
  run.diffusion.process = "meanflow"
  run.model.time_embedding = "positional"
  config_lib.validate(run)
  workdir = tmp_path / "mf"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(config_lib.to_dict(run)))
  cli = load_config()
  cli.sampling.sampler = "meanflow"
  with pytest.raises(config_lib.ConfigError, match="not a sampler of diffusion.process=ddpm"):
    config_lib.validate(cli)
  merged = main._with_run(cli, str(workdir))
  config_lib.validate(merged)
  assert merged.diffusion.process == "meanflow" and merged.sampling.sampler == "meanflow"
  note = capsys.readouterr().err.strip().splitlines()
  assert len(note) == 1 and "diffusion.process: 'ddpm' -> 'meanflow'" in note[0], note
  # Without a run there is nothing to take; the load then names what is missing.
  assert main._with_run(cli, str(tmp_path / "none")) is cli


def test_training_on_a_posthoc_export_points_at_init_from(tmp_path):
  """An OUT of python -m ddx.posthoc_ema holds EMA weights only: resuming it as a
  run is refused in one line that says how to start from it, and OUT is untouched."""
  from ddx import posthoc_ema, train
  config = load_config()
  config.model.ch_mult, config.model.attn_resolutions = (1,), ()
  model = random_model(config)
  out = tmp_path / "ema"
  posthoc_ema.write_workdir(out, dict(model.variables), config, 8, {"sigma_rel": 0.1})
  digest = lambda: sorted((str(p.relative_to(out)), hashlib.sha256(p.read_bytes()).hexdigest())
                          for p in out.rglob("*") if p.is_file())
  before = digest()
  with pytest.raises(config_lib.ConfigError,
                     match=f"EMA weights only.*--config.training.init_from={out}") as e:
    train.train_and_evaluate(config, str(out))
  assert "\n" not in str(e.value)
  assert digest() == before
