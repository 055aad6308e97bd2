"""diffusion.process = shortcut: its config checks, its training targets on the
real (tiny) U-Net, and a conditional run through the trainer, resume, load and
guided sampling."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddx
from ddx import config as config_lib
from ddx import model as model_lib
from ddx import processes
from ddx.processes.shortcut import ShortcutProcess

from testutils import load_config

M = 4   # shortcut_max_steps in these tests: step sizes 1/4 (the flow), 1/2, 1


def _config(**diffusion):
  c = load_config()
  c.model.ch, c.model.ch_mult, c.model.attn_resolutions = 8, (1,), ()   # tiny: compile
  c.diffusion.process, c.diffusion.num_timesteps = "shortcut", 1000   # ddpm's default
  c.diffusion.shortcut_max_steps = M
  c.diffusion.update(diffusion)
  c.sampling.steps = c.eval.steps = 2
  return c


@pytest.mark.parametrize("key,value,words", [
    ("diffusion.shortcut_max_steps", 3, "diffusion.shortcut_max_steps=3 must be a power of two"),
    ("diffusion.shortcut_max_steps", 1, "diffusion.shortcut_max_steps=1 leaves no step size"),
    ("diffusion.shortcut_consistency_fraction", 1.0,
     r"diffusion.shortcut_consistency_fraction=1.0 must lie in \(0, 1\)"),
    ("diffusion.t_sampling", "beta", "diffusion.t_sampling='beta' is unknown"),
    ("sampling.steps", 3, r"sampling.steps=3 is not a step count of the shortcut sampler: a "
     r"power of two up to diffusion.shortcut_max_steps=4, one of \(1, 2, 4\)"),
    ("sampling.steps", 8, r"sampling.steps=8 must be an integer in \[1, 4\]"),
    ("sampling.sampler", "heun", "sampling.sampler='heun' is not a sampler of "
     "diffusion.process=shortcut"),
    ("eval.metrics", ("digits", "bpd"), "eval.metrics has bpd, but diffusion.process="
     r"shortcut has no likelihood \(bits/dim\); drop bpd"),
])
def test_bad_config_is_one_line(key, value, words):
  c = _config()
  config_lib.validate(c)
  assert (c.sampling.sampler, c.eval.sampler) == ("shortcut", "shortcut")   # auto
  group, name = key.split(".")
  c[group][name] = value
  with pytest.raises(config_lib.ConfigError, match=words) as e:
    if group == "eval":
      config_lib.check_eval_inputs(c)     # what --mode eval checks
    else:
      config_lib.validate(c)
  assert "\n" not in str(e.value)


def test_keys_share_flow_time_defaults_and_steps_are_checked_for_eval():
  spec = processes.spec("shortcut")
  flow = processes.spec("flow").defaults()
  assert {k: spec.defaults()[k] for k in ("t_sampling", "logit_mean", "logit_std")} == {
      k: flow[k] for k in ("t_sampling", "logit_mean", "logit_std")}
  assert spec.bpd_estimators == () and spec.second_time
  c = _config()
  c.sampling.sampler, c.sampling.steps = "euler", 3       # the d = 0 ODE: any steps
  config_lib.validate(c)
  c.eval.steps, c.eval.every_steps = 3, 3
  with pytest.raises(config_lib.ConfigError, match="eval.steps=3 is not a step count"):
    config_lib.validate(c)
  c = config_lib.from_file(os.path.join(os.path.dirname(__file__), "..", "configs",
                                        "digits_shortcut.py"))
  config_lib.validate(c)
