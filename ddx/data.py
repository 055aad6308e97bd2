"""Image datasets and the grain input pipeline of deterministic, resumable global batches.

A *source* is a random-access list of `(image uint8 [H, W, C], label int)`
pairs: a grain random-access data source (`__len__`, `__getitem__`). Three kinds
exist, picked by `config.data.name` in `make_source`:

* `digits`: scikit-learn's 1,797 real 8x8 handwritten digits (no download).
* `folder`: every image file under `config.data.path`, unlabelled.
* any other name: a prepared TFDS dataset read with `tfds.data_source`
  (ArrayRecord random access; TensorFlow is not needed).

Any other object with `num_classes`, `image_shape`, `__len__` and `__getitem__`
plugs into the same pipeline; one with `read_transforms(seed)` replaces the
read/flip/scale stages by its own (the latent cache, `ddx.latents`).

Batches are a pure function of `(seed, step)`: the global batch at step k holds
positions `k*B .. k*B+B-1` of the endless stream made by concatenating one
seeded permutation of the dataset per epoch, and `flip_mask` says which rows are
mirrored. Resuming at step k therefore reproduces exactly the batches an
uninterrupted run would have seen, with no saved iterator state; every process
computes the same global batch and reads only its own rows.

`Loader` runs this as a grain pipeline: one element per step, made by grain
transforms (plan the rows, read and decode them, flip, scale to [-1, 1]) in
`num_workers` worker processes (`grain.IterDataset.mp_prefetch`, spawned, so
safe after JAX has started threads) or, with 0 workers, in a background
thread. Worker `w` of `W` builds steps `start + w, start + w + W, ...` and grain
interleaves them back in step order, so the batches do not depend on `W`.

An image file that cannot be decoded is replaced by the next readable file in
file order (deterministically), logged once by name and counted in
`Loader.skipped`; a dataset where nothing can be read is a `DataError`.

Host-side data work never touches the accelerator: this module uses NumPy,
PIL and grain (plus TFDS when a TFDS dataset is named).
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import sys
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

import grain
import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

# `data.num_workers` / `Loader(num_workers=...)` value meaning "choose from the
# source and the core count" (see `default_num_workers`).
AUTO_WORKERS = -1

# More workers than this rarely help one accelerator host, and each is a whole
# Python process (its start-up imports the main module, JAX included).
_MAX_AUTO_WORKERS = 16

_log = logging.getLogger(__name__)

# Seed-sequence tags keep the per-epoch permutation stream and the per-step
# flip stream independent even when an epoch number equals a step number.
_PERMUTATION_TAG = 0
_FLIP_TAG = 1


class DataError(ValueError):
  """A dataset is missing, misconfigured or unreadable; the message says how to fix it."""


class UnreadableImageError(DataError):
  """One record of a source cannot be decoded; the pipeline replaces it.

  Attributes:
    path: the file (or record name) that failed.
    reason: why, on one line.
  """

  def __init__(self, path: str, reason: str):
    super().__init__(f"cannot decode image file {path}: {reason}; delete or replace it")
    self.path = path
    self.reason = reason

  def __reduce__(self):
    # Travels from worker processes by pickle: rebuild from the two fields.
    return UnreadableImageError, (self.path, self.reason)


@runtime_checkable
class Source(Protocol):
  """Random-access image dataset (also a grain `RandomAccessDataSource`).

  `__getitem__` may raise `UnreadableImageError` for a record that cannot be
  decoded; the pipeline then substitutes another record. A source may also
  define `read_batch(indices) -> (images uint8 [k, H, W, C], labels int [k])`,
  a vectorised read used instead of k `__getitem__` calls (in-memory arrays),
  and `in_memory = True` so that `default_num_workers` picks no workers.

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

  # Reads are array lookups: worker processes would only add copying.
  in_memory = True

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

  def read_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows `indices` at once: (uint8 [k, H, W, C], int64 [k]), fresh copies."""
    return self.images[indices], self.labels[indices]


def digits_source(image_size: int = 8, channels: int = 1) -> ArraySource:
  """scikit-learn's handwritten digits: 1,797 real 8x8 images, labels 0..9.

  The data ships inside scikit-learn, so this needs no network.

  Args:
    image_size: output size; 8 is native, anything else is a bilinear resize.
    channels: 1, or 3 to repeat the grey channel.

  Returns:
    ArraySource with images uint8 [1797, image_size, image_size, channels].
  """
  _validate_image_config(image_size, channels, "center")
  images, labels = load_digits()
  if images.shape[1:] != (image_size, image_size, channels):
    images = np.stack([convert_image(im, image_size, channels) for im in images])
  return ArraySource(images, labels, num_classes=10)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits as ddx trains on them: (uint8 [1797, 8, 8, 1], labels
  int64). Pixel values are counts 0..16, mapped onto the full uint8 range.

  Read from the CSV that ships inside scikit-learn without importing it (the
  import costs about 0.7 s of every run's start); scikit-learn's own loader is
  the fallback should that file move."""
  import importlib.util
  spec = importlib.util.find_spec("sklearn")
  for root in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(root, "datasets", "data", "digits.csv.gz")
    if os.path.exists(path):
      table = np.loadtxt(path, delimiter=",")
      counts, labels = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
      break
  else:
    from sklearn import datasets
    d = datasets.load_digits()
    counts, labels = d.images, d.target
  images = np.round(counts * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return images, labels.astype(np.int64)


class FolderSource:
  """Unlabelled images found recursively under a folder.

  Files with extensions in IMAGE_EXTENSIONS (any case) are used; hidden files
  and folders (name starting with ".", e.g. macOS "._x.jpg" sidecars) are
  skipped. Paths are sorted so that index i names the same file on every
  machine. Images are decoded on access (in the loader's worker processes);
  a file that cannot be decoded raises `UnreadableImageError`.

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

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    path = self.files[int(index)]
    try:
      with Image.open(path) as pil:
        pil.load()
        # Photos store rotation in EXIF; apply it so images are upright.
        pil = ImageOps.exif_transpose(pil)
        image = convert_image(pil, self.image_size, self.channels, self.crop)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
      raise UnreadableImageError(path, " ".join(str(e).split())) from e
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


def _local_rows(batch_size: int, process_index: int, process_count: int) -> slice:
  """Rows [p*B/P, (p+1)*B/P) of the global batch: process p's share."""
  return slice(process_index * batch_size // process_count,
               (process_index + 1) * batch_size // process_count)


# ---------------------------------------------------------------------------
# The pipeline's transforms. Each maps one step's element (a dict) to the next;
# the Loader runs them as grain transforms (in worker processes when asked) and
# get_batch calls them directly, so both produce the same arrays.


class PlanBatch(grain.transforms.Map):
  """step -> which dataset rows this process reads and which it mirrors.

  Args:
    num_examples: dataset size n.
    batch_size: GLOBAL batch size B.
    seed: run seed.
    random_flip: whether rows are mirrored per `flip_mask`.
    process_index: this process, in [0, process_count).
    process_count: processes sharing the batch.
  """

  def __init__(self, num_examples: int, batch_size: int, seed: int, random_flip: bool,
               process_index: int = 0, process_count: int = 1):
    _check_sharding(batch_size, process_index, process_count)
    self.num_examples = int(num_examples)
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.random_flip = bool(random_flip)
    self.rows = _local_rows(batch_size, process_index, process_count)

  def map(self, step: int) -> dict[str, Any]:
    """Returns {"step": int, "index": int64 [b], "flip": bool [b], "row0": int},
    b = B/P; row0 is the global batch row of this process's first row."""
    step = int(step)
    index = global_batch_indices(self.num_examples, self.batch_size, self.seed, step)
    flip = (flip_mask(self.batch_size, self.seed, step) if self.random_flip
            else np.zeros(self.batch_size, bool))
    return {"step": step, "index": index[self.rows], "flip": flip[self.rows],
            "row0": self.rows.start}


class ReadImages(grain.transforms.Map):
  """Reads (and so decodes, converts, crops and resizes) the planned rows.

  A row whose record raises `UnreadableImageError` is replaced by the next
  readable index in file order (i+1, i+2, ... mod n), so the batch stays a
  function of (seed, step) and of which files are readable. Indices found bad
  are remembered by this transform (one per worker process).

  The images array it adds is always a fresh array (never a view of the
  source's), so later transforms may change it in place.

  Args:
    source: the dataset.
  """

  def __init__(self, source: Source):
    self.source = source
    self._bad: dict[int, UnreadableImageError] = {}

  def __getstate__(self):
    # Workers start with an empty memory of bad indices.
    return {"source": self.source, "_bad": {}}

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    """Adds "image": uint8 [b, H, W, C], "label": int32 [b] and "skipped":
    the unreadable files of the replaced rows (one entry per row; a tuple)."""
    index = element["index"]
    read_batch = getattr(self.source, "read_batch", None)
    if read_batch is not None:
      images, labels = read_batch(index)
      skipped = ()
    else:
      items = [self._read(int(i)) for i in index]
      images = np.stack([image for image, _ in items])
      labels = [label for _, label in items]
      skipped = tuple(self._bad[int(i)].path for i in index if int(i) in self._bad)
    return dict(element, image=images, label=np.asarray(labels, np.int32), skipped=skipped)

  def _read(self, index: int) -> tuple[np.ndarray, int]:
    """Record `index`, or the next readable one after it."""
    n = len(self.source)
    for k in range(n):
      i = (index + k) % n
      if i in self._bad:
        continue
      try:
        return self.source[i]
      except UnreadableImageError as e:
        self._bad[i] = e
    first = self._bad[min(self._bad)]
    raise DataError(f"none of the {n} images can be read (e.g. {first.path}: "
                    f"{first.reason}); replace the files or point the config at other data")


class FlipRows(grain.transforms.Map):
  """Mirrors (left-right) the rows whose "flip" is set; a no-op otherwise."""

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    flip = element["flip"]
    if flip.any():
      images = element["image"]  # ReadImages made it: ours to change
      images[flip] = images[flip, :, ::-1]
    return element


def to_float(images: np.ndarray) -> np.ndarray:
  """uint8 images -> the float32 values in [-1, 1] that training sees (u8 / 127.5 - 1)."""
  return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


class ToFloat(grain.transforms.Map):
  """uint8 images -> float32 in [-1, 1] (u8 / 127.5 - 1); keeps what the model uses."""

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    images = to_float(element["image"])
    return {"step": element["step"], "image": images, "label": element["label"],
            "skipped": element["skipped"]}


def _transforms(source: Source, batch_size: int, seed: int, random_flip: bool,
                process_index: int, process_count: int) -> list[grain.transforms.Map]:
  """PlanBatch, then the source's own reading transforms if it has them
  (`read_transforms(seed)`, e.g. a latent cache), else read, flip, to float."""
  plan = PlanBatch(len(source), batch_size, seed, random_flip, process_index, process_count)
  own = getattr(source, "read_transforms", None)
  return [plan] + (list(own(seed)) if own is not None
                   else [ReadImages(source), FlipRows(), ToFloat()])


def _warn_skipped(paths: Sequence[str], warned: set[str] | None = None) -> None:
  """Logs one warning per unreadable file not yet in `warned` (then adds it)."""
  for path in dict.fromkeys(paths):
    if warned is None or path not in warned:
      _log.warning("skipping unreadable image %s (replaced by the next readable file; "
                   "delete or replace it)", path)
      if warned is not None:
        warned.add(path)


def get_batch(source: Source, step: int, *, batch_size: int, seed: int, random_flip: bool,
              process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
  """This process's share of the global batch at `step`, built in this thread.

  Process p of P gets rows [p*B/P, (p+1)*B/P) of the global batch. Unreadable
  images are replaced (see `ReadImages`) and logged. `Loader` yields exactly
  these arrays.

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
  element = step
  for transform in _transforms(source, batch_size, seed, random_flip, process_index,
                               process_count):
    element = transform.map(element)
  _warn_skipped(element["skipped"])
  return {"image": element["image"], "label": element["label"]}


# diffusion.sigma_data = "auto" (`value_std`): datasets of at most this many
# images are measured whole, larger ones on a fixed seeded choice of this many.
STD_MAX_IMAGES = 10_000
# The choice's seed is fixed, not the run's: runs that differ only in
# training.seed measure the same σ_data.
_STD_SEED = 0
_STD_CHUNK = 1000   # images read at a time


def value_std(source: Source, max_images: int = STD_MAX_IMAGES) -> float:
  """The standard deviation of the values the model trains on: σ_data.

  Pooled over every pixel and channel (one number, as EDM's σ_data), about
  their mean, accumulated in float64. Pixels are the [-1, 1] floats training
  sees (`to_float`); flips do not change them. A source with
  `value_moments(index) -> (mean, var)`, each float64 [k, ...] (the latent
  cache: what training draws for each row is mean + sqrt(var)·ε), gives the
  pooled variance mean(var) + Var(mean). Unreadable images are left out.
  Deterministic: all images when len(source) <= max_images, else the
  max_images of a permutation seeded with _STD_SEED.

  Args:
    source: the training source.
    max_images: the most images read.

  Returns:
    σ_data > 0 as a Python float.
  """
  n = len(source)
  index = np.arange(n)
  if n > max_images:
    rng = np.random.default_rng(_STD_SEED)
    index = np.sort(rng.permutation(n)[:max_images])
  moments = getattr(source, "value_moments", None)
  total = np.zeros(3)   # count, sum, sum of squares (+ the within-row variance)
  for start in range(0, len(index), _STD_CHUNK):
    rows = index[start:start + _STD_CHUNK]
    if moments is not None:
      mean, var = moments(rows)
    else:
      mean = to_float(_read_rows(source, rows)).astype(np.float64)
      var = 0.0
    total += (mean.size, mean.sum(), np.square(mean).sum() + np.sum(var))
  count, s1, s2 = total
  if count == 0:
    raise DataError("no readable image to measure diffusion.sigma_data=auto on; set "
                    "--config.diffusion.sigma_data to a number")
  std = float(np.sqrt(max(s2 / count - (s1 / count) ** 2, 0.0)))
  if not std > 0:
    raise DataError("the training data are constant (standard deviation 0), so "
                    "diffusion.sigma_data=auto cannot be used; set a number")
  return std


def _read_rows(source: Source, rows: np.ndarray) -> np.ndarray:
  """uint8 [k, H, W, C] of the readable images among `rows`."""
  read_batch = getattr(source, "read_batch", None)
  if read_batch is not None:
    return read_batch(rows)[0]
  images = []
  for i in rows:
    try:
      images.append(source[int(i)][0])
    except UnreadableImageError:
      continue
  return (np.stack(images) if images
          else np.zeros((0,) + tuple(source.image_shape), np.uint8))


def available_cores() -> int:
  """CPU cores this process may run on (its affinity mask, e.g. a cgroup's)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def default_num_workers(source: Source) -> int:
  """Worker processes for `num_workers=-1`: 0 for in-memory sources, else cores - 1.

  In-memory sources (`in_memory = True`, e.g. digits) are read by array lookups
  that a worker would only slow down with copying. Decoding sources get one
  worker per core but one, which is left to the training loop, at least 1 and
  at most 16.
  """
  if getattr(source, "in_memory", False):
    return 0
  return max(1, min(_MAX_AUTO_WORKERS, available_cores() - 1))


def _default_grain_profiling_flag() -> None:
  """Lets grain's worker processes start where absl has not parsed flags.

  grain 0.2.18 reads the absl flag --grain_enable_multiprocess_worker_profiling
  when it starts workers with JAX imported, which raises UnparsedFlagAccessError
  in programs that do not run `absl.app` (scripts, notebooks, pytest); grain
  fixed this after 0.2.18 (google/grain#1355). Marking that one flag as given,
  with its default value, changes nothing else; a later parse still sets it.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top

  name = "grain_enable_multiprocess_worker_profiling"
  if name in flags.FLAGS and not flags.FLAGS.is_parsed() and not flags.FLAGS[name].present:
    flags.FLAGS[name].present = 1


class Loader:
  """Iterator over `(step, batch)` from `start_step` on: the grain pipeline.

  Element k of `grain.MapDataset.range(start_step, ...)` is the step; the
  transforms `PlanBatch`, `ReadImages`, `FlipRows`, `ToFloat` turn it into this
  process's batch. With `num_workers` > 0 they run in that many spawned worker
  processes (`mp_prefetch`), each building every W-th step, and batches come
  back through shared memory in step order; with 0 they run in one background
  thread. Either way the batch at step k equals `get_batch(source, k, ...)`.
  Prefetching starts in the constructor, so workers start up while the caller
  goes on with its own set-up. An exception in the pipeline is raised by the next `next()`.
  Call `close()` (or use `with Loader(...) as loader:`) to stop the workers.

  Unreadable images are replaced (see `ReadImages`); each file is logged once
  and `skipped` counts the replaced rows.

  Args:
    source: dataset (picklable when num_workers > 0).
    start_step: first step to yield (e.g. the restored checkpoint step).
    batch_size: GLOBAL batch size.
    seed: run seed.
    random_flip: see `get_batch`.
    process_index: this process.
    process_count: number of processes.
    prefetch: batches kept ready ahead of the consumer, per worker (>= 1).
    num_workers: worker processes; 0 = a thread in this process; -1 =
      `default_num_workers(source)`.

  Attributes:
    num_workers: the resolved number of worker processes.
    skipped: rows replaced because their image could not be read, so far.
    unreadable_files: the distinct files replaced so far (sorted list).
  """

  def __init__(self, source: Source, start_step: int = 0, *, batch_size: int, seed: int,
               random_flip: bool = False, process_index: int = 0, process_count: int = 1,
               prefetch: int = 2, num_workers: int = AUTO_WORKERS):
    # Validate here so a bad config fails in the caller, not in a worker.
    _check_sharding(batch_size, process_index, process_count)
    if start_step < 0:
      raise DataError(f"start_step must be >= 0, got {start_step}")
    if prefetch < 1:
      raise DataError(f"prefetch must be >= 1, got {prefetch}")
    if not isinstance(num_workers, (int, np.integer)) or num_workers < AUTO_WORKERS:
      raise DataError(f"data.num_workers must be an int >= 0, or -1 for one per core, "
                      f"got {num_workers!r}")
    if len(source) <= 0:
      raise DataError("the dataset is empty")
    self.num_workers = (default_num_workers(source) if num_workers == AUTO_WORKERS
                        else int(num_workers))
    self.skipped = 0
    self._warned: set[str] = set()
    self._next_step = int(start_step)
    # Endless in practice; grain wants a finite length (< 2**63).
    ds = grain.MapDataset.range(self._next_step, self._next_step + sys.maxsize // 2)
    for transform in _transforms(source, batch_size, seed, random_flip, process_index,
                                 process_count):
      ds = ds.map(transform)
    # One thread per process builds batches ahead: in a worker it overlaps the
    # hand-over of the previous batch; with no workers it is the prefetch thread.
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
    if self.num_workers:
      _default_grain_profiling_flag()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.num_workers, per_worker_buffer_size=prefetch))
    self._iter = iter(ds)
    self._closed = False
    self._iter.start_prefetch()

  @property
  def unreadable_files(self) -> list[str]:
    return sorted(self._warned)

  def __iter__(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    return self

  def __next__(self) -> tuple[int, dict[str, np.ndarray]]:
    if self._closed:
      raise StopIteration
    try:
      element = next(self._iter)
    except BaseException:
      self.close()
      raise
    step = int(element["step"])
    if step != self._next_step:  # grain's ordering guarantee, checked cheaply
      self.close()
      raise RuntimeError(f"data pipeline returned step {step}, expected {self._next_step}")
    self._next_step += 1
    if element["skipped"]:
      self.skipped += len(element["skipped"])
      _warn_skipped(element["skipped"], self._warned)
    image, label = element["image"], element["label"]
    if self.num_workers:
      # From workers they arrive in shared memory (grain's SharedMemoryArray,
      # unlinked from a thread pool when garbage collected). One copy, in a
      # process that does no decoding, frees each block now, so none is still
      # alive at exit, where Python would warn of leaked shared memory.
      image, label = np.array(image), np.array(label)
    return step, {"image": image, "label": label}

  def close(self) -> None:
    """Stops the workers (or thread) and drops prefetched batches; idempotent."""
    if not self._closed:
      self._closed = True
      self._iter.close()
      self._iter = None  # frees grain's queues and semaphores now, not at exit

  @property
  def alive(self) -> bool:
    """Whether the pipeline is open (not closed, no error raised)."""
    return not self._closed

  def __enter__(self) -> "Loader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
