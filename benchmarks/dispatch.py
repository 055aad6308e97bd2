"""Updates per jitted call: the real training loop with training.steps_per_dispatch = 1 vs k.

  python benchmarks/dispatch.py --steps 1000 --k 10 --out benchmarks/dispatch.json

Runs `ddx.train.train_and_evaluate` (data loader, host-to-device copies,
logging and all) on the digits default, once per k, in fresh temporary workdirs,
with sample grids, in-loop evaluation and intermediate checkpoints off. It
reports the images/s that the loop itself logs, averaged over the log windows
after the first (so compilation is excluded). A small model on a GPU or TPU
spends much of each step launching it. k updates per call (a `lax.scan` over k
batches) pay that once per k; on a CPU the step dwarfs the launch and k changes
little.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddx import parallel  # noqa: E402  (before JAX starts: one CPU device per core)


def run(config_name: str, k: int, steps: int, log_every: int) -> dict:
  import speed
  from ddx import train
  config = speed._config(config_name, {})
  t = config.training
  t.num_steps, t.log_every, t.steps_per_dispatch = steps, log_every, k
  t.checkpoint_every, t.sample_every = 0, 0
  config.eval.every_steps = 0
  with tempfile.TemporaryDirectory() as workdir:
    t0 = time.perf_counter()
    train.train_and_evaluate(config, workdir)
    wall = time.perf_counter() - t0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rates = [r["images_per_sec"] for r in map(json.loads, f) if "images_per_sec" in r]
  return {"k": k, "wall_s": wall, "images_per_s": statistics.mean(rates[1:]),
          "steps_per_s": statistics.mean(rates[1:]) / t.batch_size}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="digits")
  ap.add_argument("--steps", type=int, default=1000)
  ap.add_argument("--log_every", type=int, default=100)
  ap.add_argument("--k", type=int, default=10, help="updates per call to compare with 1")
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  if args.log_every % args.k or args.steps < 2 * args.log_every:
    ap.error("--log_every must be a multiple of --k, and --steps at least 2 log windows")
  parallel.split_cpu_into_devices(128, max_devices=os.cpu_count() or 1)
  import jax
  out = {"jax": jax.__version__, "devices": [d.device_kind for d in jax.devices()],
         "config": args.config, "steps": args.steps, "date": time.strftime("%Y-%m-%d"),
         "runs": [run(args.config, k, args.steps, args.log_every) for k in (1, args.k)]}
  base, fast = out["runs"]
  print(f"{args.config} on {out['devices'][0]} x{len(out['devices'])}: "
        f"steps_per_dispatch=1 {base['steps_per_s']:.1f} steps/s, "
        f"={args.k} {fast['steps_per_s']:.1f} steps/s, "
        f"ratio {fast['steps_per_s'] / base['steps_per_s']:.2f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  main()
