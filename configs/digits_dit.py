"""The digits flow-matching default with a small DiT (Peebles & Xie 2023) instead of the U-Net.

  python -m ddx.main --config configs/digits_dit.py --workdir runs/digits_dit

Patch 2 on the 8x8 digits (16 tokens), 6 adaLN-Zero blocks of width 128; the
data, batch, steps, warm-up, EMA, process and samplers of configs/digits_flow.py
(configs/digits.py trained with rectified flow, Heun sampling), at lr 2e-3. Short
runs picked the flow process over DDPM (the largest gain), lr 2e-3 over 1e-3 and
5e-4, and patch 2 over patch 1 at the same FLOPs (BENCHMARKS.md: DiT on the
digits; README: Backbones).
"""
import os

from ddx import config as config_lib


def get_config():
  c = config_lib.from_file(os.path.join(os.path.dirname(__file__), "digits_flow.py"))
  c.model.name = "dit"
  c.model.patch_size = 2
  c.model.hidden_size = 128
  c.model.depth = 6
  c.model.num_heads = 4
  c.model.mlp_ratio = 4.0
  c.optim.lr = 2e-3
  return c
