"""The seed article's setup: 64x64 RGB images from a folder, BatchNorm U-Net.

  python -m ddx.main --config configs/article.py --workdir runs/article \
      --config.data.path=/path/to/images

data.path is required: every PNG/JPEG/BMP/WebP under it (recursively) is
centre-cropped and resized to 64x64 RGB. DDPM with T = 1000 and the linear
schedule, Adam at 1e-4 (no warm-up, no clipping), batch 32, a U-Net without
attention and with BatchNorm instead of GroupNorm, sampled with DDIM, 200
steps, η = 0. The U-Net widths (ch 64, ch_mult (1, 2, 4, 8), 2 ResBlocks per
level) are ddx's choice for 64x64 images. Sized for a GPU/TPU; add
--config.model.dtype=bfloat16 there for mixed precision.

BatchNorm: training normalises with the statistics of the (global) batch and
keeps running averages; sampling uses those running averages with the EMA
weights (README: "BatchNorm and the article's config").
"""
from ddx.config import base_config


def get_config():
  c = base_config()
  c.data.name = "folder"
  c.data.path = ""               # required: --config.data.path=DIR
  c.data.image_size = 64
  c.data.channels = 3
  c.model.ch = 64
  c.model.ch_mult = (1, 2, 4, 8)
  c.model.num_res_blocks = 2
  c.model.attn_resolutions = ()
  c.model.dropout = 0.0
  c.model.norm = "batch"
  c.diffusion.schedule = "linear"
  c.diffusion.num_timesteps = 1000
  c.diffusion.beta_start = 1e-4
  c.diffusion.beta_end = 0.02
  c.training.batch_size = 32
  c.training.num_steps = 100_000
  c.training.log_every = 100
  c.training.checkpoint_every = 5000
  c.training.sample_every = 5000
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 0
  c.optim.grad_clip = 0.0
  c.optim.ema_decay = 0.999
  c.sampling.sampler = "auto"   # the process's default: DDIM for ddpm
  c.sampling.steps = 200
  c.sampling.eta = 0.0
  c.sampling.num_samples = 64
  return c
