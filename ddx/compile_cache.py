"""JAX's persistent compilation cache, as ddx sets it up for runs and tests.

A resumed or repeated run reads its compiled programs back instead of
compiling them again. JAX writes a cache entry in place (not to a temporary
file and a rename), so a second process reading the entry while the first
writes it sees a truncated program ("Error reading persistent compilation
cache entry ... truncated stream"). JAX takes a file lock around every read
and write only when the cache has a size limit (its LRU eviction needs the
lock), so ddx always sets one: concurrent runs and pytest workers then never
read an entry half-written, and the cache stops growing at the limit.

Used before JAX compiles anything: `enable()` from `python -m ddx.main`,
`environment()` from tests/conftest.py (environment variables, which
subprocesses inherit).
"""
from __future__ import annotations

import os

# The limit: the least recently used entries go beyond it.
MAX_BYTES = 4 * 2 ** 30


def default_dir() -> str:
  return os.path.join(os.path.expanduser("~"), ".cache", "ddx", "jax")


def environment(path: str) -> dict:
  """Environment variables that make JAX (in this process, if set before it is
  imported, and in every subprocess) use the locked cache at `path`."""
  return {"JAX_COMPILATION_CACHE_DIR": path,
          "JAX_COMPILATION_CACHE_MAX_SIZE": str(MAX_BYTES)}


def enable() -> None:
  """Turns the cache on at JAX_COMPILATION_CACHE_DIR or ~/.cache/ddx/jax, with
  the size limit that makes JAX lock it (unless JAX_COMPILATION_CACHE_MAX_SIZE
  says otherwise). Without a writable home the run goes on without a cache."""
  import jax
  if not os.environ.get("JAX_COMPILATION_CACHE_MAX_SIZE"):
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  path = default_dir()
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:
    return
  jax.config.update("jax_compilation_cache_dir", path)
