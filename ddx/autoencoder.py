"""The autoencoder of latent diffusion as users and the trainer see it.

An `Autoencoder` is a pytree: its float32 `params` are leaves (jit arguments,
never baked-in constants), its `Settings` static (hashable), so

    ae = ddx.autoencoder.load("vae/")                     # python -m ddx.convert SRC --workdir vae/
    z = jax.jit(ddx.autoencoder.encode)(ae, images)       # [B, H/8, W/8, 4], ~unit variance
    x = jax.jit(ddx.autoencoder.decode)(ae, z)            # [B, H, W, 3], ~[-1, 1]

The functions below are already jitted; under a caller's jit they are inlined.

Latents as the diffusion model sees them are the posterior's, shifted and
scaled: z = (mean - shift_factor) * scaling_factor (SD's VAE: 0.18215, no
shift; latent diffusion's 2112.10752, sec. 4.3.2 / D.1), or a posterior sample
in place of the mean. `decode` inverts that scaling before the decoder.

On disk an autoencoder folder (local or gs://, through etils.epath) holds
  autoencoder.json   the Settings (network fields, scaling_factor,
                     shift_factor, source, fingerprint), written last;
  params/            the float32 params (orbax StandardCheckpointer).
The fingerprint is a hash of the network fields, the scaling and every
parameter's bytes (not of `dtype` or `source`): a latent cache records it and
refuses latents made by another autoencoder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Optional, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ddx.models.autoencoder import DTYPES, AutoencoderKL

SETTINGS_FILE = "autoencoder.json"
PARAMS_DIR = "params"

# The network's fields (diffusers' config names) and defaults are declared once,
# on ddx.models.autoencoder.AutoencoderKL; Settings and the importer take them
# from there.
NETWORK_FIELDS = tuple(f.name for f in dataclasses.fields(AutoencoderKL)
                       if f.name not in ("parent", "name"))
_Network = dataclasses.make_dataclass(
    "_Network",
    [(f.name, "tuple[int, ...]" if f.name == "block_out_channels" else f.type, f.default)
     for f in dataclasses.fields(AutoencoderKL) if f.name in NETWORK_FIELDS],
    frozen=True)


@dataclasses.dataclass(frozen=True)
class Settings(_Network):
  """What an autoencoder is, apart from its weights (hashable: a jit static).

  Defaults: stabilityai/sd-vae-ft-ema / -ft-mse.

  Attributes:
    in_channels ... dtype: the network's fields (NETWORK_FIELDS), with the
      defaults of ddx.models.autoencoder.AutoencoderKL; dtype is the
      computation dtype, "float32" | "bfloat16" (params stay float32).
    scaling_factor: latents = (posterior - shift_factor) * scaling_factor.
    shift_factor: diffusers' shift_factor; its None is 0.0.
    source: where the weights came from (informational).
    fingerprint: hash of the network fields, scaling and params; set by `save`.
  """
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0
  source: str = ""
  fingerprint: str = ""

  @property
  def downsample(self) -> int:
    """Pixels per latent along H and W: 2**(levels - 1)."""
    return 2 ** (len(self.block_out_channels) - 1)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["block_out_channels"] = list(self.block_out_channels)
    return d

  def __getitem__(self, key: str) -> Any:   # settings["fingerprint"], as a dict reads
    return getattr(self, key)


_FIELDS = {f.name: f.type for f in dataclasses.fields(Settings)}
# Fields that must be present in a settings dict (`fingerprint` is set by save).
_REQUIRED = tuple(k for k in _FIELDS if k != "fingerprint")
_CAST = {"int": int, "bool": bool, "float": float, "str": str}


def settings_from_dict(d: Union[dict, Settings], where: str = "settings") -> Settings:
  """Validates a settings dict (as `save` takes it, as autoencoder.json holds it).

  Args:
    d: every Settings field but `fingerprint` (optional); a Settings passes through.
    where: what to call `d` in error messages (the json's path).
  Returns:
    Settings.
  Raises:
    ValueError: a missing, unknown or invalid field, named (one line).
  """
  if isinstance(d, Settings):
    d = d.to_dict()
  unknown = sorted(set(d) - set(_FIELDS))
  if unknown:
    raise ValueError(f"{where}: unknown autoencoder field {unknown[0]!r}; the fields "
                     f"are {tuple(_FIELDS)}")
  missing = [k for k in _REQUIRED if k not in d]
  if missing:
    raise ValueError(f"{where}: autoencoder field {missing[0]!r} is missing; write it "
                     "(python -m ddx.convert writes every field)")
  out = {}
  for k, v in d.items():
    if k == "block_out_channels":
      ok = isinstance(v, (list, tuple)) and len(v) >= 1 and all(
          isinstance(c, int) and c > 0 for c in v)
      out[k] = tuple(v) if ok else None
    elif k == "shift_factor" and v is None:
      ok, out[k] = True, 0.0
    else:
      kind = _FIELDS[k]
      if kind == "bool":
        ok = isinstance(v, bool)
      elif kind == "float":
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
      elif kind == "int":
        ok = isinstance(v, int) and not isinstance(v, bool) and v > 0
      else:
        ok = isinstance(v, str)
      out[k] = _CAST[kind](v) if ok else None
    if not ok:
      raise ValueError(f"{where}: autoencoder field {k}={v!r} is invalid; expected "
                       f"{'a list of positive ints' if k == 'block_out_channels' else _FIELDS[k]}")
  s = Settings(**out)
  if s.dtype not in DTYPES:
    raise ValueError(f"{where}: autoencoder dtype={s.dtype!r} is unknown; use one of "
                     f"{tuple(DTYPES)}")
  bad = [c for c in s.block_out_channels if c % s.norm_num_groups]
  if bad:
    raise ValueError(f"{where}: norm_num_groups={s.norm_num_groups} does not divide "
                     f"block_out_channels={list(s.block_out_channels)}")
  if s.scaling_factor <= 0:
    raise ValueError(f"{where}: scaling_factor={s.scaling_factor} must be positive")
  return s


@flax.struct.dataclass
class Autoencoder:
  """A KL autoencoder: params (pytree leaves) and Settings (static)."""
  params: Any
  settings: Settings = flax.struct.field(pytree_node=False)

  @property
  def fingerprint(self) -> str:
    return self.settings.fingerprint


def network(settings: Settings) -> AutoencoderKL:
  """The Flax module of `settings`."""
  return AutoencoderKL(**{k: getattr(settings, k) for k in NETWORK_FIELDS})


def init_params(settings: Settings, rng: jax.Array) -> Any:
  """Randomly initialised float32 params (tests, benchmarks; not a trained VAE)."""
  d = settings.downsample
  x = jnp.zeros((1, d, d, settings.in_channels), jnp.float32)
  return jax.jit(network(settings).init)(rng, x)["params"]


def abstract_params(settings: Settings) -> Any:
  """The params' shapes: a pytree of float32 jax.ShapeDtypeStruct."""
  return jax.eval_shape(lambda key: init_params(settings, key), jax.random.key(0))


def latent_shape(settings_or_ae: Union[Settings, Autoencoder],
                 image_size: Union[int, tuple[int, int]]) -> tuple[int, int, int]:
  """(h, w, latent_channels) of the latents of images of `image_size`.

  Args:
    settings_or_ae: Settings or Autoencoder.
    image_size: H (square) or (H, W) in pixels; multiples of the downsample.
  Returns:
    (H / d, W / d, latent_channels), d = 2**(len(block_out_channels) - 1).
  """
  s = settings_or_ae.settings if isinstance(settings_or_ae, Autoencoder) else settings_or_ae
  hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  d = s.downsample
  if any(n % d for n in hw):
    raise ValueError(f"image size {hw} is not a multiple of the autoencoder's "
                     f"downsample {d}; use a size divisible by {d}")
  return (hw[0] // d, hw[1] // d, s.latent_channels)


# --------------------------------------------------------------------------
# Encoding and decoding (jitted; params are arguments, settings static).


@jax.jit
def encode_moments(ae: Autoencoder, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The posterior q(z | x) = N(mean, std^2), unscaled (the VAE's own space).

  Args:
    ae: the autoencoder.
    images: [B, H, W, in_channels] float32 in [-1, 1].
  Returns:
    (mean, std): each [B, H/d, W/d, latent_channels] float32; std =
    exp(logvar / 2) with logvar clipped to [-30, 20] (as diffusers).
  """
  mean, logvar = network(ae.settings).apply(
      {"params": ae.params}, images, method=AutoencoderKL.encode)
  return mean, jnp.exp(0.5 * logvar)


@jax.jit
def encode(ae: Autoencoder, images: jax.Array,
           rng: Optional[jax.Array] = None) -> jax.Array:
  """Images -> the diffusion model's latents.

  Args:
    ae: the autoencoder.
    images: [B, H, W, in_channels] float32 in [-1, 1].
    rng: None for the posterior mean; a key for a posterior sample
      mean + std * N(0, I).
  Returns:
    [B, H/d, W/d, latent_channels] float32: (z - shift_factor) * scaling_factor.
  """
  mean, std = encode_moments(ae, images)
  z = mean if rng is None else mean + std * jax.random.normal(rng, mean.shape, mean.dtype)
  return (z - ae.settings.shift_factor) * ae.settings.scaling_factor


@jax.jit
def decode(ae: Autoencoder, latents: jax.Array) -> jax.Array:
  """The diffusion model's latents -> images.

  Args:
    ae: the autoencoder.
    latents: [B, h, w, latent_channels] float32, scaled as `encode` returns them.
  Returns:
    [B, h*d, w*d, out_channels] float32, nominally in [-1, 1] but NOT clipped
    (clip before turning them into pixels).
  """
  z = latents / ae.settings.scaling_factor + ae.settings.shift_factor
  return network(ae.settings).apply({"params": ae.params}, z, method=AutoencoderKL.decode)


# --------------------------------------------------------------------------
# The autoencoder folder.


def fingerprint(settings: Union[dict, Settings], params: Any) -> str:
  """A hash of what makes two autoencoders encode alike.

  Covers the network fields (not `dtype`), scaling_factor, shift_factor and
  every parameter's path, shape and float32 bytes; not `source`.

  Returns:
    16 hex digits.
  """
  s = settings_from_dict(settings)
  h = hashlib.sha256()
  desc = {k: v for k, v in s.to_dict().items()
          if k not in ("dtype", "source", "fingerprint")}
  h.update(json.dumps(desc, sort_keys=True).encode())
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, leaf in sorted(leaves, key=lambda pl: jax.tree_util.keystr(pl[0])):
    a = np.ascontiguousarray(np.asarray(leaf, np.float32))
    h.update(f"{jax.tree_util.keystr(path)}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def _check_structure(settings: Settings, params: Any, where: str) -> None:
  want = jax.tree_util.tree_flatten_with_path(abstract_params(settings))[0]
  got = {jax.tree_util.keystr(p): np.shape(l)
         for p, l in jax.tree_util.tree_flatten_with_path(params)[0]}
  for p, leaf in want:
    k = jax.tree_util.keystr(p)
    if k not in got:
      raise ValueError(f"{where}: params{k} is missing; the params do not match the settings")
    if tuple(got[k]) != tuple(leaf.shape):
      raise ValueError(f"{where}: params{k} has shape {tuple(got[k])}; the settings "
                       f"imply {tuple(leaf.shape)}")
  extra = sorted(set(got) - {jax.tree_util.keystr(p) for p, _ in want})
  if extra:
    raise ValueError(f"{where}: params{extra[0]} is not part of the network the "
                     "settings describe")


def save(path: str, settings: Union[dict, Settings], params: Any) -> Settings:
  """Writes an autoencoder folder: params/ (orbax), then autoencoder.json.

  Args:
    path: the folder (local or gs://); must not hold an autoencoder yet.
    settings: every Settings field but `fingerprint` (a dict or Settings).
    params: the network's float32 "params" pytree (NumPy or jax arrays).
  Returns:
    the Settings written, with its fingerprint.
  Raises:
    ValueError: the folder already holds an autoencoder; bad settings; params
      that do not match the settings.
  """
  import orbax.checkpoint as ocp
  from etils import epath
  root = epath.Path(path)
  if (root / SETTINGS_FILE).exists() or (root / PARAMS_DIR).exists():
    raise ValueError(f"{path} already holds an autoencoder; choose a new folder "
                     "(an autoencoder is never overwritten)")
  s = settings_from_dict(settings)
  _check_structure(s, params, str(path))
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  s = dataclasses.replace(s, fingerprint=fingerprint(s, params))
  root.mkdir(parents=True, exist_ok=True)
  ck = ocp.StandardCheckpointer()
  try:
    ck.save((root / PARAMS_DIR).resolve() if not str(path).startswith("gs://")
            else root / PARAMS_DIR, params)
    ck.wait_until_finished()
  finally:
    ck.close()
  # The json is written last: a folder with it holds complete params.
  tmp = root / (SETTINGS_FILE + ".tmp")
  tmp.write_text(json.dumps(s.to_dict(), indent=2, sort_keys=True))
  tmp.replace(root / SETTINGS_FILE)
  return s


def load(path: str, dtype: Optional[str] = None) -> Autoencoder:
  """Reads an autoencoder folder written by `save` (or python -m ddx.convert).

  Args:
    path: the folder (local or gs://).
    dtype: override the computation dtype ("float32" | "bfloat16"); None
      keeps the saved one. The fingerprint does not depend on it.
  Returns:
    Autoencoder with float32 params.
  Raises:
    ValueError: a missing folder, json or params, or a json missing fields (one line).
  """
  import orbax.checkpoint as ocp
  from etils import epath
  root = epath.Path(path)
  if not root.is_dir():
    raise ValueError(f"autoencoder folder {path} does not exist; convert one with "
                     "python -m ddx.convert SRC --workdir DIR")
  jpath = root / SETTINGS_FILE
  if not jpath.exists():
    raise ValueError(f"{jpath} does not exist; {path} is not an autoencoder folder "
                     "(python -m ddx.convert SRC --workdir DIR writes one)")
  try:
    d = json.loads(jpath.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{jpath} is not valid JSON ({e}); convert the autoencoder again") from None
  if not isinstance(d, dict):
    raise ValueError(f"{jpath} does not hold a JSON object; convert the autoencoder again")
  if "fingerprint" not in d:
    raise ValueError(f"{jpath}: autoencoder field 'fingerprint' is missing; write the "
                     "folder with ddx.autoencoder.save")
  if dtype is not None:
    d = {**d, "dtype": dtype}
  s = settings_from_dict(d, str(jpath))
  pdir = root / PARAMS_DIR
  if not pdir.exists():
    raise ValueError(f"{pdir} does not exist; the autoencoder folder is incomplete, "
                     "convert it again")
  # Every process reads the whole (replicated) autoencoder on its own, onto a
  # local device, with no cross-process barrier: it is loaded where processes
  # may not be in step (the latent cache's encode, sampling).
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=local),
                        abstract_params(s))
  me = jax.process_index()
  ck = ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"ddx_ae_{me}"))
  try:
    params = ck.restore(pdir.resolve() if not str(path).startswith("gs://") else pdir,
                        target)
  except Exception as e:   # orbax/tensorstore raise many types for bad files
    msg = str(e).splitlines()[0] if str(e) else ""
    raise ValueError(f"{pdir} could not be read as the params the settings describe "
                     f"({type(e).__name__}: {msg[:200]}); convert the autoencoder again") from None
  finally:
    ck.close()
  return Autoencoder(params=params, settings=s)
