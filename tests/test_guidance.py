"""The guidance interval (Kynkäänniemi et al. 2024) and autoguidance (Karras et al.
2024): the guided denoiser against NumPy transcriptions, sample_fn's limits, the
guide's checks, and the command line (sampling.guidance_interval, guide_workdir)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

import ddx
from ddx import config as config_lib
from ddx import eval_run
from ddx import options as options_lib
from ddx import processes
from ddx import model as model_lib
from testutils import ROOT, load_config, random_model

EMB = np.array([0.3, -0.7, 1.1, 0.05], np.float32)   # label 3 = the null label


def _toy_apply(self, x, t, labels=None):
  """A linear stand-in network F(x, t, y) = 0.5·x + 0.1·t + EMB[y] (y None: null)."""
  y = jnp.full((x.shape[0],), 3, jnp.int32) if labels is None else labels
  t = jnp.asarray(t, jnp.float32)
  t = (t[:, 0] if t.ndim == 2 else t).reshape((-1, 1, 1, 1))   # (t, r) pairs: t
  return 0.5 * x + 0.1 * t + jnp.asarray(EMB)[y][:, None, None, None]


def _toy_np(x, t, y):
  return 0.5 * x + 0.1 * np.asarray(t, np.float64)[:, None, None, None] + EMB[y][:, None, None, None]


def _conditional(process="ddpm"):
  c = load_config()
  c.model.num_classes, c.training.label_dropout = 3, 0.1
  c.diffusion.process = process
  return c


def _mix_reference(c, u, sigma, w, lo, hi):
  """Kynkäänniemi et al.: guided u + w(c - u) where σ ∈ (lo, hi], else c, per example."""
  inside = ((sigma > lo) & (sigma <= hi))[:, None, None, None]
  return np.where(inside, u + w * (c - u), c)


def test_interval_guides_only_inside_per_example_ddpm(monkeypatch):
  monkeypatch.setattr(model_lib.Model, "apply", _toy_apply)
  model = model_lib.Model({}, config_lib.freeze(_conditional("ddpm")))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 8, 8, 1)).astype(np.float32)
  labels = np.array([0, 1, 2, 1])
  i = np.array([2, 30, 60, 95], np.int32)   # T = 100
  a = np.asarray(model.schedule.alphas_cumprod, np.float64)   # ᾱ of index i
  sigma = np.sqrt((1.0 - a[i]) / a[i])   # the noise level of index i
  lo, hi, w = 0.5, 3.0, 2.5
  assert 0 < ((sigma > lo) & (sigma <= hi)).sum() < 4   # some in, some out
  fn = model_lib.denoiser(model, jnp.asarray(labels), jnp.float32(w), True,
                          interval=(jnp.float32(lo), jnp.float32(hi)))
  want = _mix_reference(_toy_np(x, i, labels), _toy_np(x, i, np.full(4, 3)), sigma, w, lo, hi)
  np.testing.assert_allclose(fn(jnp.asarray(x), jnp.asarray(i)), want, rtol=1e-5, atol=1e-5)
  # A fractional index (sigma_index=interp): log σ linear between the schedule's σ_i.
  frac = jnp.asarray([2.5, 30.25], jnp.float32)
  log_s = np.log(np.sqrt((1 - a) / a))
  np.testing.assert_allclose(model.process.noise_level(frac),
                             np.exp(np.interp([2.5, 30.25], np.arange(100), log_s)), rtol=1e-5)


def test_interval_guides_only_inside_per_example_edm_and_flow(monkeypatch):
  monkeypatch.setattr(model_lib.Model, "apply", _toy_apply)
  model = model_lib.Model({}, config_lib.freeze(_conditional("edm")))
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4, 8, 8, 1)).astype(np.float32) * 3
  labels = np.array([2, 0, 1, 2])
  sigma = np.array([0.3, 0.4, 2.0, 40.0], np.float32)   # (lo, hi] = (0.3, 2.0]: out, in, in, out
  lo, hi, w = 0.3, 2.0, 3.0
  fn = model_lib.denoiser(model, jnp.asarray(labels), jnp.float32(w), True,
                          interval=(jnp.float32(lo), jnp.float32(hi)))

  def D(y):   # EDM Table 1: c_skip·x + c_out·F(c_in·x, ln(σ)/4)
    sd = model.process.sigma_data
    s = sigma[:, None, None, None]
    c_skip, c_out = sd ** 2 / (s ** 2 + sd ** 2), s * sd / np.sqrt(s ** 2 + sd ** 2)
    return c_skip * x + c_out * _toy_np(x / np.sqrt(s ** 2 + sd ** 2),
                                        np.log(sigma.astype(np.float64)) / 4, y)
  want = _mix_reference(D(labels), D(np.full(4, 3)), sigma, w, lo, hi)
  got = fn(jnp.asarray(x), jnp.asarray(sigma, jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Flow: σ = t/(1 − t), the noise-to-signal ratio of x_t = (1 − t)x_0 + tε.
  flow = model_lib.Model({}, config_lib.freeze(_conditional("flow")))
  t = np.array([0.1, 0.5, 0.9, 1.0], np.float32)
  np.testing.assert_allclose(flow.process.noise_level(jnp.asarray(t)),
                             np.array([1 / 9, 1.0, 9.0, np.inf]), rtol=1e-5)


@pytest.mark.parametrize("process", sorted(processes.names()))
def test_an_interval_to_inf_guides_the_first_step(process, monkeypatch):
  """hi = inf, as the command line writes it, includes σ = ∞, where flow, MeanFlow,
  shortcut and consistency sampling evaluate first (t = 1, TrigFlow's π/2): a
  1-step sample guided on (0, inf] is the sample guided at every step, not the
  unguided one (a finite hi such as 1e9 leaves that first step unguided)."""
  monkeypatch.setattr(model_lib.Model, "apply", _toy_apply)
  spellings = ("(0.0, inf)", "(0.0, 'inf')", "(0.0,inf)")
  for text in spellings:
    cli = _parse(f"--config.sampling.guidance_interval={text}")
    config_lib.validate(cli)
    assert options_lib.resolve(cli=cli).guidance_interval == (0.0, float("inf")), text
  model = model_lib.Model({}, config_lib.freeze(_conditional(process)))
  steps = 1 if process in ("flow", "meanflow", "shortcut", "consistency") else 2
  sampler = processes.spec(process).default_sampler
  labels = jnp.asarray([0, 1, 2])
  x_T = jax.random.normal(jax.random.key(1), (3,) + model.image_shape)
  first = []   # the noise levels the sampler's first call sees

  def run(w, interval=()):
    fn = model_lib.denoiser(model, labels, jnp.float32(w), True, interval=interval)
    def spy(x, t):
      jax.debug.callback(lambda sigma: first.append(np.asarray(sigma)),
                         model.process.noise_level(t), ordered=True)
      return fn(x, t)
    return np.asarray(ddx.sample(spy, model.process, jax.random.key(0), x_T.shape,
                                 sampler=sampler, steps=steps, x_T=x_T, clip_x0=False))
  everywhere = run(3.0)
  sigma_first = np.asarray(first[0])
  inf_interval = options_lib.resolve(cli=_parse(
      "--config.sampling.guidance_interval=(0.0, inf)")).guidance_interval
  np.testing.assert_array_equal(run(3.0, tuple(jnp.float32(v) for v in inf_interval)),
                                everywhere)
  plain = run(1.0)
  assert not np.array_equal(everywhere, plain)
  assert np.all(np.isinf(sigma_first)) == (steps == 1), sigma_first
  if steps == 1:   # the first step is the only one
    np.testing.assert_array_equal(run(3.0, (jnp.float32(0.0), jnp.float32(1e9))), plain)


@pytest.fixture(scope="module")
def cond_model():
  c = _conditional()
  c.model.ch_mult, c.model.attn_resolutions = (1,), ()   # a quick compile
  return random_model(c)


def test_sample_fn_interval_limits_are_bit_exact(cond_model):
  """(0, inf) guides every step: equal to no interval; an interval no σ falls in
  is the plain conditional model: equal to w = 1."""
  kw = dict(steps=3, num_samples=3, sampler="ddim", guidance_scale=2.0)
  key = jax.random.key(0)
  guided = ddx.sample_fn(cond_model, key, **kw)
  everywhere = ddx.sample_fn(cond_model, key, guidance_interval=(0.0, float("inf")), **kw)
  np.testing.assert_array_equal(everywhere, guided)
  plain = ddx.sample_fn(cond_model, key, **dict(kw, guidance_scale=1.0))
  nowhere = ddx.sample_fn(cond_model, key, guidance_interval=(1e-9, 2e-9), **kw)
  np.testing.assert_array_equal(nowhere, plain)
  assert not np.array_equal(guided, plain)
  with pytest.raises(ValueError, match=r"guidance_interval=\(2\.0, 1\.0\) needs 0 <= lo < hi"):
    ddx.sample_fn(cond_model, key, guidance_interval=(2.0, 1.0), **kw)


@pytest.mark.slow
def test_autoguidance_with_itself_is_unguided_and_with_another_mixes():
  c = load_config()   # unconditional: CFG has nothing to guide it with
  c.model.ch_mult, c.model.attn_resolutions = (1,), ()
  model, other = random_model(c), random_model(c, seed=1)
  kw = dict(steps=2, num_samples=2, sampler="ddim", clip_x0=False)
  key = jax.random.key(3)
  plain = ddx.sample_fn(model, key, **kw)
  np.testing.assert_allclose(ddx.sample_fn(model, key, guidance_scale=2.5, guide_model=model,
                                           **kw), plain, atol=1e-6)   # D + w(D − D) = D
  assert not np.allclose(ddx.sample_fn(model, key, guidance_scale=2.5, guide_model=other,
                                       **kw), plain, atol=1e-3)
  # One step of the denoiser: D_g + w(D_m − D_g) (ddpm: the raw ε of each network).
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  t = jnp.array([10, 80], jnp.int32)
  d_m, d_g = np.asarray(model.apply(x, t)), np.asarray(other.apply(x, t))
  got = model_lib.denoiser(model, None, jnp.float32(2.5), True, guide=other)(x, t)
  np.testing.assert_allclose(got, d_g + 2.5 * (d_m - d_g), rtol=1e-5, atol=1e-6)
  # The interval applies to it too: index 10 (σ 0.11) is outside (0.5, 100], 80 (σ 0.97) inside.
  got = model_lib.denoiser(model, None, jnp.float32(2.5), True, guide=other,
                           interval=(jnp.float32(0.5), jnp.float32(100.0)))(x, t)
  np.testing.assert_allclose(got[0], d_m[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[1], (d_g + 2.5 * (d_m - d_g))[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key,value,what", [
    ("diffusion.process", "edm", "diffusion.process"),
    ("diffusion.schedule", "cosine", "diffusion.schedule"),
    ("diffusion.num_timesteps", 50, "diffusion.num_timesteps"),
    ("data.image_size", 16, "image shape"),
    ("model.num_classes", 3, "model.num_classes"),
    ("diffusion.prediction", "v", "diffusion.prediction"),
    ("model.learn_sigma", True, "model.learn_sigma"),
])
def test_a_guide_that_disagrees_is_a_one_line_error(key, value, what):
  c = load_config()
  model = model_lib.Model({}, config_lib.freeze(c))
  group, name = key.split(".")
  c[group][name] = value
  with pytest.raises(ValueError, match=f"guide_model's {what}") as e:
    model_lib.check_guide(model, model_lib.Model({}, config_lib.freeze(c)))
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("process", [p for p in sorted(processes.names()) if p != "ddpm"])
def test_a_guide_of_another_process_is_named_as_such(process):
  """Another process's settings differ too (here its prediction); the error names
  the process, the cause, not the first differing key in sorted order."""
  c = load_config()
  model = model_lib.Model({}, config_lib.freeze(c))
  c.diffusion.process, c.diffusion.prediction = process, "v"
  with pytest.raises(ValueError, match=f"guide_model's diffusion.process='{process}'"):
    model_lib.check_guide(model, model_lib.Model({}, config_lib.freeze(c)))


@pytest.mark.parametrize("process,key,value", [("edm", "sigma_data", 0.3),
                                               ("flow", "shift", 3.0)])
def test_a_guide_with_other_process_settings_is_refused(process, key, value):
  c = load_config()
  c.diffusion.process = process
  model = model_lib.Model({}, config_lib.freeze(c))
  c.diffusion[key] = value
  with pytest.raises(ValueError, match=f"diffusion.{key}={value}"):
    model_lib.check_guide(model, model_lib.Model({}, config_lib.freeze(c)))
  c.diffusion[key] = model.config.diffusion[key]
  c.diffusion.sigma_min = 0.01   # not a setting of a flow process: no matter
  if process == "flow":
    model_lib.check_guide(model, model_lib.Model({}, config_lib.freeze(c)))


def _parse(*overrides):
  """--config configs/test.py with overrides, parsed by ml_collections as ddx.main does."""
  argv = ["ddx", f"--config={ROOT}/configs/test.py", *overrides]
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv,
                                           lock_config=True, sys_argv=argv)
  fv(argv)
  return holder.value


def test_command_line_interval_and_guide_reach_mode_sample(tmp_path, monkeypatch):
  """--config.sampling.guidance_interval / guide_workdir parse, are checked, reach
  --mode sample (ddx.main._sample, in-process) and the eval chunk key."""
  from ddx import main
  cli = _parse("--config.sampling.guidance_interval=(0.5, 20.0)",
               "--config.sampling.guide_workdir=runs/guide")
  assert tuple(cli.sampling.guidance_interval) == (0.5, 20.0)
  config_lib.validate(cli)
  for bad in ("(0.3, nan)", "(5.0, 1.0)", "(-1.0, 2.0)", "(1.0,)", "(0.3, infinite)"):
    with pytest.raises(config_lib.ConfigError, match="sampling.guidance_interval") as e:
      config_lib.validate(_parse(f"--config.sampling.guidance_interval={bad}"))
    assert "\n" not in str(e.value)

  c = load_config()
  c.model.ch_mult, c.model.attn_resolutions = (1,), ()
  model, guide = random_model(c), random_model(c, seed=1)
  from ddx import checkpoint as ckpt_lib
  # _sample's model, and the guide that load_guide reads (checkpoint.load_run)
  monkeypatch.setattr(ckpt_lib, "load_with_step",
                      lambda workdir: (5, guide) if workdir == "runs/guide" else (7, model))
  monkeypatch.setattr(eval_run, "_newest_model",
                      lambda workdir: (5, guide) if workdir == "runs/guide" else 1 / 0)

  def images(**sampling):
    cli = load_config()
    cli.model.ch_mult, cli.model.attn_resolutions = (1,), ()
    cli.sampling.update(dict(num_samples=2, steps=2, guidance_scale=2.0, clip_x0=False,
                             **sampling))
    config_lib.validate(cli)
    workdir = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    main._sample(cli, str(workdir))
    [npz] = (workdir / "samples").glob("*.npz")
    return np.load(npz)
  plain = images()
  guided = images(guide_workdir="runs/guide")
  assert str(guided["guide_workdir"]) == "runs/guide"
  assert not np.array_equal(plain["images"], guided["images"])
  interval = images(guide_workdir="runs/guide", guidance_interval=(50.0, 1e9))
  assert "[50.0, 1000000000.0]" in str(interval["sampling"])
  np.testing.assert_array_equal(interval["images"], plain["images"])   # no σ above 50

  # The eval chunk key: the guide's workdir and weights, and the interval.
  options = eval_run.eval_options(model, c)
  keys = {eval_run._settings(options, c.eval, model),
          eval_run._settings(options, c.eval, model, guide, "runs/guide"),
          eval_run._settings(options, c.eval, model, guide, "runs/other"),
          eval_run._settings(options, c.eval, model, model, "runs/guide"),
          eval_run._settings(options.replace(guidance_interval=(1.0, 2.0)), c.eval, model)}
  assert len(keys) == 5


def test_a_missing_or_empty_guide_workdir_is_a_one_line_error(tmp_path):
  c = load_config()
  model = model_lib.Model({}, config_lib.freeze(c))
  (tmp_path / "empty").mkdir()
  for path in (tmp_path / "empty", tmp_path / "missing"):
    c.sampling.guide_workdir = str(path)
    with pytest.raises(config_lib.ConfigError, match=f"sampling.guide_workdir='{path}'") as e:
      eval_run.load_guide(model, c)
    assert "\n" not in str(e.value)
    with pytest.raises(config_lib.ConfigError, match="has no checkpoints"):
      eval_run.Evaluator(c, str(tmp_path))
  c.sampling.guide_workdir = ""
  assert eval_run.load_guide(model, c) is None


def test_the_guide_is_a_jit_argument_not_a_constant():
  """Both models' weights are inputs of the compiled sampler (lowered only)."""
  c = load_config()
  c.model.ch_mult, c.model.attn_resolutions = (1,), ()
  model, guide = random_model(c), random_model(c, seed=1)
  options = ddx.options.resolve(model.config, num_samples=2, steps=2, sampler="ddim",
                                guidance_scale=2.0)
  text = model_lib.sample_jit.lower(model, jax.random.key(0), None, None, options,
                                    guided=True, guide=guide).as_text()
  main = next(l for l in text.splitlines() if "func.func public @main" in l)
  assert main.count("%arg") >= 2 * len(jax.tree.leaves(model.variables))
  assert "tensor<3x3x8x8xf32> = stablehlo.constant" not in text
