"""SampleOptions: one precedence (keyword > command line > saved config), and every
option on the command line reaches --mode sample's images."""
import dataclasses

import jax
import numpy as np
import pytest

import ddx
from ddx import config as config_lib
from ddx import model as model_lib
from ddx import options as options_lib
from testutils import load_config, random_model

# Three different values of every option: the saved config's, the command
# line's, a keyword argument's (each differs from the one before).
LAYERS = {
    "sampler": ("ddpm", "heun", "stochastic"),
    "steps": (7, 8, 9),
    "clip_x0": (False, True, False),
    "ddpm_variance": ("beta", "posterior", "beta"),
    "spacing": ("trailing", "quadratic", "logsnr"),
    "sigma_index": ("interp", "nearest", "interp"),
    "num_samples": (5, 6, 7),
    "eta": (0.1, 0.2, 0.3),
    "guidance_scale": (1.5, 2.0, 2.5),
    "guidance_interval": ((0.5, 20.0), (), (0.1, 5.0)),
    "churn": (1.0, 2.0, 3.0),
    "s_tmin": (0.01, 0.02, 0.03),
    "s_tmax": (10.0, 20.0, 30.0),
    "s_noise": (1.001, 1.002, 1.003),
}


def _config(layer: int):
  c = load_config()
  for k, v in LAYERS.items():
    c.sampling[k] = v[layer]
  return c


def test_every_option_is_resolved_keyword_over_command_line_over_saved():
  assert set(LAYERS) == set(options_lib.FIELDS)
  saved, cli = config_lib.freeze(_config(0)), _config(1)
  kw = {k: v[2] for k, v in LAYERS.items()}
  pick = lambda layer: {k: v[layer] for k, v in LAYERS.items()}
  as_dict = dataclasses.asdict
  assert as_dict(options_lib.resolve(saved)) == pick(0)
  assert as_dict(options_lib.resolve(saved, cli)) == pick(1)
  assert as_dict(options_lib.resolve(None, cli)) == pick(1)
  assert as_dict(options_lib.resolve(saved, cli, **kw)) == pick(2)
  assert as_dict(options_lib.resolve(saved, **kw)) == pick(2)
  # None is "not given"; nothing given: base_config's defaults.
  assert as_dict(options_lib.resolve(saved, cli, **{k: None for k in kw})) == pick(1)
  s = config_lib.base_config().sampling
  assert as_dict(options_lib.resolve()) == {k: s[k] for k in LAYERS}
  with pytest.raises(TypeError, match="'chrun' is not a sampling option"):
    options_lib.resolve(saved, chrun=1.0)

  # Evaluation: the eval group's own keys, the sampling group for the rest.
  cli.eval.sampler, cli.eval.steps, cli.eval.eta, cli.eval.spacing = "euler", 11, 0.7, "auto"
  cli.eval.batch_size = 13
  ev = as_dict(options_lib.resolve(saved, cli, group="eval"))
  assert ev == {**pick(1), "sampler": "euler", "steps": 11, "eta": 0.7, "spacing": "auto",
                "num_samples": 13}
  assert as_dict(options_lib.resolve(saved, cli, group="eval", steps=3))["steps"] == 3

  # Frozen and hashable (a static jit argument, a cache key).
  o = options_lib.resolve(saved, cli)
  assert hash(o) == hash(options_lib.resolve(saved, cli)) and o != o.replace(churn=9.0)
  with pytest.raises(dataclasses.FrozenInstanceError):
    o.churn = 5.0


def test_sample_fn_keyword_over_options_over_the_saved_config(monkeypatch):
  """What sample_fn hands its compiled program (captured; nothing compiles)."""
  model = model_lib.Model({}, config_lib.freeze(_config(0)))
  seen = []
  monkeypatch.setattr(model_lib, "sample_jit",
                      lambda model, rng, labels, x_T, options, **kw: seen.append(options))
  rng = jax.random.key(0)
  model_lib.sample_fn(model, rng)
  model_lib.sample_fn(model, rng, options=options_lib.resolve(model.config, _config(1)))
  model_lib.sample_fn(model, rng, options=options_lib.resolve(model.config, _config(1)),
                      **{k: v[2] for k, v in LAYERS.items()})
  for o, layer in zip(seen, range(3)):
    plain = {k: float(v) if k in options_lib.FLOAT_FIELDS else v
             for k, v in dataclasses.asdict(o).items()}
    want = {k: v[layer] for k, v in LAYERS.items()}
    interval = plain.pop("guidance_interval")   # a tuple of float32 scalars
    assert tuple(map(float, interval)) == pytest.approx(want.pop("guidance_interval"))
    assert plain == pytest.approx(want), layer
  # The batch follows x_T (a keyword too) unless num_samples is given.
  model_lib.sample_fn(model, rng, x_T=np.zeros((3, 8, 8, 1), np.float32))
  assert seen[-1].num_samples == 3


@pytest.mark.slow
def test_every_command_line_option_changes_mode_sample_images(tmp_path, monkeypatch):
  """--mode sample (ddx.main._sample, in-process) with one option changed at a time
  on the command line writes other images; the saved config stays the same."""
  from ddx import main

  def conditional(c):   # a one-level U-Net (a quarter of the compile time)
    c.model.num_classes, c.training.label_dropout = 3, 0.1
    c.model.ch_mult, c.model.attn_resolutions = (1,), ()
    return c
  model = random_model(conditional(load_config()))   # its saved config: the defaults
  from ddx import checkpoint as ckpt_lib
  monkeypatch.setattr(ckpt_lib, "load_with_step", lambda workdir: (7, model))  # _sample's
  runs = []

  def images(**sampling):
    cli = conditional(load_config())
    cli.sampling.update(dict(dict(num_samples=2, steps=2, guidance_scale=1.5), **sampling))
    config_lib.validate(cli)
    workdir = tmp_path / f"run{len(runs)}"
    runs.append(workdir)
    main._sample(cli, str(workdir))
    [npz] = (workdir / "samples").glob("*.npz")
    return np.load(npz)["images"]

  # (the command line before, the option changed, its new value)
  ddim, ddpm = dict(sampler="ddim"), dict(sampler="ddpm")
  # 3 steps: a σ grid with a point between the schedule's (sigma_index).
  stochastic = dict(sampler="stochastic", churn=40.0, steps=3)
  cases = [(ddim, "eta", 1.0), (ddim, "guidance_scale", 3.0), (ddim, "spacing", "quadratic"),
           (ddim, "clip_x0", False), (ddim, "steps", 3), (ddim, "num_samples", 3),
           (ddim, "sampler", "ddpm"), (ddpm, "ddpm_variance", "beta"),
           (stochastic, "churn", 0.0), (stochastic, "s_tmin", 10.0),   # above every σ
           (stochastic, "s_tmax", 0.01), (stochastic, "s_noise", 0.5),
           (stochastic, "sigma_index", "interp"),
           (ddim, "guidance_interval", (5.0, 1e9))]   # unguided below σ = 5
  assert {name for _, name, _ in cases} == set(options_lib.FIELDS)
  before = {}
  for base, name, value in cases:
    key = tuple(sorted(base.items()))
    if key not in before:
      before[key] = images(**base)
    after = images(**dict(base, **{name: value}))
    assert after.shape != before[key].shape or not np.array_equal(after, before[key]), name
