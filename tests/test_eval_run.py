"""Evaluation runs: config checks, resumable sample chunks, reference stats, --mode eval."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np

import pytest

from ddx import config as config_lib
from ddx import eval_run
from ddx import evaluation
from ddx import model as model_lib
from ddx import train
from ddx import workdir as workdir_lib
from testutils import ROOT, load_config, random_model


def test_eval_config_errors_are_one_line(tmp_path):
  def check(pattern, **eval_kv):
    c = load_config()
    for k, v in eval_kv.items():
      c.eval[k] = v
    with pytest.raises(config_lib.ConfigError, match=pattern) as info:
      config_lib.validate(c)
    assert "\n" not in str(info.value)

  check("unknown metric 'fidd'", metrics=("digits", "fidd"))
  check("num_samples=1 must be", num_samples=1)
  check("eval.steps=500", steps=500, every_steps=2)   # checked when eval runs
  check("inception_weights is empty", metrics=("fid",), every_steps=10)
  check("does not exist", metrics=("kid",), every_steps=10,
        inception_weights=str(tmp_path / "none.npz"))
  c = load_config()
  c.data.image_size, c.model.attn_resolutions, c.eval.every_steps = 16, (8,), 5
  with pytest.raises(config_lib.ConfigError, match="scores 8x8 grey digits"):
    config_lib.validate(c)
  # Without in-loop evaluation, CIFAR-10's FID metrics need no weights to train.
  config_lib.validate(load_config("cifar10"))
  with pytest.raises(config_lib.ConfigError, match="inception_weights is empty"):
    config_lib.check_eval_inputs(load_config("cifar10"))
  config_lib.validate(load_config("digits"))


def test_sample_chunks_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
  c = load_config()
  c.eval.num_samples, c.eval.batch_size, c.eval.steps, c.eval.seed = 10, 4, 3, 7
  model = random_model(c)
  out = str(tmp_path / "chunks")
  full = eval_run.sample_chunks(model, c, out, progress=False)
  assert full.shape == (10, 8, 8, 1) and full.dtype == np.uint8
  assert sorted(os.listdir(out)) == [f"samples_0000{i}.npz" for i in range(3)]
  # Chunk c is fold_in(key(seed), c), whatever else was sampled.
  x1 = model_lib.sample_fn(model, jax.random.fold_in(jax.random.key(7), 1), steps=3,
                          num_samples=4, sampler=c.eval.sampler, eta=0.0)
  np.testing.assert_array_equal(full[4:8], model_lib.to_uint8(x1))
  np.testing.assert_array_equal(np.load(eval_run.chunk_path(out, 2))["images"], full[8:])
  assert len(np.unique(full.reshape(10, -1), axis=0)) == 10

  # "Interrupted": chunk 1 never written, chunk 2 half-written.
  os.remove(eval_run.chunk_path(out, 1))
  with open(eval_run.chunk_path(out, 2), "r+b") as f:
    f.truncate(100)
  calls = []
  real = model_lib.sample_fn
  monkeypatch.setattr(model_lib, "sample_fn",
                      lambda *a, **k: calls.append(a[1]) or real(*a, **k))
  resumed = eval_run.sample_chunks(model, c, out, progress=False)
  assert len(calls) == 2   # chunk 0 was reused from disk
  np.testing.assert_array_equal(resumed, full)
  np.testing.assert_array_equal(eval_run.sample_chunks(model, c, None, progress=False), full)
  # Other sampling settings do not reuse the chunks.
  c.eval.eta = 1.0
  calls.clear()
  other = eval_run.sample_chunks(model, c, out, progress=False)
  assert len(calls) == 3 and not np.array_equal(other, full)
  # Nor do other weights with the same settings (a retrain in the same workdir).
  calls.clear()
  retrained = eval_run.sample_chunks(random_model(c, seed=1), c, out, progress=False)
  assert len(calls) == 3 and not np.array_equal(retrained, other)


def test_a_changed_option_never_reuses_an_eval_chunk(tmp_path, capsys):
  """Issue 23: churn 40 after churn 0 was "reused from disk" (not in the chunk key)."""
  c = load_config()
  c.model.ch_mult, c.model.attn_resolutions = (1,), ()   # a quick compile
  c.eval.num_samples = c.eval.batch_size = 2
  # 3 steps: with 2 the churned σ̂ of both steps rounds back to the schedule's
  # σ (σ_max caps the first, the second rounds down to σ_min), so churn changes nothing.
  c.eval.sampler, c.eval.steps = "stochastic", 3
  model = random_model(c)   # its saved config has churn 0
  out = str(tmp_path / "chunks")
  first = eval_run.sample_chunks(model, c, out)
  c.sampling.churn = 40.0   # on the command line
  second = eval_run.sample_chunks(model, c, out)
  third = eval_run.sample_chunks(model, c, out)
  log = capsys.readouterr().out.splitlines()
  assert [l.split("(")[1].split(")")[0] for l in log] == [
      "chunk 1/1 sampled", "chunk 1/1 sampled", "chunk 1/1 reused from disk"]
  assert not np.array_equal(first, second) and np.array_equal(second, third)
  # Every option is in the key.
  options = eval_run.eval_options(model, c)
  key = eval_run._settings(options, c.eval, model)
  for f in dataclasses.fields(options):
    v = getattr(options, f.name)
    other = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: 2.0 if v == 1.0 else 1.0,
             str: lambda v: v + "x", tuple: lambda v: (1.0, 2.0) if v != (1.0, 2.0) else ()
             }[type(v)](v)
    assert eval_run._settings(options.replace(**{f.name: other}), c.eval, model) != key


@pytest.fixture(scope="module")
def classifier_cache(tmp_path_factory):
  """The digits classifier, fitted once for this module and cached."""
  path = str(tmp_path_factory.mktemp("clf") / "digits_classifier.npz")
  evaluation.DigitsMetric(path)
  return path


def test_reference_stats_cover_every_image_and_are_cached(tmp_path, classifier_cache):
  c = load_config()
  metric = evaluation.DigitsMetric(classifier_cache)
  calls = []

  def fn(u8):
    calls.append(len(u8))
    return metric.features(u8)
  ext = eval_run.Extractor("digits-mlp", fn)
  path = str(tmp_path / "eval" / "ref.npz")
  ref = eval_run.reference_stats(c, ext, path, batch_size=500, progress=False)
  assert calls == [500, 500, 500, 297]   # 1,797 digits, the partial batch included
  from sklearn.datasets import load_digits
  allu8 = np.round(load_digits().images * 255 / 16).astype(np.uint8)[..., None]
  feats = metric.features(allu8)[0]
  mu, sigma = evaluation.feature_stats(feats)
  assert ref["num_images"] == 1797
  np.testing.assert_allclose(ref["mu"], mu, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(ref["sigma"], sigma, rtol=1e-8, atol=1e-10)
  np.testing.assert_allclose(ref["kid_features"], feats.astype(np.float32))
  # The digits logits' own "Inception Score" is stored with the stats.
  assert ref["is_mean"] == pytest.approx(evaluation.inception_score(
      metric.features(allu8)[1])[0], rel=1e-5)

  calls.clear()
  again = eval_run.reference_stats(c, ext, path, progress=False)
  assert calls == [] and np.array_equal(again["sigma"], ref["sigma"])
  with pytest.raises(config_lib.ConfigError, match="holds statistics of .*digits-mlp"):
    eval_run.reference_stats(c, eval_run.Extractor("inception-fid:0", fn), path)
  c.data.image_size = 16
  with pytest.raises(config_lib.ConfigError, match="delete it"):
    eval_run.reference_stats(c, ext, path)


def test_fid_kid_is_scores_with_a_stand_in_extractor(tmp_path, classifier_cache):
  """The fid/kid/is wiring, with the digits classifier standing in for Inception."""
  c = load_config()
  c.eval.metrics, c.eval.kid_subset_size, c.eval.kid_subsets = ("fid", "kid", "is"), 200, 10
  metric = evaluation.DigitsMetric(classifier_cache)
  ev = eval_run.Evaluator(c, str(tmp_path), extractor=eval_run.digits_extractor(metric))
  from sklearn.datasets import load_digits
  allu8 = np.round(load_digits().images * 255 / 16).astype(np.uint8)[..., None]
  held = allu8[evaluation.DIGITS_TRAIN:]
  got = ev.scores(held)
  assert os.path.exists(tmp_path / "eval" / "reference_digits.npz")
  feats, logits = metric.features(held)
  mu, sigma = evaluation.feature_stats(metric.features(allu8)[0])
  want = evaluation.frechet_distance(*evaluation.feature_stats(feats), mu, sigma)
  assert got["fid"] == pytest.approx(want, rel=1e-5) and 0 < got["fid"] < 5
  assert got["is"] == pytest.approx(evaluation.inception_score(logits)[0], rel=1e-9)
  # KID against every digit's features (fewer than KID_REFERENCE_SIZE are kept whole).
  want_kid = evaluation.kid(feats, metric.features(allu8)[0], num_subsets=10, subset_size=200)
  assert (got["kid"], got["kid_std"]) == pytest.approx(want_kid, rel=1e-5)
  noise = np.random.default_rng(0).integers(0, 256, held.shape).astype(np.uint8)
  bad = ev.scores(noise)
  assert bad["fid"] > 20 * got["fid"] and bad["kid"] > 20 * got["kid"] > 0
  assert set(got) == {"fid", "kid", "kid_std", "is", "is_std"}


@pytest.fixture(scope="module")
def run_with_in_loop_eval(tmp_path_factory, classifier_cache):
  """configs/test.py for 6 steps with the digits metric every 3 steps."""
  workdir = str(tmp_path_factory.mktemp("evalrun") / "wd")
  workdir_lib.mark(workdir)   # a ddx workdir, seeded with the cached classifier
  os.makedirs(os.path.join(workdir, "eval"))   # the run reads the cached classifier
  shutil.copy(classifier_cache, os.path.join(workdir, "eval", "digits_classifier.npz"))
  c = load_config()
  c.training.sample_every = 0
  c.eval.every_steps, c.eval.metrics = 3, ("digits",)
  c.eval.num_samples, c.eval.batch_size, c.eval.steps = 12, 6, 4
  train.train_and_evaluate(c, workdir)
  return c, workdir


@pytest.mark.slow
def test_in_loop_eval_and_mode_eval_agree(run_with_in_loop_eval, capsys):
  c, workdir = run_with_in_loop_eval
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    recs = [json.loads(l) for l in f]
  evals = [r for r in recs if "eval/digits_fd" in r]
  assert [r["step"] for r in evals] == [3, 6]
  for r in evals:
    assert r["eval/digits_fd"] > 0 and 0 <= r["eval/digits_confident"] <= 1
    assert 0 <= r["eval/digits_class_entropy"] <= np.log(10) + 1e-9

  metrics = eval_run.evaluate(c, workdir)   # --mode eval on the final checkpoint
  out_dir = os.path.join(workdir, "eval", "step_0000006_ddim4")
  assert sorted(f for f in os.listdir(out_dir) if f.startswith("samples")) == [
      "samples_00000.npz", "samples_00001.npz"]
  assert "eval: samples 12/12 (chunk 2/2 sampled)" in capsys.readouterr().out
  # Same EMA weights, seed and settings: the same scores as the in-loop eval.
  for k in ("digits_fd", "digits_confident", "digits_class_entropy"):
    assert metrics[k] == pytest.approx(evals[-1][f"eval/{k}"], rel=1e-6, abs=1e-9)
  with open(os.path.join(out_dir, "metrics_12.json")) as f:
    assert json.load(f)["step"] == 6
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    last = json.loads(f.readlines()[-1])
  assert last["step"] == 6 and last["eval/digits_fd"] == pytest.approx(metrics["digits_fd"])
  # A second --mode eval reuses every chunk.
  eval_run.evaluate(c, workdir)
  assert "(chunk 2/2 reused from disk)" in capsys.readouterr().out


@pytest.mark.slow
def test_mode_eval_bad_weights_is_one_line_exit_2(run_with_in_loop_eval, tmp_path):
  _, workdir = run_with_in_loop_eval
  junk = tmp_path / "w.npz"
  junk.write_bytes(b"not weights")
  r = subprocess.run(
      [sys.executable, "-m", "ddx.main", "--config", "configs/test.py", "--workdir",
       workdir, "--mode", "eval", "--config.eval.metrics=('fid',)",
       f"--config.eval.inception_weights={junk}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  lines = [l for l in r.stderr.splitlines() if l.startswith("ddx: error:")]
  assert len(lines) == 1 and "cannot read Inception weights" in lines[0], r.stderr[-2000:]
  c = load_config()
  c.eval.metrics, c.eval.inception_weights = ("fid",), str(tmp_path / "missing.npz")
  with pytest.raises(config_lib.ConfigError, match="missing.npz does not exist"):
    eval_run.evaluate(c, workdir)
