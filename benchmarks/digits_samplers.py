"""Sample quality of a trained digits run per sampler and step count.

  python benchmarks/digits_samplers.py --workdir runs/digits [--num_samples 800]

Scores each sampler's samples with ddx.evaluation.DigitsMetric (Fréchet distance
to held-out digits in a small classifier's feature space, confident fraction,
class entropy) and prints a Markdown table; --out writes the rows as JSON.
"""
import argparse
import json
import os
import time

from ddx import parallel

CASES = [("ddim", 10), ("dpm_solver_pp", 10), ("ddim", 20), ("dpm_solver_pp", 20),
         ("ddim", 100), ("ddpm", 250)]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--num_samples", type=int, default=800)
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  parallel.split_cpu_into_devices(args.num_samples)
  import jax
  import ddx
  from ddx.evaluation import DigitsMetric
  metric = DigitsMetric()
  model = ddx.load(args.workdir)
  rows = []
  for sampler, steps in CASES:
    t0 = time.perf_counter()
    imgs = ddx.sample_fn(model, jax.random.key(0), steps=steps, sampler=sampler,
                         num_samples=args.num_samples, eta=0.0)
    imgs.block_until_ready()
    secs = time.perf_counter() - t0
    row = {"sampler": sampler, "steps": steps, "seconds": round(secs, 1),
           **{k: round(v, 4) for k, v in metric.score(ddx.to_uint8(imgs)).items()}}
    rows.append(row)
    print(row, flush=True)
  print(f"\nclassifier held-out accuracy {metric.heldout_accuracy:.3f}; "
        f"{args.num_samples} samples each; workdir {os.path.abspath(args.workdir)}\n")
  print("| sampler | steps | FD (lower is better) | confident > 0.9 | class entropy (max 2.303) | s (incl. compile) |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['sampler']} | {r['steps']} | {r['fd']:.2f} | {r['confident']:.3f} | "
          f"{r['class_entropy']:.3f} | {r['seconds']} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
