"""The GPU measurements of the EDM/flow and DiT issues, in one invocation.

  pip install -e '.[bench]'
  python benchmarks/gpu_processes.py --out benchmarks/gpu_processes.json
  python benchmarks/gpu_processes.py --quick     # a CPU smoke run of this script

1. EDM's CIFAR-10 sampler, Heun with 18 steps (35 network evaluations), on the
   CIFAR-10 U-Net at batch 256, float32 and bfloat16: images/s.
2. Training steps/s and model FLOPs utilisation at batch 128 in bfloat16 for
   DiT-B/2 (32x32x4 latents, 1,000 classes, the paper's setting) and the
   CIFAR-10 U-Net. FLOPs come from XLA's cost analysis of the compiled update
   (what `metrics.jsonl` logs as flops_per_image); MFU divides the achieved
   rate by --peak_tflops (H100 SXM dense bf16: 989).
3. DiT-B/2 against diffusers' DiTTransformer2DModel at the same size: one
   AdamW training step on the same batch, torch eager and torch.compile,
   bfloat16 autocast.

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
from gpu_latent import latent_dit, recorder, train_rate  # noqa: E402  (shared with the latent issue)


def _dit_b2(quick: bool):
  return latent_dit(768, 12, 12, quick)


def peer_dit_train(config, batch, steps, device, compile_):
  """Seconds per AdamW step of diffusers' DiTTransformer2DModel (bf16 autocast)."""
  import torch
  from diffusers import DiTTransformer2DModel
  m = config.model
  net = DiTTransformer2DModel(
      num_attention_heads=m.num_heads, attention_head_dim=m.hidden_size // m.num_heads,
      in_channels=config.data.channels, out_channels=2 * config.data.channels,
      num_layers=m.depth, patch_size=m.patch_size, sample_size=config.data.image_size,
      num_embeds_ada_norm=m.num_classes).to(device)
  opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.0)
  x = torch.randn(batch, config.data.channels, config.data.image_size,
                  config.data.image_size, device=device)
  t = torch.randint(0, 1000, (batch,), device=device)
  y = torch.randint(0, m.num_classes, (batch,), device=device)

  def step():
    with torch.autocast(device, dtype=torch.bfloat16):
      out = net(x, timestep=t, class_labels=y).sample[:, :config.data.channels]
      loss = torch.nn.functional.mse_loss(out.float(), x)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
  fn = torch.compile(step) if compile_ else step
  for _ in range(3):
    fn()
  speed._torch_sync(device)
  t0 = time.perf_counter()
  for _ in range(steps):
    fn()
  speed._torch_sync(device)
  return (time.perf_counter() - t0) / steps


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="")
  ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
  ap.add_argument("--no_peer", action="store_true")
  ap.add_argument("--parts", default="heun,train,peer_eager,peer_compile",
                  help="which measurements to run, comma-separated: heun, train (or train_dit_b2, train_unet_cifar10), peer_eager, peer_compile")
  ap.add_argument("--peak_tflops", type=float, default=989.0,
                  help="the chip's dense bf16 peak, for MFU (H100 SXM: 989; H200: 989)")
  args = ap.parse_args()
  import jax
  start = time.perf_counter()
  q = args.quick
  sample_batch, heun_steps, train_batch, train_steps = (
      (2, 3, 2, 2) if q else (256, 18, 128, 20))
  out, save = recorder(args.out, args.peak_tflops)

  import ddx
  parts = set(args.parts.split(","))
  for dtype in ("float32", "bfloat16") if "heun" in parts else ():   # 1. EDM Heun-18
    c = speed._config("cifar10", {"model.dropout": 0.0, "model.dtype": dtype,
                                  "diffusion.process": "edm"})
    model = speed.ddx_model(c)
    run = lambda: ddx.sample_fn(model, jax.random.key(0), steps=heun_steps,
                                sampler="heun", num_samples=sample_batch,
                                clip_x0=False).block_until_ready()
    t0 = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t0
    s = speed._best(run, 1 if q else 3)
    save(f"edm_heun{heun_steps}_{dtype}", {"seconds": s, "images_per_s": sample_batch / s,
                                          "nfe": 2 * heun_steps - 1, "compile_s": compile_s})
  unet = speed._config("cifar10", {"model.dropout": 0.0, "model.dtype": "bfloat16"})
  trains = (("dit_b2", _dit_b2(q)), ("unet_cifar10", unet))
  for name, config in [t for t in trains if {"train", f"train_{t[0]}"} & parts]:   # 2. steps/s, MFU
    s, flops, _ = train_rate(config, train_batch, train_steps)
    save(f"train_{name}_bf16", {"steps_per_s": 1 / s, "flops_per_step": flops,
                                "tflops_per_s": flops / s / 1e12,
                                "mfu": flops / s / 1e12 / args.peak_tflops})
  if not args.no_peer:                    # 3. diffusers DiT-B/2, eager and compiled
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for compile_ in (False, True):
      if f"peer_{'compile' if compile_ else 'eager'}" not in parts:
        continue
      if compile_ and device == "cpu":
        continue   # torch.compile on CPU needs a C++ toolchain run; GPU only
      s = peer_dit_train(_dit_b2(q), train_batch, train_steps, device, compile_)
      save(f"peer_dit_b2_bf16_{'compile' if compile_ else 'eager'}", {"steps_per_s": 1 / s})
  out["total_s"] = time.perf_counter() - start
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  main()
