"""The accelerator-speed measurements of issue 26, in one invocation (< 8 min on an H100/H200).

  pip install -e '.[bench]'
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python benchmarks/gpu_speed.py --out benchmarks/gpu_speed.json
  python benchmarks/gpu_speed.py --quick      # a CPU smoke run: tiny shapes, 1 step, every part

In this order, each part skipped (and recorded as skipped) once --budget_s
seconds have passed, so the most wanted numbers come first:

  unet    the CIFAR-10 U-Net (35.7M), bf16 training at batch 128/256/512 with
          training.remat none and dots;
  dit     DiT-B/2 (32x32x4 latents, 1,000 classes) at batch 256: remat none
          with model.attention xla and cudnn; DiT-XL/2 at batch 256 with remat
          dots and none;
  attn    the U-Net at batch 128 with model.attention=cudnn (its one 256-channel
          head may be beyond cuDNN's head sizes: the error is recorded);
  norm    model.norm_kernel=pallas (each norm in one Pallas kernel): the U-Net
          at batch 128 (GroupNorm+SiLU) and DiT-B/2 at batch 256 (LayerNorm +
          adaLN), and DDPM-1000 sampling after the xla one (a kernel that
          fails to compile records its error);
  sample  DDPM-1000 at batch 256 of the U-Net (bf16), and DiT-XL/2 with
          --dit_sample_steps DDPM steps and guidance 1.5 at batch 32;
  peer    diffusers' UNet2DModel (batch 128) and DiTTransformer2DModel (DiT-B/2,
          batch 256) training under torch.compile, bf16 autocast (compiled in the
          untimed warm-up; the compile time is recorded and a peer starts only
          if --peer_compile_budget_s is left); skipped with a note without
          torch/diffusers, and eager on CPU (torch.compile needs a toolchain);
  vae     the SD VAE's decode (and encode) at 256x256, float32, ddx against
          diffusers' AutoencoderKL on the same device.

MFU = model FLOPs per image x images/s / --peak_tflops (dense bf16; H100/H200
SXM: 989). Model FLOPs are XLA's cost analysis of the remat=none update of the
same model (the fewest per image over the batches measured): a remat update's
own count includes the recomputation (recorded as xla_flops_per_step), so its
MFU still counts only the model's work. Results are written to --out after
every measurement (benchmarks/gpu_latent.recorder) and a table is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import speed  # noqa: E402  (shared measurement helpers)
from gpu_latent import _oom, dit_xl2, latent_dit, recorder, sample_rate, train_rate  # noqa: E402

PARTS = ("unet", "dit", "attn", "norm", "sample", "peer", "vae")


def unet_cifar10(quick: bool):
  """The CIFAR-10 config (DDPM's 35.7M U-Net), bf16, dropout 0; tiny with quick."""
  c = speed._config("cifar10", {"model.dropout": 0.0, "model.dtype": "bfloat16"})
  if quick:
    c.model.update(dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, num_groups=4,
                        attn_resolutions=(16,)))
  return c


def _train(save, model, config, batch, steps, remat="none", attention="xla", norm="xla"):
  """Measures one training configuration; saved as train_<model>_<remat>_<attention>_b<batch>
  (with _norm<norm> before _b for a norm kernel other than xla)."""
  config.training.remat = remat
  config.model.attention = attention
  config.model.norm_kernel = norm
  entry = {"model": model, "batch": batch, "remat": remat, "attention": attention,
           "norm_kernel": norm}
  try:
    s, flops, need = train_rate(config, batch, steps)
  except Exception as e:   # out of memory, or an attention the backend lacks
    entry["error"] = _error(e)
    if _oom(e):
      entry["fits"] = False
    save(train_key(model, remat, attention, batch, norm), entry)
    return
  if s is None:
    entry.update(fits=False, bytes_needed=need)
  else:
    entry.update(steps_per_s=1 / s, images_per_s=batch / s, xla_flops_per_step=flops,
                 bytes_needed=need)
  save(train_key(model, remat, attention, batch, norm), entry)


def _error(e: Exception) -> str:
  """An exception as one short line for the JSON."""
  return f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"


def _ddpm_sample(q: bool, batch: int, steps: int, norm: str = "xla") -> dict:
  """DDPM sampling of the CIFAR-10 U-Net (bf16) with model.norm_kernel=norm."""
  config = unet_cifar10(q)
  config.model.norm_kernel = norm
  model = speed.ddx_model(config)
  compile_s, mem, run_s = speed.ddx_sampler(model, batch, steps, 1, sampler="ddpm")
  return {"batch": batch, "steps": steps, "seconds": run_s, "compile_s": compile_s,
          "memory_bytes": mem}


def train_key(model, remat, attention, batch, norm="xla"):
  kernel = "" if norm == "xla" else f"_norm{norm}"
  return f"train_{model}_{remat}_{attention}{kernel}_b{batch}"


def add_mfu(out: dict, peak_tflops: float) -> None:
  """Adds model_flops_per_image and mfu to every measured training entry of `out`.

  A model's FLOPs per image are the fewest per image of its remat=none
  entries: a remat program's count includes recomputation, and XLA's own
  rematerialisation (under memory pressure) can only add to it too.
  """
  train = [v for k, v in out.items()
           if k.startswith("train_") and isinstance(v, dict) and "steps_per_s" in v]
  per_image = {}
  for v in train:
    if v["remat"] == "none" and v["xla_flops_per_step"]:
      f = v["xla_flops_per_step"] / v["batch"]
      per_image[v["model"]] = min(per_image.get(v["model"], f), f)
  for v in train:
    f = per_image.get(v["model"])
    if f:
      v["model_flops_per_image"] = f
      v["mfu"] = f * v["images_per_s"] / 1e12 / peak_tflops


def markdown(out: dict) -> str:
  """The results as markdown tables (training, then everything else)."""
  lines = [f"Devices: {', '.join(sorted(set(out['devices'])))}; jax {out['jax']}; "
           f"{out['date']}; peak {out['peak_tflops']} TFLOP/s.", "",
           "| training (bf16) | batch | remat | attention | norm kernel | steps/s | images/s | MFU |",
           "|---|---|---|---|---|---|---|---|"]
  for k, v in out.items():
    if not (k.startswith("train_") and isinstance(v, dict)):
      continue
    model = v.get("model", k)
    if "steps_per_s" in v:
      mfu = f"{100 * v['mfu']:.1f}%" if "mfu" in v else "-"
      lines.append(f"| {model} | {v['batch']} | {v['remat']} | {v['attention']} | "
                   f"{v.get('norm_kernel', 'xla')} | "
                   f"{v['steps_per_s']:.2f} | {v['images_per_s']:.0f} | {mfu} |")
    else:
      why = v.get("error") or v.get("skipped") or "does not fit"
      lines.append(f"| {model} | {v.get('batch', '-')} | {v.get('remat', '-')} | "
                   f"{v.get('attention', '-')} | {v.get('norm_kernel', 'xla')} | {why} | | |")
  lines += ["", "| other | result |", "|---|---|"]
  for k, v in out.items():
    if k.startswith(("sample_", "peer_", "vae_")):
      lines.append(f"| {k} | {json.dumps(v)} |")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="")
  ap.add_argument("--quick", action="store_true", help="tiny shapes, 1-2 steps (CPU smoke run)")
  ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
  ap.add_argument("--budget_s", type=float, default=400.0,
                  help="start no measurement after this many seconds (one started "
                       "before it may run ~1 min past it)")
  ap.add_argument("--peer_compile_budget_s", type=float, default=90.0,
                  help="start a torch.compile peer only if this much budget is left")
  ap.add_argument("--train_steps", type=int, default=10)
  ap.add_argument("--dit_sample_steps", type=int, default=50)
  ap.add_argument("--peak_tflops", type=float, default=989.0)
  args = ap.parse_args()
  q = args.quick
  parts = set(args.parts.split(","))
  if parts - set(PARTS):
    raise SystemExit(f"--parts: unknown {sorted(parts - set(PARTS))}; use some of {PARTS}")
  steps = 1 if q else args.train_steps
  big = (2,) if q else (128, 256, 512)       # the U-Net's batches
  if q:
    args.budget_s = float("inf")   # the smoke run is for reaching every part
  dit_batch, sample_batch, ddpm_steps = (4, 2, 4) if q else (256, 256, 1000)
  out, save = recorder(args.out, args.peak_tflops)
  start = time.perf_counter()

  def due(part, key):   # whether to run a measurement now; records a skip otherwise
    if part not in parts:
      return False
    if time.perf_counter() - start > args.budget_s:
      save(key, {"skipped": f"over --budget_s={args.budget_s:.0f}"})
      return False
    return True

  # 1-3. Training: the U-Net by batch x remat, DiT-B/2 by attention, DiT-XL/2 by
  # remat, the U-Net with cuDNN attention.
  runs = [("unet", "unet_cifar10", unet_cifar10, b, remat, "xla")
          for remat in ("none", "dots") for b in big]
  runs += [("dit", "dit_b2", lambda q: latent_dit(768, 12, 12, q), dit_batch, "none", a)
           for a in ("xla", "cudnn")]
  runs += [("dit", "dit_xl2", dit_xl2, dit_batch, remat, "xla") for remat in ("dots", "none")]
  runs += [("attn", "unet_cifar10", unet_cifar10, big[0], "none", "cudnn")]
  runs = [r + ("xla",) for r in runs]
  runs += [("norm", "unet_cifar10", unet_cifar10, big[0], "none", "xla", "pallas"),
           ("norm", "dit_b2", lambda q: latent_dit(768, 12, 12, q), dit_batch, "none", "xla",
            "pallas")]
  for part, model, make, b, remat, attention, norm in runs:
    if due(part, train_key(model, remat, attention, b, norm)):
      _train(save, model, make(q), b, steps, remat, attention, norm)
  add_mfu(out, args.peak_tflops)
  # 4. Sampling.
  if due("sample", "sample_unet_ddpm1000"):
    save("sample_unet_ddpm1000", _ddpm_sample(q, sample_batch, ddpm_steps))
  if "sample" in parts and due("norm", "sample_unet_ddpm1000_normpallas"):
    try:
      entry = _ddpm_sample(q, sample_batch, ddpm_steps, norm="pallas")
    except Exception as e:   # the kernel failed to lower on this backend
      entry = {"error": _error(e)}
    save("sample_unet_ddpm1000_normpallas", entry)
  if due("sample", "sample_dit_xl2"):
    save("sample_dit_xl2", sample_rate(q, 2 if q else 32, 3 if q else args.dit_sample_steps))
  # 5. diffusers peers under torch.compile.
  if "peer" in parts:
    try:
      import diffusers  # noqa: F401
      import torch
    except ImportError as e:
      save("peer", {"skipped": f"torch/diffusers missing ({e})"})
      parts.discard("peer")
  if "peer" in parts:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    compile_ = device == "cuda"   # torch.compile on CPU needs a C++ toolchain run
    from gpu_processes import peer_dit_train
    peers = (("peer_unet2d", lambda: speed.peer_train_time(
                 unet_cifar10(q), big[0], steps, device=device, amp=True, compile_=compile_),
              big[0]),
             ("peer_dit_b2", lambda: peer_dit_train(
                 latent_dit(768, 12, 12, q), dit_batch, steps, device, compile_), dit_batch))
    for key, run, batch in peers:
      left = args.budget_s - (time.perf_counter() - start)
      if compile_ and left < args.peer_compile_budget_s:
        save(key, {"skipped": f"{left:.0f} s of budget left < --peer_compile_budget_s"})
        continue
      if not due("peer", key):
        continue
      t0 = time.perf_counter()
      s = run()
      save(key, {"batch": batch, "steps_per_s": 1 / s, "images_per_s": batch / s,
                 "torch_compile": compile_,
                 # the whole call less the timed steps: model build, warm-up, compile
                 "compile_and_warmup_s": time.perf_counter() - t0 - steps * s,
                 "compile_budget_s": args.peer_compile_budget_s})
  # 6. The SD VAE, ddx against diffusers.
  if due("vae", "vae_sd_256"):
    import autoencoder as ae_bench
    batch, size = (1, 16) if q else (8, 256)
    enc, dec, compile_s = ae_bench.ddx_times(batch, size, 1 if q else 3)
    entry = {"batch": batch, "size": size, "dtype": "float32",
             "ddx_decode_images_per_s": batch / dec, "ddx_encode_images_per_s": batch / enc,
             "ddx_compile_s": compile_s}
    try:
      import torch
      device = "cuda" if torch.cuda.is_available() else "cpu"
      t_enc, t_dec = ae_bench.torch_times(batch, size, 1 if q else 3,
                                          os.cpu_count() or 1, device)
      entry.update(diffusers_decode_images_per_s=batch / t_dec,
                   diffusers_encode_images_per_s=batch / t_enc,
                   decode_ddx_over_diffusers=t_dec / dec)
    except ImportError as e:
      entry["diffusers"] = f"skipped: {e}"
    save("vae_sd_256", entry)
  add_mfu(out, args.peak_tflops)
  out["total_s"] = time.perf_counter() - start
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=2)
  print(markdown(out))


if __name__ == "__main__":
  main()
