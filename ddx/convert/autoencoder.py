"""Imports diffusers' `AutoencoderKL` (Stable Diffusion's VAE) as a ddx autoencoder folder.

    python -m ddx.convert SRC --workdir OUT

SRC is an AutoencoderKL folder as `save_pretrained` or `huggingface-cli
download` writes it (stabilityai/sd-vae-ft-ema, sd-vae-ft-mse: config.json +
diffusion_pytorch_model.safetensors or .bin), or a pipeline folder whose
`vae/` holds one. OUT becomes an autoencoder folder (`ddx.autoencoder.save`:
autoencoder.json + params/) that `ddx.autoencoder.load` reads and latent runs
name in `autoencoder.path`; an existing one is never overwritten.

What maps where: in_channels, out_channels, latent_channels,
block_out_channels, layers_per_block, norm_num_groups, use_quant_conv,
use_post_quant_conv, mid_block_add_attention -> the same ddx fields;
scaling_factor, shift_factor (None -> 0.0) -> the latents' scaling.
sample_size (tiling) and force_upcast (a torch fp16 workaround) say nothing
about the weights and are ignored. Refused with one line naming the field
(exit code 2): down/up block types other than DownEncoderBlock2D /
UpDecoderBlock2D, act_fn other than silu, latents_mean / latents_std; so is
a missing file, a missing or extra weight, or one of the wrong shape.

Older checkpoints (sd-vae-ft-ema's .bin) name the mid-block attention
query / key / value / proj_attn (today to_q / to_k / to_v / to_out.0), and
some store those projections as 1x1 convs [C, C, 1, 1]; both are accepted.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import numpy as np

from ddx.convert.common import (ConversionError, begin_output, check_output,
                                finish_output, map_weights, read_json, read_state_dict,
                                require, weight_files)

# AutoencoderKL's constructor defaults (diffusers 0.42): a field missing from
# config.json takes these, as diffusers' from_config does.
AUTOENCODER_DEFAULTS = {
    "in_channels": 3, "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",), "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,), "layers_per_block": 1, "act_fn": "silu",
    "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32,
    "scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None,
    "latents_std": None, "force_upcast": True, "use_quant_conv": True,
    "use_post_quant_conv": True, "mid_block_add_attention": True,
}

_LEGACY = re.compile(r"(attentions\.\d+)\.(query|key|value|proj_attn)\.")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def locate(src: str) -> str:
  """The AutoencoderKL folder in `src` (itself, or its `vae/`)."""
  require(os.path.isdir(src), f"{src} does not exist or is not a folder; pass the "
           "folder diffusers' save_pretrained (or huggingface-cli download) wrote")
  for folder in (src, os.path.join(src, "vae")):
    if os.path.isfile(os.path.join(folder, "config.json")):
      if read_json(os.path.join(folder, "config.json")).get("_class_name") == "AutoencoderKL":
        return folder
  raise ConversionError(f"{src}/config.json (or {src}/vae/config.json) with "
                        "_class_name AutoencoderKL does not exist; SRC must be a "
                        "diffusers AutoencoderKL folder")


def settings_of(cfg: dict, where: str = "config.json") -> dict:
  """The ddx autoencoder settings of an AutoencoderKL config.

  Args:
    cfg: the config.json as a dict.
    where: its path, for error messages.
  Returns:
    a settings dict for `ddx.autoencoder.save` (without source / fingerprint).
  Raises:
    ConversionError: a field ddx's autoencoder cannot represent, named.
  """
  name = cfg.get("_class_name", "AutoencoderKL")
  require(name == "AutoencoderKL", f"{where}: _class_name={name!r} is not supported; "
           "ddx.convert imports diffusers' AutoencoderKL")
  c = {**AUTOENCODER_DEFAULTS, **{k: v for k, v in cfg.items() if not k.startswith("_")}}
  unsupported = lambda field, ok, why="": require(
      ok, f"{where}: {field}={c[field]!r} is not supported by ddx's autoencoder{why}")
  boc = c["block_out_channels"]
  require(isinstance(boc, (list, tuple)) and len(boc) >= 1
           and all(isinstance(b, int) and b > 0 for b in boc),
           f"{where}: block_out_channels={boc!r} must be a list of positive integers")
  levels = len(boc)
  for field, block in (("down_block_types", "DownEncoderBlock2D"),
                       ("up_block_types", "UpDecoderBlock2D")):
    types = list(c[field])
    require(len(types) == levels, f"{where}: {field} has {len(types)} entries; "
             f"block_out_channels has {levels}, one per level")
    for i, t in enumerate(types):
      require(t == block, f"{where}: {field}[{i}]={t!r} is not supported; ddx's "
               f"autoencoder has {block} only")
  unsupported("act_fn", c["act_fn"] == "silu", " (silu only)")
  unsupported("latents_mean", c["latents_mean"] is None,
              " (per-channel latent statistics; only scaling_factor / shift_factor)")
  unsupported("latents_std", c["latents_std"] is None,
              " (per-channel latent statistics; only scaling_factor / shift_factor)")
  # The network's fields as ddx declares them (ddx.autoencoder.NETWORK_FIELDS);
  # dtype is ddx's own, block_out_channels is checked above.
  from ddx import autoencoder as ae_lib
  kinds = {f.name: f.type for f in dataclasses.fields(ae_lib.Settings)}
  network = [k for k in ae_lib.NETWORK_FIELDS if k not in ("dtype", "block_out_channels")]
  for field in network:
    if kinds[field] == "int":
      require(isinstance(c[field], int) and not isinstance(c[field], bool) and c[field] > 0,
               f"{where}: {field}={c[field]!r} must be a positive integer")
    else:
      require(isinstance(c[field], bool), f"{where}: {field}={c[field]!r} must be true or false")
  bad = [b for b in boc if b % c["norm_num_groups"]]
  require(not bad, f"{where}: norm_num_groups={c['norm_num_groups']} does not divide "
           f"block_out_channels={list(boc)}")
  for field in ("scaling_factor", "shift_factor"):
    v = c[field]
    require(v is None and field == "shift_factor"
             or isinstance(v, (int, float)) and not isinstance(v, bool),
             f"{where}: {field}={v!r} must be a number")
  require(c["scaling_factor"] > 0, f"{where}: scaling_factor={c['scaling_factor']} "
           "must be positive")
  return {
      **{k: c[k] for k in ae_lib.NETWORK_FIELDS if k != "dtype"},
      "block_out_channels": list(boc), "dtype": "float32",
      "scaling_factor": float(c["scaling_factor"]),
      "shift_factor": float(c["shift_factor"] or 0.0),
  }


def rename_legacy(state: dict) -> dict:
  """Today's names for older attention keys (query -> to_q, ..., proj_attn -> to_out.0).

  Returns:
    a new dict; a legacy key whose new name is also present must hold the
    same values (it is then dropped).
  """
  out = {}
  for k, v in state.items():
    new = _LEGACY.sub(lambda m: f"{m.group(1)}.{_LEGACY_NAMES[m.group(2)]}.", k)
    if new != k and new in state:
      require(np.array_equal(state[new], v), f"weights {k} and {new} are both present "
               "and differ; which one to use is ambiguous")
      continue
    out[new] = v
  return out


def _torch_shapes(path: tuple, shape: tuple) -> list[tuple]:
  """The PyTorch shapes accepted for a ddx leaf of `shape` (first: today's)."""
  if path[-1] == "kernel" and len(shape) == 4:      # conv HWIO <- OIHW
    return [(shape[3], shape[2], shape[0], shape[1])]
  if path[-1] == "kernel":                          # Dense (in, out) <- Linear (out, in)
    return [(shape[1], shape[0]), (shape[1], shape[0], 1, 1)]   # or a 1x1 conv (old)
  return [tuple(shape)]


def params_from_state_dict(state: dict, settings: dict, source: str = "the checkpoint") -> Any:
  """ddx autoencoder params from a diffusers AutoencoderKL state_dict.

  Args:
    state: {state_dict key: float32 array in PyTorch layout}.
    settings: the ddx settings (`settings_of`) the weights are for.
    source: what to call the weights in error messages.
  Returns:
    the params pytree of `ddx.autoencoder.network(settings)`, float32 NumPy.
  Raises:
    ConversionError: a missing, extra or wrongly shaped weight, named.
  """
  from ddx import autoencoder as ae_lib
  from ddx.models.autoencoder import torch_key
  s = ae_lib.settings_from_dict({**settings, "source": ""})

  def to_ddx(path, key, value, shape):
    ok = _torch_shapes(path, shape)
    require(value.shape in ok, f"weight {key} in {source} has shape {value.shape}; "
            f"the config.json implies {ok[0]}")
    if path[-1] == "kernel" and len(shape) == 4:
      return value.transpose(2, 3, 1, 0)
    if path[-1] == "kernel":
      return value.reshape(value.shape[:2]).T
    return value
  return map_weights(rename_legacy(state), ae_lib.abstract_params(s), torch_key, to_ddx,
                     source=source,
                     missing_hint="the config.json does not describe these weights",
                     what="the AutoencoderKL its config.json describes")


def convert(src: str, workdir: str) -> Any:
  """Converts the diffusers AutoencoderKL in `src` into the autoencoder folder `workdir`.

  Args:
    src: an AutoencoderKL folder or a pipeline folder with vae/.
    workdir: the autoencoder folder to write: a new or empty folder (`check_output`).
  Returns:
    the ddx.autoencoder.Settings written (with its fingerprint).
  Raises:
    ConversionError: the source cannot be converted (one line naming why).
  """
  from ddx import autoencoder as ae_lib
  folder = locate(src)
  check_output(workdir)
  where = os.path.join(folder, "config.json")
  settings = settings_of(read_json(where), where)
  files = weight_files(folder)
  params = params_from_state_dict(read_state_dict(files), settings, ", ".join(files))
  settings["source"] = f"diffusers AutoencoderKL {os.path.abspath(folder)}"
  begin_output(workdir)
  result = ae_lib.save(workdir, settings, params)
  finish_output(workdir)
  return result


def summary(settings) -> str:
  """One line describing the imported autoencoder (for the CLI)."""
  s = settings
  return (f"AutoencoderKL block_out_channels={tuple(s.block_out_channels)} "
          f"layers_per_block={s.layers_per_block}: {s.in_channels}-channel images -> "
          f"{s.latent_channels}-channel latents / {s.downsample}, scaling_factor="
          f"{s.scaling_factor:g} shift_factor={s.shift_factor:g}, fingerprint {s.fingerprint}")
