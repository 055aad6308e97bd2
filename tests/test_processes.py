"""Every process (and the DiT backbone) through the real trainer: train, resume
bitwise, load, and sample with each of the process's samplers; and a process
registered at run time going through the same code paths."""
import json
import os
from typing import ClassVar

import flax.struct
import jax.numpy as jnp

import jax
import numpy as np
import pytest

import ddx
from ddx.processes import common
from ddx import bpd, processes, train
from ddx import config as config_lib
from ddx.processes import base
from ddx.likelihood import sigma_ode
from ddx.sampling import sigma as sigma_sampling

from testutils import load_config, train_and_resume

# Each case also switches on features the trainer must carry for every process.
CASES = {
    # EDM, class-conditional with guidance, bfloat16 compute, on a one-level
    # U-Net (attention kept) that compiles in a fraction of configs/test.py's
    # two levels: the run, its resume and each sampler compile it again.
    "edm": {"diffusion.process": "edm", "sampling.sampler": "heun", "sampling.steps": 3,
            "sampling.clip_x0": False, "model.num_classes": 10,
            "training.label_dropout": 0.1, "sampling.guidance_scale": 2.0,
            "model.dtype": "bfloat16", "model.ch_mult": (1,),
            "model.attn_resolutions": (8,)},
    # Flow matching on a DiT, two updates per jitted call; prediction and
    # sampler "auto" (flow's v and euler).
    "flow": {"diffusion.process": "flow", "sampling.steps": 3, "model.name": "dit",
             "model.hidden_size": 32, "model.depth": 2, "model.num_heads": 2,
             "training.steps_per_dispatch": 2},
}


def _config(case, **extra):
  c = load_config()
  for key, value in {**CASES[case], **extra}.items():
    group, name = key.split(".")
    c[group][name] = value
  c.training.num_steps, c.training.log_every = 4, 2
  c.training.checkpoint_every, c.training.sample_every = 2, 4
  return c


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_process_trains_resumes_bitwise_and_samples(case, tmp_path):
  config = _config(case)
  straight_dir, straight = train_and_resume(config, tmp_path)
  assert np.isfinite(float(jax.tree.leaves(straight.params)[0].sum()))

  saved = json.load(open(os.path.join(straight_dir, "config.json")))
  want = {"edm": ("auto", "heun"), "flow": ("v", "euler")}[case]
  assert (saved["diffusion"]["prediction"], saved["sampling"]["sampler"]) == want

  model = ddx.load(straight_dir)
  assert model.process.spec.name == config.diffusion.process
  x_T = jax.random.normal(jax.random.key(3), (2, 8, 8, 1))
  for sampler in processes.spec(config.diffusion.process).samplers:
    kw = {"churn": 5.0} if sampler == "stochastic" else {}
    imgs = ddx.sample_fn(model, jax.random.key(0), steps=2, sampler=sampler, x_T=x_T,
                         **kw)
    assert imgs.shape == (2, 8, 8, 1) and bool(np.all(np.isfinite(imgs))), sampler
    assert float(np.abs(imgs).max()) <= 1.0
  a = ddx.sample_fn(model, jax.random.key(0), steps=2, x_T=x_T)
  b = ddx.sample_fn(model, jax.random.key(0), steps=3, x_T=x_T)
  assert not np.array_equal(a, b)       # the step count reaches the sampler


@pytest.mark.parametrize("process", sorted(processes.names()))
def test_dit_trains_under_every_process(process):
  """Two real updates of a tiny DiT per registered process (with the second time
  or log-variance head the process asks for): finite loss, the output layer
  leaves zero (adaLN-Zero starts at exactly 0) and the EMA follows."""
  from ddx import parallel
  c = load_config()
  c.model.name, c.model.hidden_size, c.model.depth, c.model.num_heads = "dit", 32, 1, 2
  c.diffusion.process = process
  c.diffusion.prediction = processes.spec(process).default_prediction or "auto"
  setup = train.make_setup(c, parallel.make_mesh(devices=jax.devices()[:1]))
  state = setup.init(jax.random.key(0))
  out0 = np.asarray(state.params["final_layer"]["linear"]["kernel"])
  assert not out0.any()
  images = np.asarray(jax.random.uniform(jax.random.key(1), (16, 8, 8, 1), minval=-1))
  batch = {"image": images, "label": np.zeros((16,), np.int32)}
  for _ in range(2):
    state, metrics = setup.step(state, batch, jax.random.key(2))
  assert int(state.step) == 2 and np.isfinite(float(metrics["loss"]))
  assert np.asarray(state.params["final_layer"]["linear"]["kernel"]).any()


# --------------------------------------------------------------------------
# A process added at run time: one Spec, one class, one registry entry.

_TOY_SIGMA_MIN = 0.01


class _ToySpec(base.Spec):
  """A variance-exploding toy: x = x_0 + σn, the network predicts x_0."""
  name = "toy_ve"
  fields = (base.Field("toy_sigma_max", 20.0, "largest σ"),)
  samplers = ("euler", "heun")
  default_sampler = "heun"

  def check(self, f):
    base.finite(f, "toy_sigma_max")
    if not f["toy_sigma_max"] > _TOY_SIGMA_MIN:
      raise ValueError(f"diffusion.toy_sigma_max={f['toy_sigma_max']} must be > "
                       f"{_TOY_SIGMA_MIN}")


@flax.struct.dataclass
class _ToyProcess:
  sigma_max: float = flax.struct.field(pytree_node=False, default=20.0)
  spec: ClassVar = None   # set below: the Spec names this class

  @classmethod
  def from_config(cls, f):
    return cls(sigma_max=f["toy_sigma_max"])

  @classmethod
  def coerce(cls, obj, prediction=None):
    return obj if isinstance(obj, cls) else None

  def check(self):
    return self

  def loss(self, apply_fn, params, x0, rng, has_aux=False):
    s_rng, n_rng = jax.random.split(rng)
    u = jax.random.uniform(s_rng, (x0.shape[0],))
    sig = _TOY_SIGMA_MIN * (self.sigma_max / _TOY_SIGMA_MIN) ** u
    x = x0 + common.bcast(sig, x0) * jax.random.normal(n_rng, x0.shape)
    out = apply_fn(params, x, jnp.log(sig))
    out, aux = out if has_aux else (out, None)
    per_ex = jnp.mean(jnp.square(out.astype(jnp.float32) - x0), axis=(1, 2, 3))
    q = jnp.clip(jnp.floor(u * 4).astype(jnp.int32), 0, 3)
    return jnp.mean(per_ex), common.loss_metrics(jnp.mean(per_ex), per_ex, q, aux)

  def denoiser(self, net_fn):
    return lambda x, sig: net_fn(x, jnp.log(sig))

  def grid(self, sampler, steps, spacing=None, sigma_index="nearest"):
    return np.append(np.geomspace(self.sigma_max, _TOY_SIGMA_MIN, steps), 0.0)

  def sample(self, denoise_fn, rng, shape, sampler, steps, *, x_T=None, clip_x0=False,
             return_trajectory=False, **_):
    return sigma_sampling.sample(denoise_fn, self.grid(sampler, steps), rng, shape,
                                 sampler, x_T=x_T, clip_x0=clip_x0,
                                 return_trajectory=return_trajectory)

  def ode(self, denoise_fn, steps):
    return sigma_ode(denoise_fn, _TOY_SIGMA_MIN, self.sigma_max, steps)


_ToySpec.implementation = _ToyProcess
_ToyProcess.spec = _ToySpec()


@pytest.mark.slow
def test_a_registered_process_trains_samples_and_scores(monkeypatch):
  """Nothing outside the process's own two pieces needs editing: the config
  gets its key and checks, the trainer its loss, sample_fn its sampler and
  network wrapper, ode_bpd its ODE."""
  from ddx import parallel
  from testutils import random_model
  monkeypatch.setitem(processes.REGISTRY, "toy_ve", _ToyProcess.spec)
  c = load_config()
  assert c.diffusion.toy_sigma_max == 20.0          # its key, with its default
  c.model.ch, c.model.ch_mult, c.model.attn_resolutions = 8, (1,), ()   # tiny: compile
  c.model.num_groups, c.diffusion.num_timesteps = 4, 1000
  c.diffusion.process = "toy_ve"
  c.diffusion.toy_sigma_max = -1.0
  with pytest.raises(config_lib.ConfigError, match="diffusion.toy_sigma_max=-1.0"):
    config_lib.validate(c)
  c.diffusion.toy_sigma_max = 10.0
  config_lib.validate(c)
  assert c.sampling.sampler == "heun"                # "auto" -> its default

  setup = train.make_setup(c, parallel.make_mesh(devices=jax.devices()[:1]))
  state = setup.init(jax.random.key(0))
  images = np.asarray(jax.random.uniform(jax.random.key(1), (16, 8, 8, 1), minval=-1))
  batch = {"image": images, "label": np.zeros((16,), np.int32)}
  for _ in range(2):
    state, metrics = setup.step(state, batch, jax.random.key(2))
  assert int(state.step) == 2 and np.isfinite(float(metrics["loss"]))

  model = random_model(c)
  assert isinstance(model.process, _ToyProcess) and model.process.sigma_max == 10.0
  x_T = jax.random.normal(jax.random.key(3), (2, 8, 8, 1))
  for sampler in ("euler", "heun"):
    imgs = ddx.sample_fn(model, jax.random.key(0), steps=2, sampler=sampler, x_T=x_T)
    assert imgs.shape == (2, 8, 8, 1) and bool(np.all(np.isfinite(imgs))), sampler
  with pytest.raises(ValueError, match=r"sampler='ddim' is not a sampler of diffusion.process=toy_ve"):
    ddx.sample_fn(model, jax.random.key(0), steps=2, sampler="ddim")
  u8 = np.zeros((2, 8, 8, 1), np.uint8)
  b, _ = bpd.ode_bpd(model, u8, jax.random.key(4), steps=2, solver="euler")
  assert b.shape == (2,) and bool(np.all(np.isfinite(b)))
