"""Latent datasets: a dataset encoded once by the autoencoder, cached on disk, read as batches.

    python -m ddx.main --config CONFIG --mode encode --workdir DIR   # writes the cache
    python -m ddx.main --config CONFIG --workdir DIR                 # trains on it

`--mode encode` reads the pixel dataset `encode.source` (any data.name: digits,
cifar10, a tfds name, or folder with `encode.folder`; the other data.* keys,
image_size, crop, split, data_dir, ..., as usual), encodes every image with
the autoencoder at `autoencoder.path`, and writes the posterior's mean and
standard deviation to the cache at `data.path`. With `encode.flips` the
mirrored image is encoded too, so `data.random_flip` on latents means what it
means on pixels (DiT's recipe flips the image, not the latent).

The cache (local or gs://, through etils.epath):
  plan.json                 what is being written (the meta below), written first
  shard_000000.npy          [n, F, 2, h, w, c] (encode.dtype, float32 or float16):
                            for images k*S .. k*S+n-1, F = 1 (or 2 with flips:
                            the mirrored image second) variants of (mean, std),
                            unscaled
  shard_000000.labels.npy   int32 [n] (-1 = unlabelled)
  latents.json              the meta again, written last: the cache is complete

Shard k is written by process k mod P on its own devices (no collective), to a
temporary name and then renamed, so an interrupted encode resumes by skipping
the shards already there; the plan must match, or the encode is refused and
nothing is touched. The same images, autoencoder and devices give the same
bytes.

Training (`data.name=latents`) reads batches exactly as for pixels: rows and
flips are functions of (seed, step) (`ddx.data`); each row's latent is a
posterior sample z = (mean + std·ε − shift) · scale with ε drawn from (seed,
step, global row), or the mean with `autoencoder.sample_posterior=False`. A
cache made by another autoencoder (its fingerprint), at another image size or
without the flips that data.random_flip needs is refused with one line.
"""
from __future__ import annotations

import io
import json
import time
from typing import Any

import grain
import numpy as np
from etils import epath

from ddx import data as data_lib

META_FILE = "latents.json"
PLAN_FILE = "plan.json"
FORMAT = 1
_LATENT_TAG = 2   # seed-sequence tag of the posterior noise (data.py uses 0 and 1)


def _shard_name(k: int) -> str:
  return f"shard_{k:06d}.npy"


def _labels_name(k: int) -> str:
  return f"shard_{k:06d}.labels.npy"


def _read_json(path: epath.Path, what: str) -> dict:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise data_lib.DataError(f"{what} {path} cannot be read ({' '.join(str(e).split())}); "
                             "delete the cache and encode again") from None


def autoencoder_meta(path: str) -> dict:
  """The settings of the autoencoder folder `path` (its autoencoder.json), read
  without JAX. Raises DataError naming the folder when it is not one."""
  from ddx import autoencoder as ae_lib   # module constants only
  f = epath.Path(path) / ae_lib.SETTINGS_FILE
  if not f.exists():
    raise data_lib.DataError(
        f"autoencoder.path={path} has no {ae_lib.SETTINGS_FILE}; convert the VAE with "
        f"python -m ddx.convert SRC --workdir {path}")
  return _read_json(f, "autoencoder settings")


def _write_atomic(path: epath.Path, payload: bytes) -> None:
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_bytes(payload)
  tmp.replace(path)


def _own_temporary(name: str) -> bool:
  """Whether `name` is a file `_write_atomic` left when an encode was killed
  before its rename: the cache's to clean up, never the user's."""
  if not name.endswith(".tmp"):
    return False
  base = name[:-len(".tmp")]
  if base in (PLAN_FILE, META_FILE):
    return True
  return (base.startswith("shard_") and base.endswith(".npy")
          and base[len("shard_"):].split(".")[0].isdigit())


def _npy_bytes(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  np.save(buf, array, allow_pickle=False)
  return buf.getvalue()


# ---------------------------------------------------------------------------
# Writing the cache (--mode encode).


def source_config(config):
  """The `config.data` group describing the pixel dataset `--mode encode` reads:
  config.data with name = encode.source and path = encode.folder."""
  import ml_collections
  d = ml_collections.ConfigDict(config.data.to_dict())
  d.name = config.encode.source
  d.path = config.encode.folder
  return d


def plan(config, ae_settings: dict, source) -> dict:
  """The meta of the cache `config` asks for (what latents.json will say)."""
  e, d = config.encode, config.data
  size = d.image_size // _downsample(ae_settings)
  return {
      "format": FORMAT,
      "autoencoder_fingerprint": ae_settings["fingerprint"],
      "scaling_factor": float(ae_settings["scaling_factor"]),
      "shift_factor": float(ae_settings["shift_factor"]),
      "image_size": int(d.image_size), "channels": int(d.channels), "crop": d.crop,
      "latent_shape": [size, size, int(ae_settings["latent_channels"])],
      "flips": bool(e.flips), "shard_size": int(e.shard_size), "dtype": e.dtype,
      "num_images": len(source), "num_classes": int(source.num_classes),
      "source": {"name": e.source, "folder": e.folder, "split": d.split,
                 "data_dir": d.data_dir, "image_key": d.image_key,
                 "label_key": d.label_key},
  }


def _num_shards(meta: dict) -> int:
  return -(-meta["num_images"] // meta["shard_size"])


def _differences(a: dict, b: dict) -> list[str]:
  return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k)]


def encode_dataset(config, log=print) -> dict:
  """`--mode encode`: writes (or completes) the latent cache at config.data.path.

  Every process calls this; process p encodes shards p, p + P, ... on its
  local devices. Returns the cache's meta.
  Raises:
    DataError: the cache at data.path is another one (other autoencoder,
      images, flips, source): nothing is changed; a source that cannot be read.
  """
  import jax
  from ddx import autoencoder as ae_lib
  from ddx import parallel
  root = epath.Path(config.data.path)
  ae = ae_lib.load(config.autoencoder.path)
  check_autoencoder(config, ae.settings.to_dict())
  source = data_lib.make_source(source_config(config))
  meta = plan(config, ae.settings.to_dict(), source)
  done = root / META_FILE
  if done.exists():
    diff = _differences(_read_json(done, "latent cache"), meta)
    if diff:
      raise data_lib.DataError(
          f"data.path={root} already holds another latent cache ({'; '.join(diff)}); "
          "choose a new --config.data.path (the cache was left as it is)")
    log(f"encode: {root} is complete ({meta['num_images']} images); nothing to do")
    return meta
  plan_file = root / PLAN_FILE
  if plan_file.exists():
    diff = _differences(_read_json(plan_file, "latent cache plan"), meta)
    if diff:
      raise data_lib.DataError(
          f"data.path={root} holds an unfinished latent cache of other settings "
          f"({'; '.join(diff)}); rerun with those settings to finish it, or choose "
          "a new --config.data.path")
  else:
    foreign = [p.name for p in root.iterdir() if not _own_temporary(p.name)] \
        if root.exists() else []
    if foreign:
      raise data_lib.DataError(
          f"data.path={root} is not empty and holds no latent cache (it holds "
          f"{sorted(foreign)[0]}); choose an empty or new --config.data.path")
  parallel.sync("ddx_encode_checked")   # every process has looked before anyone writes
  if jax.process_index() == 0 and not plan_file.exists():
    root.mkdir(parents=True, exist_ok=True)
    for p in root.iterdir():   # an encode killed before its plan was in place
      p.unlink()
    _write_atomic(plan_file, json.dumps(meta, indent=1, sort_keys=True).encode())
  parallel.sync("ddx_encode_planned")

  local = parallel.make_mesh(devices=jax.local_devices())
  ae = jax.device_put(ae, parallel.replicated(local))   # beside the sharded images
  n_local = parallel.num_data_shards(local)
  batch = -(-int(config.encode.batch_size) // n_local) * n_local
  mine = range(jax.process_index(), _num_shards(meta), jax.process_count())
  reader = data_lib.ReadImages(source)
  t0, images_done = time.perf_counter(), 0
  for k in mine:
    path = root / _shard_name(k)
    if path.exists():
      continue
    index = np.arange(k * meta["shard_size"],
                      min(meta["num_images"], (k + 1) * meta["shard_size"]))
    element = reader.map({"index": index})
    data_lib._warn_skipped(element["skipped"])
    images = element["image"].astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    variants = [images, images[:, :, ::-1]] if meta["flips"] else [images]
    moments = np.stack([_encode_all(ae, v, batch, local) for v in variants],
                       axis=1).astype(meta["dtype"])
    _write_atomic(root / _labels_name(k),
                  _npy_bytes(np.asarray(element["label"], np.int32)))
    _write_atomic(path, _npy_bytes(moments))   # last: the shard is complete
    images_done += len(index)
    rate = images_done / (time.perf_counter() - t0)
    log(f"encode: shard {k + 1}/{_num_shards(meta)} ({rate:.1f} images/s)")
  parallel.sync("ddx_encode_shards")
  if jax.process_index() == 0:
    missing = [k for k in range(_num_shards(meta)) if not (root / _shard_name(k)).exists()]
    if missing:
      raise data_lib.DataError(f"latent cache {root}: shard {missing[0]} is missing after "
                               "encoding; rerun --mode encode to finish it")
    _write_atomic(done, json.dumps(meta, indent=1, sort_keys=True).encode())
    plan_file.unlink()
  parallel.sync("ddx_encode_done")
  log(f"encode: wrote {meta['num_images']} images' latents to {root}")
  return meta


def _encode_all(ae, images: np.ndarray, batch: int, mesh) -> np.ndarray:
  """The posterior moments of `images` (float32 [n, H, W, C] in [-1, 1]):
  float32 [n, 2, h, w, c], (mean, std), `batch` at a time split over `mesh`
  (the last batch padded, so one program serves every call)."""
  import jax
  from ddx import autoencoder as ae_lib
  from ddx import parallel
  out = []
  for start in range(0, len(images), batch):
    chunk = images[start:start + batch]
    n = len(chunk)
    if n < batch:
      chunk = np.concatenate([chunk, np.zeros((batch - n,) + chunk.shape[1:], chunk.dtype)])
    x = jax.device_put(chunk, parallel.data_sharded(mesh))
    mean, std = ae_lib.encode_moments(ae, x)
    out.append(np.stack([np.asarray(mean)[:n], np.asarray(std)[:n]], axis=1))
  return np.concatenate(out).astype(np.float32)


def _downsample(settings: dict) -> int:
  return 2 ** (len(settings["block_out_channels"]) - 1)


def check_autoencoder(config, settings: dict) -> None:
  """Raises ConfigError unless the autoencoder (its settings dict) agrees with
  config.autoencoder and data.channels."""
  from ddx import config as config_lib
  a = config.autoencoder
  ds = _downsample(settings)
  if ds != a.downsample or settings["latent_channels"] != a.latent_channels:
    raise config_lib.ConfigError(
        f"autoencoder.path={a.path} downsamples by {ds} to {settings['latent_channels']} "
        f"channels, but the config says autoencoder.downsample={a.downsample}, "
        f"latent_channels={a.latent_channels}; set --config.autoencoder.downsample={ds} "
        f"--config.autoencoder.latent_channels={settings['latent_channels']}")
  if settings["in_channels"] != config.data.channels:
    raise config_lib.ConfigError(
        f"autoencoder.path={a.path} encodes {settings['in_channels']}-channel images, "
        f"but data.channels={config.data.channels}; set "
        f"--config.data.channels={settings['in_channels']}")


# ---------------------------------------------------------------------------
# Reading the cache (data.name = latents).


class LatentSource:
  """A complete latent cache as a `ddx.data` source (see the module docstring).

  Args:
    path: the cache folder (data.path).
    random_flip: pick the mirrored image's latents where `flip_mask` says so
      (needs a cache encoded with encode.flips).
    sample_posterior: z = mean + std·ε (True) or the mean.

  Attributes:
    meta: the cache's latents.json.
    num_classes, image_shape: as every source (image_shape is the latent's).
  """

  def __init__(self, path: str, *, random_flip: bool, sample_posterior: bool = True):
    self.path = str(path)
    root = epath.Path(path)
    if not (root / META_FILE).exists():
      unfinished = (root / PLAN_FILE).exists()
      raise data_lib.DataError(
          f"data.path={path} holds no complete latent cache"
          + (" (its encode did not finish)" if unfinished else "")
          + "; run python -m ddx.main --config ... --mode encode first")
    self.meta = _read_json(root / META_FILE, "latent cache")
    if self.meta.get("format") != FORMAT:
      raise data_lib.DataError(f"latent cache {path} has format {self.meta.get('format')}, "
                               f"this ddx reads {FORMAT}; encode it again")
    if random_flip and not self.meta["flips"]:
      raise data_lib.DataError(
          f"data.random_flip=True but the latent cache {path} was encoded without "
          "flips; encode with encode.flips=True into a new data.path, or set "
          "--config.data.random_flip=False")
    self.random_flip = bool(random_flip)
    self.sample_posterior = bool(sample_posterior)
    # A local cache is read through memory maps: cheap lookups that worker
    # processes would only add start-up and copying to (data.num_workers=-1
    # then picks none); remote rows are network reads that workers overlap.
    self.in_memory = "://" not in self.path
    self.num_classes = int(self.meta["num_classes"])
    self.image_shape = tuple(self.meta["latent_shape"])
    self._shards: dict[int, np.ndarray] = {}
    self._labels: dict[int, np.ndarray] = {}

  def __getstate__(self):   # worker processes open the shards themselves
    return dict(self.__dict__, _shards={}, _labels={})

  def __len__(self) -> int:
    return int(self.meta["num_images"])

  def shard(self, k: int):
    """(moments [n, F, 2, h, w, c] (rows readable by index), labels int32 [n])
    of shard k: a memory map for a local cache, a reader of single rows (one
    ranged read each) for gs:// and other remote paths."""
    if k not in self._shards:
      path = epath.Path(self.path) / _shard_name(k)
      self._shards[k] = (np.load(str(path), mmap_mode="r", allow_pickle=False)
                         if "://" not in self.path else _RemoteRows(path))
      self._labels[k] = np.load(io.BytesIO((epath.Path(self.path) / _labels_name(k))
                                           .read_bytes()), allow_pickle=False)
    return self._shards[k], self._labels[k]

  def moments(self, index: np.ndarray, flip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [k, 2, h, w, c] (mean, std), int32 [k] labels) of rows `index`."""
    size = self.meta["shard_size"]
    out = np.empty((len(index), 2) + self.image_shape, np.float32)
    labels = np.empty(len(index), np.int32)
    variant = (np.asarray(flip) & self.random_flip).astype(np.int64)
    for k in np.unique(index // size):
      rows = np.nonzero(index // size == k)[0]
      moments, lab = self.shard(int(k))
      for r in rows:   # one row at a time: a memory-map page or one ranged read
        out[r] = moments[index[r] % size][variant[r]]
      labels[rows] = lab[index[rows] % size]
    return out, labels

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    """(mean latent, unscaled, [h, w, c], label) of image `index` (no flip)."""
    m, labels = self.moments(np.asarray([index]), np.zeros(1, bool))
    return m[0, 0], int(labels[0])

  def read_transforms(self, seed: int) -> list[grain.transforms.Map]:
    return [ReadLatents(self, seed)]

  def value_moments(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The law of the scaled latent training draws for rows `index` (for
    `ddx.data.value_std`): (mean, variance) float64 [k·V, h, w, c], V = 2
    (both mirror variants) with random_flip, else 1; the variance is the
    posterior's (std·scale)², or 0 without sample_posterior."""
    scale = np.float64(self.meta["scaling_factor"])
    means, variances = [], []
    for flip in ([False, True] if self.random_flip else [False]):
      m, _ = self.moments(np.asarray(index), np.full(len(index), flip))
      means.append((m[:, 0].astype(np.float64) - self.meta["shift_factor"]) * scale)
      variances.append(np.square(m[:, 1].astype(np.float64) * scale)
                       * float(self.sample_posterior))
    return np.concatenate(means), np.concatenate(variances)


class _RemoteRows:
  """Rows of a remote .npy file, each read with one seek + read (no full download)."""

  def __init__(self, path: epath.Path):
    self.path = path
    with path.open("rb") as f:
      fmt = np.lib.format
      read = (fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0)
              else fmt.read_array_header_2_0)
      shape, fortran, dtype = read(f)
      self.offset = f.tell()
    if fortran:
      raise data_lib.DataError(f"{path} is not a C-ordered array; encode the cache again")
    self.dtype, self.row_shape = dtype, tuple(shape[1:])
    self.row_bytes = int(np.prod(self.row_shape)) * dtype.itemsize

  def __getitem__(self, i: int) -> np.ndarray:
    with self.path.open("rb") as f:
      f.seek(self.offset + int(i) * self.row_bytes)
      buf = f.read(self.row_bytes)
    return np.frombuffer(buf, self.dtype).reshape(self.row_shape)


class ReadLatents(grain.transforms.Map):
  """Planned rows -> scaled latents: {"image": float32 [b, h, w, c], "label"}."""

  def __init__(self, source: LatentSource, seed: int):
    self.source = source
    self.seed = int(seed)

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    src = self.source
    moments, labels = src.moments(element["index"], element["flip"])
    mean, std = moments[:, 0], moments[:, 1]
    if src.sample_posterior:
      noise = np.stack([posterior_noise(self.seed, element["step"], element["row0"] + j,
                                        src.image_shape) for j in range(len(mean))])
      mean = mean + std * noise
    z = (mean - np.float32(src.meta["shift_factor"])) * np.float32(src.meta["scaling_factor"])
    return {"step": element["step"], "image": z.astype(np.float32),
            "label": labels, "skipped": ()}


def posterior_noise(seed: int, step: int, row: int, shape: tuple) -> np.ndarray:
  """ε ~ N(0, I) float32 `shape` of global batch row `row` at `step`: the same on
  any process or worker count."""
  ss = np.random.SeedSequence([int(seed) % 2**64, _LATENT_TAG, int(step), int(row)])
  return np.random.default_rng(ss).standard_normal(shape, dtype=np.float32)


def run_source(config):
  """The training source of a run: the latent cache (checked against the
  autoencoder and image size) for data.name = latents, else `data.make_source`."""
  if config.data.name != "latents":
    return data_lib.make_source(config.data)
  src = LatentSource(config.data.path, random_flip=config.data.random_flip,
                     sample_posterior=config.autoencoder.sample_posterior)
  m = src.meta
  if config.autoencoder.path:
    fp = autoencoder_meta(config.autoencoder.path).get("fingerprint")
    if fp != m["autoencoder_fingerprint"]:
      raise data_lib.DataError(
          f"the latent cache {config.data.path} was made by autoencoder "
          f"{m['autoencoder_fingerprint']}, not by autoencoder.path="
          f"{config.autoencoder.path} ({fp}); encode again with this autoencoder into "
          "a new data.path, or point autoencoder.path at the one that made it")
  if m["image_size"] != config.data.image_size:
    raise data_lib.DataError(
        f"the latent cache {config.data.path} holds {m['image_size']}x{m['image_size']} "
        f"images, but data.image_size={config.data.image_size}; set "
        f"--config.data.image_size={m['image_size']} or encode again into a new data.path")
  from ddx import config as config_lib
  if tuple(m["latent_shape"]) != config_lib.image_shape(config):
    raise data_lib.DataError(
        f"the latent cache {config.data.path} holds latents of shape "
        f"{tuple(m['latent_shape'])}, but the config's are {config_lib.image_shape(config)}; "
        "check autoencoder.downsample and latent_channels")
  return src
