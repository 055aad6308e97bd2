"""The digits default as a shortcut model (Frans et al. 2024): 1-, 2- or 4-step samples.

  python -m ddx.main --config configs/digits_shortcut.py --workdir runs/digits_shortcut

The network, batch, steps and optimizer of configs/digits.py, trained from
scratch: flow matching at step size d = 0 on 3/4 of each batch and
self-consistency (one 2d-step = two d-steps) on 1/4 (docs/shortcut.md).
Fine-tune a trained flow run instead (its EMA weights; the step-size input
starts at zero, so the network starts as that flow model):

  python -m ddx.main --config configs/digits_shortcut.py --workdir runs/digits_shortcut_ft \\
      --config.training.init_from=runs/digits_flow

Sample or score with 1, 2, 4, ..., 128 steps:

  python -m ddx.main --config configs/digits_shortcut.py --workdir runs/digits_shortcut \\
      --mode eval --config.eval.steps=1
"""
import os

from ddx import config as config_lib


def get_config():
  c = config_lib.from_file(os.path.join(os.path.dirname(__file__), "digits.py"))
  c.diffusion.process = "shortcut"
  c.diffusion.shortcut_max_steps = 128
  c.diffusion.shortcut_consistency_fraction = 0.25
  # The paper's uniform times: the bootstrap targets chain flow steps at
  # every multiple of 1/128, the ends included.
  c.diffusion.t_sampling = "uniform"
  c.sampling.sampler = "shortcut"
  c.sampling.steps = 1           # the grids: one network evaluation
  c.sampling.clip_x0 = False
  c.eval.sampler = "shortcut"
  c.eval.steps = 2               # the in-loop metric: two evaluations
  return c
