"""Denoising networks (backbones) behind one contract, picked by name (config.model.name).

A backbone is one folder and one line in `REGISTRY` below:

  <name>/spec.py     a `Spec` (ddx.models.spec), plain Python: the model.* keys
                     it owns with their defaults, its presets, its checks.
                     `ddx.config` builds the model group and validates through
                     it, so checking a config never imports JAX.
  <name>/network.py  the Flax module the Spec names (Spec.implementation),
                     meeting the contract written in `ddx.models.base`.
  <name>/__init__.py a docstring (no JAX: importing the spec runs it).

Nothing outside the folder branches on the backbone: `build` (ddx.models.base)
makes the network from config.model, and the trainer, samplers, `ddx.load`,
FSDP and the converters take any network that meets the contract. A backbone
registered at run time (`register`, or a test's `monkeypatch.setitem(REGISTRY,
...)`) goes through the same paths.

This module imports no JAX; `build`, `UNet`, `DiT`, `NAMES` and the shared
layer modules (layers, attention, fused_norm, autoencoder, base) are imported
on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

from ddx import registry
from ddx.models.dit import spec as dit_spec
from ddx.models.spec import Field, Spec
from ddx.models.unet import spec as unet_spec

# model.name -> its Spec. A new backbone: one entry here.
REGISTRY: dict[str, Spec] = {
    "unet": unet_spec.SPEC,
    "dit": dit_spec.SPEC,
}
# model.name of a config without the key (older runs): the U-Net.
DEFAULT = "unet"

__all__ = ["DEFAULT", "Field", "Spec", "REGISTRY", "register", "names", "spec",
           "implementation", "fields", "build", "NAMES", "UNet", "DiT"]


_REGISTRY = registry.Registry(REGISTRY, "model.name", "backbone")
register, names, spec = _REGISTRY.register, _REGISTRY.names, _REGISTRY.spec
implementation, fields = _REGISTRY.implementation, _REGISTRY.fields   # fields: model.* keys


# Names imported on first use (they need JAX): name -> (module, attribute or None
# for the module itself).
_LAZY = {"build": ("ddx.models.base", "build"),
         "UNet": ("ddx.models.unet.network", "UNet"),
         "DiT": ("ddx.models.dit.network", "DiT")}
_SUBMODULES = ("attention", "autoencoder", "base", "fused_norm", "layers")


def __getattr__(name: str) -> Any:
  if name == "NAMES":
    return names()
  if name in _LAZY:
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)
  if name in _SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
