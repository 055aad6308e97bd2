"""DDPM on CIFAR-10 with the paper's settings (Ho et al. 2020, Appendix B).

  python -m ddx.main --config configs/cifar10.py --workdir runs/cifar10

Needs CIFAR-10 prepared once as ArrayRecord (README: "Training on CIFAR-10").
FID of the newest checkpoint (README: "Evaluation (FID/KID/IS)"):
  python -m ddx.main --config configs/cifar10.py --workdir runs/cifar10 --mode eval \
      --config.eval.inception_weights=pt_inception-2015-12-05.npz
35.7M parameters; 800k steps at batch 128 is days on one accelerator.
"""
from ddx.config import base_config


def get_config():
  c = base_config()
  c.data.name = "cifar10"
  c.data.image_size = 32
  c.data.channels = 3
  c.data.random_flip = True
  c.model.ch = 128
  c.model.ch_mult = (1, 2, 2, 2)
  c.model.num_res_blocks = 2
  c.model.attn_resolutions = (16,)
  c.model.dropout = 0.1
  c.model.num_groups = 32
  c.diffusion.schedule = "linear"
  c.diffusion.num_timesteps = 1000
  c.training.batch_size = 128
  c.training.num_steps = 800_000
  c.training.log_every = 100
  c.training.checkpoint_every = 10_000
  c.training.sample_every = 20_000
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 5000
  c.optim.grad_clip = 1.0
  c.optim.ema_decay = 0.9999
  c.optim.ema_warmup = False   # the paper's EMA; 800k steps wash out the init
  c.sampling.sampler = "auto"   # the process's default: DDIM for ddpm
  c.sampling.steps = 100
  c.sampling.num_samples = 64
  # FID-50k / KID / IS against the training set. Needs the FID Inception
  # weights converted once (README: Evaluation), so it is off during training
  # by default; turn it on with --config.eval.every_steps=N and
  # --config.eval.inception_weights=FILE.npz (fewer samples for speed, e.g.
  # --config.eval.num_samples=10000), or score a checkpoint with --mode eval.
  # The DDPM paper's FID 3.17 used ancestral sampling:
  # --config.eval.sampler=ddpm --config.eval.steps=1000.
  c.eval.metrics = ("fid", "kid", "is")
  c.eval.every_steps = 0
  c.eval.num_samples = 50_000
  c.eval.batch_size = 1000
  c.eval.sampler = "auto"       # DDIM for ddpm
  c.eval.steps = 100
  c.eval.feature_batch_size = 200
  return c
