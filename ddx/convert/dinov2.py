"""Imports DINOv2 weights as a ddx encoder folder (`ddx.encoders.dinov2`).

    python -m ddx.convert dinov2_vitb14_pretrain.pth --workdir dinov2_vitb14
    python -m ddx.convert facebook--dinov2-base/ --workdir dinov2_vitb14

SRC is either
  * an official torch-hub state_dict (facebookresearch/dinov2's
    `dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`: keys cls_token, pos_embed,
    register_tokens, patch_embed.proj.*, blocks.{i}.{norm1, attn.qkv,
    attn.proj, ls1.gamma, norm2, mlp.fc1/fc2 or mlp.w12/w3, ls2.gamma},
    norm.*; mask_token, which only DINOv2's training uses, is ignored), or
  * a transformers folder (save_pretrained / huggingface-cli download of
    facebook/dinov2-* or facebook/dinov2-with-registers-*: config.json with
    model_type dinov2 or dinov2_with_registers, model.safetensors or
    pytorch_model.bin, either transformers' saved names or its current ones).
Downloading is the user's job; nothing here touches the network.

The architecture is read from the weights' shapes (and a transformers
config.json): width D and patch from patch_embed.proj.weight [D, 3, p, p],
the position grid M from pos_embed [1, 1 + M*M, D], depth from blocks.{i},
registers from register_tokens [1, R, D], SwiGLU from mlp.w12, the MLP ratio
from fc1; heads from config.json, else D / 64 (every released DINOv2).
The position-embedding resize follows what the source's own code does
(`ddx.encoders.dinov2`): transformers' for a transformers folder (offset 0;
antialiased for the with-registers model), torch hub's for a .pth (offset
0.1 without registers; antialiased, offset 0 with them). dgm-eval's and
REPA's numbers come from the torch-hub models.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Optional

import numpy as np

from ddx.inception import file_digest
from ddx.convert.common import (ConversionError, begin_output, check_output,
                                finish_output, map_weights, read_json, require,
                                read_state_dict, torch_module, unreadable,
                                weight_files)
from ddx.encoders import dinov2 as enc

MODEL_TYPES = {"dinov2": False, "dinov2_with_registers": True}   # -> has registers
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Keys of the official state_dict that are not inference weights.
IGNORED = ("mask_token",)

_BLOCK = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
# transformers' names inside a layer (saved ones, then 5.x's in-memory ones)
# -> the official names.
_HF_LAYER = {
    "norm1": "norm1", "norm2": "norm2",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "layer_scale1": "ls1", "layer_scale2": "ls2",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12", "mlp.weights_out": "mlp.w3", "mlp.down_proj": "mlp.w3",
}
_HF_QKV = (("attention.attention.query", "attention.attention.key", "attention.attention.value"),
           ("attention.q_proj", "attention.k_proj", "attention.v_proj"))
_HF_TOP = {"embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
           "embeddings.position_embeddings": "pos_embed",
           "embeddings.register_tokens": "register_tokens",
           "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
           "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}


def _looks_official(keys) -> bool:
  return "cls_token" in keys and "patch_embed.proj.weight" in keys


def is_official_file(path: str) -> bool:
  """Whether a .pt/.pth file holds a torch-hub DINOv2 state_dict (read safely:
  weights_only, memory-mapped where the file allows, so no tensor is loaded)."""
  try:
    import torch
  except ImportError:
    return False
  for mmap in (True, False):
    try:
      state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
      return isinstance(state, dict) and _looks_official(state)
    except Exception:   # not readable this way; the importer says why
      continue
  return False


def is_transformers_folder(src: str) -> bool:
  """Whether `src` is a transformers DINOv2 folder (config.json model_type)."""
  cfg = os.path.join(src, "config.json")
  return os.path.isfile(cfg) and read_json(cfg).get("model_type") in MODEL_TYPES


# --------------------------------------------------------------------------
# Reading.


def _tensors(obj, path: str, torch) -> dict[str, np.ndarray]:
  not_tensors = sorted(str(k) for k, v in obj.items() if not torch.is_tensor(v))
  if not_tensors:
    raise ConversionError(f"{path}: entry {not_tensors[0]!r} is not a tensor; expected "
                          "a DINOv2 state_dict of tensors")
  return {k: v.detach().to(torch.float32).numpy() for k, v in obj.items()}


def read_official(path: str) -> dict[str, np.ndarray]:
  """The official state_dict in a .pth, as float32 arrays keyed by name."""
  torch = torch_module()
  require(os.path.isfile(path), f"{path} does not exist; download the DINOv2 weights "
           "first (facebookresearch/dinov2's README lists dinov2_vitb14_pretrain.pth)")
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise unreadable(path, e, "DINOv2 state_dict") from None
  require(isinstance(state, dict), f"{path} holds a {type(state).__name__}, not a "
           "DINOv2 state_dict")
  require(_looks_official(state), f"{path} has no cls_token and patch_embed.proj.weight; "
           "it is not a facebookresearch/dinov2 backbone state_dict")
  return _tensors(state, path, torch)




def official_from_transformers(state: dict, source: str) -> dict[str, np.ndarray]:
  """transformers' Dinov2Model names -> the official ones (q, k, v stacked into qkv).

  A prefix "dinov2." / "dinov2_with_registers." (a classification model's
  backbone) is dropped, with its classifier. Names neither knows are kept,
  so the weight mapping names them as not part of the network.
  """
  out, qkv = {}, {}
  for key, value in state.items():
    for prefix in ("dinov2.", "dinov2_with_registers."):
      if key.startswith(prefix):
        key = key[len(prefix):]
    if key.startswith("classifier."):
      continue
    if key in _HF_TOP:
      out[_HF_TOP[key]] = value
      continue
    m = _BLOCK.match(key)
    if not m:
      out[key] = value
      continue
    i, rest = m.groups()
    name, _, leaf = rest.rpartition(".")
    if name in _HF_LAYER:
      leaf = "gamma" if leaf == "lambda1" else leaf   # LayerScale's one param
      out[f"blocks.{i}.{_HF_LAYER[name]}.{leaf}"] = value
    elif any(name in names for names in _HF_QKV):
      names = next(n for n in _HF_QKV if name in n)
      qkv.setdefault((i, leaf, names), {})[names.index(name)] = (key, value)
    elif name in ("mlp.gate_proj", "mlp.up_proj"):
      qkv.setdefault((i, leaf, ("mlp.gate_proj", "mlp.up_proj")), {})[
          ("mlp.gate_proj", "mlp.up_proj").index(name)] = (key, value)
    else:
      out[key] = value
  for (i, leaf, names), parts in qkv.items():
    for j, n in enumerate(names):
      require(j in parts, f"weight encoder.layer.{i}.{n}.{leaf} is missing from {source}; "
               "the checkpoint is truncated")
    target = "mlp.w12" if names[0] == "mlp.gate_proj" else "attn.qkv"
    out[f"blocks.{i}.{target}.{leaf}"] = np.concatenate(
        [parts[j][1] for j in range(len(names))], axis=0)
  return out


# --------------------------------------------------------------------------
# The architecture, from the shapes.


def _weight(state: dict, key: str, ndim: int, source: str) -> np.ndarray:
  require(key in state, f"weight {key} is missing from {source}; it is not a DINOv2 "
           "backbone checkpoint")
  w = state[key]
  require(w.ndim == ndim, f"weight {key} in {source} has shape {w.shape}; DINOv2's has "
           f"{ndim} dimensions")
  return w


def architecture(state: dict, source: str, hf_config: Optional[dict] = None,
                 registers_model: bool = False) -> enc.Dinov2Config:
  """The DINOv2 config implied by an official-named state_dict's shapes.

  Args:
    state: {official key: array}.
    source: what to call the weights in messages.
    hf_config: a transformers config.json (heads, eps, activation), or None
      for a torch-hub file.
    registers_model: transformers' Dinov2WithRegistersModel (its resize is
      antialiased).
  Raises:
    ConversionError: a missing or misshaped weight, or a setting ddx does not
      build, named.
  """
  d, c, p, p2 = _weight(state, "patch_embed.proj.weight", 4, source).shape
  require(p == p2 and c == 3, f"weight patch_embed.proj.weight in {source} has shape "
           f"{(d, c, p, p2)}; DINOv2's is [D, 3, p, p]")
  pos = _weight(state, "pos_embed", 3, source)
  grid = int(round(math.sqrt(pos.shape[1] - 1)))
  require(pos.shape[0] == 1 and pos.shape[2] == d and grid * grid + 1 == pos.shape[1],
           f"weight pos_embed in {source} has shape {pos.shape}; DINOv2's is "
           f"[1, 1 + M*M, {d}]")
  depth = 0
  while f"blocks.{depth}.norm1.weight" in state:
    depth += 1
  require(depth >= 1, f"weight blocks.0.norm1.weight is missing from {source}; it is "
           "not a DINOv2 backbone (a chunked-blocks checkpoint: re-save it unchunked)")
  registers = 0
  if "register_tokens" in state:
    reg = _weight(state, "register_tokens", 3, source)
    require(reg.shape[0] == 1 and reg.shape[2] == d, f"weight register_tokens in "
             f"{source} has shape {reg.shape}; DINOv2's is [1, R, {d}]")
    registers = reg.shape[1]
  hf = hf_config or {}
  swiglu = "blocks.0.mlp.w12.weight" in state
  if hf:
    act = hf.get("hidden_act", "gelu")
    require(swiglu or act == "gelu", f"{source}: hidden_act={act!r}; ddx builds DINOv2 "
             "with exact GELU or SwiGLU only")
    require(bool(hf.get("use_swiglu_ffn", False)) == swiglu,
             f"{source}: use_swiglu_ffn={hf.get('use_swiglu_ffn')!r} but the weights "
             f"{'have' if swiglu else 'lack'} the SwiGLU projection")
  if swiglu:
    rows = _weight(state, "blocks.0.mlp.w12.weight", 2, source).shape[0]
    ratio = float(hf.get("mlp_ratio", 4))
  else:
    rows = _weight(state, "blocks.0.mlp.fc1.weight", 2, source).shape[0]
    ratio = rows // d if rows % d == 0 else rows / d
  if "num_attention_heads" in hf:
    heads = int(hf["num_attention_heads"])
  else:
    require(d % enc.HEAD_DIM == 0, f"weight patch_embed.proj.weight in {source}: width "
             f"{d} is not a multiple of {enc.HEAD_DIM}, so the number of heads is unknown "
             "(every released DINOv2 has 64 channels per head)")
    heads = d // enc.HEAD_DIM
  require(d % heads == 0, f"{source}: num_attention_heads={heads} does not divide the "
           f"width {d}")
  official = hf_config is None
  with_registers = registers_model if not official else registers > 0
  config = enc.Dinov2Config(
      hidden_size=int(d), depth=depth, num_heads=heads, patch_size=int(p),
      pos_grid=grid, num_registers=int(registers), mlp="swiglu" if swiglu else "gelu",
      mlp_ratio=ratio, qkv_bias="blocks.0.attn.qkv.bias" in state,
      layer_norm_eps=float(hf.get("layer_norm_eps", 1e-6)),
      interpolate_offset=0.1 if official and not with_registers else 0.0,
      interpolate_antialias=with_registers)
  want = 2 * config.mlp_hidden if swiglu else config.mlp_hidden
  key = "blocks.0.mlp.w12.weight" if swiglu else "blocks.0.mlp.fc1.weight"
  require(rows == want, f"weight {key} in {source} has {rows} rows; a DINOv2 of width "
           f"{d} and MLP ratio {ratio} has {want}")
  return config


def params_from_state_dict(state: dict, config: enc.Dinov2Config, source: str) -> Any:
  """The Flax params of `config` from an official-named state_dict.

  Raises:
    ConversionError: the first missing, extra or misshaped weight, named.
  """
  def to_ddx(path, key, value, shape):
    want = enc.torch_shape(path, shape)
    require(tuple(value.shape) == want, f"weight {key} in {source} has shape "
             f"{tuple(value.shape)}; the DINOv2 its other weights describe needs {want}")
    return enc.from_torch_layout(path, value)
  return map_weights(state, enc.abstract_params(config), enc.official_key, to_ddx,
                     source=source, what="the DINOv2 its shapes describe",
                     missing_hint="the checkpoint is truncated or not a DINOv2 backbone",
                     ignore=IGNORED)


def convert(src: str, workdir: str) -> enc.Encoder:
  """Converts a torch-hub .pth or a transformers folder into an encoder folder.

  Args:
    src: the .pth file or the transformers folder (module docstring).
    workdir: the encoder folder to write: new or empty (`check_output`).
  Returns:
    the Encoder written.
  Raises:
    ConversionError: one line naming what cannot be converted.
  """
  check_output(workdir)
  if os.path.isdir(src):
    hf = read_json(os.path.join(src, "config.json"))
    model_type = hf.get("model_type")
    require(model_type in MODEL_TYPES, f"{src}/config.json has model_type "
             f"{model_type!r}; a DINOv2 folder has one of {sorted(MODEL_TYPES)}")
    files = weight_files(src, HF_WEIGHT_FILES)
    source = ", ".join(files)
    state = official_from_transformers(
        read_state_dict(files, "transformers weight file"), source)
    config = architecture(state, source, hf_config=hf,
                          registers_model=MODEL_TYPES[model_type])
    fmt = "transformers"
  else:
    files = [src]
    source = src
    state = read_official(src)
    config = architecture(state, source)
    fmt = "torch-hub"
  params = params_from_state_dict(state, config, source)
  del state
  record = {"format": fmt, "path": os.path.abspath(src),
            "files": [{"name": os.path.basename(f), "sha256": file_digest(f)} for f in files]}
  begin_output(workdir)
  try:
    out = enc.save(workdir, config, params, source=record)
  except enc.EncoderWeightsError as e:
    raise ConversionError(str(e)) from None
  finish_output(workdir)
  return out


def summary(encoder: enc.Encoder) -> str:
  """One line describing the imported encoder (for the CLI)."""
  c = encoder.config
  name = enc.preset_name(c) or (f"DINOv2 (width {c.hidden_size}, {c.depth} blocks, "
                                f"{c.num_heads} heads, patch {c.patch_size})")
  resize = ("antialiased bicubic" if c.interpolate_antialias else "bicubic") + (
      f", offset {c.interpolate_offset}" if c.interpolate_offset else "")
  return (f"{name}, {c.num_registers} registers, {c.mlp} MLP, position grid "
          f"{c.pos_grid}x{c.pos_grid} ({c.base_size} px; other sizes: {resize}), "
          f"weights digest {encoder.digest[:16]}")

