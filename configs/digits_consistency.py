"""The digits default as a continuous-time consistency model (sCM), sampled in 1-2 steps.

Consistency training from scratch:
  python -m ddx.main --config configs/digits_consistency.py --workdir runs/digits_consistency
Consistency distillation from a trained run of any process (here flow matching):
  python -m ddx.main --config configs/digits_flow.py --workdir runs/digits_flow
  python -m ddx.main --config configs/digits_consistency.py \\
      --workdir runs/digits_consistency_distil --config.training.teacher=runs/digits_flow
Sample with 1 or 2 network evaluations, and score at N steps:
  python -m ddx.main --config configs/digits_consistency.py \\
      --workdir runs/digits_consistency --mode sample --config.sampling.steps=2
  python -m ddx.main --config configs/digits_consistency.py \\
      --workdir runs/digits_consistency --mode eval --config.eval.steps=1

The network, batch and steps of configs/digits.py; TrigFlow x_t = cos(t) x_0 +
sin(t) z, sCM's tangent with warm-up and normalisation, adaptive weighting
(docs/consistency.md).
"""
import os

from ddx import config as config_lib


def get_config():
  c = config_lib.from_file(os.path.join(os.path.dirname(__file__), "digits.py"))
  c.diffusion.process = "consistency"
  c.diffusion.sigma_data = 0.5
  # The tangent's dF/dt term ramps in over the first quarter of the run
  # (sCM: 10k of 100k+ steps).
  c.diffusion.scm_warmup_steps = 300
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 200
  c.sampling.sampler = "consistency"
  c.sampling.steps = 2
  c.sampling.clip_x0 = False
  c.eval.sampler = "consistency"
  c.eval.steps = 2
  return c
