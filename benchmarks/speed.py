"""Speed of ddx against a PyTorch peer (diffusers), sampler overhead, compile and memory.

  pip install -e '.[bench]'            # adds torch + diffusers (benchmark only)
  python benchmarks/speed.py --out benchmarks/speed.json

One invocation measures, on this machine, with the same threads for both
frameworks (JAX: one CPU device per core, as `python -m ddx.main` runs; torch:
torch.set_num_threads(cores)):

  1. sampler overhead: time of DDIM with S steps / (S x one jitted forward pass
     at the same batch), S = 10, 50, 250, 1000 (1.00 = no overhead);
  2. compile time and XLA's memory estimate of the sampler program as S grows;
  3. training throughput (images/s, after compile) of the digits default and
     of the DDPM CIFAR-10 U-Net (35.7M params) at a CPU-sized batch;
  4. the same training step and DDIM sampling in PyTorch with diffusers'
     UNet2DModel at the matching architecture, reported as ddx / peer.

Weights are random (speed does not depend on them) and data are synthetic.
Prints Markdown tables; --out writes every number as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddx import parallel  # noqa: E402  (before JAX starts: one CPU device per core)

# The two workloads: (name, config name, overrides, train batch, sample batch, DDIM steps)
WORKLOADS = {
    "digits": dict(config="digits", overrides={}, train_batch=128, sample_batch=128,
                   sample_steps=50, train_steps=20),
    "cifar10": dict(config="cifar10", overrides={"model.dropout": 0.0}, train_batch=8,
                    sample_batch=8, sample_steps=10, train_steps=4),
}
OVERHEAD_STEPS = (10, 50, 250, 1000)


def _config(name, overrides):
  from ddx import config as config_lib
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = config_lib.from_file(os.path.join(root, "configs", f"{name}.py"))
  for key, value in overrides.items():
    group, field = key.split(".")
    config[group][field] = value
  return config


def _best(fn, reps):
  """Median wall time of fn() over reps calls (fn blocks until done)."""
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


# --------------------------------------------------------------------------
# ddx


def ddx_model(config, seed=0):
  import jax
  from ddx import config as config_lib, model as model_lib
  variables = model_lib.init_variables(config, jax.random.key(seed))
  return model_lib.Model(variables, config_lib.freeze(config))


def ddx_forward_time(model, batch, reps):
  """One jitted network call at `batch`, sharded over the devices as the sampler is."""
  import jax
  import jax.numpy as jnp
  from ddx import model as model_lib
  mesh = parallel.make_mesh()
  x = jax.device_put(jnp.zeros((batch,) + model.image_shape), parallel.data_sharded(mesh))
  i = jnp.full((batch,), 500, jnp.int32)

  @jax.jit
  def fwd(model, x, i):
    return model_lib.denoiser(model)(x, i)

  fwd(model, x, i).block_until_ready()
  return _best(lambda: fwd(model, x, i).block_until_ready(), reps)


def ddx_sampler(model, batch, steps, reps, sampler="ddim"):
  """Compile seconds, XLA memory estimate and run seconds of `sampler` with `steps`."""
  import jax
  from ddx import model as model_lib
  from ddx import options as options_lib
  rng = jax.random.key(0)
  options = options_lib.resolve(model.config).override(num_samples=batch, steps=steps,
                                                        sampler=sampler, eta=0.0)
  t0 = time.perf_counter()
  compiled = model_lib.sample_jit.lower(model, rng, None, None,
                                        model_lib.traced_options(options),
                                        guided=False).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  mem_bytes = None if mem is None else int(mem.temp_size_in_bytes + mem.output_size_in_bytes
                                           + mem.argument_size_in_bytes)
  run = lambda: model_lib.sample_fn(model, rng, steps=steps, num_samples=batch,
                                   sampler=sampler, eta=0.0).block_until_ready()
  run()
  return compile_s, mem_bytes, _best(run, reps)


def ddx_train_time(config, batch, steps):
  """Seconds per train step (after compile) of the real jitted train_step."""
  import jax
  import numpy as np
  from ddx import config as config_lib, train
  config.training.batch_size = batch
  mesh = parallel.make_mesh()
  setup = train.make_setup(config, mesh)     # what training compiles
  state, step = setup.init(jax.random.key(0)), setup.step
  shape = (batch,) + config_lib.image_shape(config)
  images = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
  b = parallel.global_batch({"image": images, "label": np.zeros((batch,), np.int32)}, mesh)
  rng = jax.random.key(1)
  for _ in range(2):  # compile + one warm step
    state, m = step(state, b, rng)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, b, rng)
  jax.block_until_ready((state, m))
  return (time.perf_counter() - t0) / steps


# --------------------------------------------------------------------------
# PyTorch peer: diffusers UNet2DModel + DDIMScheduler


def peer_unet(config):
  """diffusers' UNet2DModel laid out like ddx's U-Net for this config."""
  from diffusers import UNet2DModel
  m, d = config.model, config.data
  levels = len(m.ch_mult)
  res = [d.image_size // 2 ** i for i in range(levels)]
  down = tuple("AttnDownBlock2D" if r in m.attn_resolutions else "DownBlock2D" for r in res)
  up = tuple("AttnUpBlock2D" if r in m.attn_resolutions else "UpBlock2D"
             for r in reversed(res))
  return UNet2DModel(
      sample_size=d.image_size, in_channels=d.channels, out_channels=d.channels,
      layers_per_block=m.num_res_blocks,
      block_out_channels=tuple(m.ch * k for k in m.ch_mult),
      down_block_types=down, up_block_types=up, norm_num_groups=m.num_groups,
      dropout=m.dropout, attention_head_dim=None, norm_eps=1e-6, downsample_padding=0,
      flip_sin_to_cos=False, freq_shift=1)


def _torch_sync(device):
  import torch
  if device.startswith("cuda"):
    torch.cuda.synchronize()


def _autocast(device, amp):
  """bf16 autocast on `device` when amp (mixed precision, as ddx's model.dtype)."""
  import contextlib
  import torch
  if not amp:
    return contextlib.nullcontext()
  return torch.autocast(device.split(":")[0], dtype=torch.bfloat16)


def peer_train_time(config, batch, steps, device="cpu", amp=False, compile_=False):
  """Seconds per step of the same update in PyTorch: ε-MSE, clip, Adam, EMA.

  The loss is not fetched per step (as ddx's loop does not): one sync at the end.
  compile_ runs the network under torch.compile (compiled in the untimed warm-up).
  """
  import copy
  import torch
  net = peer_unet(config).to(device).train()
  ema = copy.deepcopy(net).eval()
  fwd = torch.compile(net) if compile_ else net
  opt = torch.optim.Adam(net.parameters(), lr=config.optim.lr)
  shape = (batch, config.data.channels, config.data.image_size, config.data.image_size)
  x0 = torch.rand(shape, device=device) * 2 - 1
  ab = torch.linspace(0.999, 0.01, 1000, device=device)

  def one():
    t = torch.randint(0, 1000, (batch,), device=device)
    noise = torch.randn_like(x0)
    a = ab[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    with _autocast(device, amp):
      out = fwd(xt, t).sample
    loss = torch.nn.functional.mse_loss(out.float(), noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), config.optim.grad_clip)
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 0.001)
    return loss

  for _ in range(2):
    one()
  _torch_sync(device)
  t0 = time.perf_counter()
  for _ in range(steps):
    loss = one()
  float(loss.detach())
  _torch_sync(device)
  return (time.perf_counter() - t0) / steps


def peer_forward_and_sample_time(config, batch, steps, reps, device="cpu", amp=False,
                                 sample_reps=None):
  import torch
  from diffusers import DDIMScheduler
  net = peer_unet(config).to(device).eval()
  sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                        clip_sample=True)
  shape = (batch, config.data.channels, config.data.image_size, config.data.image_size)
  x = torch.randn(shape, device=device)
  t = torch.full((batch,), 500, device=device)

  @torch.no_grad()
  def fwd():
    with _autocast(device, amp):
      y = net(x, t).sample
    _torch_sync(device)
    return y

  @torch.no_grad()
  def sample():
    sched.set_timesteps(steps)
    y = torch.randn(shape, device=device)
    for ti in sched.timesteps:
      with _autocast(device, amp):
        eps = net(y, ti).sample
      y = sched.step(eps.float(), ti, y, eta=0.0).prev_sample
    _torch_sync(device)
    return y

  fwd()
  sample()
  return _best(fwd, reps), _best(sample, sample_reps or max(1, reps // 3))


# --------------------------------------------------------------------------


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="", help="write all numbers to this JSON file")
  ap.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
  ap.add_argument("--no_peer", action="store_true", help="skip the PyTorch peer")
  args = ap.parse_args()
  cores = os.cpu_count() or 1
  parallel.split_cpu_into_devices(128, max_devices=cores)
  import jax
  jax.config.update("jax_enable_compilation_cache", False)  # measure real compiles
  reps = 2 if args.quick else 5
  out = {"machine": platform.processor() or platform.machine(), "cores": cores,
         "python": platform.python_version(), "jax": jax.__version__,
         "devices": [str(d) for d in jax.devices()],
         "date": time.strftime("%Y-%m-%d"), "workloads": {}}
  if not args.no_peer:
    import torch
    import diffusers
    torch.set_num_threads(cores)
    out.update(torch=torch.__version__, diffusers=diffusers.__version__,
               torch_threads=torch.get_num_threads())

  # 1 + 2: sampler overhead, compile and memory vs steps (digits model).
  config = _config("digits", {})
  model = ddx_model(config)
  batch = WORKLOADS["digits"]["sample_batch"]
  fwd = ddx_forward_time(model, batch, reps * 4)
  rows = []
  for s in OVERHEAD_STEPS if not args.quick else (10, 50):
    compile_s, mem, run_s = ddx_sampler(model, batch, s, reps if s <= 50 else 1)
    rows.append({"steps": s, "seconds": run_s, "overhead": run_s / (s * fwd),
                 "compile_s": compile_s, "memory_bytes": mem})
    print(f"sampler S={s}: {run_s:.3f} s, overhead {run_s / (s * fwd):.3f}, "
          f"compile {compile_s:.1f} s, memory {mem}", flush=True)
  out["sampler"] = {"batch": batch, "forward_s": fwd, "rows": rows}

  # 3 + 4: training and sampling throughput, ddx vs peer.
  for name, w in WORKLOADS.items():
    config = _config(w["config"], w["overrides"])
    res = {"train_batch": w["train_batch"], "sample_batch": w["sample_batch"],
           "sample_steps": w["sample_steps"]}
    train_steps = 2 if args.quick else w["train_steps"]
    res["ddx_train_s"] = ddx_train_time(config, w["train_batch"], train_steps)
    model = ddx_model(config)
    res["ddx_params"] = sum(x.size for x in jax.tree.leaves(model.variables["params"]))
    res["ddx_forward_s"] = ddx_forward_time(model, w["sample_batch"], reps)
    _, _, res["ddx_sample_s"] = ddx_sampler(model, w["sample_batch"], w["sample_steps"],
                                            max(1, reps // 2))
    if not args.no_peer:
      res["peer_params"] = sum(p.numel() for p in peer_unet(config).parameters())
      res["peer_train_s"] = peer_train_time(config, w["train_batch"], train_steps)
      res["peer_forward_s"], res["peer_sample_s"] = peer_forward_and_sample_time(
          config, w["sample_batch"], w["sample_steps"], reps)
    out["workloads"][name] = res
    print(name, json.dumps(res), flush=True)

  print(markdown(out))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=2)


def markdown(out) -> str:
  lines = [f"Machine: {out['machine']}, {out['cores']} cores; jax {out['jax']} "
           f"({len(out['devices'])} CPU devices)"
           + (f", torch {out['torch']} ({out['torch_threads']} threads), diffusers "
              f"{out['diffusers']}" if "torch" in out else "") + f"; {out['date']}.", ""]
  s = out["sampler"]
  lines += [f"Sampler overhead (digits U-Net, batch {s['batch']}, one jitted forward = "
            f"{s['forward_s'] * 1e3:.1f} ms):", "",
            "| DDIM steps S | seconds | overhead = time / (S x forward) | compile s | "
            "XLA memory estimate |", "|---|---|---|---|---|"]
  for r in s["rows"]:
    mem = "n/a" if r["memory_bytes"] is None else f"{r['memory_bytes'] / 2**20:.1f} MiB"
    lines.append(f"| {r['steps']} | {r['seconds']:.2f} | {r['overhead']:.3f} | "
                 f"{r['compile_s']:.1f} | {mem} |")
  lines += ["", "| workload | params ddx / peer | train images/s ddx | peer | ratio | "
            "sample images/s ddx | peer | ratio |", "|---|---|---|---|---|---|---|---|"]
  for name, r in out["workloads"].items():
    tr = r["train_batch"] / r["ddx_train_s"]
    sa = r["sample_batch"] / r["ddx_sample_s"]
    if "peer_train_s" in r:
      ptr, psa = r["train_batch"] / r["peer_train_s"], r["sample_batch"] / r["peer_sample_s"]
      lines.append(f"| {name} (train batch {r['train_batch']}, DDIM-{r['sample_steps']} "
                   f"batch {r['sample_batch']}) | {r['ddx_params']:,} / {r['peer_params']:,} "
                   f"| {tr:.1f} | {ptr:.1f} | {tr / ptr:.2f} | {sa:.2f} | {psa:.2f} | "
                   f"{sa / psa:.2f} |")
    else:
      lines.append(f"| {name} | {r['ddx_params']:,} / - | {tr:.1f} | - | - | {sa:.2f} | - | - |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
