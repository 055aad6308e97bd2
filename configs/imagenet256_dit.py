"""Class-conditional ImageNet 256x256: DiT-XL/2 on cached SD-VAE latents (DiT's recipe).

One config for the three steps (README: Latent diffusion). ImageNet must be
prepared for tfds (`imagenet2012`, manual download) and the VAE converted:

  python -m ddx.convert sd-vae-ft-ema --workdir vae/sd-vae-ft-ema
  # 1. encode ImageNet's train split once (resumable; every host takes its shards)
  python -m ddx.main --config configs/imagenet256_dit.py --mode encode --workdir runs/in256 \
      --config.data.path=latents/in256 --config.autoencoder.path=vae/sd-vae-ft-ema
  # 2. train
  python -m ddx.main --config configs/imagenet256_dit.py --workdir runs/in256 \
      --config.data.path=latents/in256 --config.autoencoder.path=vae/sd-vae-ft-ema
  # 3. FID-50K (250 DDPM steps, guidance 1.5), decoded by the VAE
  python -m ddx.main --config configs/imagenet256_dit.py --workdir runs/in256 --mode eval \
      --config.data.path=latents/in256 --config.autoencoder.path=vae/sd-vae-ft-ema \
      --config.eval.inception_weights=pt_inception-2015-12-05.npz

On a TPU pod slice (README: Multi-host), with the cache, the VAE and the
workdir in a bucket every worker reads:

  export ZONE=us-central2-b TPU_NAME=ddx-in256 ACCELERATOR=v4-64
  bash launch/tpu_vm.sh train configs/imagenet256_dit.py gs://BUCKET/runs/in256 \
      --config.data.path=gs://BUCKET/latents/in256 \
      --config.autoencoder.path=gs://BUCKET/vae/sd-vae-ft-ema

The recipe (Peebles & Xie 2023, sec. 5): DiT-XL/2 (675M parameters, 28 blocks of
width 1152, 16 heads, patch 2 on 32x32x4 latents), class labels dropped with
p = 0.1 for guidance, the linear DDPM schedule with T = 1000 and ε-prediction,
AdamW at a constant 1e-4 without weight decay or warm-up, global batch 256,
EMA 0.9999 from the start, random horizontal flips (of the images: the cache
holds both), bf16 compute. DiT also learns the variances with the VLB
(learn_sigma); ddx trains the mean (L_simple) and samples with the fixed
variance β, so learn_sigma is off here; to fine-tune an imported official
checkpoint (learn_sigma=True), add --config.model.learn_sigma=True.
The paper reports FID-50K 2.27 for XL/2 at 7M steps with 250 DDPM steps and
guidance 1.5.
"""
from ddx.config import base_config


def get_config():
  c = base_config()
  d = c.data
  d.name = "latents"
  d.path = "latents/imagenet256"        # the cache --mode encode writes
  d.image_size = 256
  d.channels = 3
  d.random_flip = True
  d.crop = "center"

  c.encode.source = "imagenet2012"      # tfds; the train split
  c.encode.flips = True
  c.encode.batch_size = 64
  c.encode.shard_size = 1024

  a = c.autoencoder
  a.path = "vae/sd-vae-ft-ema"          # python -m ddx.convert sd-vae-ft-ema --workdir ...
  a.downsample = 8
  a.latent_channels = 4

  m = c.model
  m.name = "dit"
  m.patch_size, m.hidden_size, m.depth, m.num_heads, m.mlp_ratio = 2, 1152, 28, 16, 4.0
  m.num_classes = 1000
  m.learn_sigma = False
  m.dtype = "bfloat16"

  f = c.diffusion
  f.process, f.schedule, f.num_timesteps = "ddpm", "linear", 1000
  f.beta_start, f.beta_end, f.prediction = 1e-4, 0.02, "eps"

  t = c.training
  t.batch_size = 256
  t.num_steps = 7_000_000
  t.label_dropout = 0.1
  t.log_every = 100
  t.checkpoint_every = 10_000
  t.sample_every = 50_000

  o = c.optim
  o.lr = 1e-4
  o.warmup_steps = 0
  o.grad_clip = 0.0
  o.weight_decay = 0.0
  o.ema_decay = 0.9999
  o.ema_warmup = False

  s = c.sampling
  s.sampler, s.steps, s.ddpm_variance = "ddpm", 250, "beta"
  s.guidance_scale = 1.5
  s.clip_x0 = False
  s.num_samples = 16

  e = c.eval
  e.metrics = ("fid",)
  e.num_samples = 50_000
  e.batch_size = 256
  e.sampler, e.steps = "ddpm", 250
  return c
