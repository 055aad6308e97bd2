"""A pixel-space DiT-S/2 on CIFAR-10, class-conditional with guidance, trained with
flow matching (the SiT / U-ViT pixel setting).

  python -m ddx.main --config configs/cifar10_dit.py --workdir runs/cifar10_dit

256 tokens of 2x2x3 pixels, 12 adaLN-Zero blocks of width 384 (DiT-S); flow
matching with logit-normal t (SiT, SD3); AdamW 1e-4 without weight decay, batch
128, EMA 0.9999 (DiT's recipe); CIFAR-10 prepared once as in configs/cifar10.py.
Samples with Heun, 50 steps (99 NFE), guidance 1.5. FID:
  python -m ddx.main --config configs/cifar10_dit.py --workdir runs/cifar10_dit \
      --mode eval --config.eval.inception_weights=pt_inception-2015-12-05.npz
"""
import os

from ddx import config as config_lib


def get_config():
  c = config_lib.from_file(os.path.join(os.path.dirname(__file__), "cifar10.py"))
  c.model.name = "dit"
  c.model.patch_size = 2
  c.model.hidden_size = 384
  c.model.depth = 12
  c.model.num_heads = 6
  c.model.mlp_ratio = 4.0
  c.model.num_classes = 10
  c.model.dtype = "bfloat16"
  c.diffusion.process = "flow"
  c.diffusion.prediction = "v"
  c.diffusion.t_sampling = "logit_normal"
  c.training.label_dropout = 0.1
  c.training.num_steps = 400_000
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 0
  c.optim.grad_clip = 0.0
  c.sampling.sampler = "heun"
  c.sampling.steps = 50
  c.sampling.clip_x0 = False
  c.sampling.guidance_scale = 1.5
  c.eval.sampler = "heun"
  c.eval.steps = 50
  return c
