"""Denoising networks, and `build`, which picks one by `config.model.name`."""

import dataclasses
from typing import Any, Mapping

import flax.linen as nn

from ddx.models import attention
from ddx.models.dit import DiT
from ddx.models.unet import UNet

# model.name -> network class. "unet" is the default (older run configs have
# no model.name).
_NETWORKS = {"unet": UNet, "dit": DiT}
NAMES = tuple(_NETWORKS)

# Flax adds these to every Module's dataclass fields; they are not config keys
# (and config.model.name selects the network, it is not the module's name).
_NOT_CONFIG = ("parent", "name")


def build(model_config: Mapping[str, Any], **fields: Any) -> nn.Module:
  """The network that `config.model` describes.

  Args:
    model_config: the `config.model` group (a ConfigDict or any mapping),
      holding both backbones' keys in one flat group plus `name`
      ("unet" | "dit"; "unet" when missing).
    **fields: network fields that replace the group's keys; `ddx.model.network`
      passes the run's time_embedding and time_scale, resolved for its process.

  Returns:
    An unbound UNet or DiT built from the keys that are its fields; the other
    backbone's keys are ignored. A key still "auto" (time_embedding,
    time_scale without a process to resolve them) keeps the network's default:
    the positional embedding of the unscaled time, which is what "auto" is for
    the ddpm process.
  """
  keys = list(model_config.keys())
  name = model_config["name"] if "name" in keys else "unet"
  if name not in _NETWORKS:
    raise ValueError(f"model.name={name!r} is unknown; use one of {NAMES}")
  cls = _NETWORKS[name]
  names = {f.name for f in dataclasses.fields(cls)} - set(_NOT_CONFIG)
  values = {k: model_config[k] for k in keys if k in names}
  values.update(fields)
  return cls(**{k: v for k, v in values.items() if not (isinstance(v, str) and v == "auto")})


__all__ = ["DiT", "NAMES", "UNet", "attention", "build"]
