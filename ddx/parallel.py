"""Data parallelism with `jax.jit` over a Mesh: one code path from one CPU to a pod.

The mesh has one axis, "data". Batches are sharded along it; parameters and
optimizer state are replicated. Under `jit`, XLA inserts the gradient
all-reduce, so `train_step` is written for the global batch.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all devices of all processes, axis "data".

  Built with `Mesh` (Auto axis types) rather than `jax.make_mesh`, whose
  Explicit default would turn indexing a sharded array into an error.
  """
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the "data" axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(local_batch, mesh: Mesh):
  """Host-local numpy batch (this process's rows) -> global jax.Array pytree."""
  sharding = data_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def num_data_shards(mesh: Mesh) -> int:
  return mesh.shape[DATA_AXIS]


_CPU_COUNT_FLAG = "--xla_force_host_platform_device_count"


def split_cpu_into_devices(batch_size: int, max_devices: int | None = None) -> int:
  """Exposes the host's cores as that many JAX CPU devices (before JAX starts).

  XLA:CPU runs one device's convolutions on about one core, so on a
  many-core host a 1-device run leaves cores idle; as N devices, the batch
  is split N ways by the same jit-over-Mesh path that serves a TPU pod
  (measured here: 0.58 -> 0.30 s per digits train step on 2 cores). The
  count is the largest divisor of batch_size not above the core count. Does
  nothing if XLA_FLAGS already sets the count or JAX's backends are already
  initialised; the flag only adds host devices, so GPU/TPU runs are unchanged.

  Returns:
    the device count requested, or 0 if left alone.
  """
  import os
  flags = os.environ.get("XLA_FLAGS", "")
  if _CPU_COUNT_FLAG in flags or _backends_initialised():
    return 0
  cores = max_devices or os.cpu_count() or 1
  n = max(d for d in range(1, cores + 1) if batch_size % d == 0)
  if n > 1:
    os.environ["XLA_FLAGS"] = f"{flags} {_CPU_COUNT_FLAG}={n}".strip()
  return n


def _backends_initialised() -> bool:
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge._backends)
  except (ImportError, AttributeError):  # private API moved: assume started, do nothing
    return True
