"""CPU speed of ddx's Stable Diffusion VAE against diffusers' AutoencoderKL (torch).

  pip install -e '.[bench]'            # adds torch + diffusers (benchmark only)
  python benchmarks/autoencoder.py --out benchmarks/autoencoder.json

One invocation, same machine, same threads for both frameworks: encode
(images -> posterior mean) and decode (latents -> images) at 256x256 with the
sd-vae-ft-ema / -ft-mse layout (block_out_channels (128, 256, 512, 512), 2
layers per block, 4 latent channels; random weights: speed does not depend
on them). ddx runs float32, jitted, the batch split over one JAX CPU device
per core as `python -m ddx.main` runs; torch gets torch.set_num_threads(cores).
Each number is the best of --reps timed calls after a warm-up call (the
compile). Prints and writes JSON with images/s and ddx / torch ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddx import parallel  # noqa: E402  (before JAX starts: one CPU device per core)


def _best(fn, reps):
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def ddx_times(batch, size, reps):
  """(encode s, decode s, compile s) of ddx.autoencoder at `batch` x size x size."""
  import jax
  import numpy as np
  from ddx import autoencoder as ae_lib
  settings = ae_lib.Settings()
  mesh = parallel.make_mesh()
  params = jax.device_put(ae_lib.init_params(settings, jax.random.key(0)),
                          parallel.replicated(mesh))
  ae = ae_lib.Autoencoder(params=params, settings=settings)
  h, w, c = ae_lib.latent_shape(settings, size)
  rng = np.random.default_rng(0)
  x = jax.device_put(rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32),
                     parallel.data_sharded(mesh))
  z = jax.device_put(rng.standard_normal((batch, h, w, c)).astype(np.float32),
                     parallel.data_sharded(mesh))
  t0 = time.perf_counter()
  ae_lib.encode(ae, x).block_until_ready()
  ae_lib.decode(ae, z).block_until_ready()
  compile_s = time.perf_counter() - t0
  enc = _best(lambda: ae_lib.encode(ae, x).block_until_ready(), reps)
  dec = _best(lambda: ae_lib.decode(ae, z).block_until_ready(), reps)
  return enc, dec, compile_s


def torch_times(batch, size, reps, threads, device="cpu"):
  """(encode s, decode s) of diffusers' AutoencoderKL (float32, eval, no_grad) on
  `device` ("cpu" or "cuda"; each timed call ends with a sync)."""
  import torch
  import diffusers
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = diffusers.AutoencoderKL(
      block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
      down_block_types=("DownEncoderBlock2D",) * 4,
      up_block_types=("UpDecoderBlock2D",) * 4, sample_size=size).to(device).eval()
  x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
  z = torch.randn(batch, 4, size // 8, size // 8, device=device)
  sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
  with torch.no_grad():
    enc = lambda: (model.encode(x).latent_dist.mean, sync())
    dec = lambda: (model.decode(z).sample, sync())
    enc(), dec()    # warm-up
    return _best(enc, reps), _best(dec, reps)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--reps", type=int, default=2)
  p.add_argument("--out", default="")
  args = p.parse_args()
  cores = os.cpu_count() or 1
  parallel.split_cpu_into_devices(args.batch, max_devices=cores)
  import jax
  enc, dec, compile_s = ddx_times(args.batch, args.size, args.reps)
  t_enc, t_dec = torch_times(args.batch, args.size, args.reps, cores)
  ips = lambda s: args.batch / s
  result = {
      "machine": platform.machine(), "cores": cores,
      "jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
      "date": time.strftime("%Y-%m-%d"),
      "layout": "sd-vae-ft-ema/-ft-mse (128, 256, 512, 512), 2 layers, 4 latent channels",
      "batch": args.batch, "image_size": args.size, "reps": args.reps,
      "ddx_float32": {"encode_images_per_s": ips(enc), "decode_images_per_s": ips(dec),
                      "encode_s": enc, "decode_s": dec, "compile_s": compile_s},
      "diffusers_torch": {"threads": cores, "encode_images_per_s": ips(t_enc),
                          "decode_images_per_s": ips(t_dec),
                          "encode_s": t_enc, "decode_s": t_dec},
      "ratio_ddx_over_torch": {"encode": ips(enc) / ips(t_enc),
                               "decode": ips(dec) / ips(t_dec)},
  }
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
