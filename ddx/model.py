"""A trained model as one pytree, its network, and sampling from it (`sample_fn`).

`ddx.Model` holds the Flax variables as pytree leaves and the run's frozen
config as static data, so `sample_fn(model, rng)` needs nothing else, and
jit caches one program per (config, shapes, static sampling options). This is
the face of ddx for trained networks: guidance, jit and device sharding; the
pure samplers it drives are in `ddx.sampling`.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ddx import config as config_lib
from ddx import models
from ddx import options as options_lib
from ddx import parallel
from ddx import processes
from ddx import sampling
from ddx.processes import common as process_common
from ddx.processes.ddpm.schedules import Schedule


def process_from_config(diffusion_config) -> processes.Process:
  """The process a run trains and samples (`ddx.processes`, by diffusion.process):
  a DDPMProcess (a `Schedule`), EDMProcess (an `EDM`) or FlowProcess (a `Flow`)."""
  return processes.from_config(diffusion_config)


def mean_output(config, out: jnp.ndarray) -> jnp.ndarray:
  """The network's prediction channels: the first C of a learn_sigma (2C) output.

  The variance channels of a learn_sigma network (official DiT checkpoints)
  are not trained or used by ddx.
  """
  if config.model.get("learn_sigma", False):
    return out[..., :out.shape[-1] // 2]
  return out


def network(config):
  """The Flax network a run config names (config.model.name: unet | dit), with its
  time embedding resolved for the run's process (config.time_embedding) and
  the process's second time input and log-variance head (its Spec).

  Raises ConfigError, before anything is traced, when model.attention needs
  a backend this process does not have (cudnn without a GPU, ...).
  """
  attention = config.model.get("attention", "xla")
  why = models.attention.unavailable(attention, jax.default_backend())
  if why:
    raise config_lib.ConfigError(
        f"model.attention={attention!r}: {why}; use --config.model.attention=xla "
        "(or auto)")
  kind, scale = config_lib.time_embedding(config)
  spec = processes.spec(config.diffusion.get("process", "ddpm"))
  return models.build(config.model, time_embedding=kind, time_scale=scale,
                      second_time=spec.second_time, logvar=spec.logvar)


def init_variables(config, rng: jax.Array) -> dict:
  """Initialises a run's network from a dummy batch of one image.

  Use under `jax.eval_shape` for shapes only.
  Returns:
    {"params": ...} plus {"batch_stats": ...} (running mean 0, variance 1)
    for a BatchNorm network.
  """
  x = jnp.zeros((1,) + config_lib.image_shape(config), jnp.float32)
  two = processes.spec(config.diffusion.get("process", "ddpm")).second_time
  t = jnp.zeros((1, 2), jnp.float32) if two else jnp.zeros((1,), jnp.int32)
  labels = jnp.zeros((1,), jnp.int32) if config.model.num_classes else None
  return dict(network(config).init(rng, x, t, labels))


@flax.struct.dataclass
class Model:
  """A trained network: weights as pytree leaves, its config as static data.

  `variables` is the Flax variables dict ({"params": ...}, EMA weights when
  loaded by `ddx.load`; plus "batch_stats", BatchNorm's running statistics,
  for a model.norm = batch network, which sampling normalises with).
  `config` is the run's frozen, hashable config
  (ml_collections.FrozenConfigDict) and says the network, the process and the
  image shape. A latent model (`config.autoencoder`) also holds its
  `autoencoder` (a `ddx.autoencoder.Autoencoder`, whose weights are leaves
  too), which `sample_fn` decodes with; None for a pixel model, or a latent
  model whose samples stay latents.
  """
  variables: Any
  config: Any = flax.struct.field(pytree_node=False)
  autoencoder: Any = None

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of what the diffusion model samples (latents for a latent model)."""
    return config_lib.image_shape(self.config)

  @property
  def is_latent(self) -> bool:
    return config_lib.is_latent(self.config)

  @property
  def process(self):
    """The run's process (`ddx.processes.Process`): for ddpm a `Schedule`, for
    edm a `ddx.edm.EDM`, for flow a `ddx.flow.Flow`, each with the protocol's
    methods (loss, denoiser, sample, ode)."""
    # Concrete even inside a jit trace: a function of the static config, and
    # samplers may need its values (log-SNR spacing).
    with jax.ensure_compile_time_eval():
      return process_from_config(self.config.diffusion)

  @property
  def schedule(self) -> Schedule:
    """The DDPM schedule of a ddpm-process model."""
    process = self.process
    if getattr(process, "alphas_cumprod", None) is None:   # no DDPM arrays
      raise ValueError(f"model.schedule: this model's diffusion.process is "
                       f"{self.config.diffusion.process}, which has no DDPM schedule; "
                       "use model.process")
    return process

  def network(self):
    return network(self.config)

  def apply(self, x: jnp.ndarray, t: jnp.ndarray, labels=None) -> jnp.ndarray:
    """The network's raw output (in the run's `diffusion.prediction`), no guidance.

    Args:
      x: [B, H, W, C] float32 noisy images.
      t: [B] the network's time input (DDPM: int32 index i in [0, T)).
      labels: [B] int32 in [0, num_classes] (num_classes = the null label) for
        a class-conditional model; None = unconditional (the null label).
    Returns:
      [B, H, W, C] float32.
    """
    return self.network().apply(self.variables, x, t, labels)


def _native(model: Model, labels) -> sampling.DenoiseFn:
  """The model's network with `labels` fixed, behind its process's wrapper
  (`process_denoiser`): what `ddx.sample` takes, no guidance."""
  net = lambda x, t: mean_output(model.config, model.apply(x, t, labels))
  return process_denoiser(model, net)


def denoiser(model: Model, labels=None, guidance_scale=1.0, guided: bool = False, *,
             interval=(), guide: Optional[Model] = None) -> sampling.DenoiseFn:
  """The model as what `ddx.sample` takes for its process, guided if `guided`.

  Guidance mixes at the process's own level, after its wrapper
  (`process.denoiser`; e.g. DDPM's raw output in diffusion.prediction, EDM's
  D(x; σ), flow's velocity): every conversion between them is affine in the network output for a fixed
  x_t, so mixing there is mixing the raw outputs, and there the time is the
  process's own, which `interval` needs.
    classifier-free (guide None): out = u + w·(c - u), c conditioned on
      `labels`, u on the null label, from ONE network call on the doubled
      batch (x twice, time twice, labels then null labels).
    autoguidance (guide given; Karras et al. 2024): out = g + w·(c - g),
      c the model and g the guide, both on `labels` (None for unconditional
      models). CFG and autoguidance do not combine in one call.
  With interval = (lo, hi), an example whose noise level σ =
  model.process.noise_level(t) is outside (lo, hi] gets the plain model output c (exactly,
  not u + 1·(c - u)); when no example of the batch is inside, a lax.cond
  skips the second evaluation (the null half, or the guide).

  Args:
    model: the model (its process decides the wrapper).
    labels: int32 [B] class labels, or None (unconditional / null label).
    guidance_scale: w, a float or float32 scalar (traced under jit).
    guided: whether to mix at all (False: the plain conditional model).
    interval: () = at every step; (lo, hi) float scalars (traced or not).
    guide: the guide model (autoguidance), checked by `check_guide`.
  Returns:
    denoise_fn(x [B, H, W, C], t [B]) -> [B, H, W, C] (float32 when guided).
  """
  plain = _native(model, labels)
  if not guided:
    return plain
  w = guidance_scale
  if guide is not None:
    weak = _native(guide, labels)
    pair = lambda x, t: (plain(x, t), weak(x, t))
  else:
    if labels is None:
      raise ValueError("classifier-free guidance needs labels (a class-conditional "
                       "model); pass labels=, or guide_model= for autoguidance")
    null = jnp.full_like(labels, model.config.model.num_classes)
    both = _native(model, jnp.concatenate([labels, null]))

    def pair(x, t):
      return tuple(jnp.split(both(jnp.concatenate([x, x]), jnp.concatenate([t, t])), 2))

  mix = lambda c, u: (u + w * (c - u)).astype(jnp.float32)
  if not interval:
    return lambda x, t: mix(*pair(x, t))
  lo, hi = interval

  def f(x, t):
    sigma = model.process.noise_level(t)
    inside = (sigma > lo) & (sigma <= hi)

    def some_inside(x, t):
      c, u = pair(x, t)   # outside examples take c from the same call
      mask = inside.reshape(inside.shape + (1,) * (x.ndim - inside.ndim))
      return jnp.where(mask, mix(c, u), c.astype(jnp.float32))
    return jax.lax.cond(jnp.any(inside), some_inside,
                        lambda x, t: plain(x, t).astype(jnp.float32), x, t)
  return f


def process_denoiser(model: Model, fn):
  """The raw (guided) network `fn(x, time)` as what `ddx.sample` takes for the
  model's process (`process.denoiser`, each process's own: e.g. DDPM's output
  unchanged, EDM's D(x; σ) with its preconditioning, flow's velocity at t)."""
  return model.process.denoiser(fn)


def shard_batch(x):
  """Splits a sample batch over all devices when it divides evenly; the scan
  carry inherits the sharding, so every step runs data-parallel."""
  mesh = parallel.make_mesh()
  n = parallel.num_data_shards(mesh)
  if n > 1 and x.shape[0] % n == 0:
    x = jax.lax.with_sharding_constraint(x, parallel.data_sharded(mesh))
  return x


def traced_options(o: options_lib.SampleOptions) -> options_lib.SampleOptions:
  """`o` with its float knobs as float32 arrays, as `sample_jit` takes it: one
  program whatever their Python type."""
  return o.replace(**{k: jnp.float32(getattr(o, k)) for k in options_lib.FLOAT_FIELDS},
                   guidance_interval=tuple(jnp.float32(v) for v in o.guidance_interval))


@functools.partial(jax.jit, static_argnames=("guided", "return_trajectory", "decode"))
def sample_jit(model, rng, labels, x_T, options: options_lib.SampleOptions, *,
               guided, return_trajectory=False, decode=True, guide=None):
  """`sample_fn`'s compiled program; `options` already resolved (see sample_fn).

  `options` is a pytree: its float knobs are traced arguments, its other
  fields static (one program per value). `guide` (autoguidance) is a model
  pytree like `model`: its weights are arguments too.
  """
  o = options
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  fn = denoiser(model, labels, f32(o.guidance_scale), guided,
                interval=tuple(f32(v) for v in o.guidance_interval), guide=guide)
  shape = (o.num_samples,) + model.image_shape
  if x_T is None:
    x_T = sampling.initial_noise(rng, shape)
  sampler, steps, eta = o.sampler, o.steps, f32(o.eta)
  clip_x0, ddpm_variance = o.clip_x0, o.ddpm_variance
  spacing = None if o.spacing == "auto" else o.spacing
  extra = {}
  if sampler == "stochastic":
    extra = dict(churn=f32(o.churn), s_tmin=f32(o.s_tmin), s_tmax=f32(o.s_tmax),
                 s_noise=f32(o.s_noise))
  res = process_common.sample(fn, model.process, rng, shape,
                        sampler=sampler, steps=steps, eta=eta, x_T=shard_batch(x_T),
                        clip_x0=clip_x0, ddpm_variance=ddpm_variance, spacing=spacing,
                        return_trajectory=return_trajectory, sigma_index=o.sigma_index,
                        **extra)
  x, traj = res if return_trajectory else (res, None)
  if model.is_latent and decode and model.autoencoder is not None:
    x = decode_latents(model.autoencoder, x)
  if not model.is_latent or (decode and model.autoencoder is not None):
    x = jnp.clip(x, -1.0, 1.0)   # images; latents are not bounded
  return (x, traj) if return_trajectory else x


# Images per decoder call inside a sampling program: the SD decoder's
# activations at 256x256 take ~0.3 GB per image in float32, so a whole
# evaluation batch at once would not fit; chunks run one after another.
DECODE_BATCH = 32


def decode_latents(autoencoder, z: jnp.ndarray, max_batch: int = DECODE_BATCH) -> jnp.ndarray:
  """`ddx.autoencoder.decode` of z [N, h, w, c], at most `max_batch` images per
  decoder call (a lax.map over chunks). Chunk j holds z[j::count], so a batch
  split over devices stays split over all of them in every chunk.

  Returns:
    float32 [N, H, W, C], not clipped.
  """
  from ddx import autoencoder as ae_lib
  n = z.shape[0]
  if n <= max_batch:
    return ae_lib.decode(autoencoder, z)
  count = -(-n // max_batch)
  while n % count:
    count += 1
  per = n // count
  chunks = z.reshape((per, count) + z.shape[1:]).swapaxes(0, 1)   # [count, per, ...]
  out = jax.lax.map(lambda c: ae_lib.decode(autoencoder, c), chunks)
  return out.swapaxes(0, 1).reshape((n,) + out.shape[2:])


def resolve_labels(model: Model, labels, num_samples: int):
  """The class labels to condition on: checked ones, or classes 0, 1, ... cycled.

  Returns None for an unconditional model.
  Raises:
    ValueError: labels given to an unconditional model, of the wrong shape,
      or outside [0, num_classes) (the null label is not a class: sample
      unconditionally with guidance_scale=0).
  """
  num_classes = model.config.model.num_classes
  if num_classes <= 0:
    if labels is not None:
      raise ValueError("labels were given but the model is unconditional "
                       "(model.num_classes = 0); drop labels=")
    return None
  if labels is None:
    return jnp.arange(num_samples, dtype=jnp.int32) % num_classes
  if not isinstance(labels, jax.core.Tracer):
    host = np.asarray(labels)
    if host.size and not np.issubdtype(host.dtype, np.integer):
      raise ValueError(f"labels must be integers in [0, {num_classes}), got dtype "
                       f"{host.dtype}")
    bad = host[(host < 0) | (host >= num_classes)]
    if bad.size:
      raise ValueError(f"labels must be in [0, {num_classes}) for this model, got "
                       f"{int(bad[0])}; for unconditional samples use "
                       "guidance_scale=0")
  labels = jnp.asarray(labels, jnp.int32)
  if labels.shape != (num_samples,):
    raise ValueError(f"labels must have shape ({num_samples},), got {labels.shape}")
  return labels


LABEL_STREAM = 0x6C61626C   # seeds the random label draws apart from the sampler's noise


def class_labels(rule: str, num_classes: int, start: int, count: int,
                 seed: int = 0) -> np.ndarray:
  """The class labels of samples start .. start + count - 1 of a sample batch.

  Args:
    rule: "balanced": sample i is class i mod num_classes, so N samples hold
      every class N / num_classes times when it divides (50 per class for
      ImageNet's 50k); "random": classes drawn uniformly and independently,
      as ADM's and DiT's sampling scripts do. Class-balanced sampling lowers
      ImageNet FID by about 0.1 (docs/evaluation.md), so results record it.
    num_classes: K >= 1.
    start: the index of the first sample (a chunk's offset in its batch).
    count: how many labels.
    seed: random only: with `start`, decides the draw (NumPy's PCG64, so
      the labels are the same on every machine and every process).
  Returns:
    int32 [count] in [0, num_classes).
  """
  if rule == "balanced":
    return ((start + np.arange(count)) % num_classes).astype(np.int32)
  if rule == "random":
    rng = np.random.default_rng((LABEL_STREAM, seed, start))
    return rng.integers(0, num_classes, size=count).astype(np.int32)
  raise ValueError(f"sampling.labels={rule!r} is unknown; use balanced or random")


def check_guidance(model: Model, guidance_scale) -> None:
  """Guidance needs a null label that was trained (training.label_dropout > 0)."""
  if float(guidance_scale) == 1.0 or model.config.model.num_classes <= 0:
    return
  if float(model.config.training.get("label_dropout", 0.0)) <= 0:
    raise ValueError(
        f"guidance_scale={float(guidance_scale):g} needs the unconditional model, but "
        "this model was trained with training.label_dropout=0 (its null label was "
        "never trained); use guidance_scale=1, or train with label_dropout > 0")


def check_guide(model: Model, guide) -> None:
  """Raises a one-line ValueError unless `guide` can guide `model` (autoguidance):
  the same process with the same settings, image shape, num_classes,
  prediction and learn_sigma."""
  if not isinstance(guide, Model):
    raise ValueError(f"guide_model must be a ddx.Model (ddx.load(workdir)), got "
                     f"{type(guide).__name__}")
  a, b = model.config, guide.config
  fix = "guide with a model trained with the same settings (a smaller or earlier one)"
  lp, tp = jax.tree.flatten(model.process)
  lq, tq = jax.tree.flatten(guide.process)
  if tp != tq or not all(np.array_equal(np.asarray(x), np.asarray(y))
                         for x, y in zip(lp, lq)):
    da, db = config_lib.to_dict(a.diffusion), config_lib.to_dict(b.diffusion)
    # The process first: another process's settings all differ, and naming one
    # of them (e.g. prediction) hides the cause.
    key = next((k for k in ["process"] + sorted(set(da) | set(db))
                if da.get(k, "ddpm" if k == "process" else None)
                != db.get(k, "ddpm" if k == "process" else None)), "process")
    raise ValueError(f"guide_model's diffusion.{key}={db.get(key)!r} differs from the "
                     f"model's {da.get(key)!r} (another process); {fix}")
  for name, x, y in (
      ("image shape", tuple(model.image_shape), tuple(guide.image_shape)),
      ("model.num_classes", a.model.num_classes, b.model.num_classes),
      ("diffusion.prediction", a.diffusion.prediction, b.diffusion.prediction),
      ("model.learn_sigma", a.model.get("learn_sigma", False),
       b.model.get("learn_sigma", False))):
    if x != y:
      raise ValueError(f"guide_model's {name} {y!r} differs from the model's {x!r}; {fix}")


def sample_fn(model: Model, rng: jax.Array, steps: Optional[int] = None, *,
              num_samples: Optional[int] = None, sampler: Optional[str] = None,
              eta: Optional[float] = None, labels=None,
              guidance_scale: Optional[float] = None, guidance_interval=None,
              guide_model: Optional[Model] = None,
              clip_x0: Optional[bool] = None, x_T=None,
              ddpm_variance: Optional[str] = None, spacing: Optional[str] = None,
              churn: Optional[float] = None, s_tmin: Optional[float] = None,
              s_tmax: Optional[float] = None, s_noise: Optional[float] = None,
              sigma_index: Optional[str] = None,
              options: Optional[options_lib.SampleOptions] = None,
              return_trajectory: bool = False, decode: bool = True):
  """Samples images from a trained model; the whole trajectory is one jitted program.

  Every option is resolved once (`ddx.options.resolve`): a keyword argument
  given here wins, then `options`, then the model's saved config
  (`model.config.sampling`). The model pytree is a jit argument (weights are
  never baked in as constants), so calls with the same shapes and static
  options reuse the compiled program; eta, guidance_scale, churn, s_tmin,
  s_tmax and s_noise are traced (a new value does not recompile).

  Args:
    model: what `ddx.load(workdir)` returns (or a `ddx.Model` you build).
    rng: PRNG key; same key and inputs -> the same images, bit for bit.
    steps: network evaluations (default config.sampling.steps).
    num_samples: batch size N (default len(labels), or x_T.shape[0], or
      config.sampling.num_samples).
    sampler: one of the process's samplers, `ddx.processes.spec(name).samplers`
      (docs/samplers.md lists each process's); default its default_sampler.
    eta: DDIM η.
    labels: int [N] class labels in [0, num_classes) for a class-conditional
      model; None draws classes 0, 1, ..., num_classes-1, 0, 1, ...
    guidance_scale: the guidance weight w. Classifier-free guidance: out =
      u + w·(c - u), w = 1 plain conditional sampling, w = 0 unconditional.
      With guide_model: the autoguidance weight, out = g + w·(c - g).
    guidance_interval: () = guide at every step; (lo, hi) = guide only
      where the process's noise level σ (`model.process.noise_level`: EDM's σ, DDPM's
      √((1 − ᾱ_i)/ᾱ_i), flow's t/(1 − t)) is in (lo, hi], elsewhere the
      plain conditional model.
    guide_model: a second `ddx.Model` of the same process, image shape and
      classes (e.g. a smaller or less trained one): autoguidance (Karras et
      al. 2024) instead of classifier-free guidance; both models see the same
      labels, so unconditional models can be guided. A jit argument like
      `model`. Its autoencoder is not used.
    clip_x0: clip x̂_0 to [-1, 1] at each step.
    x_T: optional starting noise [N, H, W, C].
    ddpm_variance: posterior | beta, for the ddpm sampler.
    spacing: auto | uniform | trailing | quadratic | logsnr (README:
      Samplers); "auto" is the sampler's own default.
    churn, s_tmin, s_tmax, s_noise: EDM S_churn, S_tmin, S_tmax, S_noise of
      the stochastic sampler.
    sigma_index: nearest | interp, for a DDPM model on a σ-grid sampler.
    options: a `ddx.options.SampleOptions` (e.g. `ddx.options.resolve(
      model.config, cli_config)`) used instead of the model's config;
      keyword arguments still override its fields.
    return_trajectory: also return every intermediate state (latents for a
      latent model).
    decode: a latent model's samples go through its autoencoder's decoder
      (in the same program) and come back as images; False returns the
      latents. A latent model loaded without its autoencoder returns latents.
  Returns:
    images float32 [N, H, W, C] in [-1, 1] (and the trajectory if asked); for
    a latent model with decode=False (or no autoencoder) the latents
    [N, h, w, c], unclipped.
  """
  if num_samples is None:
    if labels is not None:
      num_samples = len(labels)
    elif x_T is not None:
      num_samples = x_T.shape[0]
  given = dict(steps=steps, num_samples=num_samples, sampler=sampler, eta=eta,
               guidance_scale=guidance_scale, guidance_interval=guidance_interval,
               clip_x0=clip_x0,
               ddpm_variance=ddpm_variance, spacing=spacing, churn=churn, s_tmin=s_tmin,
               s_tmax=s_tmax, s_noise=s_noise, sigma_index=sigma_index)
  o = (options_lib.resolve(model.config) if options is None else options).override(**given)
  labels = resolve_labels(model, labels, o.num_samples)
  w = o.guidance_scale
  if guide_model is not None:
    check_guide(model, guide_model)
    guided = float(w) != 1.0
  else:
    guided = labels is not None and float(w) != 1.0
    if guided:
      check_guidance(model, w)
  guide = guide_model.replace(autoencoder=None) if guided and guide_model is not None else None
  return sample_jit(model, rng, labels, x_T, traced_options(o), guided=guided,
                    return_trajectory=bool(return_trajectory), decode=bool(decode),
                    guide=guide)


def load_autoencoder(config):
  """The autoencoder a latent run's config names (autoencoder.path), or None.

  Raises:
    ValueError: autoencoder.path is not an autoencoder folder, or disagrees
      with the config's latent shape (one line).
  """
  if not config.autoencoder.path:
    return None
  from ddx import autoencoder as ae_lib
  from ddx import latents
  try:
    ae = ae_lib.load(config.autoencoder.path)
  except config_lib.ConfigError:
    raise
  except ValueError as e:   # its messages name the folder and the fix
    raise config_lib.ConfigError(f"autoencoder.path: {e}") from None
  latents.check_autoencoder(config, ae.settings.to_dict())
  # Replicated over every device (of every process), as the model's weights are.
  return parallel.replicate(ae, parallel.make_mesh())


UINT8_ROUNDINGS = ("nearest", "truncate")


def to_uint8(images: jnp.ndarray, rounding: str = "nearest") -> np.ndarray:
  """Maps float images in [-1, 1] to uint8 [0, 255].

  Args:
    images: [..] float in [-1, 1] (values outside are clipped).
    rounding: "nearest" (ddx's default, which its sample grids, sample .npz
      files and evaluations use: round((x + 1) * 127.5), clipped) or
      "truncate" (ADM's sampling scripts: ((x + 1) * 127.5).clamp(0, 255)
      cast to uint8, i.e. floor; 255 only for x = 1 exactly). Truncation
      darkens every image by half a level on average, which moves FID by a
      small amount: use it to compare with numbers from ADM-style samplers.
  Returns:
    uint8 NumPy array of the same shape, gathered from every process.
  """
  if rounding not in UINT8_ROUNDINGS:
    raise ValueError(f"rounding must be one of {UINT8_ROUNDINGS}, got {rounding!r}")
  x = parallel.gather(images).astype(np.float32)   # every process gets all images
  x = (x + np.float32(1.0)) * np.float32(127.5)
  if rounding == "nearest":
    x = np.round(x)
  return np.clip(x, 0, 255).astype(np.uint8)   # the cast truncates
