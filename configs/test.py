"""A tiny config for tests: seconds per run on one CPU core.

  python -m ddx.main --config configs/test.py --workdir /tmp/ddx_test
"""
from ddx.config import base_config


def get_config():
  c = base_config()
  c.data.name = "digits"
  c.data.image_size = 8
  c.data.channels = 1
  c.model.ch = 8
  c.model.ch_mult = (1, 2)
  c.model.num_res_blocks = 1
  c.model.attn_resolutions = (4,)
  c.model.num_groups = 4
  c.diffusion.num_timesteps = 100
  c.training.batch_size = 16
  c.training.num_steps = 6
  c.training.log_every = 2
  c.training.checkpoint_every = 3
  c.training.sample_every = 6
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 2
  c.sampling.steps = 10
  c.sampling.num_samples = 4
  return c
