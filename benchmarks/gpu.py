"""The accelerator benchmark: DDPM CIFAR-10 U-Net training and sampling on one GPU.

  pip install -e '.[bench]'     # torch + diffusers for the peer (benchmark only)
  python benchmarks/gpu.py --out benchmarks/gpu.json

What it measures (issue 8's GPU list), ddx against diffusers' UNet2DModel at the
same layout (35,746,307 parameters on both sides), in one invocation:

  1. the training step (ε-MSE, grad clip, Adam, EMA) at batch 128, float32 and
     bfloat16 (ddx: model.dtype=bfloat16; peer: torch.autocast bf16), steps/s;
  2. DDIM-50 sampling at batch 256, float32 and bfloat16, images/s, and the
     sampler overhead (time / (50 x one jitted forward pass at batch 256));
  3. DDPM ancestral sampling with 1,000 steps at batch 256, against the DDPM
     paper's 17 s on a TPU v3-8 (and its 21 train steps/s at batch 128).

Each framework runs at its own default precision settings (the JSON records
them). Results are written to --out after every measurement, so a run that is
cut short keeps what it finished. --budget_s skips the optional 1,000-step
sampling of whichever dtype would start after that many seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import speed  # noqa: E402  (the shared ddx and peer measurement functions)

TRAIN_BATCH, SAMPLE_BATCH, DDIM_STEPS, DDPM_STEPS = 128, 256, 50, 1000
PAPER = {"train_steps_per_s": 21.0, "ddpm_1000_batch_256_s": 17.0,
         "hardware": "TPU v3-8 (Ho et al. 2020, Appendix B)"}


def _config(dtype):
  return speed._config("cifar10", {"model.dropout": 0.0, "model.dtype": dtype})


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="", help="write all numbers to this JSON file")
  ap.add_argument("--no_peer", action="store_true", help="skip the PyTorch peer")
  ap.add_argument("--quick", action="store_true",
                  help="tiny batches and step counts (a smoke run of this script)")
  ap.add_argument("--budget_s", type=float, default=420.0,
                  help="skip the 1,000-step sampling of a dtype after this many seconds")
  args = ap.parse_args()
  start = time.perf_counter()
  import jax
  tb, sb, ds, ps = TRAIN_BATCH, SAMPLE_BATCH, DDIM_STEPS, DDPM_STEPS
  train_steps, reps = 20, 3
  if args.quick:
    tb, sb, ds, ps, train_steps, reps = 2, 2, 3, 4, 2, 1
  out = {"jax": jax.__version__, "devices": [d.device_kind for d in jax.devices()],
         "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
         "train_batch": tb, "sample_batch": sb, "ddim_steps": ds, "ddpm_steps": ps,
         "paper": PAPER, "precision": {
             "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision)},
         "ddx": {}, "peer": {}}
  peer_device = None
  if not args.no_peer:
    import diffusers
    import torch
    peer_device = "cuda" if torch.cuda.is_available() else "cpu"
    out.update(torch=torch.__version__, diffusers=diffusers.__version__,
               peer_device=(torch.cuda.get_device_name() if peer_device == "cuda"
                            else "cpu"))
    out["precision"].update(
        torch_matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        torch_cudnn_allow_tf32=torch.backends.cudnn.allow_tf32)

  def save(what, key, value):
    out[what][key] = value
    print(f"[{time.perf_counter() - start:6.1f} s] {what} {key}: {json.dumps(value)}",
          flush=True)
    if args.out:
      with open(args.out, "w") as f:
        json.dump(out, f, indent=2)

  dtypes = ("float32", "bfloat16")
  for dtype in dtypes:   # 1. ddx training step
    config = _config(dtype)
    s = speed.ddx_train_time(config, tb, train_steps)
    save("ddx", f"train_{dtype}", {"s_per_step": s, "steps_per_s": 1 / s,
                                   "images_per_s": tb / s})
  if peer_device:         # 1. peer training step
    for dtype in dtypes:
      s = speed.peer_train_time(_config(dtype), tb, train_steps, device=peer_device,
                                amp=dtype == "bfloat16")
      save("peer", f"train_{dtype}", {"s_per_step": s, "steps_per_s": 1 / s,
                                      "images_per_s": tb / s})
  for dtype in dtypes:   # 2. DDIM-50 at batch 256 and the sampler overhead
    model = speed.ddx_model(_config(dtype))
    fwd = speed.ddx_forward_time(model, sb, reps * 3)
    compile_s, mem, run_s = speed.ddx_sampler(model, sb, ds, reps)
    save("ddx", f"ddim_{dtype}", {"seconds": run_s, "images_per_s": sb / run_s,
                                  "forward_s": fwd, "overhead": run_s / (ds * fwd),
                                  "compile_s": compile_s, "memory_bytes": mem})
  if peer_device:
    for dtype in dtypes:
      fwd, run_s = speed.peer_forward_and_sample_time(
          _config(dtype), sb, ds, reps * 3, device=peer_device,
          amp=dtype == "bfloat16", sample_reps=reps)
      save("peer", f"ddim_{dtype}", {"seconds": run_s, "images_per_s": sb / run_s,
                                     "forward_s": fwd})
  for dtype in ("bfloat16", "float32"):   # 3. DDPM-1000 (optional, budgeted)
    if time.perf_counter() - start > args.budget_s:
      save("ddx", f"ddpm_{dtype}", {"skipped": "over --budget_s"})
      continue
    model = speed.ddx_model(_config(dtype))
    compile_s, _, run_s = speed.ddx_sampler(model, sb, ps, 1, sampler="ddpm")
    save("ddx", f"ddpm_{dtype}", {"seconds": run_s, "images_per_s": sb / run_s,
                                  "compile_s": compile_s})
  out["total_s"] = time.perf_counter() - start
  print(markdown(out))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=2)


def markdown(out) -> str:
  """BENCHMARKS.md's GPU tables from the JSON this script writes."""
  d, p = out["ddx"], out["peer"]
  lines = [f"Device: {', '.join(sorted(set(out['devices'])))}; jax {out['jax']}"
           + (f", torch {out['torch']}, diffusers {out['diffusers']}" if "torch" in out
              else "") + f"; {out['date']}.", "",
           "| workload | dtype | ddx | peer | ddx / peer |", "|---|---|---|---|---|"]

  def row(name, key, field, unit, fmt="{:.1f}"):
    for dtype in ("float32", "bfloat16"):
      a = d.get(f"{key}_{dtype}", {}).get(field)
      b = p.get(f"{key}_{dtype}", {}).get(field)
      if a is None:
        continue
      ratio = f"{a / b:.2f}" if b else "-"
      lines.append(f"| {name} | {dtype} | {fmt.format(a)} {unit} | "
                   f"{fmt.format(b) + ' ' + unit if b else '-'} | {ratio} |")

  row(f"train step, batch {out['train_batch']}", "train", "steps_per_s", "steps/s")
  row(f"train step, batch {out['train_batch']}", "train", "images_per_s", "images/s", "{:.0f}")
  row(f"DDIM-{out['ddim_steps']}, batch {out['sample_batch']}", "ddim", "images_per_s",
      "images/s", "{:.0f}")
  lines += ["", "| ddx | float32 | bfloat16 |", "|---|---|---|"]
  for field, name in (("forward_s", "one forward, batch {sb} (ms)"),
                      ("overhead", "sampler overhead, DDIM-{ds}"),
                      ("compile_s", "sampler compile (s)")):
    vals = [d.get(f"ddim_{t}", {}).get(field) for t in ("float32", "bfloat16")]
    scale = 1e3 if field == "forward_s" else 1
    lines.append(f"| {name.format(sb=out['sample_batch'], ds=out['ddim_steps'])} | "
                 + " | ".join("-" if v is None else f"{v * scale:.3f}" for v in vals) + " |")
  vals = [d.get(f"ddpm_{t}", {}).get("seconds") for t in ("float32", "bfloat16")]
  lines.append(f"| DDPM-{out['ddpm_steps']}, batch {out['sample_batch']} (s; paper: "
               f"{out['paper']['ddpm_1000_batch_256_s']:.0f} s on TPU v3-8) | "
               + " | ".join("-" if v is None else f"{v:.1f}" for v in vals) + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
