"""Imports official DiT checkpoints (facebookresearch/DiT) as ddx workdirs.

    python -m ddx.convert DiT-XL-2-256x256.pt --workdir OUT [--autoencoder VAE_DIR]

SRC is a `.pt` file as the DiT repository publishes it (`DiT-XL-2-256x256.pt`,
`DiT-XL-2-512x512.pt`: `torch.load` gives the EMA model's state_dict) or as its
train.py saves it (a dict with "model", "ema", "opt", "args"; the "ema"
weights are taken, as the repository's own `find_model` does). Downloading
the file is the user's job; nothing here touches the network.

The architecture is read from the weights' shapes:
  x_embedder.proj.weight [D, C, p, p]      -> hidden_size D, channels C, patch p;
  blocks.{i}.*                             -> depth (the number of blocks);
  blocks.0.mlp.fc1.weight [D * r, D]       -> mlp_ratio r;
  final_layer.linear.weight [p*p*C_out, D] -> learn_sigma (C_out = 2C) or not (C);
  y_embedder.embedding_table.weight [K+1, D] -> num_classes K: the last row is
      the null class that DiT's class dropout trained, which is ddx's null
      label K too (a DiT trained without class dropout has no such row and
      cannot be told apart by shape: its last class would become the null);
  pos_embed [1, T, D]                      -> the latent size sqrt(T) * p;
  D -> num_heads by the official table (1152, 1024: 16; 768: 12; 384: 6).
pos_embed is a fixed 2-D sin-cos table in ddx (a constant, not a param); the
checkpoint's must equal ddx's `sincos_pos_embed_2d` (to 1e-5), which it does
for every model the DiT repository builds.

The written config (`ddx.config.base_config()` otherwise):
  model: name dit and the fields above; learn_sigma as found. ddx keeps the
    first C output channels (the ε prediction, `ddx.model.mean_output`) and
    ignores the C variance channels (the learned Σ of iDDPM's L_hybrid).
  diffusion: ddpm, linear β 1e-4..0.02, T = 1000, ε-prediction (DiT's
    `create_diffusion`: get_named_beta_schedule("linear", 1000), MSE loss on ε).
    DiT's network sees the integer index t in 0..999 into that schedule
    (its respaced sampler maps back to the original index), ddx's index i.
  training.label_dropout = 0.1 (DiT's class_dropout_prob): the null label
    exists, so guidance is allowed.
  sampling: ddpm sampler, 250 steps, guidance_scale 1.5 (DiT's FID setting,
    sample_ddp.py), clip_x0 False (sample.py: clip_denoised=False: latents
    are not in [-1, 1]), ddpm_variance "beta". DiT samples with its learned
    variance (log-interpolated between β̃ and β), which ddx does not use. Of
    the two fixed variances the larger, σ² = β, is the one improved DDPM
    (Nichol & Dhariwal 2021, Sec. 4) reports better at reduced step counts,
    and the fixed default of DiT's own create_diffusion (learn_sigma=False,
    sigma_small=False: FIXED_LARGE); β̃ and β differ noticeably only over the
    last few steps. The step grid is ddx's (auto: trailing, 999, 995, ..., 3),
    not DiT's respacing (0, 4, 8, ..., 999), so samples match DiT's in
    distribution, not bit for bit, and FID may differ slightly.
  data.name "latents", data.image_size = 8 * latent size, channels 3 (the
    pixels), autoencoder.downsample 8, latent_channels C; autoencoder.path =
    the `autoencoder` folder given (the converted SD VAE), or "" without one.
    A latent run's network is built at the latent shape either way
    (`ddx.config.image_shape`), so `ddx.load` works; without an autoencoder
    `sample_fn` returns latents, and --mode sample/eval ask for
    --config.autoencoder.path.

Not reproducible in ddx: the official `forward_with_cfg` applies
classifier-free guidance to the first 3 of the 4 latent channels only (kept
there to reproduce the paper's FID); the 4th channel and the variance
channels keep the conditional output. ddx guides all C channels, the
standard form, and has no option for the 3-channel variant.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any, Optional

import numpy as np

from ddx.convert.common import (ConversionError, abstract_train_state, begin_output,
                                check_output, finish_output, map_weights, require,
                                torch_module, unreadable, write_workdir)

# hidden_size -> num_heads of the official models (S, B, L, XL).
NUM_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}
# The diffusion and sampling settings of DiT's create_diffusion / sample_ddp.py.
CLASS_DROPOUT = 0.1
SAMPLING_STEPS = 250
GUIDANCE_SCALE = 1.5
VAE_DOWNSAMPLE = 8          # SD VAE: 8 pixels per latent along H and W
POS_EMBED_ATOL = 1e-5

_INDEXED = re.compile(r"^(.*)_(\d+)$")


# --------------------------------------------------------------------------
# Reading the .pt file.


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
  """The DiT state_dict of an official or train.py checkpoint.

  Args:
    path: a .pt/.pth file: a state_dict, or a train.py dict with "ema".
  Returns:
    {state_dict key: float32 array in PyTorch layout}.
  Raises:
    ConversionError: unreadable file or no model weights in it.
  """
  torch = torch_module()
  require(os.path.isfile(path), f"{path} does not exist; download the DiT checkpoint "
           "first (https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt)")
  try:
    # train.py saves its argparse.Namespace under "args": allow just that class.
    with torch.serialization.safe_globals([argparse.Namespace]):
      ckpt = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise unreadable(path, e, "DiT checkpoint") from None
  require(isinstance(ckpt, dict), f"{path} holds a {type(ckpt).__name__}, not a "
           "DiT state_dict or a train.py checkpoint dict")
  if "ema" in ckpt:          # train.py: {"model", "ema", "opt", "args"}
    ckpt = ckpt["ema"]
    require(isinstance(ckpt, dict), f"{path}: 'ema' is a {type(ckpt).__name__}, "
             "not a state_dict")
  not_tensors = sorted(str(k) for k, v in ckpt.items() if not torch.is_tensor(v))
  if not_tensors:
    raise ConversionError(f"{path}: entry {not_tensors[0]!r} is not a tensor; "
                          "expected a DiT state_dict or a train.py checkpoint with 'ema'")
  return {k: v.detach().to(torch.float32).numpy() for k, v in ckpt.items()}


# --------------------------------------------------------------------------
# The architecture, from the shapes.


def _weight(state: dict, key: str, ndim: int, source: str) -> np.ndarray:
  require(key in state, f"weight {key} is missing from {source}; it is not a DiT "
           "checkpoint of facebookresearch/DiT's models.py")
  w = state[key]
  require(w.ndim == ndim, f"weight {key} in {source} has shape {w.shape}; a DiT's "
           f"has {ndim} dimensions")
  return w


def architecture(state: dict, source: str = "the checkpoint") -> dict:
  """The DiT hyperparameters implied by the state_dict's shapes.

  Args:
    state: {key: array} in the official layout (see the module docstring).
    source: what to call the weights in error messages.
  Returns:
    dict with patch_size, hidden_size, depth, num_heads, mlp_ratio,
    num_classes, learn_sigma (the ddx model fields), and channels (C) and
    latent_size (the square latent's side) of the input.
  Raises:
    ConversionError: a missing/misshaped weight or unknown width, named.
  """
  d, c, p, p2 = _weight(state, "x_embedder.proj.weight", 4, source).shape
  require(p == p2, f"weight x_embedder.proj.weight in {source} has shape "
           f"{(d, c, p, p2)}; DiT's patches are square")
  require(d in NUM_HEADS, f"weight x_embedder.proj.weight in {source}: hidden size "
           f"{d} is not one of the official DiT widths {tuple(NUM_HEADS)}, so the "
           "number of attention heads is unknown")
  depth = 0
  while f"blocks.{depth}.attn.qkv.weight" in state:
    depth += 1
  require(depth >= 1, f"weight blocks.0.attn.qkv.weight is missing from {source}; "
           "it is not a DiT checkpoint")
  hidden = _weight(state, "blocks.0.mlp.fc1.weight", 2, source).shape[0]
  out = _weight(state, "final_layer.linear.weight", 2, source).shape[0]
  require(out in (p * p * c, 2 * p * p * c),
           f"weight final_layer.linear.weight in {source} has {out} rows; a DiT with "
           f"{c} channels and patch {p} has {p * p * c} or {2 * p * p * c} (learn_sigma)")
  rows = _weight(state, "y_embedder.embedding_table.weight", 2, source).shape[0]
  require(rows >= 2, f"weight y_embedder.embedding_table.weight in {source} has "
           f"{rows} row(s); ddx needs the classes and the null class (last row)")
  pos = _weight(state, "pos_embed", 3, source)
  tokens = pos.shape[1]
  grid = int(round(np.sqrt(tokens)))
  require(pos.shape[0] == 1 and pos.shape[2] == d and grid * grid == tokens,
           f"weight pos_embed in {source} has shape {pos.shape}; DiT's is "
           f"[1, grid * grid, {d}]")
  expected = _sincos(d, grid)
  err = float(np.max(np.abs(pos[0] - expected)))
  require(err <= POS_EMBED_ATOL,
           f"weight pos_embed in {source} differs from DiT's fixed 2-D sin-cos table "
           f"(max |diff| {err:.3g}); ddx computes that table and cannot use a "
           "trained or differently laid out position embedding")
  return dict(patch_size=int(p), hidden_size=int(d), depth=depth,
              num_heads=NUM_HEADS[d], mlp_ratio=hidden / d,
              num_classes=int(rows - 1), learn_sigma=out == 2 * p * p * c,
              channels=int(c), latent_size=int(grid * p))


def _sincos(dim: int, grid: int) -> np.ndarray:
  from ddx.models.dit.network import sincos_pos_embed_2d
  return sincos_pos_embed_2d(dim, grid, grid)


# --------------------------------------------------------------------------
# The ddx config.


def check_autoencoder(folder: str, channels: int) -> None:
  """Checks a converted autoencoder folder against the DiT's latents.

  Reads `autoencoder.json` (written by ddx.autoencoder.save) directly.

  Args:
    folder: the autoencoder folder given with --autoencoder.
    channels: the DiT's input channels C.
  Raises:
    ConversionError: missing folder/file, or latent_channels != C or a
      downsampling factor other than 8.
  """
  require(os.path.isdir(folder), f"--autoencoder {folder} is not a folder; convert "
           "the VAE first (python -m ddx.convert stabilityai/sd-vae-ft-ema --workdir DIR)")
  path = os.path.join(folder, "autoencoder.json")
  require(os.path.isfile(path), f"{path} does not exist; --autoencoder must name a "
           "folder written by python -m ddx.convert VAE --workdir DIR")
  try:
    with open(path) as f:
      ae = json.load(f)
  except json.JSONDecodeError as e:
    raise ConversionError(f"{path} is not valid JSON ({e}); convert the VAE again") from None
  latent = ae.get("latent_channels")
  require(latent == channels, f"{path}: latent_channels={latent!r}, but the DiT "
           f"takes {channels}-channel latents; use the VAE it was trained with (SD VAE)")
  blocks = ae.get("block_out_channels")
  require(isinstance(blocks, (list, tuple)) and len(blocks) >= 1,
           f"{path}: block_out_channels={blocks!r} is missing or empty; convert the "
           "VAE again")
  down = 2 ** (len(blocks) - 1)
  require(down == VAE_DOWNSAMPLE, f"{path}: block_out_channels={list(blocks)} "
           f"downsamples by {down}, but DiT's latents are 1/{VAE_DOWNSAMPLE} of the "
           "pixels; use the SD VAE")


def ddx_config(arch: dict, autoencoder: Optional[str] = None):
  """The ddx run config of an official DiT (see the module docstring).

  Args:
    arch: `architecture(state)`.
    autoencoder: the converted VAE folder (recorded as autoencoder.path), or
      None for a plain latent-space model.
  Returns:
    ml_collections.ConfigDict (ddx.config.base_config() with the model,
    diffusion, training.label_dropout, sampling, data and autoencoder keys set).
  """
  from ddx import config as config_lib
  config = config_lib.base_config()
  m = config.model
  m.name = "dit"
  for k in ("patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio",
            "num_classes", "learn_sigma"):
    m[k] = arch[k]
  f = config.diffusion
  f.process, f.schedule, f.num_timesteps = "ddpm", "linear", 1000
  f.beta_start, f.beta_end, f.prediction = 1e-4, 0.02, "eps"
  config.training.label_dropout = CLASS_DROPOUT
  s = config.sampling
  s.sampler, s.steps, s.guidance_scale = "ddpm", SAMPLING_STEPS, GUIDANCE_SCALE
  s.ddpm_variance, s.clip_x0 = "beta", False
  # Pixels in data.*; a latent run's image_shape divides by downsample, so the
  # network is built at the latent shape with or without the decoder.
  config.data.name = "latents"
  config.data.image_size, config.data.channels = arch["latent_size"] * VAE_DOWNSAMPLE, 3
  config.data.random_flip = True   # DiT's recipe, for fine-tuning on a latent cache
  a = config.autoencoder
  a.downsample, a.latent_channels = VAE_DOWNSAMPLE, arch["channels"]
  a.path = os.path.abspath(autoencoder) if autoencoder else ""
  config.eval.metrics = ("fid",)
  return config


# --------------------------------------------------------------------------
# Weights: official state_dict names <-> the ddx parameter tree.


def torch_key(path: tuple[str, ...]) -> str:
  """The official state_dict key of the ddx DiT parameter at `path`.

  Args:
    path: e.g. ("blocks_3", "adaLN_modulation_1", "kernel").
  Returns:
    e.g. "blocks.3.adaLN_modulation.1.weight" (ddx names follow the torch
    module paths, with "_i" for a ModuleList/Sequential index).
  """
  *mods, leaf = path
  if mods == ["x_embedder"]:
    mods = ["x_embedder", "proj"]               # timm's PatchEmbed.proj
  if mods == ["y_embedder"]:
    mods = ["y_embedder", "embedding_table"]
  parts = []
  for mod in mods:
    m = _INDEXED.match(mod)
    parts.extend([m.group(1), m.group(2)] if m else [mod])
  return ".".join(parts + ["bias" if leaf == "bias" else "weight"])


def _from_torch(leaf: str, value: np.ndarray) -> np.ndarray:
  """A torch-layout weight in ddx's: conv OIHW -> HWIO, linear (out, in) ->
  (in, out); biases and the label table as they are."""
  if leaf == "kernel" and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if leaf == "kernel":
    return value.T
  return value


def _torch_shape(path: tuple[str, ...], shape: tuple) -> tuple:
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if path[-1] == "kernel":
    return (shape[1], shape[0])
  return tuple(shape)


def params_from_state_dict(state: dict, config, source: str = "the checkpoint",
                           abstract_state: Any = None) -> Any:
  """Builds ddx DiT params from an official DiT state_dict.

  Args:
    state: {key: float32 array in PyTorch layout}; pos_embed is checked by
      `architecture` and not a param here.
    config: the ddx run config the weights are for (`ddx_config`).
    source: what to call the weights in error messages.
    abstract_state: `abstract_train_state(config)`, if already computed.
  Returns:
    the "params" pytree of the ddx DiT, float32 NumPy arrays.
  Raises:
    ConversionError: a missing, extra or wrongly shaped weight, named.
  """
  if abstract_state is None:
    abstract_state = abstract_train_state(config)

  def to_ddx(path, key, value, shape):
    want = _torch_shape(path, shape)
    require(value.shape == want, f"weight {key} in {source} has shape {value.shape}; "
            f"the DiT its other weights describe needs {want}")
    return _from_torch(path[-1], value)
  return map_weights(state, abstract_state.params, torch_key, to_ddx, source=source,
                     missing_hint="the checkpoint is truncated or not an official DiT",
                     what="the DiT its shapes describe", ignore=("pos_embed",))


def convert(src: str, workdir: str, autoencoder: Optional[str] = None) -> Any:
  """Converts the official DiT checkpoint `src` into the ddx workdir `workdir`.

  Args:
    src: a .pt/.pth file (see the module docstring).
    workdir: output ddx workdir: a new or empty folder (`check_output`).
    autoencoder: the converted VAE folder that decodes the latents, or None.
  Returns:
    the ddx run config that was written.
  Raises:
    ConversionError: the source cannot be converted (one line naming why).
  """
  check_output(workdir)
  state = read_checkpoint(src)
  arch = architecture(state, source=src)
  if autoencoder:
    check_autoencoder(autoencoder, arch["channels"])
  config = ddx_config(arch, autoencoder)
  abstract = abstract_train_state(config)
  params = params_from_state_dict(state, config, source=src, abstract_state=abstract)
  del state     # XL: 2.7 GB; write_workdir makes the EMA and Adam copies next
  begin_output(workdir)
  write_workdir(workdir, config, params, abstract)
  finish_output(workdir)
  return config


def summary(config) -> str:
  """One line describing the imported DiT (for the CLI)."""
  from ddx import config as config_lib
  from ddx.models.dit.spec import PRESETS
  m = config.model
  name = next((f"DiT-{k}/{m.patch_size}" for k, v in PRESETS.items()
               if v == (m.hidden_size, m.depth, m.num_heads)),
              f"DiT (hidden {m.hidden_size}, depth {m.depth}, {m.num_heads} heads, "
              f"patch {m.patch_size})")
  h, w, c = config_lib.image_shape(config)
  decoded = (f", decoded by {config.autoencoder.path}" if config.autoencoder.path
             else " (no autoencoder: samples are latents)")
  return (f"{name} on {h}x{w}x{c} latents{decoded}, {m.num_classes} classes + null, "
          f"linear T={config.diffusion.num_timesteps} eps"
          + ("; learned-variance channels unused" if m.learn_sigma else "")
          + f"; ddx guides all {c} channels (the official sampler guides the first 3)")
