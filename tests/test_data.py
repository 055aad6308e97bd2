"""Tests for ddx.data: sources, deterministic batching, sharding, the grain Loader."""

import logging
import multiprocessing
import os
import threading
import time

import grain
import ml_collections
import numpy as np
import pytest
from PIL import Image

from ddx import config as config_lib
from ddx import data


def _data_config(**overrides) -> ml_collections.ConfigDict:
  """A `config.data` group like configs/default.py's, with overrides."""
  c = ml_collections.ConfigDict(dict(
      name="digits", image_size=8, channels=1, path="", data_dir="", split="train",
      random_flip=False, crop="center", image_key="image", label_key="label", num_workers=-1))
  c.update(overrides)
  return c


@pytest.fixture(scope="module")
def digits():
  return data.make_source(_data_config())


class _RangeSource:
  """Tiny synthetic source: image i is constant i (mod 256), label i."""

  num_classes = 0

  def __init__(self, n, shape=(2, 3, 1)):
    self.n = n
    self.image_shape = shape

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    i = int(i)
    return np.full(self.image_shape, i % 256, np.uint8), i


class _PatternSource(_RangeSource):
  """Images with a distinct left/right pattern so flips are visible."""

  def __getitem__(self, i):
    i = int(i)
    h, w, c = self.image_shape
    image = (np.arange(h * w * c).reshape(h, w, c) * 7 + i * 3) % 256
    return image.astype(np.uint8), i


# ---------------------------------------------------------------------------
# digits


def test_digits_source(digits):
  assert isinstance(digits, data.Source)
  assert isinstance(digits, grain.sources.RandomAccessDataSource)
  assert len(digits) == 1797
  assert digits.num_classes == 10
  assert digits.image_shape == (8, 8, 1)
  images = np.stack([digits[i][0] for i in range(len(digits))])
  labels = np.array([digits[i][1] for i in range(len(digits))])
  assert images.dtype == np.uint8 and images.shape == (1797, 8, 8, 1)
  assert images.min() == 0 and images.max() == 255
  assert set(labels.tolist()) == set(range(10))


def test_digits_are_scikit_learns():
  """ddx reads the digits CSV shipped in scikit-learn without importing it: the
  arrays are exactly scikit-learn's own loader's, counts 0..16 mapped to uint8."""
  from sklearn.datasets import load_digits
  images, labels = data.load_digits()
  want = load_digits()
  np.testing.assert_array_equal(
      images, np.round(want.images * 255 / 16).astype(np.uint8)[..., None])
  np.testing.assert_array_equal(labels, want.target)
  assert labels.dtype == np.int64 and images.shape == (1797, 8, 8, 1)


def test_digits_resize_and_rgb():
  src = data.make_source(_data_config(image_size=16, channels=3))
  image, label = src[5]
  assert image.shape == (16, 16, 3) and image.dtype == np.uint8
  np.testing.assert_array_equal(image[..., 0], image[..., 2])
  assert 0 <= label <= 9


def test_digits_batch_range(digits):
  batch = data.get_batch(digits, 3, batch_size=64, seed=0, random_flip=True)
  assert batch["image"].dtype == np.float32 and batch["image"].shape == (64, 8, 8, 1)
  assert batch["label"].dtype == np.int32 and batch["label"].shape == (64,)
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
  assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0


@pytest.mark.parametrize("kw", [dict(image_size=0), dict(image_size=-3), dict(channels=2),
                                dict(channels=4), dict(crop="random")])
def test_bad_image_config(kw):
  with pytest.raises(data.DataError):
    data.make_source(_data_config(**kw))


# ---------------------------------------------------------------------------
# determinism


def test_same_step_same_batch_different_step_different(digits):
  kw = dict(batch_size=32, seed=7, random_flip=True)
  a = data.get_batch(digits, 11, **kw)
  b = data.get_batch(digits, 11, **kw)
  c = data.get_batch(digits, 12, **kw)
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(a["image"], c["image"])
  d = data.get_batch(digits, 11, batch_size=32, seed=8, random_flip=True)
  assert not np.array_equal(a["image"], d["image"])


def _reference_stream(n, seed, num_epochs):
  # Independent construction: whole epochs concatenated, then sliced.
  return np.concatenate([np.random.default_rng([seed, 0, e]).permutation(n)
                         for e in range(num_epochs)])


@pytest.mark.parametrize("n,batch_size", [(10, 3), (10, 4), (7, 7), (5, 12), (1797, 128)])
def test_batches_match_reference_across_epoch_boundaries(n, batch_size):
  seed = 3
  steps = 3 * n // batch_size + 3
  stream = _reference_stream(n, seed, num_epochs=(steps + 1) * batch_size // n + 2)
  for step in range(steps):
    got = data.global_batch_indices(n, batch_size, seed, step)
    assert got.dtype == np.int64 and got.shape == (batch_size,)
    np.testing.assert_array_equal(got, stream[step * batch_size:(step + 1) * batch_size])


def test_every_index_once_per_epoch():
  n, batch_size, seed = 23, 5, 1
  stream = np.concatenate(
      [data.global_batch_indices(n, batch_size, seed, k) for k in range(30)])
  for e in range(len(stream) // n):
    epoch = stream[e * n:(e + 1) * n]
    np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
  # Different epochs are shuffled differently.
  assert not np.array_equal(stream[:n], stream[n:2 * n])


def test_straddling_batch_images_match_indices():
  src = _RangeSource(10)
  batch = data.get_batch(src, 2, batch_size=4, seed=0, random_flip=False)  # positions 8..11
  expected = _reference_stream(10, 0, 2)[8:12]
  np.testing.assert_array_equal(batch["label"], expected)
  want = expected.astype(np.float32) / np.float32(127.5) - np.float32(1)
  np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], want)


def _reference_batch(source, step, batch_size, seed, random_flip):
  """Today's (517a35e) batch definition, transcribed: rows from the per-epoch
  permutation stream, flips from default_rng([seed, 1, step]), u8 / 127.5 - 1."""
  n = len(source)
  stream = _reference_stream(n, seed, (step + 1) * batch_size // n + 1)
  rows = stream[step * batch_size:(step + 1) * batch_size]
  images = np.stack([source[int(i)][0] for i in rows])
  labels = np.array([source[int(i)][1] for i in rows], np.int32)
  if random_flip:
    flips = np.random.default_rng([seed, 1, step]).random(batch_size) < 0.5
    images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
  return images.astype(np.float32) / np.float32(127.5) - np.float32(1), labels


@pytest.mark.parametrize("flip", [False, True])
def test_batches_pinned_to_the_reference_definition(digits, flip):
  for step in (0, 13, 14, 500):  # 14 * 128 = 1792 straddles the epoch end (1797)
    want_images, want_labels = _reference_batch(digits, step, 128, 4, flip)
    got = data.get_batch(digits, step, batch_size=128, seed=4, random_flip=flip)
    np.testing.assert_array_equal(got["image"], want_images)
    np.testing.assert_array_equal(got["label"], want_labels)
  with data.Loader(digits, 13, batch_size=128, seed=4, random_flip=flip) as loader:
    for _ in range(2):
      step, batch = next(loader)
      want_images, want_labels = _reference_batch(digits, step, 128, 4, flip)
      np.testing.assert_array_equal(batch["image"], want_images)
      np.testing.assert_array_equal(batch["label"], want_labels)


# ---------------------------------------------------------------------------
# sharding and flips


@pytest.mark.parametrize("flip", [False, True])
def test_process_shards_concatenate_to_global_batch(digits, flip):
  kw = dict(batch_size=16, seed=5, random_flip=flip)
  for step in (0, 111, 112):  # 112 * 16 = 1792 straddles the epoch end (1797).
    full = data.get_batch(digits, step, **kw)
    for count in (1, 2, 4):
      parts = [data.get_batch(digits, step, process_index=p, process_count=count, **kw)
               for p in range(count)]
      assert all(len(p["label"]) == 16 // count for p in parts)
      np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), full["image"])
      np.testing.assert_array_equal(np.concatenate([p["label"] for p in parts]), full["label"])


def test_batch_must_divide_by_processes(digits):
  with pytest.raises(data.DataError, match="divide"):
    data.get_batch(digits, 0, batch_size=10, seed=0, random_flip=False, process_count=4)
  with pytest.raises(data.DataError):
    data.get_batch(digits, 0, batch_size=8, seed=0, random_flip=False,
                   process_index=2, process_count=2)


def test_random_flip_mirrors_some_rows():
  src = _PatternSource(50, shape=(4, 5, 3))
  kw = dict(batch_size=32, seed=9)
  plain = data.get_batch(src, 4, random_flip=False, **kw)
  flipped = data.get_batch(src, 4, random_flip=True, **kw)
  np.testing.assert_array_equal(plain["label"], flipped["label"])
  pairs = list(zip(flipped["image"], plain["image"]))
  mirrored = np.array([np.array_equal(f, p[:, ::-1]) for f, p in pairs])
  same = np.array([np.array_equal(f, p) for f, p in pairs])
  # The pattern is not left-right symmetric, so each row is exactly one of the two.
  assert np.all(mirrored ^ same)
  assert 0 < mirrored.sum() < 32
  np.testing.assert_array_equal(mirrored, data.flip_mask(32, 9, 4))


# ---------------------------------------------------------------------------
# tfds


def _label_range_ok(labels, num_classes):
  return labels.min() >= 0 and labels.max() < num_classes


@pytest.fixture
def tfds_mock(monkeypatch):
  """tfds.testing.mock_data that also lets make_source's is_prepared guard pass.

  mock_data fakes `data_source` (random examples from the feature specs) but
  not `is_prepared()`, which stays False because no files exist; patch only
  that for the duration of the test, keeping the real guard in ddx.data.
  """
  tfds = pytest.importorskip("tensorflow_datasets")

  def enter(num_examples):
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    return tfds.testing.mock_data(num_examples=num_examples,
                                  policy=tfds.testing.MockPolicy.USE_CODE)

  return enter


def test_tfds_cifar10_mock(tfds_mock, tmp_path):
  with tfds_mock(num_examples=40):
    src = data.make_source(_data_config(name="cifar10", image_size=32, channels=3,
                                        data_dir=str(tmp_path)))
    assert len(src) == 40 and src.num_classes == 10 and src.image_shape == (32, 32, 3)
    image, label = src[3]
    assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
    batch = data.get_batch(src, 1, batch_size=16, seed=0, random_flip=True)
    # The tfds data source travels to a worker process and reads the same records.
    with data.Loader(src, 1, batch_size=16, seed=0, random_flip=True,
                     num_workers=1) as loader:
      step, loaded = next(loader)
  assert step == 1
  np.testing.assert_array_equal(loaded["image"], batch["image"])
  np.testing.assert_array_equal(loaded["label"], batch["label"])
  assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["image"].min() >= -1 and batch["image"].max() <= 1
  assert batch["label"].dtype == np.int32 and _label_range_ok(batch["label"], 10)


def test_tfds_resize_and_grey(tfds_mock, tmp_path):
  with tfds_mock(num_examples=8):
    src = data.make_source(_data_config(name="cifar10", image_size=16, channels=1,
                                        data_dir=str(tmp_path)))
    batch = data.get_batch(src, 0, batch_size=8, seed=0, random_flip=False)
  assert src.image_shape == (16, 16, 1)
  assert batch["image"].shape == (8, 16, 16, 1)


def test_tfds_missing_label_key(tfds_mock, tmp_path):
  with tfds_mock(num_examples=4):
    with pytest.raises(data.DataError, match="label_key"):
      data.make_source(_data_config(name="cifar10", image_size=32, channels=3,
                                    label_key="attributes", data_dir=str(tmp_path)))
    src = data.make_source(_data_config(name="cifar10", image_size=32, channels=3,
                                        label_key="", data_dir=str(tmp_path)))
    assert src.num_classes == 0 and src[0][1] == -1


def test_tfds_not_prepared_fails_fast(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  t0 = time.monotonic()
  with pytest.raises(data.DataError) as info:
    data.make_source(_data_config(name="cifar10", image_size=32, channels=3,
                                  data_dir=str(tmp_path)))
  # Behaviour guard against TFDS' minutes of download retries, not a benchmark.
  assert time.monotonic() - t0 < 5
  msg = str(info.value)
  assert "tfds build cifar10" in msg and "--file_format=array_record" in msg
  assert str(tmp_path) in msg and "\n" not in msg


def test_unknown_dataset_name():
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(data.DataError, match="digits.*folder") as info:
    data.make_source(_data_config(name="cifar_10"))
  assert "cifar10" in str(info.value)  # Suggests the close match.


def test_tfds_real_prepared_dataset(tmp_path):
  """End to end without mocks: a tiny dataset prepared to ArrayRecord on disk.

  Images are stored as uint8 Tensor features because preparing `Image`
  features (PNG encoding) needs TensorFlow, which ddx does not depend on.
  """
  tfds = pytest.importorskip("tensorflow_datasets")
  builder = _tiny_builder_cls(tfds)(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  src = data.make_source(_data_config(name="ddx_tiny_images", image_size=12, channels=3,
                                      data_dir=str(tmp_path)))
  assert len(src) == 6 and src.num_classes == 3
  values = []
  for i in range(len(src)):
    image, label = src[i]
    assert image.shape == (12, 12, 3) and image.dtype == np.uint8
    # The centre crop keeps only the constant middle band (see the builder).
    assert image.min() == image.max()
    value = int(image[0, 0, 0])
    assert label == ((value - 10) // 40) % 3
    values.append(value)
  assert sorted(values) == [10 + 40 * i for i in range(6)]


_TINY_BUILDER = None


def _tiny_builder_cls(tfds):
  """Defines (once: TFDS registers builders by class name) a tiny builder."""
  global _TINY_BUILDER
  if _TINY_BUILDER is None:

    class DdxTinyImages(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(20, 30, 3), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=3)}))

      def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

      def _generate_examples(self):
        for i in range(6):
          # 20x30: the centre 20x20 crop (columns 5..24) is constant
          # 10 + 40*i; the 5-column borders are white and must be cut off.
          image = np.full((20, 30, 3), 255, np.uint8)
          image[:, 5:25] = 10 + 40 * i
          yield i, {"image": image, "label": i % 3}

    _TINY_BUILDER = DdxTinyImages
  return _TINY_BUILDER


# ---------------------------------------------------------------------------
# folder


def _write_images(root):
  rng = np.random.default_rng(0)
  specs = [("a.png", (10, 14), "RGB"), ("sub/b.JPG", (20, 12), "RGB"),
           ("sub/deeper/c.jpeg", (9, 9), "L"), ("d.bmp", (5, 8), "RGBA"),
           ("sub/e.webp", (16, 16), "RGB")]
  for name, (h, w), mode in specs:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
    Image.fromarray(arr[..., 0] if mode == "L" else arr, mode).save(path)
  (root / "notes.txt").write_text("not an image")
  return len(specs)


@pytest.mark.parametrize("channels", [1, 3])
def test_folder_source(tmp_path, channels):
  count = _write_images(tmp_path)
  src = data.make_source(_data_config(name="folder", path=str(tmp_path), image_size=6,
                                      channels=channels))
  assert len(src) == count and src.num_classes == 0
  assert src.image_shape == (6, 6, channels)
  rel = [os.path.relpath(f, tmp_path) for f in src.files]
  assert rel == sorted(rel)
  for i in range(len(src)):
    image, label = src[i]
    assert image.shape == (6, 6, channels) and image.dtype == np.uint8 and label == -1
  batch = data.get_batch(src, 0, batch_size=4, seed=0, random_flip=True)
  assert batch["image"].shape == (4, 6, 6, channels)
  np.testing.assert_array_equal(batch["label"], -1)


def test_folder_center_crop(tmp_path):
  # Left third black, middle white, right third black: the centre crop is white.
  arr = np.zeros((10, 30), np.uint8)
  arr[:, 10:20] = 255
  Image.fromarray(arr).save(tmp_path / "x.png")
  src = data.make_source(_data_config(name="folder", path=str(tmp_path), image_size=5))
  assert src[0][0].min() == 255
  squashed = data.make_source(_data_config(name="folder", path=str(tmp_path), image_size=5,
                                           crop="none"))
  assert squashed[0][0].min() < 255


def test_folder_empty_or_missing(tmp_path):
  with pytest.raises(data.DataError, match="no image files"):
    data.make_source(_data_config(name="folder", path=str(tmp_path)))
  with pytest.raises(data.DataError, match="does not exist"):
    data.make_source(_data_config(name="folder", path=str(tmp_path / "nope")))
  with pytest.raises(data.DataError, match="data.path"):
    data.make_source(_data_config(name="folder", path=""))


def _truncated_jpeg(path, seed=0):
  """Writes the first 200 bytes of a valid JPEG: the header opens, the data is cut."""
  arr = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  Image.fromarray(arr).save(path, format="JPEG")
  path.write_bytes(path.read_bytes()[:200])


def _distinct_folder(root, count, bad=()):
  """count 12x10 images whose pixels identify them (and flips), plus truncated files."""
  rng = np.random.default_rng(2)
  for i in range(count):
    arr = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    Image.fromarray(arr).save(root / f"img{i:02d}.png")
  for name in bad:
    _truncated_jpeg(root / name)


def test_folder_corrupt_file_is_replaced_and_warned_once(tmp_path, caplog):
  _distinct_folder(tmp_path, 9, bad=["img04b.jpg"])
  src = data.make_source(_data_config(name="folder", path=str(tmp_path), image_size=8,
                                      channels=3))
  bad = src.files.index(str(tmp_path / "img04b.jpg"))
  with pytest.raises(data.UnreadableImageError, match="img04b.jpg") as info:
    src[bad]
  assert info.value.path == str(tmp_path / "img04b.jpg") and "\n" not in str(info.value)
  kw = dict(batch_size=4, seed=1, random_flip=True)
  steps = 12  # 48 rows: every file about five times
  with caplog.at_level(logging.WARNING, logger="ddx.data"):
    with data.Loader(src, 0, num_workers=0, **kw) as loader:
      got = [next(loader) for _ in range(steps)]
      skipped = loader.skipped
      unreadable = loader.unreadable_files
  warned = [r for r in caplog.records if "img04b.jpg" in r.getMessage()]
  assert len(warned) == 1 and "skipping unreadable image" in warned[0].getMessage()
  rows = np.concatenate([data.global_batch_indices(len(src), 4, 1, k) for k in range(steps)])
  assert skipped == np.sum(rows == bad) > 0
  assert unreadable == [str(tmp_path / "img04b.jpg")]
  # A bad row holds the next file in sorted order (flipped like any other row).
  for step, batch in got:
    index = data.global_batch_indices(len(src), 4, 1, step)
    flips = data.flip_mask(4, 1, step)
    for r, i in enumerate(index):
      want = src[(i + 1) % len(src) if i == bad else i][0]
      want = want[:, ::-1] if flips[r] else want
      np.testing.assert_array_equal(batch["image"][r],
                                    want.astype(np.float32) / np.float32(127.5) - 1)


@pytest.mark.parametrize("workers", [0, 1])
def test_folder_of_only_unreadable_files(tmp_path, workers):
  for k in range(3):
    _truncated_jpeg(tmp_path / f"bad{k}.jpg", seed=k)
  src = data.make_source(_data_config(name="folder", path=str(tmp_path)))
  with pytest.raises(data.DataError, match=r"none of the 3 images can be read.*bad0\.jpg") as info:
    data.get_batch(src, 0, batch_size=2, seed=0, random_flip=False)
  assert "\n" not in str(info.value)
  # From a worker process the same one-line error reaches the training loop.
  with data.Loader(src, 0, batch_size=2, seed=0, num_workers=workers) as loader:
    with pytest.raises(data.DataError, match="none of the 3 images can be read") as info:
      next(loader)
    assert "\n" not in str(info.value) and not loader.alive


# ---------------------------------------------------------------------------
# Loader


def test_loader_matches_get_batch(digits):
  kw = dict(batch_size=32, seed=2, random_flip=True, process_index=1, process_count=2)
  with data.Loader(digits, 55, prefetch=3, **kw) as loader:
    assert loader.num_workers == 0  # in memory: auto picks no workers
    got = [next(loader) for _ in range(5)]
  assert [s for s, _ in got] == list(range(55, 60))
  for step, batch in got:
    want = data.get_batch(digits, step, **kw)
    assert type(batch["image"]) is np.ndarray and batch["image"].dtype == np.float32
    np.testing.assert_array_equal(batch["image"], want["image"])
    np.testing.assert_array_equal(batch["label"], want["label"])


def test_workers_processes_and_resume_give_the_same_batches(tmp_path):
  """Batch k is a function of (seed, k) only: 0, 1 or 2 worker processes, 1 or 2
  JAX processes (the union of the local shares), a run resumed at step 3."""
  _distinct_folder(tmp_path, 11, bad=["img07b.jpg"])
  src = data.make_source(_data_config(name="folder", path=str(tmp_path), image_size=8,
                                      channels=3))
  kw = dict(batch_size=6, seed=3, random_flip=True)
  steps = range(3, 9)
  want = [data.get_batch(src, k, **kw) for k in steps]
  runs = {}
  for workers in (0, 1, 2):
    with data.Loader(src, steps[0], num_workers=workers, **kw) as loader:
      assert loader.num_workers == workers
      runs[workers] = [next(loader) for _ in steps]
      runs[workers, "skipped"] = loader.skipped
    assert not multiprocessing.active_children()  # close() stopped the workers
  for process in (0, 1):
    with data.Loader(src, steps[0], num_workers=0, process_index=process, process_count=2,
                     **kw) as loader:
      runs["process", process] = [next(loader) for _ in steps]
  for j, k in enumerate(steps):
    for workers in (0, 1, 2):
      step, batch = runs[workers][j]
      assert step == k
      np.testing.assert_array_equal(batch["image"], want[j]["image"])
      np.testing.assert_array_equal(batch["label"], want[j]["label"])
    halves = [runs["process", p][j][1] for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), want[j]["image"])
  # The unreadable file's rows come back from the workers as counted skips.
  assert runs[0, "skipped"] == runs[1, "skipped"] == runs[2, "skipped"] > 0


def test_default_num_workers(digits, tmp_path):
  _distinct_folder(tmp_path, 2)
  folder = data.make_source(_data_config(name="folder", path=str(tmp_path)))
  cores = len(os.sched_getaffinity(0))
  assert data.default_num_workers(digits) == 0
  assert data.default_num_workers(folder) == max(1, min(16, cores - 1))
  with pytest.raises(data.DataError, match="num_workers"):
    data.Loader(digits, 0, batch_size=8, seed=0, num_workers=-2)


@pytest.mark.parametrize("value", [-2, 1.5, "4"])
def test_config_rejects_bad_num_workers(value):
  c = config_lib.base_config()
  with c.ignore_type():
    c.data.num_workers = value
  with pytest.raises(config_lib.ConfigError, match="data.num_workers"):
    config_lib.validate(c)


def test_loader_close_stops_it(digits):
  loader = data.Loader(digits, 0, batch_size=8, seed=0, prefetch=1)
  next(loader)
  time.sleep(0.05)  # Let the prefetch thread fill its buffer.
  loader.close()
  assert not loader.alive
  with pytest.raises(StopIteration):
    next(loader)
  loader.close()  # Idempotent.


class _FailingSource(_RangeSource):

  def __getitem__(self, i):
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError("boom in source")
    return super().__getitem__(i)


def test_loader_propagates_exceptions():
  loader = data.Loader(_FailingSource(10), 0, batch_size=2, seed=0, num_workers=0)
  with pytest.raises(RuntimeError, match="boom in source"):
    next(loader)
  assert not loader.alive


def test_loader_validates_eagerly(digits):
  with pytest.raises(data.DataError):
    data.Loader(digits, 0, batch_size=6, seed=0, process_count=4)
