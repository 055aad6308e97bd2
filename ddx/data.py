"""Image datasets and deterministic, resumable global batches.

A *source* is a random-access list of `(image uint8 [H, W, C], label int)`
pairs. Three kinds exist, picked by `config.data.name` in `make_source`:

* `digits`: scikit-learn's 1,797 real 8x8 handwritten digits (no download).
* `folder`: every image file under `config.data.path`, unlabelled.
* any other name: a prepared TFDS dataset read with `tfds.data_source`
  (ArrayRecord random access; TensorFlow is not needed).

Batches are a pure function of `(seed, step)`: the global batch at step k holds
positions `k*B .. k*B+B-1` of the endless stream made by concatenating one
seeded permutation of the dataset per epoch. Resuming at step k therefore
reproduces exactly the batches an uninterrupted run would have seen, and every
process computes the same global batch and keeps only its own rows.

This module uses only NumPy and PIL (plus TFDS when a TFDS dataset is named) so
that host-side data work never touches the accelerator.
"""

from __future__ import annotations

import difflib
import functools
import os
import queue
import threading
import time
from typing import Any, Iterator, Protocol, runtime_checkable

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

# Folder sources keep decoded, resized images in memory up to this many bytes,
# so small datasets are decoded once instead of once per epoch.
_FOLDER_CACHE_BYTES = 512 * 2**20

# Seed-sequence tags keep the per-epoch permutation stream and the per-step
# flip stream independent even when an epoch number equals a step number.
_PERMUTATION_TAG = 0
_FLIP_TAG = 1


class DataError(ValueError):
  """A dataset is missing, misconfigured or unreadable; the message says how to fix it."""


@runtime_checkable
class Source(Protocol):
  """Random-access image dataset.

  Attributes:
    num_classes: number of label classes; 0 when the dataset has no labels.
    image_shape: `(H, W, C)` of every image it returns.
  """

  num_classes: int
  image_shape: tuple[int, int, int]

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    """Returns `(image uint8 [H, W, C], label int)`; label is -1 if unlabelled."""
    ...


# ---------------------------------------------------------------------------
# Image conversion.


def _validate_image_config(image_size: Any, channels: Any, crop: Any) -> None:
  """Raises DataError unless image_size > 0, channels in (1, 3), crop known."""
  is_int = isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool)
  if not is_int or image_size <= 0:
    raise DataError(f"data.image_size must be a positive int, got {image_size!r}")
  if channels not in (1, 3):
    raise DataError(f"data.channels must be 1 (grey) or 3 (RGB), got {channels!r}")
  if crop not in ("center", "none"):
    raise DataError(f"data.crop must be 'center' or 'none', got {crop!r}")


def _to_pil(image: np.ndarray) -> Image.Image:
  """Wraps a uint8 [H, W] or [H, W, C] array (C in 1, 3, 4) as a PIL image."""
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  return Image.fromarray(image)


def convert_image(
    image: np.ndarray | Image.Image, image_size: int, channels: int, crop: str = "center"
) -> np.ndarray:
  """Converts an image to a square uint8 array of the configured size.

  Colour is converted first (grey <-> RGB, alpha dropped), then a non-square
  image is centre-cropped to its short side when `crop == "center"` (with
  `"none"` it is squashed), then it is resized with antialiased bilinear
  filtering. An image that already has the target shape is returned unchanged.

  Args:
    image: uint8 array [H, W] or [H, W, C] (C in 1, 3, 4), or a PIL image.
    image_size: output height and width.
    channels: 1 (grey) or 3 (RGB).
    crop: "center" or "none".

  Returns:
    uint8 array [image_size, image_size, channels].
  """
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8:
      raise DataError(f"expected uint8 images, got dtype {image.dtype}")
    if image.ndim == 2:
      image = image[..., None]
    if image.shape == (image_size, image_size, channels):
      return image  # Fast path: nothing to do (e.g. CIFAR-10 at 32x32x3).
    pil = _to_pil(image)
  else:
    pil = image
  pil = pil.convert("L" if channels == 1 else "RGB")
  w, h = pil.size
  if crop == "center" and w != h:
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    pil = pil.crop((left, top, left + s, top + s))
  if pil.size != (image_size, image_size):
    # Pillow's resize widens the filter support when downsampling, i.e. it
    # antialiases, unlike a plain bilinear lookup.
    pil = pil.resize((image_size, image_size), Image.Resampling.BILINEAR)
  out = np.asarray(pil, dtype=np.uint8)
  if out.ndim == 2:
    out = out[..., None]
  return out


# ---------------------------------------------------------------------------
# Sources.


class ArraySource:
  """Source over in-memory arrays.

  Args:
    images: uint8 [N, H, W, C].
    labels: int [N]; -1 where unlabelled.
    num_classes: number of classes, 0 if unlabelled.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int):
    if images.ndim != 4 or images.dtype != np.uint8:
      raise DataError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    if len(labels) != len(images):
      raise DataError(f"{len(images)} images but {len(labels)} labels")
    self.images = images
    self.labels = np.asarray(labels, dtype=np.int64)
    self.num_classes = int(num_classes)
    self.image_shape = tuple(int(d) for d in images.shape[1:])

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    return self.images[index], int(self.labels[index])


def digits_source(image_size: int = 8, channels: int = 1) -> ArraySource:
  """scikit-learn's handwritten digits: 1,797 real 8x8 images, labels 0..9.

  The data ships inside scikit-learn, so this needs no network.

  Args:
    image_size: output size; 8 is native, anything else is a bilinear resize.
    channels: 1, or 3 to repeat the grey channel.

  Returns:
    ArraySource with images uint8 [1797, image_size, image_size, channels].
  """
  from sklearn import datasets  # Lazy: sklearn import costs ~1 s.

  _validate_image_config(image_size, channels, "center")
  digits = datasets.load_digits()
  # Pixel values are counts 0..16; map them onto the full uint8 range.
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  if images.shape[1:] != (image_size, image_size, channels):
    images = np.stack([convert_image(im, image_size, channels) for im in images])
  return ArraySource(images, digits.target.astype(np.int64), num_classes=10)


class FolderSource:
  """Unlabelled images found recursively under a folder.

  Files with extensions in IMAGE_EXTENSIONS (any case) are used; hidden files
  and folders (name starting with ".", e.g. macOS "._x.jpg" sidecars) are
  skipped. Paths are sorted so that index i names the same file on every
  machine. Images are decoded lazily on access and cached when the whole
  dataset fits in `_FOLDER_CACHE_BYTES`.

  Args:
    path: folder to scan.
    image_size: output height and width.
    channels: 1 or 3.
    crop: "center" or "none" (see `convert_image`).
  """

  num_classes = 0

  def __init__(self, path: str, image_size: int, channels: int, crop: str = "center"):
    _validate_image_config(image_size, channels, crop)
    if not path:
      raise DataError("data.name='folder' needs data.path: "
                      "set --config.data.path=/dir/with/images")
    root = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(root):
      raise DataError(f"image folder {root} does not exist: "
                      "point --config.data.path at a folder of images")
    self.root = root
    self.files = _scan_images(root)
    if not self.files:
      raise DataError(
          f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {root}: "
          "put images there or fix --config.data.path")
    self.image_size = image_size
    self.channels = channels
    self.crop = crop
    self.image_shape = (image_size, image_size, channels)
    per_image = image_size * image_size * channels
    self._cache = {} if per_image * len(self.files) <= _FOLDER_CACHE_BYTES else None

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    index = int(index)
    if self._cache is not None and index in self._cache:
      return self._cache[index], -1
    path = self.files[index]
    try:
      with Image.open(path) as pil:
        pil.load()
        # Photos store rotation in EXIF; apply it so images are upright.
        pil = ImageOps.exif_transpose(pil)
        image = convert_image(pil, self.image_size, self.channels, self.crop)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
      raise DataError(f"cannot decode image file {path}: {e}; delete or replace it") from e
    if self._cache is not None:
      self._cache[index] = image
    return image, -1


def _scan_images(root: str) -> list[str]:
  """Returns sorted paths of image files under root, following symlinks once."""
  found = []
  seen = set()
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    real = os.path.realpath(dirpath)
    if real in seen:  # A symlink loop: do not descend again.
      dirnames[:] = []
      continue
    seen.add(real)
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    for f in filenames:
      if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
        found.append(os.path.join(dirpath, f))
  # Sort by path relative to root so the order does not depend on where the
  # folder is mounted or on the file system's listing order.
  return sorted(found, key=lambda p: os.path.relpath(p, root).replace(os.sep, "/"))


class TfdsSource:
  """A prepared TFDS dataset read by random access (`tfds.data_source`).

  Records come back already decoded to NumPy by TFDS (no TensorFlow needed).
  The dataset must already be prepared in ArrayRecord format; this class never
  downloads, because TFDS would otherwise sit in minutes of network retries on
  an offline machine.

  Args:
    name: TFDS name, optionally with config/version ("cifar10", "celeb_a").
    split: split string, e.g. "train" or "train[:90%]".
    data_dir: TFDS data_dir; "" for TFDS' default (~/tensorflow_datasets or
      $TFDS_DATA_DIR).
    image_size: output height and width.
    channels: 1 or 3.
    crop: "center" or "none".
    image_key: feature holding the image.
    label_key: feature holding a ClassLabel; "" when not using labels.
  """

  def __init__(self, name: str, split: str, data_dir: str, image_size: int, channels: int,
               crop: str = "center", image_key: str = "image", label_key: str = "label"):
    _validate_image_config(image_size, channels, crop)
    import tensorflow_datasets as tfds  # Lazy: ~1 s import, unused by digits/folder.

    data_dir = os.path.expanduser(data_dir) if data_dir else None
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      names = tfds.list_builders(with_community_datasets=False)
      close = difflib.get_close_matches(name, names, n=3)
      hint = f" (close TFDS names: {', '.join(close)})" if close else ""
      raise DataError(
          f"unknown dataset {name!r}: data.name must be 'digits', 'folder' or "
          f"a TFDS dataset name{hint}") from None
    root = data_dir or tfds.core.constants.get_default_data_dir()
    if not builder.is_prepared():
      raise DataError(
          f"TFDS dataset {name!r} is not prepared in data_dir {root} "
          f"(looked for {builder.data_dir}); on a machine with internet run: "
          f"pip install tensorflow && tfds build {name} --data_dir {root} "
          f"--file_format=array_record, then copy {root} here")
    features = builder.info.features
    if image_key not in features:
      raise DataError(
          f"TFDS dataset {name!r} has no feature {image_key!r} (data.image_key); "
          f"features: {', '.join(features.keys())}")
    if label_key:
      if label_key not in features:
        raise DataError(
            f"TFDS dataset {name!r} has no feature {label_key!r} (data.label_key); "
            f"features: {', '.join(features.keys())}; "
            "set --config.data.label_key='' to train without labels")
      num_classes = getattr(features[label_key], "num_classes", None)
      if not num_classes:
        raise DataError(f"TFDS feature {name}/{label_key} is not a ClassLabel; "
                        "set --config.data.label_key='' to train without labels")
      self.num_classes = int(num_classes)
    else:
      self.num_classes = 0
    try:
      self._ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except NotImplementedError as e:
      # Prepared, but only as TFRecord, which has no random access.
      raise DataError(
          f"TFDS dataset {name!r} in {builder.data_dir} is not in ArrayRecord "
          f"format ({_one_line(e)}); rebuild it with: tfds build {name} --data_dir {root} "
          "--file_format=array_record") from e
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise DataError(f"cannot open TFDS {name!r} split {split!r} in {builder.data_dir}: "
                      f"{_one_line(e)}") from e
    self.name = name
    self.image_key = image_key
    self.label_key = label_key
    self.image_size = image_size
    self.channels = channels
    self.crop = crop
    self.image_shape = (image_size, image_size, channels)

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    record = self._ds[int(index)]
    image = np.asarray(record[self.image_key])
    image = convert_image(image, self.image_size, self.channels, self.crop)
    label = int(record[self.label_key]) if self.label_key else -1
    return image, label


def _one_line(error: BaseException) -> str:
  # TFDS messages span lines; DataError messages stay one line for logs.
  return " ".join(str(error).split())


def make_source(data_config: Any) -> Source:
  """Builds the source named by `data_config.name`.

  Args:
    data_config: the `config.data` group (name, image_size, channels, path,
      data_dir, split, crop, image_key, label_key).

  Returns:
    A Source whose images are uint8 [image_size, image_size, channels].

  Raises:
    DataError: bad config, unknown name, unprepared TFDS dataset, empty folder.
  """
  c = data_config
  name = c.name
  _validate_image_config(c.image_size, c.channels, c.crop)
  if name == "digits":
    return digits_source(c.image_size, c.channels)
  if name == "folder":
    return FolderSource(c.path, c.image_size, c.channels, c.crop)
  if not name:
    raise DataError("data.name is empty: use 'digits', 'folder' or a TFDS dataset name")
  return TfdsSource(name, c.split, c.data_dir, c.image_size, c.channels, c.crop,
                    c.image_key, c.label_key)


# ---------------------------------------------------------------------------
# Deterministic batching.


def _seed_entropy(seed: int) -> int:
  # SeedSequence wants non-negative ints; wrap negatives deterministically.
  return int(seed) % 2**64


@functools.lru_cache(maxsize=4)
def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  """The order in which epoch `epoch` visits the n examples.

  Defined as `np.random.default_rng([seed, 0, epoch]).permutation(n)`; cached
  (read-only) because consecutive steps mostly share an epoch.

  Args:
    n: dataset size.
    seed: run seed (negative seeds are taken modulo 2**64).
    epoch: epoch number >= 0.

  Returns:
    int64 [n], a permutation of 0..n-1 (read-only).
  """
  rng = np.random.default_rng([_seed_entropy(seed), _PERMUTATION_TAG, int(epoch)])
  perm = rng.permutation(n).astype(np.int64)
  perm.flags.writeable = False
  return perm


def global_batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Dataset indices of the global batch at `step`.

  The batch is positions `step*B .. step*B+B-1` of the concatenation of
  `epoch_permutation(n, seed, e)` for e = 0, 1, 2, ...; a batch that crosses an
  epoch boundary takes the tail of one epoch and the head of the next.

  Args:
    n: dataset size (> 0).
    batch_size: global batch size B (> 0; may exceed n).
    seed: run seed.
    step: training step (>= 0).

  Returns:
    int64 [B] indices into the dataset.
  """
  n, batch_size, step = int(n), int(batch_size), int(step)
  if n <= 0:
    raise DataError("the dataset is empty")
  if batch_size <= 0:
    raise DataError(f"batch_size must be positive, got {batch_size}")
  if step < 0:
    raise DataError(f"step must be >= 0, got {step}")
  # Python ints: step * B can exceed int64 only absurdly late, but stay exact.
  start, end = step * batch_size, (step + 1) * batch_size
  parts = []
  for epoch in range(start // n, (end - 1) // n + 1):
    lo = max(start, epoch * n) - epoch * n
    hi = min(end, (epoch + 1) * n) - epoch * n
    parts.append(epoch_permutation(n, seed, epoch)[lo:hi])
  return np.concatenate(parts)


def flip_mask(batch_size: int, seed: int, step: int) -> np.ndarray:
  """Which rows of the global batch at `step` are mirrored horizontally.

  A function of (seed, step, row) only, so it does not depend on how many
  processes share the batch.

  Returns:
    bool [batch_size].
  """
  rng = np.random.default_rng([_seed_entropy(seed), _FLIP_TAG, int(step)])
  return rng.random(int(batch_size)) < 0.5


def _check_sharding(batch_size: int, process_index: int, process_count: int) -> None:
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise DataError(f"bad process_index={process_index} for process_count={process_count}")
  if batch_size % process_count:
    raise DataError(
        f"global batch size {batch_size} does not divide by {process_count} "
        "processes; set --config.training.batch_size to a multiple of it")


def get_batch(source: Source, step: int, *, batch_size: int, seed: int, random_flip: bool,
              process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
  """This process's share of the global batch at `step`.

  Process p of P gets rows [p*B/P, (p+1)*B/P) of the global batch.

  Args:
    source: dataset.
    step: training step (>= 0).
    batch_size: GLOBAL batch size B (divisible by process_count).
    seed: run seed.
    random_flip: mirror rows chosen by `flip_mask`.
    process_index: this process, in [0, process_count).
    process_count: number of processes sharing the batch.

  Returns:
    dict with `image`: float32 [B/P, H, W, C] in [-1, 1] (u8 / 127.5 - 1) and
    `label`: int32 [B/P] (-1 for unlabelled data).
  """
  _check_sharding(batch_size, process_index, process_count)
  rows = slice(process_index * batch_size // process_count,
               (process_index + 1) * batch_size // process_count)
  indices = global_batch_indices(len(source), batch_size, seed, step)[rows]
  items = [source[i] for i in indices]
  images = np.stack([im for im, _ in items])
  labels = np.array([lb for _, lb in items], dtype=np.int32)
  if random_flip:
    flips = flip_mask(batch_size, seed, step)[rows]
    images[flips] = images[flips, :, ::-1]
  images = images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
  return {"image": images, "label": labels}


class _Failure:
  """Carries an exception from the prefetch thread to the consumer."""

  def __init__(self, error: BaseException):
    self.error = error


class Loader:
  """Iterator over `(step, batch)` from `start_step` on, prefetched in a thread.

  A daemon thread builds batches with `get_batch` into a bounded queue, so the
  training loop finds the next batch ready while the accelerator works. An
  exception in the thread is re-raised by the consumer's next `next()`. Call
  `close()` (or use `with Loader(...) as loader:`) to stop the thread.

  Args:
    source: dataset.
    start_step: first step to yield (e.g. the restored checkpoint step).
    batch_size: GLOBAL batch size.
    seed: run seed.
    random_flip: see `get_batch`.
    process_index: this process.
    process_count: number of processes.
    prefetch: batches kept ready ahead of the consumer (>= 1).
  """

  def __init__(self, source: Source, start_step: int = 0, *, batch_size: int, seed: int,
               random_flip: bool = False, process_index: int = 0, process_count: int = 1,
               prefetch: int = 2):
    # Validate here so a bad config fails in the caller, not in the thread.
    _check_sharding(batch_size, process_index, process_count)
    if start_step < 0:
      raise DataError(f"start_step must be >= 0, got {start_step}")
    if prefetch < 1:
      raise DataError(f"prefetch must be >= 1, got {prefetch}")
    self._kwargs = dict(batch_size=batch_size, seed=seed, random_flip=random_flip,
                        process_index=process_index, process_count=process_count)
    self._source = source
    self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(target=self._work, args=(int(start_step),),
                                    name="ddx-data-loader", daemon=True)
    self._thread.start()

  def _put(self, item: Any) -> bool:
    """Enqueues item, giving up (False) once close() was called."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.05)
        return True
      except queue.Full:
        pass
    return False

  def _work(self, step: int) -> None:
    try:
      while not self._stop.is_set():
        batch = get_batch(self._source, step, **self._kwargs)
        if not self._put((step, batch)):
          return
        step += 1
    except BaseException as e:  # pylint: disable=broad-except
      self._put(_Failure(e))

  def __iter__(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    return self

  def __next__(self) -> tuple[int, dict[str, np.ndarray]]:
    while not self._done:
      try:
        item = self._queue.get(timeout=0.05)
      except queue.Empty:
        if self._stop.is_set():
          break
        continue
      if isinstance(item, _Failure):
        self.close()
        raise item.error
      return item
    raise StopIteration

  def close(self, timeout: float = 10.0) -> None:
    """Stops the prefetch thread and drops queued batches; idempotent."""
    self._done = True
    self._stop.set()
    deadline = time.monotonic() + timeout
    # Drain so a thread blocked in put() notices the stop promptly.
    while self._thread.is_alive() and time.monotonic() < deadline:
      try:
        while True:
          self._queue.get_nowait()
      except queue.Empty:
        pass
      self._thread.join(timeout=0.05)

  @property
  def alive(self) -> bool:
    """Whether the prefetch thread is still running."""
    return self._thread.is_alive()

  def __enter__(self) -> "Loader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
