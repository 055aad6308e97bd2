"""Metrics against SciPy/NumPy references and sanity orderings; sample grids."""
import os

import numpy as np
import pytest
from scipy import linalg
from scipy.ndimage import uniform_filter

from ddx import evaluation


def _fd_reference(mu1, s1, mu2, s2):
  covmean = linalg.sqrtm(s1 @ s2).real
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_matches_scipy_sqrtm():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(500, 16))
  b = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
  s_a, s_b = evaluation.feature_stats(a), evaluation.feature_stats(b)
  got = evaluation.frechet_distance(*s_a, *s_b)
  assert got == pytest.approx(_fd_reference(*s_a, *s_b), rel=1e-6)
  assert evaluation.frechet_distance(*s_a, *s_a) == pytest.approx(0.0, abs=1e-8)
  # Closed form for diagonal Gaussians: |Δμ|² + Σ (σ1 - σ2)².
  d = evaluation.frechet_distance(np.zeros(3), np.diag([1.0, 4.0, 9.0]),
                                  np.ones(3), np.diag([4.0, 4.0, 1.0]))
  assert d == pytest.approx(3 + 1 + 0 + 4)


def test_frechet_distance_singular_covariance_is_finite():
  rng = np.random.default_rng(1)
  a = rng.normal(size=(10, 32))   # N < D: rank-deficient covariance
  b = rng.normal(size=(10, 32))
  d = evaluation.frechet_distance(*evaluation.feature_stats(a), *evaluation.feature_stats(b))
  assert np.isfinite(d) and d > 0


def test_kid_is_unbiased_on_identical_distributions():
  rng = np.random.default_rng(2)
  a, b = rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8))
  mean, std = evaluation.kid(a, b, num_subsets=50, subset_size=200)
  assert abs(mean) < 3 * std / np.sqrt(50) + 1e-3
  shifted, _ = evaluation.kid(a, b + 0.5, num_subsets=50, subset_size=200)
  assert shifted > 10 * abs(mean) and shifted > 0.01


def test_inception_score_limits():
  assert evaluation.inception_score(np.zeros((100, 10)), splits=10)[0] == pytest.approx(1.0)
  confident = np.eye(10)[np.arange(1000) % 10] * 50.0   # sure and evenly spread
  assert evaluation.inception_score(confident, splits=10)[0] == pytest.approx(10.0, rel=1e-3)


@pytest.fixture(scope="module")
def digits():
  from sklearn.datasets import load_digits
  real = np.round(load_digits().images * 255 / 16).astype(np.uint8)[..., None]
  return evaluation.DigitsMetric(), real[evaluation.DIGITS_TRAIN:]


def test_digits_metric_prefers_real_digits_to_noise_and_blur(digits):
  metric, heldout = digits
  assert metric.heldout_accuracy > 0.9
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, heldout.shape).astype(np.uint8)
  blurred = np.stack([uniform_filter(im[..., 0].astype(float), 3) for im in heldout])
  blurred = np.round(blurred)[..., None].astype(np.uint8)
  real_s, noise_s, blur_s = (metric.score(x) for x in (heldout, noise, blurred))
  assert real_s["fd"] < 1e-6
  for other in (noise_s, blur_s):
    assert other["fd"] > 50 * max(real_s["fd"], 1.0)
    assert other["confident"] < real_s["confident"]
    assert other["class_entropy"] < real_s["class_entropy"]
  one_class = np.repeat(heldout[:1], 50, axis=0)
  assert metric.score(one_class)["class_entropy"] == pytest.approx(0.0, abs=1e-9)
  with pytest.raises(ValueError, match="8, 8, 1"):
    metric.score(np.zeros((4, 16, 16, 1), np.uint8))


def test_make_grid_layout():
  imgs = np.stack([np.full((8, 8, 1), k, np.uint8) for k in range(5)])
  g = evaluation.make_grid(imgs, ncols=3, pad=1, scale=2)
  assert g.shape == (2 * 17 + 1, 3 * 17 + 1, 1)
  assert g[1, 1, 0] == 0 and g[1, 18, 0] == 1 and g[18, 18, 0] == 4
  assert g[18, 35, 0] == 0   # the empty sixth cell stays black


def test_digits_classifier_is_cached_and_equals_sklearn(digits, tmp_path, monkeypatch):
  from sklearn.neural_network import MLPClassifier
  metric, heldout = digits
  fitted = []
  real_fit = MLPClassifier.fit
  monkeypatch.setattr(MLPClassifier, "fit",
                      lambda self, *a: fitted.append(self) or real_fit(self, *a))
  path = str(tmp_path / "eval" / "digits_classifier.npz")
  first = evaluation.DigitsMetric(path)
  assert len(fitted) == 1 and os.path.exists(path)
  # The NumPy forward pass is sklearn's predict_proba.
  x = heldout.reshape(len(heldout), 64) / 255.0
  np.testing.assert_allclose(first.predict_proba(x), fitted[0].predict_proba(x),
                             rtol=1e-10, atol=1e-12)
  cached = evaluation.DigitsMetric(path)
  assert len(fitted) == 1   # read back, not refitted
  rng = np.random.default_rng(3)
  noisy = np.clip(heldout + rng.integers(-40, 40, heldout.shape), 0, 255).astype(np.uint8)
  assert cached.score(noisy) == metric.score(noisy) == first.score(noisy)
  # A damaged cache (say, a kill mid-write) reads as absent: refitted, not trusted.
  with open(path, "wb") as f:
    f.write(b"PK\x03\x04 truncated")
  assert evaluation.DigitsMetric._read_cache(path) is None
