"""Parallelism with `jax.jit` over a Mesh: one code path from one CPU to a pod.

The mesh has two axes, ("data", "fsdp"), over all devices of all processes.
Batches are split over both (every device gets its own rows). Parameters
and optimizer state are replicated when the "fsdp" axis has size 1 (the
default, plain data parallelism) and split along "fsdp" otherwise (each leaf
on its largest dimension that divides, ZeRO-3/FSDP style), for models that do
not fit on one device. Under `jit`, XLA inserts the gradient reduction and
the parameter all-gathers, so `train_step` is the same function either way.

Several processes (TPU pod slices, GPU/CPU clusters) start through
`initialize_distributed` before anything else touches JAX.
"""
from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)   # a batch is split over every device

# Leaves smaller than this stay replicated under FSDP: splitting biases and
# norm scales saves nothing and adds a collective per leaf.
FSDP_MIN_SIZE = 2 ** 12


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
  """A 2-D mesh ("data", "fsdp") over all devices of all processes.

  Args:
    fsdp: size of the "fsdp" axis (1 = parameters replicated); must divide
      the device count.
    devices: default jax.devices() (every process's, in process order, so
      each process's devices hold a contiguous block of the batch).
  Built with `Mesh` (Auto axis types) rather than `jax.make_mesh`, whose
  Explicit default would turn indexing a sharded array into an error.
  """
  devices = np.asarray(jax.devices() if devices is None else devices)
  if fsdp < 1 or devices.size % fsdp:
    raise ValueError(f"training.fsdp={fsdp} must divide the {devices.size} devices")
  return Mesh(devices.reshape(devices.size // fsdp, fsdp), BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def num_data_shards(mesh: Mesh) -> int:
  """How many ways a batch is split: every device gets a share."""
  return mesh.size


def fsdp_spec(shape: tuple[int, ...], n: int) -> P:
  """The PartitionSpec of one parameter-shaped leaf on an "fsdp" axis of size n.

  Splits the largest dimension that n divides (ties: the last one, the
  output channels of a conv/dense kernel); replicates small leaves and leaves
  with no such dimension.
  """
  if n == 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
    return P()
  best = None
  for d, size in enumerate(shape):
    if size % n == 0 and (best is None or size >= shape[best]):
      best = d
  if best is None:
    return P()
  return P(*([None] * best + [FSDP_AXIS]))


def state_sharding(abstract_tree, mesh: Mesh):
  """NamedShardings for a pytree of arrays (or ShapeDtypeStructs) on `mesh`.

  Replicated everywhere when the "fsdp" axis has size 1; otherwise each leaf
  follows `fsdp_spec` (params, EMA and Adam moments share shapes, so they
  split alike; step counters stay replicated).
  """
  n = mesh.shape[FSDP_AXIS]
  return jax.tree.map(lambda a: NamedSharding(mesh, fsdp_spec(tuple(a.shape), n)),
                      abstract_tree)


def global_batch(local_batch, mesh: Mesh):
  """Host-local numpy batch (this process's rows) -> global jax.Array pytree."""
  sharding = data_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def stacked_global_batch(local_batches, mesh: Mesh):
  """k host-local batches -> one global pytree [k, global batch, ...].

  The leading (step) axis is not split; the batch axis is split over every
  device, as in `global_batch` (for `training.steps_per_dispatch` > 1).
  """
  sharding = NamedSharding(mesh, P(None, BATCH_AXES))
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *local_batches)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), stacked)


def replicate(tree, mesh: Mesh):
  """A pytree of arrays (host or one local device, the same values on every
  process) as arrays replicated over every device of `mesh`, which may span
  processes: usable beside the trainer's global arrays in one jit."""
  sharding = replicated(mesh)

  def one(x):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.tree.map(one, tree)


def gather(x) -> np.ndarray:
  """A (possibly multi-process) jax.Array as a full numpy array on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def sync(name: str) -> None:
  """Waits until every process reaches the barrier `name` (nothing with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


# --------------------------------------------------------------------------
# Multi-process start.

_ENV = ("DDX_COORDINATOR_ADDRESS", "DDX_NUM_PROCESSES", "DDX_PROCESS_ID")


def _detected_cluster() -> str | None:
  """Names the multi-process environment JAX can configure itself, if any.

  Asks JAX's own cluster detection (Cloud TPU VMs and pod slices, SLURM, Open
  MPI, Kubernetes jobs); it lives in a private module, so if that moves we
  fall back to the environment variables those launchers set.
  """
  try:
    from jax._src import clusters
    for env in clusters.ClusterEnv._cluster_types:
      if not getattr(env, "opt_in_only_method", False) and env.is_env_present():
        return env.__name__
    return None
  except (ImportError, AttributeError):
    pass
  if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
    return "TPU pod slice"
  if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
    return "SLURM"
  if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return "Open MPI"
  return None


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1) -> bool:
  """Starts `jax.distributed` when this is one process of several.

  Explicit settings win (flags, else DDX_COORDINATOR_ADDRESS,
  DDX_NUM_PROCESSES, DDX_PROCESS_ID); otherwise a Cloud TPU VM (one host or a
  pod slice), a SLURM job or an Open MPI launch is detected and JAX reads its
  own settings from it (on one TPU host that is a 1-process "cluster", which
  also gives the preemption notice). A plain machine starts nothing. Must
  run before any other JAX call.

  Returns:
    True if jax.distributed was initialised.
  Raises:
    ValueError: an incomplete or inconsistent explicit setting.
  """
  env = [os.environ.get(k, "") for k in _ENV]
  coordinator_address = coordinator_address or env[0]
  num_processes = num_processes or int(env[1] or 0)
  process_id = process_id if process_id >= 0 else int(env[2] or -1)
  explicit = bool(coordinator_address) or num_processes > 0 or process_id >= 0
  if explicit:
    if not coordinator_address or num_processes < 1 or process_id < 0:
      raise ValueError(
          "a multi-process run needs all three of --coordinator_address (host:port of "
          "process 0), --num_processes and --process_id (or DDX_COORDINATOR_ADDRESS, "
          "DDX_NUM_PROCESSES, DDX_PROCESS_ID)")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, {num_processes})")
    if num_processes == 1:
      return False
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    cluster = _detected_cluster()
    if cluster is None:
      return False
    logging.info("multi-process environment detected (%s)", cluster)
    jax.distributed.initialize()
  return True


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
