"""Checkpoints with orbax: save, restore in resume order, and `ddx.load`.

Layout: `workdir/checkpoints/<step>/` with two items, `state` (the whole
TrainState: step, params, ema_params, opt_state, batch_stats — BatchNorm's
running statistics, empty for GroupNorm) and `config` (the run's config
as JSON, so every checkpoint says which model it holds). orbax writes into a
temporary directory and renames it when complete, so a checkpoint that was
being written when the process died is never listed as a step.
"""
from __future__ import annotations

import errno
import os
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from ddx import config as config_lib
from ddx.model import Model


class CheckpointError(RuntimeError):
  """No usable checkpoint where one was expected."""


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written (e.g. the disk is full)."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def _restore_args(abstract):
  return ocp.checkpoint_utils.construct_restore_args(abstract)


class Checkpointer:
  """Owns the orbax CheckpointManager of one workdir."""

  def __init__(self, workdir: str, keep: int = 3, read_only: bool = False):
    self.directory = checkpoint_dir(workdir)
    if read_only:  # orbax warns unless these are already what read_only implies
      options = ocp.CheckpointManagerOptions(
          max_to_keep=None, save_interval_steps=0, create=False, read_only=True)
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any, config: ml_collections.ConfigDict) -> None:
    """Starts an asynchronous save of `state` at `step` (no-op if it exists).

    Raises:
      CheckpointWriteError: this or the previous asynchronous save failed.
    """
    if step in self._mngr.all_steps():
      return
    try:
      self._mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeSave(state),
          config=ocp.args.JsonSave(config_lib.to_dict(config))), force=True)
    except Exception as e:  # orbax re-raises a failed async save at the next call
      raise self._write_error(e) from e

  def wait(self) -> None:
    try:
      self._mngr.wait_until_finished()
    except Exception as e:
      raise self._write_error(e) from e

  def _write_error(self, e: Exception) -> CheckpointWriteError:
    text = str(e)
    if ("No space left" in text or "RESOURCE_EXHAUSTED" in text
        or getattr(e, "errno", None) == errno.ENOSPC):
      what = "the disk is full"
    else:
      what = f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"
    self._mngr.reload()   # orbax never lists a half-written (tmp) step
    latest = self._mngr.latest_step()
    kept = (f"the newest complete checkpoint (step {latest}) is intact"
            if latest is not None else "no complete checkpoint exists yet")
    return CheckpointWriteError(
        f"could not write a checkpoint in {self.directory}: {what}; {kept}; free "
        "space and rerun the same command to resume")

  def restore_config(self, step: int) -> ml_collections.ConfigDict:
    out = self._mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return config_lib.from_dict(out["config"])

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores the full state at `step` into the structure and shardings given.

    A checkpoint written before TrainState had `batch_stats` restores into a
    state whose batch_stats is {} (GroupNorm), so older runs still resume.
    """
    def restore(partial):
      out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=abstract_state, restore_args=_restore_args(abstract_state),
          partial_restore=partial)))
      return out["state"]
    try:
      return restore(False)
    except ValueError:
      if not (getattr(abstract_state, "batch_stats", None) == {}
              and "batch_stats" not in self._state_keys(step)):
        raise
      return restore(True)

  def _state_keys(self, step: int) -> set:
    """The top-level names in the saved `state` item of a checkpoint."""
    return set(self._mngr.item_metadata(step)["state"].tree)

  def restore_latest(self, abstract_state: Any):
    """Restores the newest checkpoint that reads back; older ones are fallbacks.

    A checkpoint that fails to read (truncated, corrupt) is reported and moved
    to `workdir/checkpoints_unreadable/<step>` (never deleted: the user may
    want it), so that training can write that step again.
    Returns:
      (state, step), or (None, None) when there is no checkpoint at all.
    """
    steps = self.steps()
    for step in reversed(steps):
      try:
        return self.restore(step, abstract_state), step
      except Exception as e:  # orbax/tensorstore raise many types for bad files
        moved = self._set_aside(step)
        logging.warning("checkpoint at step %d could not be read (%s: %s); moved it to "
                        "%s and trying the previous one", step, type(e).__name__,
                        str(e).splitlines()[0][:200] if str(e) else "", moved)
    if steps:
      raise CheckpointError(
          f"none of the checkpoints {steps} in {self.directory} could be read; they "
          f"were moved to {self._aside_dir()} (not deleted); start a new --workdir")
    return None, None

  def _aside_dir(self) -> str:
    return os.path.join(os.path.dirname(self.directory), "checkpoints_unreadable")

  def _set_aside(self, step: int) -> str:
    """Moves an unreadable step directory out of orbax's sight; returns where."""
    src = os.path.join(self.directory, str(step))
    dst_root = self._aside_dir()
    os.makedirs(dst_root, exist_ok=True)
    dst, n = os.path.join(dst_root, str(step)), 1
    while os.path.exists(dst):
      dst, n = os.path.join(dst_root, f"{step}.{n}"), n + 1
    if jax.process_index() == 0 and os.path.exists(src):
      os.replace(src, dst)
    if jax.process_count() > 1:  # every process must see the move before reloading
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"ddx_set_aside_{step}")
    self._mngr.reload()   # forget the moved step
    return dst

  def close(self) -> None:
    """Waits for pending saves and closes; raises CheckpointWriteError once."""
    err = None
    try:
      self.wait()
    except CheckpointWriteError as e:
      err = e
    try:
      self._mngr.close()
    except Exception as e:  # the same failed save, re-raised by orbax
      err = err or self._write_error(e)
    if err is not None:
      raise err


def load(workdir: str, step: Optional[int] = None) -> Model:
  """Loads the EMA weights of a run as a `ddx.Model` ready for `ddx.sample_fn`.

  Args:
    workdir: the run's directory (the one given to `--workdir`).
    step: which checkpoint; default the newest that reads back.
  Returns:
    Model(variables={"params": ema_params}, config=frozen run config); with
    model.norm = batch the variables also hold "batch_stats", the running
    statistics from training, which sampling then uses.
  Raises:
    CheckpointError: no checkpoint in workdir (the message says where it looked).
  """
  from ddx.models import UNet  # the network's shapes give the restore target
  ckdir = checkpoint_dir(workdir)
  if not os.path.isdir(ckdir):
    raise CheckpointError(
        f"no checkpoint in {os.path.abspath(workdir)} (looked for {ckdir}); "
        "train first with python -m ddx.main --config ... --workdir " + str(workdir))
  ck = Checkpointer(workdir, read_only=True)
  steps = ck.steps()
  if not steps:
    raise CheckpointError(f"no checkpoint in {ckdir}; train first or pass the "
                          "workdir of a finished run")
  candidates = [step] if step is not None else list(reversed(steps))
  if step is not None and step not in steps:
    raise CheckpointError(f"no checkpoint for step {step} in {ckdir}; have {steps}")
  last_err = None
  for s in candidates:
    try:
      config = ck.restore_config(s)
      d = config.data
      net = UNet(**config.model)
      shape = (1, d.image_size, d.image_size, d.channels)
      labels = (jax.ShapeDtypeStruct((1,), "int32") if config.model.num_classes
                else None)
      abstract = jax.eval_shape(
          lambda: net.init(jax.random.key(0), jax.numpy.zeros(shape),
                           jax.numpy.zeros((1,), "int32"), labels))
      # Only what sampling needs: older checkpoints (GroupNorm, from before
      # batch_stats existed) have no batch_stats and are not asked for them.
      target = {"ema_params": abstract["params"]}
      if "batch_stats" in abstract:
        target["batch_stats"] = abstract["batch_stats"]
      out = ck._mngr.restore(s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=target, restore_args=_restore_args(target), partial_restore=True)))
      restored = jax.tree.map(jax.numpy.asarray, out["state"])
      variables = {"params": restored["ema_params"]}
      if "batch_stats" in target:
        variables["batch_stats"] = restored["batch_stats"]
      return Model(variables=variables, config=config_lib.freeze(config))
    except Exception as e:
      last_err = e
      logging.warning("checkpoint %d in %s could not be loaded: %s", s, ckdir, e)
  raise CheckpointError(f"no readable checkpoint in {ckdir}: {last_err}")
