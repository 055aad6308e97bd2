"""Checkpoints with orbax: save, resume safely, and `ddx.load`.

Layout: `workdir/checkpoints/<step>/` with two items, `state` (the whole
TrainState: step, params, ema_params, opt_state, batch_stats — BatchNorm's
running statistics, empty for GroupNorm — and posthoc_ema, the post-hoc EMA
profiles, empty when off; repa, REPA's projector, empty when off) and `config` (the run's config as
JSON, so every checkpoint says which model it holds). orbax writes into a
temporary directory and renames it when complete, so a checkpoint that was
being written when the process died is never listed as a step. Workdirs are
`etils.epath` paths: local, or `gs://...` on a TPU pod.

Resuming tells two failures apart. A checkpoint whose saved leaves differ in
name or shape from what this config builds is a *structure mismatch* (a config
change such as grad_clip 0 <-> > 0): it raises `StructureMismatch` and nothing
is moved. Only a checkpoint that fails to *read* with the right structure
(truncated or corrupt files) is set aside to `checkpoints_unreadable/`, one at
a time, and every process takes the same decision.
"""
from __future__ import annotations

import errno
import logging as py_logging
from typing import Any, Optional

import jax
import numpy as np
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from ddx import config as config_lib
from ddx import model as model_lib


class CheckpointError(RuntimeError):
  """No usable checkpoint where one was expected."""


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written (e.g. the disk is full)."""


class StructureMismatch(CheckpointError):
  """A checkpoint's leaves differ from the state this config builds."""


def checkpoint_dir(workdir, name: str = "checkpoints") -> epath.Path:
  """workdir/<name> as an absolute epath (checkpoints; posthoc_ema for snapshots)."""
  path = epath.Path(workdir)
  if not str(path).startswith("gs://"):
    path = path.absolute()
  return path / name


class _QuietReadOnly(py_logging.Filter):
  """orbax warns "Given directory is read only" for every read-only manager;
  here that is the intent (loading, checking), not a problem."""

  def filter(self, record):
    return "is read only" not in record.getMessage()


py_logging.getLogger("absl").addFilter(_QuietReadOnly())


def _leaf_name(path) -> str:
  """A tree path as orbax names saved leaves: keys, fields and indices joined by '.'."""
  parts = []
  for p in path:
    for attr in ("key", "name", "idx"):
      if hasattr(p, attr):
        parts.append(str(getattr(p, attr)))
        break
  return ".".join(parts)


def leaf_shapes(tree) -> dict:
  """{leaf name: shape} of a state pytree (arrays or ShapeDtypeStructs)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_leaf_name(p): tuple(x.shape) for p, x in flat}


def structure_difference(saved: dict, target: Any, ignore: tuple = ()) -> Optional[str]:
  """How saved leaf shapes ({name: shape}, `saved_shapes`) differ from `target`'s
  leaves, in words; None when they match.

  Args:
    ignore: top-level names (e.g. "opt_state") left out of the comparison.
  """
  keep = lambda d: {k: v for k, v in d.items() if k.split(".")[0] not in ignore}
  saved, want = keep(saved), keep(leaf_shapes(target))
  if saved == want:
    return None
  missing = sorted(set(want) - set(saved))
  extra = sorted(set(saved) - set(want))
  shape = sorted(k for k in set(saved) & set(want) if saved[k] != want[k])
  if shape:
    return f"{shape[0]} has shape {saved[shape[0]]} there, {want[shape[0]]} now"
  if missing:
    return f"{missing[0]} is not in it ({len(missing)} leaves missing)"
  return f"it has {extra[0]}, which this config does not ({len(extra)} extra leaves)"


def all_processes_agree(ok: bool) -> bool:
  """True only if `ok` on every process; one collective that all processes reach."""
  if jax.process_count() == 1:
    return ok
  import numpy as np
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def has_checkpoints(workdir) -> bool:
  """Whether workdir has a checkpoints directory, decided alike on every process.

  A collective: every process must call it at the same point, before any of
  them writes into the workdir (else one could see what another just made).
  """
  return not all_processes_agree(not checkpoint_dir(workdir).is_dir())


class Checkpointer:
  """Owns the orbax CheckpointManager of one workdir.

  Args:
    keep: the newest steps kept (None = every step).
    name: the directory under workdir (`ddx.posthoc_ema` keeps its snapshots
      in one of their own).
  """

  def __init__(self, workdir, keep: Optional[int] = 3, read_only: bool = False,
               name: str = "checkpoints"):
    self.directory = checkpoint_dir(workdir, name)
    if read_only:  # orbax warns unless these are already what read_only implies
      options = ocp.CheckpointManagerOptions(
          max_to_keep=None, save_interval_steps=0, create=False, read_only=True)
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})

  def steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def delete(self, step: int) -> None:
    self._mngr.delete(step)

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
    """The run config saved with the checkpoint at `step`, with today's defaults
    for keys that run's ddx did not have."""
    out = self._mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return config_lib.with_defaults(out["config"])

  def saved_shapes(self, step: int) -> dict:
    """{leaf name: shape} of the `state` saved at `step`, from its metadata only."""
    tree = self._mngr.item_metadata(step)["state"].tree
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {leaf.name: tuple(leaf.shape) for leaf in leaves if hasattr(leaf, "name")}

  def restore(self, step: int, target: Any, partial: bool = False) -> Any:
    """Restores the `state` item at `step` into `target`'s structure and shardings.

    Args:
      target: a pytree of jax.ShapeDtypeStruct (with shardings) or arrays.
      partial: restore only the subtrees `target` names (e.g. without opt_state).
    """
    out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=partial)))
    return out["state"]

  def check_structure(self, step: int, target: Any, ignore: tuple = ()) -> None:
    """Raises StructureMismatch unless the saved leaves are `target`'s leaves.

    Args:
      ignore: top-level names (e.g. "opt_state") left out of the comparison.
    """
    what = structure_difference(self.saved_shapes(step), target, ignore)
    if what is None:
      return
    raise StructureMismatch(
        f"the checkpoint at step {step} in {self.directory} was written by a model or "
        f"optimizer of another structure: {what}")

  def resume(self, target: Any, *, keep_optimizer: bool = True):
    """Restores the newest checkpoint that reads back, for resuming training.

    Args:
      target: the abstract TrainState this config builds (ShapeDtypeStructs
        with shardings).
      keep_optimizer: False restores step, params, EMA, batch stats (and
        REPA's projector) only
        (`training.reset_optimizer`); the caller makes a fresh opt_state.
    Returns:
      (state, step): state is the restored TrainState, or a dict of the
      restored fields when keep_optimizer is False; (None, None) when there is
      no checkpoint.
    Raises:
      StructureMismatch: the newest checkpoint's leaves differ from `target`
        (nothing is moved).
      CheckpointError: no checkpoint reads back (all were set aside).
    """
    steps = self.steps()
    if not keep_optimizer:
      target = {k: getattr(target, k) for k in ("step", "params", "ema_params",
                                                  "batch_stats", "posthoc_ema", "repa")}
    ignore = () if keep_optimizer else ("opt_state",)
    for step in reversed(steps):
      try:
        self.saved_shapes(step)
        meta_ok = True
      except Exception:  # no readable metadata: the files are damaged
        meta_ok = False
      if all_processes_agree(meta_ok):
        self.check_structure(step, target, ignore)   # a mismatch stops here
        try:
          # Partial: the leaves were just checked to be target's, and a
          # checkpoint of an older ddx lacks the empty posthoc_ema node.
          state = self.restore(step, target, partial=True)
          ok, err = True, None
        except Exception as e:  # orbax/tensorstore raise many types for bad files
          ok, err = False, e
        if all_processes_agree(ok):
          return state, step
      else:
        err = "its metadata does not read back"
      moved = self._set_aside(step)
      text = (f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
              if isinstance(err, Exception) else err)
      logging.warning("checkpoint at step %d could not be read (%s); moved it to %s "
                      "and trying the previous one", step, text, moved)
    if steps:
      raise CheckpointError(
          f"none of the checkpoints {steps} in {self.directory} could be read; they "
          f"were moved to {self._aside_dir()} (not deleted); start a new --workdir")
    return None, None

  def _aside_dir(self) -> epath.Path:
    return self.directory.parent / "checkpoints_unreadable"

  def _set_aside(self, step: int) -> epath.Path:
    """Moves an unreadable step directory out of orbax's sight; returns where."""
    src = self.directory / str(step)
    root = self._aside_dir()
    dst, n = root / str(step), 1
    while dst.exists():
      dst, n = root / f"{step}.{n}", n + 1
    if jax.process_index() == 0 and src.exists():
      root.mkdir(parents=True, exist_ok=True)
      src.rename(dst)
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


def load(workdir, step: Optional[int] = None) -> model_lib.Model:
  """Loads the EMA weights of a run as a `ddx.Model` ready for `ddx.sample_fn`.

  Args:
    workdir: the run's directory (the one given to `--workdir`), local or gs://.
    step: which checkpoint; default the newest that reads back.
  Returns:
    Model(variables={"params": ema_params}, config=frozen run config); with
    model.norm = batch the variables also hold "batch_stats", the running
    statistics from training, which sampling then uses. A latent run's model
    also holds the autoencoder its config names (autoencoder.path), so
    sample_fn returns decoded images.
  Raises:
    CheckpointError: no checkpoint in workdir (the message says where it looked).
  """
  return load_with_step(workdir, step)[1]


def _why(e: BaseException) -> str:
  """An exception in one short line (tensorstore's messages run to kilobytes)."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  return f"{type(e).__name__}: {text[:200]}" + ("..." if len(text) > 200 else "")


class _Quiet:
  """Silences orbax's and asyncio's loggers around a restore that may fail:
  a failed read leaves async tasks whose errors ("Event loop is closed") would
  otherwise print a traceback each; the caller reports the failure in one line."""

  _NAMES = ("asyncio", "orbax", "orbax.checkpoint", "tensorstore")

  def __enter__(self):
    self._levels = [(py_logging.getLogger(n), py_logging.getLogger(n).level)
                    for n in self._NAMES]
    for log, _ in self._levels:
      log.setLevel(py_logging.CRITICAL + 1)

  def __exit__(self, *exc):
    for log, level in self._levels:
      log.setLevel(level)


def load_with_step(workdir, step: Optional[int] = None) -> tuple[int, model_lib.Model]:
  """`load`, and the step of the checkpoint it read.

  Args:
    workdir: the run's directory (the one given to `--workdir`), local or gs://.
    step: which checkpoint; default the newest that reads back.
  Returns:
    (step, model): the checkpoint's step and `load`'s Model. Each checkpoint
    that does not read back is skipped with one warning line naming it and why.
  Raises:
    CheckpointError: no checkpoint in workdir (the message says where it looked).
  """
  ckdir = checkpoint_dir(workdir)
  if not ckdir.is_dir():
    raise CheckpointError(
        f"no checkpoint in {workdir} (looked for {ckdir}); "
        f"train first with python -m ddx.main --config ... --workdir {workdir}")
  ck = Checkpointer(workdir, read_only=True)
  steps = ck.steps()
  if not steps:
    raise CheckpointError(f"no checkpoint in {ckdir}; train first or pass the "
                          "workdir of a finished run")
  if step is not None and step not in steps:
    raise CheckpointError(f"no checkpoint for step {step} in {ckdir}; have {steps}")
  candidates = [step] if step is not None else list(reversed(steps))
  last_err = None
  for s in candidates:
    try:
      with _Quiet():
        config = ck.restore_config(s)
        abstract = jax.eval_shape(lambda k: model_lib.init_variables(config, k),
                                  jax.random.key(0))
        # Only what sampling needs: the EMA weights (and BatchNorm statistics).
        target = {"ema_params": abstract["params"]}
        if "batch_stats" in abstract:
          target["batch_stats"] = abstract["batch_stats"]
        restored = jax.tree.map(jax.numpy.asarray, ck.restore(s, target, partial=True))
        variables = {"params": restored["ema_params"]}
        if "batch_stats" in target:
          variables["batch_stats"] = restored["batch_stats"]
        model = model_lib.Model(variables=variables, config=config_lib.freeze(config))
    except Exception as e:
      last_err = e
      logging.warning("skipped checkpoint %d in %s: it does not read back (%s)", s,
                      ckdir, _why(e))
      continue
    # Outside the try: a missing autoencoder is its own error, not a bad checkpoint.
    return s, model.replace(autoencoder=model_lib.load_autoencoder(config))
  raise CheckpointError(f"no readable checkpoint in {ckdir}: {_why(last_err)}")


def load_run(key: str, path: str, image_shape=None, num_classes: Optional[int] = None,
             fix: str = "") -> tuple[int, model_lib.Model]:
  """Another run that config key `key` names (training.teacher, training.init_from,
  sampling.guide_workdir): its newest readable checkpoint, checked to be a model
  of this run's data.

  Args:
    key: the config key, as the messages name it.
    path: its value, the other run's workdir.
    image_shape, num_classes: this run's (None: not checked).
    fix: what to do when they differ, the end of the message.
  Returns:
    (step, model), as `load_with_step`.
  Raises:
    config_lib.ConfigError: no readable checkpoint there, or another image
      shape or class count (one line naming the key).
  """
  try:
    step, model = load_with_step(path)
  except (CheckpointError, ValueError) as e:
    raise config_lib.ConfigError(f"{key}={path!r}: {e}") from None
  for what, mine, theirs in (
      ("image shape", image_shape, tuple(model.image_shape)),
      ("model.num_classes", num_classes, model.config.model.num_classes)):
    if mine is not None and tuple(np.atleast_1d(mine)) != tuple(np.atleast_1d(theirs)):
      raise config_lib.ConfigError(
          f"{key}={path!r} has {what} {theirs}, this run {mine}; {fix}")
  return step, model
