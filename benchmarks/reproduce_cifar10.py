"""DDPM's and DDIM's CIFAR-10 numbers from the published DDPM checkpoint, in ddx.

  huggingface-cli download google/ddpm-cifar10-32 --local-dir ddpm-cifar10-32
  python -m ddx.convert ddpm-cifar10-32 --workdir runs/ddpm-cifar10
  python benchmarks/reproduce_cifar10.py --workdir runs/ddpm-cifar10 \
      --inception_weights pt_inception.npz --data_dir ~/tensorflow_datasets

(Inception weights and CIFAR-10 are prepared as the README's Evaluation and
Training on CIFAR-10 sections say; nothing is downloaded here.)

Rows, each scored on --num_samples samples (50,000 as the papers) against the
statistics of the 50,000 CIFAR-10 training images:
  * DDIM (Song et al. 2021, Table 1): η = 0 and η = 1, 10 / 20 / 50 / 100
    steps, with the quadratic index spacing the DDIM paper used for CIFAR-10,
    no clipping of x̂_0 (as DDIM's code); FID.
  * DDPM (Ho et al. 2020, Table 1): the ancestral sampler over all 1,000
    steps with σ² = β (DDPM's CIFAR-10 setting) and x̂_0 clipped to [-1, 1]
    (DDPM's sampler); FID and Inception Score.
The published figure is printed beside each measured one, and the Markdown
table is written to --out (default <workdir>/eval/reproduce_cifar10.md).

Resumable like `--mode eval`: samples go to
<workdir>/eval/reproduce_cifar10/<row>/ in chunks of --batch_size, chunks and
scores already there are reused, so an interrupted run picks up where it
stopped and a finished one rewrites the table in seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import NamedTuple, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Published figures. DDIM Table 1 (CIFAR-10, FID), η = 0; DDPM Table 1.
DDIM_ETA0_FID = {10: 13.36, 20: 6.84, 50: 4.67, 100: 4.16}
DDPM_FID, DDPM_IS = 3.17, 9.46


class Row(NamedTuple):
  """One sampler setting of the protocol and its published figures."""
  sampler: str
  steps: int
  eta: float
  spacing: str
  clip_x0: bool
  ddpm_variance: str
  paper_fid: Optional[float]
  paper_is: Optional[float]

  @property
  def key(self) -> str:
    """The row's folder name under eval/reproduce_cifar10/."""
    return f"{self.sampler}_eta{self.eta:g}_{self.steps}_{self.spacing}"


def rows(ddim_steps=(10, 20, 50, 100), etas=(0.0, 1.0), ddpm_steps=1000) -> list[Row]:
  """The protocol's rows (the papers' settings by default).

  Args:
    ddim_steps: DDIM step counts S.
    etas: DDIM η values.
    ddpm_steps: steps of the DDPM row (0 = no DDPM row).
  Returns:
    DDIM rows (η-major) then the DDPM row; the published figures are filled in
    where the papers give them for exactly that setting.
  """
  out = [Row("ddim", s, float(eta), "quadratic", False, "posterior",
             DDIM_ETA0_FID.get(s) if eta == 0 else None, None)
         for eta in etas for s in ddim_steps]
  if ddpm_steps:
    full = ddpm_steps == 1000
    out.append(Row("ddpm", ddpm_steps, 1.0, "uniform", True, "beta",
                   DDPM_FID if full else None, DDPM_IS if full else None))
  return out


def _fmt(v: Optional[float], digits: int = 2) -> str:
  return "—" if v is None else f"{v:.{digits}f}"


def markdown(results: list[dict], header: str = "") -> str:
  """The Markdown table of `run`'s results (measured beside published)."""
  lines = [header] if header else []
  lines += ["| sampler | η | steps | spacing | FID | FID (paper) | IS | IS (paper) |",
            "|---|---|---|---|---|---|---|---|"]
  for r in results:
    row = r["row"]
    name = "DDIM" if row.sampler == "ddim" else "DDPM (σ² = β, x̂₀ clipped)"
    eta = f"{row.eta:g}" if row.sampler == "ddim" else "—"
    spacing = "every step" if row.steps == 1000 and row.sampler == "ddpm" else row.spacing
    lines.append(f"| {name} | {eta} | {row.steps} | {spacing} | {_fmt(r['fid'])} | "
                 f"{_fmt(row.paper_fid)} | {_fmt(r['is'])} | {_fmt(row.paper_is)} |")
  return "\n".join(lines) + "\n"


def run(workdir: str, inception_weights: str, data_dir: str = "", *,
        num_samples: int = 50_000, batch_size: int = 500, feature_batch_size: int = 200,
        protocol: Optional[list[Row]] = None, seed: int = 0, dtype: str = "float32",
        reference_stats: str = "", extractor=None, progress: bool = True) -> list[dict]:
  """Samples and scores every row of the protocol; resumable.

  Args:
    workdir: a ddx workdir of a 32x32 RGB model (python -m ddx.convert of
      google/ddpm-cifar10-32).
    inception_weights: the FID Inception .npz (README: Evaluation).
    data_dir: tfds data_dir holding the prepared cifar10 ("" = tfds' default).
    num_samples: samples per row.
    batch_size: samples per sampler call (one chunk file each).
    feature_batch_size: images per Inception call.
    protocol: the rows (default `rows()`).
    seed: eval seed; chunk c of every row starts from fold_in(key(seed), c).
    dtype: the U-Net's compute dtype (float32, or bfloat16 on GPU/TPU).
    reference_stats: the CIFAR-10 statistics .npz (default
      <workdir>/eval/reference_cifar10.npz, computed on first use).
    extractor: an `eval_run.Extractor` to use instead of the Inception weights.
    progress: print progress lines.
  Returns:
    one dict per row: {"row": Row, "fid", "is", "is_std", "sample_seconds"
    (None when the samples were reused)}.
  """
  from ddx import checkpoint as ckpt_lib
  from ddx import config as config_lib
  from ddx import eval_run
  from ddx import model as model_lib
  loaded = ckpt_lib.load(workdir)
  config = config_lib.from_dict(config_lib.to_dict(loaded.config))
  if tuple(loaded.image_shape) != (32, 32, 3):
    raise config_lib.ConfigError(
        f"the model in {workdir} makes {tuple(loaded.image_shape)} images; the CIFAR-10 "
        "protocol needs a 32x32x3 model (python -m ddx.convert of google/ddpm-cifar10-32)")
  d, e = config.data, config.eval
  d.name, d.data_dir, d.split, d.crop = "cifar10", data_dir, "train", "center"
  d.image_key = "image"
  e.metrics, e.inception_weights = ("fid", "is"), inception_weights
  e.num_samples, e.batch_size, e.seed = int(num_samples), int(batch_size), int(seed)
  e.feature_batch_size = int(feature_batch_size)
  e.reference_stats = reference_stats or eval_run.default_reference_path(config, workdir)
  config.model.dtype = dtype
  model = model_lib.Model(loaded.variables, config_lib.freeze(config))
  if extractor is None:
    config_lib.check_eval_inputs(config)
    extractor = eval_run.inception_extractor(inception_weights, feature_batch_size)
  weights = eval_run.model_fingerprint(model)
  out = []
  for row in protocol or rows():
    e.sampler, e.steps, e.eta, e.spacing = row.sampler, row.steps, row.eta, row.spacing
    config.sampling.clip_x0, config.sampling.ddpm_variance = row.clip_x0, row.ddpm_variance
    out_dir = os.path.join(workdir, "eval", "reproduce_cifar10", row.key)
    scores_path = os.path.join(out_dir, f"metrics_{num_samples}.json")
    settings = {"row": row._asdict(), "num_samples": num_samples, "batch_size": batch_size,
                "seed": seed, "dtype": dtype, "weights": weights,
                "features": extractor.name, "reference": e.reference_stats}
    cached = None
    if os.path.exists(scores_path):
      with open(scores_path) as f:
        cached = json.load(f)
      cached = cached if cached.get("settings") == json.loads(json.dumps(settings)) else None
    if cached is not None:
      if progress:
        print(f"reproduce: {row.key}: scores reused from {scores_path}", flush=True)
      out.append({"row": row, "fid": cached["fid"], "is": cached["is"],
                  "is_std": cached["is_std"], "sample_seconds": None})
      continue
    evaluator = eval_run.Evaluator(config, workdir, extractor=extractor)
    t0 = time.perf_counter()
    samples = eval_run.sample_chunks(model, config, out_dir, progress=progress)
    seconds = time.perf_counter() - t0
    scores = evaluator.scores(samples)
    result = {"fid": float(scores["fid"]), "is": float(scores["is"]),
              "is_std": float(scores["is_std"])}
    os.makedirs(out_dir, exist_ok=True)
    with open(scores_path + ".tmp", "w") as f:
      json.dump({"settings": settings, **result}, f, indent=2)
    os.replace(scores_path + ".tmp", scores_path)
    if progress:
      print(f"reproduce: {row.key}: FID {result['fid']:.3f} IS {result['is']:.3f} "
            f"(paper FID {_fmt(row.paper_fid)}, IS {_fmt(row.paper_is)}); sampling and "
            f"chunk reads {seconds:.0f} s", flush=True)
    out.append({"row": row, **result, "sample_seconds": seconds})
  return out


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(
      prog="python benchmarks/reproduce_cifar10.py",
      description="DDIM Table 1 and DDPM's FID/IS on CIFAR-10 from a converted checkpoint.")
  ap.add_argument("--workdir", required=True, help="converted google/ddpm-cifar10-32")
  ap.add_argument("--inception_weights", required=True, help="FID Inception .npz")
  ap.add_argument("--data_dir", default="", help="tfds data_dir with prepared cifar10")
  ap.add_argument("--num_samples", type=int, default=50_000)
  ap.add_argument("--batch_size", type=int, default=500, help="samples per sampler call")
  ap.add_argument("--feature_batch_size", type=int, default=200)
  ap.add_argument("--ddim_steps", default="10,20,50,100")
  ap.add_argument("--etas", default="0,1")
  ap.add_argument("--ddpm_steps", type=int, default=1000, help="0 = no DDPM row")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--reference_stats", default="")
  ap.add_argument("--out", default="", help="Markdown file (default <workdir>/eval/"
                  "reproduce_cifar10.md)")
  args = ap.parse_args(argv)
  from ddx import checkpoint as ckpt_lib
  from ddx import config as config_lib
  from ddx import data as data_lib
  from ddx import inception
  protocol = rows(_ints(args.ddim_steps),
                  tuple(float(x) for x in args.etas.split(",") if x.strip()),
                  args.ddpm_steps)
  try:
    results = run(args.workdir, args.inception_weights, args.data_dir,
                  num_samples=args.num_samples, batch_size=args.batch_size,
                  feature_batch_size=args.feature_batch_size, protocol=protocol,
                  seed=args.seed, dtype=args.dtype, reference_stats=args.reference_stats)
  except (config_lib.ConfigError, data_lib.DataError, ckpt_lib.CheckpointError,
          inception.InceptionWeightsError) as err:
    print(f"reproduce_cifar10: error: {err}", file=sys.stderr)
    return 2
  header = (f"CIFAR-10, {args.num_samples:,} samples per row, FID against the 50,000 "
            "training images (pytorch-fid's Inception); paper figures: DDIM (Song et al. "
            "2021) Table 1, DDPM (Ho et al. 2020) Table 1.\n")
  table = markdown(results, header)
  path = args.out or os.path.join(args.workdir, "eval", "reproduce_cifar10.md")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(table)
  print(table + f"\nwrote {path}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
