"""Digits sample quality against network evaluations: spacings, samplers, processes.

  python benchmarks/fd_nfe.py spacing --workdir runs/digits
  python benchmarks/fd_nfe.py nfe --workdir runs/digits --workdir runs/digits_edm \
      --workdir runs/digits_flow

`spacing`: the DDPM samplers (ddim, dpm_solver_pp, ddpm) at 1, 2, 5, 10, 20
steps with every timestep spacing (uniform, trailing, quadratic, logsnr).
`nfe`: every sampler of each run's process at 5, 10, 20, 50, 100 network
evaluations (NFE; Heun and the stochastic sampler take 2N - 1 for N steps,
so they run at the nearest N below), plus a DDPM run under EDM's samplers.
Each cell is the digits Fréchet distance (ddx.evaluation.DigitsMetric, lower
is better) of --num_samples samples from the same seed. Prints Markdown
tables; --out writes the rows as JSON.
"""
import argparse
import json
import os
import time

from ddx import parallel

SPACING_STEPS = (1, 2, 5, 10, 20)
NFES = (5, 10, 20, 50, 100)
TWO_PER_STEP = ("heun", "stochastic")


def steps_for(sampler: str, nfe: int) -> int:
  """Steps N whose network evaluations are at most nfe (Heun: 2N - 1)."""
  return (nfe + 1) // 2 if sampler in TWO_PER_STEP else nfe


def cell_options(process: str, sampler: str, nfe: int) -> dict:
  """sample_fn options of a table cell: `sampler` at (at most) nfe network
  evaluations; the stochastic sampler with churn 10; a DDPM model on a σ grid
  with the nearest index."""
  kw = dict(sampler=sampler, steps=steps_for(sampler, nfe))
  if sampler == "stochastic":
    kw["churn"] = 10.0
  if process == "ddpm" and sampler in TWO_PER_STEP + ("euler",):
    kw["sigma_index"] = "nearest"
  return kw


def nfe_of(sampler: str, steps: int) -> int:
  """Network evaluations of `steps` steps (Heun and stochastic: 2N - 1)."""
  return 2 * steps - 1 if sampler in TWO_PER_STEP else steps


def fd_row(model, metric, num_samples: int, label: str, **kw) -> dict:
  """One cell: the digits FD of num_samples samples of `model` (key 0, eta 0)
  drawn with sample_fn options kw, and the share the held-out classifier gives
  a top-class probability > 0.9, and precision/recall against the held-out
  digits (ADM's k = 3 estimator in the classifier's features), as a row
  {run, **kw, fd, confident, precision, recall, seconds}."""
  import jax
  import ddx
  t0 = time.perf_counter()
  imgs = ddx.sample_fn(model, jax.random.key(0), num_samples=num_samples, eta=0.0, **kw)
  scores = metric.score(ddx.to_uint8(imgs))
  return {"run": label, **kw, "fd": round(float(scores["fd"]), 3),
          "confident": round(float(scores["confident"]), 3),
          "precision": round(float(scores["precision"]), 3),
          "recall": round(float(scores["recall"]), 3),
          "seconds": round(time.perf_counter() - t0, 1)}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("table", choices=("spacing", "nfe"))
  ap.add_argument("--workdir", action="append", required=True)
  ap.add_argument("--num_samples", type=int, default=500)
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  parallel.split_cpu_into_devices(args.num_samples)
  import ddx
  from ddx import processes
  from ddx.evaluation import DigitsMetric
  metric = DigitsMetric()
  rows = []

  def score(model, label, **kw):
    row = fd_row(model, metric, args.num_samples, label, **kw)
    rows.append(row)
    print(row, flush=True)
    return row

  for wd in args.workdir:
    model = ddx.load(wd)
    process = model.config.diffusion.process
    label = f"{os.path.basename(os.path.normpath(wd))} ({process})"
    if args.table == "spacing":
      for sampler in ("ddim", "dpm_solver_pp", "ddpm"):
        for spacing in processes.spec("ddpm").spacings:
          for steps in SPACING_STEPS:
            score(model, label, sampler=sampler, spacing=spacing, steps=steps)
    else:
      for sampler in processes.spec(process).samplers:
        if sampler == "ddpm":
          continue                  # ancestral: many steps by design, not an ODE solver
        for nfe in NFES:
          r = score(model, label, **cell_options(process, sampler, nfe))
          r["nfe"] = nfe_of(sampler, r["steps"])
  print(f"\n{args.num_samples} samples per cell; classifier held-out accuracy "
        f"{metric.heldout_accuracy:.3f}\n")
  if args.table == "spacing":
    print("| run | sampler | spacing | " + " | ".join(f"{s} steps" for s in SPACING_STEPS) + " |")
    print("|---|---|---|" + "---|" * len(SPACING_STEPS))
    for k in dict.fromkeys((r["run"], r["sampler"], r["spacing"]) for r in rows):
      cells = {r["steps"]: r["fd"] for r in rows if (r["run"], r["sampler"], r["spacing"]) == k}
      print(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(f"{cells[s]:.2f}" for s in SPACING_STEPS) + " |")
  else:
    print("| run | sampler | " + " | ".join(f"NFE {n}" for n in NFES) + " |")
    print("|---|---|" + "---|" * len(NFES))
    for k in dict.fromkeys((r["run"], r["sampler"]) for r in rows):
      cells = [f"{r['fd']:.2f} ({r['nfe']})" for r in rows if (r["run"], r["sampler"]) == k]
      print(f"| {k[0]} | {k[1]} | " + " | ".join(cells) + " |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
