"""The digits default with a small DiT (Peebles & Xie 2023) instead of the U-Net.

  python -m ddx.main --config configs/digits_dit.py --workdir runs/digits_dit

Patch 2 on the 8x8 digits (16 tokens), 6 adaLN-Zero blocks of width 128; the
DDPM process, batch, steps and samplers of configs/digits.py (README: Backbones).
"""
import os

from ddx import config as config_lib


def get_config():
  c = config_lib.from_file(os.path.join(os.path.dirname(__file__), "digits.py"))
  c.model.name = "dit"
  c.model.patch_size = 2
  c.model.hidden_size = 128
  c.model.depth = 6
  c.model.num_heads = 4
  c.model.mlp_ratio = 4.0
  c.optim.lr = 5e-4
  return c
