"""Train-step time of MeanFlow against flow matching on the same network and batch.

  python benchmarks/meanflow_step.py [--steps 20] [--out meanflow_step.json]

A MeanFlow step is a forward with one jvp (the target's total derivative)
and one backward; a flow step is a forward and a backward. Builds both runs'
updates with the trainer (configs/digits_flow.py and configs/digits_meanflow.py:
the digits U-Net, batch 128), compiles them, then alternates blocks of steps
between them (so load from other processes hits both alike) and reports the
median seconds per step and their ratio, as JSON with --out.
"""
import argparse
import json
import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=20, help="timed steps per process")
  ap.add_argument("--block", type=int, default=5)
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  import jax
  import numpy as np
  from ddx import config as config_lib, data, parallel, train

  setups, states, compile_s = {}, {}, {}
  batch = None
  for name in ("flow", "meanflow"):
    c = config_lib.from_file(os.path.join(ROOT, "configs", f"digits_{name}.py"))
    config_lib.validate(c)
    if batch is None:
      src = data.make_source(c.data)
      batch = data.get_batch(src, 0, batch_size=c.training.batch_size, seed=0,
                             random_flip=False)
    setups[name] = train.make_setup(c, parallel.make_mesh(devices=jax.devices()[:1]))
    state = setups[name].init(jax.random.key(0))
    t0 = time.perf_counter()
    state, m = setups[name].step(state, batch, jax.random.key(1))
    jax.block_until_ready(m["loss"])
    compile_s[name] = time.perf_counter() - t0
    states[name] = state
  times = {n: [] for n in setups}
  for _ in range(max(1, args.steps // args.block)):
    for name, setup in setups.items():
      for _ in range(args.block):
        t0 = time.perf_counter()
        states[name], m = setup.step(states[name], batch, jax.random.key(1))
        jax.block_until_ready(m["loss"])
        times[name].append(time.perf_counter() - t0)
  res = {"backend": jax.default_backend(), "devices": jax.device_count(),
         "batch_size": int(batch["image"].shape[0]),
         **{f"{n}_s_per_step": float(np.median(t)) for n, t in times.items()},
         **{f"{n}_first_step_s": round(s, 1) for n, s in compile_s.items()}}
  res["meanflow_over_flow"] = res["meanflow_s_per_step"] / res["flow_s_per_step"]
  print(json.dumps(res, indent=1))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
