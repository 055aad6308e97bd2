"""Training cost per step of each process on the same network and batch, against flow.

  python benchmarks/process_cost.py --out benchmarks/process_cost.json

Builds the jitted update (`ddx.train.make_setup`, what training runs) of each
process's digits config (configs/digits_<process>.py; flow = digits_flow.py,
ddpm = digits.py) on one real data batch, compiles it outside the timing, then
times `--steps` updates per process in `--rounds` interleaved rounds (flow,
A, B, ..., flow, A, B, ...), so a change in the machine's load hits every
process alike. Reports the median seconds per update and its ratio to flow's
(the JVP overhead of the few-step processes: MeanFlow and sCM take one
forward-mode product through the network per step, a shortcut model two extra
forward passes on part of the batch). `--processes flow,dit` times
configs/digits_dit.py (flow on the DiT) against the U-Net's flow update.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddx import parallel  # noqa: E402  (before JAX starts: one CPU device per core)

CONFIGS = {"ddpm": "digits", "edm": "digits_edm", "flow": "digits_flow",
           "consistency": "digits_consistency", "meanflow": "digits_meanflow",
           "shortcut": "digits_shortcut",
           # Not a process: flow matching on the DiT, so its ratio to flow is the
           # DiT's update cost against the U-Net's (issue #24's equal-wall-time FD).
           "dit": "digits_dit"}


def build(process: str):
  """(jitted step, state, batch, rng) of `process`'s digits config, compiled."""
  import jax
  from ddx import config as config_lib
  from ddx import data, train
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = config_lib.from_file(os.path.join(root, "configs", CONFIGS[process] + ".py"))
  config.training.teacher = ""
  config_lib.validate(config, jax.device_count())
  setup = train.make_setup(config, parallel.make_mesh())
  state = setup.init(jax.random.key(0))
  batch = data.get_batch(data.make_source(config.data), 0,
                         batch_size=config.training.batch_size, seed=0, random_flip=False)
  rng = jax.random.key(1)
  state, m = setup.step(state, batch, rng)   # compile
  jax.block_until_ready(m)
  return setup.step, state, batch, rng


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--processes", default="flow,edm,consistency,meanflow,shortcut",
                  help="comma-separated; flow first is the baseline")
  ap.add_argument("--steps", type=int, default=5, help="updates per timing")
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  names = args.processes.split(",")
  if names[0] != "flow":
    ap.error("--processes must start with flow (the baseline)")
  parallel.split_cpu_into_devices(128, max_devices=os.cpu_count() or 1)
  import jax
  runs = {p: list(build(p)) for p in names}
  times = {p: [] for p in names}
  for _ in range(args.rounds):
    for p in names:
      step, state, batch, rng = runs[p]
      t0 = time.perf_counter()
      for _ in range(args.steps):
        state, m = step(state, batch, rng)
      jax.block_until_ready((state, m))
      times[p].append((time.perf_counter() - t0) / args.steps)
      runs[p][1] = state
  base = statistics.median(times["flow"])
  rows = [{"process": p, "s_per_step": statistics.median(times[p]),
           "vs_flow": statistics.median(times[p]) / base, "all": times[p]} for p in names]
  print("| process | s / update (median) | vs flow |")
  print("|---|---|---|")
  for r in rows:
    print(f"| {r['process']} | {r['s_per_step']:.3f} | {r['vs_flow']:.2f}x |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"jax": jax.__version__, "devices": [d.device_kind for d in jax.devices()],
                 "steps": args.steps, "rounds": args.rounds, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
