"""The persistent compilation cache is locked: a process never reads an entry
that another one is still writing (ddx/compile_cache.py)."""
import os
import subprocess
import sys

from ddx import compile_cache

from testutils import ROOT

_COMPILE = ("from ddx import compile_cache; compile_cache.enable(); "
            "import jax, jax.numpy as jnp; print(jax.jit(lambda x: jnp.sin(x) * 3)(1.0))")


def test_ddx_main_cache_takes_jax_lock(tmp_path):
  """ddx.main's cache in ~/.cache/ddx/jax (a fresh HOME here): after a compile
  the entry is there and so is the lock file JAX takes around every read and
  write, which it does only for a size-limited cache."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update(HOME=str(tmp_path), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  r = subprocess.run([sys.executable, "-c", _COMPILE], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  cache = tmp_path / ".cache" / "ddx" / "jax"
  names = sorted(p.name for p in cache.iterdir())
  assert ".lockfile" in names, names
  assert any(n.endswith("-cache") for n in names), names


def test_tests_share_a_locked_cache():
  """conftest gives pytest workers and their subprocesses one cache, locked."""
  assert os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] == str(compile_cache.MAX_BYTES)
  assert int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"]) > 0
