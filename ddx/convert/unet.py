"""Imports diffusers checkpoints (`UNet2DModel` + its scheduler) as ddx workdirs.

    python -m ddx.convert SRC --workdir OUT     (SRC: a diffusers UNet2DModel folder)

SRC is a folder as diffusers' `save_pretrained` writes it: a pipeline folder
(`unet/` and `scheduler/`, as `DDPMPipeline.save_pretrained` makes), a hub
repository downloaded as it is (google/ddpm-cifar10-32 keeps the UNet's
`config.json` and weights and `scheduler_config.json` side by side), or a bare
`UNet2DModel` folder (then the schedule is DDPM's: linear, 1e-4 to 0.02,
T = 1000, ε-prediction). Weights are read from `diffusion_pytorch_model.safetensors`
or `.bin` (sharded checkpoints through their `.index.json` too).

OUT becomes a normal ddx workdir: `config.json` (the U-Net settings and the
schedule read from the diffusers configs, every other key at ddx's default)
and an orbax checkpoint at step 0 whose params and EMA params are both the
converted weights, with a fresh optimizer state. `ddx.load`, `--mode sample`,
`--mode eval`, inversion and fine-tuning take it like any trained run.

What maps where (diffusers -> ddx):
  UNet2DModel: block_out_channels -> model.ch (the first) and model.ch_mult;
  layers_per_block -> num_res_blocks; the Attn*Block2D levels ->
  attn_resolutions; norm_num_groups, norm_eps, dropout, flip_sin_to_cos,
  freq_shift, downsample_padding (0 -> bottom_right, 1 -> symmetric),
  attention_head_dim (None -> 0, one head); num_class_embeds (a label table,
  class_embed_type None) -> num_classes. ddx's label table has one more row,
  its "null" label (used by `labels=None` and classifier-free guidance); the
  diffusers model never learned one, so that row is zeros.
  Scheduler: beta_schedule linear / squaredcos_cap_v2 (identical betas to ddx's
  cosine: both are improved DDPM's formula with s = 0.008 and β capped at
  0.999), beta_start, beta_end, num_train_timesteps -> diffusion.*;
  prediction_type epsilon / sample / v_prediction -> diffusion.prediction
  eps / x0 / v; clip_sample -> sampling.clip_x0; variance_type fixed_small /
  fixed_large -> sampling.ddpm_variance posterior / beta.
Anything else (other block types, class_embed_type timestep / identity,
cross-attention, scale-shift time conditioning, explicit trained_betas, ...)
is refused with one line that names the field, exit code 2; so is a missing
file, a missing or extra weight, or a weight of the wrong shape.

Time indices agree: diffusers' timesteps are the indices 0 .. T-1 into its
alphas_cumprod, whose entry 0 is 1 - β_1, exactly ddx's index i.

"""
from __future__ import annotations

import os
import re
import sys
from typing import Any, Optional

import numpy as np

from ddx.convert.common import (ConversionError, abstract_train_state, begin_output,
                                check_output, finish_output, map_weights, read_json,
                                read_state_dict, require, weight_files, write_workdir)

# UNet2DModel's constructor defaults (diffusers 0.42): a field missing from a
# config.json takes these, as diffusers' own from_config does.
UNET_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3,
    "center_input_sample": False, "time_embedding_type": "positional",
    "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D",
                         "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D",
                       "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896), "layers_per_block": 2,
    "mid_block_scale_factor": 1, "downsample_padding": 1,
    "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0,
    "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32,
    "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True,
    "class_embed_type": None, "num_class_embeds": None,
    "num_train_timesteps": None,
}

# The scheduler fields that say what the model is (DDPMScheduler/DDIMScheduler
# defaults); sampling-time choices (timestep_spacing, steps_offset) are not
# part of the model and are left to ddx's sampler options.
SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
    "beta_schedule": "linear", "trained_betas": None,
    "prediction_type": "epsilon", "clip_sample": True, "clip_sample_range": 1.0,
    "thresholding": False, "rescale_betas_zero_snr": False,
    "variance_type": "fixed_small",
}

_SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}
_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
# fixed_*_log use the same variance as fixed_*, through its log.
_VARIANCES = {"fixed_small": "posterior", "fixed_small_log": "posterior",
              "fixed_large": "beta", "fixed_large_log": "beta"}

_DOWN_BLOCKS = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP_BLOCKS = {"UpBlock2D": False, "AttnUpBlock2D": True}


# --------------------------------------------------------------------------
# Reading the diffusers folder.


def locate(src: str) -> tuple[str, Optional[str]]:
  """Finds the UNet folder and the scheduler config in a diffusers folder.

  Args:
    src: a pipeline folder (unet/, scheduler/), a flat hub download
      (config.json + scheduler_config.json) or a bare UNet2DModel folder.
  Returns:
    (unet_dir, scheduler_config_path or None when SRC has none).
  """
  require(os.path.isdir(src), f"{src} does not exist or is not a folder; pass "
           "the folder diffusers' save_pretrained (or huggingface-cli download) wrote")
  unet = os.path.join(src, "unet")
  unet = unet if os.path.isfile(os.path.join(unet, "config.json")) else src
  require(os.path.isfile(os.path.join(unet, "config.json")),
           f"{os.path.join(src, 'unet', 'config.json')} (or {src}/config.json) does "
           "not exist; SRC must be a diffusers pipeline or UNet2DModel folder")
  for path in (os.path.join(src, "scheduler", "scheduler_config.json"),
               os.path.join(src, "scheduler_config.json")):
    if os.path.isfile(path):
      return unet, path
  return unet, None


# --------------------------------------------------------------------------
# diffusers configs -> ddx config.


def _filled(cfg: dict, defaults: dict) -> dict:
  return {**defaults, **{k: v for k, v in cfg.items() if not k.startswith("_")}}


def model_keys(unet_cfg: dict, where: str = "config.json") -> dict:
  """The ddx `config.model` / `config.data` values of a UNet2DModel config.

  Args:
    unet_cfg: the UNet's config.json as a dict.
    where: the file's name, for error messages.
  Returns:
    {"model": {...}, "data": {"image_size": int, "channels": int}}.
  Raises:
    ConversionError: a field ddx's U-Net cannot represent, named.
  """
  name = unet_cfg.get("_class_name", "UNet2DModel")
  require(name == "UNet2DModel",
           f"{where}: _class_name={name!r} is not supported; ddx.convert takes "
           "diffusers' UNet2DModel (cross-attention and conditional UNets are not ddx models)")
  c = _filled(unet_cfg, UNET_DEFAULTS)
  unsupported = lambda field, ok: require(
      ok, f"{where}: {field}={c[field]!r} is not supported by ddx's U-Net")

  size = c["sample_size"]
  if isinstance(size, (list, tuple)):
    require(len(size) == 2 and size[0] == size[1],
             f"{where}: sample_size={size!r} is not square; ddx models square images")
    size = size[0]
  require(isinstance(size, int) and size > 0,
           f"{where}: sample_size={c['sample_size']!r} must be the image size "
           "(an integer); set it in config.json")
  require(c["in_channels"] in (1, 3),
           f"{where}: in_channels={c['in_channels']!r} is not supported; ddx "
           "models 1- or 3-channel images")
  require(c["out_channels"] == c["in_channels"],
           f"{where}: out_channels={c['out_channels']!r} differs from in_channels="
           f"{c['in_channels']}; ddx's U-Net predicts a tensor of the input's shape "
           "(learned variances are not supported)")
  unsupported("center_input_sample", c["center_input_sample"] is False)
  unsupported("time_embedding_type", c["time_embedding_type"] == "positional")
  unsupported("act_fn", c["act_fn"] == "silu")
  unsupported("mid_block_type", c["mid_block_type"] == "UNetMidBlock2D")
  unsupported("add_attention", c["add_attention"] is True)
  unsupported("mid_block_scale_factor", c["mid_block_scale_factor"] == 1)
  unsupported("downsample_type", c["downsample_type"] == "conv")
  unsupported("upsample_type", c["upsample_type"] == "conv")
  unsupported("resnet_time_scale_shift", c["resnet_time_scale_shift"] == "default")
  unsupported("class_embed_type", c["class_embed_type"] is None)
  unsupported("downsample_padding", c["downsample_padding"] in (0, 1))

  boc = [int(x) for x in c["block_out_channels"]]
  ch = boc[0]
  require(all(b % ch == 0 for b in boc),
           f"{where}: block_out_channels={boc} is not supported: every width must "
           f"be a multiple of the first ({ch}), ddx's model.ch")
  unsupported("time_embedding_dim", c["time_embedding_dim"] in (None, 4 * ch))
  down, up = list(c["down_block_types"]), list(c["up_block_types"])
  levels = len(boc)
  require(len(down) == levels and len(up) == levels,
           f"{where}: down_block_types and up_block_types need one entry per "
           f"block_out_channels ({levels})")
  for i, b in enumerate(down):
    require(b in _DOWN_BLOCKS, f"{where}: down_block_types[{i}]={b!r} is not "
             f"supported; ddx's U-Net has {tuple(_DOWN_BLOCKS)}")
  for i, b in enumerate(up):
    require(b in _UP_BLOCKS, f"{where}: up_block_types[{i}]={b!r} is not "
             f"supported; ddx's U-Net has {tuple(_UP_BLOCKS)}")
  for level in range(levels):
    j = levels - 1 - level   # up_blocks run from the lowest resolution up
    require(_DOWN_BLOCKS[down[level]] == _UP_BLOCKS[up[j]],
             f"{where}: up_block_types[{j}]={up[j]!r} does not mirror "
             f"down_block_types[{level}]={down[level]!r}; ddx puts attention "
             "at a resolution on both paths or on neither")
  attn_res = tuple(size // 2 ** l for l in range(levels) if _DOWN_BLOCKS[down[l]])

  groups = int(c["norm_num_groups"])
  require(all(b % groups == 0 for b in boc),
           f"{where}: norm_num_groups={groups} does not divide block_out_channels={boc}")
  unsupported("attn_norm_num_groups", c["attn_norm_num_groups"] in (None, groups))
  attn_ch = sorted({boc[l] for l in range(levels) if _DOWN_BLOCKS[down[l]]} | {boc[-1]})
  head_dim = c["attention_head_dim"]
  if head_dim is None or all(head_dim == a for a in attn_ch):
    head_dim = 0   # one head over all channels, DDPM's attention
  require(isinstance(head_dim, int) and all(a % (head_dim or a) == 0 for a in attn_ch),
           f"{where}: attention_head_dim={c['attention_head_dim']!r} must divide "
           f"the channels of every attention block {tuple(attn_ch)}")
  num_classes = c["num_class_embeds"] or 0
  require(isinstance(num_classes, int) and num_classes >= 0,
           f"{where}: num_class_embeds={c['num_class_embeds']!r} must be an integer")
  model = dict(
      ch=ch, ch_mult=tuple(b // ch for b in boc),
      num_res_blocks=int(c["layers_per_block"]), attn_resolutions=attn_res,
      dropout=float(c["dropout"]), num_groups=groups, resamp_with_conv=True,
      num_classes=num_classes, norm="group",
      flip_sin_to_cos=bool(c["flip_sin_to_cos"]), freq_shift=int(c["freq_shift"]),
      downsample_padding="bottom_right" if c["downsample_padding"] == 0 else "symmetric",
      attn_head_dim=int(head_dim), norm_eps=float(c["norm_eps"]))
  return {"model": model, "data": {"image_size": size, "channels": c["in_channels"]}}


def schedule_keys(sched_cfg: Optional[dict],
                  where: str = "scheduler_config.json") -> dict:
  """The ddx `config.diffusion` / `config.sampling` values of a scheduler config.

  Args:
    sched_cfg: the scheduler's config as a dict; None = DDPM's defaults.
    where: the file's name, for error messages.
  Returns:
    {"diffusion": {...}, "sampling": {"clip_x0": bool, "ddpm_variance": str}}.
  Raises:
    ConversionError: a field ddx's schedules or samplers lack, named.
  """
  c = _filled(sched_cfg or {}, SCHEDULER_DEFAULTS)
  unsupported = lambda field, ok, fix="": require(
      ok, f"{where}: {field}={c[field]!r} is not supported by ddx{fix}")
  unsupported("trained_betas", c["trained_betas"] is None,
              "; ddx builds its schedules from diffusion.schedule (linear | cosine)")
  unsupported("beta_schedule", c["beta_schedule"] in _SCHEDULES,
              f"; use one of {tuple(_SCHEDULES)}")
  unsupported("prediction_type", c["prediction_type"] in _PREDICTIONS,
              f"; use one of {tuple(_PREDICTIONS)}")
  unsupported("thresholding", not c["thresholding"])
  unsupported("rescale_betas_zero_snr", not c["rescale_betas_zero_snr"])
  unsupported("clip_sample_range",
              not c["clip_sample"] or float(c["clip_sample_range"]) == 1.0,
              " (its clip_x0 clips to [-1, 1])")
  unsupported("variance_type", c["variance_type"] in _VARIANCES,
              f"; use one of {tuple(_VARIANCES)}")
  T = c["num_train_timesteps"]
  require(isinstance(T, int) and T >= 1,
           f"{where}: num_train_timesteps={T!r} must be a positive integer")
  diffusion = dict(schedule=_SCHEDULES[c["beta_schedule"]], num_timesteps=T,
                   prediction=_PREDICTIONS[c["prediction_type"]])
  if diffusion["schedule"] == "linear":
    b0, b1 = float(c["beta_start"]), float(c["beta_end"])
    require(0 < b0 <= b1 < 1, f"{where}: beta_start={b0}, beta_end={b1} need "
             "0 < beta_start <= beta_end < 1")
    diffusion.update(beta_start=b0, beta_end=b1)
  return {"diffusion": diffusion,
          "sampling": {"clip_x0": bool(c["clip_sample"]),
                       "ddpm_variance": _VARIANCES[c["variance_type"]]}}


def ddx_config(unet_cfg: dict, sched_cfg: Optional[dict], *,
               unet_where: str = "config.json",
               sched_where: str = "scheduler_config.json"):
  """The full ddx run config of a diffusers UNet2DModel and scheduler.

  Keys the diffusers configs say nothing about (data.name, training, optim,
  eval, the sampler and its steps) keep ddx's defaults.

  Returns:
    ml_collections.ConfigDict (ddx.config.base_config() with the model, data
    size, diffusion and sampling keys set).
  """
  from ddx import config as config_lib
  config = config_lib.base_config()
  for group, values in {**model_keys(unet_cfg, unet_where),
                        **schedule_keys(sched_cfg, sched_where)}.items():
    for k, v in values.items():
      config[group][k] = v
  return config


# --------------------------------------------------------------------------
# Weights: diffusers state_dict names <-> the ddx parameter tree.

# ddx submodule name -> diffusers submodule name, inside ResBlock / AttnBlock /
# Downsample / Upsample.
_SUBMODULES = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj",
               "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut",
               "norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
               "proj_out": "to_out.0", "conv": "conv"}
_TOP = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out",
        "temb_dense0": "time_embedding.linear_1",
        "temb_dense1": "time_embedding.linear_2", "label_embed": "class_embedding",
        "mid_block_0": "mid_block.resnets.0", "mid_block_1": "mid_block.resnets.1",
        "mid_attn": "mid_block.attentions.0"}
_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_LEVEL = re.compile(r"(down|up)_(\d+)_(block|attn|downsample|upsample)(?:_(\d+))?")
_KINDS = {"block": "resnets.{i}", "attn": "attentions.{i}",
          "downsample": "downsamplers.0", "upsample": "upsamplers.0"}

# Names written by diffusers before its attention blocks were renamed (the
# google/ddpm-* hub checkpoints, among others), and a Downsample2D alias.
_LEGACY = [(re.compile(r"(attentions\.\d+)\.query\."), r"\1.to_q."),
           (re.compile(r"(attentions\.\d+)\.key\."), r"\1.to_k."),
           (re.compile(r"(attentions\.\d+)\.value\."), r"\1.to_v."),
           (re.compile(r"(attentions\.\d+)\.proj_attn\."), r"\1.to_out.0."),
           (re.compile(r"(downsamplers\.0)\.Conv2d_0\."), r"\1.conv.")]


def torch_key(path: tuple[str, ...], levels: int) -> str:
  """The diffusers state_dict key of the ddx parameter at `path`.

  Args:
    path: ddx parameter path, e.g. ("up_1_block_0", "conv1", "kernel").
    levels: len(model.ch_mult); diffusers numbers its up_blocks from the
      lowest resolution, ddx its up levels like the down ones.
  Returns:
    e.g. "up_blocks.2.resnets.0.conv1.weight".
  """
  top, *subs, leaf = path
  if top in _TOP:
    prefix = _TOP[top]
  else:
    m = _LEVEL.fullmatch(top)
    if m is None:
      raise KeyError(f"no diffusers name for ddx parameter {'/'.join(path)}")
    side, level, kind, i = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    block = level if side == "down" else levels - 1 - level
    prefix = f"{side}_blocks.{block}." + _KINDS[kind].format(i=i)
  return ".".join([prefix] + [_SUBMODULES[s] for s in subs] + [_LEAVES[leaf]])


def _from_torch(leaf: str, value: np.ndarray, target: tuple) -> np.ndarray:
  """A PyTorch-layout weight in ddx's layout (conv OIHW -> HWIO, linear (out, in)
  -> (in, out), a 1x1 conv shortcut -> a dense kernel, and a zero null-label row
  appended to a label table)."""
  if leaf == "kernel" and value.ndim == 4 and len(target) == 4:
    return value.transpose(2, 3, 1, 0)
  if leaf == "kernel" and value.ndim == 4:        # 1x1 conv -> Dense
    return value.reshape(value.shape[:2]).T
  if leaf == "kernel":
    return value.T
  if leaf == "embedding":
    return np.concatenate([value, np.zeros((1,) + value.shape[1:], value.dtype)])
  return value


def _torch_shape(path: tuple[str, ...], shape: tuple) -> tuple:
  """The PyTorch shape that gives a ddx leaf of `shape` (see _from_torch)."""
  leaf = path[-1]
  if leaf == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf == "kernel":
    if path[-2] == "nin_shortcut":   # diffusers' conv_shortcut is a 1x1 conv
      return (shape[1], shape[0], 1, 1)
    return (shape[1], shape[0])
  if leaf == "embedding":
    return (shape[0] - 1,) + tuple(shape[1:])
  return tuple(shape)


def rename_legacy(state: dict) -> dict:
  """Renames keys of older diffusers checkpoints to today's names.

  Returns:
    a new dict; a legacy key is dropped when today's key is also present
    with the same values (PyTorch saves a module registered twice twice).
  """
  out = {}
  for k, v in state.items():
    new = k
    for pattern, repl in _LEGACY:
      new = pattern.sub(repl, new)
    if new != k and new in state:
      require(np.array_equal(state[new], v),
               f"weights {k} and {new} are both present and differ; which one to "
               "use is ambiguous")
      continue
    out[new] = v
  return out


def params_from_state_dict(state: dict, config, source: str = "the checkpoint",
                           abstract_state: Any = None) -> Any:
  """Builds ddx U-Net params from a diffusers UNet2DModel state_dict.

  Args:
    state: {state_dict key: float32 array in PyTorch layout}.
    config: the ddx run config (model and data keys) the weights are for.
    source: what to call the weights in error messages.
    abstract_state: `abstract_train_state(config)`, if already computed.
  Returns:
    the "params" pytree of `UNet(**config.model)`, float32 NumPy arrays.
  Raises:
    ConversionError: a missing, extra or wrongly shaped weight, named.
  """
  if abstract_state is None:
    abstract_state = abstract_train_state(config)
  levels = len(config.model.ch_mult)

  def to_ddx(path, key, value, shape):
    want = _torch_shape(path, shape)
    require(value.shape == want, f"weight {key} in {source} has shape {value.shape}; "
            f"the config.json implies {want}")
    return _from_torch(path[-1], value, shape)
  return map_weights(rename_legacy(state), abstract_state.params,
                     lambda p: torch_key(p, levels), to_ddx, source=source,
                     missing_hint="the config.json does not describe these weights",
                     what="the UNet2DModel its config.json describes")


def convert(src: str, workdir: str) -> Any:
  """Converts the diffusers folder `src` into the ddx workdir `workdir`.

  Args:
    src: diffusers pipeline or UNet2DModel folder (see the module docstring).
    workdir: output ddx workdir: a new or empty folder (`check_output`).
  Returns:
    the ddx run config that was written.
  Raises:
    ConversionError: the source cannot be converted (one line naming why).
  """
  unet_dir, sched_path = locate(src)
  check_output(workdir)
  unet_where = os.path.join(unet_dir, "config.json")
  config = ddx_config(read_json(unet_where),
                      read_json(sched_path) if sched_path else None,
                      unet_where=unet_where, sched_where=str(sched_path))
  if sched_path is None:
    print(f"ddx.convert: {src} has no scheduler_config.json; using DDPM's schedule "
          "(linear 1e-4..0.02, T = 1000, eps)", file=sys.stderr)
  files = weight_files(unet_dir)
  abstract = abstract_train_state(config)
  params = params_from_state_dict(read_state_dict(files), config,
                                  source=", ".join(files), abstract_state=abstract)
  begin_output(workdir)
  write_workdir(workdir, config, params, abstract)
  finish_output(workdir)
  return config


def summary(config) -> str:
  """One line describing the imported U-Net (for the CLI)."""
  m, f = config.model, config.diffusion
  return (f"{config.data.image_size}x{config.data.image_size}x{config.data.channels} "
          f"U-Net ch={m.ch} ch_mult={tuple(m.ch_mult)} attn={tuple(m.attn_resolutions)}, "
          f"{f.schedule} schedule T={f.num_timesteps}, {f.prediction}-prediction")
