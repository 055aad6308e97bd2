"""ADM's .npz sample and reference batches: reading, checking, writing.

The format of guided-diffusion's evaluator and sampling scripts, so batches
move between ddx and the field's tools:
  * `arr_0`: uint8 [N, H, W, 3] images (NHWC, RGB), what a sampler wrote or a
    reference batch's images (ADM's references hold 10,000, for precision
    and recall);
  * `arr_1`: int [N] class labels, written for class-conditional samples;
  * `mu`, `sigma`: pool3 mean [2048] and covariance [2048, 2048], and `mu_s`,
    `sigma_s`: the same for sFID's spatial features [2023]; ADM's reference
    files store both pairs, computed over the whole data set, and its
    evaluator prefers them to statistics of `arr_0`.
A file needs images or statistics; each statistics pair is all or nothing.
"""
from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Optional

import numpy as np

STAT_PAIRS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}


class BatchFileError(ValueError):
  """A batch file is missing, unreadable or not in ADM's format; names what and the fix."""


@dataclasses.dataclass(frozen=True)
class ReferenceBatch:
  """What one ADM .npz holds.

  Attributes:
    images: uint8 [N, H, W, C] or None.
    labels: int64 [N] or None.
    stats: {"pool": (mu [D], sigma [D, D]), "spatial": (mu_s, sigma_s)}, float64,
      only the pairs the file stores.
  """
  images: Optional[np.ndarray]
  labels: Optional[np.ndarray]
  stats: dict


def read_batch(path: str) -> ReferenceBatch:
  """Reads and checks an ADM sample or reference batch.

  Args:
    path: an .npz with `arr_0` and/or `mu`/`sigma` (and `mu_s`/`sigma_s`).
  Returns:
    ReferenceBatch; the images are a read-only memory map when the file
    stores them uncompressed (np.savez, ADM's and ddx's writers), else loaded.
  Raises:
    BatchFileError: a one-line message naming the file, what is wrong
      (missing, not an .npz, wrong dtype or rank, a missing key, mismatched
      shapes) and what the file should hold.
  """
  if not os.path.isfile(path):
    raise BatchFileError(f"{path} does not exist; pass an ADM .npz batch "
                         "(arr_0 uint8 [N, H, W, 3] and/or mu, sigma)")
  try:
    with np.load(path, allow_pickle=False) as f:
      # arr_0 can be tens of GB (50,000 ImageNet-512 samples): mapped, not read.
      arrays = {k: f[k] for k in f.files if k != "arr_0"}
      if "arr_0" in f.files:
        mapped = _mapped_member(path, "arr_0")
        arrays["arr_0"] = f["arr_0"] if mapped is None else mapped
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise BatchFileError(f"cannot read {path} as an .npz: {' '.join(str(e).split())}"
                         ) from None
  images = arrays.get("arr_0")
  if images is not None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise BatchFileError(
          f"{path}: arr_0 is {images.dtype} {images.shape}, ADM batches hold uint8 "
          "[N, H, W, 3] images; quantise floats with ddx.to_uint8")
    if len(images) == 0:
      raise BatchFileError(f"{path}: arr_0 holds no images")
  labels = arrays.get("arr_1")
  if labels is not None:
    if images is None:
      raise BatchFileError(f"{path} has labels (arr_1) but no images (arr_0)")
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(images):
      raise BatchFileError(
          f"{path}: arr_1 is {labels.dtype} {labels.shape}, labels must be integers "
          f"[{len(images)}], one per image of arr_0")
    labels = labels.astype(np.int64)
  stats = {}
  for kind, (mu_key, sigma_key) in STAT_PAIRS.items():
    have = [k for k in (mu_key, sigma_key) if k in arrays]
    if not have:
      continue
    if len(have) == 1:
      missing = sigma_key if have == [mu_key] else mu_key
      raise BatchFileError(f"{path} has {have[0]} but no {missing}; statistics come "
                           f"in pairs ({mu_key}, {sigma_key})")
    mu, sigma = arrays[mu_key], arrays[sigma_key]
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
      raise BatchFileError(
          f"{path}: {mu_key} {mu.shape} and {sigma_key} {sigma.shape} do not fit; "
          f"{mu_key} must be [D] and {sigma_key} [D, D]")
    if mu.dtype.kind != "f" or sigma.dtype.kind != "f":
      raise BatchFileError(f"{path}: {mu_key}/{sigma_key} must be floats, got "
                           f"{mu.dtype}/{sigma.dtype}")
    stats[kind] = (mu.astype(np.float64), sigma.astype(np.float64))
  if images is None and not stats:
    raise BatchFileError(
        f"{path} has neither images (arr_0) nor statistics (mu, sigma); its keys are "
        f"{sorted(arrays) or 'none'}")
  return ReferenceBatch(images=images, labels=labels, stats=stats)


def _mapped_member(path: str, name: str) -> Optional[np.ndarray]:
  """A read-only np.memmap of `name` when the .npz stores it uncompressed (as
  np.savez does), so batches are read from disk as they are used; None when
  it is compressed (np.savez_compressed: it must be read whole)."""
  with zipfile.ZipFile(path) as z:
    info = z.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
      return None
    with z.open(info) as member:
      version = np.lib.format.read_magic(member)
      if version not in ((1, 0), (2, 0)):
        return None
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      shape, fortran, dtype = read_header(member)
      npy_header = member.tell()
  if dtype.hasobject:
    return None
  with open(path, "rb") as f:   # the local header's own name and extra lengths
    f.seek(info.header_offset)
    local = f.read(30)
  if local[:4] != b"PK\x03\x04":
    return None
  name_len = int.from_bytes(local[26:28], "little")
  extra_len = int.from_bytes(local[28:30], "little")
  offset = info.header_offset + 30 + name_len + extra_len + npy_header
  if int(np.prod(shape)) == 0:
    return np.zeros(shape, dtype)
  return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                   order="F" if fortran else "C")


def write_batch(path: str, images: np.ndarray, labels: Optional[np.ndarray] = None,
                overwrite: bool = False) -> None:
  """Writes images (and labels) as an ADM sample batch, atomically.

  Args:
    path: the .npz to create.
    images: uint8 [N, H, W, C], C in (1, 3) (`ddx.to_uint8` makes them).
    labels: int [N] class labels for class-conditional samples (arr_1).
    overwrite: replace an existing file; by default an existing file is an
      error and is left untouched.
  Raises:
    BatchFileError: the file exists, or the arrays have the wrong dtype or shape.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise BatchFileError(f"images must be uint8 [N, H, W, 3], got {images.dtype} "
                         f"{images.shape}; quantise floats with ddx.to_uint8")
  arrays = {"arr_0": images}
  if labels is not None:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(images):
      raise BatchFileError(f"labels must be integers [{len(images)}], got "
                           f"{labels.dtype} {labels.shape}")
    arrays["arr_1"] = labels.astype(np.int64)
  if os.path.exists(path) and not overwrite:
    raise BatchFileError(f"{path} already exists; name a new file (or pass "
                         "overwrite=True)")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}.npz"   # np.savez appends .npz to other names
  try:
    np.savez(tmp, **arrays)
    if overwrite:
      os.replace(tmp, path)
    else:
      try:   # a hard link never replaces a file that appeared meanwhile
        os.link(tmp, path)
      except FileExistsError:
        raise BatchFileError(f"{path} already exists; name a new file (or pass "
                             "overwrite=True)") from None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
