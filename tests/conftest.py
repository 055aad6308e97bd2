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
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ddx-test-jax-cache-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

# ddx's cache (ddx/compile_cache.py) writes each entry atomically, so the two
# workers, and the python -m ddx.main subprocesses (which install it too),
# never read an entry another one is still writing.
from ddx import compile_cache  # noqa: E402

compile_cache.install()


def pytest_sessionfinish(session, exitstatus):
  del exitstatus
  if hasattr(session.config, "workerinput"):
    return  # a pytest-xdist worker: the cache is shared; the controller removes it
  path = os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
  if os.path.basename(path).startswith("ddx-test-jax-cache-"):
    import shutil
    shutil.rmtree(path, ignore_errors=True)
