"""Every process (and the DiT backbone) through the real trainer: train, resume
bitwise, load, and sample with each of the process's samplers."""
import os
import shutil

import jax
import numpy as np
import pytest

import ddx
from ddx import sampling, train

from testutils import load_config

# Each case also switches on features the trainer must carry for every process.
CASES = {
    # EDM, class-conditional with guidance, bfloat16 compute.
    "edm": {"diffusion.process": "edm", "sampling.sampler": "heun", "sampling.steps": 3,
            "sampling.clip_x0": False, "model.num_classes": 10,
            "training.label_dropout": 0.1, "sampling.guidance_scale": 2.0,
            "model.dtype": "bfloat16"},
    # Flow matching on a DiT, two updates per jitted call.
    "flow": {"diffusion.process": "flow", "diffusion.prediction": "v",
             "sampling.sampler": "euler", "sampling.steps": 3, "model.name": "dit",
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
  straight_dir = str(tmp_path / "straight")
  straight = train.train_and_evaluate(config, straight_dir)
  assert np.isfinite(float(jax.tree.leaves(straight.params)[0].sum()))
  resumed_dir = str(tmp_path / "resumed")
  shutil.copytree(straight_dir, resumed_dir)
  shutil.rmtree(os.path.join(resumed_dir, "checkpoints", "4"))   # as if stopped at 2
  resumed = train.train_and_evaluate(config, resumed_dir)
  assert int(resumed.step) == 4
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(a, b)
  assert os.path.exists(os.path.join(straight_dir, "samples", "step_0000004.png"))

  model = ddx.load(straight_dir)
  assert ddx.sampling.process_name(model.process) == config.diffusion.process
  x_T = jax.random.normal(jax.random.key(3), (2, 8, 8, 1))
  for sampler in sampling.SAMPLERS_BY_PROCESS[config.diffusion.process]:
    kw = {"churn": 5.0} if sampler == "stochastic" else {}
    imgs = ddx.sample_fn(model, jax.random.key(0), steps=2, sampler=sampler, x_T=x_T,
                         **kw)
    assert imgs.shape == (2, 8, 8, 1) and bool(np.all(np.isfinite(imgs))), sampler
    assert float(np.abs(imgs).max()) <= 1.0
  a = ddx.sample_fn(model, jax.random.key(0), steps=2, x_T=x_T)
  b = ddx.sample_fn(model, jax.random.key(0), steps=3, x_T=x_T)
  assert not np.array_equal(a, b)       # the step count reaches the sampler


@pytest.mark.parametrize("process", ["ddpm", "edm", "flow"])
def test_dit_trains_under_every_process(process):
  """Two real updates of a tiny DiT per process: finite loss, the output layer
  leaves zero (adaLN-Zero starts at exactly 0) and the EMA follows."""
  from ddx import parallel
  c = load_config()
  c.model.name, c.model.hidden_size, c.model.depth, c.model.num_heads = "dit", 32, 1, 2
  c.diffusion.process = process
  if process == "flow":
    c.diffusion.prediction = "v"
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
