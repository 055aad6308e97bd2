"""Post-hoc EMA on the digits: FD over a sweep of sigma_rel, against the fixed EMA.

  python benchmarks/posthoc_ema.py --seeds 0,1,2 --out benchmarks/posthoc_ema.json
  python benchmarks/posthoc_ema.py --quick     # smoke run: a few steps, minutes

For each seed, trains configs/digits.py (training.seed = seed; in-loop grids
and evaluation off) with training.posthoc_ema on, tracking sigma_rel 0.05 and
0.10 with snapshots every --snapshot_every steps, in <--runs>/posthoc_s<seed>
(an existing run there is resumed or reused). Then reconstructs the EMA of
every --sigma_rels from the snapshots (ddx.posthoc_ema.reconstruct, at the
last snapshot) and scores each, beside the run's fixed EMA (optim.ema_decay
0.999 with warm-up), by the digits Fréchet distance (ddx.evaluation.
DigitsMetric, lower is better) of --num_samples samples of the config's eval
sampler, the same noise for every model. Prints a Markdown table of the mean
and spread over seeds and writes the rows as JSON (--out).
"""
import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np

from ddx import parallel

SIGMA_RELS = (0.02, 0.03, 0.04, 0.05, 0.07, 0.10, 0.13, 0.16, 0.20, 0.25)
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "configs", "digits.py")


def run_config(seed: int, snapshot_every: int, quick: bool):
  """configs/digits.py with post-hoc EMA on; --quick shrinks it to seconds of training."""
  from ddx import config as config_lib
  c = config_lib.from_file(CONFIG)
  c.training.seed = seed
  c.training.posthoc_ema.snapshot_every = snapshot_every
  c.training.sample_every = 0
  c.eval.every_steps = 0
  if quick:
    c.training.num_steps, c.training.batch_size = 20, 32
    c.training.log_every = c.training.checkpoint_every = 10
    c.model.ch, c.model.num_res_blocks = 16, 1
    c.eval.steps = 2
  return c


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--sigma_rels", default=",".join(f"{s:g}" for s in SIGMA_RELS))
  ap.add_argument("--snapshot_every", type=int, default=100)
  ap.add_argument("--num_samples", type=int, default=1000)
  ap.add_argument("--runs", default="runs/posthoc_ema")
  ap.add_argument("--out", default="")
  ap.add_argument("--quick", action="store_true",
                  help="smoke run: 20 steps of a smaller U-Net, 3 widths, 64 samples")
  args = ap.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  rels = [float(s) for s in args.sigma_rels.split(",")]
  if args.quick:
    seeds, rels, args.num_samples, args.snapshot_every = seeds[:1], [0.05, 0.08, 0.2], 64, 5
    args.runs = tempfile.mkdtemp(prefix="ddx-posthoc-quick-")
  parallel.split_cpu_into_devices(args.num_samples)
  import jax
  import ddx
  from ddx import config as config_lib
  from ddx import model as model_lib
  from ddx import posthoc_ema, train
  from ddx.evaluation import DigitsMetric

  metric = DigitsMetric()
  rows = []
  for seed in seeds:
    config = run_config(seed, args.snapshot_every, args.quick)
    workdir = os.path.join(args.runs, f"posthoc_s{seed}")
    t0 = time.perf_counter()
    train.train_and_evaluate(config, workdir)
    train_secs = time.perf_counter() - t0
    _, results = posthoc_ema.reconstruct(workdir, rels)
    frozen = config_lib.freeze(config)
    models = [("fixed EMA", None, ddx.load(workdir))]
    models += [(f"sigma_rel {info['sigma_rel']:g}", info,
                model_lib.Model(jax.tree.map(jax.numpy.asarray, variables), frozen))
               for variables, info in results]
    e = config.eval
    for name, info, model in models:
      imgs = ddx.sample_fn(model, jax.random.key(1000 + seed), num_samples=args.num_samples,
                           sampler=e.sampler, steps=e.steps, eta=e.eta)
      score = metric.score(ddx.to_uint8(imgs))
      row = {"seed": seed, "model": name, "fd": round(float(score["fd"]), 4),
             "confident": round(float(score["confident"]), 4),
             "num_steps": config.training.num_steps, "train_seconds": round(train_secs, 1)}
      if info is not None:
        row["relative_residual"] = round(info["relative_residual"], 5)
      rows.append(row)
      print(row, flush=True)

  print(f"\nconfigs/digits.py, {config.training.num_steps} steps, snapshots every "
        f"{args.snapshot_every} (sigma_rel 0.05, 0.10); FD of {args.num_samples} samples "
        f"({e.sampler}, {e.steps} steps); seeds {seeds}\n")
  print("| model | FD mean | FD min | FD max | fit residual |")
  print("|---|---|---|---|---|")
  for name in dict.fromkeys(r["model"] for r in rows):
    fds = [r["fd"] for r in rows if r["model"] == name]
    res = [r.get("relative_residual") for r in rows if r["model"] == name]
    print(f"| {name} | {np.mean(fds):.3f} | {min(fds):.3f} | {max(fds):.3f} | "
          f"{'-' if res[0] is None else f'{res[0]:.3f}'} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)
  if args.quick:
    shutil.rmtree(args.runs, ignore_errors=True)


if __name__ == "__main__":
  main()
