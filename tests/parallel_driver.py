"""Run in a subprocess by test_parallel.py, with fake CPU devices set in XLA_FLAGS.

  python tests/parallel_driver.py OUT.npz WORKDIR OVERRIDES_JSON [SAMPLE_FROM_WORKDIR]

Trains configs/test.py with the overrides, then writes OUT.npz holding the
final params (flattened leaves), how many param leaves are split over
devices, the device count and, with SAMPLE_FROM_WORKDIR, images sampled
from that run's model on all devices.
"""
import json
import sys

import jax
import numpy as np

from testutils import load_config


def main(out, workdir, overrides, sample_from=None):
  import ddx
  from ddx import parallel, train
  # The tiny test model has no leaf of FSDP's default minimum size; lower it
  # so that FSDP really splits kernels here.
  parallel.FSDP_MIN_SIZE = 256
  config = load_config()
  for key, value in json.loads(overrides).items():
    group, name = key.split(".")
    config[group][name] = value
  state = train.train_and_evaluate(config, workdir)
  leaves = jax.tree.leaves(state.params)
  result = {f"p{i}": np.asarray(x) for i, x in enumerate(leaves)}
  result["num_split"] = sum(not x.sharding.is_fully_replicated for x in leaves)
  result["num_devices"] = jax.device_count()
  if sample_from:
    model = ddx.load(sample_from)
    result["images"] = np.asarray(ddx.sample_fn(model, jax.random.key(7), steps=10,
                                                num_samples=16))
  np.savez(out, **result)


if __name__ == "__main__":
  main(*sys.argv[1:])
