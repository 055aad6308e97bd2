"""Test settings: compile with XLA's backend optimisation off.

On these 2-core CPUs compiling is most of a small test's time (a tiny U-Net's
jitted init took 25 s at the default level, threefry being the slow part);
level 0 gives the same numbers for these tests in a fraction of the compile.
Set before JAX is imported; subprocesses started by tests inherit it.
"""
import os

_FLAG = "--xla_backend_optimization_level=0"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
