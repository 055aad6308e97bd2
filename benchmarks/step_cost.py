"""Seconds per training update of several configs, timed interleaved (the ratio is what counts).

  python benchmarks/step_cost.py --configs digits_flow,digits_consistency --reps 20

Builds each config's jitted update (`ddx.train.make_setup`, what training runs)
on one device with its own batch size, compiles it, then times one update of
each config in turn, --reps rounds, so drifting load on a shared machine hits
every config alike. Prints the median seconds per update and the ratio to the
first config; --out writes them as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--configs", default="digits_flow,digits_consistency",
                  help="comma-separated names of configs/<name>.py; the first is the baseline")
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  from ddx import config as config_lib
  from ddx import parallel, train
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  runs = {}
  for name in args.configs.split(","):
    c = config_lib.from_file(os.path.join(ROOT, "configs", f"{name}.py"))
    config_lib.validate(c)
    if c.diffusion.get("sigma_data") == "auto":
      c.diffusion.sigma_data = 0.5
    setup = train.make_setup(c, mesh)
    b = c.training.batch_size
    shape = (b,) + config_lib.image_shape(c)
    batch = {"image": np.asarray(jax.random.uniform(jax.random.key(1), shape, minval=-1)),
             "label": np.zeros((b,), np.int32)}
    state = setup.init(jax.random.key(0))
    state, m = setup.step(state, batch, jax.random.key(2))   # compile
    jax.block_until_ready(m)
    runs[name] = [setup, state, batch, []]
  for r in range(args.reps):
    for name, run in runs.items():
      setup, state, batch, times = run
      t0 = time.perf_counter()
      state, m = setup.step(state, batch, jax.random.key(3 + r))
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
      run[1] = state
  base = None
  out = {}
  for name, (_, _, _, times) in runs.items():
    med = float(np.median(times))
    base = base or med
    out[name] = {"s_per_step": med, "ratio": med / base}
    print(f"{name}: {med:.3f} s/step (median of {len(times)}), {med / base:.2f}x")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"reps": args.reps, "devices": str(jax.devices()[0]), **out}, f, indent=2)


if __name__ == "__main__":
  main()
