"""Every digits process over training seeds: FD at 10, 20 and 35 NFE, mean ± std.

  nice -n 19 python benchmarks/process_seeds.py --seeds 0,1,2 \
      --out benchmarks/process_seeds.json

For each seed and config (configs/digits.py = DDPM, digits_edm.py,
digits_flow.py; the same network, batch, steps and optimizer), trains the run
as the README does, `python -m ddx.main --config C --workdir <--runs>/<process>_s<seed>
--config.training.seed=<seed>`, in a subprocess with its output in that
folder's train.log and its wall time in train_wall.json; a run whose final
checkpoint exists is skipped, so the script resumes after a stop. Then scores
each run's final EMA model: every sampler of its process (SAMPLERS below) at
10, 20 and 35 NFE (Heun takes 2N - 1 evaluations for N steps, so it runs at the
nearest N below: benchmarks/fd_nfe.py), and the DDPM run's samplers also at 50
NFE, the baseline the issue names. Each cell is the digits Fréchet distance
(ddx.evaluation.DigitsMetric, lower is better) of --num_samples samples from
the same key for every run (default 500: FD is biased upwards at small N, and
the floor and benchmarks/fd_nfe.py's tables are at 500). Prints per-seed rows, a Markdown table of mean ±
std (ddof 1) over seeds beside the floor (the FD of 500 real held-out digits,
BENCHMARKS.md "Evaluation"), each run's wall time, and the paired comparison
EDM's best Heun cell at <= 35 NFE against DDPM's best cell at <= 50 NFE
(per-seed difference, mean ± std, and how many std its mean is from 0);
--out writes all of it as JSON.
  --train_only   train (or finish training) the runs and stop
  --score_only   score the runs that are trained, train nothing
  --samplers     score only these samplers (e.g. heun first when time is short)
  --processes meanflow,consistency,shortcut   the few-step processes (issue #25):
                 the same seeds and budget, each at 1, 2 and 4 network evaluations
  --set KEY=VALUE   a config override for every training command (repeatable),
                 e.g. --set diffusion.mf_ratio=0.75; use its own --runs folder
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from ddx import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fd_nfe import cell_options, fd_row, nfe_of  # noqa: E402  (the same cells as fd_nfe)

CONFIGS = {"ddpm": "digits.py", "edm": "digits_edm.py", "flow": "digits_flow.py",
           # the few-step processes (issue #25), scored at FEW_STEP_NFES
           "meanflow": "digits_meanflow.py", "consistency": "digits_consistency.py",
           "shortcut": "digits_shortcut.py"}
MULTI_STEP = ("ddpm", "edm", "flow")   # --processes' default
# The samplers scored per process: the deterministic ODE solvers that converge
# in few NFE (fd_nfe's table: ancestral DDPM needs hundreds of steps, the
# stochastic sampler with churn 10 was worse than Heun on every model).
SAMPLERS = {"ddpm": ("ddim", "dpm_solver_pp", "heun"),
            "edm": ("heun", "euler", "dpm_solver_pp"),
            "flow": ("euler", "heun"),
            "meanflow": ("meanflow",), "consistency": ("consistency",),
            "shortcut": ("shortcut",)}
NFES = (10, 20, 35)
FEW_STEP_NFES = (1, 2, 4)
BASELINE_NFE = 50          # DDPM's samplers also here: "the default's best <= 50-NFE sampler"
FLOOR_SAMPLES = 500        # real held-out digits in the floor row (BENCHMARKS.md: 0.53)


def run_dir(runs: str, process: str, seed: int) -> str:
  """The workdir of one training run."""
  return os.path.join(runs, f"{process}_s{seed}")


def num_steps(process: str) -> int:
  """training.num_steps of the process's config."""
  from ddx import config as config_lib
  return config_lib.from_file(os.path.join(ROOT, "configs", CONFIGS[process])).training.num_steps


def is_trained(workdir: str, steps: int) -> bool:
  """Whether the run's final checkpoint (orbax step folder `steps`) exists."""
  return os.path.isdir(os.path.join(workdir, "checkpoints", str(steps)))


def train(process: str, seed: int, workdir: str, overrides=()) -> dict:
  """Trains (or resumes) one run in a subprocess, the README's command plus the
  seed and any overrides ("KEY=VALUE" as --config.KEY=VALUE); returns {"seconds", "resumed"} as also written to workdir/train_wall.json."""
  os.makedirs(workdir, exist_ok=True)
  resumed = os.path.isdir(os.path.join(workdir, "checkpoints"))
  cmd = [sys.executable, "-m", "ddx.main", "--config",
         os.path.join(ROOT, "configs", CONFIGS[process]), "--workdir", workdir,
         f"--config.training.seed={seed}"] + [f"--config.{o}" for o in overrides]
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  t0 = time.perf_counter()
  with open(os.path.join(workdir, "train.log"), "a") as log:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
  wall = {"seconds": round(time.perf_counter() - t0, 1), "resumed": resumed,
          "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
  if rc:
    raise SystemExit(f"training {workdir} failed (exit {rc}); see {workdir}/train.log")
  with open(os.path.join(workdir, "train_wall.json"), "w") as f:
    json.dump(wall, f)
  return wall


def train_wall(workdir: str):
  """The run's recorded wall time {"seconds", "resumed"}, or None if not recorded."""
  try:
    with open(os.path.join(workdir, "train_wall.json")) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def cells(process: str) -> list:
  """(sampler, NFE budget) of every cell scored on a run of `process`."""
  if process not in MULTI_STEP:
    return [(sampler, nfe) for sampler in SAMPLERS[process] for nfe in FEW_STEP_NFES]
  nfes = NFES + ((BASELINE_NFE,) if process == "ddpm" else ())
  return [(sampler, nfe) for sampler in SAMPLERS[process] for nfe in nfes]


def aggregate(rows: list) -> list:
  """Per (process, sampler, nfe): the seeds' FDs, their mean and sample std.

  Args:
    rows: cell rows with keys process, sampler, nfe (the NFE budget), seed, fd.
  Returns:
    one dict per key, in first-seen order: process, sampler, nfe, seeds,
    fds, mean, std (ddof 1; nan for one seed), and precision_/recall_ mean
    and std when every row has them.
  """
  groups = {}
  for r in rows:
    groups.setdefault((r["process"], r["sampler"], r["nfe"]), []).append(r)
  out = []
  for (process, sampler, nfe), rs in groups.items():
    fds = np.array([r["fd"] for r in rs], np.float64)
    cell = {"process": process, "sampler": sampler, "nfe": nfe,
            "seeds": [r["seed"] for r in rs], "fds": fds.tolist(),
            "mean": float(fds.mean()),
            "std": float(fds.std(ddof=1)) if len(fds) > 1 else float("nan")}
    for key in ("precision", "recall"):   # rows scored since 2026-12-08 carry them
      if all(key in r for r in rs):
        v = np.array([r[key] for r in rs], np.float64)
        cell[f"{key}_mean"] = float(v.mean())
        cell[f"{key}_std"] = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
    out.append(cell)
  return out


def best_cell(agg: list, process: str, max_nfe: int, sampler=None) -> dict:
  """The aggregated cell of `process` (and `sampler`, if given) at <= max_nfe
  with the lowest mean FD over seeds."""
  pool = [a for a in agg if a["process"] == process and a["nfe"] <= max_nfe
          and (sampler is None or a["sampler"] == sampler)]
  return min(pool, key=lambda a: a["mean"])


def paired(rows: list, a: dict, b: dict) -> dict:
  """Cell a minus cell b per seed (both aggregated cells; the seeds both have).

  Returns:
    {seeds, diffs, mean, std (ddof 1), sds: mean / std, the number of std
    the mean difference lies from 0 (negative: a is better)}.
  """
  def fds(cell):
    return {r["seed"]: r["fd"] for r in rows if (r["process"], r["sampler"], r["nfe"])
            == (cell["process"], cell["sampler"], cell["nfe"])}
  fa, fb = fds(a), fds(b)
  seeds = sorted(set(fa) & set(fb))
  d = np.array([fa[s] - fb[s] for s in seeds], np.float64)
  std = float(d.std(ddof=1)) if len(d) > 1 else float("nan")
  return {"seeds": seeds, "diffs": d.tolist(), "mean": float(d.mean()), "std": std,
          "sds": float(d.mean() / std) if len(d) > 1 and std > 0 else float("nan")}


def real_floor(metric, seed: int, n: int = FLOOR_SAMPLES) -> float:
  """FD of n real held-out digits, drawn without replacement by
  default_rng(seed) (seed 0, n 500: BENCHMARKS.md's 0.53)."""
  from ddx.data import load_digits
  from ddx.evaluation import DIGITS_TRAIN
  held = load_digits()[0][DIGITS_TRAIN:]
  return float(metric.score(held[np.random.default_rng(seed).choice(len(held), n,
                                                                   replace=False)])["fd"])


def run_summary(workdir: str) -> dict:
  """A run's wall time (train_wall.json) and, from metrics.jsonl, its last
  training rate and its last in-loop eval FD (the config's eval sampler)."""
  out = {"wall": train_wall(workdir)}
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      logs = [json.loads(l) for l in f if l.strip()]
  except OSError:
    logs = []
  train_logs = [m for m in logs if "loss" in m]
  evals = [m for m in logs if "eval/digits_fd" in m]
  if train_logs:
    out["images_per_sec"] = round(float(np.median([m["images_per_sec"] for m in train_logs])), 1)
  if evals:
    out["inloop_fd"] = {"step": evals[-1]["step"], "fd": round(evals[-1]["eval/digits_fd"], 3)}
  return out


def _fmt(mean: float, std: float) -> str:
  return f"{mean:.2f}" if np.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def score(args, runs: list) -> None:
  """Scores every trained run's cells (cached per run in process_seeds_cells.jsonl,
  so a stopped scoring resumes), then prints and writes the tables."""
  parallel.split_cpu_into_devices(args.num_samples)
  import ddx
  from ddx import config as config_lib
  from ddx.evaluation import DigitsMetric
  metric = DigitsMetric()
  shared = {}                 # process -> (config without the seed, frozen config)
  rows, summaries = [], {}
  for p, s, wd in runs:
    if not is_trained(wd, num_steps(p)):
      print(f"{wd}: not trained, left out", flush=True)
      continue
    summaries[f"{p}_s{s}"] = run_summary(wd)
    cache = os.path.join(wd, "process_seeds_cells.jsonl")
    done = {}
    if os.path.exists(cache):
      with open(cache) as f:
        for l in f:
          r = json.loads(l)
          done[(r["sampler"], r["nfe"], r["num_samples"])] = r
    model = None
    for sampler, nfe in cells(p):
      if args.samplers and sampler not in args.samplers.split(","):
        continue
      r = done.get((sampler, nfe, args.num_samples))
      if r is None:
        if model is None:
          model = ddx.load(wd)
          # Seeds differ only in training.seed, which sampling never reads: one
          # static config per process, so every seed reuses the compiled samplers.
          plain = config_lib.to_dict(model.config)
          plain["training"]["seed"] = 0
          if p in shared and shared[p][0] == plain:
            model = model.replace(config=shared[p][1])
          else:
            shared.setdefault(p, (plain, model.config))
        r = fd_row(model, metric, args.num_samples, f"{p}_s{s}", **cell_options(p, sampler, nfe))
        r.update(process=p, seed=s, nfe=nfe, nfe_used=nfe_of(sampler, r["steps"]),
                 num_samples=args.num_samples)
        with open(cache, "a") as f:
          f.write(json.dumps(r) + "\n")
        print(r, flush=True)
      rows.append(r)
  if not rows:
    return
  agg = aggregate(rows)
  floors = {s: round(real_floor(metric, s), 3) for s in (0, 1, 2)}
  report = {"num_samples": args.num_samples, "rows": rows, "aggregate": agg,
            "floor_500_heldout": floors, "runs": summaries}
  seeds_done = sorted({r["seed"] for r in rows})
  print(f"\n{args.num_samples} samples per cell (key 0 for every run); seeds {seeds_done}; "
        f"digits FD mean ± std over seeds (ddof 1), NFE used in parentheses\n")
  nfes = sorted({a["nfe"] for a in agg})
  print("| process | sampler | " + " | ".join(f"NFE ≤ {n}" for n in nfes) + " |")
  print("|---|---|" + "---|" * len(nfes))
  for k in dict.fromkeys((a["process"], a["sampler"]) for a in agg):
    by = {a["nfe"]: a for a in agg if (a["process"], a["sampler"]) == k}
    used = {r["nfe"]: r["nfe_used"] for r in rows if (r["process"], r["sampler"]) == k}
    grid = " (σ grid)" if k[0] == "ddpm" and k[1] in ("euler", "heun") else ""
    print(f"| {k[0]} | {k[1]}{grid} | " + " | ".join(
        f"{_fmt(by[n]['mean'], by[n]['std'])} ({used[n]})" if n in by else "–"
        for n in nfes) + " |")
  fl = np.array(list(floors.values()))
  print(f"| real digits (floor) | {FLOOR_SAMPLES} held-out | "
        + " | ".join(f"{floors[0]:.2f}" for _ in nfes) + " |")
  print(f"\nFloor: {FLOOR_SAMPLES} real held-out digits drawn by default_rng(seed); subset "
        f"seeds 0, 1, 2: {', '.join(f'{v:.2f}' for v in floors.values())} "
        f"({_fmt(fl.mean(), fl.std(ddof=1))})")
  print("\nper seed:\n")
  print("| process | sampler | NFE | " + " | ".join(f"seed {s}" for s in seeds_done) + " |")
  print("|---|---|---|" + "---|" * len(seeds_done))
  for a in agg:
    fd = dict(zip(a["seeds"], a["fds"]))
    print(f"| {a['process']} | {a['sampler']} | {a['nfe']} | " + " | ".join(
        f"{fd[s]:.2f}" if s in fd else "–" for s in seeds_done) + " |")
  print("\n| run | training wall time (min) | images/s (median of the log) | in-loop FD |")
  print("|---|---|---|---|")
  for name, sm in summaries.items():
    w, ev = sm["wall"], sm.get("inloop_fd")
    print(f"| {name} | " + (f"{w['seconds'] / 60:.1f}" + (" (resumed)" if w["resumed"] else "")
                            if w else "–")
          + f" | {sm.get('images_per_sec', '–')} | "
          + (f"{ev['fd']:.2f} (step {ev['step']})" if ev else "–") + " |")
  procs = {a["process"] for a in agg}
  if {"edm", "ddpm"} <= procs and any(a["process"] == "edm" and a["sampler"] == "heun"
                                      for a in agg):
    e = best_cell(agg, "edm", 35, "heun")
    b = best_cell(agg, "ddpm", BASELINE_NFE)
    pr = paired(rows, e, b)
    report["paired_edm_heun_vs_ddpm"] = {"edm": e, "ddpm": b, **pr}
    print(f"\nEDM heun at {e['nfe']} NFE ({_fmt(e['mean'], e['std'])}) minus DDPM "
          f"{b['sampler']} at {b['nfe']} NFE ({_fmt(b['mean'], b['std'])}), paired over "
          f"seeds {pr['seeds']}: {_fmt(pr['mean'], pr['std'])} = {pr['sds']:.2f} std")
  for p in sorted(procs - {"ddpm"}) if "ddpm" in procs else ():
    o = best_cell(agg, p, BASELINE_NFE)
    b = best_cell(agg, "ddpm", BASELINE_NFE)
    pr = paired(rows, o, b)
    report[f"paired_{p}_vs_ddpm"] = {p: o, "ddpm": b, **pr}
    print(f"{p} {o['sampler']} at {o['nfe']} NFE minus DDPM {b['sampler']} at {b['nfe']} "
          f"NFE, paired: {_fmt(pr['mean'], pr['std'])} = {pr['sds']:.2f} std")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(_nan_to_none(report), f, indent=1)


def _nan_to_none(x):
  """x with every float NaN (the std of one seed) as None: strict JSON has no NaN."""
  if isinstance(x, dict):
    return {k: _nan_to_none(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_nan_to_none(v) for v in x]
  return None if isinstance(x, float) and np.isnan(x) else x


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--processes", default=",".join(MULTI_STEP),
                  help=f"comma-separated, of {', '.join(CONFIGS)}")
  ap.add_argument("--runs", default="/work/runs/table")
  ap.add_argument("--num_samples", type=int, default=500)
  ap.add_argument("--out", default="")
  ap.add_argument("--samplers", default="",
                  help="score only these samplers (comma list; default: all of SAMPLERS)")
  ap.add_argument("--train_only", action="store_true")
  ap.add_argument("--score_only", action="store_true")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="config override for training (repeatable)")
  args = ap.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  processes = args.processes.split(",")
  runs = [(p, s, run_dir(args.runs, p, s)) for s in seeds for p in processes]
  if not args.score_only:
    for p, s, wd in runs:     # seed-major: a stopped sweep leaves whole seeds
      if is_trained(wd, num_steps(p)):
        print(f"{wd}: trained", flush=True)
        continue
      print(f"{wd}: training ...", flush=True)
      print(f"{wd}: {train(p, s, wd, args.set)}", flush=True)
  if args.train_only:
    return
  score(args, runs)


if __name__ == "__main__":
  main()
