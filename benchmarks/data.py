"""Input pipeline throughput: the grain Loader (0, 1, 2 workers) vs the loader of 517a35e.

  python benchmarks/data.py --out benchmarks/data.json

No model: images/s that `Loader` delivers (read, decode, crop/resize, flip,
scale to [-1, 1]) for

* a folder of 2,000 generated 96x96 JPEGs at image_size 64 (batch 64, flips on),
* a mock TFDS cifar10 (`tfds.testing.mock_data`, 2,000 records) resized to 64 (batch 64),
* the digits default (in memory, batch 128), where the old loader was already fast.

The baseline is `ddx/data.py` as of commit 517a35e (one prefetch thread calling
`get_batch`), read from git into a temporary module so both loaders run in this
process, one after the other, on the same files. Its decoded-image cache is off
for the folder rows: the pipeline is for folders larger than that 512 MB cache
(63k faces at 64x64 are 774 MB; ImageNet), which the old loader decoded every
epoch. A last row runs it with the cache on, for the record.

Each loader is timed from its first batch (so worker start-up is excluded and
reported separately as `first_batch_s`) over `--epochs` epochs of batches.
Every loader's batches are checked equal to `get_batch`'s for the same steps
on the first step, so the rows compare the same work.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from unittest import mock

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

BASELINE_COMMIT = "517a35e"


def old_data_module(tmp: str):
  """ddx/data.py at BASELINE_COMMIT, imported as a standalone module."""
  try:
    text = subprocess.run(["git", "-C", _ROOT, "show", f"{BASELINE_COMMIT}:ddx/data.py"],
                          check=True, capture_output=True, text=True).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    sys.exit(f"benchmarks/data.py: cannot read ddx/data.py at {BASELINE_COMMIT} from git "
             f"({e}); run it inside the ddx git checkout")
  path = os.path.join(tmp, f"ddx_data_{BASELINE_COMMIT}.py")
  with open(path, "w") as f:
    f.write(text)
  spec = importlib.util.spec_from_file_location(f"ddx_data_{BASELINE_COMMIT}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def write_jpegs(root: str, count: int, size: int = 96, seed: int = 0) -> None:
  """count size x size JPEGs: a colour gradient, a few shapes, blur and noise."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  for i in range(count):
    a, b, c = rng.uniform(0, 255, (3, 3))
    base = np.stack([a[k] + (b[k] - a[k]) * xx + (c[k] - a[k]) * yy for k in range(3)], -1)
    pil = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(rng.integers(2, 6)):
      x0, y0 = rng.integers(0, size - 8, 2)
      x1, y1 = x0 + rng.integers(8, size // 2), y0 + rng.integers(8, size // 2)
      fill = tuple(int(v) for v in rng.integers(0, 256, 3))
      (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    pil = pil.filter(ImageFilter.GaussianBlur(1))
    noisy = np.asarray(pil, np.int16) + rng.integers(-12, 13, (size, size, 3))
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(
        os.path.join(root, f"{i:05d}.jpg"), quality=90)


def cpu_seconds() -> float:
  """CPU time (user + system) of this process and its live worker processes."""
  t = os.times()
  total = t.user + t.system
  tick = os.sysconf("SC_CLK_TCK")
  for child in multiprocessing.active_children():
    try:
      with open(f"/proc/{child.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    except (OSError, IndexError, ValueError):
      pass
  return total


def time_loader(loader, batch_size: int, num_batches: int, reference=None) -> dict:
  """Times num_batches after the first; checks the first against `reference`.

  Besides wall-clock images/s it reports CPU milliseconds per image (this
  process and its workers, over the timed batches): on a shared machine the
  wall clock depends on the neighbours, the CPU cost much less.
  """
  t0 = time.perf_counter()
  step, batch = next(loader)
  first = time.perf_counter() - t0
  if reference is not None:
    want = reference(step)
    np.testing.assert_array_equal(batch["image"], want["image"])
    np.testing.assert_array_equal(batch["label"], want["label"])
  t1, c1 = time.perf_counter(), cpu_seconds()
  for _ in range(num_batches):
    next(loader)
  seconds, cpu = time.perf_counter() - t1, cpu_seconds() - c1
  loader.close()
  images = num_batches * batch_size
  return {"first_batch_s": round(first, 2), "seconds": round(seconds, 2),
          "images_per_s": round(images / seconds, 1),
          "cpu_ms_per_image": round(1000 * cpu / images, 3)}


def compare(name, old, new, old_source, new_source, *, batch_size, epochs, workers,
            old_cache_row=None) -> list[dict]:
  """Rows for one dataset: the old loader, then the grain Loader per worker count."""
  num_batches = max(1, epochs * len(new_source) // batch_size)
  kw = dict(batch_size=batch_size, seed=0, random_flip=True)
  ref = lambda step: new.get_batch(new_source, step, **kw)  # noqa: E731
  rows = [dict(dataset=name, loader=f"{BASELINE_COMMIT} (1 thread)",
               **time_loader(old.Loader(old_source, 0, **kw), batch_size, num_batches, ref))]
  for w in workers:
    loader = new.Loader(new_source, 0, num_workers=w, **kw)
    rows.append(dict(dataset=name, loader=f"grain, {w} workers",
                     **time_loader(loader, batch_size, num_batches, ref)))
  if old_cache_row is not None:
    rows.append(dict(dataset=name, loader=f"{BASELINE_COMMIT}, decoded-image cache on",
                     **time_loader(old.Loader(old_cache_row, 0, **kw), batch_size,
                                   num_batches, ref)))
  base = rows[0]["images_per_s"]
  for r in rows:
    r["vs_old"] = round(r["images_per_s"] / base, 2)
    print(json.dumps(r), flush=True)
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--images", type=int, default=2000)
  ap.add_argument("--epochs", type=int, default=3, help="epochs of batches timed per loader")
  ap.add_argument("--workers", default="0,1,2")
  ap.add_argument("--skip", default="", help="comma list of folder,tfds,digits to skip")
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  workers = [int(w) for w in args.workers.split(",")]
  skip = set(filter(None, args.skip.split(",")))

  from ddx import data as new  # after sys.path: this checkout's ddx
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    old = old_data_module(tmp)
    if "folder" not in skip:
      folder = os.path.join(tmp, "jpegs")
      os.makedirs(folder)
      t0 = time.perf_counter()
      write_jpegs(folder, args.images)
      print(f"wrote {args.images} JPEGs in {time.perf_counter() - t0:.1f} s", flush=True)
      old_cache_bytes = old._FOLDER_CACHE_BYTES
      old._FOLDER_CACHE_BYTES = 0  # decode every epoch, as for a large folder
      old_source = old.FolderSource(folder, 64, 3)
      old._FOLDER_CACHE_BYTES = old_cache_bytes
      rows += compare("folder: 2,000 96x96 JPEGs -> 64x64", old, new, old_source,
                      new.FolderSource(folder, 64, 3), batch_size=64, epochs=args.epochs,
                      workers=workers, old_cache_row=old.FolderSource(folder, 64, 3))
    if "tfds" not in skip:
      import tensorflow_datasets as tfds
      with mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", lambda self: True), \
          tfds.testing.mock_data(num_examples=args.images,
                                 policy=tfds.testing.MockPolicy.USE_CODE):
        make = lambda m: m.TfdsSource("cifar10", "train", tmp, 64, 3)  # noqa: E731
        rows += compare("mock tfds cifar10 32x32 -> 64x64", old, new, make(old), make(new),
                        batch_size=64, epochs=args.epochs, workers=workers)
    if "digits" not in skip:
      rows += compare("digits (in memory) at 8x8", old, new, old.digits_source(),
                      new.digits_source(), batch_size=128, epochs=100, workers=[0])
  if args.out:
    out = {"cores": new.available_cores(), "grain": _version("grain"),
           "python": sys.version.split()[0], "rows": rows}
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)


def _version(name: str) -> str:
  from importlib import metadata
  return metadata.version(name)


if __name__ == "__main__":  # worker processes are spawned and import this file
  main()
