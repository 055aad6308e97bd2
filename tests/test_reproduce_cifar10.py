"""benchmarks/reproduce_cifar10.py end to end at tiny scale, so it cannot rot.

A small random diffusers UNet2DModel at CIFAR-10's 32x32x3 is converted with
ddx.convert, CIFAR-10 is tfds' mock data, the Inception weights are random
(same scheme as tests/test_inception.py), and two rows (DDIM η = 1 with 2
steps, DDPM with 3) draw 10 samples each (two chunks of 5; IS needs one per
each of its 10 splits) instead of nine rows of 50,000 with 10-1,000 steps.
Each row's FID costs two eigendecompositions of 2048x2048 matrices (~30 s on
a loaded 2-core machine), so the test keeps to two rows.
"""
import importlib.util
import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
tfds = pytest.importorskip("tensorflow_datasets")

from ddx import checkpoint as ckpt_lib
from ddx import convert
from ddx import evaluation
from ddx import inception
from ddx import model as model_lib

from testutils import ROOT


def _script():
  spec = importlib.util.spec_from_file_location(
      "reproduce_cifar10", os.path.join(ROOT, "benchmarks", "reproduce_cifar10.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_protocol_rows_are_the_papers():
  rows = _script().rows()
  ddim = [(r.eta, r.steps, r.spacing, r.clip_x0, r.paper_fid) for r in rows
          if r.sampler == "ddim"]
  assert ddim == [(0.0, 10, "quadratic", False, 13.36), (0.0, 20, "quadratic", False, 6.84),
                  (0.0, 50, "quadratic", False, 4.67), (0.0, 100, "quadratic", False, 4.16),
                  (1.0, 10, "quadratic", False, None), (1.0, 20, "quadratic", False, None),
                  (1.0, 50, "quadratic", False, None), (1.0, 100, "quadratic", False, None)]
  ddpm = rows[-1]
  assert (ddpm.sampler, ddpm.steps, ddpm.ddpm_variance, ddpm.clip_x0, ddpm.paper_fid,
          ddpm.paper_is) == ("ddpm", 1000, "beta", True, 3.17, 9.46)


def _random_inception(path):
  """pytorch-fid-keyed random weights with He-scaled convs and sane BatchNorm stats."""
  rng = np.random.default_rng(0)
  state = {}
  for key, shape in inception.expected_shapes().items():
    if key.endswith("conv.weight"):
      v = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    elif key.endswith("running_var"):
      v = rng.uniform(0.5, 1.5, size=shape)
    elif key == "fc.weight":
      v = rng.normal(size=shape) * 0.02
    else:
      v = rng.normal(size=shape) * 0.1 + (1.0 if key.endswith("bn.weight") else 0.0)
    state[key] = v.astype(np.float32)
  np.savez(path, **state)


@pytest.mark.slow
def test_reproduce_end_to_end_and_resume(tmp_path, monkeypatch, capsys):
  script = _script()
  torch.manual_seed(0)
  unet = diffusers.UNet2DModel(
      sample_size=32, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
      down_block_types=("DownBlock2D", "AttnDownBlock2D"),
      up_block_types=("AttnUpBlock2D", "UpBlock2D"), flip_sin_to_cos=False,
      freq_shift=1, downsample_padding=0, attention_head_dim=None, norm_eps=1e-6)
  src, workdir = str(tmp_path / "src"), str(tmp_path / "run")
  unet.save_pretrained(os.path.join(src, "unet"))
  diffusers.DDPMScheduler().save_pretrained(os.path.join(src, "scheduler"))
  convert.convert(src, workdir)
  weights = str(tmp_path / "inception.npz")
  _random_inception(weights)
  out = str(tmp_path / "table.md")
  argv = ["--workdir", workdir, "--inception_weights", weights, "--data_dir",
          str(tmp_path / "tfds"), "--num_samples", "10", "--batch_size", "5",
          "--feature_batch_size", "10", "--ddim_steps", "2", "--etas", "1",
          "--ddpm_steps", "3",
          "--out", out]
  monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    assert script.main(argv) == 0
  table = open(out).read()
  lines = [l for l in table.splitlines() if l.startswith("| DD")]
  assert len(lines) == 2
  for line in lines:                     # measured FID and IS are numbers
    cells = [c.strip() for c in line.strip("|").split("|")]
    float(cells[4]), float(cells[6])

  # The rows' settings reach the sampler: chunk 0 of a row is what
  # ddx.sample_fn draws with those settings from the eval seed's first key
  # (η = 1 and quadratic spacing differ from every default).
  model = ckpt_lib.load(workdir)
  key = jax.random.fold_in(jax.random.key(0), 0)
  base = os.path.join(workdir, "eval", "reproduce_cifar10")
  for row, kw in (("ddim_eta1_2_quadratic", dict(sampler="ddim", steps=2, eta=1.0,
                                                   spacing="quadratic", clip_x0=False)),
                  ("ddpm_eta1_3_uniform", dict(sampler="ddpm", steps=3, clip_x0=True,
                                                 ddpm_variance="beta", spacing="uniform"))):
    want = model_lib.to_uint8(model_lib.sample_fn(model, key, num_samples=5, **kw))
    with np.load(os.path.join(base, row, "samples_00000.npz")) as f:
      np.testing.assert_array_equal(f["images"], want)

  # The table's scores are those of these samples: IS recomputed from the
  # Inception logits; FID (two 2048x2048 eigendecompositions, not repeated
  # here) as written beside them.
  images = np.concatenate([
      np.load(os.path.join(base, "ddpm_eta1_3_uniform", f"samples_0000{c}.npz"))["images"]
      for c in (0, 1)])
  _, logits = inception.features(inception.load_weights(weights), images, batch_size=10)
  got = json.load(open(os.path.join(base, "ddpm_eta1_3_uniform", "metrics_10.json")))
  assert got["is"] == pytest.approx(evaluation.inception_score(logits)[0], rel=1e-4)
  assert f"| {got['fid']:.2f} |" in lines[1] and got["fid"] > 0
  with np.load(os.path.join(workdir, "eval", "reference_cifar10.npz")) as f:
    assert int(f["num_images"]) == 12           # every mock CIFAR-10 image

  # A second run resumes: no sampling, no feature extraction, the same table.
  def fail(*a, **k):
    raise AssertionError("a finished row was recomputed")
  monkeypatch.setattr(model_lib, "sample_fn", fail)
  monkeypatch.setattr(inception, "features", fail)
  capsys.readouterr()
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    assert script.main(argv) == 0
  assert open(out).read() == table
  assert capsys.readouterr().out.count("scores reused") == 2


def test_missing_inception_weights_is_one_line_exit_2(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  src = str(tmp_path / "src")
  torch.manual_seed(0)
  diffusers.UNet2DModel(sample_size=32, block_out_channels=(8, 16), layers_per_block=1,
                        norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(src)
  convert.convert(src, workdir)
  capsys.readouterr()
  code = _script().main(["--workdir", workdir, "--inception_weights",
                         str(tmp_path / "none.npz")])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "none.npz does not exist" in err[0]
