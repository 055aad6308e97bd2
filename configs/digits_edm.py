"""The digits default trained with EDM (Karras et al. 2022) instead of DDPM.

  python -m ddx.main --config configs/digits_edm.py --workdir runs/digits_edm

The network, batch, steps and optimizer of configs/digits.py; EDM's
preconditioning, lognormal noise levels and loss weight (diffusion.* keys at
EDM's defaults), sampled with EDM's Heun sampler (Alg. 1) on the Karras grid.
Score it with --mode eval (README: Processes).
"""
import os

from ddx import config as config_lib


def get_config():
  c = config_lib.from_file(os.path.join(os.path.dirname(__file__), "digits.py"))
  c.diffusion.process = "edm"
  c.sampling.sampler = "heun"
  c.sampling.steps = 18          # 35 network evaluations (EDM's CIFAR-10 setting)
  c.sampling.clip_x0 = False
  c.eval.sampler = "heun"
  c.eval.steps = 10              # 19 network evaluations
  return c
