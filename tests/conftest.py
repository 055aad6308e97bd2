"""Test settings: compile with XLA's backend optimisation off, and cache programs.

On these 2-core CPUs compiling is most of a small test's time (a tiny U-Net's
jitted init took 25 s at the default level, threefry being the slow part);
level 0 gives the same numbers for these tests in a fraction of the compile.
A persistent compilation cache shared by this session's processes lets the
many `python -m ddx.main` subprocesses skip compiles an earlier one did.
Set before JAX is imported; subprocesses started by tests, and pytest-xdist
workers (`-n 2`), inherit it.
"""
import os
import tempfile

_FLAG = "--xla_backend_optimization_level=0"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  # ddx's locked cache (ddx/compile_cache.py): workers and subprocesses share
  # it without reading an entry another one is writing.
  from ddx import compile_cache
  os.environ.update(compile_cache.environment(tempfile.mkdtemp(prefix="ddx-test-jax-cache-")))
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def pytest_sessionfinish(session, exitstatus):
  del exitstatus
  if hasattr(session.config, "workerinput"):
    return  # a pytest-xdist worker: the cache is shared; the controller removes it
  path = os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
  if os.path.basename(path).startswith("ddx-test-jax-cache-"):
    import shutil
    shutil.rmtree(path, ignore_errors=True)
