"""The GPU measurements of the latent-diffusion issue: DiT-XL/2 at 256x256, in one invocation.

  pip install -e '.[bench]'
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python benchmarks/gpu_latent.py --out benchmarks/gpu_latent.json
  python benchmarks/gpu_latent.py --quick     # a CPU smoke run of this script

1. Sampling: DiT-XL/2 (the official 256x256 model's shape: 32x32x4 latents,
   1,000 classes, learned sigma) with 250 ancestral DDPM steps and
   classifier-free guidance 1.5 (two network evaluations per step, batched
   together), bfloat16 compute, random weights: latents/s at --sample_batch,
   compile time apart.
2. Training: the real jitted update (ε-MSE, AdamW, EMA) of DiT-XL/2 in bfloat16
   at the largest batch of --train_batches that fits in memory, steps/s and
   model FLOPs utilisation (FLOPs from XLA's cost analysis of the update, as
   `metrics.jsonl` logs them; MFU against --peak_tflops, H100 SXM dense bf16 989).

Results are written to --out after every measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import speed  # noqa: E402  (shared measurement helpers)


def latent_dit(hidden_size: int, depth: int, num_heads: int, quick: bool):
  """The run config of a DiT/2 on 32x32x4 latents, 1,000 classes, learned sigma,
  bf16, DiT's optimiser and sampling settings (random init; the network sees
  the latents as its images)."""
  c = speed._config("cifar10", {"model.dropout": 0.0})
  c.model.name = "dit"
  c.model.update(dict(patch_size=2, hidden_size=hidden_size, depth=depth,
                      num_heads=num_heads, mlp_ratio=4.0, num_classes=1000,
                      learn_sigma=True, dtype="bfloat16"))
  c.data.image_size, c.data.channels = 32, 4
  c.training.label_dropout = 0.1
  c.optim.weight_decay = 0.0
  c.optim.ema_decay = 0.9999
  c.sampling.update(dict(sampler="ddpm", clip_x0=False, ddpm_variance="beta"))
  if quick:
    c.model.update(dict(hidden_size=64, depth=2, num_heads=2))
    c.data.image_size = 8
  return c


def dit_xl2(quick: bool):
  return latent_dit(1152, 28, 16, quick)


def recorder(path: str, peak_tflops: float):
  """(out, save): the results dict (machine, date, peak) and save(key, value),
  which prints the value with the elapsed time and rewrites `path` (if any), so
  a run cut short keeps what it finished."""
  import jax
  start = time.perf_counter()
  out = {"jax": jax.__version__, "devices": [d.device_kind for d in jax.devices()],
         "date": time.strftime("%Y-%m-%d"), "peak_tflops": peak_tflops}

  def save(key, value):
    out[key] = value
    print(f"[{time.perf_counter() - start:6.1f} s] {key}: {json.dumps(value)}", flush=True)
    if path:
      with open(path, "w") as f:
        json.dump(out, f, indent=2)
  return out, save


def _oom(e: BaseException) -> bool:
  s = str(e)
  return "RESOURCE_EXHAUSTED" in s or "Out of memory" in s or "out of memory" in s


def compiled_train_step(config, batch: int):
  """(compiled update, (state, batch, key, teacher), lowered) of the run's real
  jitted update (`ddx.train.make_setup`) at `batch`, on random images and
  labels; the compiled update takes those four arguments (teacher: None
  without training.teacher)."""
  import jax
  import numpy as np
  from ddx import config as config_lib, parallel, train
  config.training.batch_size = batch
  mesh = parallel.make_mesh()
  setup = train.make_setup(config, mesh)
  state = setup.init(jax.random.key(0))
  shape = (batch,) + config_lib.image_shape(config)
  rng = np.random.default_rng(0)
  b = parallel.global_batch({"image": rng.standard_normal(shape).astype(np.float32),
                             "label": rng.integers(0, max(config.model.num_classes, 1),
                                                   batch).astype(np.int32)}, mesh)
  key = jax.random.key(1)
  lowered = setup.step.lower(state, b, key)
  return lowered.compile(), (state, b, key, setup.teacher), lowered


def train_rate(config, batch: int, steps: int):
  """(seconds per step, FLOPs per step, bytes needed) of the real jitted update.

  Compiled once ahead of time: the program's memory analysis decides whether
  it fits (None seconds when it does not) before anything runs; FLOPs are
  XLA's cost analysis of the compiled update (what metrics.jsonl logs).
  """
  import jax
  compiled, (state, b, key, teacher), lowered = compiled_train_step(config, batch)
  cost = compiled.cost_analysis() or lowered.cost_analysis()   # GPU: the compiled one's
  cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
  flops = float(cost.get("flops", 0.0))
  mem = compiled.memory_analysis()
  need = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
          - mem.alias_size_in_bytes) if mem is not None else 0
  limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 0)
  if limit and need > limit:
    return None, flops, need
  for _ in range(2):
    state, m = compiled(state, b, key, teacher)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = compiled(state, b, key, teacher)
  jax.block_until_ready((state, m))
  return (time.perf_counter() - t0) / steps, flops, need


def sample_rate(q: bool, n: int, steps: int) -> dict:
  """DiT-XL/2 sampling with guidance 1.5: seconds and rates at batch n."""
  import jax
  import numpy as np
  import ddx
  config = dit_xl2(q)
  model = speed.ddx_model(config)
  labels = np.arange(n, dtype=np.int32) % config.model.num_classes
  run = lambda: ddx.sample_fn(model, jax.random.key(0), steps=steps, num_samples=n,
                              labels=labels, guidance_scale=1.5).block_until_ready()
  t0 = time.perf_counter()
  latents = run()
  compile_s = time.perf_counter() - t0
  s = speed._best(run, 1 if q else 2)
  return {"batch": n, "steps": steps, "seconds": s, "latents_per_s": n / s,
          "network_evals_per_s": 2 * n * steps / s, "compile_and_first_s": compile_s,
          "finite": bool(np.isfinite(np.asarray(latents)).all())}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="")
  ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
  ap.add_argument("--sample_batch", type=int, default=32)
  ap.add_argument("--sample_steps", type=int, default=250)
  ap.add_argument("--train_batches", default="256,128,64")
  ap.add_argument("--train_steps", type=int, default=10)
  ap.add_argument("--peak_tflops", type=float, default=989.0)
  args = ap.parse_args()
  q = args.quick
  if q:
    args.sample_batch, args.sample_steps, args.train_batches, args.train_steps = 2, 3, "4,2", 2
  start = time.perf_counter()
  out, save = recorder(args.out, args.peak_tflops)

  # 1. Sampling (its model freed before training measures memory).
  save("sample_dit_xl2_ddpm250_cfg1.5_bf16", sample_rate(q, args.sample_batch,
                                                        args.sample_steps))

  # 2. Training at the largest batch that fits.
  for batch in [int(b) for b in args.train_batches.split(",")]:
    try:
      s, flops, need = train_rate(dit_xl2(q), batch, args.train_steps)
    except Exception as e:
      if not _oom(e):
        raise
      s, flops, need = None, 0.0, -1
    if s is None:
      save(f"train_dit_xl2_bf16_b{batch}", {"fits": False, "bytes_needed": need})
      continue
    save(f"train_dit_xl2_bf16_b{batch}",
         {"batch": batch, "steps_per_s": 1 / s, "images_per_s": batch / s,
          "flops_per_step": flops, "tflops_per_s": flops / s / 1e12,
          "mfu": flops / s / 1e12 / args.peak_tflops, "bytes_needed": need})
    break
  out["total_s"] = time.perf_counter() - start
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  main()
