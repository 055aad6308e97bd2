"""A DINOv2-architecture encoder for REPA on the digits, trained on the training split only.

  python benchmarks/digits_encoder.py --out encoders/digits_vit [--steps 600 --seed 0]
  python -m ddx.main --config configs/digits_repa.py --workdir runs/digits_repa \
      --config.training.repa.encoder=encoders/digits_vit

Issue #34 asks for an encoder that is neither the digits metric's feature
network nor fitted to its held-out digits. This one is a small ViT with
DINOv2's architecture (`ddx.encoders.dinov2`: 64 wide, 2 blocks, 2 heads, 14 px
patches at 56 px, so 8x8 digits make the DiT's 4x4 token grid), trained from
random weights as a classifier on `load_digits()[:1000]` only (the split the
digits metric trains on; the 797 held out are only scored, for the printout).
The class is read from the mean of the patch tokens and from the CLS token,
so the patch tokens REPA aligns with carry what the network learnt; inputs
are shifted by up to one pixel at random each step. The images go through
`dinov2.preprocess` (REPA's path), as they will in training. Written with
`dinov2.save`, so REPA records it by path and digest like a converted DINOv2.
"""
import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ddx.data import load_digits  # noqa: E402
from ddx.encoders import dinov2  # noqa: E402
from ddx.evaluation import DIGITS_TRAIN  # noqa: E402

CONFIG = dinov2.Dinov2Config(hidden_size=64, depth=2, num_heads=2, pos_grid=4)
RESOLUTION = 56


def _init(seed: int):
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name in ("scale", "gamma"):          # LayerNorm scales, LayerScale
      return np.ones(leaf.shape, np.float32)
    if name == "bias":
      return np.zeros(leaf.shape, np.float32)
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else leaf.shape[-1]
    return (rng.normal(size=leaf.shape) / np.sqrt(max(fan_in, 1))).astype(np.float32)
  net = jax.tree_util.tree_map_with_path(fill, dinov2.abstract_params(CONFIG))
  head = {"w": (rng.normal(size=(2 * CONFIG.hidden_size, 10)) * 0.02).astype(np.float32),
          "b": np.zeros((10,), np.float32)}
  return {"net": net, "head": head}


def _logits(params, images_u8):
  x = dinov2.preprocess(images_u8, RESOLUTION)
  out = dinov2.forward(dinov2.Encoder(config=CONFIG, params=params["net"], digest=""), x)
  feats = jnp.concatenate([out["cls"], out["patch"].mean(1)], axis=-1)
  return feats @ params["head"]["w"] + params["head"]["b"]


def _shift(rng, images):
  """Each image moved by up to one pixel in each direction (edge pixels repeated)."""
  pad = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  dy, dx = jax.random.randint(rng, (2, images.shape[0]), 0, 3)
  crop = lambda im, y, x: jax.lax.dynamic_slice(im, (y, x, 0), images.shape[1:])
  return jax.vmap(crop)(pad, dy, dx)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--lr", type=float, default=2e-3)
  args = p.parse_args()
  if os.path.exists(args.out):
    print(f"digits_encoder: error: {args.out} exists; pass a new folder", file=sys.stderr)
    return 2
  images, labels = load_digits()
  rgb = np.repeat(images, 3, axis=-1)
  train_x, train_y = jnp.asarray(rgb[:DIGITS_TRAIN]), jnp.asarray(labels[:DIGITS_TRAIN])
  params = jax.tree.map(jnp.asarray, _init(args.seed))
  tx = optax.adamw(optax.cosine_decay_schedule(args.lr, args.steps), weight_decay=1e-4)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, rng):
    def loss_fn(p):
      logits = _logits(p, _shift(rng, train_x))
      return optax.softmax_cross_entropy_with_integer_labels(logits, train_y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  t0 = time.perf_counter()
  for i in range(args.steps):
    params, opt, loss = step(params, opt, jax.random.fold_in(jax.random.key(args.seed), i))
    if (i + 1) % 100 == 0:
      print(f"step {i + 1}/{args.steps}: loss {float(loss):.4f}", flush=True)
  accuracy = lambda x, y: float(jnp.mean(jnp.argmax(_logits(params, x), -1) == y))
  result = {"steps": args.steps, "seed": args.seed, "seconds": time.perf_counter() - t0,
            "train_accuracy": accuracy(train_x, train_y),
            "heldout_accuracy": accuracy(jnp.asarray(rgb[DIGITS_TRAIN:]),
                                         jnp.asarray(labels[DIGITS_TRAIN:]))}
  dinov2.save(args.out, CONFIG, jax.tree.map(np.asarray, params["net"]),
              source={"trained_by": "benchmarks/digits_encoder.py",
                      "data": f"load_digits()[:{DIGITS_TRAIN}]", **result})
  print(json.dumps(result, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
