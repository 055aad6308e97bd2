"""The run's ADM metrics (sfid, precision, recall, ADM's IS) against a dataset or an
ADM reference batch (eval.reference), and the sample batch --mode eval writes.

A stand-in network keeps this cheap: the digits classifier's 64 hidden units
as "pool3", its logits, and a fixed projection of the pixels as "spatial".
"""
import os

import numpy as np
import pytest

from ddx import batch_files
from ddx import config as config_lib
from ddx import eval_run
from ddx import evaluation
from testutils import load_config, random_model

_PROJ = np.random.default_rng(5).normal(size=(64, 12))


@pytest.fixture(scope="module")
def classifier_cache(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("clf") / "digits_classifier.npz")
  evaluation.DigitsMetric(path)
  return path


@pytest.fixture(scope="module")
def stand_in(classifier_cache):
  metric = evaluation.DigitsMetric(classifier_cache)

  def fn(u8):
    pool, logits = metric.features(u8)
    spatial = u8.reshape(len(u8), -1).astype(np.float64) / 255 @ _PROJ
    return pool, logits, spatial
  return eval_run.Extractor("stand-in", fn), metric


def _digits_u8():
  from sklearn.datasets import load_digits
  return np.round(load_digits().images * 255 / 16).astype(np.uint8)[..., None]


def _config(metrics, **eval_kv):
  c = load_config()
  c.eval.metrics = metrics
  for k, v in eval_kv.items():
    c.eval[k] = v
  return c


def test_an_adm_reference_batch_is_what_the_metrics_compare_with(stand_in, tmp_path):
  ext, _ = stand_in
  digits = _digits_u8()
  ref_images, samples = digits[:600], digits[600:900]
  ref_path = str(tmp_path / "ref.npz")
  batch_files.write_batch(ref_path, ref_images)
  c = _config(("fid", "kid", "is", "sfid", "precision", "recall"), reference=ref_path,
              kid_subset_size=100, kid_subsets=5, inception_protocol="adm")
  got = eval_run.Evaluator(c, str(tmp_path / "wd"), extractor=ext).scores(samples)

  s_pool, s_logits, s_spatial = ext.fn(samples)
  r_pool, _, r_spatial = ext.fn(ref_images)
  ev = eval_run.Evaluator(c, str(tmp_path / "wd"), extractor=ext)
  ev.setup()   # reads the cached reference features back
  for space, feats in (("pool", r_pool), ("spatial", r_spatial)):
    # The streamed statistics are NumPy's two-pass ones up to float64 rounding
    # of sums of n terms of size max|f - mean|² (the sums run about a shift).
    mu, sigma = ev._reference_stats(space)
    want_mu, want_sigma = evaluation.feature_stats(feats)
    scale = np.abs(feats - want_mu).max() ** 2
    np.testing.assert_allclose(mu, want_mu, rtol=0, atol=4 * len(feats) * 2e-16 * np.abs(feats).max())
    np.testing.assert_allclose(sigma, want_sigma, rtol=0, atol=4 * len(feats) * 2e-16 * scale)
  stats = lambda a: evaluation.feature_stats(a)
  assert got["fid"] == evaluation.frechet_distance(*stats(s_pool), *ev._reference_stats("pool"))
  assert got["sfid"] == evaluation.frechet_distance(*stats(s_spatial),
                                                    *ev._reference_stats("spatial"))
  assert (got["precision"], got["recall"]) == evaluation.precision_recall(r_pool, s_pool)
  assert got["is"] == evaluation.inception_score_adm(s_logits)   # ADM's: one number
  assert (got["kid"], got["kid_std"]) == pytest.approx(
      evaluation.kid(s_pool, r_pool.astype(np.float32), num_subsets=5, subset_size=100),
      rel=1e-12)   # every reference image's features, kept as float32
  assert set(got) == {"fid", "kid", "kid_std", "is", "sfid", "precision", "recall"}

  # Stored statistics win over the images' own (ADM's evaluator prefers them).
  mu, sigma = evaluation.feature_stats(s_pool)
  with_stats = str(tmp_path / "ref_stats.npz")
  np.savez(with_stats, arr_0=ref_images, mu=mu, sigma=sigma)
  c.eval.reference, c.eval.metrics = with_stats, ("fid", "sfid")
  again = eval_run.Evaluator(c, str(tmp_path / "wd2"), extractor=ext).scores(samples)
  assert again["fid"] == pytest.approx(0.0, abs=1e-9)
  assert again["sfid"] == pytest.approx(got["sfid"], rel=1e-9)


def test_dataset_reference_for_precision_recall_and_sfid(stand_in, tmp_path):
  ext, metric = stand_in
  digits = _digits_u8()
  samples = digits[1000:1300]
  c = _config(("sfid", "precision", "recall"))
  wd = str(tmp_path / "wd")
  got = eval_run.Evaluator(c, wd, extractor=ext).scores(samples)
  s_pool, _, s_spatial = ext.fn(samples)
  a_pool, _, a_spatial = ext.fn(digits)   # all 1,797 digits: fewer than PR_REFERENCE_SIZE
  assert (got["precision"], got["recall"]) == evaluation.precision_recall(a_pool, s_pool)
  ev = eval_run.Evaluator(c, wd, extractor=ext)
  ev.setup()
  mu, sigma = ev._reference_stats("spatial")
  np.testing.assert_allclose(mu, a_spatial.mean(0), rtol=0, atol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(a_spatial, rowvar=False), rtol=0, atol=1e-12)
  assert got["sfid"] == evaluation.frechet_distance(*evaluation.feature_stats(s_spatial),
                                                    mu, sigma)
  cached = [f for f in os.listdir(os.path.join(wd, "eval")) if f.startswith("reference_features_")]
  assert len(cached) == 1
  # Noise lies off the digits' manifold: far less precision.
  noise = np.random.default_rng(0).integers(0, 256, samples.shape).astype(np.uint8)
  bad = eval_run.Evaluator(c, wd, extractor=ext).scores(noise)
  assert bad["precision"] < 0.5 * got["precision"] and bad["sfid"] > 5 * got["sfid"]


def test_digits_metric_precision_recall_against_the_held_out_digits(stand_in):
  _, metric = stand_in
  digits = _digits_u8()
  got = metric.score(digits[:500])
  held = metric.ref_features
  want = evaluation.precision_recall(held, metric.features(digits[:500])[0])
  assert (got["precision"], got["recall"]) == want and got["precision"] > 0.5


def test_eval_writes_one_adm_batch_with_labels(tmp_path, classifier_cache):
  c = load_config()
  c.model.ch_mult, c.model.attn_resolutions, c.model.num_classes = (1,), (), 3
  c.eval.num_samples, c.eval.batch_size, c.eval.steps = 5, 4, 2
  c.eval.metrics, c.eval.save_batch = ("digits",), True
  wd = tmp_path / "wd"
  os.makedirs(wd / "eval")
  import shutil
  shutil.copy(classifier_cache, wd / "eval" / "digits_classifier.npz")
  model = random_model(c)
  out = str(tmp_path / "out")
  metrics = eval_run.Evaluator(c, str(wd))(model, 0, out_dir=out)
  batch = batch_files.read_batch(eval_run.batch_file(out, (5, 8, 8, 1)))
  images, labels = eval_run.sample_batch(model, c, out, progress=False)
  np.testing.assert_array_equal(batch.images, images)
  np.testing.assert_array_equal(batch.labels, [0, 1, 2, 0, 1])
  assert "digits_precision" in metrics and "digits_recall" in metrics


def test_reference_and_dinov2_keys_are_one_line_errors(tmp_path):
  for kv, needle in (({"metrics": ("fd_dinov2",)}, "eval.dinov2_weights is empty"),
                     ({"metrics": ("fd_dinov2",), "dinov2_weights": str(tmp_path / "x")},
                      "is not a folder"),
                     ({"reference": str(tmp_path / "none.npz")}, "does not exist"),
                     ({"inception_protocol": "tf"}, "inception_protocol='tf' is unknown")):
    c = _config(kv.pop("metrics", ("digits",)), **kv)
    with pytest.raises(config_lib.ConfigError, match=needle) as info:
      config_lib.validate(c)
      config_lib.check_eval_inputs(c)
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
  """A converted-DINOv2 folder of a 1-block, 32-wide ViT/14 with random weights."""
  import jax
  from ddx.encoders import dinov2
  cfg = dinov2.Dinov2Config(hidden_size=32, depth=1, num_heads=2, pos_grid=16)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32) * 0.2,
                        dinov2.abstract_params(cfg))
  folder = str(tmp_path_factory.mktemp("enc") / "dinov2")
  dinov2.save(folder, cfg, params)
  return folder


def test_fd_dinov2_compares_dinov2_cls_features(tmp_path, tiny_dinov2):
  """fd_dinov2 of a run against an ADM reference batch: the Fréchet distance of
  the CLS tokens a converted DINOv2 gives after dgm-eval's preprocessing."""
  from ddx.encoders import dinov2
  folder = tiny_dinov2
  digits = _digits_u8()
  ref_path = str(tmp_path / "ref.npz")
  batch_files.write_batch(ref_path, digits[:30])
  c = _config(("fd_dinov2",), reference=ref_path, dinov2_weights=folder,
              feature_batch_size=40)
  ev = eval_run.Evaluator(c, str(tmp_path / "wd"))
  got = ev.scores(digits[100:120])
  enc = dinov2.load(folder)
  cls = lambda u8: np.asarray(dinov2.features(enc, dinov2.preprocess_pil(u8))["cls"])
  want_mu, want_sigma = evaluation.feature_stats(cls(digits[:30]))
  mu, sigma = ev._reference_stats("dinov2")
  feats = cls(digits[:30])
  np.testing.assert_allclose(mu, want_mu, rtol=0, atol=4 * 30 * 2e-16 * np.abs(feats).max())
  np.testing.assert_allclose(sigma, want_sigma, rtol=0,
                             atol=4 * 30 * 2e-16 * np.abs(feats - want_mu).max() ** 2)
  assert got["fd_dinov2"] == evaluation.frechet_distance(
      *evaluation.feature_stats(cls(digits[100:120])), mu, sigma)
  assert got["fd_dinov2"] > 0 and set(got) == {"fd_dinov2"}


def test_evaluate_cli_prints_fd_dinov2(tmp_path, tiny_dinov2, stand_in, capsys):
  """python -m ddx.evaluate --dinov2_weights adds FD-DINOv2 after ADM's five lines,
  equal to the run's fd_dinov2 of the same images; a bad folder is one line, exit 2."""
  from ddx import evaluate
  ext, _ = stand_in
  digits = np.repeat(_digits_u8(), 3, axis=-1)   # RGB, as ADM batches are
  s_path, r_path = str(tmp_path / "s.npz"), str(tmp_path / "r.npz")
  batch_files.write_batch(s_path, digits[100:120])
  batch_files.write_batch(r_path, digits[:30])
  grey = lambda u8: u8[..., :1]   # the stand-in scores grey digits
  cli = evaluate.Extractor(features=lambda u8: (ext.fn(grey(u8))[0], ext.fn(grey(u8))[2]),
                           logits=lambda pool: pool[:, :10])
  assert evaluate.main([s_path, r_path, "--dinov2_weights", tiny_dinov2], extractor=cli) == 0
  lines = capsys.readouterr().out.splitlines()
  assert [l.split(":")[0] for l in lines] == list(evaluate.LABELS) + ["FD-DINOv2"]
  c = _config(("fd_dinov2",), reference=r_path, dinov2_weights=tiny_dinov2,
              feature_batch_size=64)
  run = eval_run.Evaluator(c, str(tmp_path / "wd")).scores(digits[100:120])
  # The two differ only in how the reference covariance is summed (np.cov vs a
  # stream about a shift): entries within δ = 4 n eps max|f - mu|², which moves
  # the trace of the matrix square root by at most D sqrt(δ) per side.
  feats = eval_run.dinov2_extractor(tiny_dinov2).fn(digits[:30])[0].astype(np.float64)
  delta = 4 * 30 * 2.3e-16 * np.abs(feats - feats.mean(0)).max() ** 2
  tol = 2 * feats.shape[1] * np.sqrt(delta)
  assert abs(float(lines[-1].split(": ")[1]) - run["fd_dinov2"]) <= tol
  assert evaluate.main([s_path, r_path, "--dinov2_weights", str(tmp_path)],
                       extractor=cli) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("ddx.evaluate: error:")
