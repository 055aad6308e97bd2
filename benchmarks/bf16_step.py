"""Train-step time with model.dtype = float32 vs bfloat16 on this machine's backend.

  python benchmarks/bf16_step.py [--config configs/digits.py] [--steps 20]

bf16 mixed precision is meant for TPUs and GPUs (bf16 matrix units, half the
activation memory). XLA:CPU has no bf16 arithmetic: it converts to float32
around every op, so expect bf16 to be slower here. Compiles both steps, then
alternates blocks of steps between them (so load from other processes hits
both alike) and reports the median seconds per step, as JSON with --out.
"""
import argparse
import functools
import json
import time


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default="configs/digits.py")
  ap.add_argument("--steps", type=int, default=20, help="timed steps per dtype")
  ap.add_argument("--block", type=int, default=5)
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  import jax
  import numpy as np
  from ddx import config as config_lib, data, train
  from ddx.processes.ddpm import schedules
  from ddx import models

  base = config_lib.from_file(args.config)
  tx = train.make_optimizer(base.optim)
  src = data.make_source(base.data)
  batch = data.get_batch(src, 0, batch_size=base.training.batch_size, seed=0,
                         random_flip=False)
  state0 = jax.jit(functools.partial(train.create_state, base, tx))(
      jax.random.key(0))
  steps, states, compile_s = {}, {}, {}
  for dtype in ("float32", "bfloat16"):
    c = config_lib.from_file(args.config)
    c.model.dtype = dtype
    fn = jax.jit(functools.partial(train.train_step, net=models.build(c.model),
                                   sched=schedules.from_config(c.diffusion), tx=tx,
                                   config=c))
    t0 = time.perf_counter()
    steps[dtype] = fn.lower(state0, batch, jax.random.key(1)).compile()
    compile_s[dtype] = time.perf_counter() - t0
    states[dtype] = jax.block_until_ready(steps[dtype](state0, batch, jax.random.key(1))[0])
  times = {d: [] for d in steps}
  for _ in range(max(1, args.steps // args.block)):
    for dtype, fn in steps.items():
      for _ in range(args.block):
        t0 = time.perf_counter()
        states[dtype], m = fn(states[dtype], batch, jax.random.key(1))
        jax.block_until_ready(m["loss"])
        times[dtype].append(time.perf_counter() - t0)
  res = {"config": args.config, "backend": jax.default_backend(),
         "devices": jax.device_count(), "batch_size": base.training.batch_size,
         **{f"{d}_s_per_step": float(np.median(t)) for d, t in times.items()},
         **{f"{d}_compile_s": round(s, 1) for d, s in compile_s.items()}}
  res["bf16_over_f32"] = res["bfloat16_s_per_step"] / res["float32_s_per_step"]
  print(json.dumps(res, indent=1))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
