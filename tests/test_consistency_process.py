"""diffusion.process=consistency (sCM) on the real network and through the real
trainer: the jvp tangent of the U-Net, the exact boundary condition, training,
bitwise resume, loading and sampling with 1 and 2 steps, and its config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddx
from ddx import config as config_lib
from ddx import train
from ddx.processes.consistency import core as consistency
from ddx.processes.consistency.process import ConsistencyProcess

from testutils import load_config, random_model, train_and_resume

SD = 0.5


def _tiny(**extra):
  c = load_config()
  c.model.ch, c.model.ch_mult, c.model.attn_resolutions = 8, (1,), ()   # tiny: compile
  c.model.num_groups = 4
  c.diffusion.process, c.diffusion.num_timesteps = "consistency", 1000   # ddpm's default
  for key, value in extra.items():
    group, name = key.split(".")
    c[group][name] = value
  return c


def test_unet_tangent_matches_central_differences():
  """g from the process's F (the U-Net at time_input(t), through one jax.jvp)
  against central differences of the same network along (dx/dt/σ_d, 1). The
  network computes in float32: h = 1e-4 keeps the time embedding's fastest
  frequency (1 rad per unit of 1000·t/(π/2)) within 0.07 rad of linear. Time
  scale 1 (the process's own is 0.02) so that the time term is large enough
  to be seen."""
  model = random_model(_tiny(**{"model.time_scale": 1.0}))
  F = jax.jit(ConsistencyProcess(sigma_data=SD).denoiser(
      lambda x, s: model.apply(x, s)))
  rng = np.random.default_rng(0)
  x, dxdt = (jnp.asarray(rng.normal(size=(3, 8, 8, 1)), jnp.float32) for _ in range(2))
  t = jnp.asarray([0.2, 0.9, 1.4])
  out, g = jax.jit(lambda x, t, v: consistency.tangent(F, x, t, v, SD, norm_c=0.0))(
      x, t, dxdt)
  h = 1e-4
  dF = (F((x + h * dxdt) / SD, t + h) - F((x - h * dxdt) / SD, t - h)) / (2 * h)
  tb = t[:, None, None, None]
  want = (-jnp.cos(tb) ** 2 * (SD * out - dxdt)
          - jnp.cos(tb) * jnp.sin(tb) * (x + SD * dF))
  err = lambda a: float(jnp.linalg.norm(a - want) / jnp.linalg.norm(want))
  assert err(g) < 2e-3                       # measured: 2e-4
  # The network's time derivative is a sizeable part of g: without it
  # (differences along (dx/dt/σ_d, 0)) the same check fails.
  dx_only = (F((x + h * dxdt) / SD, t) - F((x - h * dxdt) / SD, t)) / (2 * h)
  assert err(want + jnp.cos(tb) * jnp.sin(tb) * SD * (dF - dx_only)) > 2e-2   # 0.07


def test_boundary_condition_is_exact_on_the_unet():
  c = _tiny()
  model = random_model(c)
  F = ConsistencyProcess(sigma_data=SD).denoiser(lambda x, s: model.apply(x, s))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  out = jax.jit(lambda x: consistency.consistency_fn(F, x, jnp.zeros((2,)), SD))(x)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


def test_config_errors_are_one_line():
  c = _tiny()
  config_lib.validate(c)
  assert c.sampling.sampler == "consistency" and c.diffusion.prediction == "auto"
  for key, value, match in (
      ("sampling.sampler", "heun", "sampling.sampler='heun' is not a sampler of "
       "diffusion.process=consistency"),
      ("eval.metrics", ("digits", "bpd"), "eval.metrics has bpd, but "
       "diffusion.process=consistency has no likelihood"),
      ("diffusion.scm_mid_t", 2.0, r"diffusion.scm_mid_t=2.0 must lie in \(0, π/2\)"),
      ("diffusion.scm_warmup_steps", -1, "diffusion.scm_warmup_steps=-1 must be"),
      ("diffusion.scm_p_std", 0.0, "diffusion.scm_p_std=0.0 must be > 0")):
    bad = _tiny(**{key: value})
    with pytest.raises(config_lib.ConfigError, match=match) as e:
      config_lib.validate(bad)
    assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="no likelihood ODE"):
    ConsistencyProcess().ode(None, 4)


@pytest.mark.slow
def test_trains_resumes_bitwise_loads_and_samples(tmp_path):
  c = _tiny()
  c.training.num_steps, c.training.log_every = 4, 2
  c.training.checkpoint_every, c.training.sample_every = 2, 4
  c.sampling.steps = 2
  straight_dir, _ = train_and_resume(c, tmp_path)

  model = ddx.load(straight_dir)
  assert isinstance(model.process, ConsistencyProcess)
  x_T = jax.random.normal(jax.random.key(3), (2, 8, 8, 1))
  one = ddx.sample_fn(model, jax.random.key(0), steps=1, x_T=x_T)
  two = ddx.sample_fn(model, jax.random.key(0), steps=2, x_T=x_T)
  assert one.shape == two.shape == (2, 8, 8, 1)
  assert bool(np.all(np.isfinite(one))) and not np.array_equal(one, two)
  np.testing.assert_array_equal(two, ddx.sample_fn(model, jax.random.key(0), steps=2,
                                                   x_T=x_T))
  # One step is f(σ_d·z, π/2) = −σ_d·F(z, π/2) of the EMA network, clipped.
  F = model.process.denoiser(lambda x, s: model.apply(x, s))
  want = -SD * F(x_T, jnp.full((2,), consistency.T_MAX))
  np.testing.assert_allclose(one, np.clip(want, -1, 1), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="sampler='euler' is not a sampler of diffusion.process=consistency"):
    ddx.sample_fn(model, jax.random.key(0), steps=2, sampler="euler")


@pytest.mark.slow
def test_distils_a_flow_teacher_and_refuses_one_of_other_classes(tmp_path):
  """training.teacher: a 2-step flow run distils through the trainer (its EMA
  weights an argument of the jitted step, its D(y; σ) from flow's
  sigma_denoiser); a teacher with other classes is one line, before compiling."""
  from ddx import parallel
  teacher_dir = str(tmp_path / "flow")
  t = _tiny(**{"diffusion.process": "flow", "training.num_steps": 2,
               "training.checkpoint_every": 2, "training.sample_every": 0})
  train.train_and_evaluate(t, teacher_dir)
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  c = _tiny(**{"training.teacher": teacher_dir})
  config_lib.validate(c)
  setup = train.make_setup(c, mesh)
  assert setup.teacher is not None
  state = setup.init(jax.random.key(0))
  images = np.asarray(jax.random.uniform(jax.random.key(1), (16, 8, 8, 1), minval=-1))
  batch = {"image": images, "label": np.zeros((16,), np.int32)}
  for _ in range(2):
    state, metrics = setup.step(state, batch, jax.random.key(2))
  assert int(state.step) == 2 and bool(metrics["finite"])

  bad = _tiny(**{"training.teacher": teacher_dir, "model.num_classes": 10,
                 "training.label_dropout": 0.1})
  config_lib.validate(bad)
  with pytest.raises(config_lib.ConfigError, match="has model.num_classes 0, this run 10") as e:
    train.make_setup(bad, mesh)
  assert "\n" not in str(e.value)
