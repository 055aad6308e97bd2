"""Noise conditioning on the digits: the time embedding's input scale and σ_data.

  python benchmarks/noise_conditioning.py --seeds 0,1,2 \
      --out benchmarks/noise_conditioning.json
  python benchmarks/noise_conditioning.py --quick     # smoke run (4 steps, 3 settings)

Trains configs/digits_edm.py once per setting and seed: every
--embeddings entry (model.time_embedding:time_scale; positional:1 is what EDM
feeds today, ln(σ)/4 into the sinusoidal table; positional:600 moves that
table per unit ln σ as fast as DDPM's index does, tests/test_time_embedding.py;
fourier:1 is EDM2's Fourier features) crossed with every --sigma_data entry
(0.5, EDM's CIFAR-10 value, or auto: measured from the digits, ~0.75), plus
configs/digits.py as the DDPM baseline. The runs live in --root/<setting>/
seed<k> (a finished run is not trained again). Each run is scored with the
digits FD (ddx.evaluation.DigitsMetric, lower is better) at 10, 20 and 35
network evaluations with each --samplers entry (benchmarks/fd_nfe.py's
cells). Prints mean ± std over seeds per setting and NFE as Markdown and
writes every row to --out. A run whose final checkpoint exists is scored
without training (so finished runs of other benchmarks can be linked in);
--no_baseline leaves the DDPM row out, and --merge A.json,B.json only prints
the table of rows already written by several invocations (and by
process_seeds.py, PATH@PROCESS=LABEL), with each EDM setting's best Heun cell
paired per seed against the first setting's and DDPM's best, and writes them
to --out.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fd_nfe  # noqa: E402  (the FD cells: steps per NFE, sampler options, scoring)
from process_seeds import aggregate, best_cell, is_trained, paired  # noqa: E402

from ddx import parallel  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NFES = (10, 20, 35)


def settings(embeddings: str, sigma_datas: str, baseline: bool = True) -> list[dict]:
  """The runs to compare: the DDPM baseline, then EDM per (embedding, σ_data).

  Returns:
    [{"name", "config" (a file in configs/), "overrides" {group.key: value}}];
    explicit values (never "auto" for the embedding), so a row keeps its
    meaning if a default changes.
  """
  out = [{"name": "ddpm", "config": "digits.py", "overrides": {}}] if baseline else []
  for emb in embeddings.split(","):
    kind, _, scale = emb.partition(":")
    for sd in sigma_datas.split(","):
      sd = sd if sd == "auto" else float(sd)
      out.append({"name": f"edm {kind}x{float(scale):g} sigma_data={sd}",
                  "config": "digits_edm.py",
                  "overrides": {"model.time_embedding": kind,
                                "model.time_scale": float(scale),
                                "diffusion.sigma_data": sd}})
  return out


def run_config(setting: dict, seed: int, quick: bool):
  """The run config of a setting and seed (no in-loop evaluation or grids)."""
  from ddx import config as config_lib
  c = config_lib.from_file(os.path.join(ROOT, "configs", setting["config"]))
  for key, value in setting["overrides"].items():
    group, field = key.split(".")
    c[group][field] = value
  c.training.seed = seed
  c.eval.every_steps = 0
  c.training.sample_every = 0
  if quick:
    c.training.num_steps = 4
    c.training.log_every = 2
    c.optim.warmup_steps = 2
  c.training.checkpoint_every = c.training.num_steps
  return c


def _slug(name: str) -> str:
  return "".join(ch if ch.isalnum() or ch in ".-" else "_" for ch in name)


def table(rows: list, seeds, nfes, num_samples: int) -> None:
  """Prints mean ± std over seeds per (setting, sampler) and NFE as Markdown."""
  print(f"\nFD of {num_samples} samples (digits metric), mean ± std over seeds "
        f"{seeds}\n")
  lines = []
  for key in dict.fromkeys((r["run"], r["sampler"]) for r in rows):
    cells = []
    for nfe in sorted({r["nfe"] for r in rows if (r["run"], r["sampler"]) == key}):
      fds = [r["fd"] for r in rows if (r["run"], r["sampler"], r["nfe"]) == key + (nfe,)]
      sd = statistics.stdev(fds) if len(fds) > 1 else 0.0
      cells.append(f"{statistics.mean(fds):.2f} ± {sd:.2f} ({nfe})")
    lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
  width = max((line.count(" | ") - 1 for line in lines), default=len(nfes))
  print("| setting | sampler | " + " | ".join(["FD (NFE)"] * width) + " |")
  print("|---|---|" + "---|" * width)
  print("\n".join(lines))


def _rows_of(spec: str) -> tuple[int, list]:
  """(num_samples, rows labelled by setting) of one --merge entry.

  PATH is this script's --out; PATH@PROCESS=LABEL takes the rows of one
  process from a benchmarks/process_seeds.py --out file (its runs of the
  same configs, e.g. the default EDM and the DDPM baseline), labelled LABEL,
  with their NFE as used (Heun 2N - 1), as this script counts them.
  """
  path, _, pick = spec.partition("@")
  with open(path) as f:
    doc = json.load(f)
  if not pick:
    return doc["num_samples"], doc["rows"]
  process, _, label = pick.partition("=")
  rows = [dict(r, run=label, nfe=r.get("nfe_used", r["nfe"]))
          for r in doc["rows"] if r.get("process") == process]
  if not rows:
    raise SystemExit(f"--merge: {path} has no rows of process {process!r}")
  return doc["num_samples"], rows


def merge(specs: list, out: str = "") -> None:
  """Prints the table of several files' rows (equal num_samples), then each EDM
  setting's best Heun cell at <= 35 NFE paired per seed against the first EDM
  setting's and against the ddpm rows' best cell at <= 50 NFE."""
  sizes, rows = set(), []
  for spec in specs:
    n, rs = _rows_of(spec)
    sizes.add(n)
    rows += rs
  if len(sizes) != 1:
    raise SystemExit(f"--merge: the files score different sample counts {sorted(sizes)}; "
                     "FD values compare only at equal counts")
  num_samples = sizes.pop()
  table(rows, sorted({r["seed"] for r in rows}), sorted({r["nfe"] for r in rows}),
        num_samples)
  rows = [dict(r, process=r["run"]) for r in rows]
  agg = aggregate(rows)
  names = list(dict.fromkeys(r["run"] for r in rows))
  edm = [n for n in names if n.startswith("edm")]
  comparisons = []
  if edm:
    print("\nBest Heun cell at <= 35 NFE per setting, paired per seed (negative: better)\n")
    print("| setting | best Heun | − first EDM setting | − DDPM's best <= 50 NFE |")
    print("|---|---|---|---|")
    ref = best_cell(agg, edm[0], 35, "heun")
    ddpm = best_cell(agg, "ddpm", 50) if "ddpm" in names else None
    for name in edm:
      cell = best_cell(agg, name, 35, "heun")
      vs_ref = paired(rows, cell, ref)
      vs_ddpm = paired(rows, cell, ddpm) if ddpm else None
      fmt = lambda p: "-" if p is None or not p["diffs"] else (
          f"{p['mean']:+.2f} ± {p['std']:.2f} ({p['sds']:+.2f} std)")
      print(f"| {name} | {cell['mean']:.2f} ± {cell['std']:.2f} ({cell['nfe']}) | "
            f"{fmt(vs_ref)} | {fmt(vs_ddpm)} |")
      comparisons.append({"setting": name, "best_heun": cell, "vs_first_edm": vs_ref,
                          "vs_ddpm_best": vs_ddpm})
  if out:
    with open(out, "w") as f:
      json.dump({"num_samples": num_samples, "merged": specs, "rows": rows,
                 "aggregate": agg, "comparisons": comparisons}, f, indent=1)
    print(f"wrote {out}")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--embeddings", default="positional:1,positional:600,fourier:1",
                  help="EDM time embeddings, kind:time_scale, comma-separated")
  ap.add_argument("--sigma_data", default="0.5,auto",
                  help="EDM diffusion.sigma_data values (numbers or auto)")
  ap.add_argument("--samplers", default="dpm_solver_pp,heun")
  ap.add_argument("--num_samples", type=int, default=500)
  ap.add_argument("--root", default=os.path.join("runs", "noise_conditioning"))
  ap.add_argument("--out", default="")
  ap.add_argument("--quick", action="store_true",
                  help="smoke run: 4 training steps, seed 0, three settings, 100 "
                  "samples, 10 NFE")
  ap.add_argument("--no_baseline", action="store_true",
                  help="leave out the DDPM baseline row")
  ap.add_argument("--merge", default="",
                  help="comma-separated --out files (or process_seeds.py files as "
                  "PATH@PROCESS=LABEL): print their table and comparisons, train nothing")
  args = ap.parse_args()
  if args.merge:
    merge(args.merge.split(","), args.out)
    return
  seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
  nfes = NFES[:1] if args.quick else NFES
  num_samples = 100 if args.quick else args.num_samples
  batch = run_config(settings("positional:1", "0.5")[0], 0, args.quick).training.batch_size
  parallel.split_cpu_into_devices(math.gcd(batch, num_samples))
  import jax
  import ddx
  from ddx import train
  from ddx.evaluation import DigitsMetric
  metric = DigitsMetric()
  rows = []
  start = time.perf_counter()

  def save():
    if args.out:
      with open(args.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
                   "devices": [d.device_kind for d in jax.devices()],
                   "num_samples": num_samples, "quick": args.quick, "rows": rows},
                  f, indent=1)

  todo = settings(args.embeddings, args.sigma_data, not args.no_baseline)
  if args.quick:    # the baseline, and the first and last EDM settings
    todo = todo[:2] + todo[-1:]
  for setting in todo:
    for seed in seeds:
      workdir = os.path.join(args.root, _slug(setting["name"]), f"seed{seed}")
      if args.quick:
        workdir += "_quick"
      config = run_config(setting, seed, args.quick)
      t0 = time.perf_counter()
      if not is_trained(workdir, config.training.num_steps):
        train.train_and_evaluate(config, workdir)
      train_s = time.perf_counter() - t0
      model = ddx.load(workdir)
      process = model.config.diffusion.process
      for sampler in args.samplers.split(","):
        for nfe in nfes:
          row = fd_nfe.fd_row(model, metric, num_samples, setting["name"],
                              **fd_nfe.cell_options(process, sampler, nfe))
          row.update(seed=seed, nfe=fd_nfe.nfe_of(sampler, row["steps"]),
                     sigma_data=model.config.diffusion.sigma_data,
                     train_seconds=round(train_s, 1))
          rows.append(row)
          print(f"[{time.perf_counter() - start:7.1f} s] {json.dumps(row)}", flush=True)
          save()

  table(rows, seeds, nfes, num_samples)
  if args.out:
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
