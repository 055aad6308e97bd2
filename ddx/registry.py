"""What the variant registries share: a key a variant owns, and the table of
variants a config names (`ddx.processes` for diffusion.process, `ddx.models`
for model.name). Plain Python: config validation uses it, so it imports no JAX
and nothing of ddx.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any


@dataclasses.dataclass(frozen=True)
class Field:
  """One config key a variant owns (diffusion.* for a process, model.* for a
  backbone), its default and what it means."""
  key: str
  default: Any
  doc: str


class Registry:
  """Variants by name: their Specs (each with `name`, `fields` and
  `implementation`, a "module:Class" string or the class itself).

  Args:
    table: the dict it reads and writes (the package's REGISTRY, which tests
      patch with monkeypatch.setitem).
    key: the config key that names a variant, e.g. "model.name".
    kind: what a variant is called in messages, e.g. "backbone".
  """

  def __init__(self, table: dict, key: str, kind: str):
    self.table, self.key, self.kind = table, key, kind

  def register(self, spec) -> None:
    """Adds (or replaces) the variant `spec.name`."""
    self.table[spec.name] = spec

  def names(self) -> tuple[str, ...]:
    """The registered names."""
    return tuple(self.table)

  def spec(self, name: str):
    """The Spec of `name`; ValueError (one line) if it is not registered."""
    if name not in self.table:
      raise ValueError(f"{self.key}={name!r} is unknown; use one of {self.names()}")
    return self.table[name]

  def implementation(self, name: str):
    """The JAX class of `name` (imports its module: needs JAX)."""
    impl = self.spec(name).implementation
    if isinstance(impl, str):
      module, cls = impl.split(":")
      impl = getattr(importlib.import_module(module), cls)
    return impl

  def fields(self) -> dict[str, Field]:
    """Every registered variant's own keys by name; a key two variants share
    must have one default (ValueError otherwise)."""
    group = self.key.split(".")[0]
    out: dict[str, Field] = {}
    for s in self.table.values():
      for x in s.fields:
        if x.key in out and out[x.key].default != x.default:
          raise ValueError(f"{group}.{x.key} is a key of two {self.kind}s with different "
                           f"defaults ({out[x.key].default!r}, {x.default!r})")
        out.setdefault(x.key, x)
    return out
