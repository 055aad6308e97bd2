"""Research features: bf16 mixed precision, BatchNorm, the article config, digits CFG."""
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import ddx
from ddx import config as config_lib
from ddx import data, sampling, train
from ddx.processes.ddpm import schedules

from testutils import ROOT, load_config


def test_config_checks_dtype_and_norm():
  c = load_config()
  c.model.dtype = "float16"
  with pytest.raises(config_lib.ConfigError, match=r"^model\.dtype='float16' .*bfloat16"):
    config_lib.validate(c)
  c = load_config()
  c.model.norm = "layer"
  with pytest.raises(config_lib.ConfigError, match=r"^model\.norm='layer' .*'group', 'batch'"):
    config_lib.validate(c)
  # num_groups only constrains GroupNorm.
  c = load_config()
  c.model.num_groups = 3
  with pytest.raises(config_lib.ConfigError, match="num_groups=3"):
    config_lib.validate(c)
  c.model.norm = "batch"
  config_lib.validate(c)


def test_structure_changes_of_an_older_config_and_of_dtype():
  """A run from before model.norm/dtype existed gets today's defaults; dtype, lr
  and cadences are never named as structure changes."""
  old = config_lib.to_dict(load_config())
  del old["model"]["norm"], old["model"]["dtype"]
  old = config_lib.with_defaults(old)
  new = load_config()
  assert config_lib.structure_changes(old, new) == []
  new.model.dtype, new.optim.lr, new.training.log_every = "bfloat16", 0.5, 7
  assert config_lib.structure_changes(old, new) == []
  new.model.norm, new.optim.grad_clip = "batch", 0.0
  assert config_lib.structure_changes(old, new) == [
      ("model.norm", "group", "batch"), ("optim.grad_clip", 1.0, 0.0)]


def _batches(config, n):
  src = data.make_source(config.data)
  return [data.get_batch(src, k, batch_size=config.training.batch_size, seed=0,
                         random_flip=False) for k in range(n)]


def _run_steps(config, state, batches):
  net = ddx.models.build(config.model)
  step = jax.jit(lambda s, b, k: train.train_step(
      s, b, k, net=net, sched=schedules.from_config(config.diffusion),
      tx=train.make_optimizer(config.optim), config=config))
  losses = []
  for b in batches:
    state, m = step(state, b, jax.random.key(1))
    assert bool(m["finite"])
    losses.append(float(m["loss"]))
  return state, np.array(losses)


@pytest.mark.slow
def test_bfloat16_training_tracks_float32():
  """bf16 compute, f32 params: same init and data, the loss curves agree."""
  c32 = load_config()
  # One level with attention at 8x8: every layer kind still runs in bf16, and
  # half the compile of configs/test.py's two levels.
  c32.model.ch_mult, c32.model.attn_resolutions = (1,), (8,)
  c16 = config_lib.from_dict(config_lib.to_dict(c32))
  c16.model.dtype = "bfloat16"
  config_lib.validate(c16)
  tx = train.make_optimizer(c32.optim)
  state = jax.jit(lambda k: train.create_state(c32, tx, k))(
      jax.random.key(0))
  batches = _batches(c32, 5)
  s32, l32 = _run_steps(c32, state, batches)
  s16, l16 = _run_steps(c16, state, batches)
  # Everything the optimizer touches stays float32 (the step counts are int32).
  assert {l.dtype for l in jax.tree.leaves((s16.params, s16.ema_params, s16.opt_state))
          if jnp.issubdtype(l.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
  assert l32[-1] < 0.85 * l32[0]                     # it is learning
  np.testing.assert_allclose(l16, l32, rtol=0.03)    # measured: < 0.5% apart
  # bf16 really ran: the updates differ a little from the f32 ones.
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(s16.params), jax.tree.leaves(s32.params)))
  print("f32 loss", l32, "\nbf16 loss", l16, "\nmax |param diff|", diff)
  assert 0 < diff < 5e-3


def _image_folder(path, n=8):
  rng = np.random.default_rng(0)
  os.makedirs(path, exist_ok=True)
  for k in range(n):   # non-square: the loader centre-crops, then resizes
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), np.uint8)).save(
        os.path.join(path, f"im{k}.png"))


@pytest.mark.slow
def test_article_config_batchnorm_end_to_end(tmp_path):
  """configs/article.py, shrunk, on a folder of PNGs: train, load, sample.

  BatchNorm's running statistics are trained, checkpointed, returned by
  ddx.load and used for sampling: each sample is the same whether it is drawn
  alone or in a batch of 4, which batch statistics would break.
  """
  c = load_config("article")
  with pytest.raises(config_lib.ConfigError, match=r"^data\.path is empty"):
    config_lib.validate(c)
  assert (c.model.norm, c.model.attn_resolutions, c.data.image_size,
          c.sampling.steps, c.training.batch_size) == ("batch", (), 64, 200, 32)
  _image_folder(tmp_path / "images")
  c.data.path = str(tmp_path / "images")
  c.data.image_size = 8
  c.model.ch, c.model.ch_mult, c.model.num_res_blocks = 8, (1,), 1   # one level: compile
  c.training.batch_size, c.training.num_steps, c.training.log_every = 4, 3, 1
  c.training.checkpoint_every = c.training.sample_every = 3
  c.sampling.steps, c.sampling.num_samples = 3, 4
  workdir = str(tmp_path / "wd")
  state = train.train_and_evaluate(c, workdir)
  assert int(state.step) == 3
  stats = state.batch_stats["norm_out"]
  assert np.all(np.isfinite(stats["mean"])) and np.all(np.isfinite(stats["var"]))
  assert float(jnp.abs(stats["mean"]).max()) > 1e-3      # moved from the init (0, 1)
  assert float(jnp.abs(stats["var"] - 1).max()) > 1e-3
  assert os.path.exists(os.path.join(workdir, "samples", "step_0000003.png"))

  model = ddx.load(workdir)
  assert set(model.variables) == {"params", "batch_stats"}
  for a, b in zip(jax.tree.leaves(model.variables["batch_stats"]),
                  jax.tree.leaves(state.batch_stats)):
    np.testing.assert_array_equal(a, b)
  # After 3 steps the zero-initialised output conv is still ~0, so every
  # sample would be the same function of its own x_T whatever the norm does:
  # give it random weights, so that the outputs depend on the normalisation.
  params = dict(model.variables["params"])
  kernel = params["conv_out"]["kernel"]
  params["conv_out"] = {**params["conv_out"], "kernel": 0.3 * jax.random.normal(
      jax.random.key(5), kernel.shape)}
  model = ddx.Model({**model.variables, "params": params}, model.config)
  rng = jax.random.key(0)
  four = ddx.sample_fn(model, rng)
  x_T = sampling.initial_noise(rng, (4, 8, 8, 3))   # what `four` started from
  one = ddx.sample_fn(model, rng, x_T=x_T[:1])
  assert four.shape == (4, 8, 8, 3) and bool(jnp.all(jnp.isfinite(four)))
  np.testing.assert_allclose(one[0], four[0], atol=1e-5)
  # That check can fail: with batch statistics the network's output for the
  # first image depends on the other three.
  net, t = model.network(), jnp.full((4,), 500, jnp.int32)
  apply = jax.jit(lambda v, x, train: net.apply(v, x, t, train=train,
                                                mutable=["batch_stats"])[0],
                  static_argnums=2)
  others = x_T.at[1:].set(-x_T[1:])
  for train_mode, differs in ((False, False), (True, True)):
    diff = apply(model.variables, x_T, train_mode)[0] - apply(
        model.variables, others, train_mode)[0]
    assert (float(jnp.abs(diff).max()) > 1e-2) == differs, train_mode


_GLOBAL_STATS = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from ddx.models import UNet
    assert jax.device_count() == 2
    net = UNet(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), norm="batch")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 4, 4, 1)), jnp.float32)
    x = x + jnp.arange(4.0)[:, None, None, None]    # the halves differ in mean
    t = jnp.zeros((4,), jnp.int32)
    v = jax.jit(net.init)(jax.random.key(0), x, t)
    stats = jax.jit(lambda v, x: net.apply(v, x, t[:len(x)], train=True,
                                           mutable=["batch_stats"])[1])
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
    assert len(sharded.addressable_shards) == 2
    first = lambda s: s["batch_stats"]["down_0_block_0"]["norm1"]["mean"]
    glob, whole, half = first(stats(v, sharded)), first(stats(v, x)), first(stats(v, x[:2]))
    np.testing.assert_allclose(glob, whole, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(glob - half).max()) > 1e-2
    print("GLOBAL OK")
""")


@pytest.mark.slow
def test_batchnorm_statistics_are_global_over_a_sharded_batch():
  """Under jit over a 2-device Mesh, BatchNorm sees the whole global batch."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
  r = subprocess.run([sys.executable, "-c", _GLOBAL_STATS], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0 and "GLOBAL OK" in r.stdout, r.stderr[-3000:]


@pytest.mark.slow
def test_docs_guidance_example_runs(monkeypatch):
  """docs/samplers.md's class-conditional block, on a tiny random conditional network."""
  with open(os.path.join(ROOT, "docs", "samplers.md")) as f:
    blocks = [b for b in re.findall(r"```python\n(.*?)```", f.read(), re.S)
              if "runs/digits_cond" in b]
  assert len(blocks) == 1
  c = load_config()
  c.model.num_classes, c.training.label_dropout = 10, 0.1
  net = ddx.models.build(c.model)
  shapes = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)),
                          jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))
  rng = np.random.default_rng(0)   # random everywhere: the output conv is not 0
  params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape),
                                              s.dtype), shapes["params"])
  model = ddx.Model({"params": params}, config_lib.freeze(c))
  monkeypatch.setattr(ddx, "load", lambda workdir: model)
  scope = {}
  exec(compile(blocks[0], "docs/samplers.md", "exec"), scope)
  imgs = scope["imgs"]
  assert imgs.shape == (100, 8, 8, 1) and bool(jnp.all(jnp.abs(imgs) <= 1))
  assert float(jnp.abs(imgs[0] - imgs[10]).max()) > 1e-2   # label 0 vs label 1
