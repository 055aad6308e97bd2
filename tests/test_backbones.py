"""Every registered backbone against the contract of ddx.models.base, and a backbone
registered at run time through the shared paths (train, checkpoint, resume, load, sample).

Parametrised over ddx.models.names(): a new backbone is tested here without editing
this file (its Spec.tiny gives the small settings).
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddx
from ddx import config as config_lib
from ddx import models
from ddx.models import base, layers

from testutils import load_config

B, SHAPE = 2, (8, 8, 1)


def _tiny_config(name):
  c = load_config()
  c.model.name = name
  c.model.update(models.spec(name).tiny)
  config_lib.validate(c)
  return c


def _shapes(net, x, t, labels, train):
  """(output, collections the call updates) of net on these inputs, as shapes only."""
  def run(key, x, t, labels):
    variables = net.init(key, x, t, labels)
    return net.apply(variables, x, t, labels, train, rngs={"dropout": key},
                     mutable=["batch_stats", "logvar"])
  return jax.eval_shape(run, jax.random.key(0), x, t, labels)


@pytest.mark.parametrize("name", models.names())
def test_the_network_accepts_every_contract_field(name):
  cls = models.implementation(name)
  own = {f.name for f in dataclasses.fields(cls)}
  assert set(base.CONTRACT_FIELDS) <= own, set(base.CONTRACT_FIELDS) - own
  assert {x.key for x in models.spec(name).fields} <= own   # build passes its keys


@pytest.mark.parametrize("second_time,logvar", [(False, False), (True, False),
                                                (False, True), (True, True)])
@pytest.mark.parametrize("name", models.names())
def test_every_backbone_meets_the_contract(name, second_time, logvar):
  c = _tiny_config(name)
  net = models.build(c.model, time_embedding="fourier", time_scale=2.0, num_classes=3,
                     second_time=second_time, logvar=logvar, remat="full",
                     attention="xla", norm_kernel="xla", dtype="bfloat16")
  x = jax.ShapeDtypeStruct((B,) + SHAPE, jnp.float32)
  t = jax.ShapeDtypeStruct((B, 2) if second_time else (B,), jnp.float32)
  y = jax.ShapeDtypeStruct((B,), jnp.int32)
  for labels in (y, None):
    for train in (False, True):
      out, updates = _shapes(net, x, t, labels, train)
      assert out.dtype == jnp.float32, (labels, train)
      assert out.shape[:-1] == x.shape[:-1] and out.shape[-1] % SHAPE[-1] == 0
      sown = jax.tree.leaves(updates.get("logvar", {}))
      assert bool(sown) == logvar
      assert all(v.shape == (B,) and v.dtype == jnp.float32 for v in sown)
  # The prediction channels: the shape of x (learn_sigma-like keys add channels).
  assert _shapes(net.clone(**{k: False for k in ("learn_sigma",) if hasattr(net, k)}),
                 x, t, y, False)[0].shape == x.shape
  # The plain network (its defaults): float32, [B] times.
  plain = models.build(c.model)
  out, _ = _shapes(plain, x, jax.ShapeDtypeStruct((B,), jnp.int32), None, False)
  assert out.shape == x.shape and out.dtype == jnp.float32
  # The wrong time rank is a one-line ValueError, before anything runs.
  wrong = jax.ShapeDtypeStruct((B,) if second_time else (B, 2), jnp.float32)
  with pytest.raises(ValueError, match=r"expects t of shape"):
    _shapes(net, x, wrong, y, False)


# A toy backbone, registered at run time: a conv, the time (and label) features
# added to every pixel, a zero-initialised conv out.

class _ToyNet(nn.Module):
  toy_width: int = 8
  num_classes: int = 0
  dtype: Any = "float32"
  time_embedding: str = "positional"
  time_scale: float = 1.0
  second_time: bool = False
  logvar: bool = False
  remat: str = "none"
  attention: str = "xla"
  norm_kernel: str = "xla"

  @nn.compact
  def __call__(self, x, t, labels=None, train=False):
    base.check_inputs(self, _TOY, x, t, labels)
    dt, w = jnp.dtype(self.dtype), self.toy_width

    def features(t):
      t = layers.scaled_time(t, self.time_scale)
      if self.time_embedding == "fourier":
        return layers.fourier_embedding(t, w)
      return layers.timestep_embedding(t, w)

    t, t2 = layers.split_time(t, self.second_time, "ToyNet")
    f = features(t)
    if self.logvar:
      layers.sow_logvar(self, f, dt)
    c = nn.Dense(w, dtype=dt, name="temb")(f)
    if t2 is not None:
      c = c + nn.Dense(w, dtype=dt, kernel_init=nn.initializers.zeros, name="temb2")(
          features(t2))
    if self.num_classes > 0:
      if labels is None:
        labels = jnp.full(x.shape[:1], self.num_classes, jnp.int32)
      c = c + nn.Embed(self.num_classes + 1, w, dtype=dt, name="label")(labels)
    h = nn.Conv(w, (3, 3), dtype=dt, name="conv_in")(x.astype(dt))
    h = nn.silu(h + c[:, None, None, :].astype(h.dtype))
    out = nn.Conv(x.shape[-1], (3, 3), dtype=dt, kernel_init=nn.initializers.zeros,
                  name="conv_out")(h)
    return out.astype(jnp.float32)


class _ToySpec(models.Spec):
  name = "toy"
  fields = (models.Field("toy_width", 8, "channels of the toy network"),)
  implementation = _ToyNet
  tiny = {"toy_width": 8}

  def check(self, m, height, width, what):
    if not (isinstance(m["toy_width"], int) and m["toy_width"] >= 4):
      raise ValueError(f"model.toy_width={m['toy_width']!r} must be an integer >= 4")


_TOY = _ToySpec()


@pytest.fixture
def toy(monkeypatch):
  monkeypatch.setitem(models.REGISTRY, "toy", _TOY)
  return _TOY


def test_a_registered_backbone_gets_its_keys_and_checks(toy):
  c = config_lib.base_config()
  assert c.model.toy_width == 8                       # its key, with its default
  c.model.name, c.model.toy_width = "toy", 2
  with pytest.raises(config_lib.ConfigError, match=r"^model.toy_width=2 must be an "
                     r"integer >= 4$"):
    config_lib.validate(c)
  c.model.toy_width = 8
  config_lib.validate(c)
  assert "toy" in models.names() and isinstance(models.build(c.model), _ToyNet)


def test_a_registered_backbone_meets_the_contract(toy):
  test_the_network_accepts_every_contract_field("toy")
  for second_time, logvar in ((False, False), (True, True)):
    test_every_backbone_meets_the_contract("toy", second_time, logvar)


def test_a_registered_backbone_trains_checkpoints_resumes_and_samples(toy, tmp_path):
  """Nothing outside the backbone's own folder needs editing: the config gets
  its key and checks, the trainer, checkpoints, ddx.load and sample_fn its
  network (6 s here)."""
  from ddx import train
  c = load_config()
  c.model.name, c.model.toy_width = "toy", 8
  c.training.num_steps, c.training.checkpoint_every = 2, 2
  c.training.sample_every, c.training.log_every = 0, 1
  workdir = str(tmp_path / "wd")
  train.train_and_evaluate(c, workdir)
  c.training.num_steps = 4                            # resume from step 2
  state = train.train_and_evaluate(c, workdir)
  assert int(state.step) == 4
  model = ddx.load(workdir)
  assert model.config.model.name == "toy"
  for a, b in zip(jax.tree.leaves(model.variables["params"]),
                  jax.tree.leaves(state.ema_params)):
    np.testing.assert_array_equal(a, b)
  imgs = ddx.sample_fn(model, jax.random.key(0), steps=3, num_samples=2)
  assert imgs.shape == (2,) + SHAPE and bool(np.all(np.isfinite(imgs)))
