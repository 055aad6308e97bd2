"""benchmarks/process_seeds.py: the seed aggregation and the paired comparison on made-up rows."""
import os
import sys

import numpy as np
import pytest

from testutils import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import process_seeds  # noqa: E402

# FDs by (process, sampler, NFE budget) for seeds 0, 1, 2.
FDS = {("ddpm", "ddim", 50): (3.0, 3.4, 3.2),
       ("ddpm", "dpm_solver_pp", 20): (3.1, 3.3, 3.0),
       ("edm", "heun", 20): (2.6, 3.0, 2.6),
       ("edm", "heun", 35): (2.5, 2.7, 2.6),
       ("edm", "euler", 35): (2.0, 2.1, 2.2)}
ROWS = [{"process": p, "sampler": s, "nfe": n, "seed": seed, "fd": fd}
        for (p, s, n), fds in FDS.items() for seed, fd in enumerate(fds)]


def test_aggregate_mean_and_sample_std():
  agg = {(a["process"], a["sampler"], a["nfe"]): a for a in process_seeds.aggregate(ROWS)}
  a = agg[("ddpm", "ddim", 50)]
  assert a["seeds"] == [0, 1, 2]
  assert a["mean"] == pytest.approx(3.2)
  # sample std of (3.0, 3.4, 3.2): deviations -0.2, 0.2, 0 -> sqrt(0.08 / 2) = 0.2
  assert a["std"] == pytest.approx(0.2)
  one = process_seeds.aggregate(ROWS[:1])[0]
  assert one["mean"] == 3.0 and np.isnan(one["std"])
  assert "precision_mean" not in a   # old rows carry no precision/recall
  pr = [dict(r, precision=0.5 + 0.1 * r["seed"], recall=0.3) for r in ROWS[:3]]
  b = process_seeds.aggregate(pr)[0]
  assert b["precision_mean"] == pytest.approx(0.6) and b["precision_std"] == pytest.approx(0.1)
  assert b["recall_mean"] == pytest.approx(0.3) and b["recall_std"] == 0


def test_best_cell_and_paired_difference():
  agg = process_seeds.aggregate(ROWS)
  e = process_seeds.best_cell(agg, "edm", 35, "heun")      # euler is better but not heun
  b = process_seeds.best_cell(agg, "ddpm", 50)
  assert (e["sampler"], e["nfe"]) == ("heun", 35)
  assert (b["sampler"], b["nfe"]) == ("dpm_solver_pp", 20)   # mean 3.133 < 3.2
  assert process_seeds.best_cell(agg, "edm", 20)["nfe"] == 20
  pr = process_seeds.paired(ROWS, e, b)
  # per seed: 2.5 - 3.1, 2.7 - 3.3, 2.6 - 3.0 = -0.6, -0.6, -0.4
  assert pr["seeds"] == [0, 1, 2]
  assert pr["diffs"] == pytest.approx([-0.6, -0.6, -0.4])
  assert pr["mean"] == pytest.approx(-1.6 / 3)
  # deviations from the mean -1.6 / 3: -0.2 / 3, -0.2 / 3, 0.4 / 3
  std = np.sqrt((2 * (0.2 / 3) ** 2 + (0.4 / 3) ** 2) / 2)
  assert pr["std"] == pytest.approx(std)
  assert pr["sds"] == pytest.approx(-1.6 / 3 / std)


def test_paired_uses_only_common_seeds():
  rows = [r for r in ROWS if not (r["process"] == "ddpm" and r["seed"] == 2)]
  agg = process_seeds.aggregate(rows)
  pr = process_seeds.paired(rows, process_seeds.best_cell(agg, "edm", 35, "heun"),
                            process_seeds.best_cell(agg, "ddpm", 50))
  assert pr["seeds"] == [0, 1]


def test_cells_add_the_ddpm_baseline_budget():
  assert ("ddim", 50) in process_seeds.cells("ddpm")
  assert all(n in process_seeds.NFES for _, n in process_seeds.cells("edm"))


def test_few_step_processes_are_scored_at_one_two_and_four_evaluations():
  from ddx import config as config_lib
  for p in ("meanflow", "consistency", "shortcut"):
    assert process_seeds.cells(p) == [(process_seeds.SAMPLERS[p][0], n) for n in (1, 2, 4)]
    c = config_lib.from_file(os.path.join(process_seeds.ROOT, "configs", process_seeds.CONFIGS[p]))
    assert c.diffusion.process == p and c.sampling.sampler == process_seeds.SAMPLERS[p][0]
  assert process_seeds.MULTI_STEP == ("ddpm", "edm", "flow")


def test_noise_conditioning_merges_process_seeds_rows(tmp_path, capsys):
  """--merge relabels a process_seeds file's rows (NFE as used) and pairs each
  EDM setting's best Heun cell with the first setting's and DDPM's best."""
  import json
  import noise_conditioning
  seeds_file, sweep_file, out = (tmp_path / n for n in ("seeds.json", "sweep.json", "o.json"))
  seeds_file.write_text(json.dumps({"num_samples": 100, "rows": [
      dict(r, nfe_used=r["nfe"] - (r["sampler"] == "heun")) for r in ROWS]}))
  sweep_file.write_text(json.dumps({"num_samples": 100, "rows": [
      {"run": "edm new", "sampler": "heun", "nfe": 35, "seed": s, "fd": fd}
      for s, fd in enumerate((2.2, 2.3, 2.3))]}))
  noise_conditioning.merge([f"{seeds_file}@ddpm=ddpm", f"{seeds_file}@edm=edm old",
                            str(sweep_file)], str(out))
  comp = {c["setting"]: c for c in json.loads(out.read_text())["comparisons"]}
  # edm old's best Heun <= 35: the 35-NFE cell (2.5, 2.7, 2.6), used NFE 34.
  assert comp["edm old"]["best_heun"]["nfe"] == 34
  assert comp["edm new"]["vs_first_edm"]["diffs"] == pytest.approx([-0.3, -0.4, -0.3])
  # DDPM's best <= 50: dpm_solver_pp 20 (mean 3.13) beats ddim 50 (3.2).
  assert comp["edm new"]["vs_ddpm_best"]["diffs"] == pytest.approx([-0.9, -1.0, -0.7])
  assert "| edm new | heun | 2.27 ± 0.06 (35) |" in capsys.readouterr().out
  sweep_file.write_text(json.dumps({"num_samples": 200, "rows": []}))
  with pytest.raises(SystemExit, match="different sample counts"):
    noise_conditioning.merge([f"{seeds_file}@ddpm=ddpm", str(sweep_file)])
