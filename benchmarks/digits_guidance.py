"""Classifier-free guidance on class-conditional digits: does the sample match its label?

  python -m ddx.main --config configs/digits_cond.py --workdir runs/digits_cond
  python benchmarks/digits_guidance.py --workdir runs/digits_cond

For each guidance scale w (out = u + w·(c - u); w = 0 is the unconditional
model, w = 1 plain conditional sampling) draws --per_class samples of each
digit 0-9 with ddx.sample_fn and scores them with ddx.evaluation.DigitsMetric:
"agreement" is the fraction whose predicted class (an MLP trained on the first
1,000 scikit-learn digits, held-out accuracy 0.931) is the requested label.
Prints a Markdown table and writes the rows as JSON (--out, default
<workdir>/digits_guidance.json).
"""
import argparse
import json
import os
import time

import numpy as np

from ddx import parallel


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--per_class", type=int, default=100)
  ap.add_argument("--steps", type=int, default=50)
  ap.add_argument("--sampler", default="ddim")
  ap.add_argument("--scales", default="0,1,2,3,5")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  n = 10 * args.per_class
  parallel.split_cpu_into_devices(n)
  import jax
  import jax.numpy as jnp
  import ddx
  from ddx.evaluation import DigitsMetric

  metric = DigitsMetric()
  model = ddx.load(args.workdir)
  if model.config.model.num_classes != 10:
    raise SystemExit(f"{args.workdir} holds an unconditional model; train "
                     "configs/digits_cond.py first")
  labels = jnp.repeat(jnp.arange(10, dtype=jnp.int32), args.per_class)
  rows = []
  for w in (float(s) for s in args.scales.split(",")):
    t0 = time.perf_counter()
    # The same rng for every w: the rows differ only in the guidance.
    imgs = ddx.sample_fn(model, jax.random.key(args.seed), steps=args.steps,
                         sampler=args.sampler, labels=labels, guidance_scale=w)
    u8 = ddx.to_uint8(imgs)
    secs = time.perf_counter() - t0
    pred = metric.features(u8)[1].argmax(1)     # the classifier's logits
    hit = pred == np.asarray(labels)
    per_class = [float(hit[np.asarray(labels) == k].mean()) for k in range(10)]
    row = {"guidance_scale": w, "agreement": round(float(hit.mean()), 4),
           "worst_class": int(np.argmin(per_class)),
           "worst_class_agreement": round(min(per_class), 4),
           **{k: round(v, 4) for k, v in metric.score(u8).items()},
           "seconds": round(secs, 1)}
    rows.append(row)
    print(row, flush=True)
  step = ddx.checkpoint.Checkpointer(args.workdir, read_only=True).latest_step()
  print(f"\n{args.workdir} (step {step}); {args.sampler}-{args.steps}; "
        f"{args.per_class} samples per class; classifier held-out accuracy "
        f"{metric.heldout_accuracy:.3f}\n")
  print("| w | agreement with label | worst class (agreement) | FD | class entropy | s |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['guidance_scale']:g} | {r['agreement']:.3f} | {r['worst_class']} "
          f"({r['worst_class_agreement']:.2f}) | {r['fd']:.2f} | "
          f"{r['class_entropy']:.3f} | {r['seconds']} |")
  out = args.out or os.path.join(args.workdir, "digits_guidance.json")
  with open(out, "w") as f:
    json.dump({"workdir": os.path.abspath(args.workdir), "step": step,
               "sampler": args.sampler, "steps": args.steps,
               "per_class": args.per_class,
               "classifier_heldout_accuracy": metric.heldout_accuracy,
               "rows": rows}, f, indent=1)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
