"""JAX's persistent compilation cache, as ddx sets it up for runs and tests.

A resumed or repeated run reads its compiled programs back instead of
compiling them again. JAX's file cache writes an entry in place, so a second
process that reads the entry while the first one writes it sees a truncated
program ("Error reading persistent compilation cache entry ... truncated
stream"), and a process killed mid-write leaves a truncated entry behind that
JAX never rewrites. ddx's cache (`AtomicFileCache`) writes each entry to a
temporary file and renames it into place: a reader sees the whole entry or
none, on every POSIX file system. (JAX's own remedy, a size limit, takes a
file lock around every access but scans the whole cache on every write: the
test suite's thousands of entries made that quadratic.)

`enable()` is called from `python -m ddx.main`, `install()` from
tests/conftest.py (whose subprocesses run ddx.main, or inherit the cache
directory through JAX_COMPILATION_CACHE_DIR). A gs:// cache directory keeps
JAX's own cache (object stores write whole objects).
"""
from __future__ import annotations

import os
import uuid


def default_dir() -> str:
  return os.path.join(os.path.expanduser("~"), ".cache", "ddx", "jax")


def _atomic_cache_class():
  from jax._src import lru_cache

  class AtomicFileCache(lru_cache.LRUCache):
    """JAX's file cache without a size limit, each entry written to a
    temporary name in the same folder and renamed (os.replace is atomic)."""

    def __init__(self, path: str):
      super().__init__(path, max_size=-1)

    def put(self, key: str, value: bytes) -> None:
      if not key:
        raise ValueError("key cannot be empty")
      final = os.path.join(str(self.path), f"{key}{lru_cache._CACHE_SUFFIX}")
      if os.path.exists(final):
        return
      tmp = os.path.join(str(self.path), f".{key}.{uuid.uuid4().hex}.tmp")
      try:
        with open(tmp, "wb") as f:
          f.write(value)
        os.replace(tmp, final)
      finally:
        if os.path.exists(tmp):
          os.remove(tmp)

  return AtomicFileCache


def install() -> bool:
  """Makes JAX build `AtomicFileCache` for a local cache directory, before its
  first compile; returns False (JAX's own cache stays) where this JAX has no
  such seam."""
  from jax._src import compilation_cache
  if not hasattr(compilation_cache, "get_file_cache"):
    return False
  original = compilation_cache.get_file_cache
  if getattr(original, "ddx_atomic", False):
    return True
  atomic = _atomic_cache_class()

  def get_file_cache(path: str):
    if "://" in str(path):
      return original(path)
    return atomic(str(path)), path
  get_file_cache.ddx_atomic = True
  compilation_cache.get_file_cache = get_file_cache
  return True


def enable() -> None:
  """Turns the cache on at JAX_COMPILATION_CACHE_DIR or ~/.cache/ddx/jax, with
  atomic writes (`install`). Without a writable home the run goes on without
  a cache."""
  import jax
  install()
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  path = default_dir()
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:
    return
  jax.config.update("jax_compilation_cache_dir", path)
