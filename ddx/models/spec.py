"""What config validation needs to know of a backbone, in plain Python (no JAX).

Each backbone is a folder `ddx/models/<name>/`: `spec.py` (a `Spec`: its
model.* keys with defaults, its presets, its checks) and the Flax network the
Spec names (`implementation`), which meets the contract of `ddx.models.base`.
`ddx.config` validates a run through the Specs alone, so loading and checking
a config never imports JAX; the network runs the same checks on its own fields
and its input, so the one set of checks is written once, here in the Spec.
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping

from ddx.registry import Field


class Spec:
  """The JAX-free half of a backbone; subclass it once per backbone.

  Attributes:
    name: the model.name value that selects it.
    fields: the model.* keys it owns, beyond the shared ones `ddx.config`
      holds for every backbone (name, num_classes, dtype, attention,
      norm_kernel, time_embedding, time_scale). A key two backbones own must
      have one default.
    implementation: "module:Class" of the Flax network (the contract in
      `ddx.models.base`), or the class itself.
    tiny: field values of a network small enough for a test to build in
      seconds on 8x8 images (the contract test, tests/test_backbones.py).
  """
  name: str = ""
  fields: tuple[Field, ...] = ()
  implementation: Any = ""
  tiny: Mapping[str, Any] = {}

  def check(self, m: Mapping[str, Any], height: int, width: int, what: str) -> None:
    """Checks this backbone's own keys, for images of height x width.

    `ddx.config` calls it with config.model and the side the network sees;
    the network calls it with its own fields and its input's shape.

    Args:
      m: config.model, or the network's fields (any mapping).
      height, width: the size of the network's input.
      what: how to name that size in a message ("data.image_size=32",
        "image size 8x6").

    Raises:
      ValueError: one line naming the key, the value and the fix.
    """

  def hidden_tokens(self, m: Mapping[str, Any], height: int,
                    width: int) -> "tuple[int, tuple[int, int], int] | None":
    """What the network sows as hidden tokens (`ddx.models.base`), for images
    of height x width: (blocks, (grid rows, grid columns), token width), or
    None when it sows none (the default; REPA needs them)."""
    del m, height, width
    return None

  def check_norm_kernel(self, m: Mapping[str, Any]) -> None:
    """Raises ValueError (one line) if model.norm_kernel = m["norm_kernel"],
    which is not "xla", cannot fuse this network's norms as `m` sets them;
    by default every kernel works (a backbone without norms ignores it)."""

  def defaults(self) -> dict[str, Any]:
    return {x.key: x.default for x in self.fields}


def positive_ints(m: Mapping[str, Any], *keys: str) -> None:
  """Raises ValueError unless every model.<key> is an integer >= 1."""
  for k in keys:
    v = m[k]
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
      raise ValueError(f"model.{k}={v!r} must be a positive integer")


def require(cond: bool, msg: str) -> None:
  if not cond:
    raise ValueError(msg)


def forward(package: str, name: str, modules: tuple[str, ...] = ("spec", "network")):
  """Attribute `name` of a backbone folder's modules, imported on first use.

  A backbone folder's `__init__` must not import JAX (importing its spec runs
  it), so its `__getattr__` hands over here: `ddx.models.dit.preset` (the
  spec's) and `ddx.models.dit.DiT` (the network's) keep working as when each
  backbone was one module.
  """
  if name in modules:   # `from ddx.models.dit import spec` asks here first
    return importlib.import_module(f"{package}.{name}")
  if not name.startswith("__"):
    for m in modules:
      module = importlib.import_module(f"{package}.{m}")
      if hasattr(module, name):
        return getattr(module, name)
  raise AttributeError(f"module {package!r} has no attribute {name!r}")
