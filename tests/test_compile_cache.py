"""The persistent compilation cache writes each entry atomically: a process
never reads an entry another one is still writing (ddx/compile_cache.py)."""
import os
import subprocess
import sys

import pytest

from ddx import compile_cache

from testutils import ROOT

_COMPILE = ("from ddx import compile_cache; compile_cache.enable(); "
            "import jax, jax.numpy as jnp; print(jax.jit(lambda x: jnp.sin(x) * 3)(1.0)); "
            "from jax._src import compilation_cache as cc; print(type(cc._cache).__name__)")


def test_ddx_main_cache_is_the_atomic_one(tmp_path):
  """ddx.main's cache in ~/.cache/ddx/jax (a fresh HOME here): the compiled
  entry is there, written by AtomicFileCache, and no temporary file is left."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update(HOME=str(tmp_path), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  r = subprocess.run([sys.executable, "-c", _COMPILE], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split()[-1] == "AtomicFileCache", r.stdout
  names = sorted(os.listdir(tmp_path / ".cache" / "ddx" / "jax"))
  assert any(n.endswith("-cache") for n in names), names
  assert not [n for n in names if n.endswith(".tmp")], names


def test_an_interrupted_write_leaves_no_entry(tmp_path, monkeypatch):
  """A write stopped before its rename (a kill, a full disk) leaves neither a
  truncated entry nor its temporary file; a finished write is whole."""
  compile_cache.install()
  cache = compile_cache._atomic_cache_class()(str(tmp_path))
  value = os.urandom(1 << 16)

  def stop(src, dst):
    raise OSError("killed before the rename")
  monkeypatch.setattr(os, "replace", stop)
  with pytest.raises(OSError, match="killed"):
    cache.put("k", value)
  assert os.listdir(tmp_path) == [] and cache.get("k") is None
  monkeypatch.undo()
  cache.put("k", value)
  assert cache.get("k") == value and os.listdir(tmp_path) == ["k-cache"]
