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
