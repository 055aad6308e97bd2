"""What scoring 50,000 samples costs: Inception and DINOv2 features, and the k-NN.

  nice -n 19 python benchmarks/evaluator_speed.py --out benchmarks/evaluator_speed.json

Random weights of the real shapes (nothing is downloaded; the speed does not
depend on the values): the FID Inception-v3 at 299 px (ADM's protocol, with
sFID's spatial features) on 256x256 uint8 images, and DINOv2 ViT-L/14 at 224 px
(dgm-eval's protocol: PIL bicubic resize on the host, then the network) on
the same images. Each is timed over --images images after one warm-up batch
(compilation excluded) and reported as images/s and as the extrapolated time
for 50,000. Precision/recall (ADM's k = 3 manifold estimator on 2048-wide
features) is timed at --knn N x N and extrapolated quadratically to
50k x 50k; its memory is the distance block's (row x column batch, float32)
plus each set's features, which the script states from the sizes.
"""
import argparse
import json
import os
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ddx import evaluation  # noqa: E402
from ddx import inception  # noqa: E402
from ddx.encoders import dinov2  # noqa: E402

FIFTY_K = 50_000


def _random_tree(abstract, seed=0, scale=0.02):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (rng.normal(size=a.shape) * scale).astype(np.float32),
                      abstract)


def time_inception(images, batch_size):
  variables = inception.abstract_variables()
  variables = _random_tree(variables)
  variables["batch_stats"] = jax.tree.map(np.abs, variables["batch_stats"])
  variables = inception.put_weights(variables)
  run = lambda x: inception.features(variables, x, batch_size=batch_size, protocol="adm",
                                     spatial=True)
  run(images[:batch_size])   # compile
  t0 = time.perf_counter()
  run(images)
  return len(images) / (time.perf_counter() - t0)


def time_dinov2(images, batch_size):
  cfg = dinov2.PRESETS["dinov2_vitl14"]
  params = _random_tree(dinov2.abstract_params(cfg))
  enc = dinov2.Encoder(config=cfg, params=params, digest="random")

  def run(u8):
    for s in range(0, len(u8), batch_size):
      np.asarray(dinov2.features(enc, dinov2.preprocess_pil(u8[s:s + batch_size]))["cls"])
  run(images[:batch_size])
  t0 = time.perf_counter()
  run(images)
  pil_t0 = time.perf_counter()
  dinov2.preprocess_pil(images)
  pil = time.perf_counter() - pil_t0
  return len(images) / (pil_t0 - t0), len(images) / pil


def time_knn(n, dim=2048):
  rng = np.random.default_rng(0)
  real = rng.normal(size=(n, dim)).astype(np.float32)
  fake = (rng.normal(size=(n, dim)) * 1.05).astype(np.float32)
  t0 = time.perf_counter()
  evaluation.precision_recall(real, fake)
  return time.perf_counter() - t0


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--images", type=int, default=64)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--knn", type=int, default=10_000)
  p.add_argument("--out", default="")
  args = p.parse_args()
  images = np.random.default_rng(1).integers(0, 256, (args.images, 256, 256, 3)).astype(np.uint8)
  res = {"images": args.images, "batch_size": args.batch_size, "devices": str(jax.devices()),
         "cpu_count": os.cpu_count()}
  res["inception_img_per_s"] = time_inception(images, args.batch_size)
  res["dinov2_l14_img_per_s"], res["pil_resize_img_per_s"] = time_dinov2(images, args.batch_size)
  knn = time_knn(args.knn)
  res["knn_n"], res["knn_seconds"] = args.knn, knn
  res["knn_50k_seconds_extrapolated"] = knn * (FIFTY_K / args.knn) ** 2
  block = evaluation.PR_ROW_BATCH * evaluation.PR_COL_BATCH * 4
  res["knn_50k_memory_gib"] = (block + 2 * FIFTY_K * 2048 * 4) / 2 ** 30
  for k in ("inception", "dinov2_l14"):
    res[f"{k}_50k_minutes"] = FIFTY_K / res[f"{k}_img_per_s"] / 60
  print(json.dumps(res, indent=2))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(res, f, indent=2)


if __name__ == "__main__":
  main()
