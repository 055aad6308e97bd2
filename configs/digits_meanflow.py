"""The digits default trained as a MeanFlow model (one- and few-step sampling).

  python -m ddx.main --config configs/digits_meanflow.py --workdir runs/digits_meanflow

The network, batch, steps and optimizer of configs/digits.py; the network
predicts the average velocity u(z_t, r, t) of flow matching's path and is
trained on the MeanFlow identity (Geng et al. 2025; docs/meanflow.md). One
network evaluation maps noise to an image. Or fine-tune a trained flow run
(configs/digits_flow.py; the second time input starts at zero, so training
begins from the flow model):

  python -m ddx.main --config configs/digits_meanflow.py --workdir runs/digits_mf_ft \\
      --config.training.init_from=runs/digits_flow --config.model.time_scale=1

Sample with 1 or 2 steps (= network evaluations), or score N steps:

  python -m ddx.main --config configs/digits_meanflow.py --workdir runs/digits_meanflow \\
      --mode sample --config.sampling.steps=1
  python -m ddx.main --config configs/digits_meanflow.py --workdir runs/digits_meanflow \\
      --mode eval --config.eval.steps=2

In-loop evaluation scores 1-step samples; the sample grids use 2 steps.
"""
import os

from ddx import config as config_lib


def get_config():
  c = config_lib.from_file(os.path.join(os.path.dirname(__file__), "digits.py"))
  c.diffusion.process = "meanflow"
  # The paper's CIFAR-10 recipe (small images, as the digits): (r, t) logit-normal
  # (−2, 2), 75% of the examples with r != t, adaptive weight power 0.75. Over three
  # seeds its one-step samples beat the paper's ImageNet recipe (−0.4, 1, 25%, p = 1;
  # ddx's process defaults) by far (BENCHMARKS.md, "Few-step processes").
  c.diffusion.mf_logit_mean = -2.0
  c.diffusion.mf_logit_std = 2.0
  c.diffusion.mf_ratio = 0.75
  c.diffusion.mf_power = 0.75
  c.sampling.sampler = "meanflow"
  c.sampling.steps = 2
  c.sampling.clip_x0 = False
  c.eval.sampler = "meanflow"
  c.eval.steps = 1
  return c
