"""The run config: defaults, validation before anything compiles, conversions.

Every check raises `ConfigError` with one line that names the field, what is
wrong and how to fix it; `ddx.main` prints that line and exits with code 2.

This module imports ml_collections, the standard library and the JAX-free
halves of the processes (`ddx.processes`, their `<name>_config.py`) and of the
backbones (`ddx.models`, their `<name>/spec.py`) only, so a config file loads
and validates without JAX or Flax (as big_vision's do). It names no process
or backbone: each declares its keys and checks in its Spec, and the config
asks the registries. The valid names below are the config's contract: the
process and backbone ones come from the Specs; tests/test_config.py checks
that every list equals the registry of the module that implements it.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import warnings

import ml_collections

from ddx import models
from ddx import processes
DTYPES = ("float32", "bfloat16")           # model.dtype: the network's compute dtype
MODELS = models.names()                    # model.name (the built-in backbones)
ATTENTIONS = ("xla", "auto", "cudnn", "tpu_flash")   # model.attention (ddx.models.attention)
NORM_KERNELS = ("xla", "pallas")            # model.norm_kernel (ddx.models.fused_norm)
REPA_PROJECTORS = ("mlp", "conv")          # training.repa.projector (ddx.repa)
REPA_SPATIAL_NORMS = ("none", "zscore")    # training.repa.spatial_norm (ddx.repa)
REMATS = ("none", "dots", "full")          # training.remat (ddx.models.layers.REMATS)
TIME_EMBEDDINGS = ("positional", "fourier")   # model.time_embedding (ddx.models.layers)
METRICS = ("digits", "fid", "kid", "is", "sfid", "precision", "recall", "fd_dinov2",
           "bpd")   # eval.metrics (ddx.evaluation)
INCEPTION_METRICS = ("fid", "kid", "is", "sfid", "precision", "recall")   # need
                                                       # eval.inception_weights
INCEPTION_PROTOCOLS = ("pytorch_fid", "adm")   # eval.inception_protocol (ddx.inception)
LABEL_RULES = ("balanced", "random")        # sampling.labels (ddx.model.class_labels)
BPD_ESTIMATORS = ("ode", "vlb", "both")    # eval.bpd_estimator (ddx.bpd)
BPD_TRACES = ("hutchinson", "exact")       # eval.bpd_trace (ddx.likelihood)
BPD_PROBES = ("rademacher", "gaussian")    # eval.bpd_probe (ddx.likelihood)
BPD_SOLVERS = ("euler", "heun", "rk4", "adaptive")   # eval.bpd_solver (ddx.likelihood)


def base_config() -> ml_collections.ConfigDict:
  """Every key ddx reads, with its default (configs/default.py returns this)."""
  c = ml_collections.ConfigDict()

  c.data = d = ml_collections.ConfigDict()
  d.name = "digits"          # digits | cifar10 | any tfds image dataset | folder
  d.image_size = 8           # images are H = W = image_size after resize/crop
  d.channels = 1             # 1 (grey) or 3 (RGB); images are converted to this
  d.path = ""                # image folder root when name == "folder"
  d.data_dir = ""            # tfds data_dir ("" = tfds' default, ~/tensorflow_datasets)
  d.split = "train"          # tfds split to train on
  d.random_flip = False      # random horizontal flip (DDPM uses it on CIFAR-10)
  d.crop = "center"          # how non-square images are made square: center | none
  d.image_key = "image"      # tfds feature holding the image
  d.label_key = "label"      # tfds feature holding the class label ("" = none)
  d.num_workers = -1         # loader processes: -1 = auto (digits 0, else cores - 1); 0 = a thread

  c.model = m = ml_collections.ConfigDict()
  m.name = models.DEFAULT    # the backbone, any registered in ddx.models: unet (DDPM's
                             # U-Net) | dit (Diffusion Transformer)
  # Each backbone's own keys, with their defaults and meaning in
  # ddx/models/<name>/spec.py (DiT's presets: ddx.models.dit.preset("S/2") ...);
  # only the chosen backbone reads and checks its keys.
  for key, field in models.fields().items():
    m[key] = field.default
  # The keys every backbone takes (the contract: ddx.models.base).
  m.num_classes = 0          # 0 = unconditional
  m.dtype = "float32"        # compute dtype: float32 | bfloat16 (params stay float32)
  m.attention = "xla"        # xla | auto (jax.nn.dot_product_attention picks) | cudnn (NVIDIA
                             # GPU) | tpu_flash (Pallas TPU kernel); the same function
  m.norm_kernel = "xla"      # U-Net GroupNorm+SiLU, DiT LayerNorm+adaLN: xla (two passes over
                             # memory) | pallas (one Pallas kernel each; interpreted, slowly,
                             # on CPU); the same function
  # How the process's time input enters the network (U-Net and DiT): positional (the
  # sinusoidal table) | fourier (fixed random 2π·N(0, 1) frequencies) | auto (the
  # process's: its Spec.time_embedding); time_scale multiplies the time input first:
  # a number > 0 | auto (Spec.time_scales). Training saves the resolved values.
  m.time_embedding = "auto"
  m.time_scale = ml_collections.FieldReference("auto", field_type=object)

  # Latent diffusion (README: Latent diffusion): the diffusion model runs on the
  # latents of a KL autoencoder; data.image_size/channels stay the pixels'.
  c.autoencoder = a = ml_collections.ConfigDict()
  a.path = ""                # ddx autoencoder folder (python -m ddx.convert VAE --workdir
                             # DIR); "" = diffusion on pixels
  a.downsample = 8           # pixels per latent along H and W (SD VAE: 8)
  a.latent_channels = 4      # latent channels (SD VAE: 4)
  a.sample_posterior = True  # training latents: a posterior sample per (seed, step), as
                             # DiT; False = the posterior mean

  # --mode encode: the pixel dataset encoded into the latent cache at data.path
  # (README: Latent diffusion); data.image_size/crop/split/... describe it too.
  c.encode = n = ml_collections.ConfigDict()
  n.source = ""              # its data.name: digits | cifar10 | folder | a tfds name
  n.folder = ""              # the image folder when source = folder
  n.flips = True             # also encode the mirrored images (data.random_flip on latents)
  n.batch_size = 64          # images per encoder call, per process
  n.shard_size = 1024        # images per cache file
  n.dtype = "float32"        # stored moments: float32 | float16 (half the disk)

  c.diffusion = f = ml_collections.ConfigDict()
  f.process = processes.DEFAULT   # any process registered in ddx.processes (its folder)
  f.prediction = "auto"      # what the network predicts, one of the process's
                             # Spec.predictions; auto = its default_prediction
  # Each registered process's own keys, with their defaults and meaning in
  # ddx/processes/<process>/spec.py. Every process's keys are range-checked.
  for key, field in processes.fields().items():
    f[key] = field.default
  # σ_d may be "auto" (measured from the training data when training starts and
  # saved in config.json: ddx.data.value_std), so the key takes a number or a string.
  f.sigma_data = ml_collections.FieldReference(f.sigma_data, field_type=object)

  c.training = t = ml_collections.ConfigDict()
  t.batch_size = 128         # global, over all devices and processes
  t.fsdp = 1                 # devices each param/optimizer leaf is split over (1 = replicated)
  t.num_steps = 10_000
  t.seed = 0
  t.log_every = 100
  t.checkpoint_every = 1000
  t.keep_checkpoints = 3
  t.sample_every = 2000      # 0 = no sample grids during training
  t.label_dropout = 0.0      # classifier-free guidance: p(label -> null)
  t.nan_policy = "stop"      # non-finite loss/grads: stop (with the step) | skip the update
  t.steps_per_dispatch = 1   # updates per jitted call (a lax.scan over batches); >1 for
                             # small models on GPU/TPU, where launching each step costs
  t.reset_optimizer = False  # resume params, EMA (and batch stats) from the newest
                             # checkpoint with a fresh optimizer state (README: Resuming)
  # Post-hoc EMA (EDM2; docs: Post-hoc EMA): track power-function EMAs of the
  # weights and keep snapshots of them, from which `python -m ddx.posthoc_ema`
  # makes the EMA of any width after training.
  t.posthoc_ema = p = ml_collections.ConfigDict()
  p.snapshot_every = 0       # snapshots (workdir/posthoc_ema/) at multiples of this step; 0 = off
  p.sigma_rels = (0.05, 0.10)  # the tracked profiles' relative widths sigma_rel (EDM2's)
  t.remat = "none"           # recompute in the backward pass, per U-Net/DiT block: none |
                             # dots (keep matmul/conv outputs) | full (keep block inputs)
  t.init_from = ""           # a finished run whose EMA weights a NEW run starts from
                             # (fine-tuning; ignored on resume); docs/checkpoints.md
  t.teacher = ""             # a finished run to distil from (a process that takes one)
  # REPA (docs/repa.md): a projection of the network's hidden tokens after block
  # `depth` is pulled towards a frozen encoder's patch tokens of the clean image;
  # the values below are the paper's (SiT-XL/2 + DINOv2-B/14).
  t.repa = r = ml_collections.ConfigDict()
  r.encoder = ""             # a converted encoder folder (python -m ddx.convert, docs/
                             # encoders.md); "" = REPA off
  r.depth = 8                # align the tokens after this block (1-based; 8 of SiT-XL's 28)
  r.weight = 0.5             # lambda: loss = process loss + lambda * (-mean cosine)
  r.projector = "mlp"        # mlp: Dense(dim) SiLU Dense(dim) SiLU Dense(encoder width) |
                             # conv: iREPA's Conv(kernel) on the token grid
  r.projector_dim = 2048     # the mlp projector's hidden width
  r.projector_kernel = 3     # the conv projector's kernel side (odd; iREPA's README: 3)
  r.spatial_norm = "none"    # none (REPA) | zscore (iREPA: the encoder's tokens
                             # normalised over space, (z - alpha*mean) / std)
  r.zscore_alpha = 0.6       # zscore's alpha (iREPA's latent-diffusion code: 0.6)
  r.resolution = 224         # the encoder's input side (pixels; a multiple of its patch)

  c.optim = o = ml_collections.ConfigDict()
  o.lr = 2e-4
  o.warmup_steps = 500
  o.grad_clip = 1.0          # global-norm clip; 0 = off
  o.ema_decay = 0.999
  o.ema_warmup = True        # decay_n = min(decay, (1+n)/(10+n))
  o.beta1 = 0.9
  o.beta2 = 0.999
  o.eps = 1e-8
  o.weight_decay = 0.0

  c.sampling = s = ml_collections.ConfigDict()
  s.sampler = "auto"         # one of the process's Spec.samplers (docs/samplers.md);
                             # auto = its default_sampler
  s.steps = 100
  s.eta = 0.0
  s.num_samples = 64
  s.clip_x0 = True
  s.guidance_scale = 1.0     # CFG weight w: out = u + w(c - u); 1 = plain conditional;
                             # with guide_workdir the autoguidance weight (docs/samplers.md)
  s.guidance_interval = ()   # () = guide at every step; (lo, hi) = guide only where the
                             # noise level σ is in (lo, hi], e.g. "(0.28, 2.9)"
  s.guide_workdir = ""       # autoguidance: a run whose newest checkpoint guides ("" = CFG)
  s.labels = "balanced"      # class-conditional --mode sample / eval: balanced (sample i
                             # is class i mod K) | random (uniform draws, as ADM and DiT)
  s.ddpm_variance = "posterior"  # DDPM's ddpm sampler: posterior (beta tilde) | beta
  s.spacing = "auto"         # uniform | trailing | quadratic | logsnr; auto = the
                             # sampler's default (README: Samplers)
  s.churn = 0.0              # EDM S_churn for the stochastic sampler (0 = deterministic)
  s.s_tmin = 0.0
  s.s_tmax = float("inf")
  s.s_noise = 1.0
  s.sigma_index = "nearest"  # a DDPM model on a sigma grid: nearest | interp index

  c.eval = e = ml_collections.ConfigDict()
  e.every_steps = 0          # in-loop evaluation of the EMA model every N steps; 0 = off
  e.metrics = ("digits",)    # some of digits | fid | kid | is | sfid | precision | recall |
                             # fd_dinov2 | bpd (docs/evaluation.md; fid .. recall need
                             # Inception weights; bpd scores held-out data, no sampling)
  e.num_samples = 512        # samples per evaluation (FID-50k: 50_000)
  e.batch_size = 500         # samples per sampler call (global) = images per chunk file
  e.sampler = "auto"         # eval samples: sampler (auto as sampling.sampler), steps, eta,
  e.steps = 50               # spacing; every other option comes from the sampling group
                             # (ddx.options)
  e.eta = 0.0
  e.spacing = "auto"         # as sampling.spacing
  e.seed = 0                 # chunk c uses fold_in(key(seed), c): the same noise every eval
  e.inception_weights = ""   # .npz from python -m ddx.inception --convert (README: Evaluation)
  e.inception_protocol = "pytorch_fid"  # pytorch_fid (its resize, IS on 10 splits) | adm
                             # (ADM's TF graph: TF1 bilinear, (x-128)/128, IS on 5,000-
                             # image splits without the classifier bias; docs/evaluation.md)
  e.reference = ""           # an ADM reference batch .npz (arr_0 and/or mu, sigma, mu_s,
                             # sigma_s): the Inception and DINOv2 metrics compare with it
                             # instead of config.data
  e.reference_stats = ""     # dataset feature stats .npz; "" = workdir/eval/reference_<data>.npz
  e.dinov2_weights = ""      # fd_dinov2: a converted DINOv2 folder (python -m ddx.convert;
                             # dgm-eval's protocol takes ViT-L/14)
  e.save_batch = False       # --mode eval also writes the samples as one ADM batch
                             # (arr_0 images, arr_1 labels) for python -m ddx.evaluate
  e.feature_batch_size = 100  # images per Inception forward pass
  e.kid_subset_size = 1000
  e.kid_subsets = 100
  # Likelihood, metric "bpd" (README: Likelihood): bits/dim of held-out images,
  # eval.batch_size at a time, seeded by eval.seed. Held out: digits from index
  # 1000 on (the digits metric's), tfds: eval.bpd_split, folder: every image.
  e.bpd_estimator = "ode"    # ode (probability-flow ODE, any process) | vlb (DDPM's
                             # variational bound, ddpm only) | both (ddpm only)
  e.bpd_trace = "hutchinson"  # ODE divergence: hutchinson (Skilling-Hutchinson) | exact
                             # (one jvp per dimension: small images only)
  e.bpd_probe = "rademacher"  # Hutchinson probes: rademacher | gaussian
  e.bpd_probes = 1           # Hutchinson probes per image, averaged
  e.bpd_solver = "rk4"       # euler | heun | rk4 (fixed steps, one lax.scan) | adaptive
                             # (diffrax Tsit5 + PID control; pip install diffrax)
  e.bpd_steps = 32           # fixed-step solvers: steps (rk4: 4 evaluations each)
  e.bpd_rtol = 1e-5          # adaptive solver: relative and absolute tolerance, > 0
  e.bpd_atol = 1e-5
  e.bpd_vlb_terms = 0        # vlb: 0 = all T terms; K = unbiased estimate from K
                             # random timesteps per image
  e.bpd_num_images = 0       # held-out images scored; 0 = all (digits: 797)
  e.bpd_split = "test"       # tfds split of the held-out images
  return c


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field and the fix."""


class ConfigWarning(UserWarning):
  """A config value that has no effect (warnings.warn, one line)."""


def _require(cond: bool, msg: str):
  if not cond:
    raise ConfigError(msg)



def _ask(check, *args, **kwargs):
  """Runs a process's or backbone's Spec check; its one-line ValueError (naming
  the key) becomes a ConfigError."""
  try:
    return check(*args, **kwargs)
  except ValueError as e:
    raise ConfigError(str(e)) from None

def validate(config: ml_collections.ConfigDict, num_data_shards: int = 1) -> None:
  """Checks every field ddx reads; raises ConfigError on the first problem.

  First replaces "auto" by the process's defaults, in place
  (`ddx.processes.resolve_defaults`), so the config a run saves holds what
  ran. A diffusion.* key the chosen process does not read but that differs
  from its default gets a one-line `ConfigWarning`.

  Args:
    config: the full run config (see configs/default.py).
    num_data_shards: how many ways the global batch is split (devices on the
      "data" mesh axis); the batch size must divide by it.
  """
  processes.resolve_defaults(config)
  d, m = config.data, config.model
  _require(isinstance(d.name, str) and d.name,
           "data.name is empty; use digits, folder, cifar10 or a tfds dataset name")
  _require(d.name != "folder" or bool(d.path),
           "data.path is empty; with data.name=folder set --config.data.path=DIR")
  _require(isinstance(d.image_size, int) and d.image_size > 0,
           f"data.image_size={d.image_size!r} must be a positive integer")
  _require(d.channels in (1, 3), f"data.channels={d.channels!r} must be 1 or 3")
  _require(isinstance(d.num_workers, int) and d.num_workers >= -1,
           f"data.num_workers={d.num_workers!r} must be an int >= 0, or -1 for auto")

  name = m.get("name", models.DEFAULT)
  _require(name in models.names(),
           f"model.name={name!r} is unknown; use one of {models.names()}")
  backbone = models.spec(name)
  size, what = _model_size(config)
  _ask(backbone.check, m, size, size, f"{what}={size}")
  _require(m.dtype in DTYPES,
           f"model.dtype={m.dtype!r} is unknown; use float32, or bfloat16 for mixed "
           "precision on TPU/GPU")
  _require(isinstance(m.num_classes, int) and m.num_classes >= 0,
           f"model.num_classes={m.num_classes!r} must be an integer >= 0 (0 = unconditional)")
  _require(m.attention in ATTENTIONS,
           f"model.attention={m.attention!r} is unknown; use one of {ATTENTIONS}")
  norm_kernel = m.get("norm_kernel", "xla")
  _require(norm_kernel in NORM_KERNELS,
           f"model.norm_kernel={norm_kernel!r} is unknown; use one of {NORM_KERNELS}")
  if norm_kernel != "xla":
    _ask(backbone.check_norm_kernel, m)
  _check_process(config)
  _check_time_embedding(config)
  _check_latent(config)
  _check_training(config, num_data_shards)


def _check_latent(config) -> None:
  """Latent diffusion: the cache, the autoencoder, and what latents rule out."""
  d, a = config.data, config.autoencoder
  if d.name == "latents":
    _require(bool(d.path), "data.name=latents reads the latent cache at data.path; set "
             "--config.data.path=DIR (written by --mode encode)")
    _require(bool(a.path), "data.name=latents needs the autoencoder that made the cache "
             "(to check it and to decode samples); set --config.autoencoder.path=DIR "
             "(python -m ddx.convert VAE --workdir DIR)")
  if not is_latent(config):
    return
  _require(isinstance(a.downsample, int) and a.downsample >= 1
           and d.image_size % a.downsample == 0,
           f"autoencoder.downsample={a.downsample!r} must be a positive integer dividing "
           f"data.image_size={d.image_size}")
  _require(isinstance(a.latent_channels, int) and a.latent_channels >= 1,
           f"autoencoder.latent_channels={a.latent_channels!r} must be a positive integer")
  _require(not config.sampling.clip_x0,
           "sampling.clip_x0=True clips to [-1, 1], but latents are not bounded there; "
           "set --config.sampling.clip_x0=False")
  e = config.eval
  metrics = tuple(e.metrics)
  _require("bpd" not in metrics,
           "eval.metrics has bpd, but bits/dim of latents are not bits/dim of images; "
           "drop bpd for a latent model")


def validate_encode(config) -> None:
  """Checks the keys `--mode encode` reads (after `validate`)."""
  d, n = config.data, config.encode
  _require(d.name == "latents" and bool(d.path),
           "--mode encode writes the latent cache at data.path and needs "
           "data.name=latents; set --config.data.name=latents --config.data.path=DIR")
  _require(isinstance(n.source, str) and n.source and n.source != "latents",
           f"encode.source={n.source!r} must name the pixel dataset to encode (digits, "
           "cifar10, folder or a tfds name); set --config.encode.source=NAME")
  _require(n.source != "folder" or bool(n.folder),
           "encode.source=folder needs the images' folder; set --config.encode.folder=DIR")
  _require(isinstance(n.batch_size, int) and n.batch_size >= 1,
           f"encode.batch_size={n.batch_size!r} must be a positive integer")
  _require(isinstance(n.shard_size, int) and n.shard_size >= 1,
           f"encode.shard_size={n.shard_size!r} must be a positive integer")
  _require(isinstance(n.flips, bool), f"encode.flips={n.flips!r} must be True or False")
  _require(n.dtype in ("float32", "float16"),
           f"encode.dtype={n.dtype!r} must be float32 or float16")


def _model_size(config) -> tuple[int, str]:
  """The side the network sees, and how to name it in a message."""
  size = image_shape(config)[0]
  if is_latent(config):
    return size, (f"the latent size (data.image_size {config.data.image_size} / "
                  f"autoencoder.downsample {config.autoencoder.downsample})")
  return size, "data.image_size"


def _check_process(config) -> None:
  """diffusion.*: the process is registered; every process's own keys are in
  range whichever process runs (its Spec.check); the prediction is one of the
  chosen process's; keys it does not read but that were changed are warned of."""
  f = config.diffusion
  name = f.get("process", processes.DEFAULT)
  _require(name in processes.names(),
           f"diffusion.process={name!r} is unknown; use one of {processes.names()}")
  for spec in processes.REGISTRY.values():
    try:
      spec.check(f)
    except ValueError as e:
      where = "" if spec.name == name else (f" (a key of diffusion.process={spec.name}, "
                                            "range-checked whichever process runs)")
      raise ConfigError(f"{e}{where}") from None
  spec = processes.spec(name)
  _ask(spec.check_run, config)
  prediction = f.get("prediction", processes.AUTO)
  if spec.predictions:
    _require(prediction in spec.predictions,
             f"diffusion.prediction={prediction!r} is not a {name} prediction; use one "
             f"of {spec.predictions}, or auto ({spec.default_prediction})")
  elif prediction != processes.AUTO:
    _warn(f"diffusion.prediction={prediction!r} has no effect: diffusion.process={name} "
          "does not read it (set it to auto)")
  own = {x.key for x in spec.fields}
  for other in processes.REGISTRY.values():
    for x in other.fields:
      if x.key not in own and f.get(x.key, x.default) != x.default:
        _warn(f"diffusion.{x.key}={f[x.key]!r} has no effect: only diffusion.process="
              f"{other.name} reads it, and this run's is {name} (its default: {x.default!r})")
        own.add(x.key)   # one warning per key


def _warn(msg: str) -> None:
  warnings.warn(msg, ConfigWarning, stacklevel=4)


def _check_time_embedding(config) -> None:
  """model.time_embedding and model.time_scale (after the process is checked)."""
  m = config.model
  kind, scale = m.get("time_embedding", "auto"), m.get("time_scale", "auto")
  _require(kind == "auto" or kind in TIME_EMBEDDINGS,
           f"model.time_embedding={kind!r} is unknown; use auto or one of {TIME_EMBEDDINGS}")
  _require(scale == "auto" or (processes.base.is_finite(scale) and scale > 0),
           f"model.time_scale={scale!r} must be a number > 0 (it multiplies the network's "
           "time input) or auto")
  process = config.diffusion.get("process", processes.DEFAULT)
  spec = processes.spec(process)
  kind = spec.time_embedding if kind == "auto" else kind
  _require(scale != "auto" or kind in spec.time_scales,
           f"model.time_embedding={kind} has no automatic scale for diffusion.process="
           f"{process}; set --config.model.time_scale=S (the time input is multiplied by S)")


def time_embedding(config) -> tuple[str, float]:
  """(kind, scale) of the network's time embedding, "auto" resolved for the process.

  Args:
    config: a run config (validated); missing keys count as "auto".
  Returns:
    kind in TIME_EMBEDDINGS and the float factor on the network's time input.
  """
  m = config.model
  process = config.diffusion.get("process", processes.DEFAULT)
  kind, scale = m.get("time_embedding", "auto"), m.get("time_scale", "auto")
  spec = processes.spec(process)
  kind = spec.time_embedding if kind == "auto" else kind
  if scale == "auto":
    if kind not in spec.time_scales:
      raise ConfigError(f"model.time_embedding={kind} has no automatic scale for "
                        f"diffusion.process={process}; set --config.model.time_scale=S")
    scale = spec.time_scales[kind]
  return kind, float(scale)


def _check_training(config, num_data_shards: int) -> None:
  t, o, s = config.training, config.optim, config.sampling

  _require(isinstance(t.batch_size, int) and t.batch_size >= 1,
           f"training.batch_size={t.batch_size!r} must be a positive integer")
  _require(t.batch_size % num_data_shards == 0,
           f"training.batch_size={t.batch_size} is not divisible by the {num_data_shards} "
           f"data shards (devices); use a multiple of {num_data_shards}")
  _require(isinstance(t.fsdp, int) and t.fsdp >= 1,
           f"training.fsdp={t.fsdp!r} must be a positive integer (1 = replicated params)")
  _require(isinstance(t.num_steps, int) and t.num_steps >= 1,
           f"training.num_steps={t.num_steps!r} must be a positive integer")
  for k in ("log_every", "checkpoint_every", "sample_every"):
    _require(isinstance(t[k], int) and t[k] >= 0,
             f"training.{k}={t[k]!r} must be an integer >= 0 (0 = never)")
  _require(t.log_every >= 1, "training.log_every must be >= 1")
  k = t.steps_per_dispatch
  _require(isinstance(k, int) and k >= 1,
           f"training.steps_per_dispatch={k!r} must be a positive integer (1 = one "
           "update per call)")
  for name, every in (("training.log_every", t.log_every),
                      ("training.checkpoint_every", t.checkpoint_every),
                      ("training.sample_every", t.sample_every),
                      ("eval.every_steps", config.eval.every_steps)):
    _require(not (isinstance(every, int) and every > 0 and every % k),
             f"{name}={every} is not a multiple of training.steps_per_dispatch={k}; "
             f"use a multiple of {k}, or a steps_per_dispatch that divides it")
  _require(t.keep_checkpoints >= 1, "training.keep_checkpoints must be >= 1")
  _require(0.0 <= t.label_dropout < 1.0,
           f"training.label_dropout={t.label_dropout} must be in [0, 1)")
  _require(t.remat in REMATS,
           f"training.remat={t.remat!r} is unknown; use one of {REMATS}")
  _require(t.nan_policy in ("stop", "skip"),
           f"training.nan_policy={t.nan_policy!r} must be stop or skip")
  _check_posthoc_ema(config)
  for key in ("init_from", "teacher"):
    v = t.get(key, "")
    _require(isinstance(v, str),
             f"training.{key}={v!r} must be a workdir path (a string; \"\" = none)")
  spec = processes.REGISTRY.get(config.diffusion.get("process", processes.DEFAULT))
  _require(not t.get("teacher", "") or spec is None or "teacher" in spec.loss_inputs,
           f"training.teacher is set but diffusion.process="
           f"{config.diffusion.get('process', processes.DEFAULT)!r} does not distil; drop "
           "training.teacher, or use a process that takes one "
           f"{tuple(n for n, x in processes.REGISTRY.items() if 'teacher' in x.loss_inputs)}")

  _check_repa(config)

  _require(o.lr > 0, f"optim.lr={o.lr} must be > 0")
  _require(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
  _require(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0 (0 = off)")
  _require(0.0 <= o.ema_decay < 1.0, f"optim.ema_decay={o.ema_decay} must be in [0, 1)")

  _require(s.churn >= 0, f"sampling.churn={s.churn} must be >= 0 (0 = deterministic)")
  _check_sampler(config, "sampling")
  _require(isinstance(s.num_samples, int) and s.num_samples >= 1,
           f"sampling.num_samples={s.num_samples!r} must be a positive integer")
  _check_guidance(config, "sampling")
  check_guidance_interval(s.guidance_interval, "sampling.guidance_interval")
  _require(s.get("labels", "balanced") in LABEL_RULES,
           f"sampling.labels={s.get('labels')!r} is unknown; use one of {LABEL_RULES}")
  _require(isinstance(s.guide_workdir, str),
           f"sampling.guide_workdir={s.guide_workdir!r} must be a workdir path (a string; "
           "\"\" = no guide model)")
  _require(s.s_noise > 0 and s.s_tmin >= 0 and s.s_tmax >= s.s_tmin,
           f"sampling.s_noise={s.s_noise}, s_tmin={s.s_tmin}, s_tmax={s.s_tmax}: need "
           "s_noise > 0 and 0 <= s_tmin <= s_tmax")
  # The options only the process's samplers read (DDPM: ddpm_variance, sigma_index).
  _ask(processes.spec(config.diffusion.get("process", processes.DEFAULT)).check_sampling,
       s, "sampling")

  e = config.eval
  _require(isinstance(e.every_steps, int) and e.every_steps >= 0,
           f"eval.every_steps={e.every_steps!r} must be an integer >= 0 (0 = never)")
  metrics = tuple(e.metrics) if isinstance(e.metrics, (tuple, list)) else (e.metrics,)
  unknown = [k for k in metrics if k not in METRICS]
  _require(not unknown and len(metrics) >= 1,
           f"eval.metrics={metrics!r}: unknown metric {unknown[0] if unknown else None!r}; "
           f"use some of {METRICS}")
  _require(isinstance(e.num_samples, int) and e.num_samples >= 2,
           f"eval.num_samples={e.num_samples!r} must be an integer >= 2 (a covariance "
           "needs two samples)")
  _require(isinstance(e.batch_size, int) and e.batch_size >= 1,
           f"eval.batch_size={e.batch_size!r} must be a positive integer")
  _require(e.get("inception_protocol", "pytorch_fid") in INCEPTION_PROTOCOLS,
           f"eval.inception_protocol={e.get('inception_protocol')!r} is unknown; use one of "
           f"{INCEPTION_PROTOCOLS}")
  if e.every_steps:   # otherwise checked by --mode eval (eval_run.evaluate)
    _check_sampler(config, "eval")
  _require(isinstance(e.feature_batch_size, int) and e.feature_batch_size >= 1,
           f"eval.feature_batch_size={e.feature_batch_size!r} must be a positive integer")
  _require(e.kid_subset_size >= 2 and e.kid_subsets >= 1,
           "eval.kid_subset_size must be >= 2 and eval.kid_subsets >= 1")
  _check_bpd(config)
  if e.every_steps:   # in-loop evaluation: fail now, not hours into training
    check_eval_inputs(config)


def _positive_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _check_repa(config) -> None:
  """training.repa: a backbone with hidden tokens, the block, the weight, the
  projector, the encoder's input side, a process it is defined for, pixels."""
  r = config.training.get("repa")
  if r is None:
    return
  enc = r.encoder
  _require(isinstance(enc, str),
           f"training.repa.encoder={enc!r} must be an encoder folder (a string; \"\" = off)")
  if not enc:
    return
  m = config.model
  name = m.get("name", models.DEFAULT)
  size, _ = _model_size(config)
  hidden = models.spec(name).hidden_tokens(m, size, size)
  with_tokens = tuple(n for n in models.names()
                      if type(models.spec(n)).hidden_tokens is not models.Spec.hidden_tokens)
  _require(hidden is not None,
           f"training.repa needs a network that exposes its hidden tokens; model.name="
           f"{name!r} does not: use one of {with_tokens}, or set training.repa.encoder=''")
  blocks = hidden[0]
  _require(_positive_int(r.depth) and r.depth <= blocks,
           f"training.repa.depth={r.depth!r} must be a block in [1, {blocks}] (the "
           f"network's blocks); REPA uses 8 of SiT-XL's 28, about a third")
  _require(processes.base.is_finite(r.weight) and r.weight >= 0,
           f"training.repa.weight={r.weight!r} must be a number >= 0 (REPA: 0.5)")
  _require(r.projector in REPA_PROJECTORS,
           f"training.repa.projector={r.projector!r} is unknown; use one of "
           f"{REPA_PROJECTORS}")
  _require(_positive_int(r.projector_dim),
           f"training.repa.projector_dim={r.projector_dim!r} must be a positive integer "
           "(REPA: 2048)")
  k = r.get("projector_kernel", 3)
  _require(_positive_int(k) and k % 2 == 1,
           f"training.repa.projector_kernel={k!r} must be an odd positive integer (the "
           "conv projector keeps the token grid; iREPA: 3)")
  norm = r.get("spatial_norm", "none")
  _require(norm in REPA_SPATIAL_NORMS,
           f"training.repa.spatial_norm={norm!r} is unknown; use one of {REPA_SPATIAL_NORMS}")
  alpha = r.get("zscore_alpha", 0.6)
  _require(processes.base.is_finite(alpha),
           f"training.repa.zscore_alpha={alpha!r} must be a finite number (iREPA: 0.6)")
  process = config.diffusion.get("process", processes.DEFAULT)
  _require(processes.spec(process).repa,
           f"training.repa is not defined for diffusion.process={process!r}; use one of "
           f"{tuple(n for n, x in processes.REGISTRY.items() if x.repa)}, or set "
           "training.repa.encoder=''")
  _require(not is_latent(config),
           "training.repa with latent diffusion needs each latent's source pixels for the "
           "encoder, which the latent cache does not keep; train REPA on pixels for now, "
           "or set training.repa.encoder=''")
  # The folder itself is read when training starts (ddx.repa.load_encoder), as
  # training.teacher's: sampling or evaluating a finished REPA run never needs it.
  _require(_positive_int(r.resolution),
           f"training.repa.resolution={r.resolution!r} must be a positive integer, a "
           "multiple of the encoder's patch size (REPA: 224 = 16 patches of 14)")


# sigma_rel of the power-function EMA with gamma = 0 (the uniform average of all
# steps so far): the widest profile ddx tracks or reconstructs (ddx.posthoc_ema).
MAX_SIGMA_REL = 12 ** -0.5


def sigma_rel_problem(value: float) -> str | None:
  """Why value is not a profile width ddx can track or reconstruct, or None.

  The bound is printed with repr: rounded (0.2887), a value just above it
  would read as inside it.
  """
  if not value > 0:
    return f"{value!r} is not greater than 0"
  if value > MAX_SIGMA_REL:
    return (f"{value!r} is greater than the largest width {MAX_SIGMA_REL!r} "
            "(1/sqrt(12), the uniform average of all steps)")
  return None


def _check_posthoc_ema(config: ml_collections.ConfigDict) -> None:
  """training.posthoc_ema: the snapshot interval and the tracked profiles."""
  p, k = config.training.posthoc_ema, config.training.steps_per_dispatch
  every = p.snapshot_every
  _require(isinstance(every, int) and not isinstance(every, bool) and every >= 0,
           f"training.posthoc_ema.snapshot_every={every!r} must be an integer >= 0 "
           "(steps between snapshots; 0 = off)")
  _require(every % k == 0,
           f"training.posthoc_ema.snapshot_every={every} is not a multiple of "
           f"training.steps_per_dispatch={k}; use a multiple of {k}")
  rels = tuple(p.sigma_rels) if isinstance(p.sigma_rels, (tuple, list)) else (p.sigma_rels,)
  _require(len(rels) >= 1 and all(isinstance(r, (int, float)) and not isinstance(r, bool)
                                  for r in rels),
           f"training.posthoc_ema.sigma_rels={p.sigma_rels!r} must be a tuple of numbers, "
           "e.g. (0.05, 0.10)")
  bad = [p for p in map(sigma_rel_problem, rels) if p]
  _require(not bad,
           f"training.posthoc_ema.sigma_rels: {bad[0] if bad else None}; use values "
           "such as (0.05, 0.10)")
  _require(len(set(rels)) == len(rels),
           f"training.posthoc_ema.sigma_rels={rels} repeats a value; track distinct "
           "profiles, e.g. (0.05, 0.10)")


def _check_bpd(config: ml_collections.ConfigDict) -> None:
  """The eval.bpd_* keys (checked whether or not eval.metrics has bpd)."""
  e = config.eval
  process = config.diffusion.get("process", processes.DEFAULT)
  estimators = processes.spec(process).bpd_estimators
  for key, valid in (("bpd_estimator", BPD_ESTIMATORS), ("bpd_trace", BPD_TRACES),
                     ("bpd_probe", BPD_PROBES), ("bpd_solver", BPD_SOLVERS)):
    _require(e[key] in valid, f"eval.{key}={e[key]!r} is unknown; use one of {valid}")
  metrics = tuple(e.metrics) if isinstance(e.metrics, (tuple, list)) else (e.metrics,)
  if not estimators:   # a few-step process: no likelihood at all
    _require("bpd" not in metrics,
             f"eval.metrics has bpd, but diffusion.process={process} has no likelihood "
             "(bits/dim); drop bpd from eval.metrics")
    return
  _require(e.bpd_estimator in estimators,
           f"eval.bpd_estimator={e.bpd_estimator} is not an estimator of diffusion.process="
           f"{process}; use one of {estimators}, e.g. --config.eval.bpd_estimator=ode")
  for key in ("bpd_probes", "bpd_steps"):
    _require(isinstance(e[key], int) and not isinstance(e[key], bool) and e[key] >= 1,
             f"eval.{key}={e[key]!r} must be a positive integer")
  for key in ("bpd_rtol", "bpd_atol"):
    _require(isinstance(e[key], (int, float)) and e[key] > 0,
             f"eval.{key}={e[key]!r} must be > 0 (an adaptive-solver tolerance, e.g. 1e-5)")
  top = config.diffusion.num_timesteps
  _require(isinstance(e.bpd_vlb_terms, int) and 0 <= e.bpd_vlb_terms <= top,
           f"eval.bpd_vlb_terms={e.bpd_vlb_terms!r} must be an integer in [0, T={top}] "
           "(0 = all T terms)")
  _require(isinstance(e.bpd_num_images, int) and e.bpd_num_images >= 0,
           f"eval.bpd_num_images={e.bpd_num_images!r} must be an integer >= 0 (0 = all "
           "held-out images)")
  _require(isinstance(e.bpd_split, str) and bool(e.bpd_split),
           f"eval.bpd_split={e.bpd_split!r} must name a tfds split, e.g. test")


def _check_sampler(config: ml_collections.ConfigDict, group: str) -> None:
  """The sampler, steps, eta, spacing and churn of a group that samples
  (sampling, eval), asked of the process's Spec as `ddx.sample` asks it."""
  g, f = config[group], config.diffusion
  spec = processes.spec(f.get("process", processes.DEFAULT))
  churn = g.get("churn", 0.0)
  sampler = _ask(spec.check_sampler, g.sampler, spacing=g.get("spacing", "auto"),
                 churn=bool(churn), group=group)
  top = spec.max_steps(f, sampler)
  _require(isinstance(g.steps, int) and 1 <= g.steps <= top,
           f"{group}.steps={g.steps!r} must be an integer in [1, "
           f"{'T=' if sampler in spec.spaced_samplers else ''}{top}]")
  _ask(spec.check_steps, f, sampler, g.steps, f"{group}.steps")
  _require(g.eta >= 0, f"{group}.eta={g.eta} must be >= 0")


def _check_guidance(config: ml_collections.ConfigDict, group: str) -> None:
  """Classifier-free guidance (w != 1, no guide_workdir) needs a trained null
  label: training.label_dropout > 0."""
  w = config[group].guidance_scale
  _require(w == 1.0 or config.model.num_classes == 0 or config.training.label_dropout > 0
           or bool(config[group].get("guide_workdir", "")),
           f"{group}.guidance_scale={w} needs the unconditional model, but "
           "training.label_dropout=0 never trains the null label; set "
           f"--config.{group}.guidance_scale=1 or train with label_dropout > 0")


def guidance_interval_ends(interval) -> tuple:
  """The interval as () or (lo, hi) floats; hi may be inf (no upper end).

  Besides numbers it takes what the command line can write: "inf" as an end
  (`"(0.28, 'inf')"`), and the unquoted `"(0.28, inf)"`, which ml_collections
  cannot read as a tuple and passes on as one string. Values that are not
  numbers at all (traced ends inside jit) are returned as they are.
  """
  if isinstance(interval, (tuple, list)) and len(interval) == 1 and isinstance(
      interval[0], str):
    text = interval[0].strip()
    if text[:1] in "([" and text[-1:] in ")]":
      text = text[1:-1]
    interval = [v for v in text.split(",") if v.strip()]
  if not isinstance(interval, (tuple, list)):
    return interval
  out = []
  for v in interval:
    if isinstance(v, str):
      try:
        v = float(v.strip())
      except ValueError:
        pass   # left for check_guidance_interval to name
    out.append(v)
  return tuple(out)


def check_guidance_interval(interval, name: str = "sampling.guidance_interval") -> None:
  """Raises ConfigError unless `interval` is () (guide at every step) or (lo, hi)
  of two numbers with 0 <= lo < hi; hi = inf (written `inf` on the command line)
  has no upper end and includes σ = ∞, where flow, MeanFlow, shortcut and
  consistency sampling starts. Traced values inside jit are not checked."""
  fix = ("use () to guide at every step, or (lo, hi) with 0 <= lo < hi, e.g. "
         "\"(0.28, 2.9)\", or \"(0.28, inf)\" for no upper end")
  interval = guidance_interval_ends(interval)
  _require(isinstance(interval, (tuple, list)) and len(interval) in (0, 2)
           and not any(isinstance(v, (str, bool)) for v in interval),
           f"{name}={interval!r} must be () or two numbers (lo, hi); {fix}")
  try:
    ends = [float(v) for v in interval]
  except Exception:   # traced (inside jit): checked where it was made
    return
  _require(not ends or (0.0 <= ends[0] < ends[1] and not math.isnan(ends[1])),
           f"{name}={tuple(interval)!r} needs 0 <= lo < hi; {fix}")


def check_eval_inputs(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError unless config.eval can run: its sampler fits the process,
  and eval.metrics fit this config's images.

  fid/kid/is need eval.inception_weights to name an existing file; the digits
  metric scores 8x8 grey images only.
  """
  e, d = config.eval, config.data
  _check_sampler(config, "eval")
  metrics = tuple(e.metrics)
  needs = [k for k in metrics if k in INCEPTION_METRICS]
  if needs:
    _require(bool(e.inception_weights),
             f"eval.metrics has {needs[0]} but eval.inception_weights is empty; convert "
             "pytorch-fid's Inception weights (README: Evaluation) and pass "
             f"--config.eval.inception_weights=FILE.npz, or drop {', '.join(needs)} from "
             "eval.metrics")
    _require(os.path.isfile(e.inception_weights),
             f"eval.inception_weights={e.inception_weights} does not exist; convert "
             "pytorch-fid's weights with python -m ddx.inception --convert (README: Evaluation)")
  if "fd_dinov2" in metrics:
    _require(bool(e.get("dinov2_weights", "")),
             "eval.metrics has fd_dinov2 but eval.dinov2_weights is empty; convert DINOv2 "
             "ViT-L/14 (docs/encoders.md) and pass --config.eval.dinov2_weights=FOLDER, or "
             "drop fd_dinov2 from eval.metrics")
    _require(os.path.isdir(e.dinov2_weights),
             f"eval.dinov2_weights={e.dinov2_weights} is not a folder; convert DINOv2 with "
             "python -m ddx.convert FILE.pth --workdir FOLDER (docs/encoders.md)")
  if e.get("reference", ""):
    _require(os.path.isfile(e.reference),
             f"eval.reference={e.reference} does not exist; pass an ADM reference batch "
             "(.npz with arr_0 and/or mu/sigma), or \"\" to compare with config.data")
  if "bpd" in metrics:
    _check_bpd(config)
    _require(e.bpd_solver != "adaptive" or importlib.util.find_spec("diffrax") is not None,
             "eval.bpd_solver=adaptive needs diffrax, which is not installed; pip install "
             "diffrax, or use --config.eval.bpd_solver=rk4")
  if "digits" in metrics:
    _require(d.image_size == 8 and d.channels == 1,
             f"eval.metrics has digits, which scores 8x8 grey digits, but the images are "
             f"{d.image_size}x{d.image_size}x{d.channels}; use "
             "--config.eval.metrics=\"('fid','kid','is')\" with Inception weights")


def image_shape(config) -> tuple[int, int, int]:
  """(H, W, C) of what the diffusion model sees (its samples, its input).

  Pixels: data.image_size square, data.channels. With autoencoder.path set,
  the latents: image_size / autoencoder.downsample square, latent_channels.
  """
  if is_latent(config):
    a = config.autoencoder
    size = config.data.image_size // a.downsample
    return (size, size, a.latent_channels)
  return pixel_shape(config)


def is_latent(config) -> bool:
  """Whether the diffusion model runs on autoencoder latents: autoencoder.path
  is set, or the data is a latent cache (an imported DiT without its VAE)."""
  a = config.get("autoencoder")
  return a is not None and (bool(a.path) or config.data.name == "latents")


def pixel_shape(config) -> tuple[int, int, int]:
  """(H, W, C) of the run's images (decoded samples, data): data.image_size square."""
  return (config.data.image_size, config.data.image_size, config.data.channels)


def from_file(path: str) -> ml_collections.ConfigDict:
  """get_config() of the config file at `path`, loaded by path as --config loads it.

  configs/ is not a package; a config derives from another with
  `config.from_file(os.path.join(os.path.dirname(__file__), "digits.py"))`.
  Raises ConfigError (one line) for a missing file or one without get_config.
  """
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path} does not exist; pass an existing file, "
                      "e.g. --config configs/digits.py")
  spec = importlib.util.spec_from_file_location(
      "ddx_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} has no get_config(); define "
                      "get_config() returning an ml_collections.ConfigDict")
  return module.get_config()


def to_dict(config: ml_collections.ConfigDict) -> dict:
  """A JSON-safe plain dict of the config (tuples become lists)."""
  return json.loads(config.to_json())


def from_dict(d: dict) -> ml_collections.ConfigDict:
  """Inverse of to_dict: lists become tuples again so the config is hashable."""
  def fix(v):
    if isinstance(v, dict):
      return {k: fix(x) for k, x in v.items()}
    if isinstance(v, list):
      return tuple(fix(x) for x in v)
    return v
  return ml_collections.ConfigDict(fix(d))


# Keys whose default ("auto") may one day resolve to something else than what a
# ddx without the key did: a saved config that lacks them gets that old behaviour.
_BEFORE_KEY = {"model": {"time_embedding": "positional", "time_scale": 1.0}}


def with_defaults(d: dict) -> ml_collections.ConfigDict:
  """A saved config dict (config.json, a checkpoint's config) with today's
  defaults filled in for keys that the ddx which wrote it did not have (for
  the keys of `_BEFORE_KEY`, what that ddx did; "auto" ones resolved for its
  process)."""
  def merge(base, new):
    out = dict(base)
    for k, v in new.items():
      out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out
  config = from_dict(merge(to_dict(base_config()), merge(_BEFORE_KEY, d)))
  processes.resolve_defaults(config)
  return config


# The groups that make a trained run what it is: --mode sample and eval take
# them from the run's config.json, whatever --config says.
RUN_GROUPS = ("diffusion", "model")


def with_run(cli: ml_collections.ConfigDict, saved: dict):
  """The command line's config with the run's own RUN_GROUPS (`saved`: its
  config.json), so sampling options are checked against the process and
  network the run trained, not the --config file's.

  Returns:
    (the config, ["diffusion.process: 'ddpm' -> 'meanflow'", ...] the keys
    where --config differed from the run).
  """
  mine, run = to_dict(cli), to_dict(with_defaults(saved))
  changed = []
  for group in RUN_GROUPS:
    for key in sorted(set(mine.get(group, {})) | set(run.get(group, {}))):
      a, b = mine.get(group, {}).get(key), run.get(group, {}).get(key)
      if a != b and a != processes.AUTO:
        changed.append(f"{group}.{key}: {a!r} -> {b!r}")
    mine[group] = run[group]
  return from_dict(mine), changed


def write_json(config: ml_collections.ConfigDict, workdir) -> None:
  """Writes workdir/config.json, the run's config as every ddx workdir holds it
  (training, `ddx.convert`, `ddx.posthoc_ema`): sorted keys, written to
  config.json.tmp and renamed, so a reader never sees half a file. Local
  paths or gs:// (etils.epath)."""
  from etils import epath
  path = epath.Path(workdir) / "config.json"
  tmp = epath.Path(str(path) + ".tmp")
  tmp.write_text(json.dumps(to_dict(config), indent=2, sort_keys=True))
  tmp.replace(path)


def freeze(config: ml_collections.ConfigDict) -> ml_collections.FrozenConfigDict:
  """A hashable copy of the config (the static part of `ddx.Model`)."""
  return ml_collections.FrozenConfigDict(from_dict(to_dict(config)))


# Keys that may change a train state's structure (shapes, which leaves exist).
# Whether they do is decided from the shapes themselves (ddx.checkpoint); these
# are the keys named when they do. Everything else (lr, dropout, cadences,
# sampling, eval, num_steps, ...) never blocks a resume.
_STRUCTURE_GROUPS = ("model", "optim", "data.image_size", "data.channels",
                     "autoencoder.downsample", "autoencoder.latent_channels",
                     "training.repa")
_NEVER_STRUCTURE = ("model.dtype", "model.dropout", "optim.lr", "optim.warmup_steps",
                    "optim.ema_decay", "optim.ema_warmup", "optim.beta1", "optim.beta2",
                    "optim.eps", "model.attention", "model.norm_kernel",
                    "training.repa.depth", "training.repa.weight",
                    "training.repa.resolution", "training.repa.spatial_norm",
                    "training.repa.zscore_alpha")


def structure_changes(old, new) -> list[tuple[str, object, object]]:
  """(key, old value, new value) for every key that may change the state's structure."""
  def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
      key = f"{prefix}{k}"
      if isinstance(v, dict):
        out.update(flat(v, key + "."))
      else:
        out[key] = v
    return out
  a, b = flat(to_dict(old)), flat(to_dict(new))
  keys = sorted(k for k in set(a) | set(b)
                if any(k == g or k.startswith(g + ".") for g in _STRUCTURE_GROUPS)
                and k not in _NEVER_STRUCTURE and a.get(k) != b.get(k))
  return [(k, a.get(k), b.get(k)) for k in keys]
