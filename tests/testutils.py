"""Helpers shared by the tests."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str = "test"):
  """get_config() of configs/<name>.py, loaded by path as ddx.main does."""
  from ddx import config as config_lib
  return config_lib.from_file(os.path.join(ROOT, "configs", f"{name}.py"))


def as_prediction(eps_fn, sched, kind: str):
  """The denoiser eps_fn(x, i) re-expressed as an eps, x0 or v prediction."""
  import jax.numpy as jnp

  def fn(x, i):
    a = sched.alphas_cumprod[i][:, None]
    eps = eps_fn(x, i)
    x0 = (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
    return {"eps": eps, "x0": x0, "v": jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0}[kind]
  return fn


def gaussian_denoiser(sched, mu, s):
  """Exact ε-prediction for data x_0 ~ N(mu, s²): E[ε | x_t]."""
  import jax.numpy as jnp

  def fn(x, i):
    a = sched.alphas_cumprod[i][:, None]
    x0 = mu + jnp.sqrt(a) * s ** 2 / (a * s ** 2 + 1 - a) * (x - jnp.sqrt(a) * mu)
    return (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
  return fn


def random_model(config, seed: int = 0):
  """A ddx.Model of config's network with random weights drawn by NumPy (a jitted
  threefry init of even a tiny U-Net cost 20-30 s of CPU here); GroupNorm/LayerNorm
  scales start at 1."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from ddx import config as config_lib
  from ddx import model as model_lib
  abstract = jax.eval_shape(lambda k: model_lib.init_variables(config, k),
                            jax.random.key(0))["params"]
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: jnp.asarray(rng.normal(size=a.shape) * 0.05
                                  + (path[-1].key == "scale"), jnp.float32), abstract)
  return model_lib.Model({"params": params}, config_lib.freeze(config))


def jaxpr_eqns(jaxpr):
  """Every equation of a jaxpr, including those of nested (sub-)jaxprs."""
  import jax
  for eqn in jaxpr.eqns:
    yield eqn
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else [p]):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from jaxpr_eqns(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from jaxpr_eqns(sub)


# The custom call a Pallas kernel becomes, per jax.export platform.
PALLAS_CALLS = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}


def exported_calls(fn, args, platform: str) -> int:
  """How many Pallas custom calls `fn(*args)` lowers to for `platform` ("cuda" |
  "tpu"), through jax.export on this device-less machine; jax.default_backend()
  reads as that platform's backend while tracing, so ddx picks its kernels."""
  from unittest import mock
  import jax
  from jax import export
  call = PALLAS_CALLS[platform]
  backend = "gpu" if platform == "cuda" else platform
  with mock.patch.object(jax, "default_backend", lambda: backend):
    exp = export.export(jax.jit(fn), platforms=(platform,), disabled_checks=[
        export.DisabledSafetyCheck.custom_call(call)])(*args)
  return exp.mlir_module().count(call)


def gaussian_data(seed: int, shape, std_range=(0.3, 1.5)):
  """(rng, mean, std) of per-pixel Gaussian data x ~ N(mean, std²) of `shape`
  (one image, float32): the data whose flows have closed forms."""
  import numpy as np
  rng = np.random.default_rng(seed)
  mean = rng.normal(size=shape).astype(np.float32)
  std = rng.uniform(*std_range, size=shape).astype(np.float32)
  return rng, mean, std


def tree_digest(folder) -> dict:
  """{relative path: sha256} of every file under folder: equal before and after
  wherever a command must not change a byte."""
  import hashlib
  out = {}
  for base, _, files in os.walk(folder):
    for f in files:
      path = os.path.join(base, f)
      out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
  return out


def snapshot_leaves(workdir, config) -> dict:
  """{step: [leaves]} of every post-hoc EMA snapshot of a run of `config`,
  restored onto this process's first device (whatever device count saved it)."""
  import jax
  import numpy as np
  from ddx import model as model_lib
  from ddx import posthoc_ema
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params = jax.eval_shape(lambda k: model_lib.init_variables(config, k),
                          jax.random.key(0))["params"]
  tree = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), params)
  target = {"emas": (tree,) * len(config.training.posthoc_ema.sigma_rels), "batch_stats": {}}
  store = posthoc_ema.snapshots(workdir, read_only=True)
  return {s: [np.asarray(x) for x in jax.tree.leaves(store.restore(s, target))]
          for s in store.steps()}


def train_and_resume(config, tmp_path):
  """Trains `config` (4 steps, checkpoints at 2 and 4) straight, and a copy of
  that run resumed from step 2; asserts the two final states are equal bit for
  bit and the step-4 sample grid exists. Returns (straight workdir, its state)."""
  import shutil
  import jax
  import numpy as np
  from ddx import train
  straight_dir = str(tmp_path / "straight")
  straight = train.train_and_evaluate(config, straight_dir)
  resumed_dir = str(tmp_path / "resumed")
  shutil.copytree(straight_dir, resumed_dir)
  shutil.rmtree(os.path.join(resumed_dir, "checkpoints", "4"))   # as if stopped at 2
  resumed = train.train_and_evaluate(config, resumed_dir)
  assert int(resumed.step) == 4
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(a, b)
  assert os.path.exists(os.path.join(straight_dir, "samples", "step_0000004.png"))
  return straight_dir, straight


def main_in_process(argv):
  """`python -m ddx.main` with argv (argv[0] = "ddx.main") run in this process,
  cheaply: (its exit code, 0 when it returned; the --workdir it parsed). Its
  stdout and stderr are the test's (capsys). ddx.main's flags are swapped for
  fresh ones for the call and restored after."""
  import sys
  from unittest import mock
  import jax
  from absl import flags
  from ml_collections import config_flags
  from ddx import main as cli
  jax.devices()   # JAX started: ddx.main's split_cpu_into_devices leaves XLA_FLAGS be
  fv = flags.FlagValues()
  holders = {
      "_CONFIG": config_flags.DEFINE_config_file("config", None, "", flag_values=fv,
                                                 lock_config=True),
      "_WORKDIR": flags.DEFINE_string("workdir", None, "", flag_values=fv),
      "_MODE": flags.DEFINE_enum("mode", "train", flags.FLAGS["mode"].parser.enum_values, "",
                                 flag_values=fv),
      "_COORDINATOR": flags.DEFINE_string("coordinator_address", "", "", flag_values=fv),
      "_NUM_PROCESSES": flags.DEFINE_integer("num_processes", 0, "", flag_values=fv),
      "_PROCESS_ID": flags.DEFINE_integer("process_id", -1, "", flag_values=fv),
  }
  saved = {k: getattr(cli, k) for k in holders}, sys.argv
  code = 0
  try:
    sys.argv = list(argv)        # ml_collections reads the overrides from sys.argv
    for k, h in holders.items():
      setattr(cli, k, h)
    with mock.patch.object(flags, "FLAGS", fv):   # what cli._parse_flags parses with
      parsed = cli._parse_flags(list(argv))
    cli.main(parsed)   # outside the patch: grain reads its own flags from absl's FLAGS
  except SystemExit as e:
    code = e.code
  finally:
    for k, v in saved[0].items():
      setattr(cli, k, v)
    sys.argv = saved[1]
  return code, (fv["workdir"].value if fv["workdir"].present else None)
