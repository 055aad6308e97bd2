"""Sample grids and sample-quality metrics (FID/KID/IS, precision/recall, the digits metric).

The Inception network behind FID lives in ddx/inception.py; the evaluation
run (sampling, reference statistics, metrics) in ddx/eval_run.py.
"""
from __future__ import annotations

import math
import os
import zipfile
from typing import Optional

import numpy as np
from etils import epath
from PIL import Image


def make_grid(images: np.ndarray, ncols: Optional[int] = None, pad: int = 1,
              scale: Optional[int] = None) -> np.ndarray:
  """Tiles images into one picture.

  Args:
    images: [N, H, W, C] uint8.
    ncols: images per row (default: the smallest square that fits N).
    pad: pixels of black between images.
    scale: integer nearest-neighbour upscaling; default makes each tile at
      least 32 px so 8x8 digits are visible.
  Returns:
    [rows·(H·scale+pad)+pad, ncols·(W·scale+pad)+pad, C] uint8.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
  n, h, w, c = images.shape
  if scale is None:
    scale = max(1, 32 // max(h, w))
  if scale > 1:
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
  ncols = ncols or math.ceil(math.sqrt(n))
  nrows = math.ceil(n / ncols)
  grid = np.zeros((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.uint8)
  for k in range(n):
    r, q = divmod(k, ncols)
    y, x = pad + r * (h + pad), pad + q * (w + pad)
    grid[y:y + h, x:x + w] = images[k]
  return grid


def save_grid(images: np.ndarray, path: Optional[str], **kwargs) -> np.ndarray:
  """Writes make_grid(images) as a PNG (atomically) and returns the grid.

  path None only builds the grid (e.g. on processes other than 0).
  """
  grid = make_grid(images, **kwargs)
  if path is not None:   # local or gs:// (etils.epath)
    path = epath.Path(path)
    tmp = epath.Path(str(path) + ".tmp.png")
    with tmp.open("wb") as f:
      Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(f, format="PNG")
    tmp.replace(path)
  return grid


# --------------------------------------------------------------------------
# Sample-quality metrics over feature arrays (NumPy; testable without a network).

# Names accepted in config.eval.metrics (ddx/eval_run.py computes them).
METRICS = ("digits", "fid", "kid", "is", "sfid", "precision", "recall", "fd_dinov2",
           "bpd")   # = ddx.config.METRICS (tested)
# These need eval.inception_weights.
INCEPTION_METRICS = ("fid", "kid", "is", "sfid", "precision", "recall")


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and covariance [D, D] (unbiased, float64) of features [N, D]."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"features must be [N >= 2, D], got {f.shape}")
  return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (the FID formula).

  d² = |mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr((S1^½ S2 S1^½)^½). The cross term
  is computed from the symmetric PSD matrix S1^½ S2 S1^½ with eigh, so it needs
  no complex sqrtm and stays stable for singular covariances (few samples).
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  w1, v1 = np.linalg.eigh((s1 + s1.T) / 2)
  root1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
  m = root1 @ s2 @ root1
  w = np.linalg.eigvalsh((m + m.T) / 2)
  cross = np.sum(np.sqrt(np.clip(w, 0, None)))
  d2 = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross
  return float(max(d2, 0.0))


def kid(f1: np.ndarray, f2: np.ndarray, num_subsets: int = 100,
        subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
  """Kernel Inception Distance: unbiased MMD² with k(x, y) = (x·y/D + 1)³.

  Averaged over random subsets (without replacement within a subset).
  Returns:
    (mean, std) over the subsets.
  """
  f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
  d = f1.shape[1]
  m = min(subset_size, len(f1), len(f2))
  rng = np.random.default_rng(seed)
  vals = []
  for _ in range(num_subsets):
    x = f1[rng.choice(len(f1), m, replace=False)]
    y = f2[rng.choice(len(f2), m, replace=False)]
    kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3,
                     (x @ y.T / d + 1) ** 3)
    off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))
    vals.append(off(kxx) + off(kyy) - 2 * kxy.mean())
  return float(np.mean(vals)), float(np.std(vals))


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
  """IS = exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` parts.

  The split convention of improved-gan's original code (Salimans et al.
  2016), torch-fidelity and torchmetrics: `splits` near-equal parts
  (np.array_split), every image counted. ADM's evaluator, and the papers
  that report its numbers (ADM, DiT, SiT, REPA, LightningDiT), use
  `inception_score_adm`. Those codes also drop the classifier's bias
  (`ddx.inception.adm_logits`); the logits from `ddx.inception.features`
  include it.
  """
  logits = np.asarray(logits, np.float64)
  z = logits - logits.max(1, keepdims=True)
  p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
  scores = []
  for part in np.array_split(p, splits):
    py = part.mean(0, keepdims=True)
    kl = np.sum(part * (np.log(part + 1e-12) - np.log(py + 1e-12)), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


ADM_IS_SPLIT = 5000   # guided-diffusion's compute_inception_score(split_size=5000)


def inception_score_adm(logits: np.ndarray, split_size: int = ADM_IS_SPLIT) -> float:
  """The Inception Score as ADM's evaluator computes it (guided-diffusion).

  Contiguous chunks of `split_size` rows in the given order (50,000 samples
  make ten), the last chunk being whatever remains, however small; each
  chunk scores exp(mean_x KL(p(y|x) || mean p(y))) and the result is the
  plain mean over chunks (ADM reports no spread). ADM's logits are pool3 @
  softmax/weights without the bias (`ddx.inception.adm_logits`), softmaxed
  over all 1008 classes. ADM computes in float32 with np.log(p) and no
  epsilon; this computes in float64 from log-softmax, which agrees to
  float32 rounding and gives 0 (not NaN) for probabilities that underflow.

  Args:
    logits: [N, C] class logits.
    split_size: rows per chunk.
  Returns:
    The score (1 <= IS <= C).
  """
  z = np.asarray(logits, np.float64)
  if z.ndim != 2 or len(z) == 0:
    raise ValueError(f"logits must be [N >= 1, C], got {z.shape}")
  if split_size < 1:
    raise ValueError(f"split_size must be >= 1, got {split_size}")
  zmax = z.max(1, keepdims=True)
  logp = z - zmax - np.log(np.exp(z - zmax).sum(1, keepdims=True))
  scores = []
  for start in range(0, len(z), split_size):
    lp = logp[start:start + split_size]
    p = np.exp(lp)
    log_py = np.log(p.mean(0))
    kl = np.sum(np.where(p > 0, p * (lp - log_py), 0.0), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores))


# --------------------------------------------------------------------------
# Improved precision and recall (Kynkäänniemi et al. 2019), as ADM computes it.

# ADM's ManifoldEstimator defaults: the pairwise-distance block is
# row_batch_size x col_batch_size (memory, not results, depends on them).
PR_ROW_BATCH = 10000
PR_COL_BATCH = 10000


def _as_features(x, name: str) -> np.ndarray:
  f = np.asarray(x)
  if f.ndim != 2 or len(f) == 0:
    raise ValueError(f"{name} must be [N >= 1, D], got {f.shape}")
  return np.ascontiguousarray(f, np.float32)


def _squared_distances(u, u_sq, v, v_sq) -> np.ndarray:
  """ADM's pairwise block max(|u|² - 2 u·v + |v|², 0), float32 [len(u), len(v)].

  Squared distances throughout, as ADM compares them (squared distance <=
  squared radius is the same test as with plain ones). Built in place: the
  block is the only buffer of its size.
  """
  d = u @ v.T
  d *= -2.0
  d += u_sq[:, None]
  d += v_sq[None, :]
  return np.maximum(d, 0.0, out=d)


def manifold_radii(features: np.ndarray, k: int = 3,
                   row_batch_size: int = PR_ROW_BATCH,
                   col_batch_size: int = PR_COL_BATCH) -> np.ndarray:
  """Each point's squared distance to its k-th nearest neighbour in the set.

  ADM's ManifoldEstimator.manifold_radii with nhood_sizes=(k,): the k-th
  smallest value (0-based, np.partition's kth=k) of the point's row of
  squared distances to every point of the set, itself included at distance
  ~0 (the expansion's rounding, clipped at 0). So the point counts as its own
  nearest neighbour, an exact duplicate counts as another neighbour at
  distance ~0 (a row with k copies has radius ~0, exactly 0 on grids), and
  ties are order-free since only the value at rank k is read. The rank-k
  value is found blockwise by keeping each row's k + 1 smallest values, so
  memory is row_batch_size x (col_batch_size + k + 1) floats where ADM holds
  whole rows; the value, and hence the radii, do not depend on the batching.

  Args:
    features: [N, D] (cast to float32, as ADM's features are), N > k.
    k: the neighbourhood size (ADM: 3).
    row_batch_size, col_batch_size: the distance block's shape.
  Returns:
    float32 [N] squared radii.
  """
  f = _as_features(features, "features")
  n = len(f)
  if n <= k:
    raise ValueError(f"a k={k} nearest-neighbour radius needs more than {k} "
                     f"feature rows, got {n}")
  sq = np.einsum("ij,ij->i", f, f)
  radii = np.empty(n, np.float32)
  for r in range(0, n, row_batch_size):
    rows = slice(r, r + row_batch_size)
    best = None   # each row's k + 1 smallest distances so far
    for c in range(0, n, col_batch_size):
      cols = slice(c, c + col_batch_size)
      d = _squared_distances(f[rows], sq[rows], f[cols], sq[cols])
      cand = d if best is None else np.concatenate([best, d], axis=1)
      best = np.partition(cand, k, axis=1)[:, :k + 1] if cand.shape[1] > k + 1 else cand
    radii[rows] = best.max(axis=1)   # the (k+1)-th smallest, rank k
  return radii


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray,
                     k: int = 3, row_batch_size: int = PR_ROW_BATCH,
                     col_batch_size: int = PR_COL_BATCH,
                     real_radii: Optional[np.ndarray] = None) -> tuple[float, float]:
  """Improved precision and recall (Kynkäänniemi et al. 2019) as ADM computes them.

  precision: the fraction of fake points inside some real point's ball
  (squared distance <= that real point's squared k-NN radius, `<=` so a
  point on the boundary is inside); recall: the fraction of real points
  inside some fake point's ball. Radii come from `manifold_radii` (each set's
  own k-NN, the point itself counted). ADM's distance block first runs in
  float16 and falls back to float32 when that overflows; this always uses
  float32 (ADM's fallback), so near-boundary points can differ from ADM's by
  float16 rounding. Results do not depend on the batch sizes.

  Args:
    real_features: [N_real, D] reference features (ADM: pool3 of the
      reference batch's images).
    fake_features: [N_fake, D] sample features.
    k: neighbourhood size (ADM: 3).
    row_batch_size, col_batch_size: the distance block (rows: real points).
    real_radii: `manifold_radii(real_features, k)` when already computed (a
      fixed reference, scored many times).
  Returns:
    (precision, recall), floats in [0, 1].
  """
  real = _as_features(real_features, "real_features")
  fake = _as_features(fake_features, "fake_features")
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f"real and fake features differ in width: {real.shape[1]} vs "
                     f"{fake.shape[1]}; compute both with the same network")
  batches = dict(row_batch_size=row_batch_size, col_batch_size=col_batch_size)
  if real_radii is None:
    real_radii = manifold_radii(real, k, **batches)
  real_radii = np.asarray(real_radii, np.float32)
  if real_radii.shape != (len(real),):
    raise ValueError(f"real_radii must be [{len(real)}], got {real_radii.shape}")
  fake_radii = manifold_radii(fake, k, **batches)
  real_sq, fake_sq = np.einsum("ij,ij->i", real, real), np.einsum("ij,ij->i", fake, fake)
  real_in = np.zeros(len(real), bool)   # recall: covered by some fake ball
  fake_in = np.zeros(len(fake), bool)   # precision: covered by some real ball
  for r in range(0, len(real), row_batch_size):
    rows = slice(r, r + row_batch_size)
    for c in range(0, len(fake), col_batch_size):
      cols = slice(c, c + col_batch_size)
      d = _squared_distances(real[rows], real_sq[rows], fake[cols], fake_sq[cols])
      fake_in[cols] |= (d <= real_radii[rows, None]).any(axis=0)
      real_in[rows] |= (d <= fake_radii[None, cols]).any(axis=1)
  return float(fake_in.mean()), float(real_in.mean())


# --------------------------------------------------------------------------
# A quality metric for the embedded digits default that needs no download.

DIGITS_TRAIN = 1000   # load_digits()[:1000] trains the classifier; the rest is held out


DIGITS_CLASSIFIER_VERSION = 1   # bump when the classifier's recipe changes (cache key)


class DigitsMetric:
  """A small MLP classifier on scikit-learn's digits, used like Inception for FID.

  Trained on the first 1,000 digits (deterministic: fixed seed, full-batch
  L-BFGS); its 64 hidden ReLU units are the feature space. `score` gives
    fd:          Fréchet distance between samples and the 797 held-out digits
    confident:   fraction of samples whose top class probability > 0.9
    class_entropy: entropy (nats) of the predicted-class histogram (max ln 10)

  Args:
    cache_path: an .npz for the fitted weights. When it exists they are read
      back instead of refitting, so a run's scores always come from the same
      classifier (a scikit-learn or BLAS upgrade cannot shift them) and an
      evaluation skips the fit (~1-10 s here). None fits every time.
  """

  def __init__(self, cache_path: Optional[str] = None):
    from ddx.data import load_digits
    images, target = load_digits()
    x = self._prep(images)
    weights = self._read_cache(cache_path) if cache_path else None
    if weights is None:
      weights = self._fit(x[:DIGITS_TRAIN], target[:DIGITS_TRAIN])
      if cache_path:
        self._write_cache(cache_path, weights)
    self.w1, self.b1, self.w2, self.b2 = weights
    pred = self.predict_proba(x[DIGITS_TRAIN:]).argmax(1)
    self.heldout_accuracy = float(np.mean(pred == target[DIGITS_TRAIN:]))
    self.ref_features = self.features_of(x[DIGITS_TRAIN:])
    self.ref_stats = feature_stats(self.ref_features)
    self._ref_radii = None   # the held-out digits' k-NN radii, on first use

  @staticmethod
  def _fit(x: np.ndarray, y: np.ndarray) -> tuple:
    from sklearn.neural_network import MLPClassifier
    clf = MLPClassifier(hidden_layer_sizes=(64,), solver="lbfgs", alpha=1e-3,
                        max_iter=2000, random_state=0)
    clf.fit(x, y)
    return (clf.coefs_[0], clf.intercepts_[0], clf.coefs_[1], clf.intercepts_[1])

  @staticmethod
  def _read_cache(path: str):
    """The cached weights, or None when absent, unreadable or of another version."""
    try:
      with np.load(path, allow_pickle=False) as f:
        if int(f["version"]) != DIGITS_CLASSIFIER_VERSION:
          return None
        w = tuple(np.asarray(f[k], np.float64) for k in ("w1", "b1", "w2", "b2"))
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
      return None
    shapes = ((64, 64), (64,), (64, 10), (10,))
    return w if tuple(a.shape for a in w) == shapes else None

  @staticmethod
  def _write_cache(path: str, weights: tuple) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, version=DIGITS_CLASSIFIER_VERSION,
             **dict(zip(("w1", "b1", "w2", "b2"), weights)))
    os.replace(tmp, path)

  @staticmethod
  def _prep(images_u8: np.ndarray) -> np.ndarray:
    im = np.asarray(images_u8)
    if im.ndim != 4 or im.shape[1:] != (8, 8, 1):
      raise ValueError(f"digits metric needs uint8 [N, 8, 8, 1], got {im.shape}")
    return im.reshape(len(im), 64).astype(np.float64) / 255.0

  def features_of(self, x: np.ndarray) -> np.ndarray:
    """Hidden-layer activations [N, 64] of prepared inputs [N, 64]."""
    return np.maximum(x @ self.w1 + self.b1, 0.0)

  def predict_proba(self, x: np.ndarray) -> np.ndarray:
    """Class probabilities [N, 10] of prepared inputs [N, 64] (softmax output)."""
    z = self.features_of(x) @ self.w2 + self.b2
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)

  def features(self, images_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, 64], class logits [N, 10]) of uint8 [N, 8, 8, 1] images."""
    h = self.features_of(self._prep(images_u8))
    return h, h @ self.w2 + self.b2

  def score(self, images_u8: np.ndarray) -> dict:
    """Metrics of samples uint8 [N, 8, 8, 1] (N >= 2)."""
    x = self._prep(images_u8)
    fd = frechet_distance(*feature_stats(self.features_of(x)), *self.ref_stats)
    proba = self.predict_proba(x)
    hist = np.bincount(proba.argmax(1), minlength=10) / len(x)
    nz = hist[hist > 0]
    feats = self.features_of(x)
    if self._ref_radii is None:
      self._ref_radii = manifold_radii(self.ref_features)
    precision, recall = (precision_recall(self.ref_features, feats,
                                          real_radii=self._ref_radii)
                         if len(x) > 3 else (float("nan"), float("nan")))
    return {"fd": fd, "confident": float(np.mean(proba.max(1) > 0.9)),
            "class_entropy": float(-(nz * np.log(nz)).sum()),
            "precision": precision, "recall": recall}
