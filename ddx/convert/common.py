"""What every ddx.convert importer shares: errors, reading weights, writing the workdir.

torch (and safetensors) are imported here only when weights are read:
pip install 'ddx[convert]'. ddx itself never imports them.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from ddx import outdir
from ddx.weight_files import unreadable_reason

EXIT_BAD_INPUT = 2

# diffusers' save_pretrained names (UNet2DModel, AutoencoderKL, ...).
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class ConversionError(ValueError):
  """A source that cannot be converted; the message names the file/field/weight."""


# --------------------------------------------------------------------------
# The output folder: new, empty, or an import that this module left unfinished.

# Written first and removed last: a folder holding it is an unfinished import.
MARKER = ".ddx-convert-unfinished"
# Everything an import writes (a workdir, or an autoencoder folder), with the
# temporary names of the files it writes through a rename.
OUTPUT_NAMES = frozenset({MARKER, "config.json", "config.json.tmp", "checkpoints",
                          "autoencoder.json", "autoencoder.json.tmp", "params",
                          "encoder.json", "params.npz"})
_OUTDIR = dict(flag="--workdir", command="ddx.convert", error=ConversionError)


def check_output(workdir: str) -> None:
  """Refuses an output folder that holds anything but an unfinished import.

  ddx.convert writes only into a new or empty folder, or into one that an
  interrupted ddx.convert left (it holds MARKER and only OUTPUT_NAMES):
  nothing of the user's is ever replaced. Only reads (`ddx.outdir.check`).
  Raises:
    ConversionError: the path is a file, or a folder holding other things.
  """
  outdir.check(workdir, MARKER, OUTPUT_NAMES, **_OUTDIR)


def begin_output(workdir: str) -> None:
  """Claims the output folder before the first write: checks it again, clears
  what an interrupted import left there, and writes MARKER."""
  outdir.begin(workdir, MARKER, OUTPUT_NAMES, **_OUTDIR)


def finish_output(workdir: str) -> None:
  """Marks the output folder complete (removes MARKER)."""
  outdir.finish(workdir, MARKER)


def require(cond: bool, msg: str) -> None:
  if not cond:
    raise ConversionError(msg)


def read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ConversionError(f"{path} is not valid JSON ({e}); re-download it") from None


def weight_files(folder: str, names: tuple[str, str] = WEIGHT_FILES) -> list[str]:
  """The weight file(s) of a Hugging Face model folder: safetensors first, then .bin.

  Args:
    folder: a save_pretrained folder.
    names: (safetensors name, .bin name): diffusers' by default, or
      transformers' ("model.safetensors", "pytorch_model.bin").
  Returns:
    paths of every shard (one path for an unsharded checkpoint).
  """
  for name in names:
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return [path]
    index = path + ".index.json"
    if os.path.isfile(index):
      shards = sorted(set(read_json(index).get("weight_map", {}).values()))
      require(bool(shards), f"{index} has no weight_map; re-download the checkpoint")
      paths = [os.path.join(folder, s) for s in shards]
      for p in paths:
        require(os.path.isfile(p), f"{p} does not exist (named by {index}); "
                 "download every shard of the checkpoint")
      return paths
  others = sorted(f for f in os.listdir(folder)
                  if f.endswith((".safetensors", ".bin")))
  raise ConversionError(
      f"{os.path.join(folder, names[0])} (or .bin) does not exist"
      + (f"; the folder has {others}: rename the one to convert" if others else
         "; download the weights too (huggingface-cli download fetches them)"))


def torch_module():
  try:
    import torch
  except ImportError:
    raise ConversionError("ddx.convert reads PyTorch weights and needs torch: "
                          "pip install 'ddx[convert]' (torch, safetensors)") from None
  return torch


def unreadable(path: str, error: BaseException, what: str) -> ConversionError:
  """The one-line error for a weight file that torch/safetensors cannot read
  (`ddx.weight_files.unreadable_reason`)."""
  return ConversionError(unreadable_reason(path, error, what))


def read_state_dict(paths: list[str], what: str = "diffusers weight file"
                    ) -> dict[str, np.ndarray]:
  """Reads Hugging Face weight files into float32 NumPy arrays keyed by name.

  Args:
    paths: .safetensors or .bin files (the shards of one checkpoint).
    what: the files' kind, for the one-line error of one that does not read.
  Returns:
    {state_dict key: float32 array in PyTorch layout}.
  """
  torch = torch_module()
  out = {}
  for path in paths:
    try:
      if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        tensors = load_file(path)
      else:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
      raise unreadable(path, e, what) from None
    for k, v in tensors.items():
      if torch.is_tensor(v):
        out[k] = v.detach().to(torch.float32).numpy()
  return out


def abstract_train_state(config) -> Any:
  """The shapes of the TrainState that training creates for `config`.

  Returns:
    `ddx.state_lib.create_state`'s result with jax.ShapeDtypeStruct leaves
    (traced only; no random init is computed).
  """
  import jax
  from ddx import state as state_lib
  tx = state_lib.make_optimizer(config.optim)
  return jax.eval_shape(lambda: state_lib.create_state(
      config, tx, jax.random.key(config.training.seed)))


# --------------------------------------------------------------------------
# The workdir.


def write_workdir(workdir: str, config, params: Any,
                  abstract_state: Any = None) -> None:
  """Writes config.json and a step-0 checkpoint (params = EMA params = `params`).

  The TrainState has the structure `ddx.state_lib.create_state` gives, so
  `--mode train` resumes from it (with a fresh optimizer state, Adam's zeros).

  Args:
    workdir: the ddx workdir to write.
    config: its run config.
    params: the network's "params" pytree.
    abstract_state: `abstract_train_state(config)`, if already computed.
  """
  import jax
  from etils import epath
  from ddx import checkpoint as ckpt_lib
  from ddx import config as config_lib
  from ddx import state as state_lib
  from ddx import processes
  processes.resolve_defaults(config)   # config.json holds what runs, as training's
  root = epath.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  config_lib.write_json(config, root)   # as training writes it
  tx = state_lib.make_optimizer(config.optim)
  state = abstract_state if abstract_state is not None else abstract_train_state(config)
  params = jax.tree.map(jax.numpy.asarray, params)
  # Only the shapes of create_state's result are used: its fields are filled
  # with the converted weights (twice: training and EMA) and a fresh
  # optimizer state, so no random init is computed and thrown away.
  state = state.replace(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                        ema_params=jax.tree.map(jax.numpy.copy, params),
                        opt_state=tx.init(params),
                        batch_stats={})
  abstract = [jax.tree_util.keystr(p) for p, leaf in
              jax.tree_util.tree_flatten_with_path(state)[0]
              if isinstance(leaf, jax.ShapeDtypeStruct)]
  if abstract:   # a TrainState field this function does not know how to fill
    raise RuntimeError(f"ddx.convert does not fill TrainState{abstract[0]}; "
                       "update write_workdir for the new field")
  ck = ckpt_lib.Checkpointer(workdir)
  try:
    ck.save(0, state, config)
  finally:
    ck.close()


def _more(names: list) -> str:
  return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def map_weights(state: dict, abstract_params: Any, torch_key, to_ddx, *, source: str,
                missing_hint: str, what: str, ignore: tuple = ()) -> Any:
  """The ddx params pytree from a PyTorch state_dict, one torch weight per leaf.

  Args:
    state: {state_dict key: float32 array in PyTorch layout}.
    abstract_params: the ddx params (jax.ShapeDtypeStruct leaves).
    torch_key: ddx param path (tuple of names) -> its state_dict key.
    to_ddx: (path, key, value, ddx shape) -> the value in ddx's layout; raises
      ConversionError (naming the weight) for a wrong shape.
    source: what to call the weights in messages (file names).
    missing_hint: the end of the message for a missing weight (why / the fix).
    what: the model the weights should be, for the message on an extra weight.
    ignore: state_dict keys that are not parameters (buffers checked elsewhere).
  Returns:
    the params pytree, float32 NumPy arrays.
  Raises:
    ConversionError: the first missing, extra or wrongly shaped weight, named.
  """
  import jax
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
  paths = [tuple(p.key for p in path) for path, _ in flat]
  keys = [torch_key(p) for p in paths]
  missing = [k for k in keys if k not in state]
  if missing:
    raise ConversionError(f"weight {missing[0]} is missing from {source}{_more(missing)}; "
                          f"{missing_hint}")
  extra = sorted(set(state) - set(keys) - set(ignore))
  if extra:
    raise ConversionError(f"weight {extra[0]} in {source} is not part of {what}"
                          f"{_more(extra)}")
  leaves = [np.ascontiguousarray(to_ddx(path, key, state[key], tuple(leaf.shape)),
                                 dtype=np.float32)
            for path, key, (_, leaf) in zip(paths, keys, flat)]
  return jax.tree_util.tree_unflatten(treedef, leaves)

