"""Output folders a command writes: new, empty, or one it left unfinished.

A command that writes a folder of several files (`python -m ddx.convert`,
`python -m ddx.posthoc_ema`) writes a marker file into it before its first
file and removes it after its last. A folder that holds the marker and only
the command's own names is one the command was killed while writing: the
same command clears it and writes it again. Anything else in the folder is
the user's, and the folder is refused untouched. Imports nothing of ddx.
"""
from __future__ import annotations

import os
from typing import Callable, Container, Optional


def blocked_by(path: str) -> Optional[str]:
  """The nearest existing ancestor of path (or path itself) if it is not a
  writable directory, else None: path can then be created or written.

  Local paths only; a gs:// path gives None (its first write checks it).
  """
  if "://" in path:
    return None
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    return existing
  return None


def listing(names: list[str]) -> str:
  """The first three names, and how many more."""
  shown = ", ".join(names[:3])
  return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check(path: str, marker: str, owned: Container[str], *, flag: str, command: str,
          error: Callable[[str], Exception]) -> None:
  """Refuses an output folder that holds anything but the command's unfinished output.

  Only reads.
  Args:
    path: the output folder.
    marker: the name of the command's marker file.
    owned: every name the command writes in the folder (the marker included).
    flag, command: how the message names the folder's flag and the command.
    error: the exception class to raise.
  Raises:
    error: the path is a file, or a folder holding other names (the message
      names up to three of them).
  """
  from etils import epath
  root = epath.Path(path)
  if not root.exists():
    return
  if not root.is_dir():
    raise error(f"{flag} {path} is a file, not a folder; pass the path of a new or "
                "empty folder")
  names = sorted(p.name for p in root.iterdir())
  if not names or (marker in names and all(n in owned for n in names)):
    return
  foreign = [n for n in names if n not in owned] if marker in names else names
  raise error(f"{flag} {path} is not empty (it holds {listing(foreign)}); {command} "
              f"writes only into a new or empty folder: choose another {flag}")


def begin(path: str, marker: str, owned: Container[str], *, flag: str, command: str,
          error: Callable[[str], Exception]) -> None:
  """Claims the output folder before the first write: checks it again (`check`),
  clears what an interrupted run of the command left there, and writes marker."""
  from etils import epath
  check(path, marker, owned, flag=flag, command=command, error=error)
  root = epath.Path(path)
  root.mkdir(parents=True, exist_ok=True)
  for p in root.iterdir():   # only owned names here (check)
    if p.name != marker:
      p.rmtree() if p.is_dir() else p.unlink()
  (root / marker).write_text(f"{command} started writing this folder and has not "
                             "finished; rerun the same command to redo it\n")


def finish(path: str, marker: str) -> None:
  """Marks the output folder complete (removes marker)."""
  from etils import epath
  (epath.Path(path) / marker).unlink()
