"""ADM's evaluator in ddx: its metric conventions against NumPy transcriptions.

The transcriptions below follow guided-diffusion's evaluations/evaluator.py
(ManifoldEstimator, compute_inception_score), TF1's legacy ResizeBilinear
and ADM's sampling-script quantisation, written as plain loops; ddx's
functions are checked against them on small arrays. The full Inception
network is only run in tests/test_inception.py (its module fixture).
"""
import jax.numpy as jnp
import numpy as np
import pytest

from ddx import batch_files
from ddx import evaluate
from ddx import evaluation
from ddx import inception
from ddx import model as model_lib


# --------------------------------------------------------------------------
# Fréchet distance.


def test_frechet_distance_closed_form_for_commuting_covariances():
  """S1, S2 with one eigenbasis: tr((S1^½ S2 S1^½)^½) = Σ sqrt(a_i b_i)."""
  rng = np.random.default_rng(0)
  d = 12
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  a, b = rng.uniform(0.1, 5.0, d), rng.uniform(0.1, 5.0, d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = (q * a) @ q.T, (q * b) @ q.T
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert evaluation.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-6)
  # Rank-deficient but commuting: zero eigenvalues contribute a or b alone.
  a[:4] = 0.0
  s1 = (q * a) @ q.T
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert evaluation.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-6)


# --------------------------------------------------------------------------
# Precision and recall, against ADM's ManifoldEstimator written as loops.


def _adm_radii(f: np.ndarray, k: int) -> np.ndarray:
  """ADM: each row of squared distances to every point (itself included), the
  value np.partition puts at index k."""
  f = f.astype(np.float64)
  out = []
  for i in range(len(f)):
    row = [float(np.sum((f[i] - f[j]) ** 2)) for j in range(len(f))]
    out.append(sorted(row)[k])
  return np.array(out)


def _adm_precision_recall(real: np.ndarray, fake: np.ndarray, k: int):
  """ADM's evaluate_pr: a sample is precise when some reference ball holds it
  (squared distance <= that reference's radius), a reference is recalled when
  some sample ball holds it."""
  r_real, r_fake = _adm_radii(real, k), _adm_radii(fake, k)
  real, fake = real.astype(np.float64), fake.astype(np.float64)
  dist = lambda i, j: float(np.sum((real[i] - fake[j]) ** 2))
  precise = [any(dist(i, j) <= r_real[i] for i in range(len(real))) for j in range(len(fake))]
  recalled = [any(dist(i, j) <= r_fake[j] for j in range(len(fake))) for i in range(len(real))]
  return float(np.mean(precise)), float(np.mean(recalled))


def test_radii_and_precision_recall_equal_adm_on_ties_and_duplicates():
  rng = np.random.default_rng(1)
  # A coarse integer grid: many equal distances, exact in float32.
  real = rng.integers(0, 3, (30, 3)).astype(np.float32)
  fake = rng.integers(0, 3, (25, 3)).astype(np.float32) + (rng.random((25, 3)) < 0.2)
  # Repeated rows: a row with k further copies has radius 0.
  real = np.concatenate([real, np.repeat(real[:2], 3, axis=0)])
  radii = evaluation.manifold_radii(real, k=3)
  np.testing.assert_array_equal(radii, _adm_radii(real, 3))
  assert radii[0] == 0 and radii[1] == 0   # itself + 3 copies fill ranks 0..3
  for k in (1, 3, 5):
    got = evaluation.precision_recall(real, fake, k=k)
    assert got == _adm_precision_recall(real, fake, k), k
  # The point itself is rank 0: k=0 gives radius 0 for every point.
  np.testing.assert_array_equal(evaluation.manifold_radii(real, k=0), 0.0)


def test_precision_recall_do_not_depend_on_batching():
  rng = np.random.default_rng(2)
  real = rng.normal(size=(70, 16)).astype(np.float32)
  fake = (rng.normal(size=(45, 16)) * 1.3 + 0.2).astype(np.float32)
  want = _adm_precision_recall(real, fake, 3)
  assert 0 < want[0] < 1 and 0 < want[1] < 1   # a test that can fail
  ref_radii = evaluation.manifold_radii(real)
  for rows, cols in ((10000, 10000), (7, 13), (1, 70), (64, 5), (70, 1)):
    radii = evaluation.manifold_radii(real, row_batch_size=rows, col_batch_size=cols)
    np.testing.assert_allclose(radii, ref_radii, rtol=1e-6)
    got = evaluation.precision_recall(real, fake, row_batch_size=rows, col_batch_size=cols)
    assert got == want, (rows, cols)
  assert evaluation.precision_recall(real, fake, real_radii=ref_radii) == want
  np.testing.assert_allclose(ref_radii, _adm_radii(real, 3), rtol=1e-5)


def test_precision_recall_bad_input():
  with pytest.raises(ValueError, match="more than 3"):
    evaluation.manifold_radii(np.zeros((3, 2)))
  with pytest.raises(ValueError, match="differ in width"):
    evaluation.precision_recall(np.zeros((5, 2)), np.zeros((5, 3)))


# --------------------------------------------------------------------------
# The Inception Score with ADM's splits.


def _adm_inception_score(logits: np.ndarray, split_size: int) -> float:
  z = logits.astype(np.float64)
  preds = np.exp(z - z.max(1, keepdims=True))
  preds /= preds.sum(1, keepdims=True)
  scores = []
  start = 0
  while start < len(preds):   # contiguous chunks, the remainder a chunk of its own
    part = preds[start:start + split_size]
    py = part.mean(0, keepdims=True)
    kl = (part * (np.log(part) - np.log(py))).sum(1).mean()
    scores.append(np.exp(kl))
    start += split_size
  return float(np.mean(scores))


def test_inception_score_adm_matches_transcription_and_splits():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(23, 10)) * 3.0
  for split in (5, 7, 23, 100):
    got = evaluation.inception_score_adm(logits, split_size=split)
    assert got == pytest.approx(_adm_inception_score(logits, split), rel=1e-12), split
  # The remainder chunk (3 rows of 23 at split 5) counts as much as a full one.
  assert evaluation.inception_score_adm(logits, 5) != pytest.approx(
      evaluation.inception_score_adm(logits[:20], 5), rel=1e-6)
  # Equal chunks: the same as the array_split convention's mean.
  assert evaluation.inception_score_adm(logits[:20], 5) == pytest.approx(
      evaluation.inception_score(logits[:20], splits=4)[0], rel=1e-9)
  confident = np.eye(10)[np.arange(1000) % 10] * 50.0
  assert evaluation.inception_score_adm(confident, 100) == pytest.approx(10.0, rel=1e-6)
  # Saturated softmax: no NaN where ADM's log(0) would give one.
  assert np.isfinite(evaluation.inception_score_adm(confident * 100.0, 100))


# --------------------------------------------------------------------------
# ADM's input protocol: TF1's legacy bilinear and (x - 128) / 128.


def _tf1_legacy_bilinear(img: np.ndarray, size: int) -> np.ndarray:
  """TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False), as in
  its kernel: float32 source coordinate out * (in / out), lower = floor, upper
  = min(ceil, in - 1), top/bottom lerps along x, then along y (img: [H, W])."""
  h, w = img.shape
  sy, sx = np.float32(h) / np.float32(size), np.float32(w) / np.float32(size)
  out = np.zeros((size, size), np.float32)
  for y in range(size):
    in_y = np.float32(y) * sy
    y0, y1 = int(np.floor(in_y)), min(int(np.ceil(in_y)), h - 1)
    dy = in_y - np.float32(np.floor(in_y))
    for x in range(size):
      in_x = np.float32(x) * sx
      x0, x1 = int(np.floor(in_x)), min(int(np.ceil(in_x)), w - 1)
      dx = in_x - np.float32(np.floor(in_x))
      top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * dx
      bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * dx
      out[y, x] = top + (bottom - top) * dy
  return out


@pytest.mark.parametrize("n_in,size", [(32, 299), (9, 40), (64, 40)])
def test_tf1_legacy_resize_matches_transcription(n_in, size):
  img = np.random.default_rng(n_in).uniform(0, 255, (n_in, n_in)).astype(np.float32)
  want = _tf1_legacy_bilinear(img, size)
  got = np.asarray(inception.resize_tf1_legacy(jnp.asarray(img)[None, ..., None], size))
  np.testing.assert_allclose(got[0, ..., 0], want, rtol=0, atol=2e-3)
  m = inception.tf1_resize_matrix(n_in, size)
  np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)
  # Not the half-pixel resize: the two protocols differ visibly.
  half = np.asarray(inception.resize_bilinear(jnp.asarray(img)[None, ..., None], size))
  assert np.abs(half[0, ..., 0] - want).max() > 1.0


def test_adm_protocol_normalisation():
  u8 = np.random.default_rng(4).integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
  u8[0, 0, 0] = 0
  u8[0, 0, 1] = 255
  x = np.asarray(inception.preprocess(u8, size=16, protocol="adm"))
  np.testing.assert_array_equal(x, (u8.astype(np.float32) - 128) / 128)
  assert x[0, 0, 0, 0] == -1.0 and x[0, 0, 1, 0] == 127 / 128
  up = np.asarray(inception.preprocess(u8[..., :1], size=40, protocol="adm"))
  want = (_tf1_legacy_bilinear(u8[1, ..., 0].astype(np.float32), 40) - 128) / 128
  np.testing.assert_allclose(up[1, ..., 2], want, atol=2e-5)
  with pytest.raises(ValueError, match="protocol"):
    inception.preprocess(u8, protocol="tf")


def test_to_uint8_nearest_and_adm_truncation():
  x = np.array([-1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 1.7, -3.0], np.float32)
  np.testing.assert_array_equal(model_lib.to_uint8(x), [0, 0, 128, 191, 255, 255, 255, 0])
  np.testing.assert_array_equal(model_lib.to_uint8(x, rounding="truncate"),
                                [0, 0, 127, 191, 254, 255, 255, 0])
  torch = pytest.importorskip("torch")
  r = np.random.default_rng(5).uniform(-1.2, 1.2, 5000).astype(np.float32)
  want = ((torch.from_numpy(r) + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
  np.testing.assert_array_equal(model_lib.to_uint8(r, rounding="truncate"), want)
  with pytest.raises(ValueError, match="rounding"):
    model_lib.to_uint8(r, rounding="floor")


# --------------------------------------------------------------------------
# ADM .npz batches.


def test_batch_round_trip_and_never_overwrites(tmp_path):
  rng = np.random.default_rng(6)
  images = rng.integers(0, 256, (12, 8, 8, 3)).astype(np.uint8)
  labels = rng.integers(0, 10, 12)
  path = str(tmp_path / "samples.npz")
  batch_files.write_batch(path, images, labels)
  with np.load(path) as f:   # ADM's names: arr_0 images, arr_1 labels
    assert sorted(f.files) == ["arr_0", "arr_1"]
  back = batch_files.read_batch(path)
  assert isinstance(back.images, np.memmap)   # read from disk as used
  np.testing.assert_array_equal(back.images, images)
  packed = str(tmp_path / "packed.npz")
  np.savez_compressed(packed, images[:, ::2], labels)   # strided: a C-order copy
  again = batch_files.read_batch(packed)
  assert not isinstance(again.images, np.memmap)
  np.testing.assert_array_equal(again.images, images[:, ::2])
  np.testing.assert_array_equal(again.labels, labels)
  fortran = str(tmp_path / "fortran.npz")
  np.savez(fortran, np.asfortranarray(images))
  np.testing.assert_array_equal(batch_files.read_batch(fortran).images, images)
  np.testing.assert_array_equal(back.labels, labels)
  assert back.stats == {}
  flat = lambda u8: u8.reshape(len(u8), -1).astype(np.float64)
  for a, b in zip(evaluation.feature_stats(flat(back.images)),
                  evaluation.feature_stats(flat(images))):
    np.testing.assert_array_equal(a, b)
  before = open(path, "rb").read()
  with pytest.raises(batch_files.BatchFileError, match="already exists"):
    batch_files.write_batch(path, images[:2])
  assert open(path, "rb").read() == before
  batch_files.write_batch(path, images[:2], overwrite=True)
  assert len(batch_files.read_batch(path).images) == 2
  assert not [p.name for p in tmp_path.iterdir() if "tmp" in p.name]   # no temp left
  # A reference in ADM's layout: images and both statistics pairs.
  ref = str(tmp_path / "ref.npz")
  np.savez(ref, arr_0=images, mu=np.zeros(4), sigma=np.eye(4), mu_s=np.ones(3),
           sigma_s=np.eye(3, dtype=np.float32))
  r = batch_files.read_batch(ref)
  assert set(r.stats) == {"pool", "spatial"} and r.labels is None
  np.testing.assert_array_equal(r.stats["spatial"][0], np.ones(3))


def test_bad_batches_are_one_line_errors(tmp_path):
  E = batch_files.BatchFileError
  u8 = np.zeros((4, 8, 8, 3), np.uint8)
  cases = {
      "float": (dict(arr_0=u8.astype(np.float32)), "arr_0 is float32"),
      "rank": (dict(arr_0=u8[0]), r"arr_0 is uint8 \(8, 8, 3\)"),
      "labels": (dict(arr_0=u8, arr_1=np.zeros(3, np.int64)), "one per image"),
      "half": (dict(mu=np.zeros(4)), "has mu but no sigma"),
      "shapes": (dict(mu=np.zeros(4), sigma=np.eye(3)), "do not fit"),
      "empty": (dict(other=np.zeros(2)), "neither images"),
  }
  for name, (arrays, pattern) in cases.items():
    path = str(tmp_path / f"{name}.npz")
    np.savez(path, **arrays)
    with pytest.raises(E, match=pattern) as info:
      batch_files.read_batch(path)
    assert "\n" not in str(info.value) and path in str(info.value), name
  with pytest.raises(E, match="does not exist"):
    batch_files.read_batch(str(tmp_path / "nope.npz"))
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(E, match="cannot read"):
    batch_files.read_batch(str(tmp_path / "junk.npz"))
  with pytest.raises(E, match="uint8"):
    batch_files.write_batch(str(tmp_path / "w.npz"), u8.astype(np.float32))
  assert not (tmp_path / "w.npz").exists()


# --------------------------------------------------------------------------
# The command line, with a stand-in feature extractor.


def _standin() -> evaluate.Extractor:
  """Pool: 6 channel-block means; spatial: 4 pixel means; logits: a fixed map."""
  w = np.random.default_rng(7).normal(size=(6, 5))

  def features(u8):
    x = u8.reshape(len(u8), -1).astype(np.float32) / 255.0
    return x[:, :60].reshape(len(u8), 6, 10).mean(2), x[:, 60:100].reshape(len(u8), 4, 10).mean(2)

  return evaluate.Extractor(features=features, logits=lambda pool: pool @ w * 4.0)


def test_evaluate_cli_prints_adm_lines(tmp_path, capsys):
  rng = np.random.default_rng(8)
  samples = rng.integers(0, 256, (20, 8, 8, 3)).astype(np.uint8)
  ref_images = rng.integers(30, 256, (16, 8, 8, 3)).astype(np.uint8)
  s_path, r_path = str(tmp_path / "s.npz"), str(tmp_path / "r.npz")
  batch_files.write_batch(s_path, samples)
  batch_files.write_batch(r_path, ref_images)
  ex = _standin()
  assert evaluate.main([s_path, r_path], extractor=ex) == 0
  out = capsys.readouterr().out.strip().splitlines()
  assert [line.split(": ")[0] for line in out] == list(evaluate.LABELS)
  got = {line.split(": ")[0]: float(line.split(": ")[1]) for line in out}
  sp, ss = ex.features(samples)
  rp, rs = ex.features(ref_images)
  fd = lambda a, b: evaluation.frechet_distance(*evaluation.feature_stats(a),
                                                *evaluation.feature_stats(b))
  assert got["FID"] == fd(sp, rp) and got["sFID"] == fd(ss, rs)
  assert got["Inception Score"] == evaluation.inception_score_adm(ex.logits(sp))
  assert (got["Precision"], got["Recall"]) == evaluation.precision_recall(rp, sp)
  # Stored statistics win over the images' (ADM); without images, P/R are skipped.
  mu, sigma = evaluation.feature_stats(rp + 0.5)
  mu_s, sigma_s = evaluation.feature_stats(rs)
  stats_only = str(tmp_path / "stats.npz")
  np.savez(stats_only, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
  assert evaluate.main([s_path, stats_only], extractor=ex) == 0
  cap = capsys.readouterr()
  lines = cap.out.strip().splitlines()
  assert [line.split(": ")[0] for line in lines] == ["Inception Score", "FID", "sFID"]
  assert float(lines[1].split(": ")[1]) == evaluation.frechet_distance(
      *evaluation.feature_stats(sp), mu, sigma)
  assert len(cap.err.strip().splitlines()) == 1 and "Precision and Recall skipped" in cap.err
  # One-line errors, exit 2.
  for argv, pattern in (([s_path, str(tmp_path / "nope.npz")], "does not exist"),
                        ([stats_only, s_path], "takes SAMPLES.npz then REFERENCE.npz"),
                        ([s_path, r_path], "python -m ddx.inception --convert")):
    assert evaluate.main(argv, extractor=None if "convert" in pattern else ex) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and pattern in err[0] and err[0].startswith("ddx.evaluate: error: ")
  assert evaluate.main([s_path, r_path, "--inception_weights",
                        str(tmp_path / "w.npz")]) == 2
  assert "do not exist" in capsys.readouterr().err


def test_extra_feature_spaces_add_frechet_lines():
  """The FD-DINOv2 hook: each extra encoder adds one Fréchet distance after ADM's five."""
  rng = np.random.default_rng(10)
  s = batch_files.ReferenceBatch(rng.integers(0, 256, (12, 8, 8, 3)).astype(np.uint8), None, {})
  r = batch_files.ReferenceBatch(rng.integers(0, 200, (10, 8, 8, 3)).astype(np.uint8), None, {})
  encode = lambda u8: u8.reshape(len(u8), -1)[:, :5].astype(np.float64)
  ex = _standin()
  ex = evaluate.Extractor(ex.features, ex.logits, extra={"FD_DINOv2": encode})
  out, notes = evaluate.evaluate_batches(s, r, ex)
  assert list(out) == list(evaluate.LABELS) + ["FD_DINOv2"] and not notes
  assert out["FD_DINOv2"] == evaluation.frechet_distance(
      *evaluation.feature_stats(encode(s.images)), *evaluation.feature_stats(encode(r.images)))
  stats_only = batch_files.ReferenceBatch(None, None, {"pool": evaluation.feature_stats(
      ex.features(r.images)[0])})
  out, notes = evaluate.evaluate_batches(s, stats_only, ex)
  assert list(out) == ["Inception Score", "FID"] and len(notes) == 3   # sFID, P/R, FD_DINOv2
