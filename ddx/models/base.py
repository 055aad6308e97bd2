"""The backbone contract, and `build`, which makes the network config.model names.

Every backbone (a Flax linen Module registered in `ddx.models.REGISTRY`; the
trainer, the samplers, `ddx.load`, FSDP and `--mode sample|eval` see it only
through this contract; tests/test_backbones.py checks every registered one):

Fields: it accepts these dataclass fields, with these meanings (its defaults
give the plain network: one positional time, scale 1, no head, float32):
  num_classes    int >= 0; 0 = unconditional. Labels are int32 in
                 [0, num_classes], the extra index num_classes being the null
                 label of classifier-free guidance.
  dtype          the compute dtype, "float32" | "bfloat16" (a string as in the
                 config, or a jnp dtype); parameters stay float32.
  time_embedding "positional" | "fourier" (`layers.TIME_EMBEDDINGS`): how the
                 time input becomes features.
  time_scale     float > 0: the time input is multiplied by it first
                 (`layers.scaled_time`; 1 = bit for bit the unscaled time).
  second_time    bool: t is [B, 2], (time, second time) of a two-time process
                 (MeanFlow's interval, a shortcut model's step size;
                 `layers.split_time`), the second embedded through its own
                 path whose last layer starts at zero, so at init the network
                 equals the one-time network with the same weights.
  logvar         bool: a learned log-variance head on the time features
                 (`layers.sow_logvar`), sown as float32 [B] into the "logvar"
                 collection (adaptive loss weighting, EDM2/sCM); the output is
                 unchanged and only an apply with mutable=["logvar"] sees it.
  remat          "none" | "dots" | "full" (`layers.REMATS`): what the backward
                 pass recomputes per block; memory and time, never values.
  attention      "xla" | "auto" | "cudnn" | "tpu_flash" (`attention.ATTENTIONS`):
                 the attention kernel; the same function.
  norm_kernel    "xla" | "pallas" (`fused_norm.NORM_KERNELS`): the same
                 function; where "pallas" cannot apply, the Spec's
                 check_norm_kernel says so (a network without norms ignores it).
plus its own keys, the fields of its Spec (`build` passes each config.model
key that is a field, and the resolved time_embedding / time_scale /
second_time / logvar / remat as keywords).

Call: `net.apply(variables, x, t, labels=None, train=False)`, i.e. the
module's `__call__(x, t, labels, train)`:
  x       [B, H, W, C] float32, the network's input (noisy images or latents).
  t       [B] the process's network time (any numeric dtype, used as float32:
          DDPM's step index i in [0, T), EDM's c_noise, flow's 1000·t, ...),
          or [B, 2] with second_time; the wrong rank is a ValueError.
  labels  [B] int32, or None (every example the null label); labels with
          num_classes = 0 are a ValueError.
  train   a Python bool. True in training: dropout draws from
          rngs={"dropout": key}, BatchNorm uses and updates "batch_stats" (the
          trainer always applies with mutable=["batch_stats", "logvar"]).
Returns [B, H, W, C] float32, the shape of x (a backbone may return more
channels when one of its own keys asks for it: DiT's learn_sigma gives 2C,
the prediction first; `ddx.model.mean_output` takes the first C).

Hidden tokens (optional; a backbone whose Spec's `hidden_tokens` is not None):
an apply with mutable=["hidden"] also returns, under ("hidden", "tokens"), a
tuple with each block's output tokens [B, N, D] float32 in block order
(`layers.sow_hidden`), N the Spec's token grid in row-major order. REPA
(`ddx.repa`) aligns one of them with a frozen encoder's patch tokens.

Variables are {"params": ...} (plus "batch_stats" for running statistics).
Parameter names and shapes are the checkpoint format: renaming a submodule or
the class's fields breaks resuming old runs. A network runs its Spec's checks
(`Spec.check`) on its own fields and input size, and `check_inputs`, when
traced, so a bad value fails with the same one line the config names.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax

from ddx import models
from ddx.models.layers import TIME_EMBEDDINGS, split_time

# The fields every backbone accepts (the contract above).
CONTRACT_FIELDS = ("num_classes", "dtype", "time_embedding", "time_scale", "second_time",
                   "logvar", "remat", "attention", "norm_kernel")

# Flax adds these to every Module's dataclass fields; they are not config keys
# (and config.model.name selects the network, it is not the module's name).
_NOT_CONFIG = ("parent", "name")


def build(model_config: Mapping[str, Any], **fields: Any) -> nn.Module:
  """The network that `config.model` describes.

  Args:
    model_config: the `config.model` group (a ConfigDict or any mapping),
      holding every backbone's keys in one flat group plus `name` (a
      registered backbone, `ddx.models.names()`; "unet" when missing).
    **fields: network fields that replace the group's keys; `ddx.model.network`
      passes the run's time_embedding and time_scale, resolved for its process,
      and the process's second_time and logvar.

  Returns:
    An unbound network of the named backbone built from the keys that are its
    fields; the other backbones' keys are ignored. A key still "auto"
    (time_embedding, time_scale without a process to resolve them) keeps the
    network's default: the positional embedding of the unscaled time, which
    is what "auto" is for the ddpm process.
  """
  keys = list(model_config.keys())
  name = model_config["name"] if "name" in keys else models.DEFAULT
  cls = models.implementation(name)
  names = {f.name for f in dataclasses.fields(cls)} - set(_NOT_CONFIG)
  values = {k: model_config[k] for k in keys if k in names}
  values.update(fields)
  return cls(**{k: v for k, v in values.items() if not (isinstance(v, str) and v == "auto")})


def module_fields(net: nn.Module) -> dict[str, Any]:
  """A network's config fields as a mapping (what its Spec's checks read)."""
  return {f.name: getattr(net, f.name) for f in dataclasses.fields(net)
          if f.name not in _NOT_CONFIG}


def check_inputs(net: nn.Module, spec, x: jax.Array, t: jax.Array,
                 labels: Optional[jax.Array]) -> None:
  """The contract's checks of a call, and the backbone's own (its Spec's) on
  the network's fields and input size; raises ValueError (one line).

  Args:
    net: the network (its fields: num_classes, time_embedding, second_time, ...).
    spec: its `ddx.models.Spec`.
    x, t, labels: the call's inputs.
  """
  kind = type(net).__name__
  if x.ndim != 4:
    raise ValueError(f"{kind} expects x of shape [B, H, W, C], got {x.shape}")
  split_time(t, net.second_time, kind)
  _, hgt, wid, _ = x.shape
  spec.check(module_fields(net), hgt, wid, f"image size {hgt}x{wid}")
  if net.time_embedding not in TIME_EMBEDDINGS:
    raise ValueError(f"time_embedding={net.time_embedding!r} is unknown; use one "
                     f"of {TIME_EMBEDDINGS}")
  if labels is not None and net.num_classes <= 0:
    raise ValueError(f"labels were given but the {kind} has num_classes=0")


def count_params(params: Any) -> int:
  """Returns the total number of scalars in a parameter pytree.

  Args:
    params: pytree of arrays or jax.ShapeDtypeStruct (e.g. from eval_shape).

  Returns:
    Sum of the sizes of all leaves.
  """
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
