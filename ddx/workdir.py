"""The workdir as a folder ddx owns: which folders it may write into, and one
trainer at a time.

A folder is *a ddx workdir* when it holds MARKER (training writes it before any
other file, so a first run killed at any moment is still one), or
`checkpoints/` beside a `config.json` that parses as a ddx config (a workdir of
`ddx.convert`, or of a ddx from before the marker). Training writes only into
a new or empty folder or a ddx workdir (`check_trainable`); `ddx.convert` only
into a new or empty folder (`ddx.convert.common.check_output`); both read the
folder with `folder_names`. Nothing here imports JAX.

`lock` holds workdir/LOCK with `fcntl.flock` while a trainer runs: the kernel
drops the lock when its process dies (kill -9 included), so a stale lock
never blocks the next run. A gs:// workdir cannot be locked: see `lock`.
"""
from __future__ import annotations

import json
import os
import re
import socket
import time
from typing import Optional

from absl import logging

from ddx import config as config_lib
from ddx.outdir import listing

MARKER = ".ddx-workdir"
_LAUNCHER_LOG = re.compile(r"process_\d+\.log")   # launch/local_multiprocess.sh
LOCK = ".ddx-lock"
_MARKER_TEXT = ("This folder is a ddx workdir: python -m ddx.main trains, resumes, samples "
                "and evaluates here.\n")


class WorkdirError(config_lib.ConfigError):
  """A --workdir that ddx must not write into, or one another process holds."""


def folder_names(path: str) -> Optional[list[str]]:
  """The sorted names in folder `path` (local or gs://); None if it does not exist.

  Raises:
    NotADirectoryError: path is a file.
  """
  from etils import epath
  root = epath.Path(path)
  if not root.exists():
    return None
  if not root.is_dir():
    raise NotADirectoryError(path)
  return sorted(p.name for p in root.iterdir())


def _is_ddx_config(path) -> bool:
  """Whether the file parses as a ddx config (a JSON object of ddx's groups)."""
  try:
    d = json.loads(path.read_text())
    groups = set(config_lib.base_config().keys())
    if not isinstance(d, dict) or not {"model", "diffusion"} <= set(d) <= groups:
      return False
    config_lib.with_defaults(d)
    return True
  except Exception:   # unreadable, not JSON, not a config: not ddx's
    return False


def is_ddx_workdir(path: str, names: Optional[list[str]] = None) -> bool:
  """Whether folder `path` is a ddx workdir (MARKER, or checkpoints/ with a
  ddx config.json); only reads."""
  from etils import epath
  names = folder_names(path) if names is None else names
  if not names:
    return False
  if MARKER in names:
    return True
  root = epath.Path(path)
  return ("checkpoints" in names and (root / "checkpoints").is_dir()
          and "config.json" in names and _is_ddx_config(root / "config.json"))


def check_trainable(workdir: str) -> None:
  """Refuses a --workdir that training must not write into; only reads.

  Training writes only into a new or empty folder (LOCK, another trainer
  claiming it, and the logs of launch/local_multiprocess.sh, process_<i>.log,
  which it writes before the trainers start, count as empty) or a ddx workdir
  (`is_ddx_workdir`);
  a folder holding anything else, say the user's own config.json, is refused
  and not a byte of it changes.
  Raises:
    WorkdirError: one line naming what the folder holds.
  """
  try:
    names = folder_names(workdir)
  except NotADirectoryError:
    raise WorkdirError(f"workdir {workdir} exists and is not a directory; choose "
                       "another --workdir") from None
  own = [n for n in names or () if n == LOCK or _LAUNCHER_LOG.fullmatch(n)]
  if len(own) == len(names or ()) or is_ddx_workdir(workdir, names):
    return
  raise WorkdirError(
      f"--workdir {workdir} is not empty and not a ddx workdir (it holds "
      f"{listing(names)}); ddx trains only into a new or empty folder or a ddx workdir "
      f"(one holding {MARKER}, or checkpoints/ with its config.json): choose another "
      "--workdir")


def mark(workdir: str) -> None:
  """Creates the folder and writes MARKER (if missing) before any other file."""
  from etils import epath
  root = epath.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  if not (root / MARKER).exists():
    (root / MARKER).write_text(_MARKER_TEXT)


class Lock:
  """workdir/LOCK held with flock by this process until `release` (or its death)."""

  def __init__(self, fd: int):
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      import fcntl
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def holder(workdir: str) -> str:
  """Who holds workdir's lock, in words, from what it wrote into LOCK."""
  try:
    with open(os.path.join(workdir, LOCK)) as f:
      info = json.load(f)
    return (f"pid {info['pid']} on host {info['host']}, --mode {info['mode']} since "
            f"{info['since']}")
  except (OSError, ValueError, KeyError, TypeError):
    return "a process that has not written its pid yet"


def lock(workdir: str, mode: str = "train") -> Optional[Lock]:
  """Takes workdir's lock for this process (call only on process 0 of a job).

  Local and NFS paths: flock on workdir/LOCK (created if missing; it records
  pid, host, mode and start time for the message of a refused run). The lock
  dies with the process, so a run killed with kill -9 leaves nothing that
  blocks the next one. gs:// (no file locks): no lock, one warning line;
  returns None.
  Raises:
    WorkdirError: another process holds the lock (one line naming it).
  """
  if "://" in workdir:
    logging.warning("workdir %s cannot be locked (%s has no file locks): ddx does not "
                    "stop a second trainer on it; run one at a time", workdir,
                    workdir.split("://")[0] + "://")
    return None
  import fcntl
  os.makedirs(workdir, exist_ok=True)
  fd = os.open(os.path.join(workdir, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    os.close(fd)
    raise WorkdirError(
        f"workdir {workdir} is in use by another ddx process ({holder(workdir)}); "
        "wait for it to finish or stop it, or use another --workdir") from None
  info = {"pid": os.getpid(), "host": socket.gethostname(), "mode": mode,
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
  os.ftruncate(fd, 0)
  os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
  return Lock(fd)


def read_record(path) -> Optional[dict]:
  """The JSON record a run wrote at its first start (teacher.json, repa.json):
  what a resume must still match. None when absent or not ddx's JSON.

  Args:
    path: an etils.epath.Path (local or gs://).
  """
  if not path.exists():
    return None
  try:
    record = json.loads(path.read_text())
  except ValueError:
    return None
  return record if isinstance(record, dict) else None
