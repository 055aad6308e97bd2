"""The README's research-code example runs as written (after a short training run)."""
import os
import re

import pytest

from testutils import ROOT, load_config


def _python_blocks():
  with open(os.path.join(ROOT, "README.md")) as f:
    return re.findall(r"```python\n(.*?)```", f.read(), re.S)


@pytest.mark.slow
def test_readme_research_example_runs(tmp_path, monkeypatch):
  from ddx import train
  monkeypatch.chdir(tmp_path)
  config = load_config("test")
  config.training.num_steps = 2
  config.training.sample_every = 0
  train.train_and_evaluate(config, "runs/digits")
  blocks = _python_blocks()
  assert len(blocks) >= 2 and "ddx.load(\"runs/digits\")" in blocks[0]
  scope = {}
  exec(compile(blocks[0], "README.md", "exec"), scope)
  assert scope["imgs"].shape == (config.sampling.num_samples, 8, 8, 1)
  assert scope["x"].shape == (4, 8, 8, 1)
  for block in blocks[1:]:
    if "runs/digits_cond" in block:   # needs a class-conditional run: test_features.py
      continue
    if "sd-vae-ft-ema" in block or "runs/dit-xl2-256" in block:
      # Published weights (downloaded by the user): the same calls run on random
      # weights in test_autoencoder.py, test_dit_import.py and test_latents.py.
      continue
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    if "invert_fn" in block:   # the inversion example: 8 interpolants of two digits
      assert scope["imgs"].shape == (8, 8, 8, 1)
    if "ddx.bpd" in block:     # the likelihood example: finite bits/dim per image
      assert scope["bpd"].shape == (4,) and bool((scope["bpd"] > 0).all())
